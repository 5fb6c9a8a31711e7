//! The placement engine: pure, synchronous, no I/O. Given the fleet and a pod, find
//! the best feasible node, or say why none fits, counted by cause.
//!
//! Filters: schedulable (Ready, not cordoned), nodeSelector, required node affinity,
//! taints/tolerations, resources (cpu, memory, ephemeral-storage, pods,
//! `nvidia.com/gpu`) against allocatable minus what is bound, required pod
//! anti-affinity on hostname, topology spread (`DoNotSchedule`). Scoring: least
//! allocated, plus spread. Placements are incremental: each one updates the fleet,
//! so many replicas of one workload spread correctly in one pass.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, Pod, Taint, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use meridian_api::geo;
use meridian_api::meridian::{
    BANDWIDTH_PRICE_KEY, CITY_KEY, REGION_KEY, REPLACES_NODE_ANNOTATION, ZONE_KEY,
};
use meridian_api::owners::controller_of;

use crate::policy::{self, PolicyRules};

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_milli: i64,
    pub memory: i64,
    pub ephemeral: i64,
    pub pods: i64,
    pub gpu: i64,
}

impl Resources {
    fn add(&mut self, o: &Resources) {
        self.cpu_milli += o.cpu_milli;
        self.memory += o.memory;
        self.ephemeral += o.ephemeral;
        self.pods += o.pods;
        self.gpu += o.gpu;
    }

    fn sub(&mut self, o: &Resources) {
        self.cpu_milli -= o.cpu_milli;
        self.memory -= o.memory;
        self.ephemeral -= o.ephemeral;
        self.pods -= o.pods;
        self.gpu -= o.gpu;
    }

    fn from_map(
        m: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
    ) -> Self {
        let get = |k: &str| {
            m.and_then(|m| m.get(k))
                .and_then(|q| meridian_api::quantity::parse_milli(&q.0).ok())
                .unwrap_or(0)
        };
        Resources {
            cpu_milli: get("cpu") as i64,
            memory: (get("memory") / 1000) as i64,
            ephemeral: (get("ephemeral-storage") / 1000) as i64,
            pods: (get("pods") / 1000) as i64,
            gpu: (get("nvidia.com/gpu") / 1000) as i64,
        }
    }
}

/// Why a node was rejected for a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    NotReady,
    Cordoned,
    NodeSelector,
    Affinity,
    Taint,
    Cpu,
    Memory,
    Ephemeral,
    Pods,
    Gpu,
    AntiAffinity,
    Spread,
    Policy,
    Distribution,
}

impl Reason {
    pub fn text(self) -> &'static str {
        match self {
            Reason::NotReady => "node(s) not ready",
            Reason::Cordoned => "node(s) were unschedulable",
            Reason::NodeSelector => "node(s) didn't match Pod's node selector",
            Reason::Affinity => "node(s) didn't match Pod's node affinity",
            Reason::Taint => "node(s) had untolerated taint",
            Reason::Cpu => "Insufficient cpu",
            Reason::Memory => "Insufficient memory",
            Reason::Ephemeral => "Insufficient ephemeral-storage",
            Reason::Pods => "Too many pods",
            Reason::Gpu => "Insufficient nvidia.com/gpu",
            Reason::AntiAffinity => "node(s) didn't satisfy pod anti-affinity rules",
            Reason::Spread => "node(s) didn't match pod topology spread constraints",
            Reason::Policy => "node(s) excluded by placement policy locations",
            Reason::Distribution => {
                "node(s) in locations that already have their share of replicas"
            }
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    pub name: String,
    pub labels: Labels,
    pub taints: Vec<Taint>,
    pub allocatable: Resources,
    pub used: Resources,
    pub ready: bool,
    pub cordoned: bool,
    /// Labels of the pods bound here (for spread and anti-affinity).
    pub pods: Vec<Arc<Labels>>,
    /// Declared coordinates (annotation `meridian.io/coordinates`).
    pub coordinates: Option<(f64, f64)>,
    /// Measured round-trip times to named areas (annotation `meridian.io/measured-rtt`).
    pub measured_rtt: Vec<(String, f64)>,
    /// Label `node.meridian.io/bandwidth-price` (price per GB), when set.
    pub bandwidth_price: Option<f64>,
}

/// Drops from a Node what [`NodeInfo::from_node`] does not read, for the
/// reflectors that keep every Node to build it from (the scheduler's and the
/// DaemonSet controller's): capacity, addresses, system info, images, managed
/// fields, annotations other than coordinates and measured RTTs, and of the
/// conditions all but Ready's type and status. A typed Node of a hollow fleet was
/// ~6 KB; two reflectors of 100,000 of them more than a gigabyte.
pub fn slim_node(n: &mut Node) {
    let m = &mut n.metadata;
    m.managed_fields = None;
    m.finalizers = None;
    m.owner_references = None;
    if let Some(a) = m.annotations.as_mut() {
        a.retain(|k, _| k == geo::COORDINATES_ANNOTATION || k == geo::MEASURED_RTT_ANNOTATION);
    }
    if let Some(spec) = n.spec.as_mut() {
        // Only taints and unschedulable are read.
        spec.config_source = None;
        spec.pod_cidr = None;
        spec.pod_cidrs = None;
        spec.provider_id = None;
        spec.external_id = None;
    }
    if let Some(st) = n.status.as_mut() {
        let conditions = st.conditions.take().map(|cs| {
            cs.into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| k8s_openapi::api::core::v1::NodeCondition {
                    type_: c.type_,
                    status: c.status,
                    ..Default::default()
                })
                .collect()
        });
        *st = k8s_openapi::api::core::v1::NodeStatus {
            allocatable: st.allocatable.take(),
            conditions,
            ..Default::default()
        };
    }
}

impl NodeInfo {
    pub fn from_node(n: &Node) -> NodeInfo {
        let status = n.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        let spec = n.spec.as_ref();
        let ann = n.metadata.annotations.as_ref();
        let labels = n.metadata.labels.clone().unwrap_or_default();
        NodeInfo {
            name: n.metadata.name.clone().unwrap_or_default(),
            coordinates: ann
                .and_then(|a| a.get(geo::COORDINATES_ANNOTATION))
                .and_then(|c| geo::parse_coordinates(c).ok()),
            measured_rtt: ann
                .and_then(|a| a.get(geo::MEASURED_RTT_ANNOTATION))
                .map(|m| geo::parse_measured_rtt(m))
                .unwrap_or_default(),
            bandwidth_price: labels
                .get(BANDWIDTH_PRICE_KEY)
                .and_then(|p| p.parse::<f64>().ok())
                .filter(|p| p.is_finite()),
            labels,
            taints: spec.and_then(|s| s.taints.clone()).unwrap_or_default(),
            allocatable: Resources::from_map(status.and_then(|s| s.allocatable.as_ref())),
            used: Resources::default(),
            ready,
            cordoned: spec.and_then(|s| s.unschedulable).unwrap_or(false),
            pods: Vec::new(),
        }
    }
}

