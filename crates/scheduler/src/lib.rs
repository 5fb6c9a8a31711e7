//! The global scheduler: binds pending pods to nodes across the whole fleet.
//!
//! A loop over two reflectors (Nodes, Pods): every tick it applies the pod changes
//! the watch delivered since the last one to its fleet (allocatable minus what is
//! bound; a relist reconciles it with every pod), places the pending pods oldest
//! first with the [`engine`], and binds them through `pods/binding`. A pod that fits
//! nowhere gets `PodScheduled=False, reason=Unschedulable` and a `FailedScheduling`
//! Event counting the causes.

pub mod engine;
pub mod policy;
mod queue;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use meridian_api::meridian::{self as mapi, PlacementPolicy, RESCHEDULE_GRACE_ANNOTATION};
use meridian_api::owners::controller_of;
use serde_json::json;

use engine::{Fleet, NodeInfo, Placement, PodRequest};
use policy::PolicyRules;
use queue::{Queue, Seen, Templates, Waiting};

/// Bindings per bulk request, and bulk requests in flight.
const BULK: usize = 500;
const BULK_CONCURRENCY: usize = 8;
/// Single binding requests in flight when bulk binding is not available.
const BIND_CONCURRENCY: usize = 128;

/// Placement work per tick before the placed pods are bound.
const PLACE_BUDGET: Duration = Duration::from_millis(500);

/// Scheduler names this scheduler serves.
pub const SCHEDULER_NAMES: &[&str] = &["default-scheduler", "meridian"];

/// What a reflector can keep.
pub trait Reflected:
    kube::Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl<K> Reflected for K where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

/// A store kept up to date by a watch of every `K` (used by the controllers too).
pub fn reflect<K: Reflected>(client: &kube::Client) -> Store<K> {
    reflect_slim(client, |_| {})
}

/// [`reflect`], each object passed through `slim` before it is kept.
pub fn reflect_slim<K: Reflected>(client: &kube::Client, slim: fn(&mut K)) -> Store<K> {
    let (store, writer) = reflector::store::<K>();
    let api: Api<K> = Api::all(client.clone());
    tokio::spawn(
        reflector(
            writer,
            watcher(api, watcher::Config::default()).modify(slim),
        )
        .default_backoff()
        .for_each(|_| async {}),
    );
    store
}

/// The nodes, kept by a reflector, and the names of the nodes each of its
/// events touched (`None`: a relist ended, every node may have changed).
fn reflect_nodes(
    client: &kube::Client,
) -> (
    Store<Node>,
    tokio::sync::mpsc::UnboundedReceiver<Option<String>>,
) {
    let (store, writer) = reflector::store::<Node>();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let api: Api<Node> = Api::all(client.clone());
    tokio::spawn(
        reflector(
            writer,
            watcher(api, watcher::Config::default()).modify(engine::slim_node),
        )
        .default_backoff()
        .for_each(move |ev| {
            let name = match ev {
                Ok(
                    watcher::Event::Apply(n)
                    | watcher::Event::InitApply(n)
                    | watcher::Event::Delete(n),
                ) => Some(Some(n.metadata.name.unwrap_or_default())),
                Ok(watcher::Event::InitDone) => Some(None),
                Ok(watcher::Event::Init) | Err(_) => None,
            };
            if let Some(name) = name {
                let _ = tx.send(name);
            }
            futures::future::ready(())
        }),
    );
    (store, rx)
}

/// POSTs `{"items": items}` to the meridian.io bulk endpoint `plural`
/// (`bulkbindings`, `bulkpods`); the answer's items, in request order.
pub async fn bulk_post<T: serde::Serialize>(
    client: &kube::Client,
    plural: &str,
    items: &[T],
) -> Result<Vec<serde_json::Value>, kube::Error> {
    let body = serde_json::to_vec(&json!({ "items": items })).map_err(kube::Error::SerdeError)?;
    let req = http::Request::post(format!("/apis/{}/{}/{plural}", mapi::GROUP, mapi::VERSION))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(kube::Error::HttpError)?;
    let answer: serde_json::Value = client.request(req).await?;
    Ok(answer["items"].as_array().cloned().unwrap_or_default())
}

/// A change of one pod as the scheduler's watch delivered it.
enum PodEvent {
    Apply(Seen),
    /// The uid of a pod that is gone.
    Delete(String),
    /// A relist begins: pods not shown again before `InitDone` are gone.
    Init,
    InitDone,
}

