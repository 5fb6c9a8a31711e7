//! Our own kinds, group `meridian.io`, version `v1alpha1`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const GROUP: &str = "meridian.io";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "meridian.io/v1alpha1";

/// A tenant: a virtual cluster with its own namespaces, sharing the edge fleet.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tenant {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What is asked for.
    #[serde(default)]
    pub spec: TenantSpec,
    /// What Meridian observed (written by the platform).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<TenantStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// A human-friendly name for consoles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Upper bound on the tenant's namespaces (none when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_namespaces: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

/// A request for a new bearer token of a tenant (`POST tenants/{name}/token`); the
/// answer carries the token once, in `status.token`. Only its hash is stored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantToken {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What Meridian observed (written by the platform).
    #[serde(default)]
    pub status: TenantTokenStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantTokenStatus {
    #[serde(default)]
    pub token: String,
}

/// An edge management cluster (a region), registered by the region itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeCluster {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What is asked for.
    #[serde(default)]
    pub spec: EdgeClusterSpec,
    /// Written by the region: phase, node counts, capacity, lastHeartbeatTime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeClusterSpec {
    /// URL of the region's agent hub and log API (`http://host:port`).
    #[serde(default)]
    pub endpoint: String,
    /// Upper bound on nodes the region accepts (none when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_nodes: Option<u32>,
    /// A draining region takes no new nodes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// Where and how a workload's replicas go: "N replicas across these cities".
/// Namespaced; applies to the workloads it names and to pods its selector matches.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementPolicy {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What is asked for.
    #[serde(default)]
    pub spec: PlacementPolicySpec,
    /// Written by the scheduler: where replicas are and which objectives are unmet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PlacementPolicyStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementPolicySpec {
    /// Workloads by kind and name (Deployment, ReplicaSet, Job; a DaemonSet's
    /// pods are placed by its controller, one per admitted node, and no policy
    /// applies to them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<WorkloadRef>,
    /// Pods by label, whatever created them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Which nodes may run the replicas (region, country, city, isp, source, machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locations: Option<Locations>,
    /// How many replicas go where: exact counts, static weights or free capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution: Option<Distribution>,
    /// Spread over the domains of a topology key (default: cities, max skew 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<Spread>,
    /// "Users in these areas must have a replica within N ms"; met or not in status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencyObjective>,
    /// When replicas of a lost node are replaced elsewhere (default after 300 s NotReady).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<Failover>,
    /// Scoring preferences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scoring: Option<Scoring>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// Deployment, ReplicaSet or Job.
    pub kind: String,
    /// The workload's name, in the policy's namespace.
    pub name: String,
}

/// Which nodes may run the replicas: any `include` term (all nodes when empty),
/// and no `exclude` term.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Locations {
    /// Nodes matching any of these terms (all nodes when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<LocationTerm>,
    /// Never nodes matching any of these terms.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<LocationTerm>,
}

/// A set of nodes: every non-empty field must match (each field is a list of
/// accepted values).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocationTerm {
    /// Region names (the EdgeClusters), e.g. eu-west.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    /// ISO 3166 country codes, e.g. DE.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub countries: Vec<String>,
    /// City names as in world-cities.csv, e.g. Frankfurt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cities: Vec<String>,
    /// Network operators, as nodes report them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub isps: Vec<String>,
    /// cdn | ens | third-party
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    /// physical | vm | arm-array
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<String>,
}

/// How many replicas go where. Exactly one of the three.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Distribution {
    /// Exact replica counts per location; they must add up to the workload's replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub counts: Vec<LocationShare>,
    /// Static weights per location; replicas are divided in proportion.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<LocationShare>,
    /// Dynamic weights: replicas divided in proportion to the free cpu of each
    /// domain of this topology key (e.g. `topology.kubernetes.io/region`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_capacity: Option<String>,
}

/// One location (exactly one of region, country, city) and its share.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocationShare {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    /// For `counts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// For `weights`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
}

