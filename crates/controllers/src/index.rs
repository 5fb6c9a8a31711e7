//! The controllers' view of every pod, indexed by owner.
//!
//! A tick of every controller used to group all pods by their controlling owner
//! (a walk over every pod, a map entry per pod) before looking at a single
//! ReplicaSet: at 50,000 pods that walk was the largest single cost of the whole
//! control plane (16 % of CPU in a profile of `meridian-bench e2e`). This index is
//! kept up to date by the pod watch instead, event by event, and also records which
//! owners saw a change of one of their pods since a controller last asked, so a
//! tick can reconcile only what changed (with a full pass now and then to heal
//! anything a missed change left behind).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodCondition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use serde::{Deserialize, Serialize};

/// What the controllers' pod watch decodes of a pod; the index keeps it as a
/// smaller [`PodView`]. A whole typed `Pod` takes ~8 KB of memory (its spec alone
/// is 2.2 KB before a single string), this about a tenth.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct PodWatch {
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    pub spec: Option<PodViewSpec>,
    pub status: Option<PodWatchStatus>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodViewSpec {
    pub node_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct PodWatchStatus {
    pub phase: Option<String>,
    pub reason: Option<String>,
    #[serde(default, deserialize_with = "ready_only")]
    pub conditions: Option<Vec<PodCondition>>,
}

/// What the controllers keep of a pod, in the shape of a `Pod` for what they
/// read. A `PodWatch` held ~1.1 KB a pod (its `ObjectMeta` alone is 360 bytes of
/// mostly empty fields, a Ready condition 160 more): a gigabyte at a million pods.
#[derive(Clone, Debug, Default)]
pub struct PodView {
    pub metadata: PodMeta,
    pub spec: Option<PodViewSpec>,
    pub status: Option<PodViewStatus>,
}

/// The metadata the controllers read.
#[derive(Clone, Debug, Default)]
pub struct PodMeta {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub uid: Option<String>,
    pub creation_timestamp: Option<Time>,
    pub deletion_timestamp: Option<Time>,
    pub owner_references: Option<Vec<OwnerReference>>,
    /// Of the labels, the DaemonSet revision ([`KEPT_LABELS`]).
    pub labels: Option<BTreeMap<String, String>>,
    /// Of the annotations, the replaced node ([`KEPT_ANNOTATIONS`]).
    pub annotations: Option<BTreeMap<String, String>>,
}

impl PodMeta {
    /// The owner reference marked as controller.
    pub fn controller(&self) -> Option<&OwnerReference> {
        meridian_api::owners::controller_among(self.owner_references.as_deref()?)
    }
}

#[derive(Clone, Debug, Default)]
pub struct PodViewStatus {
    pub phase: Option<String>,
    pub reason: Option<String>,
    /// The Ready condition is True.
    pub ready: bool,
}

impl From<PodWatch> for PodView {
    fn from(w: PodWatch) -> PodView {
        let m = w.metadata;
        PodView {
            metadata: PodMeta {
                name: m.name,
                namespace: m.namespace,
                uid: m.uid,
                creation_timestamp: m.creation_timestamp,
                deletion_timestamp: m.deletion_timestamp,
                owner_references: m.owner_references,
                labels: m.labels,
                annotations: m.annotations,
            },
            spec: w.spec,
            status: w.status.map(|s| PodViewStatus {
                ready: s
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True"),
                phase: s.phase,
                reason: s.reason,
            }),
        }
    }
}

/// Pod labels and annotations the controllers read; the rest are dropped as the
/// watch decodes them.
const KEPT_LABELS: [&str; 1] = [crate::daemonset::REVISION_LABEL];
const KEPT_ANNOTATIONS: [&str; 1] = [meridian_api::meridian::REPLACES_NODE_ANNOTATION];

/// A pod's metadata without what no controller reads (other labels and
/// annotations, managed fields, finalizers): half of what a view held.
fn slim_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let mut m = ObjectMeta::deserialize(d)?;
    let keep = |map: Option<std::collections::BTreeMap<String, String>>, keys: &[&str]| {
        map.map(|mut map| {
            map.retain(|k, _| keys.contains(&k.as_str()));
            map
        })
        .filter(|map| !map.is_empty())
    };
    m.labels = keep(m.labels.take(), &KEPT_LABELS);
    m.annotations = keep(m.annotations.take(), &KEPT_ANNOTATIONS);
    m.managed_fields = None;
    m.finalizers = None;
    Ok(m)
}

