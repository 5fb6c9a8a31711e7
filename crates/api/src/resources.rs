//! The resource registry: every kind the API serves, where it is stored and how an
//! incoming object is normalised and validated.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Node, Pod, Secret, Service};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{ApiError, Cause};
use crate::meridian::{self, EdgeCluster, ImagePrePull, PlacementPolicy, RiskPolicy, Tenant};
use crate::validation::{self as v, NameRule};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Namespaced,
    Cluster,
}

/// What a tenant may do with a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TenantAccess {
    /// Invisible to tenants.
    None,
    /// get, list, watch over the whole fleet (Nodes).
    ReadOnly,
    /// Every verb, restricted to the tenant's own namespaces.
    Own,
}

type Normalize = fn(Value, &mut Vec<Cause>) -> Result<Value, String>;

/// The kind's schema in the OpenAPI documents (`kubectl explain`): usually a `$ref`
/// to its type's definition, generated from the same type the server decodes into.
pub type SchemaFn = fn(&mut schemars::SchemaGenerator) -> schemars::Schema;

/// One served resource.
#[derive(Debug)]
pub struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub short_names: &'static [&'static str],
    pub scope: Scope,
    pub has_status: bool,
    pub has_scale: bool,
    pub tenant_access: TenantAccess,
    pub name_rule: NameRule,
    /// Field paths usable in field selectors besides metadata.name/namespace.
    pub fields: &'static [&'static str],
    normalize: Normalize,
    pub schema: SchemaFn,
}

fn typed<T: DeserializeOwned + Serialize>(
    value: Value,
    causes: &mut Vec<Cause>,
    check: impl Fn(&T, &mut Vec<Cause>),
) -> Result<Value, String> {
    let t: T = serde_json::from_value(value).map_err(|e| e.to_string())?;
    check(&t, causes);
    serde_json::to_value(&t).map_err(|e| e.to_string())
}

/// `typed`, with Kubernetes' defaults applied before the checks.
fn defaulted<T: DeserializeOwned + Serialize>(
    value: Value,
    causes: &mut Vec<Cause>,
    default: fn(&mut T),
    check: impl Fn(&T, &mut Vec<Cause>),
) -> Result<Value, String> {
    let mut t: T = serde_json::from_value(value).map_err(|e| e.to_string())?;
    default(&mut t);
    check(&t, causes);
    serde_json::to_value(&t).map_err(|e| e.to_string())
}

fn check_pod(p: &Pod, c: &mut Vec<Cause>) {
    match &p.spec {
        Some(spec) => v::check_pod_spec(spec, "spec", c),
        None => c.push(Cause::required("spec")),
    }
}

fn check_deployment(d: &Deployment, c: &mut Vec<Cause>) {
    let Some(spec) = &d.spec else {
        return c.push(Cause::required("spec"));
    };
    v::check_non_negative(spec.replicas, "spec.replicas", c);
    v::check_non_negative(spec.revision_history_limit, "spec.revisionHistoryLimit", c);
    v::check_selector_and_template(Some(&spec.selector), Some(&spec.template), c);
    if let Some(t) = spec.strategy.as_ref().and_then(|s| s.type_.as_deref())
        && !matches!(t, "RollingUpdate" | "Recreate")
    {
        c.push(Cause::invalid(
            "spec.strategy.type",
            t,
            "supported values: \"Recreate\", \"RollingUpdate\"",
        ));
    }
    check_always_restart(spec.template.spec.as_ref(), c);
}

fn check_always_restart(spec: Option<&k8s_openapi::api::core::v1::PodSpec>, c: &mut Vec<Cause>) {
    if let Some(rp) = spec.and_then(|s| s.restart_policy.as_deref())
        && rp != "Always"
    {
        c.push(Cause::invalid(
            "spec.template.spec.restartPolicy",
            rp,
            "supported values: \"Always\"",
        ));
    }
}

fn check_replicaset(r: &ReplicaSet, c: &mut Vec<Cause>) {
    let Some(spec) = &r.spec else {
        return c.push(Cause::required("spec"));
    };
    v::check_non_negative(spec.replicas, "spec.replicas", c);
    v::check_selector_and_template(Some(&spec.selector), spec.template.as_ref(), c);
    check_always_restart(spec.template.as_ref().and_then(|t| t.spec.as_ref()), c);
}

