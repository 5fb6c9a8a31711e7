//! The resource management center: where nodes join the edge cloud.
//!
//! A node presents a bootstrap token and its facts; the center shortlists regions
//! (open ones, nearest first), the node probes them for real and reports round
//! trips, the center picks one (RTT first, then load) and signs the node's CSR
//! with the cluster CA: a certificate naming the node and its region, which the
//! region requires on the agent's stream. The center keeps every machine that
//! ever joined (inventory), the tokens and their uses, in its own redb file.
//! Certificates are renewed over mutual TLS with the current one; a node whose
//! region is draining or long unreachable re-plans the same way it joined, with
//! its certificate instead of a token.

mod http;
pub mod plan;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use meridian_api::onboarding::{Candidate, JoinRequest, TokenRequest};
use meridian_pki::Ca;

pub use plan::RegionInfo;

#[derive(Debug, thiserror::Error)]
pub enum CenterError {
    #[error("invalid center configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Pki(#[from] meridian_pki::PkiError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Clone)]
pub struct CenterConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Extra names/addresses for the center's serving certificate.
    pub hosts: Vec<String>,
    /// The global API: regions (`EdgeCluster`s) and admin authentication.
    pub global: Option<kube::Config>,
    /// Regions offered for probing per join.
    pub shortlist: usize,
    /// Round trips an agent measures per candidate.
    pub probes: u32,
    /// Lifetime of node certificates (agents renew at two thirds).
    pub cert_ttl: Duration,
    pub heartbeat_seconds: u32,
    /// How often the region list is read from the global API.
    pub region_refresh: Duration,
}

impl CenterConfig {
    pub fn new(data_dir: PathBuf, listen: SocketAddr, global: Option<kube::Config>) -> Self {
        Self {
            data_dir,
            listen,
            hosts: Vec::new(),
            global,
            shortlist: 3,
            probes: 5,
            cert_ttl: Duration::from_secs(30 * 86400),
            heartbeat_seconds: 10,
            region_refresh: Duration::from_secs(5),
        }
    }
}

/// A join between its offer and its assignment.
struct Pending {
    req: JoinRequest,
    token: Option<String>,
    /// Regions the node may go to (from its token; empty: any).
    allowed: Vec<String>,
    /// Labels the token gives the node.
    token_labels: BTreeMap<String, String>,
    candidates: Vec<Candidate>,
    previous_region: Option<String>,
    expires: Instant,
}

/// How long a join may take between offer and assignment.
const SESSION_TTL: Duration = Duration::from_secs(120);

pub(crate) struct Shared {
    cfg: CenterConfig,
    ca: Ca,
    store: store::Store,
    regions: RwLock<BTreeMap<String, RegionInfo>>,
    /// Nodes the center assigned, per region (from the inventory).
    assigned: Mutex<HashMap<String, u32>>,
    sessions: Mutex<HashMap<String, Pending>>,
    /// The global API for admin checks (base URL and a client trusting its CA).
    global_http: Option<(String, reqwest::Client)>,
    /// The global API for reading regions.
    global: Option<kube::Client>,
    /// Bearer token hashes that passed the admin check recently.
    admins: Mutex<HashMap<String, Instant>>,
    joins: std::sync::atomic::AtomicU64,
    refused: std::sync::atomic::AtomicU64,
    /// redb takes one writer at a time: joins queue here rather than each holding a
    /// blocking thread (a thousand at once would mean a thousand threads).
    commits: tokio::sync::Semaphore,
}

