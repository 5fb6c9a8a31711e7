//! A private containerd: its own root, state, socket and configuration under a
//! directory, so a demo (`meridian up --runtime containerd`), a benchmark or a
//! test never touches a system containerd, and everything it started goes away
//! when it is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::RuntimeError;
use super::containerd::{
    ContainerdRuntime, kill_private_leftovers, private_config, private_socket,
};

pub struct PrivateContainerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub hosts_dir: PathBuf,
    child: Child,
}

impl PrivateContainerd {
    pub async fn start(dir: &Path, sandbox_image: &str) -> Result<Self, RuntimeError> {
        let fail = |m: String| RuntimeError::Start(m);
        let bin = ["/usr/bin/containerd", "/usr/local/bin/containerd"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| {
                fail("containerd is not installed (Debian: apt-get install containerd runc)".into())
            })?;
        // A previous `up` that was killed may have left shims and mounts.
        kill_private_leftovers(dir);
        let hosts_dir = dir.join("certs.d");
        std::fs::create_dir_all(&hosts_dir)?;
        let config = dir.join("config.toml");
        std::fs::write(&config, private_config(dir, sandbox_image, &hosts_dir))?;
        let log_path = dir.join("containerd.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| fail(format!("starting containerd: {e}")))?;
        let socket = private_socket(dir);
        let mut me = Self {
            dir: dir.to_owned(),
            socket: socket.clone(),
            hosts_dir,
            child,
        };
        let rt = ContainerdRuntime::new(&socket);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if socket.exists() && rt.check().await.is_ok() {
                return Ok(me);
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                return Err(fail(format!(
                    "containerd exited ({status}); see {}",
                    log_path.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "containerd did not answer in 30 s; see {}",
                    log_path.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl PrivateContainerd {
    /// The `meridian agent` arguments that run pods on this containerd.
    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--runtime".into(),
            "containerd".into(),
            "--containerd-socket".into(),
            self.socket.to_string_lossy().into_owned(),
            "--containerd-hosts-dir".into(),
            self.hosts_dir.to_string_lossy().into_owned(),
        ]
    }

    /// containerd's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_private_leftovers(&self.dir);
    }
}