fn check_daemonset(d: &DaemonSet, c: &mut Vec<Cause>) {
    let Some(spec) = &d.spec else {
        return c.push(Cause::required("spec"));
    };
    v::check_selector_and_template(Some(&spec.selector), Some(&spec.template), c);
    check_always_restart(spec.template.spec.as_ref(), c);
}

fn check_job(j: &Job, c: &mut Vec<Cause>) {
    let Some(spec) = &j.spec else {
        return c.push(Cause::required("spec"));
    };
    v::check_non_negative(spec.parallelism, "spec.parallelism", c);
    v::check_non_negative(spec.completions, "spec.completions", c);
    v::check_non_negative(spec.backoff_limit, "spec.backoffLimit", c);
    if let Some(ads) = spec.active_deadline_seconds
        && ads <= 0
    {
        c.push(Cause::invalid(
            "spec.activeDeadlineSeconds",
            &ads.to_string(),
            "must be greater than 0",
        ));
    }
    match &spec.template.spec {
        None => c.push(Cause::required("spec.template.spec")),
        Some(ps) => {
            v::check_pod_spec(ps, "spec.template.spec", c);
            match ps.restart_policy.as_deref() {
                Some("OnFailure" | "Never") => {}
                other => c.push(Cause::invalid(
                    "spec.template.spec.restartPolicy",
                    other.unwrap_or(""),
                    "supported values: \"OnFailure\", \"Never\"",
                )),
            }
        }
    }
}

fn check_service(s: &Service, c: &mut Vec<Cause>) {
    let Some(spec) = &s.spec else { return };
    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut names = std::collections::HashSet::new();
    for (i, p) in ports.iter().enumerate() {
        if !(1..=65535).contains(&p.port) {
            c.push(Cause::invalid(
                format!("spec.ports[{i}].port"),
                &p.port.to_string(),
                "must be between 1 and 65535, inclusive",
            ));
        }
        if ports.len() > 1 && p.name.as_deref().is_none_or(str::is_empty) {
            c.push(Cause::required(format!("spec.ports[{i}].name")));
        }
        if let Some(n) = &p.name
            && !names.insert(n.clone())
        {
            c.push(Cause::duplicate(format!("spec.ports[{i}].name"), n));
        }
    }
    if let Some(t) = &spec.type_
        && !matches!(
            t.as_str(),
            "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
        )
    {
        c.push(Cause::invalid(
            "spec.type",
            t,
            "supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\"",
        ));
    }
}

fn check_configmap(m: &ConfigMap, c: &mut Vec<Cause>) {
    v::check_data_keys(m.data.iter().flat_map(|d| d.keys()), "data", c);
    v::check_data_keys(m.binary_data.iter().flat_map(|d| d.keys()), "binaryData", c);
}

fn check_secret(s: &Secret, c: &mut Vec<Cause>) {
    v::check_data_keys(s.data.iter().flat_map(|d| d.keys()), "data", c);
    v::check_data_keys(s.string_data.iter().flat_map(|d| d.keys()), "stringData", c);
}

fn check_event(e: &Event, c: &mut Vec<Cause>) {
    if e.involved_object.kind.as_deref().is_none_or(str::is_empty) {
        c.push(Cause::required("involvedObject.kind"));
    }
}

fn check_tenant(t: &Tenant, c: &mut Vec<Cause>) {
    if let Some(n) = &t.metadata.name
        && (n == "system" || n.contains('.'))
    {
        c.push(Cause::invalid(
            "metadata.name",
            n,
            "\"system\" is reserved for the platform",
        ));
    }
}

fn none<T>(_: &T, _: &mut Vec<Cause>) {}

const COMMON: Resource = Resource {
    group: "",
    version: "v1",
    kind: "",
    plural: "",
    singular: "",
    short_names: &[],
    scope: Scope::Namespaced,
    has_status: false,
    has_scale: false,
    tenant_access: TenantAccess::Own,
    name_rule: NameRule::Subdomain,
    fields: &[],
    normalize: |v, _| Ok(v),
    schema: |_| schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
};

