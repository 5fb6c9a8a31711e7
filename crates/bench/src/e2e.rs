//! End to end through the API: Deployments of R replicas onto N Node objects, with
//! the real controllers and scheduler against an in-process API server on the
//! embedded store; measures until every pod is bound.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use meridian_apiserver::auth::SystemRole;
use meridian_apiserver::{Server, ServerConfig};
use meridian_store::{DynStore, EmbeddedStore};
use serde_json::json;

async fn client(server: &Server, token: &str) -> Result<kube::Client> {
    let yaml =
        meridian_apiserver::kubeconfig::render("bench", &server.url, &server.ca_pem, token, None);
    let kc = kube::config::Kubeconfig::from_yaml(&yaml)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

/// (pods, bound pods) in the server's watch cache.
fn count(server: &Server) -> (usize, usize) {
    let snap = server.state.cache.snapshot();
    let mut all = 0;
    let mut bound = 0;
    for o in snap.range("/registry/core/pods/", None) {
        all += 1;
        if o.field("spec.nodeName").is_some_and(|n| !n.is_empty()) {
            bound += 1;
        }
    }
    (all, bound)
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
        let (all, bound) = count(&server);
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
