//! The region's shared state: nodes and their sessions, the pod cache, and what is
//! waiting to go up to the global API.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use k8s_openapi::api::core::v1::{Node, Pod};
use meridian_proto::{
    DesiredPod, DesiredPods, LogChunk, NodeUsage, PodEvent, RegionMessage, region_message,
};
use meridian_store::{DynStore, Txn};
use tokio::sync::{Notify, mpsc};

use crate::{GRACE_ANNOTATION, NODE_LOST, RegionConfig, RegionError, parse_grace};

/// The sending half of an agent's stream. Messages are boxed so the channel's
/// preallocated block stays small: a region holds one per node.
#[derive(Clone)]
pub struct SessionTx(pub mpsc::Sender<Box<RegionMessage>>);

impl SessionTx {
    pub async fn send(&self, m: RegionMessage) -> Result<(), ()> {
        self.0.send(Box::new(m)).await.map_err(|_| ())
    }

    pub fn try_send(&self, m: RegionMessage) -> Result<(), ()> {
        self.0.try_send(Box::new(m)).map_err(|_| ())
    }

    /// Resolves when the agent's stream has ended.
    pub async fn closed(&self) {
        self.0.closed().await
    }
}

/// A node as the region keeps it: the Node object it writes, encoded, plus the few
/// fields the region reads often. Compact on purpose (100k of them per region).
#[derive(Clone)]
pub struct NodeRecord {
    pub json: Bytes,
    pub cpu_millis: i64,
    pub memory_bytes: i64,
    /// The node's grace override (label `meridian.io/reschedule-grace`).
    pub grace: Option<Option<Duration>>,
}

impl NodeRecord {
    pub fn from_node(node: &Node) -> Self {
        let cap = node.status.as_ref().and_then(|s| s.capacity.as_ref());
        let milli = |k: &str| {
            cap.and_then(|c| c.get(k))
                .and_then(|q| meridian_api::quantity::parse_milli(&q.0).ok())
                .unwrap_or(0)
        };
        Self {
            json: Bytes::from(serde_json::to_vec(node).unwrap_or_default()),
            cpu_millis: milli("cpu") as i64,
            memory_bytes: (milli("memory") / 1000) as i64,
            grace: node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(GRACE_ANNOTATION))
                .and_then(|g| parse_grace(g)),
        }
    }

    pub fn to_node(&self) -> Node {
        serde_json::from_slice(&self.json).unwrap_or_default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Ready,
    Unknown,
}

pub struct Session {
    pub id: u64,
    pub tx: SessionTx,
    /// For an agent that applies `DesiredChanges`: what this stream has been told
    /// to run. `None`: an agent that gets the full set on every change.
    pub told: Option<std::sync::Arc<Mutex<Told>>>,
}

/// What a stream's agent has been told to run.
pub enum Told {
    /// Nothing yet: the full set goes first, right after registration.
    NotYet,
    /// A message could not be queued (the agent is not reading): the next push
    /// sends the full set again.
    Lost,
    /// Each pod's desired hash and references, as last sent.
    Sent(Sent),
}

/// The `Arc` is held, so comparing its address is exact (the allocation cannot be
/// reused while it is here).
pub type Sent = HashMap<String, (u64, std::sync::Arc<Vec<meridian_proto::PodRef>>)>;

/// One desired pod as read from the cache, for a full set or a change.
struct Want {
    uid: String,
    desired: u64,
    json: Bytes,
    refs: std::sync::Arc<Vec<meridian_proto::PodRef>>,
}

impl Want {
    fn pod(&self) -> DesiredPod {
        DesiredPod {
            uid: self.uid.clone(),
            pod_json: self.json.to_vec(),
            refs: self.refs.to_vec(),
        }
    }
}

/// What an agent is told once it has been sent `want`.
fn sent_of(want: &[Want]) -> Sent {
    want.iter()
        .map(|w| (w.uid.clone(), (w.desired, w.refs.clone())))
        .collect()
}

