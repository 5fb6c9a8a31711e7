//! Integration tests: a real server (embedded store on disk, TLS on loopback) driven
//! by real clients (the `kube` crate; raw HTTPS for malformed input).

mod bad_input;
mod placement;
mod risk;
mod tenancy;
mod verbs;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use meridian_apiserver::{Server, ServerConfig};
use meridian_store::EmbeddedStore;
use serde_json::json;
use tempfile::TempDir;

pub struct TestServer {
    pub server: Server,
    _dir: TempDir,
}

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> Self {
        install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
        let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path());
        config.bookmark_interval = Duration::from_millis(300);
        tweak(&mut config);
        let server = Server::start(config, store).await.unwrap();
        Self { server, _dir: dir }
    }

    pub fn client(&self, token: &str) -> kube::Client {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let ca = CertificateDer::pem_slice_iter(self.server.ca_pem.as_bytes())
            .map(|c| c.unwrap().to_vec())
            .collect();
        let mut config = kube::Config::new(self.server.url.parse().unwrap());
        config.root_cert = Some(ca);
        config.auth_info.token = Some(token.to_owned().into());
        // Like Meridian's own components: a 429 from risk control is an answer,
        // not something to sit on for minutes of client-side retries.
        config.default_retry = false;
        config.default_namespace = "default".into();
        kube::Client::try_from(config).unwrap()
    }

    pub fn admin(&self) -> kube::Client {
        self.client(&self.server.admin_token)
    }

    /// Creates a tenant and returns a client holding one of its tokens.
    pub async fn tenant(&self, name: &str) -> kube::Client {
        let api = tenants(self.admin());
        let t: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "meridian.io/v1alpha1", "kind": "Tenant", "metadata": {"name": name}}))
        .unwrap();
        api.create(&PostParams::default(), &t).await.unwrap();
        let issued: serde_json::Value = api
            .create_subresource("token", name, &PostParams::default(), &json!({}))
            .await
            .unwrap();
        self.client(issued["status"]["token"].as_str().unwrap())
    }

    /// A raw HTTPS client trusting the server's CA, for requests kube would not send.
    pub fn raw(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.server.ca_pem.as_bytes()).unwrap(),
            )
            .build()
            .unwrap()
    }

    pub async fn revision(&self) -> i64 {
        self.server.state.store.current_revision().await.unwrap()
    }
}

pub fn tenants(client: kube::Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("meridian.io", "v1alpha1", "Tenant");
    Api::all_with(client, &ApiResource::from_gvk_with_plural(&gvk, "tenants"))
}

pub async fn create_namespace(client: &kube::Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    api.create(&PostParams::default(), &ns).await.unwrap();
}

pub fn pod(name: &str, labels: serde_json::Value) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]}
    }))
    .unwrap()
}

/// Polls `f` until it holds (at most 20 s).
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}
