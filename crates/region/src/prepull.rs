//! `ImagePrePull`: warm images onto nodes ahead of a rollout.
//!
//! Every region watches ImagePrePull objects, asks each of its connected nodes
//! that matches `spec.nodeSelector` to pull the images (`PullImages` on the
//! agent's stream; the pulls go through this region's image cache, so the
//! long-haul link carries each image once), and reports in
//! `status.regions.<region>`: nodes targeted, how many have every image, the
//! first failures. A new generation of the object is pulled again; a node that
//! connects later (joins, or comes back before it answered) gets the pull then.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::watcher;
use meridian_api::meridian::{ImagePrePull, RegionPrePull};
use meridian_proto::{ImagesPulled, PullImages, RegionMessage, region_message};
use serde_json::json;

use crate::state::{Shared, lock};

/// How many failures a region lists in the status.
const MAX_FAILURES: usize = 10;

pub fn resource() -> ApiResource {
    ApiResource {
        group: "meridian.io".into(),
        version: "v1alpha1".into(),
        api_version: "meridian.io/v1alpha1".into(),
        kind: "ImagePrePull".into(),
        plural: "imageprepulls".into(),
    }
}

/// One pre-pull in progress on this region's nodes.
#[derive(Default)]
pub struct Progress {
    namespace: String,
    name: String,
    generation: i64,
    images: Vec<String>,
    selector: BTreeMap<String, String>,
    nodes: HashSet<String>,
    pulled: HashSet<String>,
    failures: BTreeMap<String, String>,
}

#[derive(Default)]
pub struct PrePulls {
    /// By request id (`uid/generation`): the latest generation of every object.
    active: HashMap<String, Progress>,
}

fn uid_of(id: &str) -> &str {
    id.rsplit_once('/').map(|(u, _)| u).unwrap_or(id)
}

fn node_matches(node_json: &[u8], selector: &BTreeMap<String, String>) -> bool {
    if selector.is_empty() {
        return true;
    }
    let Ok(node) = serde_json::from_slice::<serde_json::Value>(node_json) else {
        return false;
    };
    let labels = &node["metadata"]["labels"];
    selector
        .iter()
        .all(|(k, v)| labels[k.as_str()].as_str() == Some(v.as_str()))
}

/// Watches ImagePrePull objects and starts the pulls of each new generation.
pub async fn run(shared: Arc<Shared>) {
    let api: Api<DynamicObject> = Api::all_with(shared.client.clone(), &resource());
    let mut stream = Box::pin(watcher(api, watcher::Config::default()));
    loop {
        let ev = match stream.try_next().await {
            Ok(Some(ev)) => ev,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!("ImagePrePull watch (retrying): {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let obj = match ev {
            watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) => obj,
            watcher::Event::Delete(obj) => {
                let uid = obj.metadata.uid.unwrap_or_default();
                lock(&shared.prepulls)
                    .active
                    .retain(|id, _| uid_of(id) != uid);
                continue;
            }
            _ => continue,
        };
        let Ok(p) = serde_json::to_value(&obj).and_then(serde_json::from_value::<ImagePrePull>)
        else {
            continue;
        };
        start(&shared, &p).await;
    }
}

async fn start(shared: &Arc<Shared>, p: &ImagePrePull) {
    let region = shared.cfg.name.clone();
    let generation = p.metadata.generation.unwrap_or(1);
    let done = p
        .status
        .as_ref()
        .and_then(|s| s.regions.get(&region))
        .is_some_and(|r| r.observed_generation >= generation && r.pulled + r.failed >= r.nodes);
    let id = format!(
        "{}/{generation}",
        p.metadata.uid.clone().unwrap_or_default()
    );
    if done || lock(&shared.prepulls).active.contains_key(&id) {
        return;
    }
    let targets: Vec<(String, crate::state::SessionTx)> = lock(&shared.nodes)
        .iter()
        .filter(|(_, n)| node_matches(&n.node.json, &p.spec.node_selector))
        .filter_map(|(name, n)| n.session.as_ref().map(|s| (name.clone(), s.tx.clone())))
        .collect();
    let progress = Progress {
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        name: p.metadata.name.clone().unwrap_or_default(),
        generation,
        nodes: targets.iter().map(|(n, _)| n.clone()).collect(),
        ..Default::default()
    };
    lock(&shared.prepulls).active.insert(id.clone(), progress);
    tracing::info!(prepull = %id, nodes = targets.len(), images = p.spec.images.len(), "image pre-pull");
    report(shared, &id).await;
    for (_, tx) in targets {
        let m = RegionMessage {
            msg: Some(region_message::Msg::PullImages(PullImages {
                id: id.clone(),
                images: p.spec.images.clone(),
            })),
        };
        let _ = tx.send(m).await;
    }
}

