//! Workload controllers: level-triggered loops over the global API (through the
//! `kube` crate, like any client). Every tick each controller compares desired with
//! observed state for every object and converges; a missed event is healed by the
//! next tick, never by luck.
//!
//! - ReplicaSet: keeps `spec.replicas` active pods, owned by the ReplicaSet.
//! - Deployment: one ReplicaSet per pod-template hash, rolling updates within
//!   `maxSurge`/`maxUnavailable` (or Recreate), revision annotations, history limit,
//!   `kubectl rollout`-compatible status.
//! - Garbage collection (background): pods and ReplicaSets whose controlling owner
//!   is gone are deleted; foreground and orphan deletion are worked in `cascade`.

pub mod cascade;
pub mod daemonset;
pub mod deployment;
pub mod index;
pub mod job;
pub mod replicaset;
pub mod risk;

use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Api;

use crate::index::PodView;
use kube::runtime::reflector::Store;
use meridian_scheduler::reflect;

pub struct Stores {
    pub pods: std::sync::Arc<index::PodIndex>,
    pub replicasets: Store<ReplicaSet>,
    pub deployments: Store<Deployment>,
    pub daemonsets: Store<DaemonSet>,
    pub jobs: Store<Job>,
    pub nodes: Store<Node>,
    /// Creations/deletions made but not yet seen by the watch, per ReplicaSet uid:
    /// (active pod count we expect, growing?, when). Keeps a lagging watch from
    /// causing duplicate pods.
    pub expectations:
        std::sync::Mutex<std::collections::HashMap<String, (usize, bool, std::time::Instant)>>,
    /// Pods a ReplicaSet created that its watch has not shown yet, by ReplicaSet
    /// uid: (names, when, the newest resourceVersion they were written at). Until
    /// each shows up the ReplicaSet creates nothing more, however far behind the
    /// watch is; once the watch is past that resourceVersion, a name still missing
    /// was deleted meanwhile (see [`CREATED_TTL`]).
    pub created: std::sync::Mutex<std::collections::HashMap<String, Created>>,
    /// Removals risk control refused, per workload: backing off.
    pub denials: risk::Denials,
    /// ReplicaSets as last reconciled, by uid: their resourceVersion. A ReplicaSet
    /// that has not changed since, none of whose pods changed, is skipped until
    /// the next full pass.
    pub reconciled: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Deployments as last reconciled, by uid: a fingerprint of their
    /// resourceVersion and their ReplicaSets' (see [`deployment::reconcile_all`]).
    pub deployments_reconciled: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

/// Pods one ReplicaSet created: their names, when, and the newest resourceVersion
/// they were written at (0: not known).
pub type Created = (Vec<String>, std::time::Instant, u64);

/// What one tick of the controllers works on.
#[derive(Default)]
pub struct Tick {
    /// Owners (by uid) one of whose pods changed since the last tick.
    pub changed: std::collections::HashSet<std::sync::Arc<str>>,
    /// Look at every object, changed or not (a change may have been missed).
    pub full: bool,
    /// Look also at the objects waiting on a clock (expectations or created pods
    /// not yet seen, a risk-control backoff), changed or not.
    pub timers: bool,
}

/// Every this many ticks (30 s) the controllers look at every object.
const FULL_PASS_EVERY: u64 = 100;
/// Every this many ticks (3 s) they look at every object waiting on a clock. Every
/// object every 3 s, as before, walked all 500,000 pods' owners each time at 100,000
/// hollow nodes (`controlled_by`, `controller_of`, `is_ready`: ~6 % of the server).
const TIMERS_EVERY: u64 = 10;

/// How long a ReplicaSet waits for pods it created to appear in its watch when it
/// does not know the resourceVersion they were written at (Kubernetes'
/// expectations use the same 5 minutes). When it does, it waits until the watch has
/// passed that version, up to [`CREATED_MAX_WAIT`]: at 100,000 nodes and 500,000
/// pods on two cores the controllers' watch fell more than 5 minutes behind, and the
/// 5-minute wait alone let ReplicaSets create 330,000 pods too many.
pub(crate) const CREATED_TTL: std::time::Duration = std::time::Duration::from_secs(300);

/// The longest a ReplicaSet waits for its own pods, whatever its watch says.
pub(crate) const CREATED_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(1800);

/// How long a controller trusts that creations or deletions it made will show up in
/// its watch before it looks again. A loaded server's watch can lag by seconds; too
/// short a wait creates the same pods twice (seen: 4% more pods than replicas with
/// 5 s, 100,000 pods at once on two cores).
pub(crate) const EXPECTATION_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs every controller until the task is dropped.
pub async fn run(client: kube::Client) {
    let stores = Stores {
        pods: index::PodIndex::watch(&client),
        replicasets: reflect(&client),
        deployments: reflect(&client),
        daemonsets: reflect(&client),
        jobs: reflect(&client),
        nodes: meridian_scheduler::reflect_slim(&client, meridian_scheduler::engine::slim_node),
        expectations: Default::default(),
        created: Default::default(),
        denials: Default::default(),
        reconciled: Default::default(),
        deployments_reconciled: Default::default(),
    };
    stores.pods.wait_until_ready().await;
    if stores.replicasets.wait_until_ready().await.is_err()
        || stores.deployments.wait_until_ready().await.is_err()
        || stores.daemonsets.wait_until_ready().await.is_err()
        || stores.jobs.wait_until_ready().await.is_err()
        || stores.nodes.wait_until_ready().await.is_err()
    {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    for n in 0u64.. {
        tick.tick().await;
        let t = Tick {
            changed: stores.pods.take_changed(),
            full: n % FULL_PASS_EVERY == 0,
            timers: n % TIMERS_EVERY == 0,
        };
        deployment::reconcile_all(&client, &stores, &t).await;
        replicaset::reconcile_all(&client, &stores, &t).await;
        daemonset::reconcile_all(&client, &stores).await;
        job::reconcile_all(&client, &stores).await;
        // Orphans wait for a full pass (they wait 10 s anyway): every tick it was
        // a walk over every owner of every pod.
        if t.timers {
            collect_garbage(&client, &stores).await;
        }
        cascade::run(&client, &stores).await;
    }
}

pub use meridian_api::owners::controller_of;

pub fn owner_ref(kind: &str, meta: &ObjectMeta) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".into(),
        kind: kind.into(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn older_than(created: Option<&Time>, secs: i64) -> bool {
    created.is_some_and(|t| {
        t.0.duration_until(k8s_openapi::jiff::Timestamp::now())
            .as_secs()
            > secs
    })
}

/// The uids of every object in a store.
fn uids<K: kube::Resource<DynamicType = ()> + Clone>(
    store: &Store<K>,
) -> std::collections::HashSet<String> {
    store
        .state()
        .iter()
        .filter_map(|o| o.meta().uid.clone())
        .collect()
}

/// Background cascading deletion: dependents whose controlling owner no longer
/// exists are deleted (after a short age, so a watch that is behind never makes
/// a fresh object look orphaned).
async fn collect_garbage(client: &kube::Client, s: &Stores) {
    let rs_uids = uids(&s.replicasets);
    let mut other_uids = uids(&s.daemonsets);
    other_uids.extend(uids(&s.jobs));
    for (owner, kind) in s.pods.controllers() {
        let gone = match kind.as_str() {
            "ReplicaSet" => !rs_uids.contains(&owner),
            "DaemonSet" | "Job" => !other_uids.contains(&owner),
            _ => false,
        };
        if !gone {
            continue;
        }
        for p in s.pods.controlled_by(&owner) {
            if p.metadata.deletion_timestamp.is_some()
                || !older_than(p.metadata.creation_timestamp.as_ref(), 10)
            {
                continue;
            }
            let ns = p.metadata.namespace.as_deref().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(client.clone(), ns);
            let name = p.metadata.name.clone().unwrap_or_default();
            let key = format!("gc/Pod/{ns}/{name}");
            if s.denials.blocked(&key) {
                continue;
            }
            tracing::info!(pod = %name, owner = %owner, kind = %kind, "garbage collecting orphaned pod");
            if let Err(e) = api.delete(&name, &Default::default()).await {
                s.denials.note(&key, &e);
            }
        }
    }
    let deploy_uids = uids(&s.deployments);
    for r in s.replicasets.state() {
        if let Some(o) = controller_of(&r.metadata)
            && o.kind == "Deployment"
            && !deploy_uids.contains(&o.uid)
            && older_than(r.metadata.creation_timestamp.as_ref(), 10)
        {
            let api: Api<ReplicaSet> = Api::namespaced(
                client.clone(),
                r.metadata.namespace.as_deref().unwrap_or_default(),
            );
            let name = r.metadata.name.clone().unwrap_or_default();
            let key = format!(
                "gc/ReplicaSet/{}/{name}",
                r.metadata.namespace.as_deref().unwrap_or_default()
            );
            if s.denials.blocked(&key) {
                continue;
            }
            tracing::info!(replicaset = %name, owner = %o.name, "garbage collecting orphaned replicaset");
            if let Err(e) = api.delete(&name, &Default::default()).await {
                s.denials.note(&key, &e);
            }
        }
    }
}

pub fn is_active(p: &PodView) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && !matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

pub fn is_ready(p: &PodView) -> bool {
    p.status.as_ref().is_some_and(|s| s.ready)
}
