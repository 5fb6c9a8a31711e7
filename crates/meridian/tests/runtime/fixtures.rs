//! Real parts for container tests, all on loopback and in a temp dir: a private
//! containerd (its own root, state, socket and config, never the system one), a
//! registry (Debian's `docker-registry`), and a busybox image built here from
//! Debian's `busybox-static` and pushed to that registry. No internet needed.
//! Missing binaries fail loudly: the test command installs them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meridian_agent::runtime::private::PrivateContainerd;
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
        Self::start_inner(dir, None)
    }

    /// A registry that wants basic auth (htpasswd with bcrypt, as docker-registry
    /// requires).
    pub fn start_with_auth(dir: &Path, user: &str, password: &str) -> Registry {
        Self::start_inner(dir, Some((user, password)))
    }

    fn start_inner(dir: &Path, auth: Option<(&str, &str)>) -> Registry {
        let bin = require("docker-registry");
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let config = dir.join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
             delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        );
        if let Some((user, password)) = auth {
            let htpasswd = dir.join("htpasswd");
            let hash = bcrypt::hash(password, 5).unwrap();
            std::fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&config, yaml).unwrap();
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
        self.push_as(name, image, None).await
    }

    pub async fn push_as(&self, name: &str, image: &Image, creds: Option<(&str, &str)>) -> String {
        let full = format!("{}/{name}", self.addr);
        let r = Reference::parse(&full).unwrap();
        let creds = creds.map(|(u, p)| meridian_oci::registry::Credentials {
            username: u.into(),
            password: p.into(),
        });
        RegistryClient::new(creds).push(&r, image).await.unwrap();
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
    pub hosts_dir: PathBuf,
    pub inner: PrivateContainerd,
}

impl Containerd {
    pub async fn start(dir: &Path, registry: &Registry) -> Containerd {
        require("containerd");
        require("runc");
        std::fs::create_dir_all(dir).unwrap();
        let pause = registry.push("meridian/pause:1", &pause()).await;
        let inner = PrivateContainerd::start(dir, &pause)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        write_hosts(
            &inner.hosts_dir,
            &registry.addr,
            &format!("http://{}", registry.addr),
        );
        Containerd {
            socket: inner.socket.clone(),
            hosts_dir: inner.hosts_dir.clone(),
            inner,
        }
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
