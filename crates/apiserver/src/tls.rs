//! The server's PKI: a CA and a serving certificate, generated on first start and kept
//! in the data directory so kubeconfigs stay valid across restarts.

use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::ServerError;

pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

fn io(what: &str, e: impl std::fmt::Display) -> ServerError {
    ServerError::Tls(format!("{what}: {e}"))
}

fn write_private(path: &Path, contents: &str) -> Result<(), ServerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io(&tmp.display().to_string(), e))?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| io(&tmp.display().to_string(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(&path.display().to_string(), e))
}

/// Loads the PKI from `dir/pki`, creating it on first start. The serving certificate
/// is valid for `hosts` (names or IP addresses) plus localhost and 127.0.0.1.
pub fn ensure(dir: &Path, hosts: &[String]) -> Result<Pki, ServerError> {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).map_err(|e| io("creating pki dir", e))?;
    let paths = ["ca.crt", "ca.key", "server.crt", "server.key"].map(|f| pki.join(f));
    if paths.iter().all(|p| p.exists()) {
        let read =
            |p: &Path| std::fs::read_to_string(p).map_err(|e| io(&p.display().to_string(), e));
        return Ok(Pki {
            ca_pem: read(&paths[0])?,
            cert_pem: read(&paths[2])?,
            key_pem: read(&paths[3])?,
        });
    }
    let ca_key = KeyPair::generate().map_err(|e| io("CA key", e))?;
    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| io("CA params", e))?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "meridian-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| io("CA cert", e))?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    let key = KeyPair::generate().map_err(|e| io("server key", e))?;
    let mut params = CertificateParams::new(names).map_err(|e| io("server params", e))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "meridian-apiserver");
    params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| io("server cert", e))?;

    let out = Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    write_private(&paths[1], &issuer.key().serialize_pem())?;
    write_private(&paths[0], &out.ca_pem)?;
    write_private(&paths[3], &out.key_pem)?;
    write_private(&paths[2], &out.cert_pem)?;
    Ok(out)
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
