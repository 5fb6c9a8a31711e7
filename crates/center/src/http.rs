//! The center's HTTPS API (JSON). Agents: `/v1/join`, `/v1/assign`, `/v1/renew`,
//! `/v1/self`; admins (a bearer token the global API authorizes to create nodes):
//! `/v1/tokens`, `/v1/nodes`. Every error is a [`CenterError`] body with a reason.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use meridian_api::onboarding::{
    AssignRequest, Assignment, CenterError, InventoryNode, JoinEvent, JoinOffer, JoinRequest,
    MACHINE_TYPES, RenewRequest, Renewed, SOURCES, SelfStatus, TokenRequest,
};
use meridian_pki::Peer;
use sha2::Digest;

use crate::store::{JoinCommit, StoreError};
use crate::{Pending, SESSION_TTL, Shared, lock, plan};

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/ca", get(ca))
        .route("/v1/join", post(join))
        .route("/v1/assign", post(assign))
        .route("/v1/renew", post(renew))
        .route("/v1/self", get(self_status))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}", delete(revoke_token))
        .route("/v1/nodes", get(inventory))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024))
        .with_state(shared)
}

pub(crate) struct ApiErr(StatusCode, &'static str, String);

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let body = CenterError {
            reason: self.1.into(),
            message: self.2,
        };
        (self.0, Json(body)).into_response()
    }
}

fn invalid(msg: impl Into<String>) -> ApiErr {
    ApiErr(StatusCode::BAD_REQUEST, "Invalid", msg.into())
}

impl From<StoreError> for ApiErr {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Token(p) => ApiErr(StatusCode::UNAUTHORIZED, p.reason(), p.to_string()),
            StoreError::NameTaken { .. } => {
                ApiErr(StatusCode::CONFLICT, "NameTaken", e.to_string())
            }
            StoreError::UnknownMachine(_) => {
                ApiErr(StatusCode::FORBIDDEN, "Forbidden", e.to_string())
            }
            StoreError::Db(m) => ApiErr(StatusCode::INTERNAL_SERVER_ERROR, "Internal", m),
        }
    }
}

type Res<T> = Result<Json<T>, ApiErr>;

/// JSON body, or a clear 400 naming what is wrong with it.
pub(crate) struct Body<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiErr;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiErr> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| invalid(format!("request body: {e}")))?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| invalid(format!("request body is not a valid request: {e}")))
    }
}

async fn ca(State(s): State<Arc<Shared>>) -> String {
    s.ca.cert_pem.clone()
}

fn refuse(s: &Shared, e: ApiErr) -> ApiErr {
    s.refused.fetch_add(1, Ordering::Relaxed);
    tracing::info!(reason = e.1, "center refused: {}", e.2);
    e
}

fn check_labels(labels: &std::collections::BTreeMap<String, String>) -> Result<(), ApiErr> {
    use meridian_api::validation::{label_key_problem, label_value_problem};
    for (k, v) in labels {
        if let Some(p) = label_key_problem(k).or_else(|| label_value_problem(v)) {
            return Err(invalid(format!("labels[{k:?}]: {p}")));
        }
    }
    Ok(())
}

fn validate(req: &JoinRequest) -> Result<(), ApiErr> {
    use meridian_api::validation::dns1123_subdomain_problem;
    if let Some(p) = dns1123_subdomain_problem(&req.node_name) {
        return Err(invalid(format!("nodeName {:?}: {p}", req.node_name)));
    }
    if req.machine_id.is_empty()
        || req.machine_id.len() > 128
        || !req.machine_id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(invalid(
            "machineId must be 1-128 printable ASCII characters",
        ));
    }
    if req.labels.len() > 64 {
        return Err(invalid("labels: at most 64"));
    }
    check_labels(&req.labels)?;
    let f = &req.facts;
    if !f.source.is_empty() && !SOURCES.contains(&f.source.as_str()) {
        return Err(invalid(format!(
            "facts.source {:?}: one of {SOURCES:?}",
            f.source
        )));
    }
    if !f.machine_type.is_empty() && !MACHINE_TYPES.contains(&f.machine_type.as_str()) {
        return Err(invalid(format!(
            "facts.machineType {:?}: one of {MACHINE_TYPES:?}",
            f.machine_type
        )));
    }
    match (f.latitude, f.longitude) {
        (None, None) => {}
        (Some(la), Some(lo)) if (-90.0..=90.0).contains(&la) && (-180.0..=180.0).contains(&lo) => {}
        _ => {
            return Err(invalid(
                "facts.latitude/longitude: both, within ±90 and ±180",
            ));
        }
    }
    if f.arch.len() > 32 {
        return Err(invalid("facts.arch: at most 32 characters"));
    }
    Ok(())
}