/// What the engine needs to know of a pod.
#[derive(Clone, Debug, Default)]
pub struct PodRequest {
    pub labels: Arc<Labels>,
    pub requests: Resources,
    pub node_selector: Labels,
    /// OR of terms, each an AND of requirements.
    pub required_terms: Vec<Vec<NodeSelectorRequirement>>,
    pub tolerations: Vec<Toleration>,
    pub spread: Vec<TopologySpreadConstraint>,
    /// Required anti-affinity on `kubernetes.io/hostname` (its label selector).
    pub anti_affinity: Vec<LabelSelector>,
    /// The replica group (uid of the controlling owner): what policies count.
    pub group: Option<Arc<str>>,
    /// How many replicas the group wants (distribution targets are shares of it).
    pub group_size: i64,
    /// The placement policy that applies, if any.
    pub policy: Option<Arc<PolicyRules>>,
    /// The node whose lost pod this one replaces.
    pub replaces: Option<String>,
}

impl PodRequest {
    pub fn from_pod(pod: &Pod) -> PodRequest {
        let none = k8s_openapi::api::core::v1::PodSpec::default();
        let spec = pod.spec.as_ref().unwrap_or(&none);
        let mut requests = Resources {
            pods: 1,
            ..Default::default()
        };
        for c in &spec.containers {
            let r = c.resources.as_ref();
            // A resource's request defaults to its limit, as in Kubernetes.
            let mut m = r.and_then(|r| r.limits.clone()).unwrap_or_default();
            m.extend(r.and_then(|r| r.requests.clone()).unwrap_or_default());
            let mut add = Resources::from_map(Some(&m));
            add.pods = 0;
            requests.add(&add);
        }
        let affinity = spec.affinity.as_ref();
        let required_terms = affinity
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .map(|r| {
                r.node_selector_terms
                    .iter()
                    .map(|t| t.match_expressions.clone().unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default();
        let anti_affinity = affinity
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|p| {
                p.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .map(|terms| {
                terms
                    .iter()
                    .filter(|t| t.topology_key == "kubernetes.io/hostname")
                    .filter_map(|t| t.label_selector.clone())
                    .collect()
            })
            .unwrap_or_default();
        PodRequest {
            labels: Arc::new(pod.metadata.labels.clone().unwrap_or_default()),
            requests,
            node_selector: spec.node_selector.clone().unwrap_or_default(),
            required_terms,
            tolerations: spec.tolerations.clone().unwrap_or_default(),
            spread: spec.topology_spread_constraints.clone().unwrap_or_default(),
            anti_affinity,
            group: controller_of(&pod.metadata).map(|o| Arc::from(o.uid.as_str())),
            group_size: 0,
            policy: None,
            replaces: pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REPLACES_NODE_ANNOTATION))
                .cloned(),
        }
    }
}

pub fn selector_matches(sel: &LabelSelector, labels: &Labels) -> bool {
    if let Some(ml) = &sel.match_labels
        && !ml.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    for e in sel.match_expressions.iter().flatten() {
        let v = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        let ok = match e.operator.as_str() {
            "In" => v.is_some_and(|v| values.contains(v)),
            "NotIn" => !v.is_some_and(|v| values.contains(v)),
            "Exists" => v.is_some(),
            "DoesNotExist" => v.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

fn requirement_matches(r: &NodeSelectorRequirement, labels: &Labels) -> bool {
    let v = labels.get(&r.key);
    let values = r.values.as_deref().unwrap_or_default();
    match r.operator.as_str() {
        "In" => v.is_some_and(|v| values.contains(v)),
        "NotIn" => !v.is_some_and(|v| values.contains(v)),
        "Exists" => v.is_some(),
        "DoesNotExist" => v.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(w)) = (
                v.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|w| w.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if r.operator == "Gt" { v > w } else { v < w }
        }
        _ => false,
    }
}

fn tolerates(tolerations: &[Toleration], t: &Taint) -> bool {
    if t.effect == "PreferNoSchedule" {
        return true;
    }
    tolerations.iter().any(|tol| {
        let key_ok = match tol.key.as_deref() {
            None | Some("") => tol.operator.as_deref() == Some("Exists"),
            Some(k) => k == t.key,
        };
        let value_ok = match tol.operator.as_deref() {
            Some("Exists") => true,
            _ => tol.value.as_deref().unwrap_or("") == t.value.as_deref().unwrap_or(""),
        };
        let effect_ok = tol
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == t.effect);
        key_ok && value_ok && effect_ok
    })
}

/// Matching-pod counts per topology domain for one (topology key, selector),
/// maintained incrementally on every bind/unbind once first asked for.
struct SpreadCounts {
    key: String,
    selector: LabelSelector,
    counts: HashMap<String, i64>,
}

/// Each node's domain id for one topology key (`u32::MAX`: none), and the domain
/// names by id.
type DomainIndex = (Vec<u32>, Vec<String>);

/// Spread counters a pod with `labels` may count towards.
fn spread_candidates<'a>(
    by_label: &'a HashMap<String, HashMap<String, Vec<usize>>>,
    general: &'a [usize],
    labels: &'a Labels,
) -> impl Iterator<Item = usize> + 'a {
    let by_labels = labels
        .iter()
        .filter_map(|(k, v)| by_label.get(k).and_then(|m| m.get(v)))
        .flatten();
    general.iter().chain(by_labels).copied()
}

/// The fleet as the engine sees it.
#[derive(Default)]
pub struct Fleet {
    pub nodes: Vec<NodeInfo>,
    index: HashMap<String, usize>,
    spread: Vec<SpreadCounts>,
    spread_ids: HashMap<String, usize>,
    /// Spread counters by the first `matchLabels` pair of their selector (label
    /// key, value), so a bind only visits the counters that can match it; counters
    /// without `matchLabels` are in `spread_general`.
    spread_by_label: HashMap<String, HashMap<String, Vec<usize>>>,
    spread_general: Vec<usize>,
    /// Bound pods per node, by pod label (key, value): which nodes a new spread
    /// counter must look at.
    pods_by_label: HashMap<String, HashMap<String, HashMap<u32, u32>>>,
    /// Pods per node of each replica group.
    groups: HashMap<Arc<str>, HashMap<usize, i64>>,
    /// Latency coverage mask per node, per policy key.
    coverage: HashMap<String, Arc<Vec<u64>>>,
    /// Nodes passing the static filters, per static signature of a pod.
    static_feasible: HashMap<String, Arc<Vec<u32>>>,
    /// Why no node passes them, per static signature (when none does).
    static_unplaceable: HashMap<String, String>,
    /// Per topology key: each node's domain id (`u32::MAX`: no such label), and
    /// the domain names by id.
    domains: HashMap<String, Arc<DomainIndex>>,
    /// Counts changes that may let a pod fit where it did not: a node's
    /// readiness, cordon, capacity or location data changed, or a place was freed.
    changes: u64,
}

/// Result of placing one pod.
#[derive(Debug)]
pub enum Placement {
    Node(String),
    Unschedulable(String),
}

impl Fleet {
    pub fn new(mut nodes: Vec<NodeInfo>) -> Fleet {
        // Sorted by name: ties between equal nodes break the same way every time.
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        Fleet {
            nodes,
            index,
            spread: Vec::new(),
            spread_ids: HashMap::new(),
            spread_by_label: HashMap::new(),
            spread_general: Vec::new(),
            pods_by_label: HashMap::new(),
            groups: HashMap::new(),
            coverage: HashMap::new(),
            static_feasible: HashMap::new(),
            static_unplaceable: HashMap::new(),
            domains: HashMap::new(),
            changes: 0,
        }
    }

