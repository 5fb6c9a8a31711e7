//! The onboarding protocol between agents (and admins) and the center, JSON over
//! HTTPS. See `crates/center`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where a machine comes from.
pub const SOURCES: &[&str] = &["cdn", "ens", "third-party"];
/// What kind of machine it is.
pub const MACHINE_TYPES: &[&str] = &["physical", "vm", "arm-array"];

/// Facts an agent declares about its machine when it joins.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineFacts {
    /// cdn | ens | third-party
    #[serde(default)]
    pub source: String,
    /// physical | vm | arm-array
    #[serde(default)]
    pub machine_type: String,
    #[serde(default)]
    pub arch: String,
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory_bytes: u64,
    #[serde(default)]
    pub gpus: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latitude: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longitude: Option<f64>,
}

/// Step 1: a join (with a bootstrap token) or a re-plan (with the node's
/// certificate on the connection, no token).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Stable id of the machine: re-joining with the same id keeps the node's name.
    pub machine_id: String,
    pub node_name: String,
    #[serde(default)]
    pub facts: MachineFacts,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Why a node re-plans (`unreachable`, `draining`); empty for a join.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// A region worth probing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    pub region: String,
    pub endpoint: String,
    /// Great-circle distance from the node's declared location, when both are known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distance_km: Option<f64>,
}

/// Step 2: the shortlist to probe.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinOffer {
    pub session: String,
    pub candidates: Vec<Candidate>,
    /// Round trips to measure per candidate.
    pub probes: u32,
    /// The CA that signs region serving certificates (PEM).
    pub ca: String,
}

/// Step 3: what the agent measured to one candidate.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResult {
    pub region: String,
    pub median_ms: f64,
    pub p90_ms: f64,
    /// Fraction of round trips that failed (1.0: unreachable).
    pub loss: f64,
}

/// Steps 4–5: the probes and a CSR for the node's key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssignRequest {
    pub session: String,
    pub probes: Vec<ProbeResult>,
    pub csr: String,
}

/// The center's answer: the region, the certificate, and what to do next.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub node_name: String,
    pub region: String,
    pub endpoint: String,
    /// The next best regions, best first (used when re-planning).
    #[serde(default)]
    pub fallbacks: Vec<Candidate>,
    /// Node certificate (PEM); CN = node, OU = region.
    pub certificate: String,
    /// CA certificate (PEM) of regions and the center.
    pub ca: String,
    /// Labels the token adds to the node.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub heartbeat_seconds: u32,
    /// How each candidate scored, best first (for operators).
    #[serde(default)]
    pub scores: Vec<String>,
}

/// Renewal: a CSR for the same key, over mTLS with the current certificate.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenewRequest {
    pub csr: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Renewed {
    pub certificate: String,
}

/// `GET /v1/self`: the center's view of the calling node.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SelfStatus {
    pub node_name: String,
    pub region: String,
    /// The region's endpoint now (a region may come back on another address).
    #[serde(default)]
    pub endpoint: String,
    /// The node should re-plan (its region is draining).
    pub replan: bool,
    #[serde(default)]
    pub reason: String,
}

/// Error body of every center endpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CenterError {
    /// Machine-readable: TokenExpired, TokenRevoked, TokenUsedUp, TokenUnknown,
    /// Forbidden, Invalid, NoRegion, NameTaken, Unauthorized, NotFound.
    pub reason: String,
    pub message: String,
}

/// `POST /v1/tokens` (admin).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRequest {
    pub ttl_seconds: u64,
    pub uses: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Regions nodes joining with it may be placed in (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    #[serde(default)]
    pub description: String,
}

/// A use of a bootstrap token.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenUse {
    pub at: String,
    pub machine_id: String,
    pub node_name: String,
    pub region: String,
}

/// A bootstrap token as the center lists it (the secret only once, on creation).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    pub created: String,
    pub expires: String,
    pub uses: u32,
    pub used: u32,
    pub revoked: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub description: String,
    /// Regions nodes joining with it may be placed in (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    #[serde(default)]
    pub history: Vec<TokenUse>,
}

/// A join or move in a node's history.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinEvent {
    pub at: String,
    /// joined | rejoined | moved | renewed
    pub kind: String,
    pub region: String,
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub detail: String,
}

/// The inventory record of a machine that ever joined.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryNode {
    pub machine_id: String,
    pub node_name: String,
    pub region: String,
    pub facts: MachineFacts,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Regions the node may be placed in, from its token (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    pub first_joined: String,
    #[serde(default)]
    pub certificate_expires: String,
    #[serde(default)]
    pub history: Vec<JoinEvent>,
}
