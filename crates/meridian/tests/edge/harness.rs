//! Real processes on loopback: a global API server, a region and agents, each a
//! `meridian` subcommand, plus a cuttable TCP proxy per agent link.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use tempfile::TempDir;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn start(args: &[&str], log: &Path) -> Proc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start meridian");
        Proc { child }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A TCP proxy whose link can be cut (open connections dropped, new ones refused)
/// and healed, to partition one agent from its region.
pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
        let (c, cs) = (cut.clone(), conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if c.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let t = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                cs.lock().unwrap().push(t.abort_handle());
            }
        });
        Proxy {
            port,
            cut,
            conns,
            task,
        }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

pub struct RegionOpts {
    pub lease_timeout: &'static str,
    pub grace: &'static str,
    pub rate: &'static str,
    pub image_tag_ttl: &'static str,
}

impl Default for RegionOpts {
    fn default() -> Self {
        Self {
            lease_timeout: "2s",
            grace: "5s",
            rate: "0.5",
            image_tag_ttl: "30s",
        }
    }
}

pub struct World {
    pub dir: TempDir,
    pub server_port: u16,
    pub region_port: u16,
    pub server: Option<Proc>,
    pub region: Option<Proc>,
    pub agents: Vec<(String, Option<Proc>, Proxy)>,
    pub client: kube::Client,
    opts: RegionOpts,
    cities: std::collections::HashMap<String, String>,
    /// Extra `meridian agent` arguments per agent (e.g. the containerd runtime).
    agent_args: std::collections::HashMap<String, Vec<String>>,
}

pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn admin_client(dir: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(dir.join("admin.kubeconfig")).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

impl World {
    pub async fn start(opts: RegionOpts) -> World {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let server_port = free_port();
        let region_port = free_port();
        let mut w = World {
            dir,
            server_port,
            region_port,
            server: None,
            region: None,
            agents: Vec::new(),
            client: kube::Client::try_from(kube::Config::new(
                "http://127.0.0.1:1".parse().unwrap(),
            ))
            .unwrap(),
            opts,
            cities: Default::default(),
            agent_args: Default::default(),
        };
        w.start_server().await;
        w.client = admin_client(&w.path("global")).await;
        w.start_region().await;
        let ns: Api<Namespace> = Api::all(w.client.clone());
        let obj = serde_json::from_value(json!({"metadata": {"name": "edge"}})).unwrap();
        ns.create(&PostParams::default(), &obj).await.unwrap();
        w
    }

    pub fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}.log"))
    }

    pub async fn start_server(&mut self) {
        let d = self.path("global");
        let listen = format!("127.0.0.1:{}", self.server_port);
        self.server = Some(Proc::start(
            &[
                "server",
                "--data-dir",
                d.to_str().unwrap(),
                "--listen",
                &listen,
                "--region-timeout",
                "12s",
            ],
            &self.log("server"),
        ));
        let token = d.join("system-region.token");
        eventually(
            "the server writes its region token",
            Duration::from_secs(30),
            || {
                let t = token.clone();
                async move { t.exists() }
            },
        )
        .await;
        if self.region.is_some() {
            let c = self.client.clone();
            eventually("the server answers again", Duration::from_secs(30), || {
                let c = c.clone();
                async move { c.apiserver_version().await.is_ok() }
            })
            .await;
        }
    }

    pub async fn start_region(&mut self) {
        let g = self.path("global");
        let r = self.path("region");
        let url = format!("https://127.0.0.1:{}", self.server_port);
        let listen = format!("127.0.0.1:{}", self.region_port);
        self.region = Some(Proc::start(
            &[
                "region",
                "--name",
                "test-region",
                "--global",
                &url,
                "--token-file",
                g.join("system-region.token").to_str().unwrap(),
                "--ca-file",
                g.join("pki/ca.crt").to_str().unwrap(),
                "--listen",
                &listen,
                "--data-dir",
                r.to_str().unwrap(),
                "--lease-timeout",
                self.opts.lease_timeout,
                "--eviction-grace",
                self.opts.grace,
                "--eviction-rate",
                self.opts.rate,
                "--summary-interval",
                "5s",
                "--image-tag-ttl",
                self.opts.image_tag_ttl,
            ],
            &self.log("region"),
        ));
        let port = self.region_port;
        eventually(
            "the region listens",
            Duration::from_secs(30),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    /// Starts an agent behind its own proxy; waits until its Node is Ready.
    pub async fn add_agent(&mut self, name: &str) {
        self.add_agent_in(name, "Paris").await;
    }

    /// Starts an agent in `city` with extra arguments; waits until its Node is Ready.
    pub async fn add_agent_with(&mut self, name: &str, city: &str, args: &[&str]) {
        self.agent_args.insert(
            name.to_owned(),
            args.iter().map(|a| a.to_string()).collect(),
        );
        self.add_agent_in(name, city).await;
    }

    /// Starts an agent in `city` behind its own proxy; waits until its Node is Ready.
    pub async fn add_agent_in(&mut self, name: &str, city: &str) {
        let proxy = Proxy::start(self.region_port).await;
        self.agents.push((name.to_owned(), None, proxy));
        self.cities.insert(name.to_owned(), city.to_owned());
        let i = self.agents.len() - 1;
        self.start_agent(i);
        self.wait_node(name, "True").await;
    }

    pub fn start_agent(&mut self, i: usize) {
        let (name, _, proxy) = &self.agents[i];
        let labels = format!(
            "topology.meridian.io/city={},topology.meridian.io/country=FR",
            self.cities.get(name).map(String::as_str).unwrap_or("Paris")
        );
        let data = self.path(&format!("agent-{name}"));
        let region = format!("http://127.0.0.1:{}", proxy.port);
        let extra = self.agent_args.get(name).cloned().unwrap_or_default();
        let mut args: Vec<&str> = extra.iter().map(String::as_str).collect();
        args.extend([
            "agent",
            "--region",
            &region,
            "--node-name",
            name,
            "--data-dir",
            data.to_str().unwrap(),
            "--heartbeat",
            "500ms",
            "--restart-backoff",
            "500ms",
            "--reconnect-max",
            "1s",
            "--labels",
            &labels,
            "--coordinates",
            "48.8534,2.3488",
        ]);
        // Extra arguments go after the subcommand.
        args.rotate_left(extra.len());
        let p = Proc::start(&args, &self.log(&format!("agent-{name}")));
        self.agents[i].1 = Some(p);
    }

    pub fn agent(&mut self, name: &str) -> usize {
        self.agents.iter().position(|a| a.0 == name).unwrap()
    }

    pub async fn node_ready(&self, name: &str) -> Option<String> {
        let api: Api<Node> = Api::all(self.client.clone());
        let n = api.get_opt(name).await.ok()??;
        n.status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status)
    }

    pub async fn wait_node(&self, name: &str, status: &str) {
        let what = format!("node {name} Ready={status}");
        eventually(&what, Duration::from_secs(30), || async {
            self.node_ready(name).await.as_deref() == Some(status)
        })
        .await;
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), "edge")
    }

    /// Creates a pod bound to `node` running `script` under /bin/sh.
    pub async fn run_pod(&self, name: &str, node: &str, script: &str) {
        let pod = json!({
            "metadata": {"name": name},
            "spec": {
                "nodeName": node,
                "terminationGracePeriodSeconds": 2,
                "containers": [{
                    "name": "main", "image": "busybox",
                    "command": ["/bin/sh", "-c", script],
                    "readinessProbe": {"exec": {"command": ["/bin/true"]}, "periodSeconds": 1},
                }],
            },
        });
        self.create_pod(pod).await;
    }

    /// Creates the pod `pod` (JSON) in namespace `edge`.
    pub async fn create_pod(&self, pod: serde_json::Value) {
        self.pods()
            .create(
                &PostParams::default(),
                &serde_json::from_value(pod).unwrap(),
            )
            .await
            .unwrap();
    }

    /// The pod's `status.phase`, if it has one.
    pub async fn phase(&self, name: &str) -> Option<String> {
        self.pod(name).await.status.and_then(|s| s.phase)
    }

    pub async fn pod(&self, name: &str) -> Pod {
        self.pods().get(name).await.unwrap()
    }

    pub async fn wait_running_ready(&self, name: &str) -> Pod {
        let what = format!("pod {name} Running and Ready");
        eventually(&what, Duration::from_secs(30), || async {
            is_running_ready(&self.pod(name).await)
        })
        .await;
        self.pod(name).await
    }

    pub async fn region_metric(&self, name: &str) -> Option<f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.region_port);
        let text = reqwest::get(url).await.ok()?.text().await.ok()?;
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
    }
}

