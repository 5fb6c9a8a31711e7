//! Meridian's global API server: Kubernetes REST semantics over the store, lists and
//! watches served from an in-memory watch cache, tenants as virtual clusters, TLS.
//!
//! The path of one request: [`handlers::dispatch`] authenticates the bearer token
//! ([`auth`]), parses the path ([`route`]), authorises the verb, maps the tenant's view
//! to stored keys ([`tenancy`]), validates the object ([`meridian_api::Resource::normalize`])
//! and writes it to the store with a compare-and-swap transaction; the store's watch
//! feeds the [`cache::Cache`], which serves lists and watches.

pub mod auth;
pub mod cache;
mod discovery;
mod exec;
pub mod handlers;
pub mod kubeconfig;
mod logs;
mod portforward;
pub mod protobuf;
mod spdy;
pub use logs::REGIONS_CA_FILE;
pub mod metrics;
mod namespaces;
mod openapi;
mod placement;
pub mod risk;
pub mod route;
mod table;
pub mod tenancy;
pub mod tls;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian_store::{DynStore, StoreError};
use tokio_util::sync::CancellationToken;

use crate::auth::{Identity, SystemRole, TokenRecord};
use crate::cache::Cache;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("watch cache: {0}")]
    Cache(#[from] cache::CacheError),
    #[error("tls: {0}")]
    Tls(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// How the API server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Extra names/addresses for the serving certificate.
    pub hosts: Vec<String>,
    /// How often watchers that asked for bookmarks get one.
    pub bookmark_interval: Duration,
    /// How many recent events the watch cache keeps for resuming watches.
    pub watch_history: usize,
    /// Events younger than this are kept too (up to four times `watch_history`),
    /// so a watcher that fell that far behind resumes instead of relisting.
    pub watch_history_min_age: Duration,
    /// The largest request body accepted.
    pub max_body_bytes: usize,
    /// How much store history to keep (compaction runs every `compaction_interval`).
    pub compaction_interval: Duration,
    /// The time risk policies are evaluated at (tests use a manual clock).
    pub clock: meridian_risk::Clock,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen,
            data_dir: data_dir.into(),
            hosts: Vec::new(),
            bookmark_interval: Duration::from_secs(15),
            watch_history: 100_000,
            watch_history_min_age: Duration::from_secs(60),
            max_body_bytes: 3 * 1024 * 1024,
            compaction_interval: Duration::from_secs(300),
            clock: meridian_risk::Clock::system(),
        }
    }
}

/// Shared state of all request handlers.
pub struct AppState {
    pub store: DynStore,
    pub cache: Arc<Cache>,
    pub metrics: metrics::Metrics,
    pub config: ServerConfig,
    pub shutdown: CancellationToken,
    pub risk: Arc<risk::RiskGate>,
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub url: String,
    pub ca_pem: String,
    pub admin_token: String,
    pub state: Arc<AppState>,
    handle: axum_server::Handle<SocketAddr>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Starts serving; returns once the listener is bound and the cache is loaded.
    pub async fn start(config: ServerConfig, store: DynStore) -> Result<Self, ServerError> {
        std::fs::create_dir_all(&config.data_dir).map_err(io_err("creating data dir"))?;
        let pki = tls::ensure(&config.data_dir, &config.hosts)?;
        let admin_token = bootstrap_token(
            &store,
            &config.data_dir,
            "admin.token",
            TokenRecord {
                user: "admin".into(),
                tenant: None,
                role: None,
                created: now(),
            },
        )
        .await?;
        let shutdown = CancellationToken::new();
        let cache = Cache::start(
            store.clone(),
            config.watch_history,
            config.watch_history_min_age,
            shutdown.clone(),
        )
        .await?;
        let state = Arc::new(AppState {
            store: store.clone(),
            cache,
            metrics: metrics::Metrics::default(),
            config: config.clone(),
            shutdown: shutdown.clone(),
            risk: risk::RiskGate::new(
                config.clock.clone(),
                store.clone(),
                &config.data_dir,
                shutdown.clone(),
            ),
        });
        namespaces::ensure_system_namespaces(&state).await?;
        tokio::spawn(namespaces::run(state.clone()));
        tokio::spawn(compactor(
            store.clone(),
            config.compaction_interval,
            shutdown.clone(),
        ));

        let app = handlers::router(state.clone());
        let rustls = axum_server::tls_rustls::RustlsConfig::from_config(tls::server_config(&pki)?);
        let handle = axum_server::Handle::new();
        let server = axum_server::bind_rustls(config.listen, rustls).handle(handle.clone());
        let task = tokio::spawn(server.serve(app.into_make_service()));
        let addr = handle
            .listening()
            .await
            .ok_or_else(|| ServerError::Tls(format!("could not listen on {}", config.listen)))?;
        let url = format!("https://{}", addr);
        let admin_config = kubeconfig::render("admin", &url, &pki.ca_pem, &admin_token, None);
        kubeconfig::write(&config.data_dir.join("admin.kubeconfig"), &admin_config)
            .map_err(io_err("writing admin.kubeconfig"))?;
        tracing::info!(%addr, "API server listening");
        Ok(Self {
            addr,
            url,
            ca_pem: pki.ca_pem,
            admin_token,
            state,
            handle,
            task,
        })
    }

    /// A token for a platform component, created on first use and kept in the data dir.
    pub async fn system_token(&self, role: SystemRole) -> Result<String, ServerError> {
        let file = format!("{}.token", Identity::System(role).user().replace(':', "-"));
        let token = bootstrap_token(
            &self.state.store,
            &self.state.config.data_dir,
            &file,
            TokenRecord {
                user: Identity::System(role).user(),
                tenant: None,
                role: Some(role),
                created: now(),
            },
        )
        .await?;
        // Requests are authenticated from the watch cache: usable once it has it.
        let revision = self.state.store.current_revision().await?;
        self.state
            .cache
            .wait_for(revision, Duration::from_secs(5))
            .await?;
        Ok(token)
    }

    /// Stops accepting requests, ends watches, and waits (up to `grace`) for requests
    /// in flight.
    pub async fn shutdown(self, grace: Duration) {
        self.state.shutdown.cancel();
        self.handle.graceful_shutdown(Some(grace));
        let _ = tokio::time::timeout(grace + Duration::from_secs(1), self.task).await;
    }
}

pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Reads a token from `dir/file`, or creates one; makes sure the store knows it.
async fn bootstrap_token(
    store: &DynStore,
    dir: &Path,
    file: &str,
    record: TokenRecord,
) -> Result<String, ServerError> {
    let path = dir.join(file);
    let token = match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
        _ => {
            let t = auth::new_token();
            kubeconfig::write(&path, &t).map_err(io_err(format!("writing {}", path.display())))?;
            t
        }
    };
    let key = auth::token_key(&token);
    if store.get(&key).await?.is_none() {
        let value = serde_json::to_vec(&record).map_err(|e| ServerError::Tls(e.to_string()))?;
        store.create(&key, Bytes::from(value)).await?;
    }
    Ok(token)
}

/// Compacts store history older than one interval, like kube-apiserver does for etcd.
async fn compactor(store: DynStore, every: Duration, shutdown: CancellationToken) {
    let mut previous: Option<i64> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match store.current_revision().await {
            Ok(rev) => {
                if let Some(old) = previous
                    && let Err(e) = store.compact(old).await
                {
                    tracing::warn!(error = %e, revision = old, "compaction failed");
                }
                previous = Some(rev);
            }
            Err(e) => tracing::warn!(error = %e, "compactor cannot read the revision"),
        }
    }
}