/// The pods watch: its events in order (applied to the view each tick). No store
/// of typed pods is kept: the scheduler holds what it needs of each pod itself.
fn watch_pods(client: &kube::Client) -> tokio::sync::mpsc::UnboundedReceiver<PodEvent> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let api: Api<Pod> = Api::all(client.clone());
    let mut templates = Templates::default();
    tokio::spawn(
        watcher(
            api,
            watcher::Config::default().page_size(meridian_api::POD_LIST_PAGE),
        )
        .default_backoff()
        .for_each(move |ev| {
            let ev = match ev {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                    Some(PodEvent::Apply(templates.seen(p)))
                }
                Ok(watcher::Event::Delete(p)) => {
                    Some(PodEvent::Delete(p.metadata.uid.unwrap_or_default()))
                }
                Ok(watcher::Event::Init) => {
                    templates.clear();
                    Some(PodEvent::Init)
                }
                Ok(watcher::Event::InitDone) => Some(PodEvent::InitDone),
                Err(_) => None,
            };
            if let Some(ev) = ev {
                let _ = tx.send(ev);
            }
            futures::future::ready(())
        }),
    );
    rx
}

/// What the policy report reads of a live pod: its node, and its class's
/// template for namespace, labels and owner (shared by the class).
struct PodFacts {
    template: Arc<Pod>,
    node: Option<String>,
}

fn policy_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(mapi::GROUP, mapi::VERSION, "PlacementPolicy"),
        "placementpolicies",
    )
}

/// What the scheduler knows of a replica group (a ReplicaSet, Job, DaemonSet...).
#[derive(Clone)]
struct Group {
    /// The workload a policy names: (kind, name); a ReplicaSet of a Deployment
    /// is the Deployment.
    workload: (String, String),
    /// Replicas it wants (0 when unknown).
    size: i64,
}

/// A policy as stored, and compiled.
type Governing = (Arc<PlacementPolicy>, Arc<PolicyRules>);

/// Policies and workloads as of one tick; resolves which policy governs a pod.
struct Policies {
    /// Per namespace: (policy, compiled), sorted by name.
    by_ns: HashMap<String, Vec<Governing>>,
    groups: HashMap<String, Group>,
    /// Changes whenever a policy is created, changed or deleted.
    version: u64,
}

impl Policies {
    fn load(
        policies: &Store<DynamicObject>,
        compiled: &mut HashMap<String, Arc<PolicyRules>>,
        rs: &Store<ReplicaSet>,
        jobs: &Store<Job>,
    ) -> Policies {
        let mut by_ns: HashMap<String, Vec<Governing>> = HashMap::new();
        let mut live = std::collections::HashSet::new();
        let mut version = 0u64;
        for o in policies.state() {
            let Ok(p) =
                serde_json::to_value(&*o).and_then(serde_json::from_value::<PlacementPolicy>)
            else {
                continue;
            };
            // Compiled once per policy version (resolving areas is not free).
            let key = PolicyRules::key_of(&p);
            version ^= {
                use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
                BuildHasherDefault::<DefaultHasher>::default().hash_one(&key)
            };
            live.insert(key.clone());
            let rules = compiled
                .entry(key)
                .or_insert_with(|| Arc::new(PolicyRules::compile(&p)))
                .clone();
            by_ns
                .entry(p.metadata.namespace.clone().unwrap_or_default())
                .or_default()
                .push((Arc::new(p), rules));
        }
        compiled.retain(|k, _| live.contains(k));
        for v in by_ns.values_mut() {
            v.sort_by(|a, b| a.0.metadata.name.cmp(&b.0.metadata.name));
        }
        let mut groups = HashMap::new();
        if !by_ns.is_empty() {
            for r in rs.state() {
                let owner = controller_of(&r.metadata).filter(|o| o.kind == "Deployment");
                let workload = match owner {
                    Some(o) => ("Deployment".to_owned(), o.name.clone()),
                    None => (
                        "ReplicaSet".to_owned(),
                        r.metadata.name.clone().unwrap_or_default(),
                    ),
                };
                let size = r.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                groups.insert(
                    r.metadata.uid.clone().unwrap_or_default(),
                    Group {
                        workload,
                        size: i64::from(size),
                    },
                );
            }
            for j in jobs.state() {
                let size = j.spec.as_ref().and_then(|s| s.parallelism).unwrap_or(1);
                groups.insert(
                    j.metadata.uid.clone().unwrap_or_default(),
                    Group {
                        workload: ("Job".into(), j.metadata.name.clone().unwrap_or_default()),
                        size: i64::from(size),
                    },
                );
            }
        }
        Policies {
            by_ns,
            groups,
            version,
        }
    }