pub fn is_running_ready(p: &Pod) -> bool {
    let Some(s) = &p.status else { return false };
    s.phase.as_deref() == Some("Running")
        && s.conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

pub fn is_marked(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("NodeLost")
}

/// The pid in `containerID: process://PID`.
pub fn container_pid(p: &Pod) -> Option<u32> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .container_id
        .as_ref()?
        .strip_prefix("process://")?
        .parse()
        .ok()
}

pub fn restart_count(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map(|c| c.restart_count)
        .unwrap_or(-1)
}

pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

/// Workloads outlive agents by design: kill what the test's agents started. Only
/// processes proven to be ours are signalled (a shim whose command line names the
/// state dir, and that shim's child): stale pid files may name recycled pids.
impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for f in ["server", "region"] {
                let text = std::fs::read_to_string(self.log(f)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- last lines of {f}.log ---");
                for l in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{l}");
                }
            }
        }
        for a in &mut self.agents {
            if let Some(p) = a.1.as_mut() {
                p.kill9();
            }
        }
        kill_workloads(self.dir.path());
    }
}

pub fn kill_workloads(root: &Path) {
    meridian_agent::runtime::process::kill_leftovers(root);
}

impl World {
    /// Creates a tenant with `meridian tenant create` and returns its client.
    pub async fn tenant(&self, name: &str) -> kube::Client {
        let d = self.path("global");
        let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["tenant", "create", name, "--data-dir", d.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let kc = kube::config::Kubeconfig::read_from(d.join(format!("tenants/{name}.kubeconfig")))
            .unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(cfg).unwrap()
    }
}

/// A TCP proxy that delays every chunk by `one_way` in each direction (this
/// kernel has no `tc netem`): a request/response round trip through it takes
/// about `2 * one_way` more. Chunks keep their order and the link keeps its
/// bandwidth (the delay is pipelined, not per chunk in series).
pub struct DelayProxy {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    pub async fn start(target: u16, one_way: Duration) -> DelayProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        async fn pump(
            mut from: tokio::net::tcp::OwnedReadHalf,
            mut to: tokio::net::tcp::OwnedWriteHalf,
            delay: Duration,
        ) {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
            let writer = tokio::spawn(async move {
                while let Some((due, data)) = rx.recv().await {
                    tokio::time::sleep_until(due.into()).await;
                    if to.write_all(&data).await.is_err() {
                        return;
                    }
                }
                let _ = to.shutdown().await;
            });
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx
                            .send((Instant::now() + delay, buf[..n].to_vec()))
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
            drop(tx);
            let _ = writer.await;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let Ok(out) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = out.set_nodelay(true);
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = out.into_split();
                    tokio::join!(pump(ir, ow, one_way), pump(or, iw, one_way));
                });
            }
        });
        DelayProxy { port, task }
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