impl LocationShare {
    /// (node label key, value) this location selects.
    pub fn label(&self) -> Option<(&'static str, String)> {
        match (&self.region, &self.country, &self.city) {
            (Some(r), None, None) => Some((REGION_KEY, r.clone())),
            (None, Some(c), None) => Some((COUNTRY_KEY, c.clone())),
            (None, None, Some(c)) => Some((CITY_KEY, crate::geo::city_label(c))),
            _ => None,
        }
    }
}

/// Spread over the domains of a topology key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Spread {
    /// Default `topology.meridian.io/city`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_key: Option<String>,
    /// Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_skew: Option<i32>,
    /// Use at least this many domains (when that many are feasible).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_groups: Option<i32>,
    /// Never use more than this many domains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_groups: Option<i32>,
}

/// "Users in these areas must have a replica within `maxRttMs`."
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LatencyObjective {
    /// Round-trip time users may have to their nearest replica, in milliseconds.
    pub max_rtt_ms: f64,
    /// Where the users are.
    pub areas: Vec<Area>,
}

/// A city of `world-cities.csv`, or a point and radius.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Area {
    /// Defaults to the city name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lat: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lon: Option<f64>,
    /// Users up to this far from the point (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub radius_km: Option<f64>,
}

impl Area {
    /// (name, (lat, lon), radius km), or why not.
    pub fn resolve(&self) -> Result<(String, (f64, f64), f64), String> {
        let radius = self.radius_km.unwrap_or(0.0);
        match (&self.city, self.lat, self.lon) {
            (Some(c), None, None) => {
                let city = crate::geo::city(c).ok_or_else(|| {
                    format!(
                        "unknown city {c:?} (not in world-cities.csv); give lat and lon instead"
                    )
                })?;
                Ok((
                    self.name.clone().unwrap_or_else(|| city.name.clone()),
                    (city.lat, city.lon),
                    radius,
                ))
            }
            (None, Some(lat), Some(lon)) => Ok((
                self.name.clone().unwrap_or_else(|| format!("{lat},{lon}")),
                (lat, lon),
                radius,
            )),
            _ => Err("give either city, or lat and lon".into()),
        }
    }
}

/// What happens when a replica's node stops answering.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Failover {
    /// Seconds NotReady before the replica is replaced elsewhere (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_seconds: Option<u32>,
    /// Never move: wait for the node to come back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pin: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Scoring {
    /// `LeastAllocated` (spread load, the default) or `MostAllocated` (bin-pack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Prefer nodes with a lower `node.meridian.io/bandwidth-price` label.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prefer_cheap_bandwidth: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementPolicyStatus {
    /// Active replicas per city of the selected pods.
    #[serde(default)]
    pub replicas_by_city: std::collections::BTreeMap<String, i32>,
    /// Active replicas (bound or pending).
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub pending: i32,
    /// One entry per objective (counts, spread, latency area).
    #[serde(default)]
    pub objectives: Vec<ObjectiveStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectiveStatus {
    /// `Count`, `MinGroups`, `Latency`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The location or area.
    pub target: String,
    pub met: bool,
    pub message: String,
}

pub const REGION_KEY: &str = "topology.kubernetes.io/region";
pub const ZONE_KEY: &str = "topology.kubernetes.io/zone";
pub const COUNTRY_KEY: &str = "topology.meridian.io/country";
pub const CITY_KEY: &str = "topology.meridian.io/city";
pub const ISP_KEY: &str = "topology.meridian.io/isp";
pub const SOURCE_KEY: &str = "node.meridian.io/source";
pub const MACHINE_KEY: &str = "node.meridian.io/machine";
pub const BANDWIDTH_PRICE_KEY: &str = "node.meridian.io/bandwidth-price";
/// Node label naming the region (EdgeCluster) that manages the node. Also a pod
/// field selector, `meridian.io/region=<region>`: the region of the pod's node
/// when the pod was last written (how each region watches only its own pods).
pub const REGION_LABEL: &str = "meridian.io/region";
/// Pod annotation: how long the pod's node may be unreachable before the pod is
/// replaced (`300s`, or `never`). Set from the policy's `failover` at binding.
pub const RESCHEDULE_GRACE_ANNOTATION: &str = "meridian.io/reschedule-grace";
/// Pod annotation: the node whose lost pod this one replaces (placement prefers
/// the same zone, then city, then region).
pub const REPLACES_NODE_ANNOTATION: &str = "meridian.io/replaces-node";

