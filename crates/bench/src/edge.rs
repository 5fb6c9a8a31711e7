//! Region and agent benchmarks: real `meridian server`/`region`/`agent` processes
//! (the release binary next to this one), hollow nodes in this process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::watcher;
use meridian_agent::hollow::{HollowConfig, HollowStats, run_node};
use meridian_agent::runtime::private::PrivateContainerd;

pub struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

pub(crate) fn meridian_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("meridian");
    if !bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p meridian)",
            bin.display()
        );
    }
    Ok(bin)
}

pub(crate) fn spawn(args: &[&str], log: &Path) -> Result<Proc> {
    let out = std::fs::File::create(log)?;
    // MERIDIAN_BENCH_WRAP_REGION=heaptrack (for example) runs the region under a profiler.
    let wrap = std::env::var("MERIDIAN_BENCH_WRAP_REGION")
        .ok()
        .filter(|_| args.first() == Some(&"region"));
    let mut cmd = match &wrap {
        Some(w) => {
            let mut c = Command::new(w);
            c.arg(meridian_bin()?);
            c
        }
        None => Command::new(meridian_bin()?),
    };
    let child = cmd
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .context("starting meridian")?;
    Ok(Proc(child))
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

pub(crate) async fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

pub use meridian_sim::proc_usage;

pub struct Plane {
    pub dir: tempfile::TempDir,
    pub server: Proc,
    pub region: Proc,
    pub region_port: u16,
}

/// How the benchmark's agents run containers.
pub struct NodeRuntime {
    /// The private containerd (containerd runtime) or none (process runtime).
    pub containerd: Option<PrivateContainerd>,
    pub image: String,
}

impl NodeRuntime {
    /// Process runtime, or a private containerd under `dir` whose sandbox and
    /// pod images come from the region's built-in `meridian.local` images.
    pub async fn start(containerd: bool, dir: &Path) -> Result<Self> {
        if !containerd {
            return Ok(Self {
                containerd: None,
                image: "busybox".into(),
            });
        }
        let c = PrivateContainerd::start(
            &dir.join("containerd"),
            &format!("{}/pause:1", meridian_oci::LOCAL_REGISTRY),
        )
        .await
        .context("starting a private containerd")?;
        Ok(Self {
            containerd: Some(c),
            image: format!("{}/busybox:1", meridian_oci::LOCAL_REGISTRY),
        })
    }

    fn agent_args(&self) -> Vec<String> {
        self.containerd
            .as_ref()
            .map(PrivateContainerd::agent_args)
            .unwrap_or_default()
    }
}

/// An OCI archive of the built-in images, for `meridian region --import-images`.
fn builtin_archive(dir: &Path) -> Result<PathBuf> {
    let images = meridian_oci::build::builtin_images(Path::new(meridian_oci::build::BUSYBOX))
        .context("building the built-in images (needs Debian's busybox-static)")?;
    let refs: Vec<(String, &meridian_oci::Image)> =
        images.iter().map(|(n, i)| (n.clone(), i)).collect();
    let path = dir.join("builtin-images.tar");
    std::fs::write(&path, meridian_oci::archive::write(&refs)?)?;
    Ok(path)
}

impl Plane {
    pub async fn start(summary: &str, lease: &str) -> Result<Plane> {
        let dir = tempfile::tempdir()?;
        // The containerd benchmarks need the built-in images; the others run without.
        let images = builtin_archive(dir.path())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let g = dir.path().join("global");
        let sp = free_port();
        let listen = format!("127.0.0.1:{sp}");
        let server = spawn(
            &[
                "server",
                "--data-dir",
                g.to_str().unwrap_or_default(),
                "--listen",
                &listen,
            ],
            &dir.path().join("server.log"),
        )?;
        let token = g.join("system-region.token");
        wait_until("the API server", Duration::from_secs(60), || token.exists()).await?;
        let rp = free_port();
        let url = format!("https://127.0.0.1:{sp}");
        let rlisten = format!("127.0.0.1:{rp}");
        let rdir = dir.path().join("region");
        let region = spawn(
            &[
                "region",
                "--name",
                "bench",
                "--global",
                &url,
                "--token-file",
                token.to_str().unwrap_or_default(),
                "--ca-file",
                g.join("pki/ca.crt").to_str().unwrap_or_default(),
                "--listen",
                &rlisten,
                "--data-dir",
                rdir.to_str().unwrap_or_default(),
                "--summary-interval",
                summary,
                "--lease-timeout",
                lease,
                "--import-images",
                &images,
            ],
            &dir.path().join("region.log"),
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", rp))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("the region did not start");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Plane {
            dir,
            server,
            region,
            region_port: rp,
        })
    }

    pub async fn admin(&self) -> Result<kube::Client> {
        let kc =
            kube::config::Kubeconfig::read_from(self.dir.path().join("global/admin.kubeconfig"))?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(kube::Client::try_from(cfg)?)
    }
}

