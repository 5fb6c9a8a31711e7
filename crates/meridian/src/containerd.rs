//! A private containerd for `meridian up --runtime containerd`: its own root,
//! state, socket and configuration under the data dir, so the demo never touches
//! a system containerd, and everything it started goes away with `up`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meridian_agent::runtime::containerd::{
    ContainerdRuntime, kill_private_leftovers, private_config, private_socket,
};

pub struct PrivateContainerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub hosts_dir: PathBuf,
    child: Child,
}

impl PrivateContainerd {
    pub async fn start(dir: &Path, sandbox_image: &str) -> Result<Self> {
        let bin = ["/usr/bin/containerd", "/usr/local/bin/containerd"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("containerd is not installed (Debian: apt-get install containerd runc)")?;
        // A previous `up` that was killed may have left shims and mounts.
        kill_private_leftovers(dir);
        let hosts_dir = dir.join("certs.d");
        std::fs::create_dir_all(&hosts_dir)
            .with_context(|| format!("creating {}", hosts_dir.display()))?;
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
            .context("starting containerd")?;
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
                bail!("containerd exited ({status}); see {}", log_path.display());
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer in 30 s; see {}",
                    log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_private_leftovers(&self.dir);
    }
}
