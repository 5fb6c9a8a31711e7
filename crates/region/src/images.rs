//! The region's edge image service: a pull-through cache and mirror for its
//! agents, so an image crosses the long-haul link once per region, not once per
//! node.
//!
//! It speaks the registry API (distribution v2, read side) on the region's port.
//! containerd on each node is pointed at it by a `hosts.toml` mirror entry the
//! agent writes; containerd then adds `?ns=<upstream registry>` to every request,
//! which is how the cache knows where a repository comes from. Blobs and
//! manifests are content-addressed files (written to a temp file and renamed, so
//! a crash never leaves a half blob); concurrent misses for the same object wait
//! for one upstream fetch. Tags are resolved upstream at most once per
//! `tag_ttl`, and when the upstream cannot be reached the last known digest is
//! served (the edge keeps working through a broken long-haul link). Images
//! stored with [`ImageCache::put_local`] (registry host `meridian.local`) are
//! served with no upstream at all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use meridian_oci::registry::RegistryClient;
use meridian_oci::{Image, OciError, Reference, sha256_digest, valid_digest};
use serde::Deserialize;
use tokio::sync::{Mutex, OnceCell};

pub use meridian_oci::LOCAL_REGISTRY;

#[derive(Default)]
pub struct ImageMetrics {
    /// Objects fetched from an upstream registry (manifests and blobs).
    pub upstream_fetches: AtomicU64,
    /// Bytes fetched from upstream registries.
    pub upstream_bytes: AtomicU64,
    /// Requests answered from the cache.
    pub hits: AtomicU64,
    /// Tag lookups answered from the last known digest because the upstream failed.
    pub stale_served: AtomicU64,
    /// Blob bytes removed to keep the cache under its size limit.
    pub evicted_bytes: AtomicU64,
    /// Tags found unchanged upstream by a HEAD (no manifest transferred).
    pub revalidated: AtomicU64,
}

type Flight = Arc<OnceCell<Result<(Bytes, String), String>>>;
/// (ns, repo, tag) → (digest, media type, resolved at).
type TagCache = HashMap<(String, String, String), (String, String, Instant)>;

pub struct ImageCache {
    dir: PathBuf,
    client: RegistryClient,
    tag_ttl: Duration,
    /// Size limit of stored blobs and manifests (`None`: unbounded).
    max_bytes: Option<u64>,
    tags: std::sync::Mutex<TagCache>,
    inflight: Mutex<HashMap<String, Flight>>,
    pub metrics: ImageMetrics,
}

fn oci_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({"errors": [{"code": code, "message": message.into()}]});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

impl ImageCache {
    /// A cache in `dir`; upstream registries listed in `insecure` (and loopback
    /// ones) are reached over plain HTTP.
    pub fn open(dir: &Path, insecure: &[String]) -> std::io::Result<Self> {
        for sub in ["blobs", "manifests", "tags", "tmp", "pinned"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // Leftovers of writes a crash interrupted.
        if let Ok(rd) = std::fs::read_dir(dir.join("tmp")) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let mut client = RegistryClient::new(None);
        for i in insecure {
            client = client.insecure(i.clone());
        }
        Ok(Self {
            dir: dir.to_owned(),
            client,
            tag_ttl: Duration::from_secs(30),
            max_bytes: None,
            tags: Default::default(),
            inflight: Default::default(),
            metrics: ImageMetrics::default(),
        })
    }

    pub fn with_tag_ttl(mut self, ttl: Duration) -> Self {
        self.tag_ttl = ttl;
        self
    }

    /// Keeps stored content under `max` bytes (least recently used blobs go).
    pub fn with_max_bytes(mut self, max: Option<u64>) -> Self {
        self.max_bytes = max;
        self
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs")
            .join(digest.trim_start_matches("sha256:"))
    }

    fn manifest_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("manifests")
            .join(digest.trim_start_matches("sha256:"))
    }

