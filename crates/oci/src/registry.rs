//! A registry client for the distribution v2 HTTP API: push an [`Image`], fetch
//! manifests and blobs (verified against their digest), basic-auth credentials.
//! Token (Bearer) auth servers are not supported yet: the registries an edge
//! provider runs for its tenants sit behind basic auth or none.

use bytes::Bytes;
use reqwest::StatusCode;

use crate::{
    DOCKER_LIST, DOCKER_MANIFEST, Image, Index, MEDIA_INDEX, MEDIA_MANIFEST, Manifest, OciError,
    Reference,
};

/// Manifest kinds a pull accepts, in preference order.
pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    credentials: Option<Credentials>,
    /// Registries spoken to over plain HTTP (besides loopback ones, always).
    insecure: Vec<String>,
}

/// A fetched manifest (or index) with its media type and digest.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: String,
}

impl RegistryClient {
    pub fn new(credentials: Option<Credentials>) -> Self {
        Self {
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(10))
                .build()
                .expect("reqwest client"),
            credentials,
            insecure: Vec::new(),
        }
    }

    /// Speak plain HTTP to `registry` (`host:port`).
    pub fn insecure(mut self, registry: impl Into<String>) -> Self {
        self.insecure.push(registry.into());
        self
    }

    fn base(&self, r: &Reference) -> String {
        let host = &r.registry;
        let plain = self.insecure.iter().any(|i| i == host)
            || host.starts_with("127.")
            || host.starts_with("localhost")
            || host.starts_with("[::1]");
        let scheme = if plain { "http" } else { "https" };
        let host = if host == "docker.io" {
            "registry-1.docker.io"
        } else {
            host
        };
        format!("{scheme}://{host}/v2/{}", r.repository)
    }

    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let b = self.http.request(method, url);
        match &self.credentials {
            Some(c) => b.basic_auth(&c.username, Some(&c.password)),
            None => b,
        }
    }

    fn error(r: &Reference, status: StatusCode, body: &str) -> OciError {
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                OciError::Unauthorized(r.registry.clone())
            }
            StatusCode::NOT_FOUND => OciError::NotFound(r.to_string()),
            s => OciError::Registry {
                registry: r.registry.clone(),
                status: Some(s.as_u16()),
                message: format!("{s}: {}", body.chars().take(300).collect::<String>()),
            },
        }
    }

    fn transport(r: &Reference, e: reqwest::Error) -> OciError {
        OciError::Registry {
            registry: r.registry.clone(),
            status: None,
            message: format!("cannot reach the registry: {e}"),
        }
    }

    /// Sends `b`; a response whose status is not `ok` becomes an error.
    async fn send(
        r: &Reference,
        b: reqwest::RequestBuilder,
        ok: fn(StatusCode) -> bool,
    ) -> Result<reqwest::Response, OciError> {
        let resp = b.send().await.map_err(|e| Self::transport(r, e))?;
        if ok(resp.status()) {
            return Ok(resp);
        }
        let s = resp.status();
        Err(Self::error(r, s, &resp.text().await.unwrap_or_default()))
    }

    /// Uploads every blob the registry lacks, then the manifest under the
    /// reference's tag. Returns the manifest digest.
    pub async fn push(&self, r: &Reference, image: &Image) -> Result<String, OciError> {
        let base = self.base(r);
        for (digest, data) in image.blobs() {
            let head = self
                .req(reqwest::Method::HEAD, &format!("{base}/blobs/{digest}"))
                .send()
                .await
                .map_err(|e| Self::transport(r, e))?;
            if head.status().is_success() {
                continue;
            }
            let start = Self::send(
                r,
                self.req(reqwest::Method::POST, &format!("{base}/blobs/uploads/")),
                |s| s == StatusCode::ACCEPTED,
            )
            .await?;
            let loc = start
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| OciError::Registry {
                    registry: r.registry.clone(),
                    status: Some(202),
                    message: "upload started without a Location".into(),
                })?
                .to_owned();
            let loc = if loc.starts_with('/') {
                let origin = base.split("/v2/").next().unwrap_or_default();
                format!("{origin}{loc}")
            } else {
                loc
            };
            let sep = if loc.contains('?') { '&' } else { '?' };
            Self::send(
                r,
                self.req(reqwest::Method::PUT, &format!("{loc}{sep}digest={digest}"))
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .body(data.to_vec()),
                |s| s == StatusCode::CREATED,
            )
            .await?;
        }
        let tag = r.tag.as_deref().unwrap_or("latest");
        Self::send(
            r,
            self.req(reqwest::Method::PUT, &format!("{base}/manifests/{tag}"))
                .header(reqwest::header::CONTENT_TYPE, MEDIA_MANIFEST)
                .body(image.manifest.clone()),
            |s| s == StatusCode::CREATED,
        )
        .await?;
        Ok(crate::sha256_digest(&image.manifest))
    }

    /// The manifest or index the reference names (by tag or digest).
    pub async fn manifest(&self, r: &Reference, object: &str) -> Result<FetchedManifest, OciError> {
        let resp = Self::send(
            r,
            self.req(
                reqwest::Method::GET,
                &format!("{}/manifests/{object}", self.base(r)),
            )
            .header(reqwest::header::ACCEPT, ACCEPT_MANIFESTS),
            |s| s.is_success(),
        )
        .await?;
        let media_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(MEDIA_MANIFEST)
            .to_owned();
        let bytes = resp.bytes().await.map_err(|e| Self::transport(r, e))?;
        let digest = crate::sha256_digest(&bytes);
        if object.starts_with("sha256:") && object != digest {
            return Err(OciError::DigestMismatch {
                digest: object.into(),
                actual: digest,
            });
        }
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// The digest the registry gives for a manifest (HEAD, no body), when it
    /// says (`Docker-Content-Digest`).
    pub async fn manifest_digest(
        &self,
        r: &Reference,
        object: &str,
    ) -> Result<Option<String>, OciError> {
        let resp = Self::send(
            r,
            self.req(
                reqwest::Method::HEAD,
                &format!("{}/manifests/{object}", self.base(r)),
            )
            .header(reqwest::header::ACCEPT, ACCEPT_MANIFESTS),
            |s| s.is_success(),
        )
        .await?;
        Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .filter(|d| crate::valid_digest(d))
            .map(String::from))
    }

    /// A blob, checked against its digest.
    pub async fn blob(&self, r: &Reference, digest: &str) -> Result<Bytes, OciError> {
        if !crate::valid_digest(digest) {
            return Err(OciError::Malformed {
                what: "digest".into(),
                why: format!("{digest:?} is not sha256:<hex>"),
            });
        }
        let resp = Self::send(
            r,
            self.req(
                reqwest::Method::GET,
                &format!("{}/blobs/{digest}", self.base(r)),
            ),
            |s| s.is_success(),
        )
        .await?;
        let bytes = resp.bytes().await.map_err(|e| Self::transport(r, e))?;
        let actual = crate::sha256_digest(&bytes);
        if actual != digest {
            return Err(OciError::DigestMismatch {
                digest: digest.into(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// The whole image for this machine's platform (an index is resolved).
    pub async fn pull(&self, r: &Reference) -> Result<Image, OciError> {
        let mut m = self.manifest(r, r.object()).await?;
        if m.media_type.starts_with(MEDIA_INDEX) || m.media_type.starts_with(DOCKER_LIST) {
            let index: Index =
                serde_json::from_slice(&m.bytes).map_err(|e| OciError::Malformed {
                    what: "image index".into(),
                    why: e.to_string(),
                })?;
            let pick = index
                .manifests
                .iter()
                .find(|d| {
                    d.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == crate::host_arch())
                })
                .ok_or_else(|| {
                    OciError::NotFound(format!("{r} for linux/{}", crate::host_arch()))
                })?;
            m = self.manifest(r, &pick.digest.clone()).await?;
        }
        if !(m.media_type.starts_with(MEDIA_MANIFEST) || m.media_type.starts_with(DOCKER_MANIFEST))
        {
            return Err(OciError::Malformed {
                what: "manifest".into(),
                why: format!("unsupported media type {}", m.media_type),
            });
        }
        let parsed: Manifest =
            serde_json::from_slice(&m.bytes).map_err(|e| OciError::Malformed {
                what: "manifest".into(),
                why: e.to_string(),
            })?;
        let config = self.blob(r, &parsed.config.digest).await?.to_vec();
        let mut layers = Vec::new();
        for l in &parsed.layers {
            layers.push(self.blob(r, &l.digest).await?.to_vec());
        }
        Ok(Image {
            manifest: m.bytes.to_vec(),
            config,
            layers,
        })
    }
}
