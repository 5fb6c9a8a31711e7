//! End to end through the API: Deployments of R replicas onto N Node objects, with
//! the real controllers and scheduler against an in-process API server on the
//! embedded store; measures until every pod is bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use meridian_apiserver::auth::SystemRole;
use meridian_apiserver::cache::{CacheEvent, CachedObject, Snapshot, WatchKind};
use meridian_apiserver::{Server, ServerConfig};
use meridian_store::{DynStore, EmbeddedStore};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

async fn client(server: &Server, token: &str) -> Result<kube::Client> {
    let yaml =
        meridian_apiserver::kubeconfig::render("bench", &server.url, &server.ca_pem, token, None);
    let kc = kube::config::Kubeconfig::from_yaml(&yaml)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

const PODS: &str = "/registry/core/pods/";

fn is_bound(o: &CachedObject) -> bool {
    o.field("spec.nodeName").is_some_and(|n| !n.is_empty())
}

/// (pods, bound pods) in a snapshot of the server's watch cache.
fn count(snap: &Snapshot) -> (usize, usize) {
    let mut all = 0;
    let mut bound = 0;
    for o in snap.range(PODS, None) {
        all += 1;
        if is_bound(o) {
            bound += 1;
        }
    }
    (all, bound)
}

/// (pods, bound pods), kept up to date from the watch cache's events. Walking a
/// million cached pods every second to count them took a whole core from the
/// system under test.
fn counter(server: &Server) -> Result<Arc<(AtomicUsize, AtomicUsize)>> {
    let mut tally = Tally {
        counts: Arc::new((AtomicUsize::new(0), AtomicUsize::new(0))),
        state: server.state.clone(),
        base: 0,
        last: 0,
        seen: 0,
    };
    let counts = tally.counts.clone();
    let mut live = tally.recount()?;
    tokio::spawn(async move {
        loop {
            match live.recv().await {
                Ok(e) => tally.apply(&e),
                // Events were dropped while this task waited for a core: resume
                // from the cache's history as a watch would (counting afresh
                // walks every pod: a whole core at a million).
                Err(RecvError::Lagged(_)) => match tally.resume() {
                    Ok(l) => live = l,
                    Err(_) => return,
                },
                Err(RecvError::Closed) => return,
            }
        }
    });
    Ok(counts)
}

type Live = tokio::sync::broadcast::Receiver<Arc<CacheEvent>>;

/// The counting state of [`counter`].
struct Tally {
    counts: Arc<(AtomicUsize, AtomicUsize)>,
    state: Arc<meridian_apiserver::AppState>,
    /// The revision of the last full count: events at or below it are counted.
    base: i64,
    /// The last revision applied, and how many of its events (one commit may
    /// hold many).
    last: i64,
    seen: usize,
}

impl Tally {
    /// Counts afresh from a snapshot; the live events after it follow.
    fn recount(&mut self) -> Result<Live, meridian_apiserver::cache::CacheError> {
        let sub = self.state.cache.subscribe(None)?;
        let (all, bound) = count(&sub.snapshot);
        self.counts.0.store(all, Ordering::Relaxed);
        self.counts.1.store(bound, Ordering::Relaxed);
        (self.base, self.last, self.seen) = (sub.snapshot.revision, sub.snapshot.revision, 0);
        Ok(sub.live)
    }

    /// Resumes after the last event applied from the cache's history, or counts
    /// afresh if that has left the history.
    fn resume(&mut self) -> Result<Live, meridian_apiserver::cache::CacheError> {
        let Ok(sub) = self.state.cache.subscribe(Some(self.last - 1)) else {
            return self.recount();
        };
        let (mut skip, from) = (self.seen, self.last);
        for e in &sub.history {
            if e.revision == from && skip > 0 {
                skip -= 1;
                continue;
            }
            self.apply(e);
        }
        Ok(sub.live)
    }

    /// Applies one event (at or below `base` it is counted already).
    fn apply(&mut self, e: &CacheEvent) {
        if e.revision == self.last {
            self.seen += 1;
        } else {
            (self.last, self.seen) = (e.revision, 1);
        }
        if e.revision <= self.base || !e.object.key.starts_with(PODS) {
            return;
        }
        let c = &self.counts;
        let was = match e.kind {
            WatchKind::Deleted => is_bound(&e.object),
            _ => e.prev.as_deref().is_some_and(is_bound),
        };
        let now = is_bound(&e.object) && e.kind != WatchKind::Deleted;
        match e.kind {
            WatchKind::Added => {
                c.0.fetch_add(1, Ordering::Relaxed);
            }
            WatchKind::Deleted => {
                c.0.fetch_sub(1, Ordering::Relaxed);
            }
            WatchKind::Modified => {}
        }
        if now && !was {
            c.1.fetch_add(1, Ordering::Relaxed);
        } else if was && !now {
            c.1.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

pub async fn run(nodes: usize, deployments: usize, replicas: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store: DynStore = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb"))?);
    let server = Server::start(
        ServerConfig::new("127.0.0.1:0".parse()?, dir.path()),
        store.clone(),
    )
    .await?;
    let admin = client(&server, &server.admin_token).await?;
    let node_api: Api<Node> = Api::all(admin.clone());
    let cities: Vec<String> = meridian_api::geo::cities()
        .iter()
        .take(200)
        .map(|c| meridian_api::geo::city_label(&c.name))
        .collect();
    let t = Instant::now();
    futures::stream::iter(0..nodes)
        .for_each_concurrent(64, |i| {
            let (api, city) = (node_api.clone(), cities[i % cities.len()].clone());
            async move {
                let name = format!("node-{i:06}");
                let node: Node = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {
                        "kubernetes.io/hostname": name, "topology.meridian.io/city": city}},
                }))
                .expect("node");
                if let Err(e) = api.create(&PostParams::default(), &node).await {
                    eprintln!("node {name}: {e}");
                    return;
                }
                let status = json!({"status": {
                    "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"},
                    "capacity": {"cpu": "32", "memory": "128Gi", "pods": "110"},
                    "conditions": [{"type": "Ready", "status": "True"}]}});
                if let Err(e) = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                    .await
                {
                    eprintln!("node {name} status: {e}");
                }
            }
        })
        .await;
    eprintln!("{nodes} nodes in {:.1}s", t.elapsed().as_secs_f64());
    let scheduler = client(&server, &server.system_token(SystemRole::Scheduler).await?).await?;
    let controllers = client(
        &server,
        &server.system_token(SystemRole::Controllers).await?,
    )
    .await?;
    let loops = [
        tokio::spawn(meridian_scheduler::run(scheduler)),
        tokio::spawn(meridian_controllers::run(controllers)),
    ];
    let counts = counter(&server)?;
    let deploys: Api<Deployment> = Api::namespaced(admin.clone(), "default");
    let t0 = Instant::now();
    for d in 0..deployments {
        let name = format!("w{d}");
        let spec: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": {
                    "topologySpreadConstraints": [{"topologyKey": "topology.meridian.io/city",
                        "maxSkew": 1, "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": {"matchLabels": {"app": name}}}],
                    "containers": [{"name": "c", "image": "busybox",
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}},
        }))?;
        deploys.create(&PostParams::default(), &spec).await?;
    }
    let want = deployments * replicas;
    let mut last = (0, 0);
    let deadline = t0 + Duration::from_secs(1800);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (all, bound) = (
            counts.0.load(Ordering::Relaxed),
            counts.1.load(Ordering::Relaxed),
        );
        if (all, bound) != last {
            // How far the watch cache (what watchers see) is behind the store.
            let behind = store.current_revision().await.unwrap_or_default()
                - server.state.cache.snapshot().revision;
            eprintln!(
                "  {:>5.1}s: {all} pods created, {bound} bound (watch cache {behind} revisions behind the store)",
                t0.elapsed().as_secs_f64()
            );
            last = (all, bound);
        }
        if bound >= want || Instant::now() > deadline {
            break;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "e2e: {deployments} Deployments x {replicas} replicas onto {nodes} nodes: {} of {want} pods bound in {secs:.1}s ({:.0} pods/s end to end)",
        last.1,
        last.1 as f64 / secs
    );
    for l in loops {
        l.abort();
    }
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
