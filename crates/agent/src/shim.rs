//! `meridian shim`: the small supervisor that owns one container process of the
//! process runtime, like containerd's shim. It outlives the agent, so a killed or
//! upgraded agent never takes workloads down with it.
//!
//! It joins the container's cgroups, starts the command in a process group of its
//! own, writes `pid`, copies stdout/stderr into a CRI-format log file (rotating it),
//! and when the command ends writes `exit` (JSON) for whichever agent looks next.
//! Plain std threads: no async runtime, a small resident footprint.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;

use crate::runtime::Exit;

/// Rotate a container log once it passes this size (one older file is kept).
pub const LOG_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Longest line written as one log record; longer lines are split into partials.
const MAX_LINE: usize = 16 * 1024;

struct Args {
    state_dir: PathBuf,
    log: PathBuf,
    cgroups: Vec<PathBuf>,
    workdir: Option<PathBuf>,
    argv: Vec<String>,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut state_dir = None;
    let mut log = None;
    let mut cgroups = Vec::new();
    let mut workdir = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--state-dir" => state_dir = Some(PathBuf::from(value()?)),
            "--log" => log = Some(PathBuf::from(value()?)),
            "--cgroup" => cgroups.push(PathBuf::from(value()?)),
            "--workdir" => workdir = Some(PathBuf::from(value()?)),
            "--" => break,
            other => return Err(format!("unknown shim argument {other:?}")),
        }
    }
    let argv: Vec<String> = it.cloned().collect();
    if argv.is_empty() {
        return Err("no command after --".into());
    }
    Ok(Args {
        state_dir: state_dir.ok_or("--state-dir is required")?,
        log: log.ok_or("--log is required")?,
        cgroups,
        workdir,
        argv,
    })
}

/// Writes a file atomically (temporary file, then rename).
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(tmp, path)
}

fn write_exit(dir: &Path, exit: &Exit) {
    let data = serde_json::to_vec(exit).unwrap_or_default();
    if let Err(e) = write_atomic(&dir.join("exit"), &data) {
        eprintln!("meridian shim: cannot write exit file: {e}");
    }
}

/// `meridian shim-tty TTY -- COMMAND...` (`kubectl exec -t` on the process
/// runtime): becomes a session leader, opens the terminal `TTY` — which makes it
/// the controlling terminal — as standard input, output and error, and replaces
/// itself with the command. Returns only if that fails.
pub fn tty_main(args: &[String]) -> i32 {
    use std::os::unix::process::CommandExt;
    let (Some(tty), Some("--"), Some(prog)) =
        (args.first(), args.get(1).map(String::as_str), args.get(2))
    else {
        eprintln!("usage: meridian shim-tty TTY -- COMMAND [ARG...]");
        return 2;
    };
    if let Err(e) = nix::unistd::setsid() {
        eprintln!("meridian shim-tty: setsid: {e}");
        return 126;
    }
    let open = || std::fs::OpenOptions::new().read(true).write(true).open(tty);
    let (Ok(a), Ok(b), Ok(c)) = (open(), open(), open()) else {
        eprintln!("meridian shim-tty: cannot open {tty}");
        return 126;
    };
    let e = Command::new(prog)
        .args(&args[3..])
        .stdin(a)
        .stdout(b)
        .stderr(c)
        .exec();
    // The terminal is our stderr no longer; say it where the user looks.
    if let Ok(mut t) = std::fs::OpenOptions::new().write(true).open(tty) {
        use std::io::Write;
        let _ = writeln!(t, "exec {prog:?}: {e}");
    }
    127
}