    /// The policy governing a pod (by workload name first, then by selector), and
    /// the size of its replica group.
    fn resolve(&self, p: &Pod) -> Option<(&Arc<PlacementPolicy>, &Arc<PolicyRules>, i64)> {
        let empty = std::collections::BTreeMap::new();
        self.resolve_parts(
            p.metadata.namespace.as_deref()?,
            p.metadata.labels.as_ref().unwrap_or(&empty),
            controller_of(&p.metadata),
        )
    }

    fn resolve_parts(
        &self,
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
        owner: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
    ) -> Option<(&Arc<PlacementPolicy>, &Arc<PolicyRules>, i64)> {
        let list = self.by_ns.get(namespace)?;
        let group = owner.and_then(|o| self.groups.get(&o.uid));
        let workload = match (group, owner) {
            (Some(g), _) => Some(g.workload.clone()),
            (None, Some(o)) => Some((o.kind.clone(), o.name.clone())),
            (None, None) => None,
        };
        let by_name = list.iter().find(|(pp, _)| {
            workload.as_ref().is_some_and(|(k, n)| {
                pp.spec
                    .workloads
                    .iter()
                    .any(|w| &w.kind == k && &w.name == n)
            })
        });
        let found = by_name.or_else(|| {
            list.iter().find(|(pp, _)| {
                pp.spec
                    .selector
                    .as_ref()
                    .is_some_and(|s| engine::selector_matches(s, labels))
            })
        })?;
        Some((&found.0, &found.1, group.map_or(0, |g| g.size)))
    }
}

/// The scheduler's fleet, kept across ticks: nodes are updated in place when only
/// their capacity or readiness changed (rebuilt when nodes come, go or change labels
/// or taints), and bound pods are bound and released as the watch shows them, each
/// pod's request computed once.
#[derive(Default)]
struct FleetView {
    fleet: Fleet,
    /// resourceVersion of each node as last applied.
    node_rv: HashMap<String, String>,
    /// Pods holding a place: uid -> (node, request).
    bound: HashMap<String, (String, Arc<PodRequest>)>,
    /// Placed this tick (already bound in the fleet), to record in `bound`.
    placed: Vec<(String, String, Arc<PodRequest>)>,
    /// When the fleet was last rebuilt from every node.
    rebuilt: Option<Instant>,
    /// Nodes came, went or changed labels or taints since: rebuild.
    rebuild_due: bool,
    /// How many times the fleet was rebuilt.
    rebuilds: u64,
}

/// Least time between two rebuilds of the fleet from every node.
const REBUILD_EVERY: Duration = Duration::from_secs(2);

impl FleetView {
    /// Brings the fleet up to date with the nodes the watch changed since the last
    /// call (`None`: every node may have, as after a relist); `false` when a
    /// rebuild is due but deferred (the fleet is known to be stale: place nothing
    /// on it this tick). Unchanged nodes cost nothing: walking 100,000 of them
    /// every tick was most of the scheduler's own CPU.
    fn sync_nodes(&mut self, nodes: &Store<Node>, changed: Option<HashSet<String>>) -> bool {
        let mut updates = Vec::new();
        // A relist (the watch fell behind or reconnected past the server's event
        // window): look at every node, but only those that changed cost anything.
        // A rebuild rebinds every pod (seconds at a million), so a relist that
        // changed no node's labels or set of nodes must not cause one.
        let names = changed.unwrap_or_else(|| {
            let mut all: HashSet<String> = nodes
                .state()
                .iter()
                .filter_map(|n| n.metadata.name.clone())
                .collect();
            all.extend(self.node_rv.keys().cloned());
            all
        });
        for name in names {
            if self.rebuild_due {
                break;
            }
            let Some(n) = nodes.get(&ObjectRef::new(&name)) else {
                // Gone.
                self.rebuild_due |= self.node_rv.contains_key(&name);
                continue;
            };
            let rv = n.metadata.resource_version.as_deref().unwrap_or_default();
            match self.node_rv.get(&name) {
                None => self.rebuild_due = true,
                Some(old) if old != rv => {
                    let info = NodeInfo::from_node(&n);
                    match self.fleet.node(&name) {
                        Some(cur) if cur.labels == info.labels && cur.taints == info.taints => {
                            updates.push((info, rv.to_owned()))
                        }
                        _ => self.rebuild_due = true,
                    }
                }
                Some(_) => {}
            }
        }
        // A rebuild reads every node (100,000 while a fleet joins: most of the
        // server's CPU when it ran on every tick); at most one per REBUILD_EVERY, and
        // the nodes that changed meanwhile wait for it.
        if self.rebuild_due {
            if self.rebuilt.is_some_and(|t| t.elapsed() < REBUILD_EVERY) {
                return false;
            }
            let nodes = nodes.state();
            self.rebuild_due = false;
            self.rebuilt = Some(Instant::now());
            self.rebuilds += 1;
            self.fleet = Fleet::new(nodes.iter().map(|n| NodeInfo::from_node(n)).collect());
            for (node, req) in self.bound.values() {
                self.fleet.bind(node, req);
            }
            self.node_rv = nodes
                .iter()
                .map(|n| {
                    (
                        n.metadata.name.clone().unwrap_or_default(),
                        n.metadata.resource_version.clone().unwrap_or_default(),
                    )
                })
                .collect();
        } else {
            for (info, rv) in updates {
                if let Some(old) = self.node_rv.get_mut(&info.name) {
                    *old = rv;
                }
                self.fleet.update_node(info);
            }
        }
        true
    }

