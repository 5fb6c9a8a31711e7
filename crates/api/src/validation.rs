//! Field validation with Kubernetes' rules. Every check appends to a list of causes so
//! a client learns about every problem at once.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as K8sLabelSelector;
use serde_json::Value;

use crate::error::Cause;
use crate::quantity::parse_milli;
use crate::selectors::LabelSelector;

/// How an object's name is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    /// DNS-1123 subdomain: lowercase alphanumerics, '-' and '.', at most 253.
    Subdomain,
    /// DNS-1123 label: lowercase alphanumerics and '-', at most 63.
    Label,
    /// DNS-1035 label: a DNS-1123 label that starts with a letter (Services).
    Dns1035,
}

fn is_label_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

/// Why `s` is not a DNS-1123 label, or `None`.
pub fn dns1123_label_problem(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("must not be empty".into());
    }
    if s.len() > 63 {
        return Some("must be no more than 63 characters".into());
    }
    if !s.chars().all(is_label_char) || s.starts_with('-') || s.ends_with('-') {
        return Some("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character".into());
    }
    None
}

/// Why `s` is not a DNS-1123 subdomain, or `None`.
pub fn dns1123_subdomain_problem(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("must not be empty".into());
    }
    if s.len() > 253 {
        return Some("must be no more than 253 characters".into());
    }
    if s.split('.')
        .any(|part| part.is_empty() || dns1123_label_problem(part).is_some())
    {
        return Some("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character".into());
    }
    None
}

pub fn name_problem(rule: NameRule, name: &str) -> Option<String> {
    match rule {
        NameRule::Subdomain => dns1123_subdomain_problem(name),
        NameRule::Label => dns1123_label_problem(name),
        NameRule::Dns1035 => dns1123_label_problem(name).or_else(|| {
            (!name.starts_with(|c: char| c.is_ascii_lowercase()))
                .then(|| "a DNS-1035 label must start with a lowercase letter".into())
        }),
    }
}

fn qualified_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("name part must be non-empty".into());
    }
    if name.len() > 63 {
        return Some("name part must be no more than 63 characters".into());
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
    if !name.chars().all(ok_char)
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Some("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character".into());
    }
    None
}

/// Why `key` is not a valid label or annotation key (`[prefix/]name`), or `None`.
pub fn label_key_problem(key: &str) -> Option<String> {
    match key.split_once('/') {
        Some((prefix, name)) => dns1123_subdomain_problem(prefix)
            .map(|p| format!("prefix part {p}"))
            .or_else(|| qualified_name_problem(name)),
        None => qualified_name_problem(key),
    }
}

/// Why `v` is not a valid label value, or `None`.
pub fn label_value_problem(v: &str) -> Option<String> {
    if v.is_empty() {
        return None;
    }
    qualified_name_problem(v).map(|p| p.replace("name part", "a valid label value"))
}

const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// Checks `metadata` (name, generateName, labels, annotations) of a normalised object.
pub fn check_metadata(obj: &Value, rule: NameRule, causes: &mut Vec<Cause>) {
    let meta = &obj["metadata"];
    match meta["name"].as_str() {
        Some(name) => {
            if let Some(p) = name_problem(rule, name) {
                causes.push(Cause::invalid("metadata.name", name, p));
            }
        }
        None => causes.push(Cause::required("metadata.name")),
    }
    check_string_map(&meta["labels"], "metadata.labels", causes, true);
    check_string_map(&meta["annotations"], "metadata.annotations", causes, false);
    if let Some(map) = meta["annotations"].as_object() {
        let size: usize = map
            .iter()
            .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
            .sum();
        if size > MAX_ANNOTATIONS_BYTES {
            causes.push(Cause::invalid(
                "metadata.annotations",
                "",
                format!(
                    "annotations total {size} bytes, more than the limit of {MAX_ANNOTATIONS_BYTES}"
                ),
            ));
        }
    }
    if let Some(fs) = meta["finalizers"].as_array() {
        for (i, f) in fs.iter().enumerate() {
            if let Some(f) = f.as_str()
                && let Some(p) = label_key_problem(f)
            {
                causes.push(Cause::invalid(format!("metadata.finalizers[{i}]"), f, p));
            }
        }
    }
}

