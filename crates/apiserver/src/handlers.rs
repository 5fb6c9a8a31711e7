//! The REST verbs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, header};
use meridian_api::resources::RESOURCES;
use meridian_api::selectors::{FieldSelector, LabelSelector};
use meridian_api::{ApiError, Cause, Reason, Resource};
use meridian_store::{KeyValue, Revision, Txn};
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::{self, Identity, TokenRecord, Verb};
use crate::cache::{CacheError, CachedObject, Snapshot};
use crate::risk::{Action, Permit, RiskGate};
use crate::route::{self, Route, Target};
use crate::tenancy::{self, View, is_namespaces};

pub fn router(state: Arc<AppState>) -> Router {
    Router::new().fallback(dispatch).with_state(state)
}

/// Everything a verb needs to know about its request.
pub struct Ctx<'a> {
    pub state: &'a Arc<AppState>,
    pub who: Identity,
    pub target: Target,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
    /// A status write that also takes the object's annotations from the request:
    /// a region's node summary in `bulknodestatuses` (usage annotation and status
    /// in one write, not a patch of each).
    pub(crate) status_with_annotations: bool,
}

impl<'a> Ctx<'a> {
    /// The context of one item of a bulk request: the same caller and server.
    fn item(
        &self,
        resource: &'static Resource,
        namespace: Option<String>,
        name: Option<String>,
        subresource: Option<&str>,
        headers: HeaderMap,
    ) -> Ctx<'a> {
        Ctx {
            state: self.state,
            who: self.who.clone(),
            target: Target {
                resource,
                namespace,
                name,
                subresource: subresource.map(str::to_owned),
            },
            query: HashMap::new(),
            headers,
            status_with_annotations: false,
        }
    }

    pub fn view(&self) -> View<'_> {
        View {
            tenant: self.who.tenant(),
        }
    }
    pub(crate) fn resource(&self) -> &'static Resource {
        self.target.resource
    }
    pub(crate) fn name(&self) -> &str {
        self.target.name.as_deref().unwrap_or_default()
    }
    pub(crate) fn key(&self) -> String {
        self.view().key(
            self.resource(),
            self.target.namespace.as_deref(),
            self.name(),
        )
    }
    pub(crate) fn not_found(&self) -> ApiError {
        ApiError::not_found(self.resource().plural, self.resource().group, self.name())
    }
    fn conflict(&self, why: &str) -> ApiError {
        ApiError::conflict(
            self.resource().plural,
            self.resource().group,
            self.name(),
            why,
        )
    }
}

const CONFLICT_MODIFIED: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

pub fn error_response(e: &ApiError) -> Response {
    json_response(
        StatusCode::from_u16(e.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Bytes::from(e.to_status().to_string()),
    )
}

pub fn json_response(code: StatusCode, body: Bytes) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("internal error: {e}"))
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> Self {
        match e {
            CacheError::TooOld { .. } => ApiError::gone(e.to_string()),
            CacheError::NotYet(_) => ApiError::new(Reason::Timeout, e.to_string()),
            CacheError::Store(s) => internal(s),
            CacheError::Thread(_) => internal(e),
        }
    }
}

fn store_err(e: meridian_store::StoreError) -> ApiError {
    internal(e)
}

/// The single entry point: health, metrics, discovery and every resource path.
pub async fn dispatch(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    // `kubectl exec` upgrades to a WebSocket; the upgrade must be taken from the
    // request before anything else reads it.
    let mut ws = if path.ends_with("/exec") || path.ends_with("/portforward") {
        use axum::extract::FromRequestParts;
        axum::extract::ws::WebSocketUpgrade::from_request_parts(&mut parts, &())
            .await
            .ok()
    } else {
        None
    };
    match path.as_str() {
        "/healthz" | "/livez" => return (StatusCode::OK, "ok").into_response(),
        "/readyz" => {
            return if state.shutdown.is_cancelled() {
                (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
            } else {
                (StatusCode::OK, "ok").into_response()
            };
        }
        "/metrics" => {
            return (
                [(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                state.metrics.encode(),
            )
                .into_response();
        }
        "/version" => {
            return json_response(
                StatusCode::OK,
                Bytes::from(crate::discovery::version().to_string()),
            );
        }
        p if p.starts_with("/openapi/v3") || p == "/openapi/v2" => {
            let accept = parts
                .headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if let Some(r) = crate::openapi::serve(p, accept) {
                return r;
            }
        }
        _ => {}
    }
    let query: HashMap<String, String> = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let mut verb = "unknown";
    let mut resource = String::new();
    let mut scope = "cluster";
    let result = async {
        let who = authenticate(&state, &parts.headers)?;
        // Read the body before any other check can fail: answering early while the
        // client is still sending makes HTTP/1 clients see a reset connection.
        let body = read_body(body, state.config.max_body_bytes).await?;
        if path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" {
            verb = "create";
            resource = "selfsubjectaccessreviews".into();
            return access_review(&who, &parts.method, &body);
        }
        let route = route::parse(&path)?;
        let target = match route {
            Route::Discovery(segs) => {
                verb = "get";
                resource = "discovery".into();
                return crate::discovery::serve(&segs, &parts.headers);
            }
            Route::Resource(t) => t,
        };
        resource = match &target.subresource {
            Some(s) => format!("{}/{s}", target.resource.plural),
            None => target.resource.plural.to_owned(),
        };
        let v = verb_of(&parts.method, &target, &query)?;
        verb = v.as_str();
        // The scopes of the Kubernetes API latency SLIs: one object, one
        // namespace, or the whole cluster.
        scope = match (&target.name, &target.namespace) {
            (Some(_), _) => "resource",
            (None, Some(_)) => "namespace",
            (None, None) => "cluster",
        };
        auth::authorize(&who, v, target.resource, target.subresource.as_deref())?;
        if matches!(
            v,
            Verb::Create | Verb::Update | Verb::Patch | Verb::Delete | Verb::DeleteCollection
        ) && who.tenant().is_some()
            && target.resource.namespaced()
            && target.namespace.is_none()
        {
            return Err(ApiError::new(
                Reason::MethodNotAllowed,
                "writes need a namespace in the path",
            ));
        }
        let cx = Ctx {
            state: &state,
            who,
            target,
            query: query.clone(),
            headers: parts.headers.clone(),
            status_with_annotations: false,
        };
        match cx.target.subresource.as_deref() {
            Some("exec") => {
                let query = parts.uri.query().unwrap_or_default();
                return crate::exec::serve(&cx, query, ws.take()).await;
            }
            Some("portforward") => return crate::portforward::serve(&cx, ws.take()).await,
            _ => {}
        }
        run(&cx, v, body).await
    }
    .await;
    let response = match result {
        Ok(r) => r,
        Err(e) => {
            if e.code() >= 500 {
                tracing::warn!(%path, error = %e.message, "request failed");
            }
            let mut r = error_response(&e);
            if e.code() == 413 {
                // The rest of the body was never read: the connection cannot carry
                // another request, so tell HTTP/1 clients not to reuse it.
                r.headers_mut()
                    .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            r
        }
    };
    state.metrics.observe(
        verb,
        &resource,
        scope,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Identity, ApiError> {
    let unauthorized = || ApiError::unauthorized("Unauthorized");
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unauthorized)?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(unauthorized)?;
    let snapshot = state.cache.snapshot();
    let record = snapshot
        .get(&auth::token_key(token))
        .ok_or_else(unauthorized)?;
    let record: TokenRecord = serde_json::from_slice(&record.json).map_err(|_| unauthorized())?;
    let who = record.identity().ok_or_else(unauthorized)?;
    if let Identity::Tenant(t) = &who {
        // A deleted tenant's tokens stop working at once.
        let tenants =
            Resource::find("meridian.io", "v1alpha1", "tenants").ok_or_else(unauthorized)?;
        if snapshot.get(&tenants.storage_key(None, t)).is_none() {
            return Err(unauthorized());
        }
    }
    Ok(who)
}

fn verb_of(method: &Method, t: &Target, q: &HashMap<String, String>) -> Result<Verb, ApiError> {
    let is_watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let v = match (method, t.name.is_some()) {
        (&Method::GET, true) => Verb::Get,
        (&Method::GET, false) if is_watch => Verb::Watch,
        (&Method::GET, false) => Verb::List,
        (&Method::POST, false) => Verb::Create,
        (&Method::POST, true)
            if matches!(
                t.subresource.as_deref(),
                Some("binding" | "token" | "eviction" | "exec" | "portforward")
            ) =>
        {
            Verb::Create
        }
        (&Method::PUT, true) => Verb::Update,
        (&Method::PATCH, true) => Verb::Patch,
        (&Method::DELETE, true) if t.subresource.is_none() => Verb::Delete,
        (&Method::DELETE, false) => Verb::DeleteCollection,
        _ => {
            return Err(ApiError::new(
                Reason::MethodNotAllowed,
                format!(
                    "the server does not allow this method on the requested resource ({method})"
                ),
            ));
        }
    };
    if t.subresource.as_deref() == Some("finalize") && v != Verb::Update {
        return Err(ApiError::new(
            Reason::MethodNotAllowed,
            "finalize only supports PUT",
        ));
    }
    Ok(v)
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match axum::body::to_bytes(body, limit).await {
        Ok(b) => Ok(b),
        Err(e) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.to_string().contains("length limit"))
                || e.to_string().contains("length limit");
            if too_large {
                Err(ApiError::new(
                    Reason::RequestEntityTooLarge,
                    format!("the request body is larger than the limit of {limit} bytes"),
                ))
            } else {
                Err(ApiError::bad_request(format!(
                    "could not read the request body: {e}"
                )))
            }
        }
    }
}

async fn run(cx: &Ctx<'_>, verb: Verb, body: Bytes) -> Result<Response, ApiError> {
    match (verb, cx.target.subresource.as_deref()) {
        (Verb::Get, None | Some("status")) => get(cx).await,
        (Verb::Get, Some("scale")) => get_scale(cx).await,
        (Verb::Get, Some("log")) => crate::logs::serve(cx).await,
        (Verb::List, _) => list(cx).await,
        (Verb::Watch, _) => crate::watch::serve(cx).await,
        (Verb::Create, None) if cx.resource().plural == "bulkbindings" => bulk_bind(cx, body).await,
        (Verb::Create, None) if cx.resource().plural == "bulkpods" => {
            bulk_create_pods(cx, body).await
        }
        (Verb::Create, None)
            if matches!(cx.resource().plural, "bulkpodstatuses" | "bulknodestatuses") =>
        {
            bulk_statuses(cx, body, cx.resource().plural).await
        }
        (Verb::Create, None) => create(cx, body).await,
        (Verb::Create, Some("binding")) => bind(cx, body).await,
        (Verb::Create, Some("eviction")) => evict(cx, body).await,
        (Verb::Create, Some("token")) => issue_token(cx).await,
        (Verb::Update, Some("scale")) => update_scale(cx, body).await,
        (Verb::Update, sub) => update(cx, body, sub).await,
        (Verb::Patch, Some("scale")) => patch_scale(cx, body).await,
        (Verb::Patch, sub) => patch(cx, body, sub).await,
        (Verb::Delete, None) => delete(cx, body).await,
        (Verb::DeleteCollection, None) => delete_collection(cx, body).await,
        _ => Err(ApiError::new(
            Reason::MethodNotAllowed,
            "this verb is not supported on the subresource",
        )),
    }
}

// ---------------------------------------------------------------------------- bodies

/// Parses a JSON or YAML body into an object.
pub fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if ct.contains("protobuf") {
        // kubectl's imperative `create` sends built-in kinds this way and does not
        // fall back to JSON: the kinds it creates are read (see `protobuf`).
        return crate::protobuf::to_json(body)
            .map_err(|e| ApiError::new(Reason::UnsupportedMediaType, e));
    }
    if ct.contains("cbor") {
        return Err(ApiError::new(
            Reason::UnsupportedMediaType,
            format!(
                "the body of the request was in an unknown format ({ct:?}); accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf"
            ),
        ));
    }
    let v: Value = if ct.contains("yaml") {
        serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid YAML: {e}")))?
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?
    };
    if !v.is_object() {
        return Err(ApiError::bad_request("the body must be an object"));
    }
    Ok(v)
}

fn set_rv(obj: &mut Value, rv: Revision) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

/// Serialises a stored-form object for the caller's view.
fn respond(
    cx: &Ctx<'_>,
    code: StatusCode,
    mut obj: Value,
    rv: Revision,
) -> Result<Response, ApiError> {
    set_rv(&mut obj, rv);
    cx.state.risk.wrote(cx.resource(), rv);
    let bytes = Bytes::from(serde_json::to_vec(&obj).map_err(internal)?);
    Ok(json_response(code, cx.view().render(cx.resource(), &bytes)))
}

fn parse_stored(kv: &KeyValue) -> Result<Value, ApiError> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| internal(format!("stored object {} is corrupt: {e}", kv.key)))
}