    /// See the `changes` field: compare two readings to know whether something
    /// that may let more pods fit happened in between.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Applies a node's new capacity, readiness, cordon, coordinates and prices,
    /// keeping what is bound to it (labels and taints must not have changed: the
    /// caller rebuilds the fleet for that).
    pub fn update_node(&mut self, info: NodeInfo) {
        let Some(&i) = self.index.get(&info.name) else {
            return;
        };
        let n = &mut self.nodes[i];
        if n.ready != info.ready || n.cordoned != info.cordoned {
            self.static_feasible.clear();
            self.static_unplaceable.clear();
        }
        if n.ready != info.ready
            || n.cordoned != info.cordoned
            || n.allocatable != info.allocatable
            || n.coordinates != info.coordinates
            || n.measured_rtt != info.measured_rtt
            || n.bandwidth_price != info.bandwidth_price
        {
            self.changes += 1;
        }
        if n.coordinates != info.coordinates || n.measured_rtt != info.measured_rtt {
            self.coverage.clear();
        }
        n.allocatable = info.allocatable;
        n.ready = info.ready;
        n.cordoned = info.cordoned;
        n.coordinates = info.coordinates;
        n.measured_rtt = info.measured_rtt;
        n.bandwidth_price = info.bandwidth_price;
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.index.get(name).map(|&i| &self.nodes[i])
    }

    /// Records a pod already bound to `node`.
    pub fn bind(&mut self, node: &str, req: &PodRequest) {
        if let Some(&i) = self.index.get(node) {
            let n = &mut self.nodes[i];
            n.used.add(&req.requests);
            n.pods.push(req.labels.clone());
            for (k, v) in req.labels.iter() {
                *self
                    .pods_by_label
                    .entry(k.clone())
                    .or_default()
                    .entry(v.clone())
                    .or_default()
                    .entry(i as u32)
                    .or_insert(0) += 1;
            }
            if let Some(g) = &req.group {
                *self
                    .groups
                    .entry(g.clone())
                    .or_default()
                    .entry(i)
                    .or_insert(0) += 1;
            }
            for id in spread_candidates(&self.spread_by_label, &self.spread_general, &req.labels) {
                let sc = &mut self.spread[id];
                if let Some(d) = n.labels.get(&sc.key)
                    && selector_matches(&sc.selector, &req.labels)
                {
                    *sc.counts.entry(d.clone()).or_insert(0) += 1;
                }
            }
        }
    }

    /// Forgets a bound pod (the inverse of [`Fleet::bind`]).
    pub fn unbind(&mut self, node: &str, req: &PodRequest) {
        if let Some(&i) = self.index.get(node) {
            self.changes += 1;
            let n = &mut self.nodes[i];
            n.used.sub(&req.requests);
            if let Some(g) = &req.group
                && let Some(per_node) = self.groups.get_mut(g)
                && let Some(c) = per_node.get_mut(&i)
            {
                *c -= 1;
                if *c <= 0 {
                    per_node.remove(&i);
                }
            }
            if let Some(p) = n
                .pods
                .iter()
                .position(|l| Arc::ptr_eq(l, &req.labels) || **l == *req.labels)
            {
                n.pods.swap_remove(p);
                for (k, v) in req.labels.iter() {
                    if let Some(per_node) = self.pods_by_label.get_mut(k).and_then(|m| m.get_mut(v))
                        && let Some(c) = per_node.get_mut(&(i as u32))
                    {
                        *c -= 1;
                        if *c == 0 {
                            per_node.remove(&(i as u32));
                        }
                    }
                }
                for id in
                    spread_candidates(&self.spread_by_label, &self.spread_general, &req.labels)
                {
                    let sc = &mut self.spread[id];
                    if let Some(d) = n.labels.get(&sc.key)
                        && selector_matches(&sc.selector, &req.labels)
                        && let Some(c) = sc.counts.get_mut(d)
                    {
                        *c -= 1;
                    }
                }
            }
        }
    }

    /// Whether `n` admits the pod by placement rules alone (node selector, required
    /// affinity, taints), ignoring readiness and capacity: what a DaemonSet asks.
    pub fn admits(n: &NodeInfo, req: &PodRequest) -> bool {
        req.node_selector
            .iter()
            .all(|(k, v)| n.labels.get(k) == Some(v))
            && (req.required_terms.is_empty()
                || req
                    .required_terms
                    .iter()
                    .any(|t| t.iter().all(|r| requirement_matches(r, &n.labels))))
            && n.taints
                .iter()
                .all(|t| t.effect == "PreferNoSchedule" || tolerates(&req.tolerations, t))
    }

    fn filter(&self, n: &NodeInfo, req: &PodRequest) -> Result<(), Reason> {
        if !n.ready {
            return Err(Reason::NotReady);
        }
        if n.cordoned {
            return Err(Reason::Cordoned);
        }
        if !req
            .node_selector
            .iter()
            .all(|(k, v)| n.labels.get(k) == Some(v))
        {
            return Err(Reason::NodeSelector);
        }
        if !req.required_terms.is_empty()
            && !req
                .required_terms
                .iter()
                .any(|t| t.iter().all(|r| requirement_matches(r, &n.labels)))
        {
            return Err(Reason::Affinity);
        }
        if n.taints.iter().any(|t| !tolerates(&req.tolerations, t)) {
            return Err(Reason::Taint);
        }
        if let Some(p) = &req.policy
            && !p.allows(&n.labels)
        {
            return Err(Reason::Policy);
        }
        Self::fits(n, req)
    }