    /// A pod the watch shows bound to `node`.
    fn bound(&mut self, uid: &str, node: &str, request: impl FnOnce() -> PodRequest) {
        match self.bound.get(uid) {
            Some((n, _)) if n == node => {}
            Some((n, req)) => {
                let req = req.clone();
                self.fleet.unbind(n, &req);
                self.fleet.bind(node, &req);
                self.bound.insert(uid.to_owned(), (node.to_owned(), req));
            }
            None => {
                let req = Arc::new(request());
                self.fleet.bind(node, &req);
                self.bound.insert(uid.to_owned(), (node.to_owned(), req));
            }
        }
    }

    /// A pod that no longer holds a place (gone, finished, or its binding never
    /// showed up).
    fn unbind(&mut self, uid: &str) {
        if let Some((node, req)) = self.bound.remove(uid) {
            self.fleet.unbind(&node, &req);
        }
    }

    fn forget_unseen(&mut self, seen: &std::collections::HashSet<String>) {
        let fleet = &mut self.fleet;
        self.bound.retain(|uid, (node, req)| {
            let keep = seen.contains(uid);
            if !keep {
                fleet.unbind(node, req);
            }
            keep
        });
    }

    fn commit_placed(&mut self) {
        for (uid, node, req) in self.placed.drain(..) {
            self.bound.insert(uid, (node, req));
        }
    }
}

