//! The server's PKI: a CA and a serving certificate, generated on first start and kept
//! in the data directory so kubeconfigs stay valid across restarts.

use std::path::Path;
use std::sync::Arc;

use crate::ServerError;

pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

fn io(what: &str, e: impl std::fmt::Display) -> ServerError {
    ServerError::Tls(format!("{what}: {e}"))
}

/// Loads the PKI from `dir/pki`, creating it on first start. The serving certificate
/// is valid for `hosts` (names or IP addresses) plus localhost and 127.0.0.1.
pub fn ensure(dir: &Path, hosts: &[String]) -> Result<Pki, ServerError> {
    let pki = dir.join("pki");
    let ca = meridian_pki::Ca::load_or_create(&pki, "meridian-ca").map_err(|e| io("CA", e))?;
    let (crt, key) = (pki.join("server.crt"), pki.join("server.key"));
    if crt.exists() && key.exists() {
        let read =
            |p: &Path| std::fs::read_to_string(p).map_err(|e| io(&p.display().to_string(), e));
        return Ok(Pki {
            ca_pem: ca.cert_pem,
            cert_pem: read(&crt)?,
            key_pem: read(&key)?,
        });
    }
    let pair = ca
        .serving("meridian-apiserver", hosts)
        .map_err(|e| io("server cert", e))?;
    meridian_pki::write_private(&key, pair.key_pem.as_bytes()).map_err(|e| io("server key", e))?;
    meridian_pki::write_private(&crt, pair.cert_pem.as_bytes())
        .map_err(|e| io("server cert", e))?;
    Ok(Pki {
        ca_pem: ca.cert_pem,
        cert_pem: pair.cert_pem,
        key_pem: pair.key_pem,
    })
}

/// A rustls server configuration for the PKI (HTTP/2 and HTTP/1.1).
pub fn server_config(pki: &Pki) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(pki.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| io("server cert pem", e))?;
    let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes())
        .map_err(|e| io("server key pem", e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| io("tls versions", e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| io("tls config", e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