    /// The filters that depend on what is bound: free resources, anti-affinity.
    fn fits(n: &NodeInfo, req: &PodRequest) -> Result<(), Reason> {
        let free = |alloc: i64, used: i64| alloc - used;
        let r = &req.requests;
        let (a, u) = (&n.allocatable, &n.used);
        if r.cpu_milli > 0 && free(a.cpu_milli, u.cpu_milli) < r.cpu_milli {
            return Err(Reason::Cpu);
        }
        if r.memory > 0 && free(a.memory, u.memory) < r.memory {
            return Err(Reason::Memory);
        }
        if r.ephemeral > 0 && free(a.ephemeral, u.ephemeral) < r.ephemeral {
            return Err(Reason::Ephemeral);
        }
        if free(a.pods, u.pods) < r.pods {
            return Err(Reason::Pods);
        }
        if r.gpu > 0 && free(a.gpu, u.gpu) < r.gpu {
            return Err(Reason::Gpu);
        }
        if req
            .anti_affinity
            .iter()
            .any(|sel| n.pods.iter().any(|p| selector_matches(sel, p)))
        {
            return Err(Reason::AntiAffinity);
        }
        Ok(())
    }

    /// Matching pods per topology domain for a constraint (all nodes), kept up to
    /// date incrementally after the first call.
    fn domain_counts(&mut self, c: &TopologySpreadConstraint) -> &HashMap<String, i64> {
        let selector = c.label_selector.clone().unwrap_or_default();
        let id = format!(
            "{}\u{0}{}",
            c.topology_key,
            serde_json::to_string(&selector).unwrap_or_default()
        );
        if let Some(&i) = self.spread_ids.get(&id) {
            return &self.spread[i].counts;
        }
        let mut counts: HashMap<String, i64> = HashMap::new();
        // Only nodes with a pod carrying the selector's first matchLabels pair can
        // hold a matching pod (all nodes when it has none).
        let first = selector.match_labels.as_ref().and_then(|m| m.iter().next());
        let candidates: Vec<usize> = match first {
            Some((k, v)) => self
                .pods_by_label
                .get(k)
                .and_then(|m| m.get(v))
                .map(|per_node| per_node.keys().map(|&i| i as usize).collect())
                .unwrap_or_default(),
            None => (0..self.nodes.len()).collect(),
        };
        for i in candidates {
            let n = &self.nodes[i];
            let Some(domain) = n.labels.get(&c.topology_key) else {
                continue;
            };
            let matching = n
                .pods
                .iter()
                .filter(|p| selector_matches(&selector, p))
                .count() as i64;
            if matching > 0 {
                *counts.entry(domain.clone()).or_insert(0) += matching;
            }
        }
        let i = self.spread.len();
        match selector.match_labels.as_ref().and_then(|m| m.iter().next()) {
            Some((k, v)) => self
                .spread_by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .push(i),
            None => self.spread_general.push(i),
        }
        self.spread.push(SpreadCounts {
            key: c.topology_key.clone(),
            selector,
            counts,
        });
        self.spread_ids.insert(id, i);
        &self.spread[i].counts
    }

    /// Latency coverage masks of every node for a policy (cached per policy version).
    fn coverage(&mut self, rules: &PolicyRules) -> Arc<Vec<u64>> {
        let nodes = &self.nodes;
        self.coverage
            .entry(rules.key.clone())
            .or_insert_with(|| Arc::new(nodes.iter().map(|n| rules.coverage(n)).collect()))
            .clone()
    }

    /// Pods of a replica group per node.
    pub fn group_nodes(&self, group: &str) -> Option<&HashMap<usize, i64>> {
        self.groups.get(group)
    }

    /// Applies a placement policy's distribution, spread and latency rules to the
    /// feasible nodes: removes what they forbid, scores what they prefer.
    fn apply_policy(
        &mut self,
        req: &PodRequest,
        rules: &PolicyRules,
        feasible: &mut Vec<usize>,
        rejected: &mut BTreeMap<Reason, usize>,
        score: &mut [PolicyScore],
    ) {
        let empty = HashMap::new();
        let group = req
            .group
            .as_ref()
            .and_then(|g| self.groups.get(g))
            .unwrap_or(&empty);
        let placed: i64 = group.values().sum();
        if let Some(rule) = &rules.distribution {
            let total = req.group_size.max(placed + 1);
            let nodes = &self.nodes;
            let targets = policy::targets(rule, total, |key| {
                let mut cap: BTreeMap<String, i64> = BTreeMap::new();
                for &i in feasible.iter() {
                    if let Some(d) = nodes[i].labels.get(key) {
                        let n = &nodes[i];
                        *cap.entry(d.clone()).or_insert(0) +=
                            (n.allocatable.cpu_milli - n.used.cpu_milli).max(0);
                    }
                }
                for (&i, c) in group {
                    if let Some(d) = nodes[i].labels.get(key)
                        && let Some(v) = cap.get_mut(d)
                    {
                        *v += c * req.requests.cpu_milli;
                    }
                }
                cap
            });
            let entry_of = |n: &NodeInfo| {
                targets
                    .iter()
                    .position(|(k, v, _)| n.labels.get(k) == Some(v))
            };
            let mut current = vec![0i64; targets.len()];
            for (&i, c) in group {
                if let Some(e) = entry_of(&nodes[i]) {
                    current[e] += c;
                }
            }
            let deficit: Vec<i64> = targets
                .iter()
                .zip(&current)
                .map(|((_, _, t), c)| t - c)
                .collect();
            let room = deficit.iter().any(|d| *d > 0);
            feasible.retain(|&i| {
                let ok = match entry_of(&nodes[i]) {
                    Some(e) => {
                        score[i].deficit = deficit[e];
                        !room || deficit[e] > 0
                    }
                    None => false,
                };
                if !ok {
                    *rejected.entry(Reason::Distribution).or_insert(0) += 1;
                }
                ok
            });
        }
        if let Some(sp) = &rules.spread {
            let nodes = &self.nodes;
            let mut counts: HashMap<&str, i64> = HashMap::new();
            for (&i, c) in group {
                if let Some(d) = nodes[i].labels.get(&sp.key) {
                    *counts.entry(d.as_str()).or_insert(0) += c;
                }
            }
            let used = counts.values().filter(|c| **c > 0).count();
            let capped = sp.max_groups.is_some_and(|m| used >= m);
            feasible.retain(|&i| {
                let ok = match nodes[i].labels.get(&sp.key) {
                    None => false,
                    Some(d) => !capped || counts.get(d.as_str()).copied().unwrap_or(0) > 0,
                };
                if !ok {
                    *rejected.entry(Reason::Spread).or_insert(0) += 1;
                }
                ok
            });
            let min = feasible
                .iter()
                .filter_map(|&i| nodes[i].labels.get(&sp.key))
                .map(|d| counts.get(d.as_str()).copied().unwrap_or(0))
                .min()
                .unwrap_or(0);
            let want_new = sp.min_groups.is_some_and(|m| used < m);
            feasible.retain(|&i| {
                let d = nodes[i].labels.get(&sp.key).map(String::as_str);
                let c = d.and_then(|d| counts.get(d)).copied().unwrap_or(0);
                if c + 1 - min > sp.max_skew {
                    *rejected.entry(Reason::Spread).or_insert(0) += 1;
                    return false;
                }
                score[i].spread -= c;
                if want_new && c == 0 {
                    score[i].new_group = 1;
                }
                true
            });
        }
        if rules.latency.is_some() {
            let cov = self.coverage(rules);
            let group = req
                .group
                .as_ref()
                .and_then(|g| self.groups.get(g))
                .unwrap_or(&empty);
            let covered = group
                .iter()
                .filter(|(_, c)| **c > 0)
                .fold(0u64, |m, (&i, _)| m | cov[i]);
            for &i in feasible.iter() {
                score[i].new_areas = i64::from((cov[i] & !covered).count_ones());
                score[i].in_range = i64::from(cov[i] != 0);
            }
        }
    }

