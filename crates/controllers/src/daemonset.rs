//! The DaemonSet controller: one pod on every node the template admits (node
//! selector, required affinity, tolerated taints), including nodes that join later;
//! rolling updates replace at most `maxUnavailable` pods at a time.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use meridian_scheduler::engine::{Fleet, NodeInfo, PodRequest};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::index::PodView;
use crate::{Stores, is_active, is_ready, owner_ref};

pub const REVISION_LABEL: &str = "controller-revision-hash";

fn template_hash(ds: &DaemonSet) -> String {
    let t = ds.spec.as_ref().map(|s| &s.template);
    let h = Sha256::digest(serde_json::to_vec(&t).unwrap_or_default());
    h.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

pub async fn reconcile_all(client: &kube::Client, s: &Stores) {
    let sets = s.daemonsets.state();
    if sets.is_empty() {
        return; // no walk over every node for nothing
    }
    let nodes: Vec<NodeInfo> = s
        .nodes
        .state()
        .iter()
        .map(|n| NodeInfo::from_node(n))
        .collect();
    for ds in sets {
        if ds.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let uid = ds.metadata.uid.clone().unwrap_or_default();
        let pods = s.pods.controlled_by(&uid);
        reconcile(client, s, &ds, &uid, &nodes, pods).await;
    }
}

async fn reconcile(
    client: &kube::Client,
    s: &Stores,
    ds: &DaemonSet,
    uid: &str,
    nodes: &[NodeInfo],
    pods: Vec<Arc<PodView>>,
) {
    let ns = ds.metadata.namespace.clone().unwrap_or_default();
    let name = ds.metadata.name.clone().unwrap_or_default();
    let Some(spec) = ds.spec.as_ref() else { return };
    let hash = template_hash(ds);
    let probe = Pod {
        metadata: spec.template.metadata.clone().unwrap_or_default(),
        spec: spec.template.spec.clone(),
        status: None,
    };
    let req = PodRequest::from_pod(&probe);
    let eligible: Vec<&NodeInfo> = nodes.iter().filter(|n| Fleet::admits(n, &req)).collect();
    let mut by_node: HashMap<String, Vec<Arc<PodView>>> = HashMap::new();
    for p in pods.iter().filter(|p| is_active(p)) {
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        by_node.entry(node).or_default().push(p.clone());
    }
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let recent = |key: &str| {
        s.expectations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .is_some_and(|(_, _, t)| t.elapsed() < crate::EXPECTATION_TTL)
    };
    let expect = |key: String| {
        s.expectations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (0, true, std::time::Instant::now()));
    };
    let mut misscheduled = 0;
    for (node, ps) in &by_node {
        if !eligible.iter().any(|n| &n.name == node) {
            misscheduled += ps.len();
            delete_all(client, s, ds, &api, ps).await;
        }
    }
    // Rolling update: replace outdated pods, keeping at most maxUnavailable down.
    let max_unavailable = crate::deployment::resolve(
        spec.update_strategy
            .as_ref()
            .and_then(|u| u.rolling_update.as_ref())
            .and_then(|r| r.max_unavailable.as_ref()),
        eligible.len() as i32,
        0,
        false,
    )
    .max(1) as usize;
    let on_delete = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.type_.as_deref())
        == Some("OnDelete");
    let unavailable = eligible
        .iter()
        .filter(|n| {
            !by_node
                .get(&n.name)
                .is_some_and(|ps| ps.iter().any(|p| is_ready(p)))
        })
        .count();
    let mut budget = max_unavailable.saturating_sub(unavailable);
    let (mut ready, mut updated, mut scheduled) = (0, 0, 0);
    for n in &eligible {
        let key = format!("{uid}/{}", n.name);
        match by_node.get(&n.name) {
            None => {
                if recent(&key) {
                    continue;
                }
                let mut meta: ObjectMeta = spec.template.metadata.clone().unwrap_or_default();
                meta.name = Some(format!("{name}-{}", crate::replicaset::suffix()));
                meta.namespace = Some(ns.clone());
                meta.owner_references = Some(vec![owner_ref("DaemonSet", &ds.metadata)]);
                meta.labels
                    .get_or_insert_with(Default::default)
                    .insert(REVISION_LABEL.into(), hash.clone());
                let mut pod_spec = spec.template.spec.clone().unwrap_or_default();
                pod_spec.node_name = Some(n.name.clone());
                let pod = Pod {
                    metadata: meta,
                    spec: Some(pod_spec),
                    status: None,
                };
                match api.create(&PostParams::default(), &pod).await {
                    Ok(_) => expect(key),
                    Err(e) => {
                        tracing::warn!(daemonset = %name, node = %n.name, "cannot create pod: {e}")
                    }
                }
            }
            Some(ps) => {
                scheduled += 1;
                let current = ps.iter().any(|p| {
                    p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(REVISION_LABEL))
                        == Some(&hash)
                });
                if current {
                    updated += 1;
                }
                if ps.iter().any(|p| is_ready(p)) {
                    ready += 1;
                }
                if !current && !on_delete && budget > 0 {
                    budget -= 1;
                    delete_all(client, s, ds, &api, ps).await;
                }
            }
        }
    }
    let status = DaemonSetStatus {
        desired_number_scheduled: eligible.len() as i32,
        current_number_scheduled: scheduled,
        number_ready: ready,
        number_available: Some(ready),
        number_unavailable: Some(eligible.len() as i32 - ready),
        updated_number_scheduled: Some(updated),
        number_misscheduled: misscheduled as i32,
        observed_generation: ds.metadata.generation,
        ..Default::default()
    };
    if ds.status.as_ref() != Some(&status) {
        let api: Api<DaemonSet> = Api::namespaced(client.clone(), &ns);
        let patch = json!({"status": status});
        if let Err(e) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            tracing::debug!(daemonset = %name, "status: {e}");
        }
    }
}

/// Deletes `pods` unless risk control is holding this DaemonSet's removals back.
async fn delete_all(
    client: &kube::Client,
    s: &Stores,
    ds: &DaemonSet,
    api: &Api<Pod>,
    pods: &[Arc<PodView>],
) {
    let ns = ds.metadata.namespace.as_deref().unwrap_or_default();
    let name = ds.metadata.name.as_deref().unwrap_or_default();
    let key = format!("DaemonSet/{ns}/{name}");
    if s.denials.blocked(&key) {
        return;
    }
    for p in pods {
        if let Err(e) = api
            .delete(
                p.metadata.name.as_deref().unwrap_or_default(),
                &Default::default(),
            )
            .await
        {
            if let Some(msg) = s.denials.note(&key, &e) {
                crate::risk::report(
                    client,
                    "DaemonSet",
                    ns,
                    name,
                    ds.metadata.uid.as_deref(),
                    &msg,
                )
                .await;
            }
            if s.denials.blocked(&key) {
                return;
            }
        }
    }
}