/// Runs the shim; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let args = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("meridian shim: {e}");
            return 2;
        }
    };
    let _ = write_atomic(
        &args.state_dir.join("shim.pid"),
        std::process::id().to_string().as_bytes(),
    );
    for procs in &args.cgroups {
        if let Err(e) = std::fs::write(procs, std::process::id().to_string()) {
            eprintln!("meridian shim: cannot join cgroup {}: {e}", procs.display());
        }
    }
    let log = match LogWriter::open(args.log.clone()) {
        Ok(l) => Arc::new(Mutex::new(l)),
        Err(e) => {
            write_exit(&args.state_dir, &start_error(format!("open log: {e}")));
            return 1;
        }
    };
    let mut cmd = Command::new(&args.argv[0]);
    cmd.args(&args.argv[1..])
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(w) = &args.workdir {
        cmd.current_dir(w);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("cannot start {:?}: {e}", args.argv[0]);
            log.lock()
                .map(|mut l| l.line("stderr", msg.as_bytes()))
                .ok();
            write_exit(&args.state_dir, &start_error(msg));
            return 1;
        }
    };
    let _ = write_atomic(
        &args.state_dir.join("pid"),
        child.id().to_string().as_bytes(),
    );
    let mut copiers = Vec::new();
    if let Some(out) = child.stdout.take() {
        copiers.push(copy(out, "stdout", log.clone()));
    }
    if let Some(err) = child.stderr.take() {
        copiers.push(copy(err, "stderr", log.clone()));
    }
    let status = child.wait();
    // Descendants may hold the pipes open; give the copiers a moment, not forever.
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    for c in copiers {
        while !c.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let oom = args.cgroups.iter().any(|p| oom_killed(p));
    let exit = match status {
        Ok(s) => {
            let signal = s.signal();
            let code = s.code().unwrap_or_else(|| 128 + signal.unwrap_or(0));
            let reason = if oom {
                "OOMKilled"
            } else if code == 0 {
                "Completed"
            } else {
                "Error"
            };
            Exit {
                exit_code: code,
                signal,
                finished_at: Timestamp::now(),
                reason: Some(reason.into()),
                message: None,
            }
        }
        Err(e) => Exit {
            exit_code: 128,
            signal: None,
            finished_at: Timestamp::now(),
            reason: Some("Error".into()),
            message: Some(format!("wait: {e}")),
        },
    };
    if let Ok(mut l) = log.lock() {
        l.flush();
    }
    write_exit(&args.state_dir, &exit);
    0
}

fn start_error(message: String) -> Exit {
    Exit {
        exit_code: 128,
        signal: None,
        finished_at: Timestamp::now(),
        reason: Some("StartError".into()),
        message: Some(message),
    }
}

/// Whether the kernel OOM-killed something in the cgroup whose `cgroup.procs` is `procs`.
fn oom_killed(procs: &Path) -> bool {
    let Some(dir) = procs.parent() else {
        return false;
    };
    ["memory.events", "memory.oom_control"].iter().any(|f| {
        std::fs::read_to_string(dir.join(f))
            .map(|s| {
                s.lines().any(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .is_some_and(|n| n > 0)
                })
            })
            .unwrap_or(false)
    })
}

fn copy(
    pipe: impl Read + Send + 'static,
    stream: &'static str,
    log: Arc<Mutex<LogWriter>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::with_capacity(1024);
        loop {
            buf.clear();
            let n = match (&mut reader)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut buf)
            {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let Ok(mut l) = log.lock() else { break };
            if buf[n - 1] == b'\n' {
                l.line(stream, &buf[..n - 1]);
            } else {
                l.partial(stream, &buf);
            }
        }
    })
}

/// Writes CRI log lines: `<RFC3339Nano> <stream> <F|P> <text>`.
struct LogWriter {
    path: PathBuf,
    file: File,
    size: u64,
}

impl LogWriter {
    fn open(path: PathBuf) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(Self { path, file, size })
    }

    fn line(&mut self, stream: &str, text: &[u8]) {
        self.write(stream, "F", text);
    }

    fn partial(&mut self, stream: &str, text: &[u8]) {
        self.write(stream, "P", text);
    }

    fn write(&mut self, stream: &str, tag: &str, text: &[u8]) {
        let ts = format!("{:.9}", Timestamp::now());
        let mut rec = format!("{ts} {stream} {tag} ").into_bytes();
        rec.extend_from_slice(text);
        rec.push(b'\n');
        if self.file.write_all(&rec).is_ok() {
            self.size += rec.len() as u64;
        }
        if self.size > LOG_MAX_BYTES {
            self.rotate();
        }
    }

    fn rotate(&mut self) {
        let old = rotated(&self.path);
        if std::fs::rename(&self.path, &old).is_ok()
            && let Ok(f) = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
        {
            self.file = f;
            self.size = 0;
        }
    }

    fn flush(&mut self) {
        let _ = self.file.sync_data();
    }
}

/// The one older file a rotated log keeps.
pub fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}