/// A node (re)connected: it gets every pre-pull that selects it and that it has
/// not completed.
pub async fn node_joined(shared: &Arc<Shared>, node: &str, tx: &crate::state::SessionTx) {
    let Some(node_json) = lock(&shared.nodes).get(node).map(|n| n.node.json.clone()) else {
        return;
    };
    let todo: Vec<(String, Vec<String>)> = {
        let mut all = lock(&shared.prepulls);
        all.active
            .iter_mut()
            .filter(|(_, p)| !p.pulled.contains(node) && node_matches(&node_json, &p.selector))
            .map(|(id, p)| {
                p.nodes.insert(node.to_owned());
                p.failures.remove(node);
                (id.clone(), p.images.clone())
            })
            .collect()
    };
    for (id, images) in todo {
        report(shared, &id).await;
        let m = RegionMessage {
            msg: Some(region_message::Msg::PullImages(PullImages { id, images })),
        };
        let _ = tx.send(m).await;
    }
}

/// An agent's answer.
pub async fn pulled(shared: &Arc<Shared>, node: &str, r: ImagesPulled) {
    {
        let mut all = lock(&shared.prepulls);
        let Some(p) = all.active.get_mut(&r.id) else {
            return;
        };
        if !p.nodes.contains(node) {
            return;
        }
        let failed: Vec<String> = r
            .results
            .iter()
            .filter(|x| !x.error.is_empty())
            .map(|x| format!("{}: {}", x.image, x.error))
            .collect();
        if failed.is_empty() {
            p.pulled.insert(node.to_owned());
            p.failures.remove(node);
        } else {
            p.pulled.remove(node);
            p.failures.insert(node.to_owned(), failed.join("; "));
        }
    }
    report(shared, &r.id).await;
}

/// Writes this region's entry of the object's status.
async fn report(shared: &Arc<Shared>, id: &str) {
    let (ns, name, entry) = {
        let all = lock(&shared.prepulls);
        let Some(p) = all.active.get(id) else {
            return;
        };
        let entry = RegionPrePull {
            observed_generation: p.generation,
            nodes: p.nodes.len() as i64,
            pulled: p.pulled.len() as i64,
            failed: p.failures.len() as i64,
            failures: p
                .failures
                .iter()
                .take(MAX_FAILURES)
                .map(|(n, why)| format!("{n}: {why}"))
                .collect(),
        };
        (p.namespace.clone(), p.name.clone(), entry)
    };
    let api: Api<DynamicObject> = Api::namespaced_with(shared.client.clone(), &ns, &resource());
    let patch = json!({"status": {"regions": {shared.cfg.name.clone(): entry}}});
    if let Err(e) = api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        tracing::warn!(%ns, %name, "ImagePrePull status: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_selectors_match_labels() {
        let node = br#"{"metadata": {"labels": {"city": "Paris", "kind": "cdn"}}}"#;
        assert!(node_matches(node, &BTreeMap::new()));
        let sel = BTreeMap::from([("city".to_owned(), "Paris".to_owned())]);
        assert!(node_matches(node, &sel));
        let sel = BTreeMap::from([("city".to_owned(), "Tokyo".to_owned())]);
        assert!(!node_matches(node, &sel));
        assert!(!node_matches(b"not json", &sel));
    }
}
