//! Joining the edge cloud through the center, and keeping the node's identity:
//! probing candidate regions, the node key and certificate, renewal, re-planning.
//!
//! Everything lives in `DATA/identity/`: `machine-id`, `node.key` (never leaves
//! the node), `node.crt`, `ca.crt` and `assignment.json` (region, endpoint,
//! fallbacks, center URL). `assignment.json` is written last: a node with one has
//! joined. Each file is replaced atomically.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meridian_api::onboarding::{
    AssignRequest, Assignment, Candidate, CenterError, JoinOffer, JoinRequest, MachineFacts,
    ProbeResult, RenewRequest, Renewed, SelfStatus,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The center said no: its reason (`TokenExpired`, `NoRegion`, ...) and message.
    #[error("the center refused: {reason}: {message}")]
    Refused { reason: String, message: String },
    #[error("center {url}: {message}")]
    Center { url: String, message: String },
    #[error(
        "the center's CA is {got}, not the pinned {want}: wrong center, or a man in the middle"
    )]
    CaMismatch { want: String, got: String },
    #[error("{0}")]
    Identity(String),
}

fn identity_err(what: &str, e: impl std::fmt::Display) -> JoinError {
    JoinError::Identity(format!("{what}: {e}"))
}

/// What the node remembers of its join.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Saved {
    pub center: String,
    pub node_name: String,
    pub region: String,
    pub endpoint: String,
    #[serde(default)]
    pub fallbacks: Vec<Candidate>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub heartbeat_seconds: u32,
}

/// The node's identity directory.
#[derive(Clone, Debug)]
pub struct IdentityDir(pub PathBuf);

impl IdentityDir {
    pub fn new(data_dir: &Path) -> Self {
        Self(data_dir.join("identity"))
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
    fn read(&self, f: &str) -> Result<String, JoinError> {
        std::fs::read_to_string(self.path(f))
            .map_err(|e| identity_err(&self.path(f).display().to_string(), e))
    }
    fn write(&self, f: &str, contents: &str) -> Result<(), JoinError> {
        std::fs::create_dir_all(&self.0)
            .map_err(|e| identity_err(&self.0.display().to_string(), e))?;
        meridian_pki::write_private(&self.path(f), contents.as_bytes())
            .map_err(|e| identity_err("writing identity", e))
    }
    /// The saved assignment, if the node has joined.
    pub fn saved(&self) -> Option<Saved> {
        serde_json::from_str(&self.read("assignment.json").ok()?).ok()
    }
    pub fn ca_pem(&self) -> Result<String, JoinError> {
        self.read("ca.crt")
    }
    pub fn cert_pem(&self) -> Result<String, JoinError> {
        self.read("node.crt")
    }
    pub fn key_pem(&self) -> Result<String, JoinError> {
        self.read("node.key")
    }
    pub fn ca_file(&self) -> PathBuf {
        self.path("ca.crt")
    }
    /// The TLS settings of a stream to the node's region: its CA and the node's
    /// certificate and key.
    pub fn client_tls(&self) -> Result<tonic::transport::ClientTlsConfig, JoinError> {
        Ok(client_tls(
            &self.ca_pem()?,
            &self.cert_pem()?,
            &self.key_pem()?,
        ))
    }
    /// A client of the center the node joined, with the node's certificate.
    pub fn center_client(&self) -> Result<(CenterClient, Saved), JoinError> {
        let saved = self
            .saved()
            .ok_or_else(|| JoinError::Identity("not joined".into()))?;
        Ok((CenterClient::from_identity(&saved.center, self)?, saved))
    }
    /// This machine's id: given, or the one saved at the first join, or derived
    /// from `/etc/machine-id` and the data directory (several agents may share a
    /// host in tests and demos). Saved only when a join succeeds.
    pub fn machine_id(&self, given: Option<&str>) -> String {
        if let Some(id) = given.filter(|s| !s.is_empty()) {
            return id.to_owned();
        }
        if let Ok(id) = self.read("machine-id") {
            return id.trim().to_owned();
        }
        use sha2::Digest;
        let host = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
        let data = self.0.parent().unwrap_or(&self.0);
        let dir = std::path::absolute(data).unwrap_or_else(|_| data.to_path_buf());
        let digest = sha2::Sha256::digest(format!("{}\n{}", host.trim(), dir.display()).as_bytes());
        meridian_pki::hex(&digest[..16])
    }
}

/// TLS for a region stream: trust `ca`, present `cert`/`key` (PEM).
pub fn client_tls(ca: &str, cert: &str, key: &str) -> tonic::transport::ClientTlsConfig {
    tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .identity(tonic::transport::Identity::from_pem(cert, key))
}

/// How to reach the center.
#[derive(Clone, Debug)]
pub struct CenterClient {
    pub url: String,
    http: reqwest::Client,
}

async fn decode<T: serde::de::DeserializeOwned>(
    url: &str,
    resp: Result<reqwest::Response, reqwest::Error>,
) -> Result<T, JoinError> {
    let center = |message: String| JoinError::Center {
        url: url.to_owned(),
        message,
    };
    let resp = resp.map_err(|e| center(format!("{e}")))?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| center(format!("{e}")))?;
    if !status.is_success() {
        return Err(match serde_json::from_slice::<CenterError>(&bytes) {
            Ok(e) => JoinError::Refused {
                reason: e.reason,
                message: e.message,
            },
            Err(_) => center(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&bytes)
            )),
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| center(format!("unexpected answer: {e}")))
}

