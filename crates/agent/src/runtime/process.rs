//! The process runtime: each container is a supervised process on the node, run by a
//! `meridian shim` in a process group of its own. The image is not used; the
//! container's `command`/`args` run directly on the host with the pod's environment.
//! cpu/memory limits go into cgroups (v2, or v1 cpu+memory) when the agent may
//! create them, and the node says plainly when it cannot.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::{
    ContainerHandle, ExecProcess, ExecRequest, Exit, RunState, Runtime, RuntimeError, StartRequest,
};

const CFS_PERIOD_US: i64 = 100_000;

#[derive(Clone, Debug)]
enum Cgroups {
    V2 { base: PathBuf },
    V1 { memory: PathBuf, cpu: PathBuf },
    None { reason: String },
}

pub struct ProcessRuntime {
    /// The binary whose `shim` subcommand supervises containers.
    shim_exe: PathBuf,
    cgroups: Cgroups,
}

impl ProcessRuntime {
    /// `shim_exe` is normally the running `meridian` binary.
    pub fn new(shim_exe: PathBuf) -> Self {
        let cgroups = detect_cgroups();
        if let Cgroups::None { reason } = &cgroups {
            tracing::warn!("cpu/memory limits will not be enforced: {reason}");
        }
        Self { shim_exe, cgroups }
    }

    fn cgroup_dirs(&self, id: &str) -> Vec<PathBuf> {
        match &self.cgroups {
            Cgroups::V2 { base } => vec![base.join(id)],
            Cgroups::V1 { memory, cpu } => vec![memory.join(id), cpu.join(id)],
            Cgroups::None { .. } => vec![],
        }
    }

    fn setup_cgroups(&self, id: &str, req: &StartRequest) -> Result<Vec<PathBuf>, RuntimeError> {
        let mut procs = Vec::new();
        let dirs = self.cgroup_dirs(id);
        for dir in &dirs {
            std::fs::create_dir_all(dir)?;
            procs.push(dir.join("cgroup.procs"));
        }
        match &self.cgroups {
            Cgroups::V2 { base } => {
                let dir = base.join(id);
                if let Some(m) = req.memory_limit_bytes {
                    std::fs::write(dir.join("memory.max"), m.to_string())?;
                }
                if let Some(c) = req.cpu_limit_millis {
                    let quota = (c * CFS_PERIOD_US / 1000).max(1000);
                    std::fs::write(dir.join("cpu.max"), format!("{quota} {CFS_PERIOD_US}"))?;
                }
            }
            Cgroups::V1 { memory, cpu } => {
                if let Some(m) = req.memory_limit_bytes {
                    std::fs::write(memory.join(id).join("memory.limit_in_bytes"), m.to_string())?;
                }
                if let Some(c) = req.cpu_limit_millis {
                    let quota = (c * CFS_PERIOD_US / 1000).max(1000);
                    std::fs::write(
                        cpu.join(id).join("cpu.cfs_period_us"),
                        CFS_PERIOD_US.to_string(),
                    )?;
                    std::fs::write(cpu.join(id).join("cpu.cfs_quota_us"), quota.to_string())?;
                }
            }
            Cgroups::None { .. } => {}
        }
        Ok(procs)
    }

    fn remove_cgroups(&self, id: &str) {
        for dir in self.cgroup_dirs(id) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn detect_cgroups() -> Cgroups {
    let root = Path::new("/sys/fs/cgroup");
    let probe = |dir: &Path| -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
    };
    if root.join("cgroup.controllers").exists() {
        let base = root.join("meridian");
        return match probe(&base) {
            Ok(()) => {
                // Delegate cpu and memory to our subtree; harmless when already on.
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu +memory");
                let _ = std::fs::write(base.join("cgroup.subtree_control"), "+cpu +memory");
                Cgroups::V2 { base }
            }
            Err(reason) => Cgroups::None { reason },
        };
    }
    let (memory, cpu) = (root.join("memory/meridian"), root.join("cpu/meridian"));
    if root.join("memory").is_dir() && root.join("cpu").is_dir() {
        return match probe(&memory).and_then(|_| probe(&cpu)) {
            Ok(()) => Cgroups::V1 { memory, cpu },
            Err(reason) => Cgroups::None { reason },
        };
    }
    Cgroups::None {
        reason: "no cgroup v1 cpu/memory or v2 hierarchy under /sys/fs/cgroup".into(),
    }
}

/// Kernel start time of a process in clock ticks since boot (field 22 of stat).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn cpu_and_rss(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let rss_pages: u64 = f.get(21)?.parse().ok()?;
    Some((ticks * 10_000_000, rss_pages * 4096))
}

