//! `GET .../pods/{name}/log`: proxied to the region that manages the pod's node,
//! which asks the node's agent over its stream and streams the answer back.
//! Tenancy applies as for any pod read: the path resolves inside the caller's
//! virtual cluster, so a tenant can only reach its own pods' logs.

use std::time::Duration;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::Response;
use meridian_api::error::{ApiError, Reason};
use meridian_api::resources::Resource;
use serde_json::Value;

use crate::handlers::Ctx;

/// CA of region serving certificates (the center's `pki/ca.crt`), relative to the
/// server's data directory.
pub const REGIONS_CA_FILE: &str = "pki/regions-ca.crt";

/// The file (in the data dir) holding the token regions accept from us.
pub const REGION_TOKEN_FILE: &str = "system-region.token";

fn param_int(cx: &Ctx<'_>, name: &str, min: i64) -> Result<Option<i64>, ApiError> {
    match cx.query.get(name) {
        None => Ok(None),
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n >= min => Ok(Some(n)),
            _ => Err(ApiError::invalid(
                "PodLogOptions",
                "",
                cx.name(),
                vec![meridian_api::error::Cause::invalid(
                    name,
                    v,
                    format!("must be an integer greater than or equal to {min}"),
                )],
            )),
        },
    }
}

fn flag(cx: &Ctx<'_>, name: &str) -> bool {
    matches!(cx.query.get(name).map(String::as_str), Some("true" | "1"))
}

/// Where a pod's container runs and how to reach the region that manages it.
pub(crate) struct Located {
    pub uid: String,
    pub container: String,
    pub region: String,
    /// `https://host:port` of the region.
    pub endpoint: String,
    pub token: String,
    /// The CA of region serving certificates, when the server has one.
    pub regions_ca: Option<Vec<u8>>,
}

/// Resolves the pod the request names (inside the caller's virtual cluster) and its
/// `container` query parameter (empty: the pod's only container; checked only when
/// `container_matters`) to its region.
pub(crate) async fn locate(
    cx: &Ctx<'_>,
    what: &str,
    container_matters: bool,
) -> Result<Located, ApiError> {
    let snap = cx.state.cache.snapshot();
    let obj = snap.get(&cx.key()).ok_or_else(|| cx.not_found())?;
    let pod: Value = serde_json::from_slice(&obj.json)
        .map_err(|e| ApiError::new(Reason::InternalError, format!("stored pod: {e}")))?;
    let name = cx.name().to_owned();
    let containers: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    let container = cx.query.get("container").cloned().unwrap_or_default();
    if container_matters && container.is_empty() && containers.len() > 1 {
        return Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {name}, choose one of: [{}]",
            containers.join(" ")
        )));
    }
    if !container.is_empty() && !containers.contains(&container.as_str()) {
        return Err(ApiError::bad_request(format!(
            "container {container} is not valid for pod {name}"
        )));
    }
    let container = if container.is_empty() {
        containers
            .first()
            .map(|c| c.to_string())
            .unwrap_or_default()
    } else {
        container
    };
    let Some(node) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) else {
        return Err(ApiError::bad_request(format!(
            "pod {name} is not scheduled to a node yet: it has no {what}"
        )));
    };
    let uid = pod["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let nodes = Resource::by_kind("Node").ok_or_else(|| internal("no Node kind"))?;
    let node_obj = snap.get(&nodes.storage_key(None, node)).ok_or_else(|| {
        ApiError::new(
            Reason::NotFound,
            format!("node {node} of pod {name} not found"),
        )
    })?;
    let region = node_obj
        .label("meridian.io/region")
        .map(str::to_owned)
        .ok_or_else(|| unavailable(format!("node {node} is not managed by a region")))?;
    let clusters =
        Resource::by_kind("EdgeCluster").ok_or_else(|| internal("no EdgeCluster kind"))?;
    let cluster = snap
        .get(&clusters.storage_key(None, &region))
        .ok_or_else(|| unavailable(format!("region {region} of node {node} is not registered")))?;
    let cluster: Value =
        serde_json::from_slice(&cluster.json).map_err(|e| internal(&e.to_string()))?;
    let endpoint = cluster["spec"]["endpoint"]
        .as_str()
        .ok_or_else(|| unavailable(format!("region {region} has no endpoint")))?
        .trim_end_matches('/')
        .to_owned();
    let token = tokio::fs::read_to_string(cx.state.config.data_dir.join(REGION_TOKEN_FILE))
        .await
        .map_err(|_| unavailable("no region token: the server has never issued one".into()))?
        .trim()
        .to_owned();
    // Regions serving TLS have certificates from the nodes' CA (the center's).
    let regions_ca = tokio::fs::read(cx.state.config.data_dir.join(REGIONS_CA_FILE))
        .await
        .ok();
    Ok(Located {
        uid,
        container,
        region,
        endpoint,
        token,
        regions_ca,
    })
}

pub async fn serve(cx: &Ctx<'_>) -> Result<Response, ApiError> {
    let tail = param_int(cx, "tailLines", 0)?;
    let limit = param_int(cx, "limitBytes", 1)?;
    let Located {
        uid,
        container,
        region,
        endpoint,
        token,
        regions_ca,
    } = locate(cx, "logs", true).await?;
    let mut query: Vec<(&str, String)> = vec![("container", container)];
    for f in ["follow", "previous", "timestamps"] {
        if flag(cx, f) {
            query.push((f, "true".into()));
        }
    }
    if let Some(t) = tail {
        query.push(("tailLines", t.to_string()));
    }
    if let Some(l) = limit {
        query.push(("limitBytes", l.to_string()));
    }
    let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
    if let Some(pem) = regions_ca {
        let ca = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| internal(&format!("{REGIONS_CA_FILE}: {e}")))?;
        builder = builder.add_root_certificate(ca);
    }
    let client = builder.build().map_err(|e| internal(&e.to_string()))?;
    let resp = client
        .get(format!("{endpoint}/v1/logs/{uid}"))
        .bearer_auth(&token)
        .query(&query)
        .send()
        .await
        .map_err(|e| unavailable(format!("region {region} is unreachable: {e}")))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        let reason = match status.as_u16() {
            400 => Reason::BadRequest,
            404 => Reason::NotFound,
            504 => Reason::Timeout,
            _ => Reason::ServiceUnavailable,
        };
        return Err(ApiError::new(reason, text));
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from_stream(resp.bytes_stream()))
        .map_err(|e| internal(&e.to_string()))
}

pub(crate) fn internal(m: &str) -> ApiError {
    ApiError::new(Reason::InternalError, m.to_owned())
}

pub(crate) fn unavailable(m: String) -> ApiError {
    ApiError::new(Reason::ServiceUnavailable, m)
}
