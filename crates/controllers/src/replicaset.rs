//! The ReplicaSet controller.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetCondition, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use rand::Rng;
use serde_json::json;

use meridian_api::meridian::REPLACES_NODE_ANNOTATION;

use crate::index::PodView;
use crate::{Stores, Tick, is_active, is_ready, owner_ref};

/// Nodes of pods the region marked lost (`Failed`, reason `NodeLost`) that no
/// active pod replaces yet: one entry per lost pod, newest first.
fn unreplaced_lost_nodes(pods: &[Arc<PodView>], active: &[Arc<PodView>]) -> Vec<String> {
    let mut lost: Vec<(Option<k8s_openapi::jiff::Timestamp>, String)> = pods
        .iter()
        .filter(|p| {
            let st = p.status.as_ref();
            st.and_then(|s| s.phase.as_deref()) == Some("Failed")
                && st.and_then(|s| s.reason.as_deref()) == Some("NodeLost")
        })
        .filter_map(|p| {
            let node = p.spec.as_ref()?.node_name.clone()?;
            Some((p.metadata.creation_timestamp.as_ref().map(|t| t.0), node))
        })
        .collect();
    lost.sort_by_key(|l| std::cmp::Reverse(l.0));
    let mut lost: Vec<String> = lost.into_iter().map(|(_, n)| n).collect();
    for p in active {
        if let Some(n) = p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REPLACES_NODE_ANNOTATION))
            && let Some(i) = lost.iter().position(|l| l == n)
        {
            lost.remove(i);
        }
    }
    lost
}

/// At most this many pods created or deleted per ReplicaSet per tick.
const BURST: usize = 500;
/// Pod creations in flight (all ReplicaSets together), and ReplicaSets reconciled
/// at once.
const CONCURRENCY: usize = 64;

/// Set once the server has answered that it has no bulk pod creation: from then
/// on pods are created one request each.
static NO_BULK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Random names collide now and then (1,000 pods of one set: ~3 % chance): a pod
/// whose name is taken gets another, this many times, rather than wait a tick.
const NAME_TRIES: usize = 3;

/// Creates `pods` (named `{base}-{suffix}`): in one `bulkpods` request (one store
/// commit for all), or one request each when the server has no bulk creation.
/// The names of the pods created.
async fn create_pods(
    client: &kube::Client,
    api: &Api<Pod>,
    base: &str,
    mut pods: Vec<Pod>,
    requests: &tokio::sync::Semaphore,
) -> (Vec<String>, u64) {
    use std::sync::atomic::Ordering;
    let mut names = Vec::new();
    // The newest resourceVersion a creation was written at (0: not known).
    let mut rv = 0u64;
    let rv_of = |v: Option<&str>| v.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    for _ in 0..=NAME_TRIES {
        if pods.is_empty() || NO_BULK.load(Ordering::Relaxed) {
            break;
        }
        // A bulk request is a heavy one: at most a few in flight.
        let _permits = requests.acquire_many(BULK_PERMITS).await;
        let answer = meridian_scheduler::bulk_post(client, "bulkpods", &pods).await;
        let items = match answer {
            Ok(items) => items,
            Err(kube::Error::Api(e)) if (403..=405).contains(&e.code) => {
                tracing::info!(
                    "no bulk pod creation on this server ({}); one request per pod",
                    e.code
                );
                NO_BULK.store(true, Ordering::Relaxed);
                break;
            }
            Err(e) => {
                tracing::warn!(replicaset = %base, "cannot create pods: {e}");
                return (names, rv);
            }
        };
        let mut again = Vec::new();
        for (mut pod, it) in pods.into_iter().zip(items) {
            match (it["status"].as_str(), it["reason"].as_str()) {
                (Some("Success"), _) => {
                    rv = rv.max(rv_of(it["resourceVersion"].as_str()));
                    names.extend(it["name"].as_str().map(str::to_owned));
                }
                (_, Some("AlreadyExists")) => {
                    pod.metadata.name = Some(format!("{base}-{}", suffix()));
                    again.push(pod);
                }
                _ => tracing::warn!(replicaset = %base, "cannot create pod: {}", it["message"]),
            }
        }
        pods = again;
    }
    if !NO_BULK.load(Ordering::Relaxed) {
        return (names, rv);
    }
    // Many creations in flight: the store commits them together.
    let one_by_one = futures::stream::iter(pods)
        .map(|mut pod| {
            let api = api.clone();
            async move {
                let _permit = requests.acquire().await;
                let mut tries = 0;
                loop {
                    match api.create(&PostParams::default(), &pod).await {
                        Err(kube::Error::Api(e)) if e.code == 409 && tries < NAME_TRIES => {
                            tries += 1;
                            pod.metadata.name = Some(format!("{base}-{}", suffix()));
                        }
                        r => return r,
                    }
                }
            }
        })
        .buffer_unordered(CONCURRENCY)
        .filter_map(|r| async {
            match r {
                Ok(p) => Some((
                    p.metadata.name?,
                    rv_of(p.metadata.resource_version.as_deref()),
                )),
                Err(e) => {
                    tracing::warn!(replicaset = %base, "cannot create pod: {e}");
                    None
                }
            }
        })
        .collect::<Vec<(String, u64)>>()
        .await;
    for (name, v) in one_by_one {
        names.push(name);
        rv = rv.max(v);
    }
    (names, rv)
}

