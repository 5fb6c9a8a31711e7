//! OpenAPI v3 and v2 documents: the v3 index at `/openapi/v3` and, per
//! group-version, a document whose paths carry `x-kubernetes-group-version-kind` and
//! the `fieldValidation` query parameter (so kubectl sends `fieldValidation=Strict`
//! and the server refuses unknown fields, `handlers::unknown_fields`) and whose
//! `components.schemas` hold every served kind's schema (`kubectl explain`);
//! `/openapi/v2` is one Swagger 2.0 document with all of them, as JSON (kubectl
//! itself asks v2 for protobuf only, for `explain --output plaintext-openapiv2`,
//! which is refused with 406). Patch operations do not offer strategic merge, so
//! kubectl builds its patches from its own types as it does for any server.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::response::Response;
use bytes::Bytes;
use http::StatusCode;
use meridian_api::Resource;
use meridian_api::openapi::{Flavor, definitions, reachable};
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

fn document(gv: &str, resources: &[&Resource], defs: &DefsOf) -> Value {
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
        let schema = json!({"$ref": format!("#/components/schemas/{}", defs.name(r))});
        let ok = json!({"200": {"description": "OK", "content": {"application/json": {"schema": schema}}},
            "201": {"description": "Created", "content": {"application/json": {"schema": schema}}}});
        let body = |types: &[&str]| {
            let content: serde_json::Map<String, Value> = types
                .iter()
                .map(|t| ((*t).to_owned(), json!({"schema": schema})))
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
    let roots: Vec<&str> = resources.iter().map(|r| defs.name(r)).collect();
    let schemas: serde_json::Map<String, Value> = reachable(&defs.defs, &roots)
        .into_iter()
        .filter_map(|n| defs.defs.get(&n).map(|d| (n, d.clone())))
        .collect();
    json!({"openapi": "3.0.0", "info": {"title": "Meridian", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths, "components": {"schemas": schemas}})
}

/// Definitions of one flavour and which one is each resource's.
struct DefsOf {
    defs: serde_json::Map<String, Value>,
    names: Vec<(&'static Resource, String)>,
}

impl DefsOf {
    fn new(flavor: Flavor) -> Self {
        let (defs, names) = definitions(flavor);
        Self { defs, names }
    }

    fn name(&self, r: &Resource) -> &str {
        self.names
            .iter()
            .find(|(x, _)| std::ptr::eq(*x, r))
            .map(|(_, n)| n.as_str())
            .unwrap_or_default()
    }
}

/// The Swagger 2.0 document: every kind's definition and its collection and item
/// paths with their GVK.
fn v2() -> Value {
    let defs = DefsOf::new(Flavor::V2);
    let mut paths = serde_json::Map::new();
    for r in served() {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let base = if r.namespaced() {
            format!("/{}/namespaces/{{namespace}}/{}", gv_path(r), r.plural)
        } else {
            format!("/{}/{}", gv_path(r), r.plural)
        };
        let schema = json!({"$ref": format!("#/definitions/{}", defs.name(r))});
        let op = |verb: &str, id: &str| {
            json!({"operationId": format!("{id}{}", r.kind), "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": gvk,
                "responses": {"200": {"description": "OK", "schema": schema}}})
        };
        paths.insert(
            base.clone(),
            json!({"get": op("list", "list"), "post": op("post", "create")}),
        );
        paths.insert(
            format!("{base}/{{name}}"),
            json!({"get": op("get", "read"), "put": op("put", "replace"),
                "patch": op("patch", "patch"), "delete": op("delete", "delete")}),
        );
    }
    json!({"swagger": "2.0", "info": {"title": "Meridian", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths, "definitions": defs.defs})
}

struct Docs {
    index: Bytes,
    by_gv: BTreeMap<String, Bytes>,
    v2: Bytes,
}

fn docs() -> &'static Docs {
    static DOCS: OnceLock<Docs> = OnceLock::new();
    DOCS.get_or_init(|| {
        let mut groups: BTreeMap<String, Vec<&Resource>> = BTreeMap::new();
        for r in served() {
            groups.entry(gv_path(r)).or_default().push(r);
        }
        let defs = DefsOf::new(Flavor::V3);
        let mut by_gv = BTreeMap::new();
        let mut index = serde_json::Map::new();
        for (gv, rs) in groups {
            let doc = Bytes::from(document(&gv, &rs, &defs).to_string());
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
            v2: Bytes::from(v2().to_string()),
        }
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// `/openapi/v2`, `/openapi/v3` and `/openapi/v3/{gv}`; `None` for any other path.
pub fn serve(path: &str, accept: &str) -> Option<Response> {
    let d = docs();
    if path == "/openapi/v2" {
        if !accept.is_empty()
            && !accept.contains("json")
            && !accept.contains("*/*")
            && accept.contains("protobuf")
        {
            return Some(json_response(
                StatusCode::NOT_ACCEPTABLE,
                Bytes::from(
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "NotAcceptable", "code": 406,
                        "message": "the OpenAPI v2 document is served as JSON only; kubectl explain uses OpenAPI v3"})
                    .to_string(),
                ),
            ));
        }
        return Some(json_response(StatusCode::OK, d.v2.clone()));
    }
    if path == "/openapi/v3" {
        return Some(json_response(StatusCode::OK, d.index.clone()));
    }
    let gv = path.strip_prefix("/openapi/v3/")?;
    let doc = d.by_gv.get(gv)?;
    Some(json_response(StatusCode::OK, doc.clone()))
}
