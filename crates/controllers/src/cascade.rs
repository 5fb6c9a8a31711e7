//! Foreground and orphan cascading deletion. The API server keeps an owner deleted
//! with `propagationPolicy: Foreground` or `Orphan` (deletionTimestamp plus the
//! finalizer `foregroundDeletion` or `orphan`); here its dependents are deleted
//! (foreground, recursively) or released (their ownerReference to it removed), and
//! then the finalizer is removed, which lets the API server delete the owner.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

use crate::Stores;
use crate::index::PodView;

const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";

fn cascade_of(meta: &ObjectMeta) -> Option<&'static str> {
    meta.deletion_timestamp.as_ref()?;
    let f = meta.finalizers.as_ref()?;
    if f.iter().any(|x| x == FOREGROUND) {
        Some(FOREGROUND)
    } else if f.iter().any(|x| x == ORPHAN) {
        Some(ORPHAN)
    } else {
        None
    }
}

/// What the cascade needs of a dependent.
struct Dep<'a> {
    namespace: &'a str,
    name: &'a str,
    owners: &'a [OwnerReference],
    deleting: bool,
}

impl<'a> Dep<'a> {
    fn of(meta: &'a ObjectMeta) -> Self {
        Dep {
            namespace: meta.namespace.as_deref().unwrap_or_default(),
            name: meta.name.as_deref().unwrap_or_default(),
            owners: meta.owner_references.as_deref().unwrap_or_default(),
            deleting: meta.deletion_timestamp.is_some(),
        }
    }

    fn of_pod(p: &'a PodView) -> Self {
        let meta = &p.metadata;
        Dep {
            namespace: meta.namespace.as_deref().unwrap_or_default(),
            name: meta.name.as_deref().unwrap_or_default(),
            owners: meta.owner_references.as_deref().unwrap_or_default(),
            deleting: meta.deletion_timestamp.is_some(),
        }
    }
}

fn owned_by<'a>(list: &'a [Arc<ReplicaSet>], uid: &str) -> Vec<Dep<'a>> {
    list.iter()
        .map(|r| Dep::of(&r.metadata))
        .filter(|d| d.owners.iter().any(|o| o.uid == uid))
        .collect()
}

/// Deletes (foreground) or releases (orphan) the dependents, kind `K`; true when
/// none is left.
async fn work_dependents<K>(
    client: &kube::Client,
    deps: &[Dep<'_>],
    owner_uid: &str,
    how: &str,
) -> bool
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    for d in deps {
        let api: Api<K> = Api::namespaced(client.clone(), d.namespace);
        if how == ORPHAN {
            let rest: Vec<_> = d.owners.iter().filter(|o| o.uid != owner_uid).collect();
            let refs = if rest.is_empty() {
                json!(null)
            } else {
                json!(rest)
            };
            let patch = json!({"metadata": {"ownerReferences": refs}});
            if let Err(e) = api
                .patch(d.name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                tracing::debug!(dependent = %d.name, "orphaning: {e}");
            }
        } else if !d.deleting
            && let Err(e) = api.delete(d.name, &DeleteParams::foreground()).await
        {
            tracing::debug!(dependent = %d.name, "foreground delete: {e}");
        }
    }
    deps.is_empty()
}

/// Removes the cascade finalizer `how`, letting the API server delete the owner.
async fn release<K>(client: &kube::Client, owner: &K, how: &str)
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let meta = owner.meta();
    let api: Api<K> = Api::namespaced(
        client.clone(),
        meta.namespace.as_deref().unwrap_or_default(),
    );
    let rest: Vec<&String> = meta
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != how)
        .collect();
    let patch = json!({"metadata": {"finalizers": rest}});
    let name = meta.name.clone().unwrap_or_default();
    match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => tracing::info!(owner = %name, cascade = how, "cascading deletion finished"),
        Err(e) => tracing::debug!(owner = %name, "finalizer: {e}"),
    }
}

/// The owners being deleted with a cascade: each with its uid and cascade.
fn cascading<K: kube::Resource>(owners: &[Arc<K>]) -> Vec<(&Arc<K>, String, &'static str)> {
    owners
        .iter()
        .filter_map(|o| {
            let how = cascade_of(o.meta())?;
            Some((o, o.meta().uid.clone().unwrap_or_default(), how))
        })
        .collect()
}

/// Works the cascade of every owner in `owners` (of pods) being deleted with one.
async fn pod_owners<K>(client: &kube::Client, s: &Stores, owners: &[Arc<K>])
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    for (o, uid, how) in cascading(owners) {
        let pods = s.pods.dependents_of(&uid);
        let deps: Vec<Dep> = pods.iter().map(|p| Dep::of_pod(p)).collect();
        if work_dependents::<Pod>(client, &deps, &uid, how).await {
            release(client, &**o, how).await;
        }
    }
}

/// One pass over every owner being deleted with a cascade.
pub async fn run(client: &kube::Client, s: &Stores) {
    let replicasets = s.replicasets.state();
    for (o, uid, how) in cascading(&s.deployments.state()) {
        let deps = owned_by(&replicasets, &uid);
        if work_dependents::<ReplicaSet>(client, &deps, &uid, how).await {
            release(client, &**o, how).await;
        }
    }
    pod_owners(client, s, &replicasets).await;
    pod_owners(client, s, &s.daemonsets.state()).await;
    pod_owners(client, s, &s.jobs.state()).await;
}