/// What changed between what an agent was told and what it should run now, and
/// what it will have been told once the changes have gone (reusing `told`'s keys).
fn changes(mut told: Sent, want: &[Want]) -> (meridian_proto::DesiredChanges, Sent) {
    let mut upserts = Vec::new();
    let mut now = Sent::with_capacity(want.len());
    for w in want {
        let (uid, same) = match told.remove_entry(&w.uid) {
            Some((uid, (d, r))) => (uid, d == w.desired && std::sync::Arc::ptr_eq(&r, &w.refs)),
            None => (w.uid.clone(), false),
        };
        if !same {
            upserts.push(w.pod());
        }
        now.insert(uid, (w.desired, w.refs.clone()));
    }
    // What is left of `told` is no longer wanted.
    let removed = told.into_keys().collect();
    (meridian_proto::DesiredChanges { upserts, removed }, now)
}

pub struct NodeEntry {
    pub session: Option<Session>,
    pub last_seen: Instant,
    pub health: Health,
    /// When the lease expired (set while Unknown).
    pub unreachable_since: Option<Instant>,
    pub unreachable_since_wall: Option<jiff::Timestamp>,
    pub transition_wall: jiff::Timestamp,
    /// The Node object as the region writes it (labels, capacity, info).
    pub node: NodeRecord,
    pub usage: Option<NodeUsage>,
    pub next_summary: Instant,
    /// The Node object exists in the global API.
    pub created: bool,
    /// The annotations last written to it (`None`: not known to be written): a
    /// summary whose annotations have not changed writes only the status.
    pub written_annotations: Option<BTreeMap<String, String>>,
}

/// When a node newly known here writes its first periodic summary: between half
/// and one and a half intervals from now, at a point fixed by its name. Nodes that
/// join together (a fleet's bring-up: 100,000 in a minute) would otherwise write
/// their summaries together, every interval, in a wave the global API cannot take
/// besides everything else; spread, they come at an even rate.
pub fn first_summary(name: &str, now: Instant, interval: Duration) -> Instant {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    name.hash(&mut h);
    // The top 53 bits of the hash as a fraction in [0, 1).
    let frac = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
    now + interval.mul_f64(0.5 + frac)
}

#[derive(Clone)]
pub struct CachedPod {
    pub node: String,
    pub namespace: String,
    pub name: String,
    pub json: Bytes,
    /// Marked for rescheduling (NodeLost) or being deleted: not desired any more.
    pub gone: bool,
    pub marked: bool,
    /// `None` inside: never reschedule; outer `None`: the default grace.
    pub grace: Option<Option<Duration>>,
    /// Hash of what the agent acts on (spec, labels, annotations): a status-only
    /// change — most watch events, our own uploads echoing back — keeps it.
    pub desired: u64,
    /// The ConfigMaps and Secrets the pod references, as last resolved.
    pub refs: std::sync::Arc<Vec<meridian_proto::PodRef>>,
}

#[derive(Default)]
pub struct Pods {
    pub by_uid: HashMap<String, CachedPod>,
    pub by_node: HashMap<String, BTreeSet<String>>,
}

impl Pods {
    pub fn insert(&mut self, uid: String, p: CachedPod) -> Option<String> {
        let old_node = self.remove(&uid);
        self.by_node
            .entry(p.node.clone())
            .or_default()
            .insert(uid.clone());
        self.by_uid.insert(uid, p);
        old_node
    }

    pub fn remove(&mut self, uid: &str) -> Option<String> {
        let old = self.by_uid.remove(uid)?;
        if let Some(set) = self.by_node.get_mut(&old.node) {
            set.remove(uid);
            if set.is_empty() {
                self.by_node.remove(&old.node);
            }
        }
        Some(old.node)
    }
}

/// What waits to be written to the global API.
#[derive(Default)]
pub struct Upload {
    /// uid -> (namespace, name, status JSON)
    pub statuses: HashMap<String, (String, String, serde_json::Value)>,
    pub events: Vec<(String, PodEvent)>,
    pub nodes: HashSet<String>,
}

