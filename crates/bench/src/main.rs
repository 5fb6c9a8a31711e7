//! `meridian-bench`: the numbers in BENCHMARKS.md. Each mode starts a real API server
//! (TLS on loopback) in this process and drives it over HTTPS.
//!
//!   cargo run --release -p meridian-bench -- create --count 20000 --clients 64
//!   cargo run --release -p meridian-bench -- list --pods 100000
//!   cargo run --release -p meridian-bench -- watch --watchers 1000 --events 100
//!   cargo run --release -p meridian-bench -- memory --objects 1000000
//!   cargo run --release -p meridian-bench -- risk --policies 1000
//!   cargo run --release -p meridian-bench -- join --agents 1000

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
mod e2e;
mod edge;
mod join;
mod place;
mod risk;

use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use hdrhistogram::Histogram;
use meridian_apiserver::{Server, ServerConfig};
use meridian_store::etcd_server::EtcdServer;
use meridian_store::{DynStore, EmbeddedStore, EtcdStore, Txn};
use serde_json::json;

/// The same allocator as the `meridian` binary, so numbers match what it does.
#[global_allocator]
static GLOBAL: meridian_alloc::Allocator = meridian_alloc::Allocator;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Backend {
    Embedded,
    Etcd,
}

#[derive(Subcommand)]
enum Mode {
    /// End to end: Deployments through the API, controllers and scheduler, until
    /// every pod is bound (Node objects only; no agents).
    E2e {
        #[arg(long, default_value_t = 10_000)]
        nodes: usize,
        #[arg(long, default_value_t = 100)]
        deployments: usize,
        #[arg(long, default_value_t = 1_000)]
        replicas: usize,
    },
    /// The placement engine alone (one core): replicas of mixed workloads onto nodes.
    Place {
        #[arg(long, default_value_t = 10_000)]
        nodes: usize,
        #[arg(long, default_value_t = 100_000)]
        replicas: usize,
        #[arg(long, default_value_t = 1_000)]
        workloads: usize,
        #[arg(long, default_value_t = 200)]
        cities: usize,
        /// Then lose every node of one region and place a replacement for each of
        /// its pods (near the lost node), as after a region loss.
        #[arg(long)]
        lose_region: bool,
    },
    /// One region process holding N hollow nodes (real gRPC streams) at a heartbeat.
    Region {
        #[arg(long, default_value_t = 100_000)]
        nodes: usize,
        /// Hollow nodes per HTTP/2 connection.
        #[arg(long, default_value_t = 100)]
        per_connection: usize,
        #[arg(long, default_value_t = 10)]
        heartbeat_secs: u64,
        #[arg(long, default_value_t = 60)]
        measure_secs: u64,
        /// Per-node summary period written to the global API.
        #[arg(long, default_value = "60s")]
        summary: String,
        /// Wait after registration before measuring.
        #[arg(long, default_value_t = 60)]
        settle_secs: u64,
    },
    /// Resident memory of an agent process, idle and with N pods.
    AgentMemory {
        #[arg(long, default_value_t = 10)]
        pods: usize,
        /// Run the pods on a private containerd instead of the process runtime.
        #[arg(long)]
        containerd: bool,
    },
    /// N agents joining one center at once (probing included) until all are Ready.
    Join {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        #[arg(long, default_value_t = 3)]
        regions: usize,
    },
    /// Pod start latency (create -> Running).
    PodStart {
        #[arg(long, default_value_t = 100)]
        pods: usize,
        /// Run the pods on a private containerd instead of the process runtime.
        #[arg(long)]
        containerd: bool,
    },
    /// Pod creates through the API with concurrent clients, per backend.
    Create {
        #[arg(long, default_value_t = 20_000)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, value_enum, num_args = 1.., default_values = ["embedded", "etcd"])]
        backends: Vec<Backend>,
    },
    /// Full lists of N pods.
    List {
        #[arg(long, default_value_t = 100_000)]
        pods: usize,
        #[arg(long, default_value_t = 20)]
        iterations: usize,
    },
    /// N watchers; time until a change has reached all of them.
    Watch {
        #[arg(long, default_value_t = 1000)]
        watchers: usize,
        #[arg(long, default_value_t = 100)]
        events: usize,
    },
    /// Added latency per DELETE with N RiskPolicies present.
    Risk {
        #[arg(long, default_value_t = 1000)]
        policies: usize,
        /// Of those, how many select the deleted pods (each charges a budget).
        #[arg(long, default_value_t = 10)]
        matching: usize,
        /// Deletes measured with and without policies.
        #[arg(long, default_value_t = 2000)]
        deletes: usize,
    },
    /// Resident memory of a server holding N small objects.
    Memory {
        #[arg(long, default_value_t = 1_000_000)]
        objects: usize,
    },
}

struct Running {
    server: Server,
    _dir: tempfile::TempDir,
    _etcd: Option<EtcdServer>,
}

