//! Real parts for container tests, all on loopback and in a temp dir: a private
//! containerd (its own root, state, socket and config, never the system one), a
//! registry (Debian's `docker-registry`), and a busybox image built here from
//! Debian's `busybox-static` and pushed to that registry. No internet needed.
//! Missing binaries fail loudly: the test command installs them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meridian_agent::runtime::containerd;
use meridian_oci::registry::RegistryClient;
use meridian_oci::{Image, Reference};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn require(bin: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin", "/sbin"] {
        let p = Path::new(dir).join(bin);
        if p.exists() {
            return p;
        }
    }
    panic!("{bin} is required (the test command installs it: ./scripts/test.sh)");
}

/// Debian's `docker-registry` on a loopback port, storing in `dir`.
pub struct Registry {
    pub addr: String,
    child: Child,
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
        let bin = require("docker-registry");
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                 delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry { addr, child }
    }

    /// Pushes `image` as `<this registry>/<name>` and returns the full reference.
    pub async fn push(&self, name: &str, image: &Image) -> String {
        let full = format!("{}/{name}", self.addr);
        let r = Reference::parse(&full).unwrap();
        RegistryClient::new(None).push(&r, image).await.unwrap();
        full
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The busybox test image: `/bin/busybox` with its applets, default command `sh`.
pub fn busybox() -> Image {
    let bin = require("busybox");
    meridian_oci::build::busybox(&bin, &[], Vec::new()).unwrap()
}

/// The sandbox ("pause") image: a process that sleeps until killed.
pub fn pause() -> Image {
    let bin = require("busybox");
    meridian_oci::build::busybox(&bin, &["sleep", "2147483647"], Vec::new()).unwrap()
}

/// A private containerd with the CRI plugin configured as these machines need
/// (`../shared/notes/containerd-on-these-machines.md`): OOM score adjustments
/// restricted, the sandbox image from `registry`, plain-HTTP access to loopback
/// registries through `hosts.toml` files in `hosts_dir`.
pub struct Containerd {
    pub socket: PathBuf,
    pub root: PathBuf,
    pub hosts_dir: PathBuf,
    child: Option<Child>,
    dir: PathBuf,
}

impl Containerd {
    pub async fn start(dir: &Path, registry: &Registry) -> Containerd {
        let bin = require("containerd");
        require("runc");
        std::fs::create_dir_all(dir).unwrap();
        let pause = registry.push("meridian/pause:1", &pause()).await;
        let hosts_dir = dir.join("certs.d");
        write_hosts(
            &hosts_dir,
            &registry.addr,
            &format!("http://{}", registry.addr),
        );
        let socket = containerd::private_socket(dir);
        let root = dir.join("root");
        let config = dir.join("config.toml");
        std::fs::write(&config, containerd::private_config(dir, &pause, &hosts_dir)).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let deadline = Instant::now() + Duration::from_secs(30);
        let rt = containerd::ContainerdRuntime::new(&socket);
        loop {
            if socket.exists() && rt.check().await.is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer on {} (log: {})",
                socket.display(),
                std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Containerd {
            socket,
            root,
            hosts_dir,
            child: Some(child),
            dir: dir.to_owned(),
        }
    }

    /// Stops containerd and everything it started (shims, containers, mounts).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = child.kill();
        let _ = child.wait();
        containerd::kill_private_leftovers(&self.dir);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `hosts.toml` that sends pulls for `registry` to `endpoint` (plain HTTP).
pub fn write_hosts(hosts_dir: &Path, registry: &str, endpoint: &str) {
    let d = hosts_dir.join(registry);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("hosts.toml"),
        format!(
            "server = \"http://{registry}\"\n\n[host.\"{endpoint}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n"
        ),
    )
    .unwrap();
}
