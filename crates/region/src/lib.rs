//! A region: one edge management cluster between the global control plane and its
//! nodes.
//!
//! - **Agent hub** ([`hub`]): each agent holds one gRPC stream it dialled out; over it
//!   the region takes registrations, heartbeats, pod status, events and log chunks,
//!   and pushes each node's desired pod set.
//! - **Leases and lifecycle** ([`lifecycle`]): heartbeats end here, in memory, with
//!   a periodic checkpoint to the region's own redb store. A missed lease makes the
//!   Node `Ready=Unknown`; pods are marked for rescheduling only after a grace, at a
//!   limited rate, and never while most of the region is unreachable at once.
//! - **Global sync** ([`global`]): the region registers an `EdgeCluster`, watches the
//!   pods bound to its nodes (cached in its store, so it keeps serving while the
//!   global API is away), and writes Node objects on transitions and as periodic
//!   summaries, pod status in batches, and events.
//! - **HTTP** ([`http`]): log streaming for the global API, metrics, health.

pub mod global;
pub mod http;
pub mod hub;
pub mod images;
pub mod lifecycle;
pub mod prepull;
pub mod refs;
mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meridian_store::{DynStore, EmbeddedStore};

pub use state::Shared;

pub use meridian_api::meridian::REGION_LABEL;
/// Annotation (on a pod, its workload template, or a Node) overriding how long
/// after its node became unreachable a pod is marked for rescheduling: a duration
/// such as `600s`, `10m`, or `never` for pinned workloads.
pub use meridian_api::meridian::RESCHEDULE_GRACE_ANNOTATION as GRACE_ANNOTATION;
/// Pod status reason for pods marked for rescheduling after node loss.
pub const NODE_LOST: &str = meridian_api::NODE_LOST_REASON;

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("invalid region configuration: {0}")]
    Config(String),
    #[error("region store: {0}")]
    Store(#[from] meridian_store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Clone)]
pub struct RegionConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// URL agents and the global API use to reach this region; default `http://{listen}`.
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    /// How to reach the global API.
    pub global: kube::Config,
    /// The bearer token the global API must present for log requests.
    pub proxy_token: String,
    /// Heartbeat period the region asks agents for.
    pub heartbeat: Duration,
    /// A node whose lease is older than this becomes `Ready=Unknown`.
    pub lease_timeout: Duration,
    /// Default time an unreachable node's pods wait before being marked for
    /// rescheduling (overridable per node and per workload).
    pub eviction_grace: Duration,
    /// Nodes per second whose pods may be marked for rescheduling.
    pub eviction_rate: f64,
    /// Above this fraction of unreachable nodes the region assumes a partition and
    /// marks nothing.
    pub partition_threshold: f64,
    /// Period of the per-node summary written to the global Node object.
    pub summary_interval: Duration,
    /// Labels for the EdgeCluster object (e.g. city, country).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Upstream registries the image cache reaches over plain HTTP (loopback
    /// registries always are).
    pub insecure_registries: Vec<String>,
    /// Size limit of the image cache (least recently used blobs are evicted).
    pub image_cache_max_bytes: Option<u64>,
    /// How long a tag's digest is trusted before it is checked upstream again.
    pub image_tag_ttl: Duration,
    /// Serve over TLS and admit only agents with a node certificate from the
    /// cluster CA naming this region (mutual TLS). `None`: plain HTTP/2 and no
    /// node authentication (hollow fleets, development).
    pub tls: Option<RegionTls>,
}

/// The region's serving certificate and the CA its nodes' certificates come from.
#[derive(Clone)]
pub struct RegionTls {
    pub serving: meridian_pki::CertPair,
    pub client_ca: String,
}

impl RegionConfig {
    pub fn new(
        name: impl Into<String>,
        listen: SocketAddr,
        data_dir: PathBuf,
        global: kube::Config,
    ) -> Self {
        Self {
            name: name.into(),
            listen,
            advertise: None,
            data_dir,
            global,
            proxy_token: String::new(),
            heartbeat: Duration::from_secs(10),
            lease_timeout: Duration::from_secs(40),
            eviction_grace: Duration::from_secs(300),
            eviction_rate: 0.1,
            partition_threshold: 0.55,
            summary_interval: Duration::from_secs(300),
            labels: Default::default(),
            insecure_registries: Vec::new(),
            image_cache_max_bytes: Some(50 << 30),
            image_tag_ttl: Duration::from_secs(30),
            tls: None,
        }
    }