    /// The filters that do not depend on what is bound: readiness, cordon, node
    /// selector, required affinity, taints, policy locations.
    fn static_ok(n: &NodeInfo, req: &PodRequest) -> bool {
        n.ready
            && !n.cordoned
            && Self::admits(n, req)
            && req.policy.as_ref().is_none_or(|p| p.allows(&n.labels))
    }

    /// Nodes passing [`Fleet::static_ok`] for pods like `req` (cached per signature).
    fn static_feasible(&mut self, req: &PodRequest) -> Arc<Vec<u32>> {
        self.static_feasible_by(Self::static_signature(req), req)
    }

    /// [`Fleet::static_feasible`] for a signature already computed.
    fn static_feasible_by(&mut self, sig: String, req: &PodRequest) -> Arc<Vec<u32>> {
        let nodes = &self.nodes;
        self.static_feasible
            .entry(sig)
            .or_insert_with(|| {
                Arc::new(
                    (0..nodes.len() as u32)
                        .filter(|&i| Self::static_ok(&nodes[i as usize], req))
                        .collect(),
                )
            })
            .clone()
    }

    /// What the static filters look at in a pod.
    fn static_signature(req: &PodRequest) -> String {
        format!(
            "{:?}|{:?}|{:?}|{}",
            req.node_selector,
            req.required_terms,
            req.tolerations,
            req.policy.as_ref().map_or("", |p| p.key.as_str())
        )
    }

    /// Each node's domain id for a topology key, and the domain names by id.
    fn domain_ids(&mut self, key: &str) -> Arc<DomainIndex> {
        let nodes = &self.nodes;
        self.domains
            .entry(key.to_owned())
            .or_insert_with(|| {
                let mut names: Vec<String> = Vec::new();
                let mut ids: HashMap<&str, u32> = HashMap::new();
                let per_node = nodes
                    .iter()
                    .map(|n| match n.labels.get(key) {
                        Some(d) => *ids.entry(d.as_str()).or_insert_with(|| {
                            names.push(d.clone());
                            names.len() as u32 - 1
                        }),
                        None => u32::MAX,
                    })
                    .collect();
                Arc::new((per_node, names))
            })
            .clone()
    }

    /// Whether `place_class` may use its incremental path for pods like `req`:
    /// at most one topology spread constraint, and no rule that scores a node by
    /// more than its own load and its spread domain.
    fn incremental(req: &PodRequest) -> bool {
        req.spread.len() <= 1
            && req.policy.as_ref().is_none_or(|p| {
                p.distribution.is_none() && p.spread.is_none() && !p.cheap_bandwidth
            })
    }

    /// For a replacement pod: per locality key (zone, city, region, best first),
    /// each node's domain id and the lost node's, when the lost node is known and
    /// has that label.
    fn near(&mut self, req: &PodRequest) -> Vec<(i64, Arc<DomainIndex>, u32)> {
        let Some(&lost) = req.replaces.as_deref().and_then(|n| self.index.get(n)) else {
            return Vec::new();
        };
        [ZONE_KEY, CITY_KEY, REGION_KEY]
            .iter()
            .enumerate()
            .filter_map(|(k, key)| {
                let ids = self.domain_ids(key);
                let at = ids.0[lost];
                (at != u32::MAX).then_some((3 - k as i64, ids, at))
            })
            .collect()
    }

    /// How near node `i` is to the lost node (3: same zone, 2: city, 1: region).
    fn locality(near: &[(i64, Arc<DomainIndex>, u32)], i: usize) -> i64 {
        near.iter()
            .find(|(_, ids, at)| ids.0[i] == *at)
            .map_or(0, |(l, _, _)| *l)
    }

    fn load_score(n: &NodeInfo, req: &PodRequest, most: bool) -> i64 {
        let frac = |a: i64, u: i64| if a <= 0 { 0 } else { ((a - u) * 1000) / a };
        let s = (frac(
            n.allocatable.cpu_milli,
            n.used.cpu_milli + req.requests.cpu_milli,
        ) + frac(n.allocatable.memory, n.used.memory + req.requests.memory))
            / 2;
        if most { -s } else { s }
    }

