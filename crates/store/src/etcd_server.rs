//! Starts a private etcd server (Debian's `etcd-server` package) in a directory, on
//! loopback ports, for tests, benchmarks and single-machine trials of the etcd backend.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::StoreError;

pub struct EtcdServer {
    child: Child,
    pub client_url: String,
}

fn free_port() -> Result<u16, StoreError> {
    let l =
        TcpListener::bind("127.0.0.1:0").map_err(|e| StoreError::EtcdProtocol(e.to_string()))?;
    Ok(l.local_addr()
        .map_err(|e| StoreError::EtcdProtocol(e.to_string()))?
        .port())
}

impl EtcdServer {
    /// Starts `etcd` with its data in `dir` and waits until it answers.
    pub async fn start(dir: &Path) -> Result<Self, StoreError> {
        let client = free_port()?;
        let peer = free_port()?;
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.join("etcd.log"))
            .map_err(|e| StoreError::EtcdProtocol(format!("etcd log file: {e}")))?;
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.join("etcd-data"))
            .args(["--name", "meridian-test"])
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("meridian-test={peer_url}")])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                StoreError::EtcdProtocol(format!(
                    "cannot start `etcd` ({e}); install Debian's etcd-server package (the test command does)"
                ))
            })?;
        let server = Self { child, client_url };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match crate::EtcdStore::connect(std::slice::from_ref(&server.client_url)).await {
                Ok(_) => return Ok(server),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