    pub fn endpoint(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| format!("{}://{}", self.scheme(), self.listen))
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

/// A running region.
pub struct Region {
    pub shared: Arc<Shared>,
    pub addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Region {
    /// Opens the region store, loads its cache, binds the listener and starts every loop.
    pub async fn start(cfg: RegionConfig) -> Result<Self, RegionError> {
        if !valid_name(&cfg.name) {
            return Err(RegionError::Config(format!(
                "region name {:?} must be a DNS label (lowercase letters, digits, '-')",
                cfg.name
            )));
        }
        if !(0.0..=1.0).contains(&cfg.partition_threshold) || cfg.eviction_rate <= 0.0 {
            return Err(RegionError::Config(
                "partition threshold must be within 0..1 and the eviction rate positive".into(),
            ));
        }
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| RegionError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
        // The region holds its working set in memory; the store is its durable copy,
        // so a small page cache suffices.
        let store: DynStore = Arc::new(EmbeddedStore::open_with_cache(
            &cfg.data_dir.join("region.redb"),
            16 * 1024 * 1024,
        )?);
        // No client-side retries: our loops retry themselves, and a retrying client
        // would sit for minutes on a 429 from risk control.
        let mut global = cfg.global.clone();
        global.default_retry = false;
        let client = kube::Client::try_from(global)
            .map_err(|e| RegionError::Config(format!("global API client: {e}")))?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| RegionError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| RegionError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let mut cfg = cfg;
        if cfg.advertise.is_none() {
            cfg.advertise = Some(format!("{}://{addr}", cfg.scheme()));
        }
        let images_dir = cfg.data_dir.join("images");
        let images =
            images::ImageCache::open(&images_dir, &cfg.insecure_registries).map_err(|source| {
                RegionError::DataDir {
                    path: images_dir,
                    source,
                }
            })?;
        let shared = Arc::new(Shared::new(cfg, store, client, Arc::new(images)));
        let (refs_tx, refs_rx) = tokio::sync::mpsc::unbounded_channel();
        let _ = shared.refs_tx.set(refs_tx);
        shared.load().await?;
        // Pods loaded from the store have no references resolved yet.
        let loaded: Vec<(String, bytes::Bytes)> = state::lock(&shared.pods)
            .by_uid
            .iter()
            .map(|(u, p)| (u.clone(), p.json.clone()))
            .collect();
        for (uid, json) in loaded {
            let maybe = memchr::memmem::find(&json, b"configMap").is_some()
                || memchr::memmem::find(&json, b"ecret").is_some();
            if maybe && let Ok(pod) = serde_json::from_slice(&json) {
                refs::enqueue_if_needed(&shared, &uid, &pod);
            }
        }
        let mut tasks = Vec::new();
        let router = http::router(shared.clone());
        match &shared.cfg.tls {
            Some(tls) => {
                let config = meridian_pki::server_config(&tls.serving, Some(&tls.client_ca))
                    .map_err(|e| RegionError::Config(format!("TLS: {e}")))?;
                tasks.push(tokio::spawn(meridian_pki::serve(listener, config, router)));
            }
            None => tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::error!("region server: {e}");
                }
            })),
        }
        tasks.push(tokio::spawn(lifecycle::run(shared.clone())));
        tasks.push(tokio::spawn(refs::run(shared.clone(), refs_rx)));
        tasks.push(tokio::spawn(prepull::run(shared.clone())));
        tasks.push(tokio::spawn(lifecycle::checkpoint_leases(shared.clone())));
        tasks.extend(global::spawn(shared.clone()));
        tracing::info!(region = %shared.cfg.name, %addr, "region started");
        Ok(Self {
            shared,
            addr,
            tasks,
        })
    }

    /// Stops every loop and closes agent streams (the process keeps its store).
    pub fn shutdown(&self) {
        for t in &self.tasks {
            t.abort();
        }
        self.shared.close_sessions();
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
        && !n.ends_with('-')
}

/// Parses a grace override: `never`, or a duration like `300`, `300s`, `10m`, `1h`.
pub fn parse_grace(s: &str) -> Option<Option<Duration>> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("never") {
        return Some(None);
    }
    meridian_api::duration::parse(s).ok().map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_overrides_parse() {
        assert_eq!(parse_grace("never"), Some(None));
        assert_eq!(parse_grace("90"), Some(Some(Duration::from_secs(90))));
        assert_eq!(parse_grace("10m"), Some(Some(Duration::from_secs(600))));
        assert_eq!(parse_grace("soon"), None);
    }
}