async fn start(backend: Backend) -> Result<Running> {
    let dir = tempfile::tempdir()?;
    let (store, etcd): (DynStore, _) = match backend {
        Backend::Embedded => (
            Arc::new(EmbeddedStore::open(&dir.path().join("store.redb"))?),
            None,
        ),
        Backend::Etcd => {
            let etcd = EtcdServer::start(dir.path())
                .await
                .context("starting etcd")?;
            let store = EtcdStore::connect(std::slice::from_ref(&etcd.client_url)).await?;
            (Arc::new(store), Some(etcd))
        }
    };
    let config = ServerConfig::new("127.0.0.1:0".parse()?, dir.path());
    let server = Server::start(config, store).await?;
    Ok(Running {
        server,
        _dir: dir,
        _etcd: etcd,
    })
}

fn client(server: &Server, http1: bool) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem.as_bytes())?)
        .pool_max_idle_per_host(256);
    if http1 {
        b = b.http1_only();
    }
    Ok(b.build()?)
}

fn pod(name: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "bench"}},
        "spec": {"containers": [{"name": "c", "image": "busybox", "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}})
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn create(count: usize, clients: usize, backends: Vec<Backend>) -> Result<()> {
    for backend in backends {
        let r = start(backend).await?;
        let http = client(&r.server, true)?;
        let url = format!("{}/api/v1/namespaces/default/pods", r.server.url);
        let token = r.server.admin_token.clone();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (http, url, token, next) = (http.clone(), url.clone(), token.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let mut h = Histogram::<u64>::new(3).expect("histogram");
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= count {
                        return h;
                    }
                    let t = Instant::now();
                    let resp = http
                        .post(&url)
                        .bearer_auth(&token)
                        .json(&pod(&format!("p{i}")))
                        .send()
                        .await;
                    match resp {
                        Ok(r) if r.status() == 201 => {
                            let _ = r.bytes().await;
                        }
                        Ok(r) => panic!("create failed: {}", r.status()),
                        Err(e) => panic!("create failed: {e}"),
                    }
                    h.record(t.elapsed().as_micros() as u64).expect("record");
                }
            }));
        }
        let mut h = Histogram::<u64>::new(3)?;
        for t in tasks {
            h.add(t.await?)?;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "create backend={backend:?} clients={clients} count={count}: {:.0} creates/s, p50 {:.2} ms, p99 {:.2} ms",
            count as f64 / secs,
            ms(&h, 0.5),
            ms(&h, 0.99)
        );
        r.server.shutdown(Duration::from_secs(2)).await;
    }
    Ok(())
}

/// Writes pods straight into the store, 500 per transaction, as fixtures.
async fn seed(store: &DynStore, n: usize) -> Result<()> {
    let mut i = 0;
    while i < n {
        let mut txn = Txn::new();
        for j in i..(i + 500).min(n) {
            let mut p = pod(&format!("p{j:07}"));
            p["metadata"]["uid"] = json!(format!("uid-{j}"));
            p["metadata"]["creationTimestamp"] = json!("2026-11-25T00:00:00Z");
            p["status"] = json!({"phase": "Pending"});
            txn = txn.put(
                format!("/registry/core/pods/default/p{j:07}"),
                Bytes::from(serde_json::to_vec(&p)?),
            );
        }
        store.txn(txn).await?;
        i += 500;
    }
    Ok(())
}

async fn list(pods: usize, iterations: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store: DynStore = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb"))?);
    seed(&store, pods).await?;
    let server =
        Server::start(ServerConfig::new("127.0.0.1:0".parse()?, dir.path()), store).await?;
    let http = client(&server, false)?;
    let url = format!("{}/api/v1/namespaces/default/pods", server.url);
    let mut h = Histogram::<u64>::new(3)?;
    let mut bytes = 0;
    for _ in 0..iterations {
        let t = Instant::now();
        let body = http
            .get(&url)
            .bearer_auth(&server.admin_token)
            .send()
            .await?
            .bytes()
            .await?;
        h.record(t.elapsed().as_micros() as u64)?;
        bytes = body.len();
    }
    let check: serde_json::Value = serde_json::from_slice(
        &http
            .get(&url)
            .bearer_auth(&server.admin_token)
            .send()
            .await?
            .bytes()
            .await?,
    )?;
    anyhow::ensure!(
        check["items"].as_array().map(Vec::len) == Some(pods),
        "list returned the wrong number of pods"
    );
    println!(
        "list pods={pods} iterations={iterations} body={:.1} MB: p50 {:.1} ms, p99 {:.1} ms",
        bytes as f64 / 1e6,
        ms(&h, 0.5),
        ms(&h, 0.99)
    );
    Ok(())
}