/// Whether pods a ReplicaSet created (`names`, written at resourceVersion `rv`,
/// `elapsed` ago) may still show up in a watch that has reached `seen_rv` and shows
/// `have`: some are missing and the watch has not reached their version yet (or,
/// the version unknown, for a while). Once it has, a missing one was deleted.
fn still_coming(
    names: &[String],
    have: &std::collections::HashSet<&str>,
    elapsed: std::time::Duration,
    rv: u64,
    seen_rv: u64,
) -> bool {
    let coming = if rv > 0 {
        seen_rv < rv && elapsed < crate::CREATED_MAX_WAIT
    } else {
        elapsed < crate::CREATED_TTL
    };
    coming && names.iter().any(|n| !have.contains(n.as_str()))
}

/// Permits (of `CONCURRENCY`) one bulk request holds: at most 8 in flight.
const BULK_PERMITS: u32 = (CONCURRENCY / 8) as u32;

pub(crate) fn suffix() -> String {
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

pub async fn reconcile_all(client: &kube::Client, s: &Stores, tick: &Tick) {
    // Before the pods are read: every pod written up to this version is in them.
    let seen_rv = s.pods.seen_rv();
    let sets = s.replicasets.state();
    // ReplicaSets waiting on a clock: looked at every `timers` tick.
    let waiting: std::collections::HashSet<String> = if tick.timers {
        let ex = s.expectations.lock().unwrap_or_else(|e| e.into_inner());
        let created = s.created.lock().unwrap_or_else(|e| e.into_inner());
        ex.keys().chain(created.keys()).cloned().collect()
    } else {
        Default::default()
    };
    let work: Vec<(Arc<ReplicaSet>, String, Vec<Arc<PodView>>)> = {
        let mut reconciled = s.reconciled.lock().unwrap_or_else(|e| e.into_inner());
        if tick.full {
            // Forget ReplicaSets that are gone.
            let live = crate::uids(&s.replicasets);
            reconciled.retain(|uid, _| live.contains(uid));
        }
        sets.into_iter()
            .filter(|rs| rs.metadata.deletion_timestamp.is_none())
            .filter_map(|rs| {
                let uid = rs.metadata.uid.clone().unwrap_or_default();
                let rv = rs.metadata.resource_version.clone().unwrap_or_default();
                let unchanged = !tick.changed.contains(uid.as_str())
                    && reconciled.get(&uid).is_some_and(|seen| *seen == rv);
                let on_clock = || {
                    tick.timers
                        && (waiting.contains(&uid)
                            || s.denials.pending(&format!(
                                "ReplicaSet/{}/{}",
                                rs.metadata.namespace.as_deref().unwrap_or_default(),
                                rs.metadata.name.as_deref().unwrap_or_default()
                            )))
                };
                if unchanged && !tick.full && !on_clock() {
                    return None;
                }
                reconciled.insert(uid.clone(), rv);
                let pods = s.pods.controlled_by(&uid);
                Some((rs, uid, pods))
            })
            .collect()
    };
    // Many ReplicaSets at once (thousands of small workloads must not wait for each
    // other's round trips); pod creations share one bound on requests in flight.
    let requests = tokio::sync::Semaphore::new(CONCURRENCY);
    futures::stream::iter(work)
        .for_each_concurrent(CONCURRENCY, |(rs, uid, pods)| {
            let requests = &requests;
            async move { reconcile(client, s, &rs, &uid, pods, seen_rv, requests).await }
        })
        .await;
}

async fn reconcile(
    client: &kube::Client,
    s: &Stores,
    rs: &ReplicaSet,
    uid: &str,
    pods: Vec<Arc<PodView>>,
    seen_rv: u64,
    requests: &tokio::sync::Semaphore,
) {
    let ns = rs.metadata.namespace.clone().unwrap_or_default();
    let name = rs.metadata.name.clone().unwrap_or_default();
    let want = rs
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1)
        .max(0) as usize;
    let mut active: Vec<Arc<PodView>> = pods.iter().filter(|p| is_active(p)).cloned().collect();
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // Pods we created that the watch has not shown yet: wait for them by name
    // (a count alone is fooled when a pod also disappears meanwhile, and a short
    // timeout is fooled by a watch minutes behind on a loaded server: both made
    // duplicates).
    let unseen = {
        let mut created = s.created.lock().unwrap_or_else(|e| e.into_inner());
        let unseen = created.get(uid).is_some_and(|(names, t, rv)| {
            let have: std::collections::HashSet<&str> = pods
                .iter()
                .filter_map(|p| p.metadata.name.as_deref())
                .collect();
            still_coming(names, &have, t.elapsed(), *rv, seen_rv)
        });
        if !unseen {
            created.remove(uid);
        }
        unseen
    };
    let waiting = unseen || {
        let mut ex = s.expectations.lock().unwrap_or_else(|e| e.into_inner());
        match ex.get(uid) {
            Some(&(target, up, t))
                if t.elapsed() < crate::EXPECTATION_TTL
                    && ((up && active.len() < target) || (!up && active.len() > target)) =>
            {
                true
            }
            _ => {
                ex.remove(uid);
                false
            }
        }
    };
    let expect = |target: usize, up: bool| {
        s.expectations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.to_owned(), (target, up, std::time::Instant::now()));
    };
    if waiting {
        // The watch has not caught up with our last changes yet.
    } else if active.len() < want {
        let Some(template) = rs.spec.as_ref().and_then(|s| s.template.clone()) else {
            return;
        };
        let mut meta = template.metadata.clone().unwrap_or_default();
        meta.namespace = Some(ns.clone());
        meta.owner_references = Some(vec![owner_ref("ReplicaSet", &rs.metadata)]);
        let n = (want - active.len()).min(BURST);
        expect(active.len() + n, true);
        let mut lost = unreplaced_lost_nodes(&pods, &active).into_iter();
        let new_pods: Vec<Pod> = (0..n)
            .map(|_| {
                let mut meta = meta.clone();
                // A replacement for a pod of a lost node: placement prefers its place.
                if let Some(node) = lost.next() {
                    meta.annotations
                        .get_or_insert_with(Default::default)
                        .insert(REPLACES_NODE_ANNOTATION.into(), node);
                }
                Pod {
                    metadata: ObjectMeta {
                        name: Some(format!("{name}-{}", suffix())),
                        ..meta
                    },
                    spec: template.spec.clone(),
                    status: None,
                }
            })
            .collect();
        let (names, rv) = create_pods(client, &pod_api, &name, new_pods, requests).await;
        let created = names.len();
        if created > 0 {
            s.created
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(uid.to_owned(), (names, std::time::Instant::now(), rv));
        }
        if created < n {
            expect(active.len() + created, true);
        }
    } else if active.len() > want && s.denials.blocked(&format!("ReplicaSet/{ns}/{name}")) {
        // Risk control refused the last removal: backing off.
    } else if active.len() > want {
        // Delete the least useful first: unscheduled, not ready, then the newest.
        active.sort_by_key(|p| {
            let scheduled = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
            let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
            (scheduled, is_ready(p), std::cmp::Reverse(created))
        });
        let n = (active.len() - want).min(BURST);
        expect(active.len() - n, false);
        let key = format!("ReplicaSet/{ns}/{name}");
        let mut refused = false;
        for p in active.iter().take(n) {
            let pname = p.metadata.name.clone().unwrap_or_default();
            if let Err(e) = pod_api.delete(&pname, &Default::default()).await {
                if crate::risk::risk_denial(&e).is_some() {
                    refused = true;
                    if let Some(msg) = s.denials.note(&key, &e) {
                        crate::risk::report(client, "ReplicaSet", &ns, &name, Some(uid), &msg)
                            .await;
                    }
                    // Expect nothing more to go: the next tick sees the truth.
                    expect(active.len(), false);
                    break;
                }
                tracing::warn!(replicaset = %name, pod = %pname, "cannot delete pod: {e}");
            }
        }
        if !refused {
            s.denials.clear(&key);
        }
    }
    let ready = active.iter().filter(|p| is_ready(p)).count() as i32;
    // Kubernetes' ReplicaFailure condition, here for removals risk control refuses.
    let refusal = if active.len() > want {
        s.denials.message(&format!("ReplicaSet/{ns}/{name}"))
    } else {
        None
    };
    let conditions = refusal.map(|message| {
        vec![ReplicaSetCondition {
            type_: "ReplicaFailure".into(),
            status: "True".into(),
            reason: Some("FailedDelete".into()),
            message: Some(message),
            last_transition_time: None,
        }]
    });
    let status = ReplicaSetStatus {
        replicas: active.len() as i32,
        fully_labeled_replicas: Some(active.len() as i32),
        ready_replicas: Some(ready),
        available_replicas: Some(ready),
        observed_generation: rs.metadata.generation,
        conditions: conditions.clone(),
        ..Default::default()
    };
    let current = rs.status.clone().unwrap_or_default();
    let same_conditions = current
        .conditions
        .as_ref()
        .filter(|c| !c.is_empty())
        .map(|c| (c[0].type_.clone(), c[0].message.clone()))
        == conditions
            .as_ref()
            .map(|c| (c[0].type_.clone(), c[0].message.clone()));
    if current.replicas != status.replicas
        || current.ready_replicas.unwrap_or(0) != ready
        || current.available_replicas.unwrap_or(0) != ready
        || current.observed_generation != status.observed_generation
        || !same_conditions
    {
        let api: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
        let mut patch = json!({"status": status});
        if status.conditions.is_none() {
            // A merge patch removes what it sets to null.
            patch["status"]["conditions"] = serde_json::Value::Null;
        }
        if let Err(e) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            tracing::debug!(replicaset = %name, "status: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::Duration;

    #[test]
    fn created_pods_are_awaited_until_the_watch_passes_their_version_however_long_it_lags() {
        let names = vec!["web-a".to_string(), "web-b".to_string()];
        let only_a: HashSet<&str> = ["web-a"].into();
        let both: HashSet<&str> = ["web-a", "web-b"].into();
        let ten_minutes = Duration::from_secs(600);
        // The watch is ten minutes behind and has not reached version 500: wait
        // (a 5-minute timeout alone created the missing pod again).
        assert!(still_coming(&names, &only_a, ten_minutes, 500, 499));
        // Past version 500 and still missing: it was deleted meanwhile.
        assert!(!still_coming(&names, &only_a, Duration::ZERO, 500, 500));
        // All there: nothing to wait for.
        assert!(!still_coming(&names, &both, Duration::ZERO, 500, 10));
        // Behind for longer than the longest wait: give up.
        assert!(!still_coming(
            &names,
            &only_a,
            Duration::from_secs(3600),
            500,
            1
        ));
        // Version unknown: the 5-minute wait.
        assert!(still_coming(&names, &only_a, Duration::from_secs(60), 0, 0));
        assert!(!still_coming(&names, &only_a, ten_minutes, 0, 0));
    }
}
