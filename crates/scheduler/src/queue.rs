//! Pods waiting for a node, kept as equivalence classes in the order they are to
//! be placed, so that a tick costs what it places, not what waits.
//!
//! Pods of one controlling owner are one class (the same template: one request,
//! placed together by the engine's incremental path), and so are an owner's pods
//! replacing the pods of one lost node (placed near that node); a pod without an
//! owner is a class of its own. A class holds the newest
//! typed pod seen of it (what its request is computed from) and, per pod, only its
//! name and what the loop must remember: a typed `Pod` is ~8 KB of memory, and a
//! million of them wait at once when creation outruns binding.
//!
//! Order: classes by their oldest pod, pods by creation time and then by arrival.
//! A pod taken for placement and put back (unschedulable, or its binding refused)
//! keeps its place.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use meridian_api::meridian as mapi;
use meridian_api::owners::controller_of;

/// Where a pod stands in the queue: creation time (seconds), then arrival.
pub(crate) type Order = (i64, u64);

/// One waiting pod, as the loop needs it to bind it or report it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Waiting {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// The message of its `PodScheduled=False` condition, if any.
    pub unschedulable: Option<String>,
    class: Arc<str>,
    order: Order,
}

struct Class {
    template: Arc<Pod>,
    pods: BTreeMap<Order, Waiting>,
}

/// The pods waiting for a node.
#[derive(Default)]
pub(crate) struct Queue {
    arrivals: u64,
    /// Every pod in the queue: uid -> (class, order).
    index: HashMap<String, (Arc<str>, Order)>,
    classes: HashMap<Arc<str>, Class>,
    /// Classes by their oldest pod.
    order: BTreeSet<(Order, Arc<str>)>,
    /// Pods taken out and not put back (placed, in flight): their places, so a
    /// pod put back keeps its place.
    known: HashMap<String, (Arc<str>, Order)>,
    /// Classes found unschedulable, left out of [`Queue::classes`] until the
    /// fleet changes (and a backoff has passed) or for at most [`PARK_MAX`].
    parked: HashMap<Arc<str>, Parked>,
}

/// What has changed since a class was found unschedulable: the fleet was rebuilt,
/// a node changed in a way that may fit more (readiness, cordon, capacity), a
/// place was freed, or placement policies changed.
pub(crate) type Generation = (u64, u64, u64);

struct Parked {
    generation: Generation,
    since: std::time::Instant,
    attempts: u32,
}

/// An unschedulable class is tried again at most this long after the last try,
/// whatever changed.
pub(crate) const PARK_MAX: std::time::Duration = std::time::Duration::from_secs(60);

impl Parked {
    /// After the fleet changed: 1 s after the first failure, doubling to 10 s.
    fn backoff(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1 << self.attempts.saturating_sub(1).min(4))
            .min(std::time::Duration::from_secs(10))
    }

    fn due(&self, now: Generation) -> bool {
        let waited = self.since.elapsed();
        waited >= PARK_MAX || (self.generation != now && waited >= self.backoff())
    }
}

/// A pod as the watch showed it, reduced to what the scheduler keeps: its own
/// facts and its class's template, shared by every pod of the class. The watch
/// decodes a typed `Pod` (~8 KB) per event; the loop drains the events once a
/// tick, and while it binds they pile up: tens of thousands of typed pods (a
/// third of the server's peak memory in a `heaptrack` of the 10k-node simulation).
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Creation time, in seconds.
    pub created: i64,
    /// Its node, when bound.
    pub node: Option<String>,
    /// Succeeded, failed or being deleted: it holds no place.
    pub finished: bool,
    pub unschedulable: Option<String>,
    pub class: Arc<str>,
    /// The first pod seen of its class (or the pod itself, for a class of one):
    /// what its request, scheduler name, labels and owner are read from.
    pub template: Arc<Pod>,
}

#[cfg(test)]
impl Seen {
    /// A pod with itself as template.
    pub fn alone(pod: Arc<Pod>) -> Seen {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let class = class_of(&pod, &uid);
        facts(&pod, uid, class, pod.clone())
    }
}

/// The templates of the classes seen lately, one typed pod per class.
#[derive(Default)]
pub(crate) struct Templates(HashMap<Arc<str>, Arc<Pod>>);