fn random_id() -> String {
    let b: [u8; 16] = rand::random();
    meridian_pki::hex(&b)
}

/// Step 1: check the token (or the certificate, for a re-plan) and offer regions.
async fn join(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    Body(mut req): Body<JoinRequest>,
) -> Res<JoinOffer> {
    validate(&req).map_err(|e| refuse(&s, e))?;
    let mut exclude = None;
    let mut previous_region = None;
    let allowed: Vec<String>;
    let mut token_labels = std::collections::BTreeMap::new();
    if let Some(token) = &req.token {
        let rec = s
            .store
            .validate_token(token)
            .map_err(|e| refuse(&s, e.into()))?;
        allowed = rec.info.regions;
        token_labels = rec.info.labels;
    } else if let Some(id) = &peer.0 {
        // A re-plan: the certificate's node, on the machine it was issued to.
        let inv = s.store.node_by_name(&id.node)?;
        let Some(inv) =
            inv.filter(|n| n.machine_id == req.machine_id && n.node_name == req.node_name)
        else {
            return Err(refuse(
                &s,
                ApiErr(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    format!(
                        "the certificate of node {:?} cannot re-plan machine {:?} as {:?}",
                        id.node, req.machine_id, req.node_name
                    ),
                ),
            ));
        };
        let draining = s
            .regions_snapshot()
            .get(&inv.region)
            .is_none_or(|r| r.draining);
        if draining || req.reason == "draining" {
            exclude = Some(inv.region.clone());
        }
        allowed = inv.regions.clone();
        previous_region = Some(inv.region);
    } else {
        return Err(refuse(
            &s,
            ApiErr(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "a bootstrap token is required (meridian token create), or the node's \
                 certificate to re-plan"
                    .into(),
            ),
        ));
    }
    // A machine that joined before keeps its name; a name is one machine's.
    if let Some(known) = s.store.node_by_machine(&req.machine_id)? {
        req.node_name = known.node_name;
    } else if let Some(owner) = s.store.name_owner(&req.node_name)? {
        return Err(refuse(
            &s,
            ApiErr(
                StatusCode::CONFLICT,
                "NameTaken",
                format!(
                    "node name {:?} belongs to another machine ({owner}); pick another --node-name",
                    req.node_name
                ),
            ),
        ));
    }
    let regions = s.regions_snapshot();
    let all: Vec<plan::RegionInfo> = regions
        .values()
        .filter(|r| allowed.is_empty() || allowed.contains(&r.name))
        .cloned()
        .collect();
    let location = req.facts.latitude.zip(req.facts.longitude);
    let candidates = plan::shortlist(&all, location, exclude.as_deref(), s.cfg.shortlist);
    if candidates.is_empty() {
        return Err(refuse(
            &s,
            ApiErr(
                StatusCode::SERVICE_UNAVAILABLE,
                "NoRegion",
                if all.is_empty() && !allowed.is_empty() {
                    format!("none of this token's regions {allowed:?} exists")
                } else {
                    plan::no_region_reason(&all)
                },
            ),
        ));
    }
    let session = random_id();
    let token = req.token.clone();
    lock(&s.sessions).insert(
        session.clone(),
        Pending {
            req,
            token,
            allowed,
            token_labels,
            candidates: candidates.clone(),
            previous_region,
            expires: Instant::now() + SESSION_TTL,
        },
    );
    Ok(Json(JoinOffer {
        session,
        candidates,
        probes: s.cfg.probes,
        ca: s.ca.cert_pem.clone(),
    }))
}

