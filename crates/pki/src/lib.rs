//! Node identity for the edge: the cluster CA, node certificates signed from CSRs,
//! and mutual-TLS serving that hands each request the identity of its peer.
//!
//! A node certificate names the node (`CN`) and the region it was assigned to
//! (`OU`), under the organisation [`NODES_ORG`]. Regions trust the CA and nothing
//! else: a certificate lets a node act as itself in its region and as nobody else.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest;

mod serve;
pub use serve::{Peer, serve};

/// Organisation of node certificates.
pub const NODES_ORG: &str = "meridian:nodes";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Cert(String),
    #[error("certificate signing request: {0}")]
    Csr(String),
}

fn cert_err(what: &str, e: impl std::fmt::Display) -> PkiError {
    PkiError::Cert(format!("{what}: {e}"))
}

/// Writes `contents` to `path` with mode 0600: temp file, fsync, rename.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        what: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// A certificate and its private key, PEM.
#[derive(Clone, Debug)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster CA: signs node and serving certificates.
pub struct Ca {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Loads `dir/ca.crt` and `dir/ca.key`, creating them on first use.
    pub fn load_or_create(dir: &Path, common_name: &str) -> Result<Self, PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            what: dir.display().to_string(),
            source,
        })?;
        let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        if crt.exists() && key.exists() {
            let read = |p: &Path| {
                std::fs::read_to_string(p).map_err(|source| PkiError::Io {
                    what: p.display().to_string(),
                    source,
                })
            };
            let cert_pem = read(&crt)?;
            let kp = KeyPair::from_pem(&read(&key)?).map_err(|e| cert_err("CA key", e))?;
            let issuer =
                Issuer::from_ca_cert_pem(&cert_pem, kp).map_err(|e| cert_err("CA cert", e))?;
            return Ok(Self { cert_pem, issuer });
        }
        let kp = KeyPair::generate().map_err(|e| cert_err("CA key", e))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| cert_err("CA", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_after = rcgen::date_time_ymd(2046, 1, 1);
        let cert = params.self_signed(&kp).map_err(|e| cert_err("CA", e))?;
        write_private(&key, kp.serialize_pem().as_bytes())?;
        write_private(&crt, cert.pem().as_bytes())?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, kp),
        })
    }

    /// `sha256:<hex>` of the CA certificate (DER): what joining agents pin.
    pub fn hash(&self) -> String {
        ca_hash(&self.cert_pem).unwrap_or_default()
    }

    /// A serving certificate for `hosts` (names or IP addresses), with a new key.
    pub fn serving(&self, common_name: &str, hosts: &[String]) -> Result<CertPair, PkiError> {
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        for h in hosts {
            if !names.contains(h) {
                names.push(h.clone());
            }
        }
        let key = KeyPair::generate().map_err(|e| cert_err("serving key", e))?;
        let mut params = CertificateParams::new(names).map_err(|e| cert_err("serving", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_after = rcgen::date_time_ymd(2046, 1, 1);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| cert_err("serving", e))?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a node's CSR. Only the CSR's key is used: the identity (node, region)
    /// and the validity are the CA's to decide, whatever the request asked for.
    pub fn sign_node(
        &self,
        csr_pem: &str,
        node: &str,
        region: &str,
        ttl: Duration,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Csr(e.to_string()))?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| cert_err("node certificate", e))?;
        params.distinguished_name.push(DnType::CommonName, node);
        params
            .distinguished_name
            .push(DnType::OrganizationName, NODES_ORG);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, region);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::seconds(ttl.as_secs().max(1) as i64);
        let mut serial: [u8; 16] = rand::random();
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| cert_err("node certificate", e))?;
        Ok(cert.pem())
    }
}

/// A new node key and a CSR for it (the CA ignores the CSR's subject).
pub fn node_key_and_csr(node: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(|e| cert_err("node key", e))?;
    let csr = csr_for(&key.serialize_pem(), node)?;
    Ok((key.serialize_pem(), csr))
}

/// A CSR for an existing key (renewal keeps the key).
pub fn csr_for(key_pem: &str, node: &str) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| cert_err("node key", e))?;
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| cert_err("csr", e))?;
    params.distinguished_name.push(DnType::CommonName, node);
    params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| PkiError::Csr(e.to_string()))
}

/// `sha256:<hex>` of the first certificate in `pem` (its DER).
pub fn ca_hash(pem: &str) -> Result<String, PkiError> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| cert_err("CA pem", e))?;
    let digest = sha2::Sha256::digest(der.as_ref());
    Ok(format!("sha256:{}", hex(&digest)))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Who a node certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node: String,
    pub region: String,
    pub not_after: SystemTime,
    pub not_before: SystemTime,
}

/// Reads the node identity of a certificate (DER) already verified by TLS.
/// `None` when it is not a node certificate.
pub fn node_identity(der: &[u8]) -> Option<NodeIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let first = |mut it: Box<
        dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue> + '_,
    >| { it.next().and_then(|a| a.as_str().ok()).map(str::to_owned) };
    let org = first(Box::new(subject.iter_organization()))?;
    if org != NODES_ORG {
        return None;
    }
    let node = first(Box::new(subject.iter_common_name()))?;
    let region = first(Box::new(subject.iter_organizational_unit()))?;
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Some(NodeIdentity {
        node,
        region,
        not_after: at(cert.validity().not_after.timestamp()),
        not_before: at(cert.validity().not_before.timestamp()),
    })
}

/// The node identity of a PEM certificate (e.g. the agent's own, to know when to renew).
pub fn node_identity_pem(pem: &str) -> Option<NodeIdentity> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    node_identity(der.as_ref())
}

/// A rustls server configuration. With `client_ca`, clients may present a
/// certificate signed by it (verified by TLS); whether one is required is the
/// handler's decision, so one port serves probes, images and node streams.
pub fn server_config(
    pair: &CertPair,
    client_ca: Option<&str>,
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err("serving cert pem", e))?;
    let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes())
        .map_err(|e| cert_err("serving key pem", e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| cert_err("tls versions", e))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots
                    .add(c.map_err(|e| cert_err("client CA pem", e))?)
                    .map_err(|e| cert_err("client CA", e))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| cert_err("client verifier", e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| cert_err("tls config", e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_node_certificate_names_the_node_and_region_the_ca_chose() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "test-ca").unwrap();
        let (_key, csr) = node_key_and_csr("i-want-to-be-someone-else").unwrap();
        let pem = ca
            .sign_node(&csr, "paris-1", "eu-west", Duration::from_secs(3600))
            .unwrap();
        let id = node_identity_pem(&pem).unwrap();
        assert_eq!(
            (id.node.as_str(), id.region.as_str()),
            ("paris-1", "eu-west")
        );
        let left = id.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));
        // Reloading keeps the same CA.
        let again = Ca::load_or_create(dir.path(), "test-ca").unwrap();
        assert_eq!(again.hash(), ca.hash());
        assert!(ca.hash().starts_with("sha256:") && ca.hash().len() == 71);
    }

    #[test]
    fn garbage_csrs_and_serving_certs_are_not_identities() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "test-ca").unwrap();
        assert!(matches!(
            ca.sign_node("not a csr", "n", "r", Duration::from_secs(1)),
            Err(PkiError::Csr(_))
        ));
        let serving = ca.serving("eu-west", &[]).unwrap();
        assert_eq!(node_identity_pem(&serving.cert_pem), None);
    }
}
