//! Foreground and orphan cascading deletion. The API server keeps an owner deleted
//! with `propagationPolicy: Foreground` or `Orphan` (deletionTimestamp plus the
//! finalizer `foregroundDeletion` or `orphan`); here its dependents are deleted
//! (foreground, recursively) or released (their ownerReference to it removed), and
//! then the finalizer is removed, which lets the API server delete the owner.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

use crate::Stores;

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

fn owned_by<'a, K: kube::Resource>(list: &'a [Arc<K>], uid: &str) -> Vec<&'a Arc<K>> {
    list.iter()
        .filter(|d| {
            d.meta()
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.uid == uid)
        })
        .collect()
}

/// Deletes (foreground) or releases (orphan) the dependents; true when none is left.
async fn work_dependents<K>(
    client: &kube::Client,
    deps: &[&Arc<K>],
    owner_uid: &str,
    how: &str,
) -> bool
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + serde::Serialize,
{
    for d in deps {
        let meta = d.meta();
        let api: Api<K> = Api::namespaced(
            client.clone(),
            meta.namespace.as_deref().unwrap_or_default(),
        );
        let name = meta.name.clone().unwrap_or_default();
        if how == ORPHAN {
            let rest: Vec<_> = meta
                .owner_references
                .iter()
                .flatten()
                .filter(|o| o.uid != owner_uid)
                .cloned()
                .collect();
            let refs = if rest.is_empty() {
                json!(null)
            } else {
                json!(rest)
            };
            let patch = json!({"metadata": {"ownerReferences": refs}});
            if let Err(e) = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                tracing::debug!(dependent = %name, "orphaning: {e}");
            }
        } else if meta.deletion_timestamp.is_none()
            && let Err(e) = api.delete(&name, &DeleteParams::foreground()).await
        {
            tracing::debug!(dependent = %name, "foreground delete: {e}");
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

/// Works the cascade of every owner in `owners` being deleted with one.
async fn owners<K, D>(client: &kube::Client, owners: &[Arc<K>], deps: impl Fn(&str) -> Vec<Arc<D>>)
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    D: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + serde::Serialize,
{
    for o in owners {
        if let Some(how) = cascade_of(o.meta()) {
            let uid = o.meta().uid.clone().unwrap_or_default();
            let deps = deps(&uid);
            let mine: Vec<&Arc<D>> = deps.iter().collect();
            if work_dependents(client, &mine, &uid, how).await {
                release(client, &**o, how).await;
            }
        }
    }
}

/// One pass over every owner being deleted with a cascade.
pub async fn run(client: &kube::Client, s: &Stores) {
    let replicasets = s.replicasets.state();
    owners(client, &s.deployments.state(), |uid| {
        owned_by(&replicasets, uid).into_iter().cloned().collect()
    })
    .await;
    let pods = |uid: &str| s.pods.dependents_of(uid);
    owners(client, &replicasets, pods).await;
    owners(client, &s.daemonsets.state(), pods).await;
    owners(client, &s.jobs.state(), pods).await;
}