/// Steps 4–5: score the probes, assign a region, sign the CSR, commit.
async fn assign(State(s): State<Arc<Shared>>, Body(req): Body<AssignRequest>) -> Res<Assignment> {
    let pending = lock(&s.sessions).remove(&req.session);
    let Some(p) = pending.filter(|p| p.expires > Instant::now()) else {
        return Err(refuse(
            &s,
            ApiErr(
                StatusCode::NOT_FOUND,
                "NotFound",
                "join session unknown or expired (a join must finish within 2 minutes); start again"
                    .into(),
            ),
        ));
    };
    for (i, probe) in req.probes.iter().enumerate() {
        if !plan::valid_probe(probe) {
            return Err(refuse(
                &s,
                invalid(format!("probes[{i}]: not a plausible measurement")),
            ));
        }
    }
    let regions = s.regions_snapshot();
    let ranked = plan::rank(&p.candidates, &req.probes, &regions);
    let Some((chosen, _)) = ranked.first().cloned() else {
        let seen: Vec<String> = req
            .probes
            .iter()
            .map(|p| format!("{} loss {:.0}%", p.region, p.loss * 100.0))
            .collect();
        return Err(refuse(
            &s,
            ApiErr(
                StatusCode::SERVICE_UNAVAILABLE,
                "NoRegion",
                format!(
                    "no candidate region was reachable and open ({})",
                    seen.join(", ")
                ),
            ),
        ));
    };
    let node = p.req.node_name.clone();
    let certificate =
        s.ca.sign_node(&req.csr, &node, &chosen.region, s.cfg.cert_ttl)
            .map_err(|e| refuse(&s, invalid(format!("csr: {e}"))))?;
    let expires = meridian_pki::node_identity_pem(&certificate)
        .map(|id| {
            jiff::Timestamp::try_from(id.not_after)
                .map(|t| t.to_string())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    // The token was checked at the offer; the commit checks it again, atomically.
    let (token_id, secret) = match p.token.as_deref().and_then(crate::store::parse_token) {
        Some((id, secret)) => (Some(id.to_owned()), Some(secret.to_owned())),
        None => (None, None),
    };
    let token_labels = p.token_labels.clone();
    let known = s.store.node_by_machine(&p.req.machine_id)?;
    let kind = match (&known, &p.previous_region) {
        (None, _) => "joined",
        (Some(_), None) => "rejoined",
        (Some(_), Some(prev)) if *prev != chosen.region => "moved",
        (Some(_), Some(_)) => "replanned",
    };
    let mut labels = p.req.labels.clone();
    labels.extend(token_labels.clone());
    let now = jiff::Timestamp::now().to_string();
    let record = InventoryNode {
        machine_id: p.req.machine_id.clone(),
        node_name: node.clone(),
        region: chosen.region.clone(),
        facts: p.req.facts.clone(),
        labels,
        regions: p.allowed.clone(),
        first_joined: now.clone(),
        certificate_expires: expires,
        history: Vec::new(),
    };
    let event = JoinEvent {
        at: now,
        kind: kind.into(),
        region: chosen.region.clone(),
        token: token_id.clone().unwrap_or_default(),
        detail: ranked
            .iter()
            .map(|r| r.1.clone())
            .collect::<Vec<_>>()
            .join("; "),
    };
    let s2 = s.clone();
    let _turn = s.commits.acquire().await;
    let committed = tokio::task::spawn_blocking(move || {
        s2.store.commit(
            JoinCommit {
                token: token_id.as_deref(),
                node: record,
                event,
            },
            secret.as_deref(),
        )
    })
    .await
    .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()))?;
    committed.map_err(|e| refuse(&s, e.into()))?;
    {
        let mut assigned = lock(&s.assigned);
        if let Some(prev) = known.as_ref().map(|k| k.region.clone())
            && let Some(n) = assigned.get_mut(&prev)
        {
            *n = n.saturating_sub(1);
        }
        *assigned.entry(chosen.region.clone()).or_default() += 1;
    }
    s.joins.fetch_add(1, Ordering::Relaxed);
    tracing::info!(node = %node, region = %chosen.region, kind, "node assigned");
    Ok(Json(Assignment {
        node_name: node,
        region: chosen.region.clone(),
        endpoint: chosen.endpoint.clone(),
        fallbacks: ranked.iter().skip(1).map(|r| r.0.clone()).collect(),
        certificate,
        ca: s.ca.cert_pem.clone(),
        labels: token_labels,
        heartbeat_seconds: s.cfg.heartbeat_seconds,
        scores: ranked.into_iter().map(|r| r.1).collect(),
    }))
}

/// The caller's node record, from its certificate.
fn caller(s: &Shared, peer: &Peer) -> Result<(InventoryNode, String), ApiErr> {
    let Some(id) = &peer.0 else {
        return Err(ApiErr(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "this endpoint needs the node's certificate (mutual TLS)".into(),
        ));
    };
    let inv = s.store.node_by_name(&id.node)?.ok_or_else(|| {
        ApiErr(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("node {:?} is not in the inventory", id.node),
        )
    })?;
    Ok((inv, id.region.clone()))
}

