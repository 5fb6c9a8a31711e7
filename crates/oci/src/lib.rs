//! OCI images without Docker: build a small image from files (a busybox image for
//! tests and demos), read and write OCI image archives (`oci-layout` tarballs, what
//! `skopeo copy oci-archive:` and `docker save` since 25 produce), and a client for
//! the registry HTTP API (distribution v2) that pushes and pulls.

pub mod archive;
pub mod build;
pub mod reference;
pub mod registry;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub use reference::Reference;

/// The registry host of images a region serves itself (no upstream).
pub const LOCAL_REGISTRY: &str = "meridian.local";

pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("invalid image reference {reference:?}: {why}")]
    Reference { reference: String, why: String },
    #[error("registry {registry}: {message}")]
    Registry {
        registry: String,
        /// HTTP status when the registry answered.
        status: Option<u16>,
        message: String,
    },
    #[error("image {0} not found")]
    NotFound(String),
    #[error("unauthorized at {0}: credentials missing or wrong")]
    Unauthorized(String),
    #[error("blob {digest} does not match its content (got {actual})")]
    DigestMismatch { digest: String, actual: String },
    #[error("malformed {what}: {why}")]
    Malformed { what: String, why: String },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let sum = Sha256::digest(bytes);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in sum {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Whether `d` is a well-formed `sha256:` digest (so it can name a file or a URL path).
pub fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    pub fn of(media_type: &str, bytes: &[u8]) -> Self {
        Self {
            media_type: media_type.into(),
            digest: sha256_digest(bytes),
            size: bytes.len() as u64,
            annotations: None,
            platform: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// The Go architecture name of this machine (`amd64`, `arm64`).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// An image held in memory: manifest, config and layer blobs.
#[derive(Clone, Debug)]
pub struct Image {
    pub manifest: Vec<u8>,
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
}

impl Image {
    pub fn manifest_descriptor(&self) -> Descriptor {
        Descriptor::of(MEDIA_MANIFEST, &self.manifest)
    }

    pub fn parsed_manifest(&self) -> Result<Manifest, OciError> {
        serde_json::from_slice(&self.manifest).map_err(|e| OciError::Malformed {
            what: "manifest".into(),
            why: e.to_string(),
        })
    }

    /// Every blob with its digest: config first, then layers.
    pub fn blobs(&self) -> Vec<(String, &[u8])> {
        std::iter::once(&self.config)
            .chain(&self.layers)
            .map(|b| (sha256_digest(b), b.as_slice()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_sha256_of_the_bytes_and_validated() {
        let d = sha256_digest(b"");
        assert_eq!(
            d,
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(valid_digest(&d));
        assert!(!valid_digest("sha256:../../etc/passwd"));
        assert!(!valid_digest(&d.to_uppercase()));
        assert!(!valid_digest("md5:abc"));
    }
}