pub struct Shared {
    pub cfg: RegionConfig,
    pub store: DynStore,
    pub client: kube::Client,
    pub nodes: Mutex<HashMap<String, NodeEntry>>,
    pub pods: Mutex<Pods>,
    pub upload: Mutex<Upload>,
    pub upload_notify: Notify,
    pub logs: Mutex<HashMap<u64, mpsc::Sender<LogChunk>>>,
    /// Open `kubectl exec` sessions: where each one's output goes.
    pub execs: Mutex<HashMap<u64, mpsc::Sender<meridian_proto::ExecOutput>>>,
    pub next_id: AtomicU64,
    pub global_ok: AtomicBool,
    pub partitioned: AtomicBool,
    /// Bounds the global API calls made while agents register, so a wave of
    /// registrations cannot open thousands of connections to the global API.
    pub register_calls: tokio::sync::Semaphore,
    pub metrics: crate::http::Metrics,
    /// Pods whose eviction risk control refused, by uid: not tried again before.
    pub evict_hold: Mutex<HashMap<String, std::time::Instant>>,
    /// The edge image service (pull-through cache) on the region's port.
    pub images: std::sync::Arc<crate::images::ImageCache>,
    /// Image pre-pulls in progress on this region's nodes.
    pub prepulls: Mutex<crate::prepull::PrePulls>,
    /// Pods (uid) whose ConfigMaps/Secrets must be (re)fetched: `refs::run`.
    pub refs_tx: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<String>>,
}

/// Locks one of the region's tables. Where a function holds more than one at a
/// time it takes them in this order, or two tasks can each hold one and wait for
/// the other forever (seen under load: the pod watch holding `pods` and asking
/// `nodes`, the EdgeCluster refresh the other way round, and the region silent
/// from then on): `nodes`, `evict_hold`, `pods`, `upload`.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) const NODE_PREFIX: &str = "/nodes/";
const POD_PREFIX: &str = "/pods/";
pub const LEASES_KEY: &str = "/leases";

pub fn pod_grace(pod: &Pod) -> Option<Option<Duration>> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(GRACE_ANNOTATION))
        .and_then(|g| parse_grace(g))
}

/// What the region keeps of a pod (in memory and in its store) and sends to its
/// node: the pod without its status, but for the phase and reason, which say
/// whether the region marked it lost. Agents act on metadata and spec; the global
/// status (conditions, container statuses, addresses), the larger half of a running
/// pod, was kept for nothing: 100,000 pods a region.
#[derive(serde::Serialize)]
struct Kept<'a> {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    metadata: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    #[serde(skip_serializing_if = "Option::is_none")]
    spec: Option<&'a k8s_openapi::api::core::v1::PodSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<KeptStatus<'a>>,
}

#[derive(serde::Serialize)]
struct KeptStatus<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    phase: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

impl<'a> Kept<'a> {
    fn of(pod: &'a Pod) -> Self {
        Kept {
            api_version: "v1",
            kind: "Pod",
            metadata: &pod.metadata,
            spec: pod.spec.as_ref(),
            status: pod.status.as_ref().map(|s| KeptStatus {
                phase: s.phase.as_deref(),
                reason: s.reason.as_deref(),
            }),
        }
    }
}

impl CachedPod {
    pub fn from_pod(pod: &Pod) -> Option<(String, CachedPod)> {
        let uid = pod.metadata.uid.clone()?;
        let node = pod.spec.as_ref()?.node_name.clone()?;
        let marked = pod.status.as_ref().and_then(|s| s.reason.as_deref()) == Some(NODE_LOST);
        let json = Bytes::from(serde_json::to_vec(&Kept::of(pod)).ok()?);
        Some((
            uid,
            CachedPod {
                node,
                namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                name: pod.metadata.name.clone().unwrap_or_default(),
                json,
                gone: marked || pod.metadata.deletion_timestamp.is_some(),
                marked,
                grace: pod_grace(pod),
                desired: {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    let m = &pod.metadata;
                    serde_json::to_vec(&(&pod.spec, &m.labels, &m.annotations))
                        .unwrap_or_default()
                        .hash(&mut h);
                    h.finish()
                },
                refs: Default::default(),
            },
        ))
    }
}