impl CenterClient {
    /// Fetches the center's CA and checks it against the pinned `sha256:` hash
    /// (what `meridian token create` prints), like kubeadm's discovery.
    pub async fn discover(url: &str, ca_hash: &str) -> Result<(Self, String), JoinError> {
        let url = url.trim_end_matches('/').to_owned();
        let insecure = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| identity_err("HTTP client", e))?;
        let resp = insecure
            .get(format!("{url}/v1/ca"))
            .send()
            .await
            .map_err(|e| JoinError::Center {
                url: url.clone(),
                message: e.to_string(),
            })?;
        let ca = resp.text().await.map_err(|e| JoinError::Center {
            url: url.clone(),
            message: e.to_string(),
        })?;
        let got = meridian_pki::ca_hash(&ca).map_err(|e| identity_err("center CA", e))?;
        if !got.eq_ignore_ascii_case(ca_hash.trim()) {
            return Err(JoinError::CaMismatch {
                want: ca_hash.trim().to_owned(),
                got,
            });
        }
        Ok((Self::new(&url, &ca, None)?, ca))
    }

    /// A client trusting `ca_pem`, presenting the node certificate when given.
    pub fn new(url: &str, ca_pem: &str, identity: Option<(&str, &str)>) -> Result<Self, JoinError> {
        let ca =
            reqwest::Certificate::from_pem(ca_pem.as_bytes()).map_err(|e| identity_err("CA", e))?;
        let mut b = reqwest::Client::builder()
            .add_root_certificate(ca)
            .tls_built_in_root_certs(false)
            .timeout(Duration::from_secs(20));
        if let Some((cert, key)) = identity {
            let id = reqwest::Identity::from_pem(format!("{cert}\n{key}").as_bytes())
                .map_err(|e| identity_err("node certificate", e))?;
            b = b.identity(id);
        }
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            http: b.build().map_err(|e| identity_err("HTTP client", e))?,
        })
    }

    /// A client with the node's saved identity.
    pub fn from_identity(url: &str, dir: &IdentityDir) -> Result<Self, JoinError> {
        Self::new(
            url,
            &dir.ca_pem()?,
            Some((&dir.cert_pem()?, &dir.key_pem()?)),
        )
    }

    async fn post<B: Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, JoinError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await;
        decode(&self.url, resp).await
    }

    pub async fn self_status(&self) -> Result<SelfStatus, JoinError> {
        let resp = self.http.get(format!("{}/v1/self", self.url)).send().await;
        decode(&self.url, resp).await
    }
}

/// What a node brings to a join.
#[derive(Clone, Debug, Default)]
pub struct JoinSpec {
    pub node_name: String,
    pub machine_id: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub facts: MachineFacts,
}