async fn renew(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
    Body(req): Body<RenewRequest>,
) -> Res<Renewed> {
    let (inv, cert_region) = caller(&s, &peer).map_err(|e| refuse(&s, e))?;
    if cert_region != inv.region {
        return Err(refuse(
            &s,
            ApiErr(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "this certificate is for region {cert_region:?} but node {:?} was moved to {:?}",
                    inv.node_name, inv.region
                ),
            ),
        ));
    }
    let certificate =
        s.ca.sign_node(&req.csr, &inv.node_name, &inv.region, s.cfg.cert_ttl)
            .map_err(|e| refuse(&s, invalid(format!("csr: {e}"))))?;
    let mut record = inv.clone();
    record.certificate_expires = meridian_pki::node_identity_pem(&certificate)
        .and_then(|id| jiff::Timestamp::try_from(id.not_after).ok())
        .map(|t| t.to_string())
        .unwrap_or_default();
    let event = JoinEvent {
        at: jiff::Timestamp::now().to_string(),
        kind: "renewed".into(),
        region: inv.region.clone(),
        ..Default::default()
    };
    s.store.commit(
        JoinCommit {
            token: None,
            node: record,
            event,
        },
        None,
    )?;
    Ok(Json(Renewed { certificate }))
}

async fn self_status(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<Peer>,
) -> Res<SelfStatus> {
    let (inv, _) = caller(&s, &peer)?;
    let regions = s.regions_snapshot();
    let endpoint = regions
        .get(&inv.region)
        .map(|r| r.endpoint.clone())
        .unwrap_or_default();
    let (replan, reason) = match regions.get(&inv.region) {
        None => (true, format!("region {:?} no longer exists", inv.region)),
        Some(r) if r.draining => (true, format!("region {:?} is draining", inv.region)),
        Some(_) => (false, String::new()),
    };
    Ok(Json(SelfStatus {
        node_name: inv.node_name,
        region: inv.region,
        endpoint,
        replan,
        reason,
    }))
}

/// Admins are whoever the global API lets create Nodes (a SelfSubjectAccessReview
/// with the caller's own bearer token); tenants and node certificates are not.
async fn admin(s: &Shared, headers: &HeaderMap) -> Result<(), ApiErr> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiErr(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "an admin bearer token of the global API is required".into(),
            )
        })?;
    let key = meridian_pki::hex(&sha2::Sha256::digest(bearer.as_bytes()));
    if lock(&s.admins).contains_key(&key) {
        return Ok(());
    }
    let Some((base, client)) = &s.global_http else {
        return Err(ApiErr(
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            "this center has no global API to authenticate admins (--global)".into(),
        ));
    };
    let review = serde_json::json!({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": "create", "resource": "nodes"}},
    });
    let resp = client
        .post(format!(
            "{base}/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
        ))
        .bearer_auth(bearer)
        .json(&review)
        .send()
        .await
        .map_err(|e| {
            ApiErr(
                StatusCode::BAD_GATEWAY,
                "Unavailable",
                format!("global API: {e}"),
            )
        })?;
    if resp.status() == StatusCode::UNAUTHORIZED {
        return Err(ApiErr(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "the global API does not know this bearer token".into(),
        ));
    }
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if body.pointer("/status/allowed").and_then(|a| a.as_bool()) != Some(true) {
        return Err(ApiErr(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "only cluster admins (allowed to create nodes) manage bootstrap tokens".into(),
        ));
    }
    lock(&s.admins).insert(key, Instant::now());
    Ok(())
}

async fn create_token(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Body(req): Body<TokenRequest>,
) -> Result<(StatusCode, Json<meridian_api::onboarding::TokenInfo>), ApiErr> {
    admin(&s, &headers).await?;
    if req.uses == 0 || req.ttl_seconds == 0 || req.ttl_seconds > 366 * 86400 {
        return Err(invalid(
            "uses must be at least 1 and ttlSeconds within 1..=31622400",
        ));
    }
    check_labels(&req.labels)?;
    for r in &req.regions {
        if meridian_api::validation::dns1123_subdomain_problem(r).is_some() {
            return Err(invalid(format!("regions: {r:?} is not a region name")));
        }
    }
    let info = s.store.create_token(&req)?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn list_tokens(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Res<Vec<meridian_api::onboarding::TokenInfo>> {
    admin(&s, &headers).await?;
    Ok(Json(s.store.tokens()?))
}

async fn revoke_token(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiErr> {
    admin(&s, &headers).await?;
    if s.store.revoke(&id)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiErr(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no token {id:?}"),
        ))
    }
}

async fn inventory(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Res<Vec<InventoryNode>> {
    admin(&s, &headers).await?;
    Ok(Json(s.store.inventory()?))
}

async fn metrics(State(s): State<Arc<Shared>>) -> String {
    let sessions = lock(&s.sessions).len();
    format!(
        "# TYPE meridian_center_joins counter\nmeridian_center_joins_total {}\n\
         # TYPE meridian_center_refused counter\nmeridian_center_refused_total {}\n\
         # TYPE meridian_center_pending_joins gauge\nmeridian_center_pending_joins {sessions}\n",
        s.joins.load(Ordering::Relaxed),
        s.refused.load(Ordering::Relaxed),
    )
}
