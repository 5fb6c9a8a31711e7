//! Kubernetes' defaults, applied to what is created or updated before it is
//! validated and stored, so objects read back (and `kubectl describe`) look as they
//! do on any Kubernetes: a Deployment's RollingUpdate strategy with 25%/25%, a
//! probe's timeouts and thresholds, a container's pull policy, a Service's
//! ClusterIP type... Only fields left empty are set; nothing given is changed.
//! A Job template's `restartPolicy` is not defaulted: it must be chosen, as in
//! Kubernetes.

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetUpdateStrategy, Deployment, DeploymentStrategy, ReplicaSet,
    RollingUpdateDaemonSet, RollingUpdateDeployment,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodTemplateSpec, Probe, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn set<T>(field: &mut Option<T>, value: T) {
    if field.is_none() {
        *field = Some(value);
    }
}

fn set_str(field: &mut Option<String>, value: &str) {
    if field.as_deref().is_none_or(str::is_empty) {
        *field = Some(value.to_owned());
    }
}

/// `Always` for `:latest` or no tag, else `IfNotPresent`.
pub fn pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    if last.contains('@') {
        return "IfNotPresent";
    }
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn probe(p: &mut Option<Probe>) {
    if let Some(p) = p {
        set(&mut p.timeout_seconds, 1);
        set(&mut p.period_seconds, 10);
        set(&mut p.success_threshold, 1);
        set(&mut p.failure_threshold, 3);
    }
}

fn container(c: &mut Container) {
    set_str(&mut c.termination_message_path, "/dev/termination-log");
    set_str(&mut c.termination_message_policy, "File");
    if let Some(image) = c.image.clone() {
        set_str(&mut c.image_pull_policy, pull_policy(&image));
    }
    for p in c.ports.iter_mut().flatten() {
        set_str(&mut p.protocol, "TCP");
    }
    for e in c.env.iter_mut().flatten() {
        if let Some(f) = e.value_from.as_mut().and_then(|v| v.field_ref.as_mut()) {
            set_str(&mut f.api_version, "v1");
        }
    }
    probe(&mut c.liveness_probe);
    probe(&mut c.readiness_probe);
    probe(&mut c.startup_probe);
}

/// A pod spec's defaults; `restart` is the default restart policy (`None` for Job
/// templates, which must choose one).
pub fn pod_spec(s: &mut PodSpec, restart: Option<&str>) {
    if let Some(r) = restart {
        set_str(&mut s.restart_policy, r);
    }
    set_str(&mut s.dns_policy, "ClusterFirst");
    set_str(&mut s.scheduler_name, "default-scheduler");
    set(&mut s.termination_grace_period_seconds, 30);
    set(&mut s.security_context, Default::default());
    s.containers.iter_mut().for_each(container);
    s.init_containers.iter_mut().flatten().for_each(container);
}

fn template(t: &mut PodTemplateSpec, restart: Option<&str>) {
    if let Some(s) = t.spec.as_mut() {
        pod_spec(s, restart);
    }
}

pub fn pod(p: &mut Pod) {
    if let Some(s) = p.spec.as_mut() {
        pod_spec(s, Some("Always"));
    }
}

fn quarter() -> IntOrString {
    IntOrString::String("25%".into())
}

pub fn deployment(d: &mut Deployment) {
    let Some(s) = d.spec.as_mut() else { return };
    set(&mut s.replicas, 1);
    set(&mut s.revision_history_limit, 10);
    set(&mut s.progress_deadline_seconds, 600);
    let strategy = s.strategy.get_or_insert_with(DeploymentStrategy::default);
    set_str(&mut strategy.type_, "RollingUpdate");
    if strategy.type_.as_deref() == Some("RollingUpdate") {
        let ru = strategy
            .rolling_update
            .get_or_insert_with(RollingUpdateDeployment::default);
        set(&mut ru.max_surge, quarter());
        set(&mut ru.max_unavailable, quarter());
    }
    template(&mut s.template, Some("Always"));
}