/// Runs the scheduler until the task is dropped.
pub async fn run(client: kube::Client) {
    let (nodes, mut node_events) = reflect_nodes(&client);
    let mut pod_events = watch_pods(&client);
    let replicasets: Store<ReplicaSet> = reflect(&client);
    let jobs: Store<Job> = reflect(&client);
    let ar = policy_resource();
    let policy_writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
    let policies = policy_writer.as_reader();
    let policy_api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    tokio::spawn(
        reflector(
            policy_writer,
            watcher(policy_api, watcher::Config::default()),
        )
        .default_backoff()
        .for_each(|_| async {}),
    );
    if nodes.wait_until_ready().await.is_err()
        || replicasets.wait_until_ready().await.is_err()
        || jobs.wait_until_ready().await.is_err()
        || policies.wait_until_ready().await.is_err()
    {
        return;
    }
    let mut compiled: HashMap<String, Arc<PolicyRules>> = HashMap::new();
    let mut last_report = Instant::now();
    // Pods bound by us that the watch has not shown bound yet.
    let mut inflight: HashMap<String, Inflight> = HashMap::new();
    // When each binding was sent, oldest first, to find those that never showed up.
    let mut expiry: std::collections::VecDeque<(Instant, String)> = Default::default();
    // Pods waiting for a node (ours to schedule) and not in flight.
    let mut queue = Queue::default();
    // During a relist: every pod it has shown so far.
    let mut relist: Option<std::collections::HashSet<String>> = None;
    let mut view = FleetView::default();
    // Every live pod, as the policy report needs it.
    let mut facts: HashMap<String, PodFacts> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut slow = SlowTicks::default();
    loop {
        tick.tick().await;
        let began = Instant::now();
        let mut changed = Some(HashSet::new());
        while let Ok(ev) = node_events.try_recv() {
            match (ev, changed.as_mut()) {
                (Some(name), Some(set)) => {
                    set.insert(name);
                }
                (None, _) => changed = None,
                (Some(_), None) => {}
            }
        }
        let fresh = view.sync_nodes(&nodes, changed);
        let synced = began.elapsed();
        let pol = Policies::load(&policies, &mut compiled, &replicasets, &jobs);
        let request = |p: &Pod| {
            let mut r = PodRequest::from_pod(p);
            if let Some((_, rules, size)) = pol.resolve(p) {
                r.policy = Some(rules.clone());
                r.group_size = size;
            }
            r
        };
        // What changed since the last tick, not a walk over every pod.
        while let Ok(ev) = pod_events.try_recv() {
            match ev {
                PodEvent::Init => relist = Some(Default::default()),
                PodEvent::InitDone => {
                    if let Some(seen) = relist.take() {
                        queue.retain(|uid| seen.contains(uid));
                        inflight.retain(|uid, _| seen.contains(uid));
                        view.forget_unseen(&seen);
                        facts.retain(|uid, _| seen.contains(uid));
                    }
                }
                PodEvent::Delete(uid) => {
                    facts.remove(&uid);
                    queue.remove(&uid);
                    inflight.remove(&uid);
                    view.unbind(&uid);
                }
                PodEvent::Apply(p) => {
                    let uid = p.uid.clone();
                    if let Some(seen) = relist.as_mut() {
                        seen.insert(uid.clone());
                    }
                    if p.finished {
                        facts.remove(&uid);
                        queue.remove(&uid);
                        inflight.remove(&uid);
                        view.unbind(&uid);
                        continue;
                    }
                    facts.insert(
                        uid.clone(),
                        PodFacts {
                            template: p.template.clone(),
                            node: p.node.clone(),
                        },
                    );
                    match p.node.as_deref() {
                        Some(n) => {
                            queue.remove(&uid);
                            inflight.remove(&uid);
                            view.bound(&uid, n, || request(&p.template));
                        }
                        None => {
                            let name = p
                                .template
                                .spec
                                .as_ref()
                                .and_then(|s| s.scheduler_name.as_deref())
                                .unwrap_or("default-scheduler");
                            if !SCHEDULER_NAMES.contains(&name) {
                                continue;
                            }
                            match inflight.get_mut(&uid) {
                                // Bound by us, the watch not there yet: the pod
                                // waits for the binding, not in the queue.
                                Some(f) => f.template = p.template,
                                None => queue.push_seen(p),
                            }
                        }
                    }
                }
            }
        }
        let drained = began.elapsed();
        // A binding that never showed up: release its place and try again.
        // (Oldest first: a tick looks at the expired ones only.)
        let now = Instant::now();
        while let Some((since, _)) = expiry.front()
            && now.duration_since(*since) >= INFLIGHT_TIMEOUT
        {
            let Some((since, uid)) = expiry.pop_front() else {
                break;
            };
            if inflight.get(&uid).is_some_and(|f| f.since == since)
                && let Some(f) = inflight.remove(&uid)
            {
                view.unbind(&uid);
                queue.put_back(f.template, f.waiting);
            }
        }
        if !fresh {
            // Nodes came or went and the fleet is rebuilt at most every
            // REBUILD_EVERY: placing now would use a fleet known to be stale.
            let d = began.elapsed();
            slow.tick([synced, drained, d, d, d], 0, queue.len(), view.bound.len());
            continue;
        }
        let fleet = &mut view.fleet;
        if last_report.elapsed() >= Duration::from_secs(2) {
            last_report = Instant::now();
            report_policies(&client, &pol, &facts, fleet).await;
        }
        if queue.is_empty() {
            let d = began.elapsed();
            slow.tick([synced, drained, d, d, d], 0, 0, view.bound.len());
            continue;
        }
        tracing::debug!(waiting = queue.len(), inflight = inflight.len(), "placing");
        let mut binds = Vec::new();
        let mut failures = Vec::new();
        // Bind what is placed at least every PLACE_BUDGET: pods on the general path
        // cost O(nodes) each, and 20,000 replacements at once would otherwise hold
        // every binding back for minutes. The rest wait for the next tick, oldest first.
        let placing = Instant::now();
        // Classes found unschedulable wait until something changed that may let
        // them fit (each try of a pod that fits nowhere costs a pass over the fleet).
        let generation = (view.rebuilds, view.fleet.changes(), pol.version);
        for key in queue.classes(generation) {
            if placing.elapsed() > PLACE_BUDGET {
                break;
            }
            let Some((template, pods)) = queue.take(&key) else {
                continue;
            };
            let mut unschedulable = false;
            let req = request(&template);
            let grace = req.policy.as_ref().and_then(|r| r.reschedule_grace.clone());
            let placed = view.fleet.place_class(&req, pods.len());
            let req_arc = Arc::new(req);
            for (mut w, placement) in pods.into_iter().zip(placed) {
                match placement {
                    Placement::Node(n) => {
                        view.placed
                            .push((w.uid.clone(), n.clone(), req_arc.clone()));
                        binds.push(Bind {
                            uid: w.uid.clone(),
                            namespace: w.namespace.clone(),
                            name: w.name.clone(),
                            node: n.clone(),
                            grace: grace.clone(),
                        });
                        expiry.push_back((now, w.uid.clone()));
                        inflight.insert(
                            w.uid.clone(),
                            Inflight {
                                since: now,
                                template: template.clone(),
                                waiting: w,
                            },
                        );
                    }
                    Placement::Unschedulable(msg) => {
                        if w.unschedulable.as_deref() != Some(msg.as_str()) {
                            failures.push((w.clone(), msg.clone()));
                            w.unschedulable = Some(msg);
                        }
                        queue.put_back(template.clone(), w);
                        unschedulable = true;
                    }
                }
            }
            if unschedulable {
                queue.park(&key, generation);
            } else {
                queue.unpark(&key);
            }
        }
        view.commit_placed();
        let placed = began.elapsed();
        let bound_n = binds.len();
        let client = &client;
        // Bindings refused (the pod is gone, changed, or being deleted): their
        // places are free again at once, and the pods are placed anew if the
        // watch still shows them waiting.
        for uid in bind_all(client, binds).await {
            if let Some(f) = inflight.remove(&uid) {
                view.unbind(&uid);
                queue.put_back(f.template, f.waiting);
            }
        }
        let sent = began.elapsed();
        futures::stream::iter(failures)
            .for_each_concurrent(16, |(w, msg)| async move {
                report_unschedulable(client, &w, &msg).await;
            })
            .await;
        slow.tick(
            [synced, drained, placed, sent, began.elapsed()],
            bound_n,
            queue.len(),
            view.bound.len(),
        );
    }
}