pub static RESOURCES: &[Resource] = &[
    Resource {
        kind: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        short_names: &["ns"],
        scope: Scope::Cluster,
        has_status: true,
        name_rule: NameRule::Label,
        fields: &["status.phase"],
        normalize: |v, c| typed::<Namespace>(v, c, none),
        schema: |g| g.subschema_for::<Namespace>(),
        ..COMMON
    },
    Resource {
        kind: "Pod",
        plural: "pods",
        singular: "pod",
        short_names: &["po"],
        has_status: true,
        fields: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
            // Derived: the node's region label (see `REGION_LABEL`).
            crate::meridian::REGION_LABEL,
        ],
        normalize: |v, c| defaulted::<Pod>(v, c, crate::defaults::pod, check_pod),
        schema: |g| g.subschema_for::<Pod>(),
        ..COMMON
    },
    Resource {
        kind: "Node",
        plural: "nodes",
        singular: "node",
        short_names: &["no"],
        scope: Scope::Cluster,
        has_status: true,
        tenant_access: TenantAccess::ReadOnly,
        fields: &["spec.unschedulable"],
        normalize: |v, c| typed::<Node>(v, c, none),
        schema: |g| g.subschema_for::<Node>(),
        ..COMMON
    },
    Resource {
        kind: "Service",
        plural: "services",
        singular: "service",
        short_names: &["svc"],
        has_status: true,
        name_rule: NameRule::Dns1035,
        normalize: |v, c| defaulted::<Service>(v, c, crate::defaults::service, check_service),
        schema: |g| g.subschema_for::<Service>(),
        ..COMMON
    },
    Resource {
        kind: "ConfigMap",
        plural: "configmaps",
        singular: "configmap",
        short_names: &["cm"],
        normalize: |v, c| typed::<ConfigMap>(v, c, check_configmap),
        schema: |g| g.subschema_for::<ConfigMap>(),
        ..COMMON
    },
    Resource {
        kind: "Secret",
        plural: "secrets",
        singular: "secret",
        fields: &["type"],
        normalize: |v, c| typed::<Secret>(v, c, check_secret),
        schema: |g| g.subschema_for::<Secret>(),
        ..COMMON
    },
    Resource {
        kind: "Event",
        plural: "events",
        singular: "event",
        short_names: &["ev"],
        fields: &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        normalize: |v, c| typed::<Event>(v, c, check_event),
        schema: |g| g.subschema_for::<Event>(),
        ..COMMON
    },
    Resource {
        group: "apps",
        kind: "Deployment",
        plural: "deployments",
        singular: "deployment",
        short_names: &["deploy"],
        has_status: true,
        has_scale: true,
        normalize: |v, c| {
            defaulted::<Deployment>(v, c, crate::defaults::deployment, check_deployment)
        },
        schema: |g| g.subschema_for::<Deployment>(),
        ..COMMON
    },
    Resource {
        group: "apps",
        kind: "ReplicaSet",
        plural: "replicasets",
        singular: "replicaset",
        short_names: &["rs"],
        has_status: true,
        has_scale: true,
        fields: &["status.replicas"],
        normalize: |v, c| {
            defaulted::<ReplicaSet>(v, c, crate::defaults::replicaset, check_replicaset)
        },
        schema: |g| g.subschema_for::<ReplicaSet>(),
        ..COMMON
    },
    Resource {
        group: "apps",
        kind: "DaemonSet",
        plural: "daemonsets",
        singular: "daemonset",
        short_names: &["ds"],
        has_status: true,
        normalize: |v, c| defaulted::<DaemonSet>(v, c, crate::defaults::daemonset, check_daemonset),
        schema: |g| g.subschema_for::<DaemonSet>(),
        ..COMMON
    },
    Resource {
        group: "batch",
        kind: "Job",
        plural: "jobs",
        singular: "job",
        has_status: true,
        fields: &["status.successful"],
        normalize: |v, c| defaulted::<Job>(v, c, crate::defaults::job, check_job),
        schema: |g| g.subschema_for::<Job>(),
        ..COMMON
    },
    Resource {
        group: "coordination.k8s.io",
        kind: "Lease",
        plural: "leases",
        singular: "lease",
        normalize: |v, c| typed::<Lease>(v, c, none),
        schema: |g| g.subschema_for::<Lease>(),
        ..COMMON
    },
    Resource {
        group: meridian::GROUP,
        version: meridian::VERSION,
        kind: "Tenant",
        plural: "tenants",
        singular: "tenant",
        scope: Scope::Cluster,
        has_status: true,
        tenant_access: TenantAccess::None,
        name_rule: NameRule::Label,
        normalize: |v, c| typed::<Tenant>(v, c, check_tenant),
        schema: |g| g.subschema_for::<Tenant>(),
        ..COMMON
    },
    Resource {
        group: meridian::GROUP,
        version: meridian::VERSION,
        kind: "EdgeCluster",
        plural: "edgeclusters",
        singular: "edgecluster",
        short_names: &["ec"],
        scope: Scope::Cluster,
        has_status: true,
        tenant_access: TenantAccess::None,
        normalize: |v, c| typed::<EdgeCluster>(v, c, check_edgecluster),
        schema: |g| g.subschema_for::<EdgeCluster>(),
        ..COMMON
    },
    Resource {
        group: meridian::GROUP,
        version: meridian::VERSION,
        kind: "BulkBinding",
        plural: "bulkbindings",
        singular: "bulkbinding",
        scope: Scope::Cluster,
        tenant_access: TenantAccess::None,
        normalize: |v, _| Ok(v),
        schema: |_| {
            schemars::json_schema!({"type": "object",
                "description": "Many pod bindings in one request (the scheduler's): `items`, each a pods/binding body with the pod's namespace.",
                "x-kubernetes-preserve-unknown-fields": true})
        },
        ..COMMON
    },
    Resource {
        group: meridian::GROUP,
        version: meridian::VERSION,
        kind: "BulkPod",
        plural: "bulkpods",
        singular: "bulkpod",
        scope: Scope::Cluster,
        tenant_access: TenantAccess::None,
        normalize: |v, _| Ok(v),
        schema: |_| {
            schemars::json_schema!({"type": "object",
                "description": "Many pods created in one request (the ReplicaSet controller's): `items`, each a Pod with its namespace.",
                "x-kubernetes-preserve-unknown-fields": true})
        },
        ..COMMON
    },
    Resource {
        group: meridian::GROUP,
        version: meridian::VERSION,
        kind: "BulkPodStatus",
        plural: "bulkpodstatuses",
        singular: "bulkpodstatus",
        scope: Scope::Cluster,
        tenant_access: TenantAccess::None,
        normalize: |v, _| Ok(v),
        schema: |_| {
            schemars::json_schema!({"type": "object",
                "description": "Many pod status updates in one request (the regions'): `items`, each a pod's namespace, name and status, applied as a merge patch of its status.",
                "x-kubernetes-preserve-unknown-fields": true})
        },
        ..COMMON
    },
    Resource {
        group: meridian::GROUP,
        version: meridian::VERSION,
        kind: "BulkNodeStatus",
        plural: "bulknodestatuses",
        singular: "bulknodestatus",
        scope: Scope::Cluster,
        tenant_access: TenantAccess::None,
        normalize: |v, _| Ok(v),
        schema: |_| {
            schemars::json_schema!({"type": "object",
                "description": "Many node status updates in one request (the regions' periodic summaries): `items`, each a node's name and status, applied as a merge patch of its status.",
                "x-kubernetes-preserve-unknown-fields": true})
        },
        ..COMMON
    },
    Resource {
        group: meridian::GROUP,
        version: meridian::VERSION,
        kind: "PlacementPolicy",
        plural: "placementpolicies",
        singular: "placementpolicy",
        short_names: &["pp"],
        has_status: true,
        normalize: |v, c| typed::<PlacementPolicy>(v, c, check_placement_policy),
        schema: |g| g.subschema_for::<PlacementPolicy>(),
        ..COMMON
    },
    Resource {
        group: meridian::GROUP,
        version: meridian::VERSION,
        kind: "RiskPolicy",
        plural: "riskpolicies",
        singular: "riskpolicy",
        short_names: &["rp"],
        has_status: true,
        normalize: |v, c| typed::<RiskPolicy>(v, c, |p, c| check_risk_policy(p, false, c)),
        schema: |g| g.subschema_for::<RiskPolicy>(),
        ..COMMON
    },
    Resource {
        group: meridian::GROUP,
        version: meridian::VERSION,
        kind: "ClusterRiskPolicy",
        plural: "clusterriskpolicies",
        singular: "clusterriskpolicy",
        short_names: &["crp"],
        scope: Scope::Cluster,
        has_status: true,
        tenant_access: TenantAccess::None,
        normalize: |v, c| typed::<RiskPolicy>(v, c, |p, c| check_risk_policy(p, true, c)),
        schema: |g| g.subschema_for::<RiskPolicy>(),
        ..COMMON
    },
    Resource {
        group: meridian::GROUP,
        version: meridian::VERSION,
        kind: "ImagePrePull",
        plural: "imageprepulls",
        singular: "imageprepull",
        short_names: &["ipp"],
        has_status: true,
        normalize: |v, c| typed::<ImagePrePull>(v, c, check_image_prepull),
        schema: |g| g.subschema_for::<ImagePrePull>(),
        ..COMMON
    },
];