fn check_string_map(v: &Value, field: &str, causes: &mut Vec<Cause>, values_are_labels: bool) {
    let Some(map) = v.as_object() else { return };
    for (k, val) in map {
        if let Some(p) = label_key_problem(k) {
            causes.push(Cause::invalid(field.to_string(), k, p));
        }
        if values_are_labels {
            let s = val.as_str().unwrap_or_default();
            if let Some(p) = label_value_problem(s) {
                causes.push(Cause::invalid(format!("{field}.{k}"), s, p));
            }
        }
    }
}

fn check_quantities(
    map: &Option<BTreeMap<String, Quantity>>,
    field: &str,
    causes: &mut Vec<Cause>,
) {
    for (name, q) in map.iter().flatten() {
        match parse_milli(&q.0) {
            Ok(v) if v < 0 => causes.push(Cause::invalid(
                format!("{field}.{name}"),
                &q.0,
                "must be greater than or equal to 0",
            )),
            Ok(_) => {}
            Err(e) => causes.push(Cause::invalid(format!("{field}.{name}"), &q.0, e)),
        }
    }
}

fn check_container(
    c: &Container,
    field: &str,
    names: &mut HashSet<String>,
    causes: &mut Vec<Cause>,
) {
    if c.name.is_empty() {
        causes.push(Cause::required(format!("{field}.name")));
    } else if let Some(p) = dns1123_label_problem(&c.name) {
        causes.push(Cause::invalid(format!("{field}.name"), &c.name, p));
    } else if !names.insert(c.name.clone()) {
        causes.push(Cause::duplicate(format!("{field}.name"), &c.name));
    }
    if c.image.as_deref().is_none_or(|i| i.trim().is_empty()) {
        causes.push(Cause::required(format!("{field}.image")));
    }
    if let Some(r) = &c.resources {
        check_quantities(&r.requests, &format!("{field}.resources.requests"), causes);
        check_quantities(&r.limits, &format!("{field}.resources.limits"), causes);
    }
    for (i, p) in c.ports.iter().flatten().enumerate() {
        if !(1..=65535).contains(&p.container_port) {
            causes.push(Cause::invalid(
                format!("{field}.ports[{i}].containerPort"),
                &p.container_port.to_string(),
                "must be between 1 and 65535, inclusive",
            ));
        }
        if let Some(proto) = &p.protocol
            && !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP")
        {
            causes.push(Cause::invalid(
                format!("{field}.ports[{i}].protocol"),
                proto,
                "supported values: \"SCTP\", \"TCP\", \"UDP\"",
            ));
        }
    }
}

/// Checks a pod spec at `field` ("spec" or "spec.template.spec").
pub fn check_pod_spec(spec: &PodSpec, field: &str, causes: &mut Vec<Cause>) {
    let mut names = HashSet::new();
    if spec.containers.is_empty() {
        causes.push(Cause::required(format!("{field}.containers")));
    }
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        check_container(
            c,
            &format!("{field}.initContainers[{i}]"),
            &mut names,
            causes,
        );
    }
    for (i, c) in spec.containers.iter().enumerate() {
        check_container(c, &format!("{field}.containers[{i}]"), &mut names, causes);
    }
    if let Some(rp) = &spec.restart_policy
        && !matches!(rp.as_str(), "Always" | "OnFailure" | "Never")
    {
        causes.push(Cause::invalid(
            format!("{field}.restartPolicy"),
            rp,
            "supported values: \"Always\", \"OnFailure\", \"Never\"",
        ));
    }
    let mut volumes = HashSet::new();
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        if let Some(p) = dns1123_label_problem(&v.name) {
            causes.push(Cause::invalid(
                format!("{field}.volumes[{i}].name"),
                &v.name,
                p,
            ));
        } else if !volumes.insert(v.name.clone()) {
            causes.push(Cause::duplicate(
                format!("{field}.volumes[{i}].name"),
                &v.name,
            ));
        }
    }
    if let Some(n) = &spec.node_name
        && let Some(p) = dns1123_subdomain_problem(n)
    {
        causes.push(Cause::invalid(format!("{field}.nodeName"), n, p));
    }
    if let Some(g) = spec.termination_grace_period_seconds
        && g < 0
    {
        causes.push(Cause::invalid(
            format!("{field}.terminationGracePeriodSeconds"),
            &g.to_string(),
            "must be greater than or equal to 0",
        ));
    }
}