    /// Places `count` pods of one equivalence class (same template, same owner):
    /// the same choices as `count` calls of [`Fleet::place`], computed
    /// incrementally. The static filters run once per class signature; each spread
    /// domain keeps a heap of its nodes by load score, and a heap of domains by
    /// (matching pods, best node) picks the next node in O(log n). Only the chosen
    /// node's score changes with a placement, so the heaps stay exact; a node that
    /// stops fitting (capacity, anti-affinity) is dropped when it surfaces.
    pub fn place_class(&mut self, req: &PodRequest, count: usize) -> Vec<Placement> {
        if count <= 1 || !Self::incremental(req) {
            return (0..count).map(|_| self.place(req)).collect();
        }
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        // A latency objective: the first pods cover areas (each covers at least one
        // new area, or none is coverable any more); after them, nodes in range of
        // any area rank first, a static preference the heaps can hold.
        let mut out = Vec::with_capacity(count);
        let mut in_range: Option<Arc<Vec<u64>>> = None;
        if let Some(rules) = req.policy.as_ref().filter(|p| p.latency.is_some()) {
            let areas = rules.latency.as_ref().map_or(0, |l| l.areas.len());
            for _ in 0..areas.min(count) {
                out.push(self.place(req));
            }
            if out.len() == count {
                return out;
            }
            in_range = Some(self.coverage(rules));
        }
        // A replacement's nearness to its lost node outranks latency range, which
        // outranks load (as in the general path's order).
        let near = self.near(req);
        let rank = |i: usize, load: i64| -> i64 {
            let ranged = match &in_range {
                Some(cov) if cov[i] != 0 => load + 1_000_000,
                _ => load,
            };
            ranged + Self::locality(&near, i) * 10_000_000
        };
        let feasible = self.static_feasible(req);
        let most = req.policy.as_ref().is_some_and(|p| p.most_allocated);
        let spread = req.spread.first();
        let doms = match spread {
            Some(c) => self.domain_ids(&c.topology_key),
            None => Arc::new((vec![0; self.nodes.len()], vec![String::new()])),
        };
        let (dom_of, names) = (&doms.0, &doms.1);
        let ndom = names.len();
        let mut counts = vec![0i64; ndom];
        let mut self_match = false;
        if let Some(c) = spread {
            let all = self.domain_counts(c).clone();
            for (d, name) in names.iter().enumerate() {
                counts[d] = all.get(name).copied().unwrap_or(0);
            }
            self_match =
                selector_matches(&c.label_selector.clone().unwrap_or_default(), &req.labels);
        }
        let mut per_domain: Vec<Vec<(i64, Reverse<u32>)>> = vec![Vec::new(); ndom];
        for &i in feasible.iter() {
            let d = dom_of[i as usize];
            if d == u32::MAX {
                // A node outside every domain: the general path decides.
                return (0..count).map(|_| self.place(req)).collect();
            }
            let n = &self.nodes[i as usize];
            per_domain[d as usize]
                .push((rank(i as usize, Self::load_score(n, req, most)), Reverse(i)));
        }
        // Only the best few nodes of a domain go into its heap; more come from the
        // reserve when the heap's best falls below the reserve's best.
        let k = (count / ndom.max(1)).max(1) * 2 + 8;
        let mut cands: Vec<Candidates> = per_domain
            .into_iter()
            .map(|v| Candidates::new(v, k))
            .collect();
        type DomKey = (Reverse<i64>, (i64, Reverse<u32>), u32);
        let mut by_domain: BinaryHeap<DomKey> = cands
            .iter_mut()
            .enumerate()
            .filter_map(|(d, c)| c.top().map(|t| (Reverse(counts[d]), t, d as u32)))
            .collect();
        while out.len() < count {
            let Some((Reverse(c), top, d)) = by_domain.pop() else {
                break;
            };
            let d = d as usize;
            if c != counts[d] || cands[d].top() != Some(top) {
                continue; // stale entry
            }
            let Some((_, Reverse(i))) = cands[d].heap.pop() else {
                continue;
            };
            let i = i as usize;
            if self.filter(&self.nodes[i], req).is_ok() {
                let name = self.nodes[i].name.clone();
                self.bind(&name, req);
                if self_match {
                    counts[d] += 1;
                }
                cands[d].heap.push((
                    rank(i, Self::load_score(&self.nodes[i], req, most)),
                    Reverse(i as u32),
                ));
                out.push(Placement::Node(name));
            }
            if let Some(t) = cands[d].top() {
                by_domain.push((Reverse(counts[d]), t, d as u32));
            }
        }
        // Out of nodes: the general path explains why (and places, if a node that
        // was dropped for anti-affinity fits after all, which it cannot).
        while out.len() < count {
            match self.place(req) {
                Placement::Node(n) => out.push(Placement::Node(n)),
                Placement::Unschedulable(m) => {
                    let left = count - out.len();
                    out.extend((0..left).map(|_| Placement::Unschedulable(m.clone())));
                }
            }
        }
        out
    }

    /// Places one pod and records it on the chosen node.
    pub fn place(&mut self, req: &PodRequest) -> Placement {
        let latency = req.policy.as_ref().is_some_and(|p| p.latency.is_some());
        if Self::incremental(req) && !latency {
            let sig = Self::static_signature(req);
            let feasible = self.static_feasible_by(sig.clone(), req);
            if feasible.is_empty() {
                // Only static causes (labels, taints, readiness, cordons): the
                // same explanation until one of them changes.
                if let Some(m) = self.static_unplaceable.get(&sig) {
                    return Placement::Unschedulable(m.clone());
                }
                let placed = self.place_general(req);
                if let Placement::Unschedulable(m) = &placed {
                    self.static_unplaceable.insert(sig, m.clone());
                }
                return placed;
            }
            if let Some(name) = self.place_fast(req, &feasible) {
                return Placement::Node(name);
            }
        }
        self.place_general(req)
    }

    /// One pass over `feasible`, the nodes that pass the static filters, with domain ids
    /// instead of label lookups: the choice [`Fleet::place_general`] makes, for
    /// requests [`Fleet::incremental`] accepts without a latency objective. `None`
    /// when the general path must decide: nothing fits (it explains why), or a
    /// fitting node lacks the spread key.
    fn place_fast(&mut self, req: &PodRequest, feasible: &[u32]) -> Option<String> {
        use std::cmp::Reverse;
        let spread = req.spread.first();
        let doms = spread.map(|c| self.domain_ids(&c.topology_key));
        let counts: Vec<i64> = match (spread, &doms) {
            (Some(c), Some(d)) => {
                let all = self.domain_counts(c);
                d.1.iter()
                    .map(|name| all.get(name).copied().unwrap_or(0))
                    .collect()
            }
            _ => Vec::new(),
        };
        let near = self.near(req);
        let most = req.policy.as_ref().is_some_and(|p| p.most_allocated);
        let mut best: Option<(i64, i64, i64, Reverse<u32>)> = None;
        for &i in feasible.iter() {
            let n = &self.nodes[i as usize];
            if Self::fits(n, req).is_err() {
                continue;
            }
            let count = match &doms {
                Some(d) => match d.0[i as usize] {
                    u32::MAX => return None,
                    id => counts[id as usize],
                },
                None => 0,
            };
            let key = (
                -count,
                Self::locality(&near, i as usize),
                Self::load_score(n, req, most),
                Reverse(i),
            );
            if best.is_none_or(|b| key > b) {
                best = Some(key);
            }
        }
        let (.., Reverse(i)) = best?;
        let name = self.nodes[i as usize].name.clone();
        self.bind(&name, req);
        Some(name)
    }