fn check_image_prepull(p: &ImagePrePull, c: &mut Vec<Cause>) {
    let images = &p.spec.images;
    if images.is_empty() {
        c.push(Cause::required("spec.images"));
    }
    if images.len() > meridian::MAX_PREPULL_IMAGES {
        c.push(Cause::invalid(
            "spec.images",
            &images.len().to_string(),
            format!("at most {} images", meridian::MAX_PREPULL_IMAGES),
        ));
    }
    for (i, img) in images.iter().enumerate() {
        if img.is_empty() || img.len() > 4096 || img.chars().any(|ch| ch.is_whitespace()) {
            c.push(Cause::invalid(
                format!("spec.images[{i}]"),
                img,
                "must be an image reference (no spaces)",
            ));
        }
    }
}

/// Kinds a risk policy may select: everything users delete, not the platform's own
/// bookkeeping.
pub const RISK_KINDS: &[&str] = &[
    "Pod",
    "Deployment",
    "ReplicaSet",
    "DaemonSet",
    "Job",
    "Service",
    "ConfigMap",
    "Secret",
    "PlacementPolicy",
    "Namespace",
    "Node",
];
/// Of those, the ones only a ClusterRiskPolicy may select.
pub const RISK_CLUSTER_KINDS: &[&str] = &["Namespace", "Node"];

