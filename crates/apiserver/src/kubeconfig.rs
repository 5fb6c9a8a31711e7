//! kubeconfig files for admins and tenants.

use std::path::Path;

use base64::Engine;
use kube::config::{
    AuthInfo, Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext,
};

/// A kubeconfig for `server` (an https URL) that trusts `ca_pem` and sends `token`.
pub fn render(
    name: &str,
    server: &str,
    ca_pem: &str,
    token: &str,
    namespace: Option<&str>,
) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let config = Kubeconfig {
        api_version: Some("v1".into()),
        kind: Some("Config".into()),
        clusters: vec![NamedCluster {
            name: "meridian".into(),
            cluster: Some(Cluster {
                server: Some(server.into()),
                certificate_authority_data: Some(ca),
                ..Default::default()
            }),
            ..Default::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: name.into(),
            auth_info: Some(AuthInfo {
                token: Some(token.to_owned().into()),
                ..Default::default()
            }),
            ..Default::default()
        }],
        contexts: vec![NamedContext {
            name: name.into(),
            context: Some(Context {
                cluster: "meridian".into(),
                user: Some(name.into()),
                namespace: namespace.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        }],
        current_context: Some(name.into()),
        ..Default::default()
    };
    serde_yaml::to_string(&config).unwrap_or_default()
}

/// Writes a kubeconfig readable only by its owner.
pub fn write(path: &Path, contents: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    meridian_pki::write_private(path, contents.as_bytes()).map_err(std::io::Error::other)
}
