//! API discovery (`/api`, `/apis`, resource lists) and `/version`, so kubectl and the
//! kube crate can find what this server serves.

use std::collections::BTreeMap;

use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use meridian_api::{ApiError, Reason, Resource};
use serde_json::{Value, json};

use crate::handlers::{json_response, served};

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": format!("v1.34.0+meridian-{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "",
        "goVersion": "",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
    })
}

fn verbs(r: &Resource) -> Vec<&'static str> {
    let mut v = vec![
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection",
    ];
    if r.plural == "events" {
        v.retain(|_| true);
    }
    v
}

fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in served()
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        // `kubectl get all`: the workloads and what serves them, as in Kubernetes.
        let categories: &[&str] = match r.plural {
            "pods" | "services" | "deployments" | "replicasets" | "daemonsets" | "jobs" => &["all"],
            _ => &[],
        };
        resources.push(json!({
            "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced(),
            "kind": r.kind, "verbs": verbs(r), "shortNames": r.short_names,
            "categories": categories,
        }));
        if r.has_status {
            resources.push(
                json!({"name": format!("{}/status", r.plural), "singularName": "",
                "namespaced": r.namespaced(), "kind": r.kind, "verbs": ["get", "patch", "update"]}),
            );
        }
        if r.has_scale {
            resources.push(json!({"name": format!("{}/scale", r.plural), "singularName": "",
                "namespaced": r.namespaced(), "group": "autoscaling", "version": "v1", "kind": "Scale",
                "verbs": ["get", "patch", "update"]}));
        }
        if r.plural == "pods" {
            resources.push(
                json!({"name": "pods/binding", "singularName": "", "namespaced": true,
                "kind": "Binding", "verbs": ["create"]}),
            );
            resources.push(
                json!({"name": "pods/eviction", "singularName": "", "namespaced": true,
                "group": "policy", "version": "v1", "kind": "Eviction", "verbs": ["create"]}),
            );
            resources.push(
                json!({"name": "pods/log", "singularName": "", "namespaced": true,
                "kind": "Pod", "verbs": ["get"]}),
            );
            resources.push(
                json!({"name": "pods/exec", "singularName": "", "namespaced": true,
                "kind": "PodExecOptions", "verbs": ["create", "get"]}),
            );
            resources.push(
                json!({"name": "pods/portforward", "singularName": "", "namespaced": true,
                "kind": "PodPortForwardOptions", "verbs": ["create", "get"]}),
            );
        }
        if r.plural == "tenants" {
            resources.push(
                json!({"name": "tenants/token", "singularName": "", "namespaced": false,
                "kind": "TenantToken", "verbs": ["create"]}),
            );
        }
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

fn groups() -> BTreeMap<&'static str, Vec<&'static str>> {
    let mut g: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in served().iter().filter(|r| !r.group.is_empty()) {
        let versions = g.entry(r.group).or_default();
        if !versions.contains(&r.version) {
            versions.push(r.version);
        }
    }
    g
}

fn group_json(name: &str, versions: &[&str]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({"name": name, "versions": vs, "preferredVersion": vs[0]})
}

/// The media type of aggregated discovery (`kubectl` asks for it first).
const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Aggregated discovery (apidiscovery.k8s.io/v2): every group, version and
/// resource with its subresources in one document — `/api` for the core group,
/// `/apis` for the rest — so kubectl needs one request instead of one per group.
fn aggregated(core: bool) -> Value {
    let groups: Vec<(&str, Vec<&str>)> = if core {
        vec![("", vec!["v1"])]
    } else {
        groups().into_iter().collect()
    };
    let items: Vec<Value> = groups
        .into_iter()
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .into_iter()
                .map(|version| {
                    let list = resource_list(group, version).unwrap_or_default();
                    let all = list["resources"].as_array().cloned().unwrap_or_default();
                    let resources: Vec<Value> = all
                        .iter()
                        .filter(|r| !r["name"].as_str().unwrap_or("/").contains('/'))
                        .map(|r| {
                            let name = r["name"].as_str().unwrap_or_default();
                            let prefix = format!("{name}/");
                            let subs: Vec<Value> = all
                                .iter()
                                .filter_map(|s| {
                                    let sub = s["name"].as_str()?.strip_prefix(&prefix)?;
                                    Some(json!({"subresource": sub,
                                        "responseKind": {"group": s.get("group").unwrap_or(&json!(group)),
                                            "version": s.get("version").unwrap_or(&json!(version)),
                                            "kind": s["kind"]},
                                        "verbs": s["verbs"]}))
                                })
                                .collect();
                            let scope = if r["namespaced"] == true { "Namespaced" } else { "Cluster" };
                            json!({"resource": name,
                                "responseKind": {"group": group, "version": version, "kind": r["kind"]},
                                "scope": scope, "singularResource": r["singularName"],
                                "verbs": r["verbs"], "shortNames": r["shortNames"],
                                "categories": r["categories"], "subresources": subs})
                        })
                        .collect();
                    json!({"version": version, "resources": resources, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": group}, "versions": versions})
        })
        .collect();
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {}, "items": items})
}

pub fn serve(segs: &[String], headers: &HeaderMap) -> Result<Response, ApiError> {
    let wants_aggregated = headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=APIGroupDiscoveryList") && a.contains("v=v2"));
    if wants_aggregated && matches!(segs, [one] if one == "api" || one == "apis") {
        let body = aggregated(segs[0] == "api");
        let mut r = json_response(StatusCode::OK, Bytes::from(body.to_string()));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(AGGREGATED),
        );
        return Ok(r);
    }
    let not_found = || {
        ApiError::new(
            Reason::NotFound,
            "the server could not find the requested resource",
        )
    };
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let body = match segs.as_slice() {
        ["api"] => json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}),
        ["api", "v1"] => resource_list("", "v1").ok_or_else(not_found)?,
        ["apis"] => {
            let gs: Vec<Value> = groups().iter().map(|(n, v)| group_json(n, v)).collect();
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": gs})
        }
        ["apis", g] => {
            let gs = groups();
            let versions = gs.get(g).ok_or_else(not_found)?;
            let mut v = group_json(g, versions);
            v["kind"] = json!("APIGroup");
            v["apiVersion"] = json!("v1");
            v
        }
        ["apis", g, v] => resource_list(g, v).ok_or_else(not_found)?,
        _ => return Err(not_found()),
    };
    Ok(json_response(StatusCode::OK, Bytes::from(body.to_string())))
}