/// User-set protection against accidental and runaway deletion. `RiskPolicy` is
/// namespaced (a tenant's, covering objects of its own namespace);
/// `ClusterRiskPolicy` is the admin's and may select namespaces and nodes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RiskPolicy {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What is asked for.
    #[serde(default)]
    pub spec: RiskPolicySpec,
    /// Written by the API server: budgets in use and the last denials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<RiskPolicyStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RiskPolicySpec {
    /// `Enforce` (default) denies; `Audit` allows and records what it would deny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default)]
    pub selector: RiskSelector,
    #[serde(default)]
    pub rules: RiskRules,
}

/// Which objects a policy covers; every given criterion must match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RiskSelector {
    /// Kinds (`Pod`, `Deployment`, ...); empty: every kind.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<String>,
    /// Object names; empty: any name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Namespaces (ClusterRiskPolicy only); empty: every namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<LabelSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RiskRules {
    /// No deletion at all inside these windows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_windows: Vec<DenyWindow>,
    /// At most `count` deletions per `period`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub max_deletions: Vec<DeletionBudget>,
    /// Deletion needs an unlock: the annotation `risk.meridian.io/unlock-until` set
    /// to a time at most 24 hours ahead.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub protect: bool,
}

/// Either a recurring window (`schedule`, a five-field cron expression for its
/// start, and `duration`) or an absolute one (`start`, `end`); in `timeZone`
/// (IANA name, default UTC).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DenyWindow {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeletionBudget {
    pub count: Option<i64>,
    /// `30m`, `24h`, ...
    #[serde(default)]
    pub period: String,
    /// What one budget covers: `Object`, `Workload` (default: a pod counts against
    /// its Deployment, ReplicaSet, DaemonSet or Job), `Namespace` or `Policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RiskPolicyStatus {
    /// Budgets with deletions inside their period.
    #[serde(default)]
    pub budgets: Vec<BudgetStatus>,
    /// The most recent denials (audit mode: would-be denials), newest first.
    #[serde(default)]
    pub last_denials: Vec<DenialRecord>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BudgetStatus {
    /// `maxDeletions[0]`.
    pub rule: String,
    /// `Deployment/web`, `namespace/acme`, ...
    pub scope: String,
    pub used: i64,
    pub limit: i64,
    /// When the oldest counted deletion leaves the period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frees_at: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DenialRecord {
    pub time: String,
    pub user: String,
    /// `pods/web-1`.
    pub object: String,
    pub rule: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub audit_only: bool,
}

/// Object annotation that unlocks a protected object until the given time
/// (RFC 3339, at most 24 hours ahead).
pub const UNLOCK_ANNOTATION: &str = "risk.meridian.io/unlock-until";

/// Warms images onto nodes ahead of a rollout: every region pulls them through
/// its image cache onto its connected nodes that match `nodeSelector`, and reports
/// per region how many nodes have them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImagePrePull {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What is asked for.
    #[serde(default)]
    pub spec: ImagePrePullSpec,
    /// Written by the regions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ImagePrePullStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImagePrePullSpec {
    /// Image references, as in a container's `image`.
    #[serde(default)]
    pub images: Vec<String>,
    /// Nodes whose labels match all of these (every node when empty).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImagePrePullStatus {
    /// Per region: nodes targeted, how many have every image, failures.
    #[serde(default)]
    pub regions: BTreeMap<String, RegionPrePull>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegionPrePull {
    #[serde(default)]
    pub observed_generation: i64,
    #[serde(default)]
    pub nodes: i64,
    #[serde(default)]
    pub pulled: i64,
    #[serde(default)]
    pub failed: i64,
    /// The first failures, `node: image: why`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
}

/// Most images one ImagePrePull may name.
pub const MAX_PREPULL_IMAGES: usize = 20;