/// Classes remembered at most (then forgotten all at once).
const TEMPLATES_MAX: usize = 50_000;

impl Templates {
    /// Forgets every template (a relist: pods may have changed).
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// What the scheduler keeps of `pod`: pods of one class share the template
    /// seen of it. A waiting pod whose spec, labels or annotations differ from its
    /// class's template (its ReplicaSet was edited) becomes the new template, as
    /// the newest pod of a class is the queue's template.
    pub fn seen(&mut self, pod: Pod) -> Seen {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let class = class_of(&pod, &uid);
        let waiting = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_none_or(str::is_empty);
        let template = if class.starts_with("owner/") {
            match self.0.get(&class) {
                Some(t) if !waiting || same_template(t, &pod) => t.clone(),
                _ => {
                    if self.0.len() >= TEMPLATES_MAX {
                        self.0.clear();
                    }
                    let t = Arc::new(strip(&pod));
                    self.0.insert(class.clone(), t.clone());
                    t
                }
            }
        } else {
            Arc::new(strip(&pod))
        };
        facts(&pod, uid, class, template)
    }
}

/// Whether a waiting pod would be placed as `template` is.
fn same_template(template: &Pod, pod: &Pod) -> bool {
    template.metadata.labels == pod.metadata.labels
        && template.metadata.annotations == pod.metadata.annotations
        && template.spec == pod.spec
}

/// A template: the pod without its node, status and managed fields.
fn strip(pod: &Pod) -> Pod {
    let mut spec = pod.spec.clone();
    if let Some(s) = spec.as_mut() {
        s.node_name = None;
    }
    Pod {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            managed_fields: None,
            ..pod.metadata.clone()
        },
        spec,
        status: None,
    }
}

fn facts(pod: &Pod, uid: String, class: Arc<str>, template: Arc<Pod>) -> Seen {
    Seen {
        uid,
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        created: pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second()),
        node: pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
        finished: pod.metadata.deletion_timestamp.is_some()
            || matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
        unschedulable: unschedulable_message(pod),
        class,
        template,
    }
}

/// The class of a pending pod: its controlling owner, unless it stands alone.
fn class_of(p: &Pod, uid: &str) -> Arc<str> {
    let replaces = p
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(mapi::REPLACES_NODE_ANNOTATION));
    match (controller_of(&p.metadata), replaces) {
        (Some(o), None) => Arc::from(format!("owner/{}", o.uid)),
        (Some(o), Some(node)) => Arc::from(format!("owner/{}/replaces/{node}", o.uid)),
        (None, _) => Arc::from(format!("pod/{uid}")),
    }
}

fn unschedulable_message(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")?
        .message
        .clone()
}

impl Queue {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// A pod the watch shows waiting: added, or brought up to date in place.
    #[cfg(test)]
    pub fn push(&mut self, pod: Arc<Pod>) {
        self.push_seen(Seen::alone(pod));
    }

    /// A pod the watch shows waiting: added, or brought up to date in place.
    pub fn push_seen(&mut self, s: Seen) {
        let (class, order) = match self
            .index
            .get(&s.uid)
            .or_else(|| self.known.get(&s.uid))
            .cloned()
        {
            Some(place) => place,
            None => {
                self.arrivals += 1;
                // A new pod of a parked class (its workload grew: shares of a
                // distribution may have changed): try the class again.
                self.parked.remove(&s.class);
                (s.class, (s.created, self.arrivals))
            }
        };
        let waiting = Waiting {
            namespace: s.namespace,
            name: s.name,
            unschedulable: s.unschedulable,
            uid: s.uid,
            class,
            order,
        };
        self.put_back(s.template, waiting);
    }

    /// Puts a pod in its place (one taken out by [`Queue::take`] goes back to the
    /// place it had), with the newest template of its class.
    pub fn put_back(&mut self, template: Arc<Pod>, waiting: Waiting) {
        let key = waiting.class.clone();
        self.known.remove(&waiting.uid);
        self.index
            .insert(waiting.uid.clone(), (key.clone(), waiting.order));
        let class = self.classes.entry(key.clone()).or_insert_with(|| Class {
            template: template.clone(),
            pods: BTreeMap::new(),
        });
        class.template = template;
        let oldest = class.pods.keys().next().copied();
        class.pods.insert(waiting.order, waiting);
        let now = class.pods.keys().next().copied();
        if oldest != now {
            if let Some(o) = oldest {
                self.order.remove(&(o, key.clone()));
            }
            if let Some(o) = now {
                self.order.insert((o, key));
            }
        }
    }