/// Of a pod's conditions, the Ready one's type and status ([`crate::is_ready`]).
fn ready_only<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<PodCondition>>, D::Error> {
    let all = Option::<Vec<PodCondition>>::deserialize(d)?;
    Ok(all.map(|all| {
        all.into_iter()
            .filter(|c| c.type_ == "Ready")
            .map(|c| PodCondition {
                type_: c.type_,
                status: c.status,
                ..Default::default()
            })
            .collect()
    }))
}

impl kube::Resource for PodWatch {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[derive(Default)]
struct Inner {
    /// Every pod by uid.
    pods: HashMap<Arc<str>, Arc<PodView>>,
    /// Pods by the uid of each owner they reference.
    by_owner: HashMap<Arc<str>, HashMap<Arc<str>, Arc<PodView>>>,
    /// Owners one of whose pods changed since [`PodIndex::take_changed`].
    changed: HashSet<Arc<str>>,
    /// A relist in progress: the pods shown so far.
    relist: Option<HashMap<Arc<str>, Arc<PodView>>>,
    /// The newest resourceVersion among them (it counts once the relist is done).
    relist_rv: u64,
    ready: bool,
}

fn uid_of(p: &PodView) -> Arc<str> {
    Arc::from(p.metadata.uid.as_deref().unwrap_or_default())
}

fn owners_of(p: &PodView) -> impl Iterator<Item = &str> {
    p.metadata
        .owner_references
        .iter()
        .flatten()
        .map(|o| o.uid.as_str())
}

impl Inner {
    fn insert(&mut self, pod: Arc<PodView>) {
        let uid = uid_of(&pod);
        self.remove(&uid);
        for o in owners_of(&pod) {
            let o: Arc<str> = Arc::from(o);
            self.by_owner
                .entry(o.clone())
                .or_default()
                .insert(uid.clone(), pod.clone());
            self.changed.insert(o);
        }
        self.pods.insert(uid, pod);
    }

    fn remove(&mut self, uid: &str) {
        let Some(old) = self.pods.remove(uid) else {
            return;
        };
        for o in owners_of(&old) {
            if let Some(m) = self.by_owner.get_mut(o) {
                m.remove(uid);
                if m.is_empty() {
                    self.by_owner.remove(o);
                }
            }
            self.changed.insert(Arc::from(o));
        }
    }
}

/// Every pod, kept by one watch; cheap to ask by owner.
#[derive(Default)]
pub struct PodIndex {
    inner: Mutex<Inner>,
    ready: tokio::sync::Notify,
    /// The newest resourceVersion among the pods the watch has shown: every
    /// write up to it has been seen.
    seen_rv: std::sync::atomic::AtomicU64,
}

impl PodIndex {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the watch that keeps the index (until the runtime stops).
    pub fn watch(client: &kube::Client) -> Arc<PodIndex> {
        let index = Arc::new(PodIndex::default());
        let api: Api<PodWatch> = Api::all(client.clone());
        let i = index.clone();
        tokio::spawn(
            watcher(
                api,
                watcher::Config::default().page_size(meridian_api::POD_LIST_PAGE),
            )
            .default_backoff()
            .for_each(move |ev| {
                if let Ok(ev) = ev {
                    i.apply(ev);
                }
                futures::future::ready(())
            }),
        );
        index
    }

