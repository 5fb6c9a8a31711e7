//! ConfigMaps and Secrets for the pods on this region's nodes.
//!
//! Agents never talk to the global API, so the region fetches what a pod
//! references (volumes, `env[].valueFrom`, `envFrom`, `imagePullSecrets`) one
//! object at a time, as the node authorizer would allow a kubelet, and ships it
//! with the pod in the node's desired set. Only the agent of the node the pod is
//! bound to ever receives them. A referenced object that does not exist yet is
//! asked for again with back-off (5 s → 60 s) while the pod exists, so creating
//! the ConfigMap later lets the pod start, as in Kubernetes.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::Api;
use meridian_proto::PodRef;
use tokio::sync::mpsc;

use crate::state::{Shared, lock};

pub const CONFIG_MAP: &str = "ConfigMap";
pub const SECRET: &str = "Secret";

/// (kind, name) of every object `pod` references, sorted, without duplicates.
pub fn wanted(pod: &Pod) -> Vec<(&'static str, String)> {
    let mut out = BTreeSet::new();
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    for v in spec.volumes.iter().flatten() {
        if let Some(n) = v.config_map.as_ref().map(|c| c.name.clone()) {
            out.insert((CONFIG_MAP, n));
        }
        if let Some(n) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            out.insert((SECRET, n));
        }
    }
    for s in spec.image_pull_secrets.iter().flatten() {
        out.insert((SECRET, s.name.clone()));
    }
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    for c in containers {
        for e in c.env.iter().flatten() {
            let Some(from) = &e.value_from else { continue };
            if let Some(r) = &from.config_map_key_ref {
                out.insert((CONFIG_MAP, r.name.clone()));
            }
            if let Some(r) = &from.secret_key_ref {
                out.insert((SECRET, r.name.clone()));
            }
        }
        for e in c.env_from.iter().flatten() {
            if let Some(r) = &e.config_map_ref {
                out.insert((CONFIG_MAP, r.name.clone()));
            }
            if let Some(r) = &e.secret_ref {
                out.insert((SECRET, r.name.clone()));
            }
        }
    }
    out.into_iter().filter(|(_, n)| !n.is_empty()).collect()
}

/// Whether `refs` holds every wanted object.
pub fn complete(wanted: &[(&'static str, String)], refs: &[PodRef]) -> bool {
    wanted.iter().all(|(k, n)| {
        refs.iter()
            .any(|r| r.kind == *k && r.name == *n && !r.json.is_empty())
    })
}

/// Resolves pods sent on `rx` (by uid) and pushes their node's desired set.
pub async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<String>) {
    let mut attempts: HashMap<String, u32> = HashMap::new();
    while let Some(uid) = rx.recv().await {
        let Some((node, namespace, json)) = lock(&shared.pods)
            .by_uid
            .get(&uid)
            .filter(|p| !p.gone)
            .map(|p| (p.node.clone(), p.namespace.clone(), p.json.clone()))
        else {
            attempts.remove(&uid);
            continue;
        };
        let Ok(pod) = serde_json::from_slice::<Pod>(&json) else {
            continue;
        };
        let want = wanted(&pod);
        let mut refs = Vec::with_capacity(want.len());
        for (kind, name) in &want {
            let json = fetch(&shared, kind, &namespace, name).await;
            refs.push(PodRef {
                kind: (*kind).to_owned(),
                name: name.clone(),
                json: json.unwrap_or_default(),
            });
        }
        let done = complete(&want, &refs);
        if let Some(p) = lock(&shared.pods).by_uid.get_mut(&uid) {
            p.refs = Arc::new(refs);
        }
        shared.push_desired(&node);
        if done {
            attempts.remove(&uid);
        } else {
            let n = attempts.entry(uid.clone()).or_default();
            *n += 1;
            let delay = Duration::from_secs(5u64.saturating_mul(1 << (*n - 1).min(4)).min(60));
            if let Some(tx) = shared.refs_tx.get().cloned() {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(uid);
                });
            }
        }
    }
}

/// The object as JSON, `None` when it does not exist or cannot be had now.
async fn fetch(shared: &Shared, kind: &str, namespace: &str, name: &str) -> Option<Vec<u8>> {
    let r = if kind == CONFIG_MAP {
        let api: Api<ConfigMap> = Api::namespaced(shared.client.clone(), namespace);
        api.get_opt(name)
            .await
            .map(|o| o.and_then(|o| serde_json::to_vec(&o).ok()))
    } else {
        let api: Api<Secret> = Api::namespaced(shared.client.clone(), namespace);
        api.get_opt(name)
            .await
            .map(|o| o.and_then(|o| serde_json::to_vec(&o).ok()))
    };
    match r {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(%kind, %namespace, %name, "cannot fetch a pod's reference: {e}");
            None
        }
    }
}

/// Queues `uid` for resolution when its pod references objects it lacks.
pub fn enqueue_if_needed(shared: &Shared, uid: &str, pod: &Pod) {
    let want = wanted(pod);
    if want.is_empty() {
        return;
    }
    let have = lock(&shared.pods)
        .by_uid
        .get(uid)
        .map(|p| complete(&want, &p.refs))
        .unwrap_or(false);
    if !have && let Some(tx) = shared.refs_tx.get() {
        let _ = tx.send(uid.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_reference_is_wanted_once() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {
                "imagePullSecrets": [{"name": "pull"}],
                "volumes": [
                    {"name": "a", "configMap": {"name": "cm"}},
                    {"name": "b", "secret": {"secretName": "sec"}},
                    {"name": "c", "emptyDir": {}},
                ],
                "containers": [{"name": "c", "image": "x",
                    "env": [
                        {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
                        {"name": "B", "valueFrom": {"secretKeyRef": {"name": "env-sec", "key": "k"}}},
                        {"name": "C", "value": "plain"},
                    ],
                    "envFrom": [{"configMapRef": {"name": "all"}}],
                }],
            },
        }))
        .unwrap();
        let w = wanted(&pod);
        assert_eq!(
            w,
            vec![
                (CONFIG_MAP, "all".to_owned()),
                (CONFIG_MAP, "cm".to_owned()),
                (SECRET, "env-sec".to_owned()),
                (SECRET, "pull".to_owned()),
                (SECRET, "sec".to_owned()),
            ]
        );
        let mut refs: Vec<PodRef> = w
            .iter()
            .map(|(k, n)| PodRef {
                kind: (*k).into(),
                name: n.clone(),
                json: b"{}".to_vec(),
            })
            .collect();
        assert!(complete(&w, &refs));
        refs[0].json.clear();
        assert!(!complete(&w, &refs));
    }
}