impl Shared {
    pub fn new(
        cfg: RegionConfig,
        store: DynStore,
        client: kube::Client,
        images: std::sync::Arc<crate::images::ImageCache>,
    ) -> Self {
        Self {
            images,
            refs_tx: Default::default(),
            prepulls: Default::default(),
            cfg,
            store,
            client,
            nodes: Default::default(),
            pods: Default::default(),
            upload: Default::default(),
            evict_hold: Default::default(),
            upload_notify: Notify::new(),
            logs: Default::default(),
            execs: Default::default(),
            next_id: AtomicU64::new(1),
            global_ok: AtomicBool::new(false),
            partitioned: AtomicBool::new(false),
            register_calls: tokio::sync::Semaphore::new(16),
            metrics: Default::default(),
        }
    }

    /// Loads the node registry, leases and pod cache from the region store.
    pub async fn load(&self) -> Result<(), RegionError> {
        let now = Instant::now();
        let wall = jiff::Timestamp::now();
        let leases: HashMap<String, i64> = self
            .store
            .get(LEASES_KEY)
            .await?
            .and_then(|kv| serde_json::from_slice(&kv.value).ok())
            .unwrap_or_default();
        let nodes = self.store.range(NODE_PREFIX, None, 0).await?.kvs;
        {
            let mut map = lock(&self.nodes);
            for kv in nodes {
                let Ok(node) = serde_json::from_slice::<Node>(&kv.value) else {
                    continue;
                };
                let name = kv.key[NODE_PREFIX.len()..].to_owned();
                let age_ms = leases
                    .get(&name)
                    .map(|ms| (wall.as_millisecond() - ms).max(0) as u64)
                    .unwrap_or(0);
                let last_seen = now
                    .checked_sub(Duration::from_millis(age_ms))
                    .unwrap_or(now);
                let next_summary = first_summary(&name, now, self.cfg.summary_interval);
                map.insert(
                    name,
                    NodeEntry {
                        session: None,
                        last_seen,
                        health: Health::Ready,
                        unreachable_since: None,
                        unreachable_since_wall: None,
                        transition_wall: wall,
                        node: NodeRecord::from_node(&node),
                        usage: None,
                        next_summary,
                        created: true,
                        written_annotations: None,
                    },
                );
            }
        }
        let pods = self.store.range(POD_PREFIX, None, 0).await?.kvs;
        let mut cache = lock(&self.pods);
        for kv in pods {
            if let Ok(pod) = serde_json::from_slice::<Pod>(&kv.value)
                && let Some((uid, p)) = CachedPod::from_pod(&pod)
            {
                cache.insert(uid, p);
            }
        }
        tracing::info!(
            region = %self.cfg.name,
            nodes = lock(&self.nodes).len(),
            pods = cache.by_uid.len(),
            "loaded region cache"
        );
        Ok(())
    }

    /// The region the global API lists `node` under: `Some(None)` when the node
    /// or its label does not exist, `None` when the global API cannot say (3 s).
    pub async fn owner_in_global(&self, node: &str) -> Option<Option<String>> {
        let api: kube::Api<Node> = kube::Api::all(self.client.clone());
        match tokio::time::timeout(Duration::from_secs(3), api.get_opt(node)).await {
            Ok(Ok(n)) => Some(n.and_then(|n| n.metadata.labels?.remove(crate::REGION_LABEL))),
            _ => None,
        }
    }

    pub async fn persist_node(&self, name: &str, node: &Node) {
        if let Ok(json) = serde_json::to_vec(node) {
            let key = format!("{NODE_PREFIX}{name}");
            if let Err(e) = self.store.txn(Txn::new().put(key, json)).await {
                tracing::error!(node = name, "cannot persist node: {e}");
            }
        }
    }