    /// The newest resourceVersion the watch has shown (0: none yet).
    pub fn seen_rv(&self) -> u64 {
        self.seen_rv.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Applies one watch event.
    pub fn apply(&self, ev: watcher::Event<PodWatch>) {
        let rv_of = |p: &PodWatch| -> u64 {
            p.metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        // A version counts once what it shows is in the index (after the change,
        // or, in a relist, once the relist is done), so a reader that takes the
        // version first and the pods second never has a version its pods lack.
        let mut seen = 0;
        let mut s = self.lock();
        match ev {
            watcher::Event::Apply(p) => {
                seen = rv_of(&p);
                s.insert(Arc::new(p.into()));
            }
            watcher::Event::Delete(p) => {
                seen = rv_of(&p);
                s.remove(p.metadata.uid.as_deref().unwrap_or_default());
            }
            watcher::Event::Init => {
                s.relist = Some(HashMap::new());
                s.relist_rv = 0;
            }
            watcher::Event::InitApply(p) => {
                s.relist_rv = s.relist_rv.max(rv_of(&p));
                let p: Arc<PodView> = Arc::new(p.into());
                s.relist
                    .get_or_insert_with(HashMap::new)
                    .insert(uid_of(&p), p);
            }
            watcher::Event::InitDone => {
                seen = std::mem::take(&mut s.relist_rv);
                let fresh = s.relist.take().unwrap_or_default();
                let gone: Vec<Arc<str>> = s
                    .pods
                    .keys()
                    .filter(|u| !fresh.contains_key(*u))
                    .cloned()
                    .collect();
                for u in gone {
                    s.remove(&u);
                }
                for (_, p) in fresh {
                    s.insert(p);
                }
                if !s.ready {
                    s.ready = true;
                    self.ready.notify_waiters();
                }
            }
        }
        drop(s);
        self.seen_rv
            .fetch_max(seen, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits for the first complete list.
    pub async fn wait_until_ready(&self) {
        loop {
            let notified = self.ready.notified();
            if self.lock().ready {
                return;
            }
            notified.await;
        }
    }

    /// Pods whose controlling owner has `uid`.
    pub fn controlled_by(&self, uid: &str) -> Vec<Arc<PodView>> {
        self.lock()
            .by_owner
            .get(uid)
            .map(|m| {
                m.values()
                    .filter(|p| p.metadata.controller().is_some_and(|o| o.uid == uid))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Pods with any owner reference to `uid`.
    pub fn dependents_of(&self, uid: &str) -> Vec<Arc<PodView>> {
        self.lock()
            .by_owner
            .get(uid)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every owner some pod names as its controller: (owner uid, owner kind).
    pub fn controllers(&self) -> Vec<(String, String)> {
        let s = self.lock();
        s.by_owner
            .iter()
            .filter_map(|(uid, pods)| {
                pods.values().find_map(|p| {
                    p.metadata
                        .controller()
                        .filter(|o| o.uid == **uid)
                        .map(|o| (o.uid.clone(), o.kind.clone()))
                })
            })
            .collect()
    }

    /// The owners one of whose pods changed since the last call.
    pub fn take_changed(&self) -> HashSet<Arc<str>> {
        std::mem::take(&mut self.lock().changed)
    }

    pub fn len(&self) -> usize {
        self.lock().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(uid: &str, owner: Option<(&str, &str)>) -> PodWatch {
        let refs = owner.map(|(kind, o)| {
            json!([{"apiVersion": "apps/v1", "kind": kind, "name": "x", "uid": o,
                    "controller": true}])
        });
        serde_json::from_value(json!({
            "metadata": {"name": uid, "namespace": "n", "uid": uid, "ownerReferences": refs}
        }))
        .unwrap()
    }

    #[test]
    fn the_index_knows_the_newest_version_its_watch_has_shown() {
        let at = |uid: &str, rv: &str| -> PodWatch {
            serde_json::from_value(json!({
                "metadata": {"name": uid, "namespace": "n", "uid": uid, "resourceVersion": rv}
            }))
            .unwrap()
        };
        let i = PodIndex::default();
        assert_eq!(i.seen_rv(), 0);
        i.apply(watcher::Event::Apply(at("a", "17")));
        i.apply(watcher::Event::Apply(at("b", "40")));
        assert_eq!(i.seen_rv(), 40);
        i.apply(watcher::Event::Delete(at("a", "41")));
        assert_eq!(i.seen_rv(), 41);
        // A relist counts once it is done (until then the index shows the old
        // pods), and never takes the version backwards.
        i.apply(watcher::Event::Init);
        i.apply(watcher::Event::InitApply(at("b", "40")));
        i.apply(watcher::Event::InitApply(at("c", "90")));
        assert_eq!(i.seen_rv(), 41);
        i.apply(watcher::Event::InitDone);
        assert_eq!(i.seen_rv(), 90);
        i.apply(watcher::Event::Init);
        i.apply(watcher::Event::InitApply(at("c", "90")));
        i.apply(watcher::Event::InitDone);
        assert_eq!(i.seen_rv(), 90);
    }

    #[test]
    fn a_view_keeps_what_controllers_read_and_drops_the_rest() {
        let w: PodWatch = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u",
                "creationTimestamp": "2026-11-28T10:00:00Z",
                "labels": {"app": "web", "controller-revision-hash": "h1"},
                "annotations": {"meridian.io/replaces-node": "n1", "note": "x"},
                "finalizers": ["f"],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "rs", "uid": "rs1", "controller": true}]},
            "spec": {"nodeName": "n2", "containers": []},
            "status": {"phase": "Running", "reason": "R", "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-28T10:00:01Z",
                 "message": "long text"}]}
        }))
        .unwrap();
        assert_eq!(w.metadata.finalizers, None);
        let conditions = w.status.as_ref().unwrap().conditions.as_ref().unwrap();
        assert_eq!(conditions.len(), 1, "of the conditions, Ready");
        let v = PodView::from(w);
        let m = &v.metadata;
        assert_eq!(m.name.as_deref(), Some("p"));
        assert_eq!(m.uid.as_deref(), Some("u"));
        assert!(m.creation_timestamp.is_some());
        assert_eq!(
            m.labels,
            Some([("controller-revision-hash".to_string(), "h1".to_string())].into())
        );
        assert_eq!(
            m.annotations,
            Some([("meridian.io/replaces-node".to_string(), "n1".to_string())].into())
        );
        assert_eq!(m.controller().map(|o| o.uid.as_str()), Some("rs1"));
        assert_eq!(v.spec.as_ref().unwrap().node_name.as_deref(), Some("n2"));
        let st = v.status.as_ref().unwrap();
        assert_eq!(st.phase.as_deref(), Some("Running"));
        assert!(st.ready);
        assert!(crate::is_ready(&v));
    }

    /// A complete list (initial or relist) of these pods, all of `rs1` but "c".
    fn list(ix: &PodIndex, uids: &[&str]) {
        ix.apply(watcher::Event::Init);
        for u in uids {
            let owner = (*u != "c").then_some(("ReplicaSet", "rs1"));
            ix.apply(watcher::Event::InitApply(pod(u, owner)));
        }
    }

    #[test]
    fn pods_are_found_by_owner_and_changes_are_reported_once() {
        let ix = PodIndex::default();
        list(&ix, &["a", "b", "c"]);
        ix.apply(watcher::Event::InitDone);
        assert_eq!(ix.len(), 3);
        assert_eq!(ix.controlled_by("rs1").len(), 2);
        assert_eq!(
            ix.controllers(),
            vec![("rs1".to_string(), "ReplicaSet".to_string())]
        );
        let changed = ix.take_changed();
        assert!(changed.contains("rs1"));
        assert!(ix.take_changed().is_empty());

        // A pod moves to another owner: both owners changed, counts follow.
        ix.apply(watcher::Event::Apply(pod("b", Some(("Job", "job1")))));
        let changed = ix.take_changed();
        assert!(changed.contains("rs1") && changed.contains("job1"));
        assert_eq!(ix.controlled_by("rs1").len(), 1);
        assert_eq!(ix.controlled_by("job1").len(), 1);

        ix.apply(watcher::Event::Delete(pod(
            "a",
            Some(("ReplicaSet", "rs1")),
        )));
        assert!(ix.controlled_by("rs1").is_empty());
        assert!(ix.take_changed().contains("rs1"));
    }

    #[test]
    fn a_relist_drops_pods_it_no_longer_shows() {
        let ix = PodIndex::default();
        ix.apply(watcher::Event::Init);
        ix.apply(watcher::Event::InitApply(pod(
            "a",
            Some(("ReplicaSet", "rs1")),
        )));
        ix.apply(watcher::Event::InitApply(pod(
            "b",
            Some(("ReplicaSet", "rs1")),
        )));
        ix.apply(watcher::Event::InitDone);
        ix.take_changed();
        ix.apply(watcher::Event::Init);
        ix.apply(watcher::Event::InitApply(pod(
            "b",
            Some(("ReplicaSet", "rs1")),
        )));
        // Until the relist is done, the old view stands.
        assert_eq!(ix.controlled_by("rs1").len(), 2);
        ix.apply(watcher::Event::InitDone);
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.controlled_by("rs1").len(), 1);
        assert!(ix.take_changed().contains("rs1"));
    }

    #[test]
    fn a_pod_not_controlled_by_an_owner_is_its_dependent_only() {
        let ix = PodIndex::default();
        let mut p = pod("a", Some(("ReplicaSet", "rs1")));
        p.metadata.owner_references.as_mut().unwrap()[0].controller = None;
        ix.apply(watcher::Event::Apply(p));
        assert!(ix.controlled_by("rs1").is_empty());
        assert_eq!(ix.dependents_of("rs1").len(), 1);
        assert!(ix.controllers().is_empty());
    }
}