pub fn replicaset(r: &mut ReplicaSet) {
    let Some(s) = r.spec.as_mut() else { return };
    set(&mut s.replicas, 1);
    if let Some(t) = s.template.as_mut() {
        template(t, Some("Always"));
    }
}

pub fn daemonset(d: &mut DaemonSet) {
    let Some(s) = d.spec.as_mut() else { return };
    set(&mut s.revision_history_limit, 10);
    let strategy = s
        .update_strategy
        .get_or_insert_with(DaemonSetUpdateStrategy::default);
    set_str(&mut strategy.type_, "RollingUpdate");
    if strategy.type_.as_deref() == Some("RollingUpdate") {
        let ru = strategy
            .rolling_update
            .get_or_insert_with(RollingUpdateDaemonSet::default);
        set(&mut ru.max_unavailable, IntOrString::Int(1));
        set(&mut ru.max_surge, IntOrString::Int(0));
    }
    template(&mut s.template, Some("Always"));
}

pub fn job(j: &mut Job) {
    let Some(s) = j.spec.as_mut() else { return };
    if s.completions.is_none() && s.parallelism.is_none() {
        s.completions = Some(1);
    }
    set(&mut s.parallelism, 1);
    set(&mut s.backoff_limit, 6);
    set_str(&mut s.completion_mode, "NonIndexed");
    set(&mut s.suspend, false);
    template(&mut s.template, None);
}

pub fn service(svc: &mut Service) {
    let Some(s) = svc.spec.as_mut() else { return };
    let external = s.type_.as_deref() == Some("ExternalName");
    set_str(&mut s.type_, "ClusterIP");
    if !external {
        set_str(&mut s.session_affinity, "None");
        set_str(&mut s.internal_traffic_policy, "Cluster");
    }
    for p in s.ports.iter_mut().flatten() {
        set_str(&mut p.protocol, "TCP");
        set(&mut p.target_port, IntOrString::Int(p.port));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_only_what_is_empty() {
        let mut d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                "strategy": {"rollingUpdate": {"maxSurge": 1}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [
                    {"name": "web", "image": "busybox:1.36",
                     "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 2},
                     "env": [{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]},
                    {"name": "side", "image": "registry.local:5000/tools"}]}}}
        }))
        .unwrap();
        deployment(&mut d);
        let v = serde_json::to_value(&d).unwrap();
        let s = &v["spec"];
        assert_eq!(s["replicas"], 1);
        assert_eq!(s["strategy"]["type"], "RollingUpdate");
        assert_eq!(s["strategy"]["rollingUpdate"]["maxSurge"], 1, "given: kept");
        assert_eq!(s["strategy"]["rollingUpdate"]["maxUnavailable"], "25%");
        let c = &s["template"]["spec"]["containers"];
        assert_eq!(c[0]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(
            c[1]["imagePullPolicy"], "Always",
            "no tag (the port is not one)"
        );
        assert_eq!(c[0]["readinessProbe"]["periodSeconds"], 2);
        assert_eq!(c[0]["readinessProbe"]["timeoutSeconds"], 1);
        assert_eq!(c[0]["env"][0]["valueFrom"]["fieldRef"]["apiVersion"], "v1");
        assert_eq!(s["template"]["spec"]["restartPolicy"], "Always");
        // Applying them again changes nothing.
        let mut again = d.clone();
        deployment(&mut again);
        assert_eq!(again, d);
        let mut j: Job = serde_json::from_value(serde_json::json!({
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x:latest"}]}}}
        }))
        .unwrap();
        job(&mut j);
        let v = serde_json::to_value(&j).unwrap();
        assert!(v["spec"]["template"]["spec"]["restartPolicy"].is_null());
        assert_eq!(v["spec"]["completions"], 1);
        assert_eq!(v["spec"]["backoffLimit"], 6);
        assert_eq!(pull_policy("busybox@sha256:abc"), "IfNotPresent");
    }
}