    /// Writes pod cache changes through to the region store, lazily (see
    /// [`Txn::lazy`]): on disk with the next durable commit or within
    /// `meridian_store::LAZY_FLUSH`. The cache is a copy of the global API's pods,
    /// read again whole when the region starts, so a crash loses at most that
    /// window's changes, and only while the global API is also unreachable. A
    /// durable commit per watch batch was half of a region's CPU at 200,000 pods
    /// (`perf`: redb writing the same B-tree pages again every commit).
    pub async fn persist_pods(&self, puts: Vec<(String, Bytes)>, deletes: Vec<String>) {
        if puts.is_empty() && deletes.is_empty() {
            return;
        }
        // A batch may hold several versions of a pod: the last one counts, and a
        // deletion beats them all (a transaction writes each key once).
        let mut last: HashMap<String, Bytes> = HashMap::with_capacity(puts.len());
        for (uid, json) in puts {
            last.insert(uid, json);
        }
        let deletes: HashSet<String> = deletes.into_iter().collect();
        let mut txn = Txn::new().lazy();
        for (uid, json) in last {
            if !deletes.contains(&uid) {
                txn = txn.put(format!("{POD_PREFIX}{uid}"), json);
            }
        }
        for uid in deletes {
            txn = txn.delete(format!("{POD_PREFIX}{uid}"));
        }
        if let Err(e) = self.store.txn(txn).await {
            tracing::error!("cannot persist pod cache: {e}");
        }
    }

    /// The pods `node` should run, from the cache.
    fn wanted(&self, node: &str) -> Vec<Want> {
        let pods = lock(&self.pods);
        let Some(uids) = pods.by_node.get(node) else {
            return Vec::new();
        };
        uids.iter()
            .filter_map(|u| {
                let p = pods.by_uid.get(u)?;
                (!p.gone).then(|| Want {
                    uid: u.clone(),
                    desired: p.desired,
                    json: p.json.clone(),
                    refs: p.refs.clone(),
                })
            })
            .collect()
    }

    pub fn desired_for(&self, node: &str) -> DesiredPods {
        DesiredPods {
            pods: self.wanted(node).iter().map(Want::pod).collect(),
        }
    }

    /// Sends the full desired set to a stream that has just registered: what a
    /// stream that takes changes is told first, and what they are relative to.
    pub fn send_first_desired(
        &self,
        node: &str,
        tx: &SessionTx,
        told: Option<&std::sync::Arc<Mutex<Told>>>,
    ) {
        let mut told = told.map(|t| lock(t));
        let want = self.wanted(node);
        let msg = RegionMessage {
            msg: Some(region_message::Msg::Desired(DesiredPods {
                pods: want.iter().map(Want::pod).collect(),
            })),
        };
        // The channel holds at most the welcome so far.
        let sent = tx.try_send(msg).is_ok();
        if let Some(told) = told.as_mut() {
            **told = if sent {
                Told::Sent(sent_of(&want))
            } else {
                Told::Lost
            };
        }
    }