fn check_risk_policy(p: &RiskPolicy, cluster: bool, c: &mut Vec<Cause>) {
    let s = &p.spec;
    if let Some(m) = &s.mode
        && !matches!(m.as_str(), "Enforce" | "Audit")
    {
        c.push(Cause::invalid("spec.mode", m, "must be Enforce or Audit"));
    }
    for (i, k) in s.selector.kinds.iter().enumerate() {
        let path = format!("spec.selector.kinds[{i}]");
        if !RISK_KINDS.contains(&k.as_str()) {
            c.push(Cause::invalid(
                &path,
                k,
                format!("must be one of {}", RISK_KINDS.join(", ")),
            ));
        } else if !cluster && RISK_CLUSTER_KINDS.contains(&k.as_str()) {
            c.push(Cause::invalid(
                &path,
                k,
                "only a ClusterRiskPolicy can protect namespaces and nodes",
            ));
        }
    }
    if !cluster && !s.selector.namespaces.is_empty() {
        c.push(Cause::forbidden(
            "spec.selector.namespaces",
            "a RiskPolicy covers its own namespace; use a ClusterRiskPolicy to select namespaces",
        ));
    }
    if let Some(sel) = &s.selector.label_selector
        && let Err(e) = crate::selectors::LabelSelector::from_k8s(sel)
    {
        c.push(Cause::invalid("spec.selector.labelSelector", "", e));
    }
    let r = &s.rules;
    if r.deny_windows.is_empty() && r.max_deletions.is_empty() && !r.protect {
        c.push(Cause::invalid(
            "spec.rules",
            "",
            "give at least one of denyWindows, maxDeletions or protect",
        ));
    }
    for (i, w) in r.deny_windows.iter().enumerate() {
        if let Err((field, why)) = crate::cron::Window::from_spec(w) {
            let value = match field {
                "schedule" => w.schedule.clone(),
                "duration" => w.duration.clone(),
                "start" => w.start.clone(),
                "end" => w.end.clone(),
                _ => w.time_zone.clone(),
            };
            c.push(Cause::invalid(
                format!("spec.rules.denyWindows[{i}].{field}"),
                value.as_deref().unwrap_or_default(),
                why,
            ));
        }
    }
    for (i, b) in r.max_deletions.iter().enumerate() {
        let path = format!("spec.rules.maxDeletions[{i}]");
        match b.count {
            None => c.push(Cause::required(format!("{path}.count"))),
            Some(n) if !(0..=1_000_000).contains(&n) => c.push(Cause::invalid(
                format!("{path}.count"),
                &n.to_string(),
                "must be within 0..1000000",
            )),
            _ => {}
        }
        match crate::duration::parse(&b.period) {
            Err(_) if b.period.is_empty() => c.push(Cause::required(format!("{path}.period"))),
            Err(e) => c.push(Cause::invalid(format!("{path}.period"), &b.period, e)),
            Ok(d) if d.as_secs() < 1 || d.as_secs() > 366 * 24 * 3600 => c.push(Cause::invalid(
                format!("{path}.period"),
                &b.period,
                "must be between 1s and 8784h",
            )),
            Ok(_) => {}
        }
        if let Some(per) = &b.per
            && !matches!(per.as_str(), "Object" | "Workload" | "Namespace" | "Policy")
        {
            c.push(Cause::invalid(
                format!("{path}.per"),
                per,
                "must be Object, Workload, Namespace or Policy",
            ));
        }
    }
}