    fn tag_path(&self, ns: &str, repo: &str, tag: &str) -> PathBuf {
        self.dir.join("tags").join(ns).join(repo).join(tag)
    }

    /// Writes `data` to `path` atomically (temp file, fsync, rename).
    fn write_atomic(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)?;
        }
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("{}-{}", std::process::id(), rand_suffix()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    fn store_manifest(&self, bytes: &[u8], media_type: &str) -> std::io::Result<String> {
        let digest = sha256_digest(bytes);
        let path = self.manifest_path(&digest);
        if !path.exists() {
            self.write_atomic(&path.with_extension("type"), media_type.as_bytes())?;
            self.write_atomic(&path, bytes)?;
        }
        Ok(digest)
    }

    fn load_manifest(&self, digest: &str) -> Option<(Bytes, String)> {
        let path = self.manifest_path(digest);
        let bytes = std::fs::read(&path).ok()?;
        let media_type = std::fs::read_to_string(path.with_extension("type"))
            .unwrap_or_else(|_| meridian_oci::MEDIA_MANIFEST.into());
        Some((bytes.into(), media_type))
    }

    /// Stores an image under its full name: `meridian.local/...` images are
    /// served by the region itself; others seed the cache, so nodes can pull them
    /// even when their registry cannot be reached (an OCI archive brought to a
    /// region with no registry access). Returns the manifest digest.
    pub fn import(&self, name: &Reference, image: &Image) -> std::io::Result<String> {
        for (digest, data) in image.blobs() {
            let p = self.blob_path(&digest);
            if !p.exists() {
                self.write_atomic(&p, data)?;
            }
            // Imported content has no upstream to come back from: never evicted.
            self.write_atomic(&self.pin_path(&digest), b"")?;
        }
        let digest = self.store_manifest(&image.manifest, meridian_oci::MEDIA_MANIFEST)?;
        if let Some(tag) = &name.tag {
            self.write_atomic(
                &self.tag_path(&name.registry, &name.repository, tag),
                digest.as_bytes(),
            )?;
        }
        Ok(digest)
    }

    /// Imports every image of an OCI archive (see [`ImageCache::import`]);
    /// returns their names.
    pub fn import_archive(&self, bytes: &[u8]) -> Result<Vec<String>, OciError> {
        let mut names = Vec::new();
        for (name, image) in meridian_oci::archive::read(bytes)? {
            let name = name.ok_or_else(|| OciError::Malformed {
                what: "OCI archive".into(),
                why: "an image has no name annotation (io.containerd.image.name)".into(),
            })?;
            let r = Reference::parse(&name)?;
            self.import(&r, &image)?;
            names.push(r.to_string());
        }
        Ok(names)
    }

    /// One upstream fetch per key at a time; later callers share its result. A
    /// caller that
    /// looked for a stored copy before a flight ended and asks after it has ended
    /// starts a new flight, so `f` must look again for what an earlier flight
    /// stored (ten agents pulling one image together once caused two upstream
    /// fetches of its manifest).
    async fn once<F, Fut>(&self, key: String, f: F) -> Result<(Bytes, String), String>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(Bytes, String), String>>,
    {
        let cell = self
            .inflight
            .lock()
            .await
            .entry(key.clone())
            .or_default()
            .clone();
        let out = cell.get_or_init(f).await.clone();
        let mut map = self.inflight.lock().await;
        if map.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            map.remove(&key);
        }
        out
    }

    /// The manifest `reference` (tag or digest) of `ns/repo`: bytes, media type.
    pub async fn manifest(
        &self,
        ns: &str,
        repo: &str,
        reference: &str,
    ) -> Result<(Bytes, String), (StatusCode, String)> {
        if valid_digest(reference) {
            if let Some(m) = self.load_manifest(reference) {
                self.metrics.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(m);
            }
            if ns == LOCAL_REGISTRY {
                return Err((StatusCode::NOT_FOUND, format!("{repo}@{reference}")));
            }
            let r = upstream_ref(ns, repo)?;
            let digest = reference.to_owned();
            let got = self
                .once(format!("m:{digest}"), || async {
                    // A flight that ended while this one waited to start may have
                    // stored it (see `once`).
                    if let Some(m) = self.load_manifest(&digest) {
                        return Ok(m);
                    }
                    let m = self
                        .client
                        .manifest(&r, &digest)
                        .await
                        .map_err(|e| e.to_string())?;
                    self.count_fetch(m.bytes.len());
                    self.store_manifest(&m.bytes, &m.media_type)
                        .map_err(|e| e.to_string())?;
                    Ok((m.bytes, m.media_type))
                })
                .await;
            return got.map_err(|e| (StatusCode::BAD_GATEWAY, e));
        }
        // A tag.
        let key = (ns.to_owned(), repo.to_owned(), reference.to_owned());
        let fresh = {
            let tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
            tags.get(&key)
                .filter(|(_, _, at)| at.elapsed() < self.tag_ttl)
                .map(|(d, _, _)| d.clone())
        };
        if let Some(d) = fresh
            && let Some(m) = self.load_manifest(&d)
        {
            self.metrics.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(m);
        }
        let tag_file = self.tag_path(ns, repo, reference);
        let last_known = std::fs::read_to_string(&tag_file).ok();
        if ns == LOCAL_REGISTRY {
            return match last_known.and_then(|d| self.load_manifest(d.trim())) {
                Some(m) => {
                    self.metrics.hits.fetch_add(1, Ordering::Relaxed);
                    Ok(m)
                }
                None => Err((
                    StatusCode::NOT_FOUND,
                    format!("{LOCAL_REGISTRY}/{repo}:{reference} is not stored in this region"),
                )),
            };
        }
        let r = upstream_ref(ns, repo)?;
        let tag = reference.to_owned();
        let got = self
            .once(format!("t:{ns}/{repo}:{tag}"), || async {
                // Revalidate what we have with a HEAD: unchanged tags cost no body.
                // Read again here: a flight that ended while this one waited to
                // start may have written the tag (see `once`).
                let known = std::fs::read_to_string(&tag_file)
                    .ok()
                    .or_else(|| last_known.clone());
                let known = known
                    .as_deref()
                    .map(str::trim)
                    .and_then(|d| self.load_manifest(d).map(|m| (d.to_owned(), m)));
                if let Some((d, m)) = known
                    && self
                        .client
                        .manifest_digest(&r, &tag)
                        .await
                        .ok()
                        .flatten()
                        .as_deref()
                        == Some(d.as_str())
                {
                    self.metrics.revalidated.fetch_add(1, Ordering::Relaxed);
                    return Ok(m);
                }
                let m = self
                    .client
                    .manifest(&r, &tag)
                    .await
                    .map_err(|e| e.to_string())?;
                self.count_fetch(m.bytes.len());
                let digest = self
                    .store_manifest(&m.bytes, &m.media_type)
                    .map_err(|e| e.to_string())?;
                let _ = self.write_atomic(&tag_file, digest.as_bytes());
                Ok((m.bytes, m.media_type))
            })
            .await;
        match got {
            Ok((bytes, media_type)) => {
                let digest = sha256_digest(&bytes);
                self.tags
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, (digest, media_type.clone(), Instant::now()));
                Ok((bytes, media_type))
            }
            Err(e) => match last_known.and_then(|d| self.load_manifest(d.trim())) {
                Some(m) => {
                    tracing::warn!(%ns, %repo, tag = %reference, "upstream failed, serving the last known digest: {e}");
                    self.metrics.stale_served.fetch_add(1, Ordering::Relaxed);
                    Ok(m)
                }
                None if e.contains("not found") => Err((StatusCode::NOT_FOUND, e)),
                None => Err((StatusCode::BAD_GATEWAY, e)),
            },
        }
    }

    fn count_fetch(&self, bytes: usize) {
        self.metrics
            .upstream_fetches
            .fetch_add(1, Ordering::Relaxed);
        self.metrics
            .upstream_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A blob of `ns/repo`, from the cache or fetched once from upstream.
    pub async fn blob(
        &self,
        ns: &str,
        repo: &str,
        digest: &str,
    ) -> Result<PathBuf, (StatusCode, String)> {
        if !valid_digest(digest) {
            return Err((StatusCode::BAD_REQUEST, format!("bad digest {digest:?}")));
        }
        let path = self.blob_path(digest);
        if path.exists() {
            self.metrics.hits.fetch_add(1, Ordering::Relaxed);
            // The modification time is the blob's last use, for eviction.
            if let Ok(f) = std::fs::File::options().append(true).open(&path) {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
            return Ok(path);
        }
        if ns == LOCAL_REGISTRY {
            return Err((StatusCode::NOT_FOUND, format!("blob {digest}")));
        }
        let r = upstream_ref(ns, repo)?;
        let d = digest.to_owned();
        let got = self
            .once(format!("b:{d}"), || async {
                // A flight that ended while this one waited to start may have
                // stored it (see `once`).
                if self.blob_path(&d).exists() {
                    return Ok((Bytes::new(), String::new()));
                }
                let bytes = self.client.blob(&r, &d).await.map_err(|e| match e {
                    OciError::NotFound(_) => format!("blob {d} not found"),
                    e => e.to_string(),
                })?;
                self.count_fetch(bytes.len());
                self.write_atomic(&self.blob_path(&d), &bytes)
                    .map_err(|e| e.to_string())?;
                self.evict();
                Ok((Bytes::new(), String::new()))
            })
            .await;
        match got {
            Ok(_) => Ok(path),
            Err(e) if e.contains("not found") => Err((StatusCode::NOT_FOUND, e)),
            Err(e) => Err((StatusCode::BAD_GATEWAY, e)),
        }
    }

    fn pin_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("pinned")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// Bounds the cache: above `max_bytes`, removes least recently used blobs
    /// (not imported ones) down to 90 % of it. Returns the bytes freed.
    pub fn evict(&self) -> u64 {
        let Some(max) = self.max_bytes else {
            return 0;
        };
        let mut used = self.disk_usage();
        if used <= max {
            return 0;
        }
        let target = max / 10 * 9;
        let mut blobs: Vec<(std::time::SystemTime, u64, PathBuf)> =
            std::fs::read_dir(self.dir.join("blobs"))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| !self.dir.join("pinned").join(e.file_name()).exists())
                .filter_map(|e| {
                    let m = e.metadata().ok()?;
                    Some((m.modified().ok()?, m.len(), e.path()))
                })
                .collect();
        blobs.sort();
        let mut freed = 0;
        for (_, len, path) in blobs {
            if used <= target {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                used = used.saturating_sub(len);
                freed += len;
                self.metrics.evicted_bytes.fetch_add(len, Ordering::Relaxed);
            }
        }
        if used > max {
            tracing::warn!(
                used,
                max,
                "image cache over its limit with only imported content left"
            );
        }
        freed
    }

    /// Stored blob and manifest bytes (for metrics and garbage collection).
    pub fn disk_usage(&self) -> u64 {
        let mut total = 0;
        for sub in ["blobs", "manifests"] {
            if let Ok(rd) = std::fs::read_dir(self.dir.join(sub)) {
                total += rd
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum::<u64>();
            }
        }
        total
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

fn upstream_ref(ns: &str, repo: &str) -> Result<Reference, (StatusCode, String)> {
    Reference::parse(&format!("{ns}/{repo}"))
        .map(|mut r| {
            // Keep the repository exactly as asked (no `library/` rewriting twice).
            r.repository = repo.to_owned();
            r
        })
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))
}

