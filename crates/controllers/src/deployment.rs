//! The Deployment controller: one ReplicaSet per pod template (named by a hash of
//! it), rolling updates within maxSurge/maxUnavailable, or Recreate.

use std::collections::BTreeMap;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{Stores, Tick, controller_of, owner_ref};

pub const HASH_LABEL: &str = "pod-template-hash";
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// Copied from a Deployment to its current ReplicaSet: `kubectl rollout history`'s
/// CHANGE-CAUSE column.
pub const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";

/// A stable hash of the pod template (serde_json sorts map keys).
pub fn template_hash(d: &Deployment) -> String {
    let t = d.spec.as_ref().map(|s| &s.template);
    let bytes = serde_json::to_vec(&t).unwrap_or_default();
    let h = Sha256::digest(&bytes);
    h.iter()
        .take(5)
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..10]
        .to_owned()
}

/// Resolves an int-or-percent against `total` (percentages round up or down).
pub fn resolve(v: Option<&IntOrString>, total: i32, default_pct: i32, round_up: bool) -> i32 {
    match v {
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(s)) => {
            let pct: i32 = s.trim_end_matches('%').parse().unwrap_or(default_pct);
            pct_of(pct, total, round_up)
        }
        None => pct_of(default_pct, total, round_up),
    }
}

fn pct_of(pct: i32, total: i32, up: bool) -> i32 {
    let x = pct as i64 * total as i64;
    (if up { (x + 99) / 100 } else { x / 100 }) as i32
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

/// Available pods of a ReplicaSet, never more than its desired count: its status
/// may still count pods we have just scaled away.
fn available(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
        .min(replicas(rs))
}

/// Reconciles the Deployments that changed, or one of whose ReplicaSets did, since
/// they were last reconciled (every one on a full pass: time-based conditions,
/// failed writes). Why: every Deployment every 300 ms, each cloning its
/// ReplicaSets and hashing its template, was a fifth of the server's CPU with
/// 2,000 Deployments (100,000 hollow nodes, 500,000 pods).
pub async fn reconcile_all(client: &kube::Client, s: &Stores, tick: &Tick) {
    let sets = s.replicasets.state();
    // ReplicaSets by their controlling owner, once per tick (not a scan per Deployment).
    let mut by_owner: std::collections::HashMap<&str, Vec<&ReplicaSet>> = Default::default();
    for r in &sets {
        if let Some(o) = controller_of(&r.metadata) {
            by_owner.entry(o.uid.as_str()).or_default().push(r);
        }
    }
    let work: Vec<_> = {
        let mut seen = s
            .deployments_reconciled
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let deployments = s.deployments.state();
        if tick.full {
            let live = crate::uids(&s.deployments);
            seen.retain(|uid, _| live.contains(uid));
        }
        deployments
            .into_iter()
            .filter(|d| d.metadata.deletion_timestamp.is_none())
            .filter_map(|d| {
                let uid = d.metadata.uid.clone().unwrap_or_default();
                let owned = by_owner.remove(uid.as_str()).unwrap_or_default();
                let print = fingerprint(&d, &owned);
                let on_clock = || {
                    tick.timers
                        && s.denials.pending(&format!(
                            "Deployment/{}/{}",
                            d.metadata.namespace.as_deref().unwrap_or_default(),
                            d.metadata.name.as_deref().unwrap_or_default()
                        ))
                };
                if seen.insert(uid.clone(), print) == Some(print) && !tick.full && !on_clock() {
                    return None;
                }
                let owned: Vec<ReplicaSet> = owned.into_iter().cloned().collect();
                Some((d, uid, owned))
            })
            .collect()
    };
    // Many Deployments at once: thousands of small workloads must not queue behind
    // each other's round trips.
    futures::stream::iter(work)
        .for_each_concurrent(32, |(d, uid, owned)| async move {
            let ns = d.metadata.namespace.clone().unwrap_or_default();
            let name = d.metadata.name.clone().unwrap_or_default();
            let key = format!("Deployment/{ns}/{name}");
            if s.denials.blocked(&key) {
                return; // a scale-down was refused by risk control: backing off
            }
            match reconcile(client, &d, owned).await {
                Ok(()) => s.denials.clear(&key),
                Err(e) => {
                    // Not reconciled: looked at again next tick.
                    s.deployments_reconciled
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&uid);
                    if let Some(msg) = s.denials.note(&key, &e) {
                        crate::risk::report(client, "Deployment", &ns, &name, Some(&uid), &msg)
                            .await;
                    } else if crate::risk::risk_denial(&e).is_none() {
                        tracing::warn!(deployment = %name, "reconcile: {e}");
                    }
                }
            }
        })
        .await;
}

