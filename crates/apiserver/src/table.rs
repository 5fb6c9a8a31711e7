//! Server-side printing: a `Table` (meta.k8s.io/v1) for `kubectl get`, which asks
//! for one in its Accept header. Columns per kind as kubectl users expect (Nodes
//! with region and city, Pods with node and city, our kinds with their key
//! status); `-o wide` shows the priority-1 columns, `-L` reads labels from each
//! row's object (PartialObjectMetadata). Kinds without their own columns get Name
//! and Age.

use serde_json::{Value, json};

use crate::cache::Snapshot;

/// Whether the client asked for a Table.
pub fn wanted(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

/// Kubernetes' short ages: 45s, 3m12s, 25m, 5h10m, 3d4h, 40d.
fn age(ts: &Value) -> String {
    let Some(t) = ts.as_str().and_then(|t| t.parse::<jiff::Timestamp>().ok()) else {
        return "<unknown>".into();
    };
    let s = t.duration_until(jiff::Timestamp::now()).as_secs().max(0);
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 8 * 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s if s < 8 * 86400 => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn s(v: &Value) -> Value {
    match v {
        Value::String(_) => v.clone(),
        Value::Null => json!("<none>"),
        other => json!(other.to_string()),
    }
}

fn int(v: &Value) -> Value {
    json!(v.as_i64().unwrap_or(0))
}

fn node_label(snap: &Snapshot, node: &str, key: &str) -> Value {
    let Some(r) = meridian_api::Resource::find("", "v1", "nodes") else {
        return json!("<none>");
    };
    snap.get(&r.storage_key(None, node))
        .and_then(|n| n.label(key).map(str::to_owned))
        .map_or(json!("<none>"), Value::String)
}

/// (name, type, priority) per column, and the cells of one object.
#[allow(clippy::type_complexity)]
fn columns(kind: &str) -> Vec<(&'static str, &'static str, u8)> {
    // Events lead with when, like Kubernetes' own table.
    let mut c = if kind == "Event" {
        Vec::new()
    } else {
        vec![("Name", "string", 0)]
    };
    c.extend(match kind {
        "Pod" => vec![
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "integer", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
            ("City", "string", 1),
        ],
        "Node" => vec![
            ("Status", "string", 0),
            ("Region", "string", 0),
            ("City", "string", 0),
            ("Age", "string", 0),
            ("Arch", "string", 1),
            ("Source", "string", 1),
            ("Internal-IP", "string", 1),
        ],
        "Deployment" => vec![
            ("Ready", "string", 0),
            ("Up-to-date", "integer", 0),
            ("Available", "integer", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
        ],
        "ReplicaSet" => vec![
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            ("Age", "string", 0),
        ],
        "DaemonSet" => vec![
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            ("Up-to-date", "integer", 0),
            ("Available", "integer", 0),
            ("Age", "string", 0),
        ],
        "Job" => vec![("Completions", "string", 0), ("Age", "string", 0)],
        "Namespace" => vec![("Status", "string", 0), ("Age", "string", 0)],
        "Event" => vec![
            ("Last Seen", "string", 0),
            ("Type", "string", 0),
            ("Reason", "string", 0),
            ("Object", "string", 0),
            ("Message", "string", 0),
        ],
        "PlacementPolicy" => vec![
            ("Replicas", "integer", 0),
            ("Pending", "integer", 0),
            ("Objectives Met", "string", 0),
            ("Age", "string", 0),
        ],
        "ImagePrePull" => vec![
            ("Images", "integer", 0),
            ("Nodes", "integer", 0),
            ("Pulled", "integer", 0),
            ("Failed", "integer", 0),
            ("Age", "string", 0),
        ],
        "RiskPolicy" | "ClusterRiskPolicy" => vec![
            ("Mode", "string", 0),
            ("Rules", "string", 0),
            ("Last Denial", "string", 0),
            ("Age", "string", 0),
        ],
        _ => vec![("Age", "string", 0)],
    });
    c
}

fn cells(kind: &str, o: &Value, snap: &Snapshot) -> Vec<Value> {
    let m = &o["metadata"];
    let st = &o["status"];
    let created = age(&m["creationTimestamp"]);
    let mut c = if kind == "Event" {
        Vec::new()
    } else {
        vec![s(&m["name"])]
    };
    c.extend(match kind {
        "Pod" => {
            let cs = st["containerStatuses"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
            let ready = cs.iter().filter(|c| c["ready"] == true).count();
            let restarts: i64 = cs
                .iter()
                .map(|c| c["restartCount"].as_i64().unwrap_or(0))
                .sum();
            // As kubectl prints it: a container's waiting or terminated reason
            // (ImagePullBackOff, CrashLoopBackOff, OOMKilled) says more than the phase.
            let mut reason = st
                .get("reason")
                .or(st.get("phase"))
                .and_then(|v| v.as_str())
                .unwrap_or("Pending")
                .to_owned();
            for c in cs.iter().rev() {
                let state = &c["state"];
                if let Some(r) = state["waiting"]["reason"]
                    .as_str()
                    .filter(|r| !r.is_empty())
                {
                    reason = r.to_owned();
                } else if let Some(r) = state["terminated"]["reason"]
                    .as_str()
                    .filter(|r| !r.is_empty())
                {
                    reason = r.to_owned();
                }
            }
            if reason == "Completed" && cs.iter().any(|c| c["state"]["running"].is_object()) {
                reason = "Running".into();
            }
            let status = if m["deletionTimestamp"].is_string() {
                json!("Terminating")
            } else {
                json!(reason)
            };
            let node = o["spec"]["nodeName"].as_str().unwrap_or("");
            vec![
                json!(format!("{ready}/{total}")),
                status,
                json!(restarts),
                json!(created),
                s(&st["podIP"]),
                if node.is_empty() {
                    json!("<none>")
                } else {
                    json!(node)
                },
                if node.is_empty() {
                    json!("<none>")
                } else {
                    node_label(snap, node, meridian_api::meridian::CITY_KEY)
                },
            ]
        }
        "Node" => {
            let ready = st["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                .map(|c| c["status"].as_str().unwrap_or("Unknown"));
            let mut status = match ready {
                Some("True") => "Ready".to_owned(),
                Some("False") => "NotReady".to_owned(),
                _ => "Unknown".to_owned(),
            };
            if o["spec"]["unschedulable"] == true {
                status.push_str(",SchedulingDisabled");
            }
            let l = &m["labels"];
            let ip = st["addresses"]
                .as_array()
                .and_then(|a| a.iter().find(|a| a["type"] == "InternalIP"))
                .map_or(json!("<none>"), |a| s(&a["address"]));
            vec![
                json!(status),
                s(&l[meridian_api::meridian::REGION_KEY]),
                s(&l[meridian_api::meridian::CITY_KEY]),
                json!(created),
                s(&l["kubernetes.io/arch"]),
                s(&l[meridian_api::meridian::SOURCE_KEY]),
                ip,
            ]
        }
        "Deployment" => {
            let want = o["spec"]["replicas"].as_i64().unwrap_or(1);
            let containers = o["spec"]["template"]["spec"]["containers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let join = |f: &str| {
                containers
                    .iter()
                    .map(|c| c[f].as_str().unwrap_or("").to_owned())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            vec![
                json!(format!(
                    "{}/{want}",
                    st["readyReplicas"].as_i64().unwrap_or(0)
                )),
                int(&st["updatedReplicas"]),
                int(&st["availableReplicas"]),
                json!(created),
                json!(join("name")),
                json!(join("image")),
            ]
        }
        "ReplicaSet" => vec![
            int(&o["spec"]["replicas"]),
            int(&st["replicas"]),
            int(&st["readyReplicas"]),
            json!(created),
        ],
        "DaemonSet" => vec![
            int(&st["desiredNumberScheduled"]),
            int(&st["currentNumberScheduled"]),
            int(&st["numberReady"]),
            int(&st["updatedNumberScheduled"]),
            int(&st["numberAvailable"]),
            json!(created),
        ],
        "Job" => vec![
            json!(format!(
                "{}/{}",
                st["succeeded"].as_i64().unwrap_or(0),
                o["spec"]["completions"].as_i64().unwrap_or(1)
            )),
            json!(created),
        ],
        "Namespace" => vec![s(&st["phase"]), json!(created)],
        "Event" => {
            let io = &o["involvedObject"];
            vec![
                json!(age(if o["lastTimestamp"].is_string() {
                    &o["lastTimestamp"]
                } else {
                    &m["creationTimestamp"]
                })),
                s(&o["type"]),
                s(&o["reason"]),
                json!(format!(
                    "{}/{}",
                    io["kind"].as_str().unwrap_or("").to_lowercase(),
                    io["name"].as_str().unwrap_or("")
                )),
                s(&o["message"]),
            ]
        }
        "PlacementPolicy" => {
            let objectives = st["objectives"].as_array().cloned().unwrap_or_default();
            let met = objectives.iter().filter(|x| x["met"] == true).count();
            vec![
                int(&st["replicas"]),
                int(&st["pending"]),
                json!(format!("{met}/{}", objectives.len())),
                json!(created),
            ]
        }
        "ImagePrePull" => {
            let regions = st["regions"].as_object().cloned().unwrap_or_default();
            let sum = |k: &str| {
                regions
                    .values()
                    .map(|r| r[k].as_i64().unwrap_or(0))
                    .sum::<i64>()
            };
            vec![
                json!(o["spec"]["images"].as_array().map_or(0, Vec::len)),
                json!(sum("nodes")),
                json!(sum("pulled")),
                json!(sum("failed")),
                json!(created),
            ]
        }
        "RiskPolicy" | "ClusterRiskPolicy" => {
            let r = &o["spec"]["rules"];
            let mut rules = Vec::new();
            if let Some(w) = r["denyWindows"].as_array() {
                rules.push(format!("{} window(s)", w.len()));
            }
            for b in r["maxDeletions"].as_array().into_iter().flatten() {
                rules.push(format!(
                    "{}/{}",
                    b["count"].as_i64().unwrap_or(0),
                    b["period"].as_str().unwrap_or("")
                ));
            }
            if r["protect"] == true {
                rules.push("protect".into());
            }
            let last = st["lastDenials"][0]["time"]
                .as_str()
                .map_or(json!("<none>"), |_| {
                    json!(age(&st["lastDenials"][0]["time"]))
                });
            vec![
                json!(o["spec"]["mode"].as_str().unwrap_or("Enforce")),
                json!(rules.join(",")),
                last,
                json!(created),
            ]
        }
        _ => vec![json!(created)],
    });
    c
}

/// The Table of `objects` (as the caller sees them) of `kind`; `metadata` is the
/// list's (resourceVersion, continue).
pub fn render(kind: &str, objects: &[Value], snap: &Snapshot, metadata: Value) -> Value {
    let cols: Vec<Value> = columns(kind)
        .into_iter()
        .map(|(name, t, p)| {
            json!({"name": name, "type": t, "format": if name == "Name" { "name" } else { "" },
                "description": "", "priority": p})
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            json!({"cells": cells(kind, o, snap),
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                    "metadata": o["metadata"]}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": metadata,
        "columnDefinitions": cols, "rows": rows})
}