fn alive(pid: u32, ticks: u64) -> bool {
    start_ticks(pid) == Some(ticks)
}

fn read_exit(dir: &Path) -> Option<Exit> {
    let data = std::fs::read(dir.join("exit")).ok()?;
    serde_json::from_slice(&data).ok()
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    fn limits_not_enforced(&self) -> Option<String> {
        match &self.cgroups {
            Cgroups::None { reason } => Some(reason.clone()),
            _ => None,
        }
    }

    async fn start(&self, req: StartRequest) -> Result<ContainerHandle, RuntimeError> {
        if req.argv.is_empty() {
            return Err(RuntimeError::Config(
                "the process runtime needs spec.containers[].command: it does not read images, \
                 so it cannot know the image's entrypoint"
                    .into(),
            ));
        }
        let dir = &req.state_dir;
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        if let Some(p) = req.log_path.parent() {
            std::fs::create_dir_all(p)?;
        }
        let id = format!("{}_{}_{}", req.pod_uid, req.container, req.attempt);
        let procs = self.setup_cgroups(&id, &req)?;
        let mut cmd = tokio::process::Command::new(&self.shim_exe);
        cmd.arg("shim")
            .arg("--state-dir")
            .arg(dir)
            .arg("--log")
            .arg(&req.log_path);
        for p in &procs {
            cmd.arg("--cgroup").arg(p);
        }
        if let Some(w) = &req.working_dir {
            cmd.arg("--workdir").arg(w);
        }
        cmd.arg("--")
            .args(&req.argv)
            .env_clear()
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd
            .spawn()
            .map_err(|e| RuntimeError::Start(format!("cannot start shim: {e}")))?;
        // Reap the shim if it ends while we live; it is re-parented if we die first.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        let started_at = Timestamp::now();
        for _ in 0..500 {
            if let Some(exit) = read_exit(dir)
                && exit.reason.as_deref() == Some("StartError")
            {
                self.remove_cgroups(&id);
                return Err(RuntimeError::Start(exit.message.unwrap_or_default()));
            }
            if let Some(pid) = read_pid(&dir.join("pid")) {
                // A process that already ended has no stat; its exit file tells.
                let ticks = start_ticks(pid).unwrap_or(0);
                return Ok(ContainerHandle {
                    id,
                    pid,
                    start_ticks: ticks,
                    state_dir: dir.clone(),
                    started_at,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(RuntimeError::Start(
            "the shim did not start the container within 5s".into(),
        ))
    }

    async fn inspect(&self, h: &ContainerHandle) -> RunState {
        if let Some(exit) = read_exit(&h.state_dir) {
            self.remove_cgroups(&h.id);
            return RunState::Exited(exit);
        }
        if h.start_ticks != 0 && alive(h.pid, h.start_ticks) {
            return RunState::Running;
        }
        // The process is gone; its shim may be writing the exit file right now.
        let shim = read_pid(&h.state_dir.join("shim.pid"));
        if shim.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some(exit) = read_exit(&h.state_dir) {
                return RunState::Exited(exit);
            }
            return RunState::Running;
        }
        if let Some(exit) = read_exit(&h.state_dir) {
            return RunState::Exited(exit);
        }
        RunState::Exited(Exit {
            exit_code: 137,
            signal: None,
            finished_at: Timestamp::now(),
            reason: Some("ContainerStatusUnknown".into()),
            message: Some("the container and its shim are gone without an exit record".into()),
        })
    }

    async fn stop(&self, h: &ContainerHandle, grace: Duration) {
        // Signal only a process we can prove is ours (pid and kernel start time): a
        // pid from a record may have been recycled for an unrelated process.
        let pgid = Pid::from_raw(h.pid as i32);
        let ours = || h.start_ticks != 0 && alive(h.pid, h.start_ticks);
        if !ours() {
            return;
        }
        let _ = killpg(pgid, Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if matches!(self.inspect(h).await, RunState::Exited(_)) || !ours() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if ours() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        for _ in 0..100 {
            if matches!(self.inspect(h).await, RunState::Exited(_)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn exec(
        &self,
        _h: &ContainerHandle,
        argv: &[String],
        env: &[(String, String)],
        timeout: Duration,
    ) -> Result<i32, RuntimeError> {
        let Some((prog, args)) = argv.split_first() else {
            return Err(RuntimeError::Config("empty exec command".into()));
        };
        let mut cmd = tokio::process::Command::new(prog);
        cmd.args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| RuntimeError::Start(format!("exec {prog:?}: {e}")))?;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(s)) => Ok(s.code().unwrap_or(128)),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(RuntimeError::Start(format!(
                "exec timed out after {timeout:?}"
            ))),
        }
    }

    /// Runs the command on the node beside the container's process (this runtime
    /// has no isolation to enter), with its environment and working directory.
    async fn exec_stream(
        &self,
        _h: &ContainerHandle,
        req: ExecRequest,
    ) -> Result<ExecProcess, RuntimeError> {
        let Some((prog, args)) = req.argv.split_first() else {
            return Err(RuntimeError::Config("empty exec command".into()));
        };
        if req.tty {
            return exec_on_terminal(&self.shim_exe, prog, args, &req);
        }
        let mut cmd = tokio::process::Command::new(prog);
        cmd.args(args)
            .env_clear()
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .stdin(if req.stdin {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if let Some(w) = &req.working_dir {
            cmd.current_dir(w);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| RuntimeError::Start(format!("exec {prog:?}: {e}")))?;
        let stdin = child
            .stdin
            .take()
            .map(|s| Box::pin(s) as std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>);
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| RuntimeError::Start("exec: no stdout pipe".into()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| RuntimeError::Start("exec: no stderr pipe".into()))?;
        Ok(ExecProcess {
            stdin,
            stdout: Box::pin(stdout),
            stderr: Some(Box::pin(stderr)),
            exit: exit_of(child),
            resize: None,
        })
    }

    async fn usage(&self, h: &ContainerHandle) -> Option<(u64, u64)> {
        if !alive(h.pid, h.start_ticks) {
            return None;
        }
        cpu_and_rss(h.pid)
    }
}

/// Kills every shim found under `root` (an agent data dir, or a directory holding
/// several) together with its container's process group: for tests, benchmarks and
/// decommissioning a node. Only processes proven to be ours are signalled — a shim
/// whose command line names its state dir, and a container whose parent is that
/// shim — since stale pid files may name recycled pids. Returns how many it killed.
pub fn kill_leftovers(root: &Path) -> usize {
    let mut killed = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            }
        }
        let Some(shim) = read_pid(&d.join("shim.pid")) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{shim}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(&*d.to_string_lossy()) {
            continue;
        }
        if let Some(child) = read_pid(&d.join("pid"))
            && parent_of(child) == Some(shim)
        {
            let _ = killpg(Pid::from_raw(child as i32), Signal::SIGKILL);
        }
        let _ = nix::sys::signal::kill(Pid::from_raw(shim as i32), Signal::SIGKILL);
        killed += 1;
    }
    killed
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `kubectl exec -t`: the command on a new pseudo-terminal. `meridian shim-tty`
/// makes itself a session leader, opens the terminal (which makes it the
/// controlling one) as its standard streams and becomes the command; input and
/// output go through the terminal's master side.
fn exec_on_terminal(
    shim: &Path,
    prog: &str,
    args: &[String],
    req: &ExecRequest,
) -> Result<ExecProcess, RuntimeError> {
    let pty = nix::pty::openpty(None, None)
        .map_err(|e| RuntimeError::Start(format!("exec: no terminal: {e}")))?;
    let tty = nix::unistd::ttyname(&pty.slave)
        .map_err(|e| RuntimeError::Start(format!("exec: terminal name: {e}")))?;
    let mut cmd = tokio::process::Command::new(shim);
    cmd.arg("shim-tty")
        .arg(&tty)
        .arg("--")
        .arg(prog)
        .args(args)
        .env_clear()
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .env("TERM", "xterm")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(w) = &req.working_dir {
        cmd.current_dir(w);
    }
    let child = cmd
        .spawn()
        .map_err(|e| RuntimeError::Start(format!("exec {prog:?}: {e}")))?;
    // Only the command holds the terminal open now: when it is gone, reading the
    // master fails (EIO), which ends the output.
    drop(pty.slave);
    let master = std::fs::File::from(pty.master);
    let writer = tokio::fs::File::from_std(master.try_clone()?);
    let sizer = master.try_clone()?;
    let reader = tokio::fs::File::from_std(master);
    Ok(ExecProcess {
        stdin: Some(Box::pin(writer)),
        stdout: Box::pin(reader),
        stderr: None,
        exit: exit_of(child),
        resize: Some(Box::new(move |cols, rows| {
            let size = rustix::termios::Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let _ = rustix::termios::tcsetwinsize(&sizer, size);
        })),
    })
}

/// The exit code of `child` once it has ended (128 when a signal ended it).
fn exit_of(
    mut child: tokio::process::Child,
) -> futures::future::BoxFuture<'static, Result<i32, RuntimeError>> {
    Box::pin(async move {
        let s = child.wait().await?;
        Ok(s.code().unwrap_or(128))
    })
}