/// Ticks slower than this are reported (at most every [`SLOW_REPORT_EVERY`]):
/// a pod waits for its tick, so a slow one shows in every pod's startup.
const SLOW_TICK: Duration = Duration::from_secs(1);
const SLOW_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Counts slow ticks and reports the slowest of each period, stage by stage.
#[derive(Default)]
struct SlowTicks {
    count: u64,
    /// The slowest since the last report: cumulative times at the end of
    /// each stage (nodes synced, events drained, placed, bound, all), pods bound,
    /// waiting, bound in all.
    worst: Option<([Duration; 5], usize, usize, usize)>,
    reported: Option<Instant>,
}

impl SlowTicks {
    fn tick(&mut self, at: [Duration; 5], bound: usize, waiting: usize, holding: usize) {
        if at[4] < SLOW_TICK {
            return;
        }
        self.count += 1;
        if self.worst.is_none_or(|w| w.0[4] < at[4]) {
            self.worst = Some((at, bound, waiting, holding));
        }
        if self
            .reported
            .is_some_and(|t| t.elapsed() < SLOW_REPORT_EVERY)
        {
            return;
        }
        if let Some((at, bound, waiting, holding)) = self.worst.take() {
            let ms = |d: Duration| d.as_millis();
            tracing::warn!(
                slow_ticks = self.count,
                worst_ms = ms(at[4]),
                sync_nodes_ms = ms(at[0]),
                pod_events_ms = ms(at[1] - at[0]),
                place_ms = ms(at[2] - at[1]),
                bind_ms = ms(at[3] - at[2]),
                report_ms = ms(at[4] - at[3]),
                bound,
                waiting,
                holding,
                "scheduler ticks slower than {}s",
                SLOW_TICK.as_secs()
            );
        }
        self.count = 0;
        self.reported = Some(Instant::now());
    }
}

/// A pod we bound that the watch has not shown bound yet.
struct Inflight {
    since: Instant,
    /// Its class's template and its place in the queue, to put it back if the
    /// binding fails or never shows up.
    template: Arc<Pod>,
    waiting: Waiting,
}

/// A pod, its node, and the reschedule grace to annotate it with.
struct Bind {
    uid: String,
    namespace: String,
    name: String,
    node: String,
    grace: Option<String>,
}

