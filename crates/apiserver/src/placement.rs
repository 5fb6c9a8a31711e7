//! Admission across objects for PlacementPolicy: a policy with exact per-location
//! counts and the workloads it names must agree on the replica total. Checked
//! both ways: when the policy is written and when a named workload is.

use meridian_api::meridian::PlacementPolicy;
use meridian_api::{ApiError, Cause, Resource};
use serde_json::Value;

use crate::cache::Snapshot;

/// Replicas a workload object wants (`spec.replicas`, or a Job's parallelism).
fn replicas_of(kind: &str, obj: &Value) -> i64 {
    let field = if kind == "Job" {
        "parallelism"
    } else {
        "replicas"
    };
    obj["spec"][field].as_i64().unwrap_or(1)
}

fn plural_of(kind: &str) -> Option<(&'static str, &'static str)> {
    match kind {
        "Deployment" => Some(("apps", "deployments")),
        "ReplicaSet" => Some(("apps", "replicasets")),
        "Job" => Some(("batch", "jobs")),
        _ => None,
    }
}

/// The sum of exact counts and a readable list of them, when the policy has any.
fn counts(p: &PlacementPolicy) -> Option<(i64, String)> {
    let c = &p.spec.distribution.as_ref()?.counts;
    if c.is_empty() {
        return None;
    }
    let sum = c.iter().map(|e| i64::from(e.replicas.unwrap_or(0))).sum();
    let list: Vec<String> = c
        .iter()
        .filter_map(|e| {
            let (_, v) = e.label()?;
            Some(format!("{v} {}", e.replicas.unwrap_or(0)))
        })
        .collect();
    Some((sum, list.join(", ")))
}

/// Checks `obj` (stored form, about to be written as resource `r`) against the
/// objects on the other side of the relation.
pub fn check(snap: &Snapshot, r: &Resource, obj: &Value) -> Result<(), ApiError> {
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    if r.plural == "placementpolicies" {
        let Ok(p) = serde_json::from_value::<PlacementPolicy>(obj.clone()) else {
            return Ok(());
        };
        let Some((sum, list)) = counts(&p) else {
            return Ok(());
        };
        for w in &p.spec.workloads {
            let Some((group, plural)) = plural_of(&w.kind) else {
                continue;
            };
            let Some(res) = Resource::find(group, "v1", plural) else {
                continue;
            };
            if let Some(o) = snap.get(&res.storage_key(Some(ns), &w.name)) {
                let want = replicas_of(&w.kind, &o.value());
                if want != sum {
                    return Err(ApiError::invalid(
                        r.kind,
                        r.group,
                        name,
                        vec![Cause::invalid(
                            "spec.distribution.counts",
                            &list,
                            format!(
                                "the counts add up to {sum} replicas but {} {} wants {want}; \
                                 make them agree",
                                w.kind, w.name
                            ),
                        )],
                    ));
                }
            }
        }
        return Ok(());
    }
    let kind = r.kind;
    if plural_of(kind).is_none() {
        return Ok(());
    }
    let Some(pp) = Resource::find("meridian.io", "v1alpha1", "placementpolicies") else {
        return Ok(());
    };
    let want = replicas_of(kind, obj);
    let prefix = format!("{}{ns}/", pp.storage_prefix());
    for o in snap.range(&prefix, None) {
        let Ok(p) = serde_json::from_value::<PlacementPolicy>(o.value()) else {
            continue;
        };
        if !p
            .spec
            .workloads
            .iter()
            .any(|w| w.kind == kind && w.name == name)
        {
            continue;
        }
        if let Some((sum, list)) = counts(&p)
            && sum != want
        {
            let field = if kind == "Job" {
                "spec.parallelism"
            } else {
                "spec.replicas"
            };
            return Err(ApiError::invalid(
                kind,
                r.group,
                name,
                vec![Cause::invalid(
                    field,
                    &want.to_string(),
                    format!(
                        "PlacementPolicy {} places exactly {sum} replicas ({list}); \
                         change its counts first",
                        p.metadata.name.unwrap_or_default()
                    ),
                )],
            ));
        }
    }
    Ok(())
}