    /// A pod that no longer waits (bound, finished, deleted).
    pub fn remove(&mut self, uid: &str) -> Option<Waiting> {
        self.known.remove(uid);
        let (key, order) = self.index.remove(uid)?;
        let class = self.classes.get_mut(&key)?;
        let oldest = class.pods.keys().next().copied();
        let w = class.pods.remove(&order);
        let now = class.pods.keys().next().copied();
        if oldest != now {
            if let Some(o) = oldest {
                self.order.remove(&(o, key.clone()));
            }
            match now {
                Some(o) => {
                    self.order.insert((o, key));
                }
                None => {
                    self.classes.remove(&key);
                    self.parked.remove(&key);
                }
            }
        }
        w
    }

    /// The classes to place now, oldest first (to [`Queue::take`] one after
    /// another): all but the parked ones not yet due at generation `now`.
    pub fn classes(&self, now: Generation) -> Vec<Arc<str>> {
        self.order
            .iter()
            .map(|(_, k)| k)
            .filter(|k| self.parked.get(*k).is_none_or(|p| p.due(now)))
            .cloned()
            .collect()
    }

    /// The class was found unschedulable at generation `now`: leave it out until
    /// that changes and its backoff has passed.
    pub fn park(&mut self, key: &Arc<str>, now: Generation) {
        let p = self.parked.entry(key.clone()).or_insert(Parked {
            generation: now,
            since: std::time::Instant::now(),
            attempts: 0,
        });
        p.generation = now;
        p.since = std::time::Instant::now();
        p.attempts += 1;
    }

    /// The class was placed: nothing to hold back any more.
    pub fn unpark(&mut self, key: &Arc<str>) {
        self.parked.remove(key);
    }

    /// Takes a whole class out for placement: its template and its pods in order.
    pub fn take(&mut self, key: &Arc<str>) -> Option<(Arc<Pod>, Vec<Waiting>)> {
        let class = self.classes.remove(key)?;
        if let Some(o) = class.pods.keys().next() {
            self.order.remove(&(*o, key.clone()));
        }
        let pods: Vec<Waiting> = class.pods.into_values().collect();
        for w in &pods {
            if let Some(place) = self.index.remove(&w.uid) {
                self.known.insert(w.uid.clone(), place);
            }
        }
        Some((class.template, pods))
    }