    /// Pushes what changed in the desired set to a node's agent, if it is
    /// connected: only the changes to an agent that takes them, else the full set.
    pub fn push_desired(&self, node: &str) {
        let Some((tx, told)) = lock(&self.nodes)
            .get(node)
            .and_then(|n| n.session.as_ref().map(|s| (s.tx.clone(), s.told.clone())))
        else {
            return;
        };
        let Some(told) = told else {
            let msg = RegionMessage {
                msg: Some(region_message::Msg::Desired(self.desired_for(node))),
            };
            if tx.try_send(msg).is_err() {
                // The agent is slow or gone; it gets the full set again on reconnect.
                tracing::debug!(node, "desired set not delivered (stream full or closed)");
            }
            return;
        };
        // Held until the message is queued: two pushes for one node cannot
        // reorder, and what is recorded as told is what went.
        let mut told = lock(&told);
        let want = self.wanted(node);
        // Lost until the message below is queued.
        let (msg, now) = match std::mem::replace(&mut *told, Told::Lost) {
            // Registration sends the full set; it will carry this change.
            Told::NotYet => {
                *told = Told::NotYet;
                return;
            }
            Told::Lost => {
                let pods = want.iter().map(Want::pod).collect();
                (
                    region_message::Msg::Desired(DesiredPods { pods }),
                    sent_of(&want),
                )
            }
            Told::Sent(prev) => {
                let (delta, now) = changes(prev, &want);
                if delta.upserts.is_empty() && delta.removed.is_empty() {
                    *told = Told::Sent(now);
                    return;
                }
                (region_message::Msg::Changes(delta), now)
            }
        };
        if tx.try_send(RegionMessage { msg: Some(msg) }).is_ok() {
            *told = Told::Sent(now);
        } else {
            // Slow or gone: a lost change would leave the agent wrong, so the next
            // push sends the full set (and a new stream starts with one).
            *told = Told::Lost;
            tracing::debug!(
                node,
                "desired changes not delivered (stream full or closed)"
            );
        }
    }

    pub fn mark_node_dirty(&self, node: &str) {
        lock(&self.upload).nodes.insert(node.to_owned());
        self.upload_notify.notify_one();
    }

    pub fn close_sessions(&self) {
        for n in lock(&self.nodes).values_mut() {
            n.session = None;
        }
    }

    pub fn session_count(&self) -> usize {
        lock(&self.nodes)
            .values()
            .filter(|n| n.session.is_some())
            .count()
    }

    pub fn is_global_ok(&self) -> bool {
        self.global_ok.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_that_join_together_write_their_first_summaries_spread_over_an_interval() {
        let (now, every) = (Instant::now(), Duration::from_secs(300));
        let mut per_minute = [0usize; 5];
        for i in 0..10_000 {
            let name = format!("edge-{i}");
            let at = first_summary(&name, now, every) - now;
            assert!(at >= every / 2 && at < every * 3 / 2, "{name}: {at:?}");
            assert_eq!(
                first_summary(&name, now, every) - now,
                at,
                "fixed by the name"
            );
            per_minute[((at - every / 2).as_secs() / 60) as usize] += 1;
        }
        // An even spread: each minute of the five holds about a fifth of them.
        for n in per_minute {
            assert!((1_800..2_200).contains(&n), "{per_minute:?}");
        }
    }

    #[test]
    fn a_cached_pod_keeps_metadata_spec_and_whether_it_was_lost_but_not_the_status() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "acme.shop", "uid": "u1",
                "labels": {"app": "web"}, "annotations": {(GRACE_ANNOTATION): "never"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]},
            "status": {"phase": "Failed", "reason": NODE_LOST, "podIP": "10.0.0.9",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [{"name": "c", "image": "busybox", "imageID": "",
                    "ready": false, "restartCount": 3}]}
        }))
        .unwrap();
        let (uid, cached) = CachedPod::from_pod(&pod).unwrap();
        assert_eq!(uid, "u1");
        assert!(cached.marked && cached.gone);
        assert_eq!(
            cached.grace,
            Some(None),
            "the never-reschedule annotation is kept"
        );
        let kept: Pod = serde_json::from_slice(&cached.json).unwrap();
        assert_eq!(kept.metadata, pod.metadata);
        assert_eq!(kept.spec, pod.spec);
        let st = kept.status.as_ref().unwrap();
        assert_eq!(st.phase.as_deref(), Some("Failed"));
        assert!(st.conditions.is_none() && st.container_statuses.is_none() && st.pod_ip.is_none());
        // Loaded back from the region's store, it is still the lost pod it was.
        let (_, again) = CachedPod::from_pod(&kept).unwrap();
        assert!(again.marked);
        assert_eq!(again.desired, cached.desired);
        assert_eq!(again.json, cached.json);
    }
}