/// Checks a workload's selector and template: the selector must be non-empty and
/// select the template's labels.
pub fn check_selector_and_template(
    selector: Option<&K8sLabelSelector>,
    template: Option<&PodTemplateSpec>,
    causes: &mut Vec<Cause>,
) {
    let labels = template
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    match selector {
        None => causes.push(Cause::required("spec.selector")),
        Some(sel) => match LabelSelector::from_k8s(sel) {
            Err(e) => causes.push(Cause::invalid("spec.selector", "", e)),
            Ok(s) if s.is_empty() => causes.push(Cause::invalid(
                "spec.selector",
                "",
                "empty selector is invalid for this workload",
            )),
            Ok(s) => {
                if !s.matches(&labels) {
                    causes.push(Cause::invalid(
                        "spec.template.metadata.labels",
                        &format!("{labels:?}"),
                        "`selector` does not match template `labels`",
                    ));
                }
            }
        },
    }
    match template {
        None => causes.push(Cause::required("spec.template")),
        Some(t) => match &t.spec {
            None => causes.push(Cause::required("spec.template.spec")),
            Some(spec) => check_pod_spec(spec, "spec.template.spec", causes),
        },
    }
}

pub fn check_non_negative(v: Option<i32>, field: &str, causes: &mut Vec<Cause>) {
    if let Some(v) = v
        && v < 0
    {
        causes.push(Cause::invalid(
            field,
            &v.to_string(),
            "must be greater than or equal to 0",
        ));
    }
}

/// Keys of ConfigMap and Secret data: `[-._a-zA-Z0-9]+`, at most 253 characters.
pub fn check_data_keys<'a>(
    keys: impl Iterator<Item = &'a String>,
    field: &str,
    causes: &mut Vec<Cause>,
) {
    for k in keys {
        let ok = !k.is_empty()
            && k.len() <= 253
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && k != "."
            && k != "..";
        if !ok {
            causes.push(Cause::invalid(
                format!("{field}[{k}]"),
                k,
                "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_rules() {
        assert!(dns1123_label_problem("web-1").is_none());
        assert!(dns1123_label_problem("Web").is_some());
        assert!(dns1123_label_problem("-a").is_some());
        assert!(dns1123_label_problem(&"a".repeat(64)).is_some());
        assert!(dns1123_subdomain_problem("a.b-c.d").is_none());
        assert!(dns1123_subdomain_problem("a..b").is_some());
        assert!(name_problem(NameRule::Dns1035, "1abc").is_some());
    }

    #[test]
    fn label_keys_and_values() {
        assert!(label_key_problem("app").is_none());
        assert!(label_key_problem("topology.kubernetes.io/region").is_none());
        assert!(label_key_problem("Bad Key").is_some());
        assert!(label_key_problem("/x").is_some());
        assert!(label_value_problem("").is_none());
        assert!(label_value_problem("v1.2_x").is_none());
        assert!(label_value_problem("no spaces").is_some());
    }
}

/// Parses a taint written `key=value:Effect` or `key:Effect` (as `kubectl taint`).
pub fn parse_taint(s: &str) -> Result<k8s_openapi::api::core::v1::Taint, String> {
    let (kv, effect) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("taint {s:?}: write key=value:Effect"))?;
    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(format!(
            "taint {s:?}: effect must be NoSchedule, PreferNoSchedule or NoExecute"
        ));
    }
    let (key, value) = match kv.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (kv, None),
    };
    if let Some(p) = label_key_problem(key).or_else(|| value.and_then(label_value_problem)) {
        return Err(format!("taint {s:?}: {p}"));
    }
    Ok(k8s_openapi::api::core::v1::Taint {
        key: key.to_owned(),
        value: value.map(str::to_owned),
        effect: effect.to_owned(),
        time_added: None,
    })
}

#[cfg(test)]
mod taint_tests {
    #[test]
    fn parses_taints_like_kubectl() {
        let t = super::parse_taint("node.meridian.io/simulated=true:NoSchedule").unwrap();
        assert_eq!(
            (t.key.as_str(), t.value.as_deref(), t.effect.as_str()),
            ("node.meridian.io/simulated", Some("true"), "NoSchedule")
        );
        assert!(super::parse_taint("gpu:NoExecute").unwrap().value.is_none());
        for bad in [
            "gpu",
            "gpu=x:Sometimes",
            "bad key=x:NoSchedule",
            ":NoSchedule",
        ] {
            assert!(super::parse_taint(bad).is_err(), "{bad}");
        }
    }
}