fn random_suffix() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn strip_server_fields(obj: &mut Value) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        for f in ["resourceVersion", "selfLink", "managedFields"] {
            m.remove(f);
        }
    }
}

/// The object's namespace in the caller's view must agree with the path.
fn check_namespace(cx: &Ctx<'_>, obj: &mut Value) -> Result<(), ApiError> {
    let r = cx.resource();
    if !r.namespaced() {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        return Ok(());
    }
    let ns = cx.target.namespace.as_deref().ok_or_else(|| {
        ApiError::bad_request("a namespaced object needs a namespace in the path")
    })?;
    match obj["metadata"]["namespace"].as_str() {
        Some(given) if !given.is_empty() && given != ns => Err(ApiError::bad_request(format!(
            "the namespace of the provided object ({given}) does not match the namespace sent on the request ({ns})"
        ))),
        _ => {
            if !obj["metadata"].is_object() {
                obj["metadata"] = json!({});
            }
            obj["metadata"]["namespace"] = Value::String(ns.to_owned());
            Ok(())
        }
    }
}

/// Validates an object in the caller's view and turns it into its stored form.
/// Namespace objects named `tenant.ns` in the global view are validated as `ns`.
fn normalize_and_store_form(cx: &Ctx<'_>, mut obj: Value) -> Result<Value, ApiError> {
    let r = cx.resource();
    let view = cx.view();
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (owner, local) = if is_namespaces(r) && view.tenant.is_none() {
        let (t, l) = tenancy::split_physical(&name);
        (t.map(str::to_owned), l.to_owned())
    } else {
        (view.tenant.map(str::to_owned), name.clone())
    };
    if is_namespaces(r) {
        obj["metadata"]["name"] = Value::String(local.clone());
    }
    let strict = cx.query.get("fieldValidation").map(String::as_str) == Some("Strict");
    let before = strict.then(|| obj.clone());
    let mut obj = r.normalize(obj)?;
    if let Some(before) = before {
        let mut unknown = Vec::new();
        unknown_fields(&before, &obj, "", &mut unknown);
        if !unknown.is_empty() {
            let list = unknown
                .iter()
                .map(|f| format!("unknown field {f:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(ApiError::bad_request(format!(
                "{} in version {:?} cannot be handled as a {}: strict decoding error: {list}",
                r.kind,
                r.api_version(),
                r.kind
            )));
        }
    }
    let write_view = View {
        tenant: owner.as_deref(),
    };
    if is_namespaces(r) {
        if let Some(t) = &owner
            && (t == auth::SYSTEM_TENANT || t.is_empty())
        {
            return Err(ApiError::invalid(
                r.kind,
                "",
                &name,
                vec![meridian_api::Cause::invalid(
                    "metadata.name",
                    &name,
                    "the tenant part of a namespace name must name a tenant",
                )],
            ));
        }
        obj["metadata"]["name"] = Value::String(write_view.physical(&local));
        let labels = obj["metadata"]
            .as_object_mut()
            .map(|m| m.entry("labels").or_insert_with(|| json!({})));
        if let Some(Value::Object(labels)) = labels {
            labels.insert("kubernetes.io/metadata.name".into(), Value::String(local));
        }
    }
    if r.namespaced() {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        obj["metadata"]["namespace"] = Value::String(view.physical(&ns));
        if r.plural == "events"
            && let Some(ins) = obj["involvedObject"]["namespace"]
                .as_str()
                .map(str::to_owned)
        {
            obj["involvedObject"]["namespace"] = Value::String(view.physical(&ins));
        }
    }
    Ok(obj)
}

/// `kubectl auth can-i`: whether the caller may do a verb on a resource, by the
/// same rules every request is authorised with.
fn access_review(who: &Identity, method: &Method, body: &[u8]) -> Result<Response, ApiError> {
    if method != Method::POST {
        return Err(ApiError::new(
            Reason::MethodNotAllowed,
            "selfsubjectaccessreviews only supports create",
        ));
    }
    let mut review: Value = if body.starts_with(b"k8s\0") {
        // kubectl sends this one as protobuf; only the attributes are needed.
        review_from_protobuf(&body[4..])
            .ok_or_else(|| ApiError::bad_request("invalid SelfSubjectAccessReview (protobuf)"))?
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid SelfSubjectAccessReview: {e}")))?
    };
    let attrs = &review["spec"]["resourceAttributes"];
    let (allowed, reason) = if attrs.is_object() {
        let group = attrs["group"].as_str().unwrap_or("");
        let plural = attrs["resource"].as_str().unwrap_or("");
        let sub = attrs["subresource"].as_str().filter(|s| !s.is_empty());
        let verb = auth::Verb::parse(attrs["verb"].as_str().unwrap_or(""));
        let r = RESOURCES
            .iter()
            .find(|r| r.plural == plural && (r.group == group || group == "*"));
        match (r, verb) {
            (None, _) => (false, format!("no resource {plural:?} in group {group:?}")),
            (_, None) => (false, format!("unknown verb {:?}", attrs["verb"])),
            (Some(r), Some(v)) => match auth::authorize(who, v, r, sub) {
                Ok(()) => (true, String::new()),
                Err(e) => (false, e.message),
            },
        }
    } else {
        (false, "only resourceAttributes are supported".to_owned())
    };
    review["status"] = json!({"allowed": allowed, "reason": reason});
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["kind"] = json!("SelfSubjectAccessReview");
    Ok(json_response(
        StatusCode::CREATED,
        Bytes::from(review.to_string()),
    ))
}