/// What a Deployment's reconcile reads, in one number: its resourceVersion and
/// those of the ReplicaSets it controls.
fn fingerprint(d: &Deployment, owned: &[&ReplicaSet]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    d.metadata.resource_version.hash(&mut h);
    let mut rvs: Vec<(&str, &str)> = owned
        .iter()
        .map(|r| {
            (
                r.metadata.uid.as_deref().unwrap_or_default(),
                r.metadata.resource_version.as_deref().unwrap_or_default(),
            )
        })
        .collect();
    rvs.sort_unstable();
    rvs.hash(&mut h);
    h.finish()
}

/// Sets a ReplicaSet's replicas and records a `ScalingReplicaSet` Event on the
/// Deployment, as Kubernetes' controller does (`kubectl describe deployment`).
async fn scale(
    client: &kube::Client,
    d: &Deployment,
    api: &Api<ReplicaSet>,
    rs: &ReplicaSet,
    n: i32,
) -> Result<(), kube::Error> {
    let from = replicas(rs);
    if from == n {
        return Ok(());
    }
    let name = rs.metadata.name.clone().unwrap_or_default();
    let patch = json!({"spec": {"replicas": n}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    scaling_event(client, d, &name, from, n).await;
    Ok(())
}

async fn scaling_event(client: &kube::Client, d: &Deployment, name: &str, from: i32, n: i32) {
    let ns = d.metadata.namespace.as_deref().unwrap_or_default();
    let ev = meridian_api::events::object_event(
        "apps/v1",
        "Deployment",
        meridian_api::events::PodRef {
            namespace: ns,
            name: d.metadata.name.as_deref().unwrap_or_default(),
            uid: d.metadata.uid.as_deref(),
        },
        "deployment-controller",
        None,
        false,
        "ScalingReplicaSet",
        &format!(
            "Scaled {} replica set {name} from {from} to {n}",
            if n > from { "up" } else { "down" }
        ),
    );
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    if let Err(e) = events.create(&PostParams::default(), &ev).await {
        tracing::debug!("event: {e}");
    }
}

async fn reconcile(
    client: &kube::Client,
    d: &Deployment,
    owned: Vec<ReplicaSet>,
) -> Result<(), kube::Error> {
    let ns = d.metadata.namespace.clone().unwrap_or_default();
    let name = d.metadata.name.clone().unwrap_or_default();
    let Some(spec) = d.spec.as_ref() else {
        return Ok(());
    };
    let want = spec.replicas.unwrap_or(1).max(0);
    let hash = template_hash(d);
    let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
    let (news, mut olds): (Vec<ReplicaSet>, Vec<ReplicaSet>) = owned
        .into_iter()
        .partition(|r| r.metadata.labels.as_ref().and_then(|l| l.get(HASH_LABEL)) == Some(&hash));
    olds.sort_by_key(revision);
    let max_rev = olds.iter().map(revision).max().unwrap_or(0);
    let paused = spec.paused.unwrap_or(false);
    let new = match news.into_iter().next() {
        Some(r) => r,
        None if paused => return Ok(()),
        None => {
            let mut template = spec.template.clone();
            let meta = template.metadata.get_or_insert_with(Default::default);
            meta.labels
                .get_or_insert_with(BTreeMap::new)
                .insert(HASH_LABEL.into(), hash.clone());
            let mut selector: LabelSelector = spec.selector.clone();
            selector
                .match_labels
                .get_or_insert_with(BTreeMap::new)
                .insert(HASH_LABEL.into(), hash.clone());
            let mut labels = meta.labels.clone().unwrap_or_default();
            labels.insert(HASH_LABEL.into(), hash.clone());
            let first = olds.iter().all(|r| replicas(r) == 0);
            let rs = ReplicaSet {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-{hash}")),
                    namespace: Some(ns.clone()),
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([(
                        REVISION.to_owned(),
                        (max_rev + 1).to_string(),
                    )])),
                    owner_references: Some(vec![owner_ref("Deployment", &d.metadata)]),
                    ..Default::default()
                },
                spec: Some(ReplicaSetSpec {
                    replicas: Some(if first { want } else { 0 }),
                    selector,
                    template: Some(template),
                    min_ready_seconds: spec.min_ready_seconds,
                }),
                status: None,
            };
            let created = match rs_api.create(&PostParams::default(), &rs).await {
                Ok(r) => r,
                Err(kube::Error::Api(e)) if e.code == 409 => return Ok(()), // seen next tick
                Err(e) => return Err(e),
            };
            tracing::info!(deployment = %name, replicaset = ?created.metadata.name, "new revision");
            if first && want > 0 {
                let rs_name = created.metadata.name.as_deref().unwrap_or_default();
                scaling_event(client, d, rs_name, 0, want).await;
            }
            created
        }
    };
    // A rollback (`kubectl rollout undo`) makes an old ReplicaSet the new one again:
    // it takes the next revision, as in Kubernetes, so history lists it last.
    let cause = d
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CHANGE_CAUSE));
    let new_cause = new
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CHANGE_CAUSE));
    let rev = if revision(&new) <= max_rev {
        max_rev + 1
    } else {
        revision(&new)
    };
    if rev != revision(&new) || (cause.is_some() && cause != new_cause) {
        let mut annotations = serde_json::Map::new();
        annotations.insert(REVISION.into(), rev.to_string().into());
        if let Some(c) = cause {
            annotations.insert(CHANGE_CAUSE.into(), c.clone().into());
        }
        let patch = json!({"metadata": {"annotations": annotations}});
        let rs_name = new.metadata.name.clone().unwrap_or_default();
        rs_api
            .patch(&rs_name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    if !paused {
        let strategy = spec.strategy.as_ref();
        let recreate = strategy.and_then(|s| s.type_.as_deref()) == Some("Recreate");
        if recreate {
            for r in &olds {
                scale(client, d, &rs_api, r, 0).await?;
            }
            let olds_running = olds
                .iter()
                .any(|r| r.status.as_ref().is_some_and(|s| s.replicas > 0));
            if !olds_running {
                scale(client, d, &rs_api, &new, want).await?;
            }
        } else {
            let ru = strategy.and_then(|s| s.rolling_update.as_ref());
            let surge = resolve(ru.and_then(|r| r.max_surge.as_ref()), want, 25, true);
            let mut unavailable =
                resolve(ru.and_then(|r| r.max_unavailable.as_ref()), want, 25, false);
            if surge == 0 && unavailable == 0 {
                unavailable = 1;
            }
            // Scale the new ReplicaSet up within the surge budget.
            let total: i32 = olds.iter().map(replicas).sum::<i32>() + replicas(&new);
            let new_target = if replicas(&new) >= want {
                want
            } else {
                (replicas(&new) + (want + surge - total).max(0)).min(want)
            };
            scale(client, d, &rs_api, &new, new_target).await?;
            // Scale old ones down while availability stays above want - maxUnavailable.
            let min_available = want - unavailable;
            let all_available: i32 = olds.iter().map(available).sum::<i32>() + available(&new);
            let mut budget = (all_available - min_available).max(0);
            // Old pods that are not available cost no availability to remove.
            for r in &olds {
                let unready = (replicas(r) - available(r)).max(0);
                let cut = (unready + budget).min(replicas(r));
                if cut > 0 {
                    tracing::info!(
                        deployment = %name,
                        replicaset = ?r.metadata.name,
                        from = replicas(r),
                        to = replicas(r) - cut,
                        all_available,
                        min_available,
                        unready,
                        new_state = ?(replicas(&new), new.status.as_ref().map(|s| (s.replicas, s.ready_replicas, s.available_replicas))),
                        old_state = ?(r.status.as_ref().map(|s| (s.replicas, s.ready_replicas, s.available_replicas))),
                        "scaling down an old revision"
                    );
                    budget -= (cut - unready).max(0);
                    scale(client, d, &rs_api, r, replicas(r) - cut).await?;
                }
            }
        }
        // Revision history: drop empty old ReplicaSets beyond the limit.
        let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
        let empty: Vec<&ReplicaSet> = olds
            .iter()
            .filter(|r| replicas(r) == 0 && r.status.as_ref().is_none_or(|s| s.replicas == 0))
            .collect();
        if empty.len() > limit {
            for r in &empty[..empty.len() - limit] {
                let _ = rs_api
                    .delete(
                        r.metadata.name.as_deref().unwrap_or_default(),
                        &Default::default(),
                    )
                    .await;
            }
        }
    }
    update_status(client, d, &new, &olds, want).await
}

async fn update_status(
    client: &kube::Client,
    d: &Deployment,
    new: &ReplicaSet,
    olds: &[ReplicaSet],
    want: i32,
) -> Result<(), kube::Error> {
    let st = |r: &ReplicaSet| r.status.clone().unwrap_or_default();
    let all: Vec<&ReplicaSet> = olds.iter().chain(std::iter::once(new)).collect();
    let replicas: i32 = all.iter().map(|r| st(r).replicas).sum();
    let ready: i32 = all.iter().map(|r| st(r).ready_replicas.unwrap_or(0)).sum();
    let avail: i32 = all.iter().map(|r| available(r)).sum();
    let updated = st(new).replicas;
    let unavailable_budget = resolve(
        d.spec
            .as_ref()
            .and_then(|s| s.strategy.as_ref())
            .and_then(|s| s.rolling_update.as_ref())
            .and_then(|r| r.max_unavailable.as_ref()),
        want,
        25,
        false,
    );
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let old_conds = d
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let since = old_conds
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        DeploymentCondition {
            type_: type_.into(),
            status: status.into(),
            reason: Some(reason.into()),
            message: Some(message),
            last_transition_time: Some(since),
            last_update_time: Some(now.clone()),
        }
    };
    let complete = updated == want && replicas == want && avail == want;
    let new_name = new.metadata.name.clone().unwrap_or_default();
    // A ReplicaSet's removals refused by risk control show on the Deployment too.
    let failure = all.iter().find_map(|r| {
        st(r)
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")
    });
    let status = DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(replicas),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready),
        available_replicas: Some(avail),
        unavailable_replicas: Some((want - avail).max(0)),
        conditions: Some(
            [
                cond(
                    "Available",
                    avail >= want - unavailable_budget,
                    if avail >= want - unavailable_budget {
                        "MinimumReplicasAvailable"
                    } else {
                        "MinimumReplicasUnavailable"
                    },
                    format!("{avail} of {want} replicas available"),
                ),
                cond(
                    "Progressing",
                    true,
                    if complete {
                        "NewReplicaSetAvailable"
                    } else {
                        "ReplicaSetUpdated"
                    },
                    if complete {
                        format!("ReplicaSet \"{new_name}\" has successfully progressed.")
                    } else {
                        format!("ReplicaSet \"{new_name}\" is progressing.")
                    },
                ),
            ]
            .into_iter()
            .chain(failure.map(|f| {
                cond(
                    "ReplicaFailure",
                    true,
                    f.reason.as_deref().unwrap_or("FailedDelete"),
                    f.message.unwrap_or_default(),
                )
            }))
            .collect(),
        ),
        ..Default::default()
    };
    let cur = d.status.clone().unwrap_or_default();
    let same = cur.observed_generation == status.observed_generation
        && cur.replicas == status.replicas
        && cur.updated_replicas == status.updated_replicas
        && cur.ready_replicas == status.ready_replicas
        && cur.available_replicas == status.available_replicas
        && cur.conditions.as_ref().map(|c| {
            c.iter()
                .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
                .collect::<Vec<_>>()
        }) == status.conditions.as_ref().map(|c| {
            c.iter()
                .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
                .collect::<Vec<_>>()
        });
    let name = d.metadata.name.clone().unwrap_or_default();
    let api: Api<Deployment> = Api::namespaced(
        client.clone(),
        d.metadata.namespace.as_deref().unwrap_or_default(),
    );
    let rev = new
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .cloned()
        .unwrap_or_default();
    let has_rev = d
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        == Some(&rev);
    if !has_rev {
        let patch = json!({"metadata": {"annotations": {REVISION: rev}}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    if !same {
        let patch = json!({"status": status});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_round_like_kubernetes() {
        let p = |s: &str| IntOrString::String(s.into());
        assert_eq!(resolve(Some(&p("25%")), 10, 25, true), 3);
        assert_eq!(resolve(Some(&p("25%")), 10, 25, false), 2);
        assert_eq!(resolve(Some(&IntOrString::Int(1)), 10, 25, false), 1);
        assert_eq!(resolve(None, 4, 25, true), 1);
    }

    #[test]
    fn a_deployment_is_reconciled_again_when_it_or_one_of_its_replicasets_changed() {
        let meta = |uid: &str, rv: &str| ObjectMeta {
            uid: Some(uid.into()),
            resource_version: Some(rv.into()),
            ..Default::default()
        };
        let d = |rv: &str| Deployment {
            metadata: meta("d", rv),
            ..Default::default()
        };
        let rs = |uid: &str, rv: &str| ReplicaSet {
            metadata: meta(uid, rv),
            ..Default::default()
        };
        let (a, b) = (rs("a", "5"), rs("b", "6"));
        let base = fingerprint(&d("1"), &[&a, &b]);
        assert_eq!(
            base,
            fingerprint(&d("1"), &[&b, &a]),
            "order does not matter"
        );
        assert_ne!(
            base,
            fingerprint(&d("2"), &[&a, &b]),
            "the Deployment changed"
        );
        let a2 = rs("a", "7");
        assert_ne!(
            base,
            fingerprint(&d("1"), &[&a2, &b]),
            "a ReplicaSet changed"
        );
        assert_ne!(base, fingerprint(&d("1"), &[&a]), "a ReplicaSet went away");
    }
}