impl Shared {
    fn regions_snapshot(&self) -> BTreeMap<String, RegionInfo> {
        let assigned = lock(&self.assigned).clone();
        let mut regions = self
            .regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for r in regions.values_mut() {
            r.nodes = r.nodes.max(assigned.get(&r.name).copied().unwrap_or(0));
        }
        regions
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running center.
pub struct Center {
    pub addr: SocketAddr,
    /// `https://addr`
    pub url: String,
    pub ca_pem: String,
    /// `sha256:...` of the CA: what `meridian agent join --ca-hash` pins.
    pub ca_hash: String,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Center {
    pub async fn start(cfg: CenterConfig) -> Result<Self, CenterError> {
        if cfg.shortlist == 0 || cfg.probes == 0 || cfg.probes > 50 {
            return Err(CenterError::Config(
                "shortlist must be at least 1 and probes within 1..=50".into(),
            ));
        }
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            CenterError::Config(format!("cannot create {}: {e}", cfg.data_dir.display()))
        })?;
        let ca = Ca::load_or_create(&cfg.data_dir.join("pki"), "meridian-nodes-ca")?;
        let store = store::Store::open(&cfg.data_dir.join("center.redb"))?;
        let mut assigned: HashMap<String, u32> = HashMap::new();
        for n in store.inventory()? {
            *assigned.entry(n.region).or_default() += 1;
        }
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| CenterError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| CenterError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let mut hosts = cfg.hosts.clone();
        hosts.push(addr.ip().to_string());
        let serving = ca.serving("meridian-center", &hosts)?;
        let tls = meridian_pki::server_config(&serving, Some(&ca.cert_pem))?;
        let global_http = match &cfg.global {
            Some(g) => {
                let mut b = reqwest::Client::builder().timeout(Duration::from_secs(10));
                for der in g.root_cert.iter().flatten() {
                    let cert = reqwest::Certificate::from_der(der)
                        .map_err(|e| CenterError::Config(format!("global API CA: {e}")))?;
                    b = b.add_root_certificate(cert);
                }
                let client = b
                    .build()
                    .map_err(|e| CenterError::Config(format!("HTTP client: {e}")))?;
                Some((
                    g.cluster_url.to_string().trim_end_matches('/').to_owned(),
                    client,
                ))
            }
            None => None,
        };
        let global = match cfg.global.clone() {
            Some(mut g) => {
                g.default_retry = false;
                Some(
                    kube::Client::try_from(g)
                        .map_err(|e| CenterError::Config(format!("global API client: {e}")))?,
                )
            }
            None => None,
        };
        let (ca_pem, ca_hash) = (ca.cert_pem.clone(), ca.hash());
        let shared = Arc::new(Shared {
            cfg,
            ca,
            store,
            regions: RwLock::new(BTreeMap::new()),
            assigned: Mutex::new(assigned),
            sessions: Mutex::new(HashMap::new()),
            global_http,
            global,
            admins: Mutex::new(HashMap::new()),
            joins: Default::default(),
            refused: Default::default(),
            commits: tokio::sync::Semaphore::new(1),
        });
        let mut tasks = Vec::new();
        if let Some(client) = shared.global.clone() {
            refresh_regions(&shared, &client).await;
            tasks.push(tokio::spawn(region_loop(shared.clone(), client)));
        }
        tasks.push(tokio::spawn(meridian_pki::serve(
            listener,
            tls,
            http::router(shared.clone()),
        )));
        tracing::info!(%addr, "center started");
        Ok(Self {
            addr,
            url: format!("https://{addr}"),
            ca_pem,
            ca_hash,
            shared,
            tasks,
        })
    }

    /// The CA, for issuing region serving certificates.
    pub fn ca(&self) -> &Ca {
        &self.shared.ca
    }

    /// Joins and refusals so far.
    pub fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.shared.joins.load(Relaxed),
            self.shared.refused.load(Relaxed),
        )
    }

    /// Creates a bootstrap token directly (for `meridian up`, which is its own admin).
    pub fn create_token(
        &self,
        ttl: Duration,
        uses: u32,
    ) -> Result<meridian_api::onboarding::TokenInfo, CenterError> {
        Ok(self.shared.store.create_token(&TokenRequest {
            ttl_seconds: ttl.as_secs(),
            uses,
            description: "meridian up".into(),
            ..Default::default()
        })?)
    }

    /// The regions as the center sees them now.
    pub fn regions(&self) -> Vec<RegionInfo> {
        self.shared.regions_snapshot().into_values().collect()
    }

    /// Reads the regions now rather than at the next refresh.
    pub async fn refresh(&self) {
        if let Some(client) = &self.shared.global {
            refresh_regions(&self.shared, client).await;
        }
    }

    pub fn shutdown(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Center {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn region_loop(shared: Arc<Shared>, client: kube::Client) {
    let mut tick = tokio::time::interval(shared.cfg.region_refresh);
    loop {
        tick.tick().await;
        refresh_regions(&shared, &client).await;
        let now = Instant::now();
        lock(&shared.sessions).retain(|_, p| p.expires > now);
        lock(&shared.admins).retain(|_, t| now.duration_since(*t) < Duration::from_secs(30));
    }
}

fn edgeclusters() -> kube::core::ApiResource {
    kube::core::ApiResource {
        group: meridian_api::meridian::GROUP.into(),
        version: meridian_api::meridian::VERSION.into(),
        api_version: meridian_api::meridian::API_VERSION.into(),
        kind: "EdgeCluster".into(),
        plural: "edgeclusters".into(),
    }
}

/// Reads every `EdgeCluster`: endpoint, limits, draining, reported node count,
/// location (its city label) and whether it reported in the last minute.
async fn refresh_regions(shared: &Shared, client: &kube::Client) {
    let api: kube::Api<kube::core::DynamicObject> =
        kube::Api::all_with(client.clone(), &edgeclusters());
    let list = match api.list(&Default::default()).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("center: listing regions: {e}");
            return;
        }
    };
    let now = jiff::Timestamp::now();
    let mut out = BTreeMap::new();
    for o in list.items {
        let Some(name) = o.metadata.name.clone() else {
            continue;
        };
        let Ok(ec) = serde_json::from_value::<meridian_api::meridian::EdgeCluster>(
            serde_json::to_value(&o).unwrap_or_default(),
        ) else {
            continue;
        };
        let status = ec.status.clone().unwrap_or_default();
        let alive = status
            .get("lastHeartbeatTime")
            .and_then(|t| t.as_str())
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .is_some_and(|t| now.duration_since(t).as_secs() < 60);
        let labels = o.metadata.labels.clone().unwrap_or_default();
        let location = labels
            .get(meridian_api::meridian::CITY_KEY)
            .and_then(|c| meridian_api::geo::city(c))
            .map(|c| (c.lat, c.lon));
        out.insert(
            name.clone(),
            RegionInfo {
                name,
                endpoint: ec.spec.endpoint,
                max_nodes: ec.spec.max_nodes,
                draining: ec.spec.draining,
                nodes: status.get("nodes").and_then(|n| n.as_u64()).unwrap_or(0) as u32,
                location,
                alive,
            },
        );
    }
    *shared.regions.write().unwrap_or_else(|e| e.into_inner()) = out;
}