/// The length-delimited fields of one protobuf message, by field number (other
/// wire types skipped); `None` on malformed input.
fn proto_fields(mut b: &[u8]) -> Option<Vec<(u64, &[u8])>> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&x, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(x & 0x7f) << shift;
            if x & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        match key & 7 {
            0 => {
                varint(&mut b)?;
            }
            1 => b = b.get(8..)?,
            5 => b = b.get(4..)?,
            2 => {
                let n = usize::try_from(varint(&mut b)?).ok()?;
                let (field, rest) = (b.get(..n)?, b.get(n..)?);
                out.push((key >> 3, field));
                b = rest;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// A SelfSubjectAccessReview from Kubernetes' protobuf envelope (`runtime.Unknown`
/// whose field 2 is the object; spec = 2, resourceAttributes = 1, then namespace,
/// verb, group, version, resource, subresource, name = 1..7).
fn review_from_protobuf(envelope: &[u8]) -> Option<Value> {
    let field = |b: &[u8], n: u64| -> Option<Vec<u8>> {
        proto_fields(b)?
            .into_iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.to_vec())
    };
    let raw = field(envelope, 2)?;
    let spec = field(&raw, 2)?;
    let attrs = field(&spec, 1).unwrap_or_default();
    let names = [
        "namespace",
        "verb",
        "group",
        "version",
        "resource",
        "subresource",
        "name",
    ];
    let mut a = serde_json::Map::new();
    for (n, v) in proto_fields(&attrs)? {
        if let Some(name) = names.get(usize::try_from(n).ok()?.checked_sub(1)?) {
            a.insert((*name).into(), json!(String::from_utf8_lossy(v)));
        }
    }
    Some(json!({"spec": {"resourceAttributes": a}}))
}

/// Fields of `input` that normalisation dropped (kubectl's `fieldValidation=Strict`).
/// Values that mean "absent" (null, empty lists and maps, false) do not count.
fn unknown_fields(input: &Value, kept: &Value, at: &str, out: &mut Vec<String>) {
    match (input, kept) {
        (Value::Object(i), Value::Object(k)) => {
            for (key, v) in i {
                let path = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                match k.get(key) {
                    Some(kv) => unknown_fields(v, kv, &path, out),
                    None => {
                        let absent = match v {
                            Value::Null | Value::Bool(false) => true,
                            Value::Array(a) => a.is_empty(),
                            Value::Object(m) => m.is_empty(),
                            _ => false,
                        };
                        if !absent {
                            out.push(path);
                        }
                    }
                }
            }
        }
        (Value::Array(i), Value::Array(k)) if i.len() == k.len() => {
            for (n, (a, b)) in i.iter().zip(k).enumerate() {
                unknown_fields(a, b, &format!("{at}[{n}]"), out);
            }
        }
        _ => {}
    }
}

/// Namespace lifecycle: objects go only into namespaces that exist and are not
/// terminating; tenant namespaces need their tenant.
fn admit_create(cx: &Ctx<'_>, snap: &Snapshot, obj: &Value) -> Result<(), ApiError> {
    let r = cx.resource();
    let nss = Resource::find("", "v1", "namespaces").ok_or_else(|| internal("no namespaces"))?;
    if r.namespaced() {
        let physical = obj["metadata"]["namespace"].as_str().unwrap_or_default();
        let local = cx.target.namespace.as_deref().unwrap_or_default();
        match snap.get(&nss.storage_key(None, physical)) {
            None => return Err(ApiError::not_found("namespaces", "", local)),
            Some(ns) => {
                if ns.value()["metadata"]["deletionTimestamp"].is_string() {
                    return Err(ApiError::forbidden(format!(
                        "unable to create new content in namespace {local} because it is being terminated"
                    )));
                }
            }
        }
    }
    crate::placement::check(snap, r, obj)?;
    if is_namespaces(r) {
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        if let (Some(t), _) = tenancy::split_physical(name) {
            let tenants = Resource::find("meridian.io", "v1alpha1", "tenants")
                .ok_or_else(|| internal("no tenants"))?;
            let Some(tenant) = snap.get(&tenants.storage_key(None, t)) else {
                return Err(ApiError::not_found("tenants", "meridian.io", t));
            };
            if let Some(max) = tenant.value()["spec"]["maxNamespaces"].as_u64() {
                let have = snap
                    .range(&format!("{}{t}.", nss.storage_prefix()), None)
                    .count() as u64;
                if have >= max {
                    return Err(ApiError::forbidden(format!(
                        "tenant {t} already has its maximum of {max} namespaces"
                    )));
                }
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------ verbs

async fn get(cx: &Ctx<'_>) -> Result<Response, ApiError> {
    let snap = snapshot_for(cx).await?;
    let obj = snap.get(&cx.key()).ok_or_else(|| cx.not_found())?;
    let rendered = cx.view().render(cx.resource(), &obj.json);
    if crate::table::wanted(&cx.headers) {
        let v: Value = serde_json::from_slice(&rendered).map_err(internal)?;
        let t = crate::table::render(
            cx.resource().kind,
            &[v],
            &snap,
            json!({"resourceVersion": obj.mod_revision.to_string()}),
        );
        return Ok(json_response(StatusCode::OK, Bytes::from(t.to_string())));
    }
    Ok(json_response(StatusCode::OK, rendered))
}

/// The snapshot a read is served from, per `resourceVersion` semantics.
async fn snapshot_for(cx: &Ctx<'_>) -> Result<Snapshot, ApiError> {
    let cache = &cx.state.cache;
    match cx.query.get("resourceVersion").map(String::as_str) {
        None | Some("") => Ok(cache.fresh_snapshot(&cx.state.store).await?),
        Some("0") => Ok(cache.snapshot()),
        Some(rv) => {
            let rv: Revision = rv
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?;
            let exact = cx.query.get("resourceVersionMatch").map(String::as_str) == Some("Exact");
            cache
                .wait_for(rv, Duration::from_secs(3))
                .await
                .map_err(|_| {
                    ApiError::new(
                        Reason::Timeout,
                        format!(
                            "Too large resource version: {rv}, current: {}",
                            cache.revision()
                        ),
                    )
                })?;
            let snap = cache.snapshot();
            if exact && snap.revision != rv {
                return Err(ApiError::gone(format!(
                    "resourceVersion {rv} with resourceVersionMatch=Exact is no longer available (current {})",
                    snap.revision
                )));
            }
            Ok(snap)
        }
    }
}

/// Label and field selectors of a list or watch, checked against the resource.
pub struct Filter {
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    pub fn from_query(cx: &Ctx<'_>) -> Result<Self, ApiError> {
        let labels = LabelSelector::parse(cx.query.get("labelSelector").map_or("", String::as_str))
            .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
        let mut fields =
            FieldSelector::parse(cx.query.get("fieldSelector").map_or("", String::as_str))
                .map_err(ApiError::bad_request)?;
        let view = cx.view();
        for (path, _, value) in &mut fields.terms {
            if !cx.resource().supports_field(path) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {path}"
                )));
            }
            // Field values are in the caller's view; match them in stored form.
            let physical = (path == "metadata.namespace" && cx.resource().namespaced())
                || (path == "metadata.name" && is_namespaces(cx.resource()))
                || path == "involvedObject.namespace";
            if physical && !value.is_empty() {
                *value = view.physical(value);
            }
        }
        Ok(Self { labels, fields })
    }

    pub fn matches(&self, o: &CachedObject) -> bool {
        self.labels.matches_with(|k| o.label(k)) && self.fields.matches(|p| o.field(p))
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Continue {
    rv: Revision,
    start: String,
}

async fn list(cx: &Ctx<'_>) -> Result<Response, ApiError> {
    let r = cx.resource();
    let filter = Filter::from_query(cx)?;
    let limit: usize = match cx.query.get("limit") {
        None => 0,
        Some(l) => l
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
    };
    let prefix = cx.view().prefix(r, cx.target.namespace.as_deref());
    let (snap, after) = match cx.query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let c: Continue = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(token)
                .ok()
                .and_then(|raw| serde_json::from_slice(&raw).ok())
                .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            if !c.start.starts_with(&prefix) {
                return Err(ApiError::bad_request(
                    "the continue token does not belong to this list",
                ));
            }
            // Every page from the first page's snapshot: a list whose pages came
            // from different revisions, followed by a watch from the last one,
            // missed every change to the items of the earlier pages (a scheduler
            // relisting 300,000 pods never saw thousands of them bound).
            let snap = cx.state.cache.pinned(c.rv).ok_or_else(|| {
                ApiError::gone(format!(
                    "the continue token of resourceVersion {} has expired; list again without it",
                    c.rv
                ))
            })?;
            (snap, Some(c.start))
        }
        None => (snapshot_for(cx).await?, None),
    };
    if limit == 0 && !crate::table::wanted(&cx.headers) {
        return Ok(stream_list(cx, r, snap, prefix, after, filter));
    }
    let view = cx.view();
    let mut body = list_head(r, 4096);
    let mut count = 0usize;
    let mut last_key: Option<Arc<str>> = None;
    let mut more = false;
    for o in snap.range(&prefix, after.as_deref()) {
        if !filter.matches(o) {
            continue;
        }
        if limit > 0 && count == limit {
            more = true;
            break;
        }
        if count > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&view.render(r, &o.json));
        count += 1;
        last_key = Some(o.key.clone());
    }
    body.extend_from_slice(b"],\"metadata\":{\"resourceVersion\":\"");
    body.extend_from_slice(snap.revision.to_string().as_bytes());
    body.push(b'"');
    if !more && after.is_some() {
        // The last page of a paginated list.
        cx.state.cache.release(snap.revision);
    }
    if more && let Some(k) = last_key {
        cx.state.cache.pin(&snap);
        let token = serde_json::to_vec(&Continue {
            rv: snap.revision,
            start: k.to_string(),
        })
        .map_err(internal)?;
        body.extend_from_slice(b",\"continue\":\"");
        body.extend_from_slice(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(token)
                .as_bytes(),
        );
        body.push(b'"');
    }
    body.extend_from_slice(b"}}");
    if crate::table::wanted(&cx.headers) {
        // kubectl get: the same list, printed by the server.
        let list: Value = serde_json::from_slice(&body).map_err(internal)?;
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let t = crate::table::render(r.kind, &items, &snap, list["metadata"].clone());
        return Ok(json_response(StatusCode::OK, Bytes::from(t.to_string())));
    }
    Ok(json_response(StatusCode::OK, Bytes::from(body)))
}

/// A list's JSON up to its first item.
fn list_head(r: &Resource, capacity: usize) -> Vec<u8> {
    let mut head = Vec::with_capacity(capacity);
    head.extend_from_slice(b"{\"kind\":\"");
    head.extend_from_slice(r.list_kind().as_bytes());
    head.extend_from_slice(b"\",\"apiVersion\":\"");
    head.extend_from_slice(r.api_version().as_bytes());
    head.extend_from_slice(b"\",\"items\":[");
    head
}

/// Bytes of rendered items per chunk of a streamed list.
const LIST_CHUNK: usize = 256 * 1024;

