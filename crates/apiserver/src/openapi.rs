//! OpenAPI v3, as much as kubectl needs to validate on the server: the index at
//! `/openapi/v3` and, per group-version, a document whose create and patch
//! operations carry `x-kubernetes-group-version-kind` and the `fieldValidation`
//! query parameter. kubectl then sends `fieldValidation=Strict` and the server
//! refuses unknown fields (`handlers::unknown_fields`), instead of kubectl needing
//! every schema (which is why `--validate=false` is no longer needed). No schemas
//! yet, so `kubectl explain` does not work; patch operations do not offer strategic
//! merge here, so kubectl builds its patches from its own types as it does for any
//! server without schemas.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::response::Response;
use bytes::Bytes;
use http::StatusCode;
use meridian_api::Resource;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::handlers::{json_response, served};

/// `api/v1`, `apis/apps/v1`, ...
fn gv_path(r: &Resource) -> String {
    if r.group.is_empty() {
        format!("api/{}", r.version)
    } else {
        format!("apis/{}/{}", r.group, r.version)
    }
}

fn document(gv: &str, resources: &[&Resource]) -> Value {
    let mut paths = serde_json::Map::new();
    let field_validation = json!({"name": "fieldValidation", "in": "query", "schema": {"type": "string",
        "enum": ["Ignore", "Warn", "Strict"]},
        "description": "Strict: unknown fields are an error"});
    for r in resources {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let base = if r.namespaced() {
            format!("/{gv}/namespaces/{{namespace}}/{}", r.plural)
        } else {
            format!("/{gv}/{}", r.plural)
        };
        let ok = json!({"200": {"description": "OK"}, "201": {"description": "Created"}});
        let body = |types: &[&str]| {
            let content: serde_json::Map<String, Value> = types
                .iter()
                .map(|t| ((*t).to_owned(), json!({"schema": {"type": "object"}})))
                .collect();
            json!({"content": content})
        };
        paths.insert(
            base.clone(),
            json!({"post": {"operationId": format!("create{}", r.kind), "x-kubernetes-group-version-kind": gvk,
                "x-kubernetes-action": "post", "parameters": [field_validation],
                "requestBody": body(&["application/json", "application/yaml"]), "responses": ok}}),
        );
        paths.insert(
            format!("{base}/{{name}}"),
            json!({
                "put": {"operationId": format!("replace{}", r.kind), "x-kubernetes-group-version-kind": gvk,
                    "x-kubernetes-action": "put", "parameters": [field_validation],
                    "requestBody": body(&["application/json", "application/yaml"]), "responses": ok},
                "patch": {"operationId": format!("patch{}", r.kind), "x-kubernetes-group-version-kind": gvk,
                    "x-kubernetes-action": "patch", "parameters": [field_validation],
                    "requestBody": body(&["application/json-patch+json", "application/merge-patch+json",
                        "application/apply-patch+yaml"]), "responses": ok},
            }),
        );
    }
    json!({"openapi": "3.0.0", "info": {"title": "Meridian", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths, "components": {"schemas": {}}})
}

struct Docs {
    index: Bytes,
    by_gv: BTreeMap<String, Bytes>,
}

fn docs() -> &'static Docs {
    static DOCS: OnceLock<Docs> = OnceLock::new();
    DOCS.get_or_init(|| {
        let mut groups: BTreeMap<String, Vec<&Resource>> = BTreeMap::new();
        for r in served() {
            groups.entry(gv_path(r)).or_default().push(r);
        }
        let mut by_gv = BTreeMap::new();
        let mut index = serde_json::Map::new();
        for (gv, rs) in groups {
            let doc = Bytes::from(document(&gv, &rs).to_string());
            let hash = hex(&Sha256::digest(&doc)[..16]);
            index.insert(
                gv.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={hash}")}),
            );
            by_gv.insert(gv, doc);
        }
        Docs {
            index: Bytes::from(json!({"paths": index}).to_string()),
            by_gv,
        }
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// `/openapi/v3` and `/openapi/v3/{gv}`; `None` for any other path.
pub fn serve(path: &str) -> Option<Response> {
    let d = docs();
    if path == "/openapi/v3" {
        return Some(json_response(StatusCode::OK, d.index.clone()));
    }
    let gv = path.strip_prefix("/openapi/v3/")?;
    let doc = d.by_gv.get(gv)?;
    Some(json_response(StatusCode::OK, doc.clone()))
}
