//! Namespace lifecycle: the platform's own namespaces exist; a terminating namespace
//! has its content deleted and then goes away; namespaces and tokens of a deleted
//! tenant are cleaned up. A level-triggered loop, so a crash mid-way just resumes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian_api::Resource;
use meridian_api::resources::RESOURCES;
use serde_json::{Value, json};

use crate::auth::TOKEN_PREFIX;
use crate::tenancy::split_physical;
use crate::{AppState, ServerError};

fn namespaces() -> &'static Resource {
    RESOURCES
        .iter()
        .find(|r| r.plural == "namespaces" && r.group.is_empty())
        .expect("namespaces are registered")
}

fn tenants() -> &'static Resource {
    RESOURCES
        .iter()
        .find(|r| r.plural == "tenants")
        .expect("tenants are registered")
}

pub async fn ensure_system_namespaces(state: &AppState) -> Result<(), ServerError> {
    let r = namespaces();
    for name in ["default", "kube-system", "kube-public"] {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "uid": uuid::Uuid::new_v4().to_string(),
                "creationTimestamp": crate::now(), "labels": {"kubernetes.io/metadata.name": name}},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
        let key = r.storage_key(None, name);
        if state.store.get(&key).await?.is_none() {
            state
                .store
                .create(&key, Bytes::from(obj.to_string()))
                .await?;
        }
    }
    Ok(())
}

/// Runs until shutdown, every second.
pub async fn run(state: Arc<AppState>) {
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if let Err(e) = reconcile(&state).await {
            tracing::warn!(error = %e, "namespace lifecycle pass failed; will retry");
        }
    }
}

async fn reconcile(state: &AppState) -> Result<(), ServerError> {
    let snap = state.cache.snapshot();
    let nss = namespaces();
    let tenant_exists = |t: &str| snap.get(&tenants().storage_key(None, t)).is_some();
    for ns in snap.range(&nss.storage_prefix(), None) {
        let obj: Value = ns.value();
        let terminating = obj["metadata"]["deletionTimestamp"].is_string();
        let orphaned = split_physical(ns.name())
            .0
            .is_some_and(|t| !tenant_exists(t));
        if !(terminating || orphaned) {
            continue;
        }
        // Delete everything inside, then the namespace itself.
        for r in RESOURCES.iter().filter(|r| r.namespaced()) {
            let prefix = format!("{}{}/", r.storage_prefix(), ns.name());
            for o in snap.range(&prefix, None) {
                if let Some(kv) = state.store.get(&o.key).await? {
                    state.store.delete(&kv.key, kv.mod_revision).await?;
                }
            }
        }
        if let Some(kv) = state.store.get(&ns.key).await? {
            state.store.delete(&kv.key, kv.mod_revision).await?;
            tracing::info!(namespace = %ns.name(), "namespace deleted");
        }
    }
    for t in snap.range(TOKEN_PREFIX, None) {
        let tenant = serde_json::from_slice::<Value>(&t.json)
            .ok()
            .and_then(|v| v["tenant"].as_str().map(str::to_owned));
        if let Some(tenant) = tenant
            && !tenant_exists(&tenant)
            && let Some(kv) = state.store.get(&t.key).await?
        {
            state.store.delete(&kv.key, kv.mod_revision).await?;
        }
    }
    Ok(())
}