/// An unpaged list, written as it is rendered, a chunk at a time, from its
/// snapshot. Built whole, the LIST of 500,000 pods was a 665 MiB buffer (twice that
/// while it grew) on top of the cache it was copied from: the server's peak.
fn stream_list(
    cx: &Ctx<'_>,
    r: &'static Resource,
    snap: Snapshot,
    prefix: String,
    after: Option<String>,
    filter: Filter,
) -> Response {
    let tenant = cx.view().tenant.map(str::to_owned);
    let head = list_head(r, 128);
    let mut tail = Vec::with_capacity(64);
    tail.extend_from_slice(b"],\"metadata\":{\"resourceVersion\":\"");
    tail.extend_from_slice(snap.revision.to_string().as_bytes());
    tail.extend_from_slice(b"\"}}");
    if after.is_some() {
        // The last page of a paginated list (a continue token without a limit).
        cx.state.cache.release(snap.revision);
    }
    struct Cursor {
        snap: Snapshot,
        prefix: String,
        after: Option<String>,
        filter: Filter,
        tenant: Option<String>,
        head: Option<Vec<u8>>,
        tail: Option<Vec<u8>>,
        first: bool,
    }
    let cursor = Cursor {
        snap,
        prefix,
        after,
        filter,
        tenant,
        head: Some(head),
        tail: Some(tail),
        first: true,
    };
    let chunks = futures::stream::unfold(cursor, move |mut c| async move {
        let Some(mut chunk) = c.head.take() else {
            let tail = c.tail.take()?;
            return Some((Ok::<_, std::convert::Infallible>(Bytes::from(tail)), c));
        };
        chunk.reserve(LIST_CHUNK);
        let view = View {
            tenant: c.tenant.as_deref(),
        };
        let mut last: Option<Arc<str>> = None;
        for o in c.snap.range(&c.prefix, c.after.as_deref()) {
            last = Some(o.key.clone());
            if !c.filter.matches(o) {
                continue;
            }
            if !c.first {
                chunk.push(b',');
            }
            c.first = false;
            chunk.extend_from_slice(&view.render(r, &o.json));
            if chunk.len() >= LIST_CHUNK {
                break;
            }
        }
        match last {
            // More may follow: the next chunk starts after the last key looked at.
            Some(k) if chunk.len() >= LIST_CHUNK => {
                c.after = Some(k.to_string());
                c.head = Some(Vec::new());
            }
            _ => {
                if let Some(tail) = c.tail.take() {
                    chunk.extend_from_slice(&tail);
                }
            }
        }
        Some((Ok(Bytes::from(chunk)), c))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(chunks),
    )
        .into_response()
}

async fn create(cx: &Ctx<'_>, body: Bytes) -> Result<Response, ApiError> {
    let mut obj = parse_body(&cx.headers, &body)?;
    strip_server_fields(&mut obj);
    create_object(cx, obj).await
}

/// Creates `obj` (server fields already stripped; managedFields only from a
/// server-side apply).
async fn create_object(cx: &Ctx<'_>, obj: Value) -> Result<Response, ApiError> {
    let (obj, rev) = store_new(cx, obj).await?;
    respond(cx, StatusCode::CREATED, obj, rev)
}

/// A new object as stored, and its revision.
type Stored = Result<(Value, Revision), ApiError>;

/// Checks, admits and stores a new object.
async fn store_new(cx: &Ctx<'_>, mut obj: Value) -> Stored {
    let r = cx.resource();
    check_namespace(cx, &mut obj)?;
    if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    let meta = obj["metadata"]
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
    let has_name = meta
        .get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    if !has_name {
        match meta.get("generateName").and_then(Value::as_str) {
            Some(g) if !g.is_empty() => {
                let name = format!("{g}{}", random_suffix());
                meta.insert("name".into(), Value::String(name));
            }
            _ => {
                return Err(ApiError::invalid(
                    r.kind,
                    r.group,
                    "",
                    vec![meridian_api::Cause::required("metadata.name")],
                ));
            }
        }
    }
    let mut obj = normalize_and_store_form(cx, obj)?;
    prepare_for_create(r, &mut obj);
    let snap = cx.state.cache.snapshot();
    admit_create(cx, &snap, &obj)?;
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let key = r.storage_key(obj["metadata"]["namespace"].as_str(), &name);
    let value = Bytes::from(serde_json::to_vec(&obj).map_err(internal)?);
    match cx
        .state
        .store
        .create(&key, value)
        .await
        .map_err(store_err)?
    {
        Some(rev) => {
            if r.plural == "tenants" {
                ensure_tenant_default_namespace(cx, &name).await?;
            }
            Ok((obj, rev))
        }
        None => {
            let shown = if is_namespaces(r) {
                cx.view().render(r, &Bytes::from(name.clone()))
            } else {
                Bytes::from(name.clone())
            };
            Err(ApiError::already_exists(
                r.plural,
                r.group,
                &String::from_utf8_lossy(&shown),
            ))
        }
    }
}

fn prepare_for_create(r: &Resource, obj: &mut Value) {
    let meta = &mut obj["metadata"];
    meta["uid"] = Value::String(uuid::Uuid::new_v4().to_string());
    meta["creationTimestamp"] = Value::String(crate::now());
    if let Some(m) = meta.as_object_mut() {
        m.remove("deletionTimestamp");
        m.remove("deletionGracePeriodSeconds");
    }
    if obj.get("spec").is_some() {
        obj["metadata"]["generation"] = json!(1);
    }
    match r.plural {
        "pods" if obj["status"]["phase"].as_str().is_none() => {
            obj["status"] = json!({"phase": "Pending"});
        }
        "namespaces" => {
            obj["status"] = json!({"phase": "Active"});
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
        }
        "deployments" | "replicasets" | "daemonsets" | "jobs" => {
            obj["status"] = json!({});
        }
        _ => {}
    }
}

async fn ensure_tenant_default_namespace(cx: &Ctx<'_>, tenant: &str) -> Result<(), ApiError> {
    let nss = Resource::find("", "v1", "namespaces").ok_or_else(|| internal("no namespaces"))?;
    let mut obj = json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": format!("{tenant}.default"), "labels": {"kubernetes.io/metadata.name": "default"}}});
    prepare_for_create(nss, &mut obj);
    let key = nss.storage_key(None, &format!("{tenant}.default"));
    let value = Bytes::from(serde_json::to_vec(&obj).map_err(internal)?);
    cx.state
        .store
        .create(&key, value)
        .await
        .map_err(store_err)?;
    Ok(())
}

enum Attempt {
    Done(Response),
    Retry,
}

/// Replaces the stored object `cur` with `new` (caller's view), honouring the status
/// subresource, immutable metadata and finalizers. `strict_rv` is the resourceVersion
/// the caller requires, if any.
/// How a write records field ownership (`metadata.managedFields`).
enum Manage {
    /// An update or patch by this manager: it owns what it changed.
    Update(String),
    /// A server-side apply: the managedFields `managed::apply` computed.
    Applied(Value),
}

/// The field manager of a non-apply write: `?fieldManager=`, else the client's
/// name from its User-Agent (`kubectl`), as Kubernetes does, else the caller's
/// identity (`system:controllers`).
fn field_manager(cx: &Ctx<'_>) -> String {
    if let Some(m) = cx.query.get("fieldManager").filter(|m| !m.is_empty()) {
        return m.clone();
    }
    cx.headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .unwrap_or_else(|| cx.who.user())
}

async fn write_update(
    cx: &Ctx<'_>,
    cur: &KeyValue,
    new: Value,
    sub: Option<&str>,
    strict_rv: Option<Revision>,
    manage: Manage,
) -> Result<Attempt, ApiError> {
    let r = cx.resource();
    if let Some(rv) = strict_rv
        && rv != cur.mod_revision
    {
        return Err(cx.conflict(CONFLICT_MODIFIED));
    }
    let old = parse_stored(cur)?;
    let mut new = new;
    check_namespace(cx, &mut new)?;
    strip_server_fields(&mut new);
    match new["metadata"]["name"].as_str() {
        None | Some("") => new["metadata"]["name"] = Value::String(cx.name().to_owned()),
        Some(n) if n != cx.name() => {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({})",
                cx.name()
            )));
        }
        _ => {}
    }
    let new = normalize_and_store_form(cx, new)?;
    if sub.is_none() {
        crate::placement::check(&cx.state.cache.snapshot(), r, &new)?;
    }
    let mut next = match sub {
        Some("status") => {
            let mut next = old.clone();
            next["status"] = new.get("status").cloned().unwrap_or(Value::Null);
            if cx.status_with_annotations {
                match new["metadata"].get("annotations") {
                    Some(a) => next["metadata"]["annotations"] = a.clone(),
                    None => {
                        if let Some(m) = next["metadata"].as_object_mut() {
                            m.remove("annotations");
                        }
                    }
                }
            }
            next
        }
        Some("finalize") => {
            let mut next = old.clone();
            next["spec"]["finalizers"] = new["spec"]["finalizers"].clone();
            next
        }
        _ => {
            let mut next = new;
            if r.has_status {
                match old.get("status") {
                    Some(s) => next["status"] = s.clone(),
                    None => {
                        if let Some(m) = next.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            if is_namespaces(r) {
                next["spec"] = old["spec"].clone();
            }
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "name",
                "namespace",
            ] {
                match old["metadata"].get(f) {
                    Some(v) => next["metadata"][f] = v.clone(),
                    None => {
                        if let Some(m) = next["metadata"].as_object_mut() {
                            m.remove(f);
                        }
                    }
                }
            }
            if old.get("spec") != next.get("spec") {
                let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
                next["metadata"]["generation"] = json!(g);
            }
            next
        }
    };
    if let Some(m) = next["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    match manage {
        Manage::Update(manager) => {
            meridian_api::managed::update(
                &old,
                &mut next,
                &manager,
                sub.unwrap_or(""),
                &crate::now(),
            );
        }
        Manage::Applied(fields) => {
            if let Some(m) = next["metadata"].as_object_mut() {
                match fields {
                    Value::Array(a) if !a.is_empty() => {
                        m.insert("managedFields".into(), Value::Array(a));
                    }
                    _ => {
                        m.remove("managedFields");
                    }
                }
            }
        }
    }
    let mut old_cmp = old.clone();
    if let Some(m) = old_cmp["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    if next == old_cmp {
        // Nothing changed: no write, same resourceVersion (like Kubernetes).
        return Ok(Attempt::Done(respond(
            cx,
            StatusCode::OK,
            old,
            cur.mod_revision,
        )?));
    }
    let permit = update_permit(cx, r, &old, &next, sub).await?;
    let terminating = next["metadata"]["deletionTimestamp"].is_string();
    let finalizers_left = next["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    if terminating && !finalizers_left && !is_namespaces(r) {
        return match cx
            .state
            .store
            .delete(&cur.key, cur.mod_revision)
            .await
            .map_err(store_err)?
        {
            Some(rev) => Ok(Attempt::Done(respond(cx, StatusCode::OK, next, rev)?)),
            None => Ok(Attempt::Retry),
        };
    }
    let value = Bytes::from(serde_json::to_vec(&next).map_err(internal)?);
    let txn = Txn::new()
        .when(cur.key.clone(), cur.mod_revision)
        .put(cur.key.clone(), value);
    commit(cx, txn, permit, next).await
}

/// Risk control for updates that remove replicas: lowering a workload's replicas
/// (deny windows and protection; each pod then deleted is counted as it goes), and
/// a region marking a pod of a lost node for rescheduling (an eviction, counted).
async fn update_permit(
    cx: &Ctx<'_>,
    r: &Resource,
    old: &Value,
    next: &Value,
    sub: Option<&str>,
) -> Result<Permit, ApiError> {
    let replicas = |v: &Value| v["spec"]["replicas"].as_i64().unwrap_or(1);
    let scale_down = r.has_scale && sub.is_none() && replicas(next) < replicas(old);
    let lost = |v: &Value| v["status"]["reason"].as_str() == Some(meridian_api::NODE_LOST_REASON);
    let evict = r.kind == "Pod"
        && r.group.is_empty()
        && sub == Some("status")
        && lost(next)
        && !lost(old)
        && !is_terminal_pod(r, old);
    if !(scale_down || evict) {
        return Ok(Permit::default());
    }
    let snap = cx.state.risk.snapshot(&cx.state.cache).await?;
    let (action, subject) = if evict {
        (Action::Evict, RiskGate::subject(&snap, r, old))
    } else {
        (Action::ScaleDown, RiskGate::replica_of(&snap, r, old))
    };
    let uid = old["metadata"]["uid"].as_str().map(str::to_owned);
    let permit = cx
        .state
        .risk
        .check(
            &cx.state.store,
            &snap,
            &cx.who.user(),
            cx.who.tenant(),
            action,
            &[(subject, uid)],
            evict,
        )
        .await?;
    Ok(permit)
}

fn body_rv(obj: &Value) -> Result<Option<Revision>, ApiError> {
    match obj["metadata"]["resourceVersion"].as_str() {
        None | Some("") => Ok(None),
        Some(rv) => rv
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))),
    }
}