/// One region process holding `nodes` hollow nodes at `heartbeat`.
pub async fn region(
    nodes: usize,
    per_conn: usize,
    heartbeat: Duration,
    measure: Duration,
    settle: Duration,
    summary: &str,
) -> Result<()> {
    let plane = Plane::start(summary, "40s").await?;
    let stats = Arc::new(HollowStats::default());
    let cfg = HollowConfig {
        heartbeat,
        start_delay: Duration::ZERO,
        labels: vec![("topology.meridian.io/city".into(), "Frankfurt".into())],
        ..Default::default()
    };
    let conns = nodes.div_ceil(per_conn);
    let endpoint = format!("http://127.0.0.1:{}", plane.region_port);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(nodes);
    for c in 0..conns {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())?
            .connect()
            .await
            .context("connecting to the region")?;
        for i in 0..per_conn {
            let n = c * per_conn + i;
            if n >= nodes {
                break;
            }
            tasks.push(tokio::spawn(run_node(
                channel.clone(),
                format!("hollow-{n:06}"),
                cfg.clone(),
                stats.clone(),
            )));
        }
        if c % 50 == 49 {
            eprintln!(
                "  ... {} streams opened, {} registered ({:.0}s)",
                (c + 1) * per_conn,
                stats.registered.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            );
            // Pace the ramp so registrations do not pile up unboundedly.
            while (stats.registered.load(Ordering::Relaxed) as usize) + 20_000 < (c + 1) * per_conn
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(900);
    while (stats.registered.load(Ordering::Relaxed) as usize) < nodes {
        if Instant::now() > deadline {
            bail!(
                "only {} of {nodes} nodes registered",
                stats.registered.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let reg_time = started.elapsed();
    println!(
        "{nodes} hollow nodes registered in {:.1}s over {conns} connections",
        reg_time.as_secs_f64()
    );
    // Let the first Node writes to the global API drain before measuring steady state.
    println!(
        "settling {}s (initial Node objects go to the global API)...",
        settle.as_secs()
    );
    tokio::time::sleep(settle).await;
    let (c0, _) = proc_usage(plane.region.pid()).context("region process")?;
    let (s0, _) = proc_usage(plane.server.pid()).context("server process")?;
    let h0 = stats.heartbeats.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let mut peak_rss = 0u64;
    while t0.elapsed() < measure {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if let Some((_, rss)) = proc_usage(plane.region.pid()) {
            peak_rss = peak_rss.max(rss);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let (c1, rss) = proc_usage(plane.region.pid()).context("region process")?;
    let (s1, srss) = proc_usage(plane.server.pid()).context("server process")?;
    let h1 = stats.heartbeats.load(Ordering::Relaxed);
    println!("steady state over {secs:.0}s:");
    println!("  heartbeats received:  {:.0}/s", (h1 - h0) as f64 / secs);
    println!("  region cpu:           {:.3} cores", (c1 - c0) / secs);
    println!(
        "  region resident:      {} MiB (peak {} MiB)",
        rss >> 20,
        peak_rss >> 20
    );
    println!(
        "  global API cpu:       {:.3} cores (Node summaries every {summary})",
        (s1 - s0) / secs
    );
    println!("  global API resident:  {} MiB", srss >> 20);
    println!(
        "  hollow stream errors: {}",
        stats.errors.load(Ordering::Relaxed)
    );
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// Kills the shims (and their containers) a finished benchmark left behind.
fn kill_workloads(dir: &Path) {
    meridian_agent::runtime::process::kill_leftovers(dir);
}

/// Creates the namespace `bench` and returns its pods API.
async fn bench_namespace(client: &kube::Client) -> Result<Api<Pod>> {
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let obj = serde_json::json!({"metadata": {"name": "bench"}});
    ns.create(&Default::default(), &serde_json::from_value(obj)?)
        .await?;
    Ok(Api::namespaced(client.clone(), "bench"))
}

fn start_agent(plane: &Plane, name: &str, rt: &NodeRuntime) -> Result<(Proc, PathBuf)> {
    let data = plane.dir.path().join(format!("agent-{name}"));
    let region = format!("http://127.0.0.1:{}", plane.region_port);
    let mut args: Vec<String> = [
        "agent",
        "--region",
        &region,
        "--node-name",
        name,
        "--data-dir",
        data.to_str().unwrap_or_default(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(rt.agent_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = spawn(&args, &plane.dir.path().join(format!("agent-{name}.log")))?;
    Ok((p, data))
}

async fn wait_node(client: &kube::Client, name: &str) -> Result<()> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    while nodes.get_opt(name).await?.is_none() {
        if Instant::now() > deadline {
            bail!("node {name} did not register");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn create_pod(pods: &Api<Pod>, name: &str, node: &str, image: &str) -> Result<()> {
    let pod = serde_json::json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1, "containers": [
            {"name": "main", "image": image, "command": ["/bin/sleep", "3600"]}]},
    });
    pods.create(&Default::default(), &serde_json::from_value(pod)?)
        .await?;
    Ok(())
}

/// Resident memory of an idle agent (no pods, then with `pods` sleeping pods), and
/// of one shim.
pub async fn agent_memory(pods: usize, containerd: bool) -> Result<()> {
    let plane = Plane::start("60s", "40s").await?;
    let rt = NodeRuntime::start(containerd, plane.dir.path()).await?;
    let client = plane.admin().await?;
    let (agent, data) = start_agent(&plane, "idle-1", &rt)?;
    wait_node(&client, "idle-1").await?;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (_, idle) = proc_usage(agent.pid()).context("agent process")?;
    println!(
        "agent idle, no pods:      {:.1} MiB resident",
        idle as f64 / 1048576.0
    );
    let api = bench_namespace(&client).await?;
    for i in 0..pods {
        create_pod(&api, &format!("idle-{i}"), "idle-1", &rt.image).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = api.list(&Default::default()).await?;
        let running = list
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        if running == pods {
            break;
        }
        if Instant::now() > deadline {
            kill_workloads(&data);
            bail!("only {running} of {pods} pods running");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (_, busy) = proc_usage(agent.pid()).context("agent process")?;
    println!(
        "agent idle, {pods} pods:     {:.1} MiB resident",
        busy as f64 / 1048576.0
    );
    let shim_rss: Vec<u64> = match &rt.containerd {
        None => find_pids(&data, "shim.pid"),
        Some(c) => containerd_shims(&c.socket),
    }
    .into_iter()
    .filter_map(|p| proc_usage(p).map(|u| u.1))
    .collect();
    if let Some(c) = &rt.containerd
        && let Some((_, rss)) = proc_usage(c.pid())
    {
        println!(
            "containerd:               {:.1} MiB resident",
            rss as f64 / 1048576.0
        );
    }
    if !shim_rss.is_empty() {
        let avg = shim_rss.iter().sum::<u64>() as f64 / shim_rss.len() as f64;
        println!(
            "shim (one per container): {:.1} MiB resident (mean of {})",
            avg / 1048576.0,
            shim_rss.len()
        );
    }
    kill_workloads(&data);
    Ok(())
}

/// Pids of containerd shims serving the containerd on `socket`.
fn containerd_shims(socket: &Path) -> Vec<u32> {
    let sock = socket.to_string_lossy().into_owned();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd);
            (cmd.contains("containerd-shim") && cmd.contains(sock.as_str())).then_some(pid)
        })
        .collect()
}

fn find_pids(dir: &Path, file: &str) -> Vec<u32> {
    find_files(dir, file)
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(p).ok()?.trim().parse().ok())
        .collect()
}

fn find_files(dir: &Path, file: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().and_then(|n| n.to_str()) == Some(file) {
                out.push(p);
            }
        }
    }
    out
}

/// Create -> Running (as a watcher of the global API sees it), one pod at a time
/// on an otherwise idle node. With containerd the image is present (a first,
/// unmeasured pod pulls it).
pub async fn pod_start(count: usize, containerd: bool) -> Result<()> {
    let plane = Plane::start("60s", "40s").await?;
    let rt = NodeRuntime::start(containerd, plane.dir.path()).await?;
    let client = plane.admin().await?;
    let (_agent, data) = start_agent(&plane, "start-1", &rt)?;
    wait_node(&client, "start-1").await?;
    let api = bench_namespace(&client).await?;
    if rt.containerd.is_some() {
        create_pod(&api, "warm-up", "start-1", &rt.image).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let p = api.get("warm-up").await?;
            if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
                break;
            }
            if Instant::now() > deadline {
                bail!("the warm-up pod did not start: {:?}", p.status);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let watch_api = api.clone();
    let w = tokio::spawn(async move {
        let mut s = watcher(watch_api, watcher::Config::default()).boxed();
        while let Some(ev) = s.next().await {
            if let Ok(watcher::Event::Apply(p)) = ev
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            {
                let _ = tx.send((p.metadata.name.unwrap_or_default(), Instant::now()));
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut hist = Histogram::<u64>::new(3)?;
    for i in 0..count {
        let name = format!("start-{i}");
        let t0 = Instant::now();
        create_pod(&api, &name, "start-1", &rt.image).await?;
        let done = loop {
            match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
                Ok(Some((n, t))) if n == name => break t,
                Ok(Some(_)) => continue,
                _ => {
                    kill_workloads(&data);
                    bail!("pod {name} did not reach Running");
                }
            }
        };
        hist.record(done.duration_since(t0).as_micros() as u64)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.abort();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "pod start ({} runtime), create -> Running observed by a watcher, {count} pods one at a time: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        if containerd { "containerd" } else { "process" },
        ms(0.5),
        ms(0.9),
        ms(0.99),
        hist.max() as f64 / 1000.0
    );
    kill_workloads(&data);
    Ok(())
}