async fn watch(watchers: usize, events: usize) -> Result<()> {
    let r = start(Backend::Embedded).await?;
    let url = format!("{}/api/v1/namespaces/default/pods", r.server.url);
    let token = r.server.admin_token.clone();
    let rv: serde_json::Value = client(&r.server, false)?
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    let rv = rv["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("0")
        .to_owned();
    // Each watcher reports (event index, arrival instant).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let mut clients = Vec::new();
    for _ in 0..watchers.div_ceil(100) {
        clients.push(client(&r.server, true)?);
    }
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    for w in 0..watchers {
        let http = clients[w / 100].clone();
        let (url, token, rv, tx, ready_tx) = (
            url.clone(),
            token.clone(),
            rv.clone(),
            tx.clone(),
            ready_tx.clone(),
        );
        tokio::spawn(async move {
            let resp = http
                .get(format!("{url}?watch=true&resourceVersion={rv}"))
                .bearer_auth(&token)
                .send()
                .await
                .expect("watch");
            let _ = ready_tx.send(());
            let mut body = resp.bytes_stream();
            let mut buf = Vec::new();
            while let Some(Ok(chunk)) = body.next().await {
                buf.extend_from_slice(&chunk);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let now = Instant::now();
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line)
                        && let Some(name) = v["object"]["metadata"]["name"].as_str()
                        && let Some(i) = name.strip_prefix("w").and_then(|n| n.parse().ok())
                    {
                        let _ = tx.send((i, now));
                    }
                }
            }
        });
    }
    for _ in 0..watchers {
        ready_rx.recv().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let http = client(&r.server, false)?;
    let mut reach_all = Histogram::<u64>::new(3)?;
    let mut each = Histogram::<u64>::new(3)?;
    for i in 0..events {
        let t0 = Instant::now();
        let resp = http
            .post(&url)
            .bearer_auth(&token)
            .json(&pod(&format!("w{i}")))
            .send()
            .await?;
        anyhow::ensure!(resp.status() == 201, "create failed");
        let mut got = 0;
        let mut last = t0;
        while got < watchers {
            let (idx, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .context("watchers stalled")?
                .context("watchers gone")?;
            if idx != i {
                continue;
            }
            got += 1;
            last = last.max(at);
            each.record(at.duration_since(t0).as_micros() as u64)?;
        }
        reach_all.record(last.duration_since(t0).as_micros() as u64)?;
    }
    println!(
        "watch watchers={watchers} events={events}: create-to-all-watchers p50 {:.1} ms, p99 {:.1} ms; per delivery p50 {:.1} ms, p99 {:.1} ms",
        ms(&reach_all, 0.5),
        ms(&reach_all, 0.99),
        ms(&each, 0.5),
        ms(&each, 0.99)
    );
    Ok(())
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn memory(objects: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let store: DynStore = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb"))?);
        let t = Instant::now();
        seed(&store, objects).await?;
        println!(
            "seeded {objects} pods in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    let before = rss_mib();
    let store: DynStore = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb"))?);
    let t = Instant::now();
    let server =
        Server::start(ServerConfig::new("127.0.0.1:0".parse()?, dir.path()), store).await?;
    let load = t.elapsed().as_secs_f64();
    let after = rss_mib();
    let file = std::fs::metadata(dir.path().join("store.redb"))?.len() as f64 / (1024.0 * 1024.0);
    println!(
        "memory objects={objects}: server RSS {after:.0} MiB ({:.0} MiB for the objects, {:.0} bytes/object), cache load {load:.1} s, store file {file:.0} MiB",
        after - before,
        (after - before) * 1024.0 * 1024.0 / objects as f64
    );
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    meridian_alloc::tune();
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Warnings of the components under test (RUST_LOG overrides), on stderr.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().mode {
        Mode::Create {
            count,
            clients,
            backends,
        } => create(count, clients, backends).await,
        Mode::List { pods, iterations } => list(pods, iterations).await,
        Mode::Watch { watchers, events } => watch(watchers, events).await,
        Mode::Memory { objects } => memory(objects).await,
        Mode::Risk {
            policies,
            matching,
            deletes,
        } => risk::run(policies, matching, deletes).await,
        Mode::Region {
            nodes,
            per_connection,
            heartbeat_secs,
            measure_secs,
            summary,
            settle_secs,
        } => {
            edge::region(
                nodes,
                per_connection,
                Duration::from_secs(heartbeat_secs),
                Duration::from_secs(measure_secs),
                Duration::from_secs(settle_secs),
                &summary,
            )
            .await
        }
        Mode::AgentMemory { pods, containerd } => edge::agent_memory(pods, containerd).await,
        Mode::Place {
            nodes,
            replicas,
            workloads,
            cities,
            lose_region,
        } => place::run(nodes, replicas, workloads, cities, lose_region),
        Mode::PodStart { pods, containerd } => edge::pod_start(pods, containerd).await,
        Mode::Join { agents, regions } => join::join(agents, regions).await,
        Mode::E2e {
            nodes,
            deployments,
            replicas,
        } => e2e::run(nodes, deployments, replicas).await,
    }
}