const MAX_ATTEMPTS: usize = 8;

/// The stored object the request names, or NotFound.
async fn current(cx: &Ctx<'_>) -> Result<KeyValue, ApiError> {
    cx.state
        .store
        .get(&cx.key())
        .await
        .map_err(store_err)?
        .ok_or_else(|| cx.not_found())
}

async fn update(cx: &Ctx<'_>, body: Bytes, sub: Option<&str>) -> Result<Response, ApiError> {
    let new = parse_body(&cx.headers, &body)?;
    let strict = body_rv(&new)?;
    for _ in 0..MAX_ATTEMPTS {
        let cur = current(cx).await?;
        match write_update(
            cx,
            &cur,
            new.clone(),
            sub,
            strict,
            Manage::Update(field_manager(cx)),
        )
        .await?
        {
            Attempt::Done(r) => return Ok(r),
            Attempt::Retry if strict.is_some() => return Err(cx.conflict(CONFLICT_MODIFIED)),
            Attempt::Retry => continue,
        }
    }
    Err(cx.conflict("too many concurrent writers; try again"))
}

enum PatchKind {
    Merge,
    Strategic,
    Json,
    Apply,
}

fn patch_kind(headers: &HeaderMap) -> Result<PatchKind, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ct = ct.split(';').next().unwrap_or("").trim();
    match ct {
        "application/merge-patch+json" => Ok(PatchKind::Merge),
        "application/strategic-merge-patch+json" => Ok(PatchKind::Strategic),
        "application/json-patch+json" => Ok(PatchKind::Json),
        "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(PatchKind::Apply),
        other => Err(ApiError::new(
            Reason::UnsupportedMediaType,
            format!(
                "the body of the request was in an unknown format ({other:?}); accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml"
            ),
        )),
    }
}

fn apply_patch(kind: &PatchKind, target: &mut Value, body: &[u8]) -> Result<(), ApiError> {
    match kind {
        PatchKind::Merge | PatchKind::Apply => {
            let patch: Value = if matches!(kind, PatchKind::Apply) {
                serde_yaml::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("invalid apply patch: {e}")))?
            } else {
                serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("invalid merge patch: {e}")))?
            };
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            json_patch::merge(target, &patch);
            Ok(())
        }
        PatchKind::Strategic => {
            let patch: Value = serde_json::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!("invalid strategic merge patch: {e}"))
            })?;
            meridian_api::smp::apply(target, &patch).map_err(|e| {
                ApiError::new(
                    Reason::Invalid,
                    format!("the strategic merge patch could not be applied: {e}"),
                )
            })
        }
        PatchKind::Json => {
            let patch: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(target, &patch).map_err(|e| {
                ApiError::new(
                    Reason::Invalid,
                    format!("the JSON patch could not be applied: {e}"),
                )
            })
        }
    }
}

/// The stored object as the caller sees it, with its resourceVersion.
fn caller_view(cx: &Ctx<'_>, cur: &KeyValue) -> Result<Value, ApiError> {
    let mut v = parse_stored(cur)?;
    set_rv(&mut v, cur.mod_revision);
    if cx.view().tenant.is_none() {
        // The global view renders nothing: no second round trip through bytes.
        return Ok(v);
    }
    let bytes = Bytes::from(serde_json::to_vec(&v).map_err(internal)?);
    serde_json::from_slice(&cx.view().render(cx.resource(), &bytes)).map_err(internal)
}

async fn patch(cx: &Ctx<'_>, body: Bytes, sub: Option<&str>) -> Result<Response, ApiError> {
    let kind = patch_kind(&cx.headers)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the patch is empty"));
    }
    if matches!(kind, PatchKind::Apply) {
        return server_side_apply(cx, &body, sub).await;
    }
    for _ in 0..MAX_ATTEMPTS {
        let cur = current(cx).await?;
        let mut target = caller_view(cx, &cur)?;
        apply_patch(&kind, &mut target, &body)?;
        let strict = match body_rv(&target)? {
            Some(rv) if rv != cur.mod_revision => return Err(cx.conflict(CONFLICT_MODIFIED)),
            _ => None,
        };
        match write_update(
            cx,
            &cur,
            target,
            sub,
            strict,
            Manage::Update(field_manager(cx)),
        )
        .await?
        {
            Attempt::Done(r) => return Ok(r),
            Attempt::Retry => continue,
        }
    }
    Err(cx.conflict("too many concurrent writers; try again"))
}

/// `PATCH` with `application/apply-patch+yaml` (`kubectl apply --server-side`):
/// the configuration is merged into the object (creating it when absent) and its
/// fields become the manager's; a field another manager owns with a different value
/// is a 409 naming both, unless `force=true` (`--force-conflicts`).
async fn server_side_apply(
    cx: &Ctx<'_>,
    body: &[u8],
    sub: Option<&str>,
) -> Result<Response, ApiError> {
    let manager = cx
        .query
        .get("fieldManager")
        .filter(|m| !m.is_empty())
        .cloned()
        .ok_or_else(|| ApiError::bad_request("fieldManager is required for apply requests"))?;
    let config: Value = serde_yaml::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid apply patch: {e}")))?;
    if !config.is_object() {
        return Err(ApiError::bad_request(
            "an apply configuration must be an object",
        ));
    }
    let r = cx.resource();
    let api_version = if r.group.is_empty() {
        r.version.to_owned()
    } else {
        format!("{}/{}", r.group, r.version)
    };
    for (field, want) in [("apiVersion", api_version.as_str()), ("kind", r.kind)] {
        match config[field].as_str() {
            Some(v) if v == want => {}
            got => {
                return Err(ApiError::invalid(
                    r.kind,
                    r.group,
                    cx.name(),
                    vec![Cause::invalid(
                        field,
                        got.unwrap_or_default(),
                        format!("an apply configuration must give {field} {want:?}"),
                    )],
                ));
            }
        }
    }
    let now = crate::now();
    let how = meridian_api::managed::Apply {
        manager: &manager,
        force: matches!(
            cx.query.get("force").map(String::as_str),
            Some("true" | "1")
        ),
        api_version: &api_version,
        now: &now,
    };
    let conflict = |e: meridian_api::managed::ApplyError| {
        let conflicts = match e {
            meridian_api::managed::ApplyError::Conflicts(c) => c,
            meridian_api::managed::ApplyError::Invalid(why) => {
                return ApiError::new(
                    Reason::Invalid,
                    format!("the apply configuration could not be applied: {why}"),
                );
            }
        };
        let list: Vec<String> = conflicts
            .iter()
            .map(|c| format!("conflict with \"{}\": {}", c.manager, c.field))
            .collect();
        let n = conflicts.len();
        let mut e = ApiError::new(
            Reason::Conflict,
            format!(
                "Apply failed with {n} conflict{}: {}",
                if n == 1 { "" } else { "s" },
                list.join("\n")
            ),
        );
        e.causes = conflicts
            .into_iter()
            .map(|c| Cause {
                reason: "FieldManagerConflict",
                message: format!("conflict with \"{}\"", c.manager),
                field: c.field,
            })
            .collect();
        e
    };
    for _ in 0..MAX_ATTEMPTS {
        let Some(cur) = cx.state.store.get(&cx.key()).await.map_err(store_err)? else {
            if sub.is_some() {
                return Err(cx.not_found());
            }
            // An apply of an absent object creates it.
            let obj =
                meridian_api::managed::apply(&Value::Null, &config, &how).map_err(conflict)?;
            return create_object(cx, obj).await;
        };
        let live = caller_view(cx, &cur)?;
        let next = meridian_api::managed::apply(&live, &config, &how).map_err(conflict)?;
        let fields = next["metadata"]["managedFields"].clone();
        let strict = match body_rv(&config)? {
            Some(rv) if rv != cur.mod_revision => return Err(cx.conflict(CONFLICT_MODIFIED)),
            _ => None,
        };
        match write_update(cx, &cur, next, sub, strict, Manage::Applied(fields)).await? {
            Attempt::Done(r) => return Ok(r),
            Attempt::Retry => continue,
        }
    }
    Err(cx.conflict("too many concurrent writers; try again"))
}