/// How long a pod we bound may take to show up bound in the watch before its
/// place is released and it is placed again. A bulk answer already tells which
/// bindings failed; this covers a lost answer. A loaded server's watch can lag by
/// many seconds: at 10 s, pods a lagging watch still showed pending were placed
/// again and their bindings refused as already assigned, over and over.
const INFLIGHT_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether a refused binding means the pod is bound already (by us, as the watch
/// will show).
fn already_bound(message: &str) -> bool {
    message.contains("is already assigned to node")
}

/// Binds pods in bulk (`bulkbindings`: one request and, mostly, one store
/// transaction per chunk); a chunk whose request fails is bound one pod at a time.
/// Returns the uids of the pods whose binding was refused.
async fn bind_all(client: &kube::Client, binds: Vec<Bind>) -> Vec<String> {
    let mut chunks: Vec<Vec<Bind>> = Vec::new();
    let mut binds = binds.into_iter().peekable();
    while binds.peek().is_some() {
        chunks.push(binds.by_ref().take(BULK).collect());
    }
    let refused = std::sync::Mutex::new(Vec::new());
    let refuse = |b: &Bind| {
        refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(b.uid.clone());
    };
    futures::stream::iter(chunks)
        .for_each_concurrent(BULK_CONCURRENCY, |chunk| async move {
            let items: Vec<serde_json::Value> = chunk
                .iter()
                .map(|b| {
                    let mut it = json!({
                        "namespace": b.namespace, "name": b.name, "node": b.node,
                    });
                    if let Some(g) = &b.grace {
                        it["metadata"] = json!({"annotations": {RESCHEDULE_GRACE_ANNOTATION: g}});
                    }
                    it
                })
                .collect();
            match bulk_post(client, "bulkbindings", &items).await {
                Ok(items) => {
                    for (b, it) in chunk.iter().zip(&items) {
                        let message = it["message"].as_str().unwrap_or_default();
                        if it["status"] != "Success" && !already_bound(message) {
                            tracing::debug!(pod = %it["name"], reason = %it["reason"], "bind failed: {message}");
                            refuse(b);
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!("bulk binding unavailable ({e}); binding one by one");
                    futures::stream::iter(chunk)
                        .for_each_concurrent(BIND_CONCURRENCY, |b| async move {
                            if let Err(e) = bind(client, &b).await
                                && !already_bound(&e.to_string())
                            {
                                tracing::warn!(pod = %b.name, node = %b.node, "bind failed: {e}");
                                refuse(&b);
                            }
                        })
                        .await;
                }
            }
        })
        .await;
    refused.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// Binds a pod; annotations on the Binding are copied to the pod (as in
/// Kubernetes), which is how a policy's failover grace reaches the region.
async fn bind(client: &kube::Client, b: &Bind) -> Result<(), kube::Error> {
    let (ns, name, node) = (&b.namespace, &b.name, &b.node);
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut body = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name, "namespace": ns},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    if let Some(g) = &b.grace {
        body["metadata"]["annotations"] = json!({ RESCHEDULE_GRACE_ANNOTATION: g });
    }
    api.create_subresource::<serde_json::Value, serde_json::Value>(
        "binding",
        name,
        &PostParams::default(),
        &body,
    )
    .await
    .map(|_| ())
}

async fn report_unschedulable(client: &kube::Client, p: &Waiting, msg: &str) {
    let (ns, name) = (&p.namespace, &p.name);
    let now = jiff::Timestamp::now();
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let patch = json!({"status": {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": msg, "lastTransitionTime": now.to_string(),
    }]}});
    if let Err(e) = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        tracing::debug!(pod = %name, "unschedulable status: {e}");
    }
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let pod = meridian_api::events::PodRef {
        namespace: ns,
        name,
        uid: Some(&p.uid),
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

/// Writes each policy's status (where its replicas are, which objectives are
/// met) when it changed.
async fn report_policies(
    client: &kube::Client,
    pol: &Policies,
    pods: &HashMap<String, PodFacts>,
    fleet: &Fleet,
) {
    if pol.by_ns.is_empty() {
        return;
    }
    struct Acc<'a> {
        bound: Vec<&'a NodeInfo>,
        pending: i32,
        groups: HashMap<String, i64>,
        loose: i64,
    }
    let mut acc: HashMap<(String, String), Acc<'_>> = HashMap::new();
    let no_labels = std::collections::BTreeMap::new();
    for p in pods.values() {
        let meta = &p.template.metadata;
        let owner = controller_of(meta);
        let Some((pp, _, size)) = pol.resolve_parts(
            meta.namespace.as_deref().unwrap_or_default(),
            meta.labels.as_ref().unwrap_or(&no_labels),
            owner,
        ) else {
            continue;
        };
        let key = (
            pp.metadata.namespace.clone().unwrap_or_default(),
            pp.metadata.name.clone().unwrap_or_default(),
        );
        let a = acc.entry(key).or_insert_with(|| Acc {
            bound: Vec::new(),
            pending: 0,
            groups: HashMap::new(),
            loose: 0,
        });
        match p.node.as_deref().and_then(|n| fleet.node(n)) {
            Some(n) => a.bound.push(n),
            None => a.pending += 1,
        }
        match owner {
            Some(o) if size > 0 => {
                a.groups.insert(o.uid.clone(), size);
            }
            _ => a.loose += 1,
        }
    }
    for list in pol.by_ns.values() {
        for (pp, rules) in list {
            let key = (
                pp.metadata.namespace.clone().unwrap_or_default(),
                pp.metadata.name.clone().unwrap_or_default(),
            );
            let (bound, pending, desired) = match acc.get(&key) {
                Some(a) => (
                    a.bound.as_slice(),
                    a.pending,
                    a.groups.values().sum::<i64>() + a.loose,
                ),
                None => (&[][..], 0, 0),
            };
            let mut status = policy::report(rules, bound, pending, desired);
            status.observed_generation = pp.metadata.generation;
            if pp.status.as_ref() == Some(&status) {
                continue;
            }
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &key.0, &policy_resource());
            let mut patch = json!({ "status": status });
            // A merge patch keeps map keys it does not mention: clear old cities.
            for city in pp.status.iter().flat_map(|s| s.replicas_by_city.keys()) {
                if !status.replicas_by_city.contains_key(city) {
                    patch["status"]["replicasByCity"][city] = serde_json::Value::Null;
                }
            }
            if let Err(e) = api
                .patch_status(&key.1, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                tracing::debug!(policy = %key.1, "status: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::store::Writer;

    fn node(name: &str, rv: &str, city: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "resourceVersion": rv,
                "labels": {"topology.meridian.io/city": city}},
            "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .expect("a valid node")
    }

    fn pod_request() -> PodRequest {
        PodRequest {
            requests: engine::Resources {
                cpu_milli: 1000,
                pods: 1,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_relist_that_changed_no_node_keeps_the_fleet_and_a_changed_label_rebuilds_it() {
        let mut w: Writer<Node> = Default::default();
        let store = w.as_reader();
        for (name, rv) in [("a", "1"), ("b", "2"), ("c", "3")] {
            w.apply_watcher_event(&watcher::Event::Apply(node(name, rv, "paris")));
        }
        let mut view = FleetView::default();
        let names = ["a", "b", "c"].map(String::from).into();
        assert!(view.sync_nodes(&store, Some(names)));
        assert_eq!(view.rebuilds, 1);
        view.bound("pod-1", "a", pod_request);

        // A relist showing the same nodes: nothing to rebuild, the bound pod kept.
        assert!(view.sync_nodes(&store, None));
        assert_eq!(view.rebuilds, 1, "an unchanged relist rebuilt the fleet");
        let used = |v: &FleetView| v.fleet.node("a").map(|n| n.used);
        assert_eq!(used(&view), Some(pod_request().requests));

        // Readiness changed (same labels): applied in place.
        let mut b = node("b", "4", "paris");
        if let Some(c) = b
            .status
            .as_mut()
            .and_then(|s| s.conditions.as_mut())
            .and_then(|c| c.first_mut())
        {
            c.status = "False".into();
        }
        w.apply_watcher_event(&watcher::Event::Apply(b));
        assert!(view.sync_nodes(&store, None));
        assert_eq!(view.rebuilds, 1);
        assert_eq!(view.fleet.node("b").map(|n| n.ready), Some(false));

        // A label changed: the fleet is rebuilt, and what is bound stays bound.
        w.apply_watcher_event(&watcher::Event::Apply(node("c", "5", "lyon")));
        view.rebuilt = None;
        assert!(view.sync_nodes(&store, None));
        assert_eq!(view.rebuilds, 2);
        assert_eq!(used(&view), Some(pod_request().requests));
        assert_eq!(
            view.fleet
                .node("c")
                .and_then(|n| n.labels.get("topology.meridian.io/city").cloned())
                .as_deref(),
            Some("lyon")
        );

        // A node gone: rebuilt without it.
        w.apply_watcher_event(&watcher::Event::Delete(node("b", "4", "paris")));
        view.rebuilt = None;
        assert!(view.sync_nodes(&store, None));
        assert_eq!(view.rebuilds, 3);
        assert!(view.fleet.node("b").is_none());
    }
}