fn check_edgecluster(e: &EdgeCluster, c: &mut Vec<Cause>) {
    let ep = &e.spec.endpoint;
    if ep.is_empty() {
        c.push(Cause::required("spec.endpoint"));
    } else if !(ep.starts_with("http://") || ep.starts_with("https://")) {
        c.push(Cause::invalid(
            "spec.endpoint",
            ep,
            "must be an http:// or https:// URL",
        ));
    }
}

fn check_placement_policy(p: &PlacementPolicy, c: &mut Vec<Cause>) {
    let s = &p.spec;
    if s.workloads.is_empty() && s.selector.is_none() {
        c.push(Cause::required("spec.workloads"));
    }
    for (i, w) in s.workloads.iter().enumerate() {
        if w.kind == "DaemonSet" {
            c.push(Cause::invalid(
                format!("spec.workloads[{i}].kind"),
                &w.kind,
                "a DaemonSet runs on every node its nodeSelector and affinity admit; \
                 choose the nodes there",
            ));
        } else if !matches!(w.kind.as_str(), "Deployment" | "ReplicaSet" | "Job") {
            c.push(Cause::invalid(
                format!("spec.workloads[{i}].kind"),
                &w.kind,
                "must be Deployment, ReplicaSet or Job",
            ));
        }
        if w.name.is_empty() {
            c.push(Cause::required(format!("spec.workloads[{i}].name")));
        }
    }
    if let Some(d) = &s.distribution {
        let modes = usize::from(!d.counts.is_empty())
            + usize::from(!d.weights.is_empty())
            + usize::from(d.by_capacity.is_some());
        if modes != 1 {
            c.push(Cause::invalid(
                "spec.distribution",
                "",
                "give exactly one of counts, weights or byCapacity",
            ));
        }
        for (list, field, what) in [
            (&d.counts, "counts", "replicas"),
            (&d.weights, "weights", "weight"),
        ] {
            let mut seen = std::collections::BTreeSet::new();
            for (i, e) in list.iter().enumerate() {
                let path = format!("spec.distribution.{field}[{i}]");
                match e.label() {
                    None => c.push(Cause::invalid(
                        &path,
                        "",
                        "give exactly one of region, country or city",
                    )),
                    Some(l) => {
                        if !seen.insert(l.clone()) {
                            c.push(Cause::duplicate(&path, &l.1));
                        }
                    }
                }
                let n = if what == "replicas" {
                    e.replicas
                } else {
                    e.weight
                };
                match n {
                    None => c.push(Cause::required(format!("{path}.{what}"))),
                    Some(n) if n < 0 => c.push(Cause::invalid(
                        format!("{path}.{what}"),
                        &n.to_string(),
                        "must be zero or more",
                    )),
                    _ => {}
                }
            }
        }
        if !d.weights.is_empty() && d.weights.iter().all(|w| w.weight.unwrap_or(0) == 0) {
            c.push(Cause::invalid(
                "spec.distribution.weights",
                "",
                "at least one weight must be positive",
            ));
        }
        if let Some(k) = &d.by_capacity
            && k.is_empty()
        {
            c.push(Cause::required("spec.distribution.byCapacity"));
        }
    }
    if let Some(sp) = &s.spread {
        if sp.max_skew.is_some_and(|m| m < 1) {
            c.push(Cause::invalid(
                "spec.spread.maxSkew",
                &sp.max_skew.unwrap_or(0).to_string(),
                "must be at least 1",
            ));
        }
        if let (Some(lo), Some(hi)) = (sp.min_groups, sp.max_groups)
            && lo > hi
        {
            c.push(Cause::invalid(
                "spec.spread.minGroups",
                &lo.to_string(),
                format!("must not exceed maxGroups ({hi})"),
            ));
        }
        for (f, v) in [("minGroups", sp.min_groups), ("maxGroups", sp.max_groups)] {
            if v.is_some_and(|v| v < 1) {
                c.push(Cause::invalid(
                    format!("spec.spread.{f}"),
                    &v.unwrap_or(0).to_string(),
                    "must be at least 1",
                ));
            }
        }
    }
    if let Some(l) = &s.latency {
        if !(l.max_rtt_ms.is_finite() && l.max_rtt_ms > 0.0) {
            c.push(Cause::invalid(
                "spec.latency.maxRttMs",
                &l.max_rtt_ms.to_string(),
                "must be a positive number of milliseconds",
            ));
        }
        if l.areas.is_empty() {
            c.push(Cause::required("spec.latency.areas"));
        }
        for (i, a) in l.areas.iter().enumerate() {
            match a.resolve() {
                Err(why) => c.push(Cause::invalid(
                    format!("spec.latency.areas[{i}]"),
                    a.city.as_deref().unwrap_or_default(),
                    why,
                )),
                Ok((_, (lat, lon), r)) => {
                    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
                        c.push(Cause::invalid(
                            format!("spec.latency.areas[{i}]"),
                            &format!("{lat},{lon}"),
                            "is not on Earth",
                        ));
                    }
                    if !(r.is_finite() && r >= 0.0) {
                        c.push(Cause::invalid(
                            format!("spec.latency.areas[{i}].radiusKm"),
                            &r.to_string(),
                            "must be zero or more",
                        ));
                    }
                }
            }
        }
    }
    if let Some(f) = &s.failover
        && f.pin
        && f.after_seconds.is_some()
    {
        c.push(Cause::invalid(
            "spec.failover",
            "",
            "give afterSeconds or pin, not both",
        ));
    }
    if let Some(st) = s.scoring.as_ref().and_then(|s| s.strategy.as_deref())
        && !matches!(st, "LeastAllocated" | "MostAllocated")
    {
        c.push(Cause::invalid(
            "spec.scoring.strategy",
            st,
            "must be LeastAllocated or MostAllocated",
        ));
    }
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    pub fn namespaced(&self) -> bool {
        self.scope == Scope::Namespaced
    }

    /// The store key prefix of every object of this resource.
    pub fn storage_prefix(&self) -> String {
        let group = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        format!("/registry/{group}/{}/", self.plural)
    }

    /// The store key of one object; `namespace` is the stored (physical) namespace.
    pub fn storage_key(&self, namespace: Option<&str>, name: &str) -> String {
        match namespace {
            Some(ns) if self.namespaced() => format!("{}{ns}/{name}", self.storage_prefix()),
            _ => format!("{}{name}", self.storage_prefix()),
        }
    }

    pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
        RESOURCES
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    pub fn by_kind(kind: &str) -> Option<&'static Resource> {
        RESOURCES.iter().find(|r| r.kind == kind)
    }

    pub fn supports_field(&self, path: &str) -> bool {
        matches!(path, "metadata.name" | "metadata.namespace") || self.fields.contains(&path)
    }

    /// Normalises an incoming object: checks `apiVersion`/`kind`, decodes it as the
    /// typed object (dropping unknown fields, rejecting wrong types), and validates it.
    pub fn normalize(&self, mut obj: Value) -> Result<Value, ApiError> {
        let Some(map) = obj.as_object_mut() else {
            return Err(ApiError::bad_request(format!(
                "the body must be a JSON object of kind {}",
                self.kind
            )));
        };
        let api_version = self.api_version();
        for (field, want) in [("apiVersion", api_version.as_str()), ("kind", self.kind)] {
            match map.get(field) {
                None | Some(Value::Null) => {
                    map.insert(field.into(), Value::String(want.to_owned()));
                }
                Some(Value::String(s)) if s == want => {}
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "the {field} of the object ({other}) does not match the expected {want:?}"
                    )));
                }
            }
        }
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut causes = Vec::new();
        let obj = (self.normalize)(obj, &mut causes).map_err(|e| {
            ApiError::bad_request(format!(
                "{} in version {:?} cannot be decoded: {e}",
                self.kind, api_version
            ))
        })?;
        v::check_metadata(&obj, self.name_rule, &mut causes);
        if causes.is_empty() {
            Ok(obj)
        } else {
            Err(ApiError::invalid(self.kind, self.group, &name, causes))
        }
    }
}