fn delete_options(cx: &Ctx<'_>, body: &[u8]) -> Result<Value, ApiError> {
    let mut opts = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else if body.starts_with(crate::protobuf::MAGIC) {
        // kubectl's typed clients (drain, delete of some kinds) send protobuf.
        crate::protobuf::to_json(body)
            .map_err(|e| ApiError::new(Reason::UnsupportedMediaType, e))?
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
    };
    if let Some(p) = cx.query.get("propagationPolicy") {
        opts["propagationPolicy"] = Value::String(p.clone());
    }
    if let Some(p) = opts["propagationPolicy"].as_str()
        && !matches!(p, "Orphan" | "Background" | "Foreground")
    {
        return Err(ApiError::bad_request(format!(
            "unknown propagationPolicy {p:?}"
        )));
    }
    Ok(opts)
}

/// `POST pods/{name}/eviction` (`kubectl drain`): deletes the pod with the
/// Eviction's delete options, through risk control like any other removal (a
/// budget denial is a 429, which kubectl drain waits on and retries; a window or
/// protection denial is a 403, which stops it with risk control's message).
async fn evict(cx: &Ctx<'_>, body: Bytes) -> Result<Response, ApiError> {
    let eviction = parse_body(&cx.headers, &body)?;
    if let Some(n) = eviction["metadata"]["name"].as_str()
        && n != cx.name()
    {
        return Err(ApiError::invalid(
            "Eviction",
            "policy",
            cx.name(),
            vec![Cause::invalid(
                "metadata.name",
                n,
                "must match the name of the pod in the path",
            )],
        ));
    }
    let opts = match &eviction["deleteOptions"] {
        Value::Null => json!({}),
        o @ Value::Object(_) => o.clone(),
        _ => return Err(ApiError::bad_request("deleteOptions must be an object")),
    };
    for _ in 0..MAX_ATTEMPTS {
        let cur = current(cx).await?;
        match delete_one(cx, &cur, &opts).await? {
            Attempt::Done(_) => {
                let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Success", "code": 201});
                return Ok(json_response(
                    StatusCode::CREATED,
                    Bytes::from(status.to_string()),
                ));
            }
            Attempt::Retry => continue,
        }
    }
    Err(cx.conflict("too many concurrent writers; try again"))
}

async fn delete(cx: &Ctx<'_>, body: Bytes) -> Result<Response, ApiError> {
    let opts = delete_options(cx, &body)?;
    for _ in 0..MAX_ATTEMPTS {
        let cur = current(cx).await?;
        match delete_one(cx, &cur, &opts).await? {
            Attempt::Done(r) => return Ok(r),
            Attempt::Retry => continue,
        }
    }
    Err(cx.conflict("too many concurrent writers; try again"))
}

async fn delete_one(cx: &Ctx<'_>, cur: &KeyValue, opts: &Value) -> Result<Attempt, ApiError> {
    let r = cx.resource();
    let mut obj = parse_stored(cur)?;
    let pre = &opts["preconditions"];
    if let Some(uid) = pre["uid"].as_str()
        && obj["metadata"]["uid"].as_str() != Some(uid)
    {
        return Err(cx.conflict(&format!(
            "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
            obj["metadata"]["uid"].as_str().unwrap_or_default()
        )));
    }
    if let Some(rv) = pre["resourceVersion"].as_str()
        && rv != cur.mod_revision.to_string()
    {
        return Err(cx.conflict(&format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                cur.mod_revision
            )));
    }
    // Foreground: the object stays (deletionTimestamp + finalizer) until the garbage
    // collector has deleted its dependents; Orphan: until it has released them.
    let cascade = match (
        opts["propagationPolicy"].as_str(),
        opts["orphanDependents"].as_bool(),
    ) {
        (Some("Foreground"), _) => Some("foregroundDeletion"),
        (Some("Orphan"), _) | (None, Some(true)) => Some("orphan"),
        _ => None,
    };
    // Only owners whose dependents the garbage collector tracks; for any other
    // kind there is nothing to wait for.
    if let Some(f) = cascade
        && matches!(
            r.plural,
            "deployments" | "replicasets" | "daemonsets" | "jobs"
        )
        && obj["metadata"]["deletionTimestamp"].is_null()
    {
        let list = obj["metadata"]["finalizers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !list.iter().any(|x| x == f) {
            let mut list = list;
            list.push(Value::String(f.to_owned()));
            obj["metadata"]["finalizers"] = Value::Array(list);
        }
    }
    let finalizers = obj["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    let terminating = obj["metadata"]["deletionTimestamp"].is_string();
    if (is_namespaces(r) || finalizers) && terminating {
        return Ok(Attempt::Done(respond(
            cx,
            StatusCode::OK,
            obj,
            cur.mod_revision,
        )?));
    }
    // Risk control: a removal is checked (and counted) once, when first asked for.
    let permit = removal_permit(cx, r, &obj).await?;
    let txn = Txn::new().when(cur.key.clone(), cur.mod_revision);
    let txn = if is_namespaces(r) || finalizers {
        obj["metadata"]["deletionTimestamp"] = Value::String(crate::now());
        obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        if is_namespaces(r) {
            obj["status"]["phase"] = Value::String("Terminating".into());
        }
        let value = Bytes::from(serde_json::to_vec(&obj).map_err(internal)?);
        txn.put(cur.key.clone(), value)
    } else {
        txn.delete(cur.key.clone())
    };
    commit(cx, txn, permit, obj).await
}

/// Commits a write together with what risk control requires of it; `Retry` when
/// the object or a budget changed meanwhile.
async fn commit(cx: &Ctx<'_>, txn: Txn, permit: Permit, obj: Value) -> Result<Attempt, ApiError> {
    let res = cx
        .state
        .store
        .txn(permit.apply(txn))
        .await
        .map_err(store_err)?;
    if !res.succeeded {
        return Ok(Attempt::Retry);
    }
    permit.committed(&cx.state.risk);
    Ok(Attempt::Done(respond(
        cx,
        StatusCode::OK,
        obj,
        res.revision,
    )?))
}

/// Whether a pod has finished: it runs nothing, so removing it removes no replica.
fn is_terminal_pod(r: &Resource, obj: &Value) -> bool {
    r.kind == "Pod"
        && r.group.is_empty()
        && matches!(
            obj["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed")
        )
}

/// Risk control for deleting `obj`: the object itself and, for a namespace or a
/// tenant, everything that goes with it (all or nothing).
async fn removal_permit(cx: &Ctx<'_>, r: &Resource, obj: &Value) -> Result<Permit, ApiError> {
    if is_terminal_pod(r, obj) {
        return Ok(Permit::default());
    }
    let whole =
        is_namespaces(r) || (r.plural == "tenants" && r.group == meridian_api::meridian::GROUP);
    let snap = if whole {
        // Everything inside must be seen: a consistent read.
        cx.state.cache.fresh_snapshot(&cx.state.store).await?
    } else {
        cx.state.risk.snapshot(&cx.state.cache).await?
    };
    let uid = |o: &Value| o["metadata"]["uid"].as_str().map(str::to_owned);
    let mut subjects = vec![(RiskGate::subject(&snap, r, obj), uid(obj))];
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let namespaces: Vec<String> = if is_namespaces(r) {
        vec![name.to_owned()]
    } else if r.plural == "tenants" && r.group == meridian_api::meridian::GROUP {
        let nss =
            Resource::find("", "v1", "namespaces").ok_or_else(|| internal("no namespaces"))?;
        let prefix = format!("{}{name}.", nss.storage_prefix());
        snap.range(&prefix, None)
            .map(|o| {
                subjects.push((RiskGate::subject(&snap, nss, &o.value()), None));
                o.name().to_string()
            })
            .collect()
    } else {
        Vec::new()
    };
    for ns in &namespaces {
        for inner in RESOURCES.iter().filter(|x| x.namespaced()) {
            let prefix = format!("{}{ns}/", inner.storage_prefix());
            for o in snap.range(&prefix, None) {
                let v = o.value();
                if !is_terminal_pod(inner, &v) {
                    subjects.push((RiskGate::subject(&snap, inner, &v), uid(&v)));
                }
            }
        }
    }
    cx.state
        .risk
        .check(
            &cx.state.store,
            &snap,
            &cx.who.user(),
            cx.who.tenant(),
            Action::Delete,
            &subjects,
            true,
        )
        .await
}

async fn delete_collection(cx: &Ctx<'_>, body: Bytes) -> Result<Response, ApiError> {
    let r = cx.resource();
    let opts = delete_options(cx, &body)?;
    let filter = Filter::from_query(cx)?;
    let snap = cx.state.cache.fresh_snapshot(&cx.state.store).await?;
    let prefix = cx.view().prefix(r, cx.target.namespace.as_deref());
    let keys: Vec<Arc<str>> = snap
        .range(&prefix, None)
        .filter(|o| filter.matches(o))
        .map(|o| o.key.clone())
        .collect();
    let mut items = Vec::new();
    let total = keys.len();
    for key in keys {
        for _ in 0..MAX_ATTEMPTS {
            let Some(cur) = cx.state.store.get(&key).await.map_err(store_err)? else {
                break;
            };
            // Like Kubernetes, one by one: a refusal stops the rest, and says how
            // far it got.
            let attempt = delete_one(cx, &cur, &opts).await.map_err(|mut e| {
                if e.causes.iter().any(|c| c.reason == "RiskPolicy") {
                    e.message = format!(
                        "{} ({} of {total} deleted before this refusal)",
                        e.message,
                        items.len()
                    );
                }
                e
            })?;
            match attempt {
                Attempt::Done(resp) => {
                    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                        .await
                        .map_err(internal)?;
                    items.push(serde_json::from_slice::<Value>(&bytes).map_err(internal)?);
                    break;
                }
                Attempt::Retry => continue,
            }
        }
    }
    let list = json!({"kind": r.list_kind(), "apiVersion": r.api_version(),
        "metadata": {"resourceVersion": cx.state.cache.revision().to_string()}, "items": items});
    Ok(json_response(StatusCode::OK, Bytes::from(list.to_string())))
}

// ------------------------------------------------------------------- subresources

fn scale_of(cx: &Ctx<'_>, obj: &Value, rv: Revision) -> Value {
    let selector = obj["spec"]["selector"]
        .get("matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": obj["metadata"]["name"],
            "namespace": cx.target.namespace,
            "uid": obj["metadata"]["uid"],
            "resourceVersion": rv.to_string(),
            "creationTimestamp": obj["metadata"]["creationTimestamp"],
        },
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector},
    })
}