/// Measures `n` HTTPS round trips to a region (`/healthz` on one kept-alive
/// connection, after one untimed request that sets it up).
pub async fn probe(endpoint: &str, n: u32, ca_pem: &str) -> ProbeResult {
    let mut out = ProbeResult {
        region: String::new(),
        median_ms: 0.0,
        p90_ms: 0.0,
        loss: 1.0,
    };
    let client = match reqwest::Certificate::from_pem(ca_pem.as_bytes()).and_then(|ca| {
        reqwest::Client::builder()
            .add_root_certificate(ca)
            .tls_built_in_root_certs(false)
            .http1_only()
            .timeout(Duration::from_secs(3))
            .build()
    }) {
        Ok(c) => c,
        Err(_) => return out,
    };
    let url = format!("{}/healthz", endpoint.trim_end_matches('/'));
    let ok =
        |r: Result<reqwest::Response, reqwest::Error>| r.is_ok_and(|r| r.status().is_success());
    if !ok(client.get(&url).send().await) && !ok(client.get(&url).send().await) {
        return out;
    }
    let mut rtts = Vec::new();
    for _ in 0..n.max(1) {
        let t = Instant::now();
        if ok(client.get(&url).send().await) {
            rtts.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    out.loss = 1.0 - rtts.len() as f64 / n.max(1) as f64;
    if !rtts.is_empty() {
        rtts.sort_by(f64::total_cmp);
        let at = |q: f64| rtts[((rtts.len() - 1) as f64 * q).round() as usize];
        out.median_ms = (at(0.5) * 100.0).round() / 100.0;
        out.p90_ms = (at(0.9) * 100.0).round() / 100.0;
    }
    out
}

/// Runs the join (or, with `replan_reason`, a re-plan with the node's current
/// certificate): offer, probes, CSR, assignment; saves the identity.
pub async fn join(
    client: &CenterClient,
    token: Option<&str>,
    spec: &JoinSpec,
    dir: &IdentityDir,
    replan_reason: Option<&str>,
) -> Result<Assignment, JoinError> {
    let machine_id = dir.machine_id(spec.machine_id.as_deref());
    let offer: JoinOffer = client
        .post(
            "/v1/join",
            &JoinRequest {
                token: token.map(str::to_owned),
                machine_id: machine_id.clone(),
                node_name: spec.node_name.clone(),
                facts: spec.facts.clone(),
                labels: spec.labels.clone(),
                reason: replan_reason.unwrap_or_default().to_owned(),
            },
        )
        .await?;
    let probes = futures::future::join_all(offer.candidates.iter().map(|c| {
        let ca = offer.ca.clone();
        async move {
            let mut p = probe(&c.endpoint, offer.probes, &ca).await;
            p.region = c.region.clone();
            p
        }
    }))
    .await;
    for p in &probes {
        tracing::info!(region = %p.region, median_ms = p.median_ms, p90_ms = p.p90_ms, loss = p.loss, "probed");
    }
    // The key is made once and kept across renewals and moves.
    let key = match dir.key_pem() {
        Ok(k) => k,
        Err(_) => {
            let (k, _) = meridian_pki::node_key_and_csr(&spec.node_name)
                .map_err(|e| identity_err("node key", e))?;
            k
        }
    };
    let csr = meridian_pki::csr_for(&key, &spec.node_name).map_err(|e| identity_err("csr", e))?;
    let a: Assignment = client
        .post(
            "/v1/assign",
            &AssignRequest {
                session: offer.session,
                probes,
                csr,
            },
        )
        .await?;
    dir.write("machine-id", &machine_id)?;
    dir.write("node.key", &key)?;
    dir.write("ca.crt", &a.ca)?;
    dir.write("node.crt", &a.certificate)?;
    let saved = Saved {
        center: client.url.clone(),
        node_name: a.node_name.clone(),
        region: a.region.clone(),
        endpoint: a.endpoint.clone(),
        fallbacks: a.fallbacks.clone(),
        labels: a.labels.clone(),
        heartbeat_seconds: a.heartbeat_seconds,
    };
    dir.write(
        "assignment.json",
        &serde_json::to_string_pretty(&saved).map_err(|e| identity_err("assignment", e))?,
    )?;
    Ok(a)
}

/// Asks the center where the node's region is now and saves a changed endpoint.
/// Returns whether it changed.
pub async fn refresh_endpoint(dir: &IdentityDir) -> Result<bool, JoinError> {
    let (client, mut saved) = dir.center_client()?;
    let status = client.self_status().await?;
    if status.endpoint.is_empty()
        || status.endpoint == saved.endpoint
        || status.region != saved.region
    {
        return Ok(false);
    }
    tracing::info!(region = %saved.region, from = %saved.endpoint, to = %status.endpoint, "region endpoint changed");
    saved.endpoint = status.endpoint;
    dir.write(
        "assignment.json",
        &serde_json::to_string_pretty(&saved).map_err(|e| identity_err("assignment", e))?,
    )?;
    Ok(true)
}

/// Renews the node certificate (same key) when less than a third of its lifetime
/// is left, or when `force`. Returns whether it renewed.
pub async fn renew_if_due(dir: &IdentityDir, force: bool) -> Result<bool, JoinError> {
    let cert = dir.cert_pem()?;
    let id = meridian_pki::node_identity_pem(&cert)
        .ok_or_else(|| JoinError::Identity("node.crt is not a node certificate".into()))?;
    let life = id
        .not_after
        .duration_since(id.not_before)
        .unwrap_or_default();
    let left = id
        .not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    if !force && left > life / 3 {
        return Ok(false);
    }
    let (client, _) = dir.center_client()?;
    let csr =
        meridian_pki::csr_for(&dir.key_pem()?, &id.node).map_err(|e| identity_err("csr", e))?;
    let r: Renewed = client.post("/v1/renew", &RenewRequest { csr }).await?;
    dir.write("node.crt", &r.certificate)?;
    tracing::info!(node = %id.node, "node certificate renewed");
    Ok(true)
}

/// When the next renewal check is due: at two thirds of the certificate's life
/// (at least a second from now).
pub fn next_renewal(dir: &IdentityDir) -> Duration {
    let Some(id) = dir
        .cert_pem()
        .ok()
        .and_then(|c| meridian_pki::node_identity_pem(&c))
    else {
        return Duration::from_secs(60);
    };
    let life = id
        .not_after
        .duration_since(id.not_before)
        .unwrap_or_default();
    let due = id.not_after - life / 3;
    due.duration_since(std::time::SystemTime::now())
        .unwrap_or_default()
        .max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::containerd::Mirrors;

    #[test]
    fn a_joined_nodes_image_mirror_follows_its_assignment() {
        let dir = tempfile::tempdir().unwrap();
        let id = IdentityDir::new(dir.path());
        let mirrors = Mirrors {
            hosts_dir: dir.path().join("certs.d"),
            endpoints: vec!["https://old:7100".into()],
            ca: Some(id.ca_file()),
            identity: Some(id.clone()),
        };
        // Not joined yet: the configured endpoints.
        assert!(
            mirrors
                .hosts_toml("docker.io")
                .contains("[host.\"https://old:7100\"]")
        );
        let mut saved = Saved {
            endpoint: "https://eu-west:7100".into(),
            region: "eu-west".into(),
            ..Default::default()
        };
        id.write("assignment.json", &serde_json::to_string(&saved).unwrap())
            .unwrap();
        let toml = mirrors.hosts_toml("docker.io");
        assert!(toml.contains("[host.\"https://eu-west:7100\"]"), "{toml}");
        assert!(
            toml.contains(&format!("ca = \"{}\"", id.ca_file().display())),
            "{toml}"
        );
        // Moved: the next pull goes through the new region.
        saved.endpoint = "https://us-east:7100".into();
        id.write("assignment.json", &serde_json::to_string(&saved).unwrap())
            .unwrap();
        let toml = mirrors.hosts_toml("docker.io");
        assert!(
            toml.contains("us-east") && !toml.contains("eu-west"),
            "{toml}"
        );
    }

    #[test]
    fn the_machine_id_is_stable_and_saved_only_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let id = IdentityDir::new(dir.path());
        let a = id.machine_id(None);
        assert_eq!(a, id.machine_id(None));
        assert_eq!(a.len(), 32);
        assert!(!id.0.exists(), "deriving the id writes nothing");
        assert_eq!(id.machine_id(Some("given")), "given");
    }
}