    /// Keeps only the pods `keep` accepts (after a relist).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self
            .index
            .keys()
            .chain(self.known.keys())
            .filter(|uid| !keep(uid))
            .cloned()
            .collect();
        for uid in gone {
            self.remove(&uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Generation = (0, 0, 0);
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};

    fn pod(name: &str, owner: Option<&str>, created: i64) -> Arc<Pod> {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("ns".into());
        p.metadata.uid = Some(format!("u-{name}"));
        p.metadata.creation_timestamp = Some(Time(
            jiff::Timestamp::from_second(1_700_000_000 + created).unwrap(),
        ));
        p.metadata.owner_references = owner.map(|o| {
            vec![OwnerReference {
                uid: o.into(),
                controller: Some(true),
                name: o.into(),
                kind: "ReplicaSet".into(),
                api_version: "apps/v1".into(),
                ..Default::default()
            }]
        });
        Arc::new(p)
    }

    #[test]
    fn pods_of_a_class_share_one_template_and_keep_their_own_facts() {
        let mut t = Templates::default();
        let mut a = (*pod("a", Some("rs"), 1)).clone();
        a.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Pending".into()),
            ..Default::default()
        });
        let a = t.seen(a);
        let mut b = (*pod("b", Some("rs"), 2)).clone();
        b.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: Some("n1".into()),
            ..Default::default()
        });
        let b = t.seen(b);
        assert!(Arc::ptr_eq(&a.template, &b.template));
        assert!(a.template.status.is_none(), "a template carries no status");
        assert_eq!((a.name.as_str(), a.created), ("a", 1_700_000_001));
        assert_eq!((a.node.as_deref(), b.node.as_deref()), (None, Some("n1")));
        // A replacement of a lost node's pod is a class apart, with its annotation.
        let mut r = (*pod("r", Some("rs"), 3)).clone();
        r.metadata.annotations =
            Some([(mapi::REPLACES_NODE_ANNOTATION.to_string(), "n9".to_string())].into());
        let r = t.seen(r);
        assert!(!Arc::ptr_eq(&a.template, &r.template));
        assert_eq!(&*r.class, "owner/rs/replaces/n9");
        assert!(r.template.metadata.annotations.is_some());
        // Pods without an owner are their own template; finished pods say so.
        let mut lone = (*pod("lone", None, 4)).clone();
        lone.metadata.deletion_timestamp = lone.metadata.creation_timestamp.clone();
        let lone = t.seen(lone);
        assert_eq!(lone.template.metadata.name.as_deref(), Some("lone"));
        assert!(lone.finished && !a.finished);
        // A waiting pod with another spec (its ReplicaSet was edited) is the new
        // template; a bound one does not replace it.
        let mut edited = (*pod("e", Some("rs"), 6)).clone();
        edited.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            priority: Some(7),
            ..Default::default()
        });
        let e = t.seen(edited);
        assert_eq!(e.template.spec.as_ref().and_then(|s| s.priority), Some(7));
        let b2 = t.seen((*pod("f", Some("rs"), 7)).clone());
        assert!(b2.template.spec.is_none() && !Arc::ptr_eq(&b2.template, &e.template));
        // A relist forgets the templates.
        t.clear();
        let c = t.seen((*pod("c", Some("rs"), 5)).clone());
        assert!(!Arc::ptr_eq(&a.template, &c.template));
    }

    fn names(q: &mut Queue) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        for k in q.classes(NOW) {
            let (t, pods) = q.take(&k).unwrap();
            out.push(pods.iter().map(|w| w.name.clone()).collect());
            for w in pods {
                q.put_back(t.clone(), w);
            }
        }
        out
    }

    #[test]
    fn pods_of_one_owner_are_one_class_and_classes_come_oldest_first() {
        let mut q = Queue::default();
        q.push(pod("b1", Some("rs-b"), 5));
        q.push(pod("a1", Some("rs-a"), 3));
        q.push(pod("lone", None, 4));
        q.push(pod("b0", Some("rs-b"), 1));
        q.push(pod("a2", Some("rs-a"), 3));
        assert_eq!(q.len(), 5);
        assert_eq!(
            names(&mut q),
            vec![vec!["b0", "b1"], vec!["a1", "a2"], vec!["lone"]]
        );
        // Taking and putting back changed nothing.
        assert_eq!(
            names(&mut q),
            vec![vec!["b0", "b1"], vec!["a1", "a2"], vec!["lone"]]
        );
    }

    #[test]
    fn a_taken_pod_is_out_of_the_queue_until_put_back_and_keeps_its_place() {
        let mut q = Queue::default();
        for (i, n) in ["p0", "p1", "p2"].iter().enumerate() {
            q.push(pod(n, Some("rs"), i as i64));
        }
        q.push(pod("late", Some("other"), 10));
        let (t, mut pods) = q.take(&Arc::from("owner/rs")).unwrap();
        assert_eq!(q.len(), 1);
        assert!(!q.is_empty());
        assert_eq!(q.classes(NOW).len(), 1);
        // The watch shows p0 again while it is out (not yet bound): it returns
        // to its old place, ahead of the other class.
        q.push(pod("p0", Some("rs"), 0));
        assert_eq!(names(&mut q), vec![vec!["p0"], vec!["late"]]);
        // p1 was bound; p2 is put back.
        assert!(q.remove("u-p1").is_none());
        let p2 = pods.pop().unwrap();
        q.put_back(t, p2);
        assert_eq!(names(&mut q), vec![vec!["p0", "p2"], vec!["late"]]);
    }

    #[test]
    fn removing_pods_reorders_and_drops_empty_classes() {
        let mut q = Queue::default();
        q.push(pod("a0", Some("a"), 0));
        q.push(pod("b1", Some("b"), 1));
        q.push(pod("a2", Some("a"), 2));
        assert!(q.remove("u-a0").is_some());
        // Class a's oldest is now 2: b comes first.
        assert_eq!(names(&mut q), vec![vec!["b1"], vec!["a2"]]);
        assert!(q.remove("u-b1").is_some());
        assert!(q.remove("u-b1").is_none());
        assert_eq!(q.classes(NOW).len(), 1);
        q.retain(|uid| uid != "u-a2");
        assert!(q.is_empty());
        assert!(q.classes(NOW).is_empty());
    }

    #[test]
    fn replacements_of_one_lost_node_are_a_class_apart_and_remember_their_condition() {
        let mut q = Queue::default();
        q.push(pod("r0", Some("rs"), 0));
        let replacing = |name: &str, node: &str, order: i64| {
            let mut p = (*pod(name, Some("rs"), order)).clone();
            p.metadata.annotations =
                Some([(mapi::REPLACES_NODE_ANNOTATION.to_string(), node.to_string())].into());
            p
        };
        q.push(Arc::new(replacing("r2", "n1", 2)));
        q.push(Arc::new(replacing("r3", "n2", 3)));
        let mut repl = replacing("r1", "n1", 1);
        repl.status = Some(k8s_openapi::api::core::v1::PodStatus {
            conditions: Some(vec![k8s_openapi::api::core::v1::PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                message: Some("0/3 nodes: 3 insufficient cpu".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        q.push(Arc::new(repl));
        // The owner's pods, its replacements of n1, its replacement of n2.
        assert_eq!(q.classes(NOW).len(), 3);
        let (_, pods) = q.take(&Arc::from("owner/rs/replaces/n1")).unwrap();
        let names: Vec<&str> = pods.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["r1", "r2"]);
        assert_eq!(
            pods[0].unschedulable.as_deref(),
            Some("0/3 nodes: 3 insufficient cpu")
        );
    }

    #[test]
    fn an_unschedulable_class_waits_for_a_change_and_its_backoff() {
        let mut q = Queue::default();
        q.push(pod("a0", Some("a"), 0));
        q.push(pod("b1", Some("b"), 1));
        let a: Arc<str> = Arc::from("owner/a");
        let (t, mut pods) = q.take(&a).unwrap();
        q.put_back(t, pods.pop().unwrap());
        q.park(&a, NOW);
        let later: Generation = (0, 1, 0);
        // Nothing changed: a waits; a change within its backoff (1 s): still waits.
        assert_eq!(q.classes(NOW), [Arc::from("owner/b")]);
        assert_eq!(q.classes(later), [Arc::from("owner/b")]);
        let ago = |secs| std::time::Instant::now() - std::time::Duration::from_secs(secs);
        q.parked.get_mut(&a).unwrap().since = ago(2);
        assert_eq!(q.classes(NOW).len(), 1, "unchanged fleet: a still waits");
        assert_eq!(q.classes(later).len(), 2, "changed and past its backoff");
        // Each failure doubles the backoff, up to 10 s.
        q.park(&a, later);
        q.park(&a, later);
        q.park(&a, later);
        q.parked.get_mut(&a).unwrap().since = ago(5);
        assert_eq!(q.classes(NOW).len(), 1, "fourth failure: 8 s backoff");
        q.parked.get_mut(&a).unwrap().since = ago(9);
        assert_eq!(q.classes(NOW).len(), 2);
        // Whatever happened, at most PARK_MAX later it is tried again.
        q.park(&a, NOW);
        q.parked.get_mut(&a).unwrap().since = ago(PARK_MAX.as_secs());
        assert_eq!(q.classes(NOW).len(), 2);
        // A new pod of the class: tried again at once (its workload grew).
        q.park(&a, NOW);
        q.push(pod("a2", Some("a"), 2));
        assert_eq!(q.classes(NOW).len(), 2);
        // Placed: no longer held back; emptied: forgotten.
        q.park(&a, NOW);
        q.unpark(&a);
        assert_eq!(q.classes(NOW).len(), 2);
        q.park(&a, NOW);
        assert!(q.remove("u-a0").is_some());
        assert!(q.remove("u-a2").is_some());
        assert!(q.parked.is_empty());
    }
}