async fn get_scale(cx: &Ctx<'_>) -> Result<Response, ApiError> {
    let cur = current(cx).await?;
    let obj = parse_stored(&cur)?;
    Ok(json_response(
        StatusCode::OK,
        Bytes::from(scale_of(cx, &obj, cur.mod_revision).to_string()),
    ))
}

async fn set_replicas(cx: &Ctx<'_>, scale: Value, cur: &KeyValue) -> Result<Attempt, ApiError> {
    let replicas = scale["spec"]["replicas"]
        .as_i64()
        .filter(|r| (0..=i32::MAX as i64).contains(r))
        .ok_or_else(|| {
            ApiError::invalid(
                "Scale",
                "autoscaling",
                cx.name(),
                vec![meridian_api::Cause::invalid(
                    "spec.replicas",
                    &scale["spec"]["replicas"].to_string(),
                    "must be a non-negative integer",
                )],
            )
        })?;
    let strict = body_rv(&scale)?;
    let mut obj = caller_view(cx, cur)?;
    obj["spec"]["replicas"] = json!(replicas);
    let attempt = write_update(
        cx,
        cur,
        obj,
        None,
        strict,
        Manage::Update(field_manager(cx)),
    )
    .await?;
    Ok(match attempt {
        Attempt::Done(_) => {
            let now = current(cx).await?;
            let obj = parse_stored(&now)?;
            Attempt::Done(json_response(
                StatusCode::OK,
                Bytes::from(scale_of(cx, &obj, now.mod_revision).to_string()),
            ))
        }
        Attempt::Retry if strict.is_some() => return Err(cx.conflict(CONFLICT_MODIFIED)),
        Attempt::Retry => Attempt::Retry,
    })
}

async fn update_scale(cx: &Ctx<'_>, body: Bytes) -> Result<Response, ApiError> {
    let scale = parse_body(&cx.headers, &body)?;
    for _ in 0..MAX_ATTEMPTS {
        let cur = current(cx).await?;
        if let Attempt::Done(r) = set_replicas(cx, scale.clone(), &cur).await? {
            return Ok(r);
        }
    }
    Err(cx.conflict("too many concurrent writers; try again"))
}

async fn patch_scale(cx: &Ctx<'_>, body: Bytes) -> Result<Response, ApiError> {
    let kind = patch_kind(&cx.headers)?;
    for _ in 0..MAX_ATTEMPTS {
        let cur = current(cx).await?;
        let obj = parse_stored(&cur)?;
        let mut scale = scale_of(cx, &obj, cur.mod_revision);
        apply_patch(&kind, &mut scale, &body)?;
        if let Attempt::Done(r) = set_replicas(cx, scale, &cur).await? {
            return Ok(r);
        }
    }
    Err(cx.conflict("too many concurrent writers; try again"))
}

/// Assigns a stored pod to `node` (once), copying the Binding's annotations to it
/// as Kubernetes does. `Err` says why not, for a Conflict.
fn assign(
    pod: &mut Value,
    node: &str,
    annotations: Option<&serde_json::Map<String, Value>>,
) -> Result<(), String> {
    if let Some(existing) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) {
        return Err(format!(
            "pod {} is already assigned to node {existing:?}",
            pod["metadata"]["name"].as_str().unwrap_or_default()
        ));
    }
    if pod["metadata"]["deletionTimestamp"].is_string() {
        return Err("pod is being deleted, cannot be assigned to a host".into());
    }
    pod["spec"]["nodeName"] = Value::String(node.to_owned());
    for (k, v) in annotations.into_iter().flatten() {
        if let Some(v) = v.as_str() {
            pod["metadata"]["annotations"][k] = Value::String(v.to_owned());
        }
    }
    let cond =
        json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": crate::now()});
    let mut conditions: Vec<Value> = pod["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c["type"] != "PodScheduled")
        .collect();
    conditions.push(cond);
    pod["status"]["conditions"] = Value::Array(conditions);
    Ok(())
}

/// Binding annotations must be valid annotation keys.
fn binding_annotations(b: &Value) -> Result<Option<&serde_json::Map<String, Value>>, String> {
    let Some(ann) = b["metadata"]["annotations"].as_object() else {
        return Ok(None);
    };
    for (k, v) in ann {
        if let Some(p) = meridian_api::validation::label_key_problem(k) {
            return Err(format!("annotation {k:?}: {p}"));
        }
        if !v.is_string() {
            return Err(format!("annotation {k:?}: the value must be a string"));
        }
    }
    Ok(Some(ann))
}

/// One binding with compare-and-swap retries. With `cached`, the first attempt
/// starts from the watch cache's copy of the pod (what the scheduler placed) and
/// saves a store read; a stale copy fails its compare-and-swap or its checks and
/// the next attempt reads the store.
async fn bind_one(
    cx: &Ctx<'_>,
    key: &str,
    name: &str,
    node: &str,
    annotations: Option<&serde_json::Map<String, Value>>,
    cached: Option<&crate::cache::Snapshot>,
) -> Result<(), ApiError> {
    let mut hint = cached.and_then(|s| s.get(key)).cloned();
    for _ in 0..MAX_ATTEMPTS {
        let from_cache = hint.take();
        let (mut pod, revision) = match &from_cache {
            Some(o) => {
                let mut pod: Value = serde_json::from_slice(&o.json).map_err(internal)?;
                if let Some(m) = pod["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                (pod, o.mod_revision)
            }
            None => {
                let cur = cx
                    .state
                    .store
                    .get(key)
                    .await
                    .map_err(store_err)?
                    .ok_or_else(|| ApiError::not_found("pods", "", name))?;
                (parse_stored(&cur)?, cur.mod_revision)
            }
        };
        match assign(&mut pod, node, annotations) {
            Ok(()) => {}
            Err(_) if from_cache.is_some() => continue,
            Err(why) => return Err(ApiError::conflict("pods", "", name, &why)),
        }
        let value = Bytes::from(serde_json::to_vec(&pod).map_err(internal)?);
        if cx
            .state
            .store
            .update(key, value, revision)
            .await
            .map_err(store_err)?
            .is_some()
        {
            return Ok(());
        }
    }
    Err(ApiError::conflict(
        "pods",
        "",
        name,
        "too many concurrent writers; try again",
    ))
}

/// `POST pods/{name}/binding`: assigns a pod to a node, once.
async fn bind(cx: &Ctx<'_>, body: Bytes) -> Result<Response, ApiError> {
    let binding = parse_body(&cx.headers, &body)?;
    let invalid = |cause| ApiError::invalid("Binding", "", cx.name(), vec![cause]);
    let node = binding["target"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid(meridian_api::Cause::required("target.name")))?
        .to_owned();
    let annotations = binding_annotations(&binding).map_err(|why| {
        invalid(meridian_api::Cause::invalid(
            "metadata.annotations",
            "",
            why,
        ))
    })?;
    bind_one(cx, &cx.key(), cx.name(), &node, annotations, None).await?;
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201});
    Ok(json_response(
        StatusCode::CREATED,
        Bytes::from(status.to_string()),
    ))
}

async fn bind_item(
    cx: &Ctx<'_>,
    i: usize,
    key: String,
    name: String,
    node: String,
    ann: Option<serde_json::Map<String, Value>>,
    snap: &crate::cache::Snapshot,
) -> (usize, Result<(), ApiError>) {
    (
        i,
        bind_one(cx, &key, &name, &node, ann.as_ref(), Some(snap)).await,
    )
}

/// Most bindings in one bulk request, and how many are written at once.
const BULK_MAX: usize = 1000;
const BULK_CONCURRENCY: usize = 256;

/// `POST /apis/meridian.io/v1alpha1/bulkbindings`: many pod bindings in one
/// request: `{"items": [{"namespace", "name", "node", "metadata": {"annotations"}}]}`,
/// each a compare-and-swap of its pod, all in flight together. The answer lists
/// each item's outcome; a bad item changes nothing.
async fn bulk_bind(cx: &Ctx<'_>, body: Bytes) -> Result<Response, ApiError> {
    let items = bulk_items(cx, &body, "bindings")?;
    let pods = Resource::find("", "v1", "pods").ok_or_else(|| internal("no pods"))?;
    let mut out: Vec<Value> = Vec::with_capacity(items.len());
    let mut seen = std::collections::HashSet::new();
    // (index, key, node, annotations) of the items to write
    let mut todo = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let (ns, name, node) = (
            it["namespace"].as_str().unwrap_or_default(),
            it["name"].as_str().unwrap_or_default(),
            it["node"].as_str().unwrap_or_default(),
        );
        out.push(json!({"namespace": ns, "name": name, "status": "Success"}));
        let problem = if ns.is_empty() || name.is_empty() || node.is_empty() {
            Some("namespace, name and node are required".to_owned())
        } else if !seen.insert((ns, name)) {
            Some("the pod appears twice in this request".to_owned())
        } else {
            binding_annotations(it).err()
        };
        if let Some(why) = problem {
            out[i]["status"] = json!("Failure");
            out[i]["reason"] = json!("Invalid");
            out[i]["message"] = json!(why);
            continue;
        }
        let ann = it["metadata"]["annotations"].as_object().cloned();
        todo.push((
            i,
            cx.view().key(pods, Some(ns), name),
            name.to_owned(),
            node.to_owned(),
            ann,
        ));
    }
    // All at once: the embedded store's writer commits concurrent writes in one
    // transaction and one fsync, each pod at its own revision, so a watch resuming
    // from any resourceVersion misses none of them.
    use futures::StreamExt;
    let snap = cx.state.cache.snapshot();
    let results: Vec<(usize, Result<(), ApiError>)> = futures::stream::iter(todo)
        .map(|(i, key, name, node, ann)| bind_item(cx, i, key, name, node, ann, &snap))
        .buffer_unordered(BULK_CONCURRENCY)
        .collect()
        .await;
    for (i, r) in results {
        if let Err(e) = r {
            let st = e.to_status();
            out[i]["status"] = json!("Failure");
            out[i]["reason"] = st["reason"].clone();
            out[i]["message"] = st["message"].clone();
        }
    }
    let body = json!({
        "apiVersion": "meridian.io/v1alpha1",
        "kind": "BulkBindingResult",
        "items": out,
    });
    Ok(json_response(StatusCode::OK, Bytes::from(body.to_string())))
}

