//! The global scheduler: binds pending pods to nodes across the whole fleet.
//!
//! A level-triggered loop over two reflectors (Nodes, Pods): every tick it rebuilds
//! the fleet (allocatable minus what is bound), places the pending pods oldest first
//! with the [`engine`], and binds them through `pods/binding`. A pod that fits
//! nowhere gets `PodScheduled=False, reason=Unschedulable` and a `FailedScheduling`
//! Event counting the causes.

pub mod engine;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;

use engine::{Fleet, NodeInfo, Placement, PodRequest};

/// Scheduler names this scheduler serves.
pub const SCHEDULER_NAMES: &[&str] = &["default-scheduler", "meridian"];

fn is_terminal(p: &Pod) -> bool {
    matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn unschedulable_message(p: &Pod) -> Option<&str> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")?
        .message
        .as_deref()
}

/// Runs the scheduler until the task is dropped.
pub async fn run(client: kube::Client) {
    let (nodes, node_writer) = reflector::store::<Node>();
    let (pods, pod_writer) = reflector::store::<Pod>();
    let node_api: Api<Node> = Api::all(client.clone());
    let pod_api: Api<Pod> = Api::all(client.clone());
    tokio::spawn(
        reflector(node_writer, watcher(node_api, watcher::Config::default()))
            .default_backoff()
            .for_each(|_| async {}),
    );
    tokio::spawn(
        reflector(pod_writer, watcher(pod_api, watcher::Config::default()))
            .default_backoff()
            .for_each(|_| async {}),
    );
    if nodes.wait_until_ready().await.is_err() || pods.wait_until_ready().await.is_err() {
        return;
    }
    // Pods bound by us that the watch has not shown bound yet.
    let mut inflight: HashMap<String, (String, Instant)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let mut fleet = Fleet::new(
            nodes
                .state()
                .iter()
                .map(|n| NodeInfo::from_node(n))
                .collect(),
        );
        let mut pending = Vec::new();
        inflight.retain(|_, (_, t)| t.elapsed() < Duration::from_secs(10));
        for p in pods.state() {
            if is_terminal(&p) || p.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let uid = p.metadata.uid.clone().unwrap_or_default();
            let node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty());
            match node {
                Some(n) => {
                    inflight.remove(&uid);
                    fleet.bind(&n, &PodRequest::from_pod(&p));
                }
                None => {
                    if let Some((n, _)) = inflight.get(&uid) {
                        fleet.bind(n, &PodRequest::from_pod(&p));
                        continue;
                    }
                    let name = p
                        .spec
                        .as_ref()
                        .and_then(|s| s.scheduler_name.as_deref())
                        .unwrap_or("default-scheduler");
                    if SCHEDULER_NAMES.contains(&name) {
                        pending.push(p);
                    }
                }
            }
        }
        if pending.is_empty() {
            continue;
        }
        pending.sort_by(|a, b| {
            a.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0)
                .cmp(&b.metadata.creation_timestamp.as_ref().map(|t| t.0))
        });
        let mut binds = Vec::new();
        let mut failures = Vec::new();
        for p in pending {
            match fleet.place(&PodRequest::from_pod(&p)) {
                Placement::Node(n) => {
                    inflight.insert(
                        p.metadata.uid.clone().unwrap_or_default(),
                        (n.clone(), Instant::now()),
                    );
                    binds.push((p, n));
                }
                Placement::Unschedulable(msg) => {
                    if unschedulable_message(&p) != Some(msg.as_str()) {
                        failures.push((p, msg));
                    }
                }
            }
        }
        let client = &client;
        futures::stream::iter(binds)
            .for_each_concurrent(32, |(p, node)| async move {
                if let Err(e) = bind(client, &p, &node).await {
                    tracing::warn!(pod = ?p.metadata.name, %node, "bind failed: {e}");
                }
            })
            .await;
        futures::stream::iter(failures)
            .for_each_concurrent(16, |(p, msg)| async move {
                report_unschedulable(client, &p, &msg).await;
            })
            .await;
    }
}

async fn bind(client: &kube::Client, p: &Pod, node: &str) -> Result<(), kube::Error> {
    let ns = p.metadata.namespace.clone().unwrap_or_default();
    let name = p.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let body = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name, "namespace": ns},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    api.create_subresource::<serde_json::Value, serde_json::Value>(
        "binding",
        &name,
        &PostParams::default(),
        &body,
    )
    .await
    .map(|_| ())
}

async fn report_unschedulable(client: &kube::Client, p: &Pod, msg: &str) {
    let ns = p.metadata.namespace.clone().unwrap_or_default();
    let name = p.metadata.name.clone().unwrap_or_default();
    let now = jiff::Timestamp::now();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let patch = json!({"status": {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": msg, "lastTransitionTime": now.to_string(),
    }]}});
    if let Err(e) = api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        tracing::debug!(pod = %name, "unschedulable status: {e}");
    }
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let pod = meridian_api::events::PodRef {
        namespace: &ns,
        name: &name,
        uid: p.metadata.uid.as_deref(),
    };
    let ev = meridian_api::events::pod_event(
        pod,
        "meridian-scheduler",
        None,
        true,
        "FailedScheduling",
        msg,
    );
    let _ = events.create(&PostParams::default(), &ev).await;
}