#[derive(Deserialize, Default)]
pub struct NsQuery {
    ns: Option<String>,
}

pub fn router(cache: Arc<ImageCache>) -> Router {
    Router::new()
        .route(
            "/v2/",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], "{}") }),
        )
        .route("/v2/{*rest}", get(serve))
        .with_state(cache)
}

async fn serve(
    State(cache): State<Arc<ImageCache>>,
    UrlPath(rest): UrlPath<String>,
    Query(q): Query<NsQuery>,
) -> Response {
    let (repo, kind, object) = match rest
        .rsplit_once("/manifests/")
        .map(|(r, o)| (r, "manifests", o))
        .or_else(|| rest.rsplit_once("/blobs/").map(|(r, o)| (r, "blobs", o)))
    {
        Some(t) => t,
        None => {
            return oci_error(
                StatusCode::NOT_FOUND,
                "UNSUPPORTED",
                "not a registry read path",
            );
        }
    };
    let Some(ns) = q.ns.filter(|n| !n.is_empty()) else {
        return oci_error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "this region mirror needs ?ns=<registry> (containerd adds it for mirrors)",
        );
    };
    if repo.is_empty()
        || repo
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return oci_error(StatusCode::BAD_REQUEST, "NAME_INVALID", format!("{repo:?}"));
    }
    if kind == "manifests" {
        match cache.manifest(&ns, repo, object).await {
            Ok((bytes, media_type)) => {
                let digest = sha256_digest(&bytes);
                (
                    [
                        (header::CONTENT_TYPE, media_type),
                        (
                            header::HeaderName::from_static("docker-content-digest"),
                            digest,
                        ),
                    ],
                    bytes,
                )
                    .into_response()
            }
            Err((code, msg)) => oci_error(code, "MANIFEST_UNKNOWN", msg),
        }
    } else {
        match cache.blob(&ns, repo, object).await {
            Ok(path) => match tokio::fs::File::open(&path).await {
                Ok(f) => {
                    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
                    let body = Body::from_stream(tokio_util::io::ReaderStream::new(f));
                    (
                        [
                            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                            (header::CONTENT_LENGTH, len.to_string()),
                            (
                                header::HeaderName::from_static("docker-content-digest"),
                                object.to_owned(),
                            ),
                        ],
                        body,
                    )
                        .into_response()
                }
                Err(e) => oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()),
            },
            Err((code, msg)) => oci_error(code, "BLOB_UNKNOWN", msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_removes_least_recently_used_blobs_but_never_imported_ones() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::open(dir.path(), &[])
            .unwrap()
            .with_max_bytes(Some(3_500));
        // An imported image (pinned), then five cached blobs of 1000 bytes, oldest first.
        let img = meridian_oci::build::image(&[], &Default::default()).unwrap();
        let local = Reference::parse("meridian.local/x:1").unwrap();
        cache.import(&local, &img).unwrap();
        let pinned: Vec<String> = img.blobs().into_iter().map(|(d, _)| d).collect();
        let mut cached = Vec::new();
        for i in 0..5u8 {
            let data = vec![i; 1000];
            let d = sha256_digest(&data);
            let p = cache.blob_path(&d);
            cache.write_atomic(&p, &data).unwrap();
            let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 + i as u64);
            std::fs::File::options()
                .append(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
            cached.push(d);
        }
        assert!(cache.disk_usage() > 3_500);
        let freed = cache.evict();
        assert!(freed >= 2_000, "{freed}");
        assert!(cache.disk_usage() <= 3_500 / 10 * 9);
        assert!(!cache.blob_path(&cached[0]).exists(), "oldest first");
        assert!(cache.blob_path(&cached[4]).exists(), "newest kept");
        for d in pinned {
            assert!(cache.blob_path(&d).exists(), "imported content stays");
        }
    }
}
