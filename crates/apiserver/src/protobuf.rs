//! Kubernetes' protobuf encoding for the objects `kubectl create` sends that way.
//!
//! kubectl's typed clients post built-in kinds as `application/vnd.kubernetes.protobuf`
//! and client-go does not fall back to JSON on a 415 (kubernetes/kubernetes#86253),
//! so `kubectl create configmap|secret|namespace|deployment|job|service` need the server to
//! read protobuf. The envelope is the magic `k8s\0` and a `runtime.Unknown`
//! (apiVersion and kind, the object's bytes); the messages below carry the wire
//! field numbers of those kinds, for the fields the generators send and then some.
//! A body with any field not modelled here is refused (415, naming the kind)
//! rather than stored with that field silently dropped: each decoded message is
//! re-encoded and must come out the same length.

use std::collections::BTreeMap;

use prost::Message;
use serde_json::{Map, Value, json};

pub const MAGIC: &[u8] = b"k8s\0";

#[derive(Clone, PartialEq, Message)]
struct TypeMeta {
    #[prost(string, optional, tag = "1")]
    api_version: Option<String>,
    #[prost(string, optional, tag = "2")]
    kind: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Unknown {
    #[prost(message, optional, tag = "1")]
    type_meta: Option<TypeMeta>,
    #[prost(bytes = "vec", optional, tag = "2")]
    raw: Option<Vec<u8>>,
    #[prost(string, optional, tag = "3")]
    content_encoding: Option<String>,
    #[prost(string, optional, tag = "4")]
    content_type: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Time {
    #[prost(int64, optional, tag = "1")]
    seconds: Option<i64>,
    #[prost(int32, optional, tag = "2")]
    nanos: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct OwnerReference {
    #[prost(string, optional, tag = "1")]
    kind: Option<String>,
    #[prost(string, optional, tag = "3")]
    name: Option<String>,
    #[prost(string, optional, tag = "4")]
    uid: Option<String>,
    #[prost(string, optional, tag = "5")]
    api_version: Option<String>,
    #[prost(bool, optional, tag = "6")]
    controller: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    block_owner_deletion: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
struct ObjectMeta {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    generate_name: Option<String>,
    #[prost(string, optional, tag = "3")]
    namespace: Option<String>,
    /// Always written by Go (empty); not part of the JSON.
    #[prost(string, optional, tag = "4")]
    self_link: Option<String>,
    #[prost(string, optional, tag = "5")]
    uid: Option<String>,
    #[prost(string, optional, tag = "6")]
    resource_version: Option<String>,
    /// Set by the server; read and ignored.
    #[prost(int64, optional, tag = "7")]
    generation: Option<i64>,
    #[prost(message, optional, tag = "8")]
    creation_timestamp: Option<Time>,
    #[prost(btree_map = "string, string", tag = "11")]
    labels: BTreeMap<String, String>,
    #[prost(btree_map = "string, string", tag = "12")]
    annotations: BTreeMap<String, String>,
    #[prost(message, repeated, tag = "13")]
    owner_references: Vec<OwnerReference>,
    #[prost(string, repeated, tag = "14")]
    finalizers: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct ConfigMap {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(btree_map = "string, string", tag = "2")]
    data: BTreeMap<String, String>,
    #[prost(btree_map = "string, bytes", tag = "3")]
    binary_data: BTreeMap<String, Vec<u8>>,
    #[prost(bool, optional, tag = "4")]
    immutable: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
struct Secret {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(btree_map = "string, bytes", tag = "2")]
    data: BTreeMap<String, Vec<u8>>,
    #[prost(string, optional, tag = "3")]
    r#type: Option<String>,
    #[prost(btree_map = "string, string", tag = "4")]
    string_data: BTreeMap<String, String>,
    #[prost(bool, optional, tag = "5")]
    immutable: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
struct NamespaceSpec {
    #[prost(string, repeated, tag = "1")]
    finalizers: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Empty {}

/// Status as Go writes it for a new object (zero values); read and ignored.
#[derive(Clone, PartialEq, Message)]
struct NamespaceStatus {
    #[prost(string, optional, tag = "1")]
    phase: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Namespace {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<NamespaceSpec>,
    #[prost(message, optional, tag = "3")]
    status: Option<NamespaceStatus>,
}

#[derive(Clone, PartialEq, Message)]
struct LabelSelectorRequirement {
    #[prost(string, optional, tag = "1")]
    key: Option<String>,
    #[prost(string, optional, tag = "2")]
    operator: Option<String>,
    #[prost(string, repeated, tag = "3")]
    values: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct LabelSelector {
    #[prost(btree_map = "string, string", tag = "1")]
    match_labels: BTreeMap<String, String>,
    #[prost(message, repeated, tag = "2")]
    match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Clone, PartialEq, Message)]
struct IntOrString {
    #[prost(int64, optional, tag = "1")]
    r#type: Option<i64>,
    #[prost(int32, optional, tag = "2")]
    int_val: Option<i32>,
    #[prost(string, optional, tag = "3")]
    str_val: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Quantity {
    #[prost(string, optional, tag = "1")]
    string: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct ContainerPort {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(int32, optional, tag = "2")]
    host_port: Option<i32>,
    #[prost(int32, optional, tag = "3")]
    container_port: Option<i32>,
    #[prost(string, optional, tag = "4")]
    protocol: Option<String>,
    #[prost(string, optional, tag = "5")]
    host_ip: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct EnvVar {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    value: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct ResourceRequirements {
    #[prost(btree_map = "string, message", tag = "1")]
    limits: BTreeMap<String, Quantity>,
    #[prost(btree_map = "string, message", tag = "2")]
    requests: BTreeMap<String, Quantity>,
}

#[derive(Clone, PartialEq, Message)]
struct Container {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    image: Option<String>,
    #[prost(string, repeated, tag = "3")]
    command: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    args: Vec<String>,
    #[prost(string, optional, tag = "5")]
    working_dir: Option<String>,
    #[prost(message, repeated, tag = "6")]
    ports: Vec<ContainerPort>,
    #[prost(message, repeated, tag = "7")]
    env: Vec<EnvVar>,
    #[prost(message, optional, tag = "8")]
    resources: Option<ResourceRequirements>,
    #[prost(string, optional, tag = "13")]
    termination_message_path: Option<String>,
    #[prost(string, optional, tag = "14")]
    image_pull_policy: Option<String>,
    #[prost(bool, optional, tag = "16")]
    stdin: Option<bool>,
    #[prost(bool, optional, tag = "17")]
    stdin_once: Option<bool>,
    #[prost(bool, optional, tag = "18")]
    tty: Option<bool>,
    #[prost(string, optional, tag = "20")]
    termination_message_policy: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct PodSpec {
    #[prost(message, repeated, tag = "2")]
    containers: Vec<Container>,
    #[prost(string, optional, tag = "3")]
    restart_policy: Option<String>,
    #[prost(int64, optional, tag = "4")]
    termination_grace_period_seconds: Option<i64>,
    #[prost(string, optional, tag = "6")]
    dns_policy: Option<String>,
    #[prost(btree_map = "string, string", tag = "7")]
    node_selector: BTreeMap<String, String>,
    #[prost(string, optional, tag = "8")]
    service_account_name: Option<String>,
    /// The deprecated alias of serviceAccountName.
    #[prost(string, optional, tag = "9")]
    service_account: Option<String>,
    #[prost(string, optional, tag = "10")]
    node_name: Option<String>,
    #[prost(bool, optional, tag = "11")]
    host_network: Option<bool>,
    #[prost(bool, optional, tag = "12")]
    host_pid: Option<bool>,
    #[prost(bool, optional, tag = "13")]
    host_ipc: Option<bool>,
    #[prost(message, optional, tag = "14")]
    security_context: Option<Empty>,
    #[prost(string, optional, tag = "16")]
    hostname: Option<String>,
    #[prost(string, optional, tag = "17")]
    subdomain: Option<String>,
    #[prost(string, optional, tag = "19")]
    scheduler_name: Option<String>,
    #[prost(string, optional, tag = "24")]
    priority_class_name: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct PodTemplateSpec {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<PodSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct RollingUpdateDeployment {
    #[prost(message, optional, tag = "1")]
    max_unavailable: Option<IntOrString>,
    #[prost(message, optional, tag = "2")]
    max_surge: Option<IntOrString>,
}

#[derive(Clone, PartialEq, Message)]
struct DeploymentStrategy {
    #[prost(string, optional, tag = "1")]
    r#type: Option<String>,
    #[prost(message, optional, tag = "2")]
    rolling_update: Option<RollingUpdateDeployment>,
}

#[derive(Clone, PartialEq, Message)]
struct DeploymentSpec {
    #[prost(int32, optional, tag = "1")]
    replicas: Option<i32>,
    #[prost(message, optional, tag = "2")]
    selector: Option<LabelSelector>,
    #[prost(message, optional, tag = "3")]
    template: Option<PodTemplateSpec>,
    #[prost(message, optional, tag = "4")]
    strategy: Option<DeploymentStrategy>,
    #[prost(int32, optional, tag = "5")]
    min_ready_seconds: Option<i32>,
    #[prost(int32, optional, tag = "6")]
    revision_history_limit: Option<i32>,
    #[prost(bool, optional, tag = "7")]
    paused: Option<bool>,
    #[prost(int32, optional, tag = "9")]
    progress_deadline_seconds: Option<i32>,
}

/// Status as Go writes it for a new object (zero values); read and ignored.
#[derive(Clone, PartialEq, Message)]
struct DeploymentStatus {
    #[prost(int64, optional, tag = "1")]
    observed_generation: Option<i64>,
    #[prost(int32, optional, tag = "2")]
    replicas: Option<i32>,
    #[prost(int32, optional, tag = "3")]
    updated_replicas: Option<i32>,
    #[prost(int32, optional, tag = "4")]
    available_replicas: Option<i32>,
    #[prost(int32, optional, tag = "5")]
    unavailable_replicas: Option<i32>,
    #[prost(int32, optional, tag = "7")]
    ready_replicas: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct Deployment {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<DeploymentSpec>,
    #[prost(message, optional, tag = "3")]
    status: Option<DeploymentStatus>,
}

#[derive(Clone, PartialEq, Message)]
struct JobSpec {
    #[prost(int32, optional, tag = "1")]
    parallelism: Option<i32>,
    #[prost(int32, optional, tag = "2")]
    completions: Option<i32>,
    #[prost(int64, optional, tag = "3")]
    active_deadline_seconds: Option<i64>,
    #[prost(message, optional, tag = "4")]
    selector: Option<LabelSelector>,
    #[prost(bool, optional, tag = "5")]
    manual_selector: Option<bool>,
    #[prost(message, optional, tag = "6")]
    template: Option<PodTemplateSpec>,
    #[prost(int32, optional, tag = "7")]
    backoff_limit: Option<i32>,
    #[prost(int32, optional, tag = "8")]
    ttl_seconds_after_finished: Option<i32>,
    #[prost(string, optional, tag = "9")]
    completion_mode: Option<String>,
    #[prost(bool, optional, tag = "10")]
    suspend: Option<bool>,
}

/// Status as Go writes it for a new object (zero values); read and ignored.
#[derive(Clone, PartialEq, Message)]
struct JobStatus {
    #[prost(int32, optional, tag = "4")]
    active: Option<i32>,
    #[prost(int32, optional, tag = "5")]
    succeeded: Option<i32>,
    #[prost(int32, optional, tag = "6")]
    failed: Option<i32>,
    #[prost(string, optional, tag = "7")]
    completed_indexes: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Job {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<JobSpec>,
    #[prost(message, optional, tag = "3")]
    status: Option<JobStatus>,
}

#[derive(Clone, PartialEq, Message)]
struct ServicePort {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    protocol: Option<String>,
    #[prost(int32, optional, tag = "3")]
    port: Option<i32>,
    #[prost(message, optional, tag = "4")]
    target_port: Option<IntOrString>,
    #[prost(int32, optional, tag = "5")]
    node_port: Option<i32>,
    #[prost(string, optional, tag = "6")]
    app_protocol: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct ServiceSpec {
    #[prost(message, repeated, tag = "1")]
    ports: Vec<ServicePort>,
    #[prost(btree_map = "string, string", tag = "2")]
    selector: BTreeMap<String, String>,
    #[prost(string, optional, tag = "3")]
    cluster_ip: Option<String>,
    #[prost(string, optional, tag = "4")]
    r#type: Option<String>,
    #[prost(string, repeated, tag = "5")]
    external_ips: Vec<String>,
    #[prost(string, optional, tag = "7")]
    session_affinity: Option<String>,
    #[prost(string, optional, tag = "8")]
    load_balancer_ip: Option<String>,
    #[prost(string, repeated, tag = "9")]
    load_balancer_source_ranges: Vec<String>,
    #[prost(string, optional, tag = "10")]
    external_name: Option<String>,
    #[prost(string, optional, tag = "11")]
    external_traffic_policy: Option<String>,
    #[prost(int32, optional, tag = "12")]
    health_check_node_port: Option<i32>,
    #[prost(bool, optional, tag = "13")]
    publish_not_ready_addresses: Option<bool>,
    #[prost(string, repeated, tag = "18")]
    cluster_ips: Vec<String>,
}

/// Status as Go writes it for a new object (an empty load balancer); ignored.
#[derive(Clone, PartialEq, Message)]
struct ServiceStatus {
    #[prost(message, optional, tag = "1")]
    load_balancer: Option<Empty>,
}

#[derive(Clone, PartialEq, Message)]
struct Service {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<ServiceSpec>,
    #[prost(message, optional, tag = "3")]
    status: Option<ServiceStatus>,
}

// ------------------------------------------------------------------ to JSON

/// Inserts `v` unless it is what Go's `omitempty` leaves out.
fn put(m: &mut Map<String, Value>, k: &str, v: Value) {
    let empty = match &v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    };
    if !empty {
        m.insert(k.into(), v);
    }
}

fn s(o: &Option<String>) -> Value {
    o.clone().map(Value::from).unwrap_or(Value::Null)
}

fn map(m: &BTreeMap<String, String>) -> Value {
    json!(m)
}

fn time(t: &Option<Time>) -> Value {
    // Go's zero time (year 1) is what an unset timestamp encodes to.
    match t {
        Some(t) if t.seconds.unwrap_or(0) > -62_135_596_800 => {
            let ts = jiff::Timestamp::new(t.seconds.unwrap_or(0), t.nanos.unwrap_or(0))
                .map(|t| t.to_string())
                .unwrap_or_default();
            Value::from(ts)
        }
        _ => Value::Null,
    }
}

fn meta(m: &Option<ObjectMeta>) -> Value {
    let Some(m) = m else { return json!({}) };
    let mut o = Map::new();
    put(&mut o, "name", s(&m.name));
    put(&mut o, "generateName", s(&m.generate_name));
    put(&mut o, "namespace", s(&m.namespace));
    put(&mut o, "uid", s(&m.uid));
    put(&mut o, "resourceVersion", s(&m.resource_version));
    put(&mut o, "creationTimestamp", time(&m.creation_timestamp));
    put(&mut o, "labels", map(&m.labels));
    put(&mut o, "annotations", map(&m.annotations));
    let owners: Vec<Value> = m
        .owner_references
        .iter()
        .map(|r| {
            let mut x = Map::new();
            put(&mut x, "apiVersion", s(&r.api_version));
            put(&mut x, "kind", s(&r.kind));
            put(&mut x, "name", s(&r.name));
            put(&mut x, "uid", s(&r.uid));
            if let Some(c) = r.controller {
                x.insert("controller".into(), c.into());
            }
            if let Some(b) = r.block_owner_deletion {
                x.insert("blockOwnerDeletion".into(), b.into());
            }
            Value::Object(x)
        })
        .collect();
    put(&mut o, "ownerReferences", Value::Array(owners));
    put(&mut o, "finalizers", json!(m.finalizers));
    Value::Object(o)
}

fn b64(m: &BTreeMap<String, Vec<u8>>) -> Value {
    use base64::Engine;
    let e = base64::engine::general_purpose::STANDARD;
    Value::Object(
        m.iter()
            .map(|(k, v)| (k.clone(), Value::from(e.encode(v))))
            .collect(),
    )
}

fn int_or_string(v: &Option<IntOrString>) -> Value {
    match v {
        Some(v) if v.r#type == Some(1) => s(&v.str_val),
        Some(v) => v.int_val.unwrap_or(0).into(),
        None => Value::Null,
    }
}

fn opt<T: Into<Value> + Copy>(v: Option<T>) -> Value {
    v.map(Into::into).unwrap_or(Value::Null)
}

fn container(c: &Container) -> Value {
    let mut o = Map::new();
    put(&mut o, "name", s(&c.name));
    put(&mut o, "image", s(&c.image));
    put(&mut o, "command", json!(c.command));
    put(&mut o, "args", json!(c.args));
    put(&mut o, "workingDir", s(&c.working_dir));
    let ports: Vec<Value> = c
        .ports
        .iter()
        .map(|p| {
            let mut x = Map::new();
            put(&mut x, "name", s(&p.name));
            put(&mut x, "hostPort", opt(p.host_port.filter(|v| *v != 0)));
            put(&mut x, "containerPort", opt(p.container_port));
            put(&mut x, "protocol", s(&p.protocol));
            put(&mut x, "hostIP", s(&p.host_ip));
            Value::Object(x)
        })
        .collect();
    put(&mut o, "ports", Value::Array(ports));
    let env: Vec<Value> = c
        .env
        .iter()
        .map(|e| {
            let mut x = Map::new();
            put(&mut x, "name", s(&e.name));
            put(&mut x, "value", s(&e.value));
            Value::Object(x)
        })
        .collect();
    put(&mut o, "env", Value::Array(env));
    if let Some(r) = &c.resources {
        let q = |m: &BTreeMap<String, Quantity>| {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), s(&v.string))).collect())
        };
        let mut x = Map::new();
        put(&mut x, "limits", q(&r.limits));
        put(&mut x, "requests", q(&r.requests));
        o.insert("resources".into(), Value::Object(x));
    }
    put(
        &mut o,
        "terminationMessagePath",
        s(&c.termination_message_path),
    );
    put(
        &mut o,
        "terminationMessagePolicy",
        s(&c.termination_message_policy),
    );
    put(&mut o, "imagePullPolicy", s(&c.image_pull_policy));
    for (k, v) in [
        ("stdin", c.stdin),
        ("stdinOnce", c.stdin_once),
        ("tty", c.tty),
    ] {
        if v == Some(true) {
            o.insert(k.into(), true.into());
        }
    }
    Value::Object(o)
}

fn pod_template(t: &Option<PodTemplateSpec>) -> Value {
    let Some(t) = t else { return json!({}) };
    let mut spec = Map::new();
    if let Some(p) = &t.spec {
        put(
            &mut spec,
            "containers",
            Value::Array(p.containers.iter().map(container).collect()),
        );
        put(&mut spec, "restartPolicy", s(&p.restart_policy));
        put(
            &mut spec,
            "terminationGracePeriodSeconds",
            opt(p.termination_grace_period_seconds),
        );
        put(&mut spec, "dnsPolicy", s(&p.dns_policy));
        put(&mut spec, "nodeSelector", map(&p.node_selector));
        put(&mut spec, "serviceAccountName", s(&p.service_account_name));
        put(&mut spec, "serviceAccount", s(&p.service_account));
        put(&mut spec, "nodeName", s(&p.node_name));
        for (k, v) in [
            ("hostNetwork", p.host_network),
            ("hostPID", p.host_pid),
            ("hostIPC", p.host_ipc),
        ] {
            if v == Some(true) {
                spec.insert(k.into(), true.into());
            }
        }
        put(&mut spec, "hostname", s(&p.hostname));
        put(&mut spec, "subdomain", s(&p.subdomain));
        put(&mut spec, "priorityClassName", s(&p.priority_class_name));
        if p.security_context.is_some() {
            spec.insert("securityContext".into(), json!({}));
        }
        put(&mut spec, "schedulerName", s(&p.scheduler_name));
    }
    json!({"metadata": meta(&t.metadata), "spec": spec})
}

fn selector(l: &Option<LabelSelector>) -> Value {
    let Some(l) = l else { return Value::Null };
    let mut o = Map::new();
    put(&mut o, "matchLabels", map(&l.match_labels));
    let exprs: Vec<Value> = l
        .match_expressions
        .iter()
        .map(|r| json!({"key": s(&r.key), "operator": s(&r.operator), "values": r.values}))
        .collect();
    put(&mut o, "matchExpressions", Value::Array(exprs));
    Value::Object(o)
}

/// meta/v1 `Preconditions`.
#[derive(Clone, PartialEq, Message)]
struct Preconditions {
    #[prost(string, optional, tag = "1")]
    uid: Option<String>,
    #[prost(string, optional, tag = "2")]
    resource_version: Option<String>,
}

/// meta/v1 `DeleteOptions` (the body of a DELETE from kubectl's typed clients, and
/// inside an `Eviction`).
#[derive(Clone, PartialEq, Message)]
struct DeleteOptions {
    #[prost(int64, optional, tag = "1")]
    grace_period_seconds: Option<i64>,
    #[prost(message, optional, tag = "2")]
    preconditions: Option<Preconditions>,
    #[prost(bool, optional, tag = "3")]
    orphan_dependents: Option<bool>,
    #[prost(string, optional, tag = "4")]
    propagation_policy: Option<String>,
    #[prost(string, repeated, tag = "5")]
    dry_run: Vec<String>,
}

/// policy/v1 `Eviction` (`kubectl drain`).
#[derive(Clone, PartialEq, Message)]
struct Eviction {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    delete_options: Option<DeleteOptions>,
}

fn delete_options(d: &DeleteOptions) -> Map<String, Value> {
    let mut o = Map::new();
    put(&mut o, "gracePeriodSeconds", opt(d.grace_period_seconds));
    if let Some(p) = &d.preconditions {
        let mut x = Map::new();
        put(&mut x, "uid", s(&p.uid));
        put(&mut x, "resourceVersion", s(&p.resource_version));
        o.insert("preconditions".into(), Value::Object(x));
    }
    put(&mut o, "orphanDependents", opt(d.orphan_dependents));
    put(&mut o, "propagationPolicy", s(&d.propagation_policy));
    put(&mut o, "dryRun", json!(d.dry_run));
    o
}

/// Decodes `T` and checks that nothing was left unread.
fn exact<T: Message + Default>(raw: &[u8], kind: &str) -> Result<T, String> {
    let m = T::decode(raw).map_err(|e| format!("invalid protobuf {kind}: {e}"))?;
    if m.encoded_len() != raw.len() {
        return Err(format!(
            "this {kind} uses fields Meridian does not read from protobuf yet; send it as JSON \
             (kubectl apply -f, or kubectl create ... --dry-run=client -o yaml | kubectl apply -f -)"
        ));
    }
    Ok(m)
}

/// The JSON form of a protobuf request body (`k8s\0` + `runtime.Unknown`), or why not.
pub fn to_json(body: &[u8]) -> Result<Value, String> {
    let envelope = body
        .strip_prefix(MAGIC)
        .ok_or("a protobuf body must start with the k8s\\0 magic")?;
    let u = Unknown::decode(envelope).map_err(|e| format!("invalid protobuf envelope: {e}"))?;
    let tm = u.type_meta.unwrap_or_default();
    let (api_version, kind) = (
        tm.api_version.unwrap_or_default(),
        tm.kind.unwrap_or_default(),
    );
    let raw = u.raw.unwrap_or_default();
    let mut out = match (api_version.as_str(), kind.as_str()) {
        ("v1", "ConfigMap") => {
            let m: ConfigMap = exact(&raw, &kind)?;
            let mut o = Map::new();
            o.insert("metadata".into(), meta(&m.metadata));
            put(&mut o, "data", map(&m.data));
            put(&mut o, "binaryData", b64(&m.binary_data));
            put(&mut o, "immutable", opt(m.immutable));
            o
        }
        ("v1", "Secret") => {
            let m: Secret = exact(&raw, &kind)?;
            let mut o = Map::new();
            o.insert("metadata".into(), meta(&m.metadata));
            put(&mut o, "data", b64(&m.data));
            put(&mut o, "stringData", map(&m.string_data));
            put(&mut o, "type", s(&m.r#type));
            put(&mut o, "immutable", opt(m.immutable));
            o
        }
        ("v1", "Namespace") => {
            let m: Namespace = exact(&raw, &kind)?;
            let mut o = Map::new();
            o.insert("metadata".into(), meta(&m.metadata));
            let fins = m.spec.map(|s| s.finalizers).unwrap_or_default();
            put(
                &mut o,
                "spec",
                if fins.is_empty() {
                    json!({})
                } else {
                    json!({"finalizers": fins})
                },
            );
            o
        }
        ("apps/v1", "Deployment") => {
            let m: Deployment = exact(&raw, &kind)?;
            let mut o = Map::new();
            o.insert("metadata".into(), meta(&m.metadata));
            let mut spec = Map::new();
            if let Some(d) = &m.spec {
                put(&mut spec, "replicas", opt(d.replicas));
                put(&mut spec, "selector", selector(&d.selector));
                spec.insert("template".into(), pod_template(&d.template));
                if let Some(st) = &d.strategy {
                    let mut x = Map::new();
                    put(&mut x, "type", s(&st.r#type));
                    if let Some(ru) = &st.rolling_update {
                        let mut r = Map::new();
                        put(&mut r, "maxUnavailable", int_or_string(&ru.max_unavailable));
                        put(&mut r, "maxSurge", int_or_string(&ru.max_surge));
                        x.insert("rollingUpdate".into(), Value::Object(r));
                    }
                    spec.insert("strategy".into(), Value::Object(x));
                }
                put(
                    &mut spec,
                    "minReadySeconds",
                    opt(d.min_ready_seconds.filter(|v| *v != 0)),
                );
                put(
                    &mut spec,
                    "revisionHistoryLimit",
                    opt(d.revision_history_limit),
                );
                if d.paused == Some(true) {
                    spec.insert("paused".into(), true.into());
                }
                put(
                    &mut spec,
                    "progressDeadlineSeconds",
                    opt(d.progress_deadline_seconds),
                );
            }
            o.insert("spec".into(), Value::Object(spec));
            o
        }
        ("batch/v1", "Job") => {
            let m: Job = exact(&raw, &kind)?;
            let mut o = Map::new();
            o.insert("metadata".into(), meta(&m.metadata));
            let mut spec = Map::new();
            if let Some(j) = &m.spec {
                put(&mut spec, "parallelism", opt(j.parallelism));
                put(&mut spec, "completions", opt(j.completions));
                put(
                    &mut spec,
                    "activeDeadlineSeconds",
                    opt(j.active_deadline_seconds),
                );
                put(&mut spec, "selector", selector(&j.selector));
                put(&mut spec, "manualSelector", opt(j.manual_selector));
                spec.insert("template".into(), pod_template(&j.template));
                put(&mut spec, "backoffLimit", opt(j.backoff_limit));
                put(
                    &mut spec,
                    "ttlSecondsAfterFinished",
                    opt(j.ttl_seconds_after_finished),
                );
                put(&mut spec, "completionMode", s(&j.completion_mode));
                put(&mut spec, "suspend", opt(j.suspend));
            }
            o.insert("spec".into(), Value::Object(spec));
            o
        }
        ("v1", "Service") => {
            let m: Service = exact(&raw, &kind)?;
            let mut o = Map::new();
            o.insert("metadata".into(), meta(&m.metadata));
            let mut spec = Map::new();
            if let Some(v) = &m.spec {
                let ports: Vec<Value> = v
                    .ports
                    .iter()
                    .map(|p| {
                        let mut x = Map::new();
                        put(&mut x, "name", s(&p.name));
                        put(&mut x, "protocol", s(&p.protocol));
                        put(&mut x, "port", opt(p.port));
                        put(&mut x, "targetPort", int_or_string(&p.target_port));
                        put(&mut x, "nodePort", opt(p.node_port.filter(|v| *v != 0)));
                        put(&mut x, "appProtocol", s(&p.app_protocol));
                        Value::Object(x)
                    })
                    .collect();
                put(&mut spec, "ports", Value::Array(ports));
                put(&mut spec, "selector", map(&v.selector));
                put(&mut spec, "clusterIP", s(&v.cluster_ip));
                put(&mut spec, "clusterIPs", json!(v.cluster_ips));
                put(&mut spec, "type", s(&v.r#type));
                put(&mut spec, "externalIPs", json!(v.external_ips));
                put(&mut spec, "sessionAffinity", s(&v.session_affinity));
                put(&mut spec, "loadBalancerIP", s(&v.load_balancer_ip));
                put(
                    &mut spec,
                    "loadBalancerSourceRanges",
                    json!(v.load_balancer_source_ranges),
                );
                put(&mut spec, "externalName", s(&v.external_name));
                put(
                    &mut spec,
                    "externalTrafficPolicy",
                    s(&v.external_traffic_policy),
                );
                put(
                    &mut spec,
                    "healthCheckNodePort",
                    opt(v.health_check_node_port.filter(|p| *p != 0)),
                );
                if v.publish_not_ready_addresses == Some(true) {
                    spec.insert("publishNotReadyAddresses".into(), true.into());
                }
            }
            o.insert("spec".into(), Value::Object(spec));
            o
        }
        // Options travel under the version of the group they are sent to.
        (_, "DeleteOptions") => {
            let m: DeleteOptions = exact(&raw, &kind)?;
            delete_options(&m)
        }
        ("policy/v1" | "policy/v1beta1", "Eviction") => {
            let m: Eviction = exact(&raw, &kind)?;
            let mut o = Map::new();
            o.insert("metadata".into(), meta(&m.metadata));
            if let Some(d) = &m.delete_options {
                o.insert("deleteOptions".into(), Value::Object(delete_options(d)));
            }
            o
        }
        _ => {
            return Err(format!(
                "Meridian reads {api_version}/{kind} as JSON or YAML only, not protobuf; \
                 send it as JSON (kubectl apply -f, or kubectl create ... --dry-run=client -o yaml | kubectl apply -f -)"
            ));
        }
    };
    out.insert("apiVersion".into(), api_version.into());
    out.insert("kind".into(), kind.into());
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let u = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        let mut out = MAGIC.to_vec();
        out.extend(u.encode_to_vec());
        out
    }

    #[test]
    fn a_config_map_decodes_to_its_json() {
        let cm = ConfigMap {
            metadata: Some(ObjectMeta {
                name: Some("cfg".into()),
                creation_timestamp: Some(Time {
                    seconds: Some(-62_135_596_800),
                    nanos: Some(0),
                }),
                ..Default::default()
            }),
            data: BTreeMap::from([("k".into(), "v".into())]),
            ..Default::default()
        };
        let v = to_json(&envelope("v1", "ConfigMap", cm.encode_to_vec())).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"k": "v"}})
        );
    }

    #[test]
    fn unknown_fields_kinds_and_garbage_are_refused_not_dropped() {
        // A ConfigMap with a field 9 Meridian does not model.
        let mut raw = ConfigMap::default().encode_to_vec();
        raw.extend([0x4a, 0x01, b'x']);
        let e = to_json(&envelope("v1", "ConfigMap", raw)).unwrap_err();
        assert!(e.contains("does not read"), "{e}");
        let e = to_json(&envelope("v1", "Pod", Vec::new())).unwrap_err();
        assert!(e.contains("v1/Pod"), "{e}");
        assert!(to_json(b"not protobuf").is_err());
        for n in 0..64u8 {
            let junk: Vec<u8> = MAGIC
                .iter()
                .copied()
                .chain((0..n).map(|i| i.wrapping_mul(37)))
                .collect();
            let _ = to_json(&junk);
        }
    }
}