/// The value of a field path in an object, as the string field selectors compare.
pub fn field_value<'a>(obj: &'a Value, path: &str) -> Option<std::borrow::Cow<'a, str>> {
    let mut cur = obj;
    for part in path.split('.') {
        cur = cur.get(part)?;
    }
    field_text(path, cur)
}

/// The text a field selector compares for the value `v` found at `path`: strings
/// as they are, booleans and numbers printed, an Event's `source` by component.
pub fn field_text<'a>(path: &str, v: &'a Value) -> Option<std::borrow::Cow<'a, str>> {
    match v {
        Value::String(s) => Some(std::borrow::Cow::Borrowed(s.as_str())),
        Value::Bool(b) => Some(std::borrow::Cow::Owned(b.to_string())),
        Value::Number(n) => Some(std::borrow::Cow::Owned(n.to_string())),
        Value::Object(o) if path == "source" => o
            .get("component")
            .and_then(Value::as_str)
            .map(std::borrow::Cow::Borrowed),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pods() -> &'static Resource {
        Resource::find("", "v1", "pods").unwrap()
    }

    #[test]
    fn a_valid_pod_is_normalised_and_unknown_fields_dropped() {
        let pod = json!({"metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "busybox", "bogus": 1}]}});
        let out = pods().normalize(pod).unwrap();
        assert_eq!(out["kind"], "Pod");
        assert_eq!(out["apiVersion"], "v1");
        assert!(out["spec"]["containers"][0].get("bogus").is_none());
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let pod = json!({"metadata": {"name": "Bad_Name", "labels": {"bad key": "x"}},
            "spec": {"containers": [{"name": "c", "image": "",
                "resources": {"limits": {"cpu": "lots"}}}]}});
        let err = pods().normalize(pod).unwrap_err();
        assert_eq!(err.code(), 422);
        let fields: Vec<_> = err.causes.iter().map(|c| c.field.as_str()).collect();
        for f in [
            "metadata.name",
            "metadata.labels",
            "spec.containers[0].image",
            "spec.containers[0].resources.limits.cpu",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }

    #[test]
    fn wrong_kind_and_wrong_types_are_bad_requests() {
        let err = pods()
            .normalize(json!({"kind": "Service", "metadata": {"name": "a"}}))
            .unwrap_err();
        assert_eq!(err.code(), 400);
        let err = pods()
            .normalize(json!({"metadata": {"name": 5}}))
            .unwrap_err();
        assert_eq!(err.code(), 400);
        let err = pods().normalize(json!([1, 2])).unwrap_err();
        assert_eq!(err.code(), 400);
    }

    #[test]
    fn deployment_selector_must_match_template() {
        let deploy = Resource::find("apps", "v1", "deployments").unwrap();
        let d = json!({"metadata": {"name": "web"}, "spec": {"selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "other"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        let err = deploy.normalize(d).unwrap_err();
        assert!(
            err.causes
                .iter()
                .any(|c| c.field == "spec.template.metadata.labels")
        );
    }
}