    /// The general path: every filter and score on every node. The reference the
    /// faster paths ([`Fleet::place_class`], the fast path of [`Fleet::place`])
    /// must agree with, and the one that explains an unschedulable pod.
    pub fn place_general(&mut self, req: &PodRequest) -> Placement {
        let mut rejected: BTreeMap<Reason, usize> = BTreeMap::new();
        let mut feasible = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            match self.filter(n, req) {
                Ok(()) => feasible.push(i),
                Err(r) => *rejected.entry(r).or_insert(0) += 1,
            }
        }
        // Topology spread: hard constraints remove nodes; all add to the score.
        let mut spread_penalty = vec![0i64; self.nodes.len()];
        for c in &req.spread {
            let all = self.domain_counts(c).clone();
            // Kubernetes semantics: the minimum is over the domains of eligible nodes.
            let mut counts: HashMap<&str, i64> = HashMap::new();
            for &i in &feasible {
                if let Some(d) = self.nodes[i].labels.get(&c.topology_key) {
                    counts.insert(d.as_str(), all.get(d).copied().unwrap_or(0));
                }
            }
            let min = counts.values().copied().min().unwrap_or(0);
            let hard = c.when_unsatisfiable == "DoNotSchedule";
            feasible.retain(|&i| {
                let Some(domain) = self.nodes[i].labels.get(&c.topology_key) else {
                    if hard {
                        *rejected.entry(Reason::Spread).or_insert(0) += 1;
                    }
                    return !hard;
                };
                let count = counts.get(domain.as_str()).copied().unwrap_or(0);
                spread_penalty[i] += count;
                if hard && count + 1 - min > i64::from(c.max_skew) {
                    *rejected.entry(Reason::Spread).or_insert(0) += 1;
                    return false;
                }
                true
            });
        }
        let mut score = Vec::new();
        if let Some(rules) = &req.policy {
            score = vec![PolicyScore::default(); self.nodes.len()];
            self.apply_policy(req, rules, &mut feasible, &mut rejected, &mut score);
        }
        // Where the lost pod this one replaces was: same zone, city, region.
        let lost = req
            .replaces
            .as_deref()
            .and_then(|n| self.node(n))
            .map(|n| [ZONE_KEY, CITY_KEY, REGION_KEY].map(|k| n.labels.get(k).cloned()));
        let most = req.policy.as_ref().is_some_and(|p| p.most_allocated);
        let cheap = req.policy.as_ref().is_some_and(|p| p.cheap_bandwidth);
        let best = feasible.iter().copied().max_by_key(|&i| {
            let n = &self.nodes[i];
            let alloc = Self::load_score(n, req, most);
            let locality = lost.as_ref().map_or(0, |l| {
                l.iter()
                    .zip([ZONE_KEY, CITY_KEY, REGION_KEY])
                    .position(|(v, k)| v.is_some() && n.labels.get(k) == v.as_ref())
                    .map_or(0, |p| 3 - p as i64)
            });
            let price = if cheap {
                -((n.bandwidth_price.unwrap_or(0.0) * 1000.0) as i64)
            } else {
                0
            };
            let p = score.get(i).copied().unwrap_or_default();
            // Policy shares first, then latency coverage, new groups, spread, the
            // lost pod's place, cost, free capacity, and a stable tie-break.
            (
                (p.deficit, p.new_areas, p.new_group),
                (p.spread - spread_penalty[i], locality, p.in_range, price),
                alloc,
                std::cmp::Reverse(i),
            )
        });
        match best {
            Some(i) => {
                let name = self.nodes[i].name.clone();
                self.bind(&name, req);
                Placement::Node(name)
            }
            None => {
                let parts: Vec<String> = rejected
                    .iter()
                    .map(|(r, n)| format!("{n} {}", r.text()))
                    .collect();
                let policy = req
                    .policy
                    .as_ref()
                    .map(|p| format!(" (placement policy {})", p.name))
                    .unwrap_or_default();
                Placement::Unschedulable(format!(
                    "0/{} nodes are available: {}.{policy}",
                    self.nodes.len(),
                    if parts.is_empty() {
                        "no nodes".to_owned()
                    } else {
                        parts.join(", ")
                    }
                ))
            }
        }
    }
}

/// The candidate nodes of one spread domain for a class: a heap of the best
/// (score, node) and an unsorted reserve of the rest, whose scores cannot change
/// (only chosen nodes change, and chosen nodes come from the heap).
struct Candidates {
    heap: std::collections::BinaryHeap<(i64, std::cmp::Reverse<u32>)>,
    reserve: Vec<(i64, std::cmp::Reverse<u32>)>,
    reserve_best: Option<(i64, std::cmp::Reverse<u32>)>,
    k: usize,
}

impl Candidates {
    fn new(all: Vec<(i64, std::cmp::Reverse<u32>)>, k: usize) -> Candidates {
        let mut c = Candidates {
            heap: Default::default(),
            reserve: all,
            reserve_best: None,
            k,
        };
        c.refill();
        c
    }

    /// Moves the best `k` of the reserve into the heap.
    fn refill(&mut self) {
        if self.reserve.len() > self.k {
            self.reserve.select_nth_unstable_by(self.k, |a, b| b.cmp(a));
            let rest = self.reserve.split_off(self.k);
            self.heap.extend(self.reserve.drain(..));
            self.reserve = rest;
        } else {
            self.heap.extend(self.reserve.drain(..));
        }
        self.reserve_best = self.reserve.iter().max().copied();
    }

    /// The best candidate, refilling from the reserve when it holds a better one.
    fn top(&mut self) -> Option<(i64, std::cmp::Reverse<u32>)> {
        while let Some(best) = self.reserve_best {
            match self.heap.peek() {
                Some(t) if *t >= best => break,
                _ => self.refill(),
            }
        }
        self.heap.peek().copied()
    }
}