/// The `items` of a bulk request (at most `BULK_MAX`), each a `what`.
fn bulk_items(cx: &Ctx<'_>, body: &Bytes, what: &str) -> Result<Vec<Value>, ApiError> {
    let mut req = parse_body(&cx.headers, body)?;
    let Some(Value::Array(items)) = req.get_mut("items").map(Value::take) else {
        return Err(ApiError::bad_request(format!(
            "items: a list of {what} is required"
        )));
    };
    if items.len() > BULK_MAX {
        return Err(ApiError::bad_request(format!(
            "items: at most {BULK_MAX} {what} per request"
        )));
    }
    Ok(items)
}

/// Runs `one` on every item, `BULK_CONCURRENCY` at a time (so the store commits
/// them together), and returns the outcomes in the items' order.
async fn each_in_order<R, F, Fut>(items: Vec<Value>, one: F) -> Vec<R>
where
    F: Fn(Value) -> Fut,
    Fut: std::future::Future<Output = R>,
{
    use futures::StreamExt;
    let mut results: Vec<(usize, R)> = futures::stream::iter(items.into_iter().enumerate())
        .map(|(i, it)| {
            let fut = one(it);
            async move { (i, fut.await) }
        })
        .buffer_unordered(BULK_CONCURRENCY)
        .collect()
        .await;
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// A failed item of a bulk answer.
fn bulk_failure(e: &ApiError) -> Value {
    let st = e.to_status();
    json!({"status": "Failure", "reason": st["reason"], "code": st["code"],
           "message": st["message"], "details": st["details"]})
}

/// `POST /apis/meridian.io/v1alpha1/bulkpods`: many pods created in one request
/// (the ReplicaSet controller's): `{"items": [pod, ...]}`, each pod with its
/// namespace, each checked, admitted and stored exactly as one `POST` to its
/// namespace's pods would, all in flight together so the store commits them in
/// one transaction. The answer lists each item's outcome in order (`name`, `uid`,
/// `resourceVersion`;
/// a failure's `reason`, `code` and `message`); a bad item changes nothing.
async fn bulk_create_pods(cx: &Ctx<'_>, body: Bytes) -> Result<Response, ApiError> {
    let items = bulk_items(cx, &body, "pods")?;
    let pods = Resource::find("", "v1", "pods").ok_or_else(|| internal("no pods"))?;
    auth::authorize(&cx.who, Verb::Create, pods, None)?;
    let one = |mut obj: Value| async move {
        let ns = obj["metadata"]["namespace"].as_str().map(str::to_owned);
        let item = cx.item(pods, ns.clone(), None, None, cx.headers.clone());
        match ns {
            None => Err(ApiError::invalid(
                "Pod",
                "",
                obj["metadata"]["name"].as_str().unwrap_or_default(),
                vec![meridian_api::Cause::required("metadata.namespace")],
            )),
            Some(_) if !obj.is_object() => Err(ApiError::bad_request("each item must be a Pod")),
            Some(_) => {
                strip_server_fields(&mut obj);
                store_new(&item, obj).await
            }
        }
    };
    let results: Vec<Stored> = each_in_order(items, one).await;
    let out: Vec<Value> = results
        .into_iter()
        .map(|r| match r {
            // The revision comes from the store: the stored form has none in it.
            Ok((obj, rev)) => json!({
                "status": "Success",
                "name": obj["metadata"]["name"],
                "uid": obj["metadata"]["uid"],
                "resourceVersion": rev.to_string(),
            }),
            Err(e) => bulk_failure(&e),
        })
        .collect();
    let body = json!({
        "apiVersion": "meridian.io/v1alpha1",
        "kind": "BulkPodResult",
        "items": out,
    });
    Ok(json_response(StatusCode::OK, Bytes::from(body.to_string())))
}

/// `POST /apis/meridian.io/v1alpha1/bulkpodstatuses`: many pod status updates in
/// one request (the regions'): `{"items": [{"namespace", "name", "status"}]}`, each
/// applied exactly as a merge patch `{"status": ...}` of that pod's `status`
/// subresource would be (checks, risk control, managed fields), all in flight
/// together so the store commits them in few transactions. The answer lists each
/// item's outcome in order (a failure's `code`, `reason`, `message` and `details`,
/// e.g. a risk refusal's causes and retry time); a bad item changes nothing.
///
/// `POST /apis/meridian.io/v1alpha1/bulknodestatuses` is the same for Nodes
/// (`{"items": [{"name", "status"}]}`, the regions' periodic node summaries: at
/// 100,000 nodes ~330 a second, each a whole request and a whole Node in the
/// answer when sent one by one).
async fn bulk_statuses(cx: &Ctx<'_>, body: Bytes, plural: &str) -> Result<Response, ApiError> {
    let (target, what, kind) = match plural {
        "bulknodestatuses" => ("nodes", "node statuses", "BulkNodeStatusResult"),
        _ => ("pods", "pod statuses", "BulkPodStatusResult"),
    };
    let items = bulk_items(cx, &body, what)?;
    let res = Resource::find("", "v1", target).ok_or_else(|| internal("no such resource"))?;
    auth::authorize(&cx.who, Verb::Patch, res, Some("status"))?;
    let namespaced = res.scope == meridian_api::resources::Scope::Namespaced;
    let mut headers = cx.headers.clone();
    headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/merge-patch+json"),
    );
    let one = |mut it: Value| {
        let headers = headers.clone();
        async move {
            let text = |f: &str| it[f].as_str().filter(|v| !v.is_empty()).map(str::to_owned);
            let (ns, name) = (text("namespace"), text("name"));
            let ns_ok = ns.is_some() == namespaced;
            // Nodes' items may carry annotations to merge (a summary's usage),
            // written with the status.
            let annotations = match it.get_mut("annotations").map(Value::take) {
                None | Some(Value::Null) => None,
                Some(Value::Object(a))
                    if target == "nodes" && a.values().all(|v| v.is_string() || v.is_null()) =>
                {
                    Some(Value::Object(a))
                }
                Some(_) if target == "nodes" => {
                    return Err(ApiError::bad_request(
                        "annotations: an object of strings (null removes one) is required",
                    ));
                }
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "annotations: only node statuses carry annotations",
                    ));
                }
            };
            match (ns, name, it.get_mut("status").map(Value::take)) {
                (ns, Some(name), Some(status)) if ns_ok && status.is_object() => {
                    let mut item = cx.item(res, ns, Some(name), Some("status"), headers);
                    let body = match annotations {
                        Some(a) => {
                            item.status_with_annotations = true;
                            json!({"metadata": {"annotations": a}, "status": status})
                        }
                        None => json!({ "status": status }),
                    };
                    let body = serde_json::to_vec(&body).map_err(internal)?;
                    patch(&item, Bytes::from(body), Some("status"))
                        .await
                        .map(drop)
                }
                _ if namespaced => Err(ApiError::bad_request(
                    "namespace, name and a status object are required",
                )),
                _ => Err(ApiError::bad_request(
                    "name and a status object are required (and no namespace)",
                )),
            }
        }
    };
    let results: Vec<Result<(), ApiError>> = each_in_order(items, one).await;
    let out: Vec<Value> = results
        .into_iter()
        .map(|r| match r {
            Ok(()) => json!({"status": "Success"}),
            Err(e) => bulk_failure(&e),
        })
        .collect();
    let body = json!({
        "apiVersion": "meridian.io/v1alpha1",
        "kind": kind,
        "items": out,
    });
    Ok(json_response(StatusCode::OK, Bytes::from(body.to_string())))
}

/// `POST tenants/{name}/token`: a new bearer token for the tenant, shown once.
async fn issue_token(cx: &Ctx<'_>) -> Result<Response, ApiError> {
    let tenant = cx.name().to_owned();
    if cx
        .state
        .store
        .get(&cx.key())
        .await
        .map_err(store_err)?
        .is_none()
    {
        return Err(cx.not_found());
    }
    let token = auth::new_token();
    let record = TokenRecord {
        user: format!("tenant:{tenant}"),
        tenant: Some(tenant.clone()),
        role: None,
        created: crate::now(),
    };
    let value = Bytes::from(serde_json::to_vec(&record).map_err(internal)?);
    let rev = cx
        .state
        .store
        .create(&auth::token_key(&token), value)
        .await
        .map_err(store_err)?
        .ok_or_else(|| internal("token collision"))?;
    // Make sure the cache knows the token before the caller uses it.
    cx.state.cache.wait_for(rev, Duration::from_secs(5)).await?;
    let body = json!({
        "apiVersion": "meridian.io/v1alpha1",
        "kind": "TenantToken",
        "metadata": {"name": tenant},
        "status": {"token": token},
    });
    Ok(json_response(
        StatusCode::CREATED,
        Bytes::from(body.to_string()),
    ))
}

/// Every served resource, for discovery.
pub fn served() -> &'static [Resource] {
    RESOURCES
}

#[cfg(test)]
mod access_review_tests {
    use super::*;

    fn ld(field: u8, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![(field << 3) | 2, bytes.len() as u8];
        v.extend_from_slice(bytes);
        v
    }

    #[test]
    fn a_protobuf_review_decodes_and_garbage_is_refused_without_panicking() {
        let attrs = [ld(2, b"delete"), ld(5, b"nodes")].concat();
        let spec = ld(1, &attrs);
        let raw = [ld(1, b"meta"), ld(2, &spec)].concat();
        let envelope = [ld(1, b"typemeta"), ld(2, &raw), vec![0x18, 0x05]].concat();
        let v = review_from_protobuf(&envelope).unwrap();
        assert_eq!(v["spec"]["resourceAttributes"]["verb"], "delete");
        assert_eq!(v["spec"]["resourceAttributes"]["resource"], "nodes");
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for len in 0..300 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = review_from_protobuf(&junk);
        }
        assert!(
            review_from_protobuf(&[0x12, 0xff]).is_none(),
            "length past the end"
        );
    }
}