/// What a policy adds to a node's score for one pod (higher is better).
#[derive(Clone, Copy, Debug, Default)]
struct PolicyScore {
    deficit: i64,
    new_areas: i64,
    new_group: i64,
    spread: i64,
    in_range: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slimmed_node_gives_the_same_node_info_and_keeps_nothing_else() {
        let full: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "resourceVersion": "42", "uid": "u-1",
                "labels": {"topology.meridian.io/city": "lisbon", "meridian.io/bandwidth-price": "0.02"},
                "annotations": {
                    (geo::COORDINATES_ANNOTATION): "38.7223,-9.1393",
                    (geo::MEASURED_RTT_ANNOTATION): "madrid=9.5,paris=21",
                    "meridian.io/usage": "cpu=12%"},
                "managedFields": [{"manager": "region", "operation": "Update"}]},
            "spec": {"unschedulable": true, "podCIDR": "10.0.0.0/24",
                "taints": [{"key": "edge", "value": "x", "effect": "NoSchedule"}]},
            "status": {
                "capacity": {"cpu": "8", "memory": "16Gi", "pods": "110"},
                "allocatable": {"cpu": "7500m", "memory": "15Gi", "pods": "110", "nvidia.com/gpu": "1"},
                "conditions": [
                    {"type": "MemoryPressure", "status": "False", "reason": "Fine"},
                    {"type": "Ready", "status": "True", "reason": "AgentReady", "message": "ok",
                     "lastHeartbeatTime": "2026-11-29T00:00:00Z"}],
                "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                "nodeInfo": {"architecture": "arm64", "bootID": "", "containerRuntimeVersion": "c",
                    "kernelVersion": "6", "kubeProxyVersion": "", "kubeletVersion": "k",
                    "machineID": "", "operatingSystem": "linux", "osImage": "d", "systemUUID": ""}}
        }))
        .unwrap();
        let mut slim = full.clone();
        slim_node(&mut slim);
        let (a, b) = (NodeInfo::from_node(&full), NodeInfo::from_node(&slim));
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert!(b.ready && b.cordoned && b.coordinates.is_some());
        assert_eq!(b.measured_rtt.len(), 2);
        assert_eq!(b.allocatable.cpu_milli, 7500);
        assert_eq!(slim.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(slim.metadata.annotations.as_ref().unwrap().len(), 2);
        assert!(slim.metadata.managed_fields.is_none());
        let st = slim.status.as_ref().unwrap();
        assert!(st.capacity.is_none() && st.addresses.is_none() && st.node_info.is_none());
        let conditions = st.conditions.as_ref().unwrap();
        assert_eq!(conditions.len(), 1);
        assert!(conditions[0].message.is_none() && conditions[0].last_heartbeat_time.is_none());
        assert!(slim.spec.as_ref().unwrap().pod_cidr.is_none());
    }

    fn node(name: &str, city: &str, cpu: i64) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            labels: Labels::from([
                ("topology.meridian.io/city".into(), city.into()),
                ("kubernetes.io/hostname".into(), name.into()),
            ]),
            taints: vec![],
            allocatable: Resources {
                cpu_milli: cpu,
                memory: 8 << 30,
                ephemeral: 100 << 30,
                pods: 110,
                gpu: 0,
            },
            used: Resources::default(),
            ready: true,
            cordoned: false,
            pods: vec![],
            ..Default::default()
        }
    }

    fn pod(cpu: i64, app: &str) -> PodRequest {
        PodRequest {
            labels: Arc::new(Labels::from([("app".into(), app.into())])),
            requests: Resources {
                cpu_milli: cpu,
                pods: 1,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn candidates_yield_every_node_best_first_across_refills() {
        use std::cmp::Reverse;
        let all: Vec<(i64, Reverse<u32>)> = (0..50u32)
            .map(|i| (((i * 37) % 11) as i64, Reverse(i)))
            .collect();
        let mut sorted = all.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        let mut c = Candidates::new(all, 3);
        let mut got = Vec::new();
        while let Some(t) = c.top() {
            assert_eq!(c.heap.pop(), Some(t));
            got.push(t);
        }
        assert_eq!(got, sorted);
        // A chosen node comes back with a lower score and is ordered among the rest.
        let mut c = Candidates::new(vec![(9, Reverse(0)), (8, Reverse(1)), (7, Reverse(2))], 1);
        let first = c.top().unwrap();
        c.heap.pop();
        c.heap.push((first.0 - 5, first.1));
        assert_eq!(c.top(), Some((8, Reverse(1))));
        c.heap.pop();
        assert_eq!(c.top(), Some((7, Reverse(2))));
        c.heap.pop();
        assert_eq!(c.top(), Some((4, Reverse(0))));
    }

    #[test]
    fn an_explanation_of_static_causes_follows_readiness_changes() {
        let mut f = Fleet::new(vec![node("a", "Paris", 1000), node("b", "Tokyo", 1000)]);
        let mut paris = pod(100, "x");
        paris.node_selector = Labels::from([(CITY_KEY.into(), "Paris".into())]);
        let mut down = f.node("a").unwrap().clone();
        down.ready = false;
        f.update_node(down.clone());
        for _ in 0..2 {
            match f.place(&paris) {
                Placement::Unschedulable(m) => assert_eq!(
                    m,
                    "0/2 nodes are available: 1 node(s) not ready, 1 node(s) didn't match Pod's node selector."
                ),
                p => panic!("{p:?}"),
            }
        }
        let changes = f.changes();
        down.ready = true;
        f.update_node(down);
        assert!(f.changes() > changes);
        assert!(matches!(f.place(&paris), Placement::Node(n) if n == "a"));
    }

    #[test]
    fn never_overcommits_and_explains_by_cause() {
        let mut f = Fleet::new(vec![node("a", "Paris", 1000), node("b", "Tokyo", 1000)]);
        for _ in 0..4 {
            assert!(matches!(f.place(&pod(500, "x")), Placement::Node(_)));
        }
        match f.place(&pod(500, "x")) {
            Placement::Unschedulable(m) => {
                assert_eq!(m, "0/2 nodes are available: 2 Insufficient cpu.")
            }
            p => panic!("{p:?}"),
        }
        assert!(
            f.nodes
                .iter()
                .all(|n| n.used.cpu_milli <= n.allocatable.cpu_milli)
        );
    }

    #[test]
    fn spreads_replicas_across_cities_within_max_skew() {
        let mut f = Fleet::new(vec![
            node("p1", "Paris", 8000),
            node("p2", "Paris", 8000),
            node("t1", "Tokyo", 8000),
            node("n1", "NYC", 8000),
        ]);
        let mut req = pod(100, "web");
        req.spread = vec![TopologySpreadConstraint {
            topology_key: "topology.meridian.io/city".into(),
            max_skew: 1,
            when_unsatisfiable: "DoNotSchedule".into(),
            label_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([("app".into(), "web".into())])),
                ..Default::default()
            }),
            ..Default::default()
        }];
        let mut per_city: BTreeMap<String, i32> = BTreeMap::new();
        for _ in 0..9 {
            let Placement::Node(n) = f.place(&req) else {
                panic!("unschedulable")
            };
            let city =
                f.nodes.iter().find(|x| x.name == n).unwrap().labels["topology.meridian.io/city"]
                    .clone();
            *per_city.entry(city).or_default() += 1;
        }
        assert_eq!(
            per_city.values().copied().collect::<Vec<_>>(),
            vec![3, 3, 3]
        );
    }

    #[test]
    fn honours_selectors_taints_cordons_and_anti_affinity() {
        let mut tainted = node("gpu-1", "Paris", 4000);
        tainted.taints = vec![Taint {
            key: "gpu".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        }];
        let mut cordoned = node("c-1", "Paris", 4000);
        cordoned.cordoned = true;
        let mut f = Fleet::new(vec![tainted, cordoned, node("ok-1", "Tokyo", 4000)]);
        let mut req = pod(100, "db");
        req.anti_affinity = vec![LabelSelector {
            match_labels: Some(BTreeMap::from([("app".into(), "db".into())])),
            ..Default::default()
        }];
        assert!(matches!(f.place(&req), Placement::Node(n) if n == "ok-1"));
        match f.place(&req) {
            Placement::Unschedulable(m) => {
                assert!(m.contains("1 node(s) were unschedulable"), "{m}");
                assert!(m.contains("1 node(s) had untolerated taint"), "{m}");
                assert!(
                    m.contains("1 node(s) didn't satisfy pod anti-affinity rules"),
                    "{m}"
                );
            }
            p => panic!("{p:?}"),
        }
        req.tolerations = vec![Toleration {
            key: Some("gpu".into()),
            operator: Some("Exists".into()),
            ..Default::default()
        }];
        assert!(matches!(f.place(&req), Placement::Node(n) if n == "gpu-1"));
        let mut sel = pod(100, "x");
        sel.node_selector = Labels::from([("topology.meridian.io/city".into(), "Mars".into())]);
        assert!(
            matches!(f.place(&sel), Placement::Unschedulable(m) if m.contains("node selector"))
        );
    }
}
