//! The watch cache: an in-memory copy of every object, kept in step with the store by
//! one store watch, from which all lists and watches are served.
//!
//! One writer (the task in [`Cache::start`]) applies store events; readers take an O(1)
//! snapshot (a persistent ordered map) and never block the writer. Recent events are
//! kept in a ring so watches can resume from a resourceVersion; older ones get 410.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use imbl::OrdMap;
use meridian_api::meridian::REGION_LABEL;
use meridian_api::resources::{RESOURCES, field_text, field_value};
use meridian_store::{DynStore, EventType, KeyValue, Revision, StoreError};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

/// Everything under this prefix is cached.
pub const ROOT: &str = "/registry/";

/// One cached object, rendered once.
///
/// What lists and watches filter on (name, namespace, labels, selectable fields) is
/// kept in one allocation beside the JSON: with a million pods, a map of labels and
/// a box per string were a third of the cache's memory.
#[derive(Debug)]
pub struct CachedObject {
    pub key: Arc<str>,
    pub mod_revision: Revision,
    meta: Packed,
    /// The object as JSON with `metadata.resourceVersion` set.
    pub json: Bytes,
}

/// Strings in one allocation: a header (label count, field count, whether there
/// is a namespace), then the name, the namespace, the labels' keys and values in
/// key order and the fields' paths and values, each preceded by its length.
#[derive(Debug)]
struct Packed(Box<[u8]>);

const PACKED_HEADER: usize = 5;

impl Packed {
    fn new<'a, 'b>(
        name: &str,
        namespace: Option<&str>,
        labels: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
        fields: impl ExactSizeIterator<Item = (&'b str, &'b str)>,
    ) -> Packed {
        let nl = u16::try_from(labels.len()).unwrap_or(u16::MAX);
        let nf = u16::try_from(fields.len()).unwrap_or(u16::MAX);
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&nl.to_le_bytes());
        out.extend_from_slice(&nf.to_le_bytes());
        out.push(u8::from(namespace.is_some()));
        let mut put = |s: &str| {
            let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&s.as_bytes()[..len as usize]);
        };
        put(name);
        if let Some(ns) = namespace {
            put(ns);
        }
        for (k, v) in labels.take(usize::from(nl)) {
            put(k);
            put(v);
        }
        for (p, v) in fields.take(usize::from(nf)) {
            put(p);
            put(v);
        }
        Packed(out.into_boxed_slice())
    }

    fn counts(&self) -> (usize, usize, bool) {
        let b = &self.0;
        (
            usize::from(u16::from_le_bytes([b[0], b[1]])),
            usize::from(u16::from_le_bytes([b[2], b[3]])),
            b[4] == 1,
        )
    }

    /// Every string, in order.
    fn strs(&self) -> impl Iterator<Item = &str> {
        let mut rest = &self.0[PACKED_HEADER..];
        std::iter::from_fn(move || {
            let (len, tail) = rest.split_first_chunk::<4>()?;
            let len = u32::from_le_bytes(*len) as usize;
            let (s, tail) = tail.split_at_checked(len)?;
            rest = tail;
            // Written from `&str`s cut at their own length: always valid.
            Some(std::str::from_utf8(s).unwrap_or_default())
        })
    }

    fn pairs(&self, skip: usize, n: usize) -> impl Iterator<Item = (&str, &str)> {
        let mut it = self.strs().skip(skip);
        std::iter::from_fn(move || Some((it.next()?, it.next()?))).take(n)
    }
}

impl CachedObject {
    pub fn new<'a, 'b>(
        key: Arc<str>,
        mod_revision: Revision,
        name: &str,
        namespace: Option<&str>,
        labels: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
        fields: impl ExactSizeIterator<Item = (&'b str, &'b str)>,
        json: Bytes,
    ) -> CachedObject {
        CachedObject {
            key,
            mod_revision,
            meta: Packed::new(name, namespace, labels, fields),
            json,
        }
    }

    pub fn name(&self) -> &str {
        self.meta.strs().next().unwrap_or_default()
    }

    /// The stored (physical) namespace, for namespaced objects.
    pub fn namespace(&self) -> Option<&str> {
        let (_, _, has) = self.meta.counts();
        has.then(|| self.meta.strs().nth(1).unwrap_or_default())
    }

    /// The labels, in key order.
    pub fn labels(&self) -> impl Iterator<Item = (&str, &str)> {
        let (nl, _, has) = self.meta.counts();
        self.meta.pairs(1 + usize::from(has), nl)
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Values of the field paths this resource supports in field selectors.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        let (nl, nf, has) = self.meta.counts();
        self.meta.pairs(1 + usize::from(has) + 2 * nl, nf)
    }

    pub fn field(&self, path: &str) -> Option<&str> {
        match path {
            "metadata.name" => Some(self.name()),
            "metadata.namespace" => self.namespace(),
            _ => self.fields().find(|(p, _)| *p == path).map(|(_, v)| v),
        }
    }

    /// Parses the object (for read-modify-write paths).
    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.json).unwrap_or(Value::Null)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchKind {
    Added,
    Modified,
    Deleted,
}

impl WatchKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WatchKind::Added => "ADDED",
            WatchKind::Modified => "MODIFIED",
            WatchKind::Deleted => "DELETED",
        }
    }
}

/// One change, as watchers see it.
#[derive(Debug)]
pub struct CacheEvent {
    pub kind: WatchKind,
    pub revision: Revision,
    /// The new state (for deletions: the last state, at the deleting revision).
    pub object: Arc<CachedObject>,
    /// The state before, when there was one.
    pub prev: Option<Arc<CachedObject>>,
}

/// A consistent view of the cache at one revision.
#[derive(Clone)]
pub struct Snapshot {
    pub revision: Revision,
    pub objects: OrdMap<Arc<str>, Arc<CachedObject>>,
}

impl Snapshot {
    /// Objects whose key starts with `prefix`, strictly after `after` when given.
    pub fn range<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Arc<CachedObject>> + 'a {
        let start: Arc<str> = match after {
            Some(a) if a >= prefix => Arc::from(a),
            _ => Arc::from(prefix),
        };
        let skip_first = after.is_some_and(|a| a >= prefix);
        self.objects
            .range(start..)
            .skip_while(move |(k, _)| skip_first && Some(&***k) == after)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
    }

    pub fn get(&self, key: &str) -> Option<&Arc<CachedObject>> {
        self.objects.get(key)
    }
}

struct State {
    snapshot: Snapshot,
    /// Recent events and when each was applied.
    ring: VecDeque<(Instant, Arc<CacheEvent>)>,
    /// Every event after this revision is in `ring` (older ones are gone: 410).
    window_start: Revision,
}

/// Errors a watch can start with.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("too old resource version: {requested} ({oldest})")]
    TooOld {
        requested: Revision,
        oldest: Revision,
    },
    #[error("timed out waiting for the cache to reach resource version {0}")]
    NotYet(Revision),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("starting the watch cache's thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Runs the future `make` gives on a new thread named `name`, on a
/// current-thread runtime of its own: a loop that must keep up under load gets
/// the kernel's share of the CPU instead of a turn among a loaded runtime's tasks.
pub fn on_own_thread<F, Fut>(name: &str, make: F) -> std::io::Result<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let what = name.to_owned();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(make()),
                Err(e) => tracing::error!(error = %e, "{what}: no runtime for its thread"),
            }
        })
        .map(drop)
}

/// The most the ring grows beyond its capacity to keep `ring_min_age` of events.
const RING_STRETCH: usize = 4;

pub struct Cache {
    state: RwLock<State>,
    events: broadcast::Sender<Arc<CacheEvent>>,
    revision: watch::Sender<Revision>,
    ring_capacity: usize,
    /// Events younger than this stay in the ring beyond `ring_capacity` (up to
    /// [`RING_STRETCH`] times it).
    ring_min_age: Duration,
    /// Snapshots of paginated lists still being read, newest last: every page of
    /// a list comes from the revision of its first page, as in Kubernetes.
    pinned: std::sync::Mutex<VecDeque<Pin>>,
}

/// A paginated list's snapshot is kept this long after a page was read.
const PIN_TTL: Duration = Duration::from_secs(300);
/// ... and this long after its last page was read (another list may have begun at
/// the same revision). A snapshot holds every object replaced since it was taken:
/// kept 5 minutes after each relist of a busy cluster, that was a second copy of
/// most pods.
const PIN_LINGER: Duration = Duration::from_secs(30);

struct Pin {
    snapshot: Snapshot,
    used: std::time::Instant,
    ttl: Duration,
}

impl Pin {
    fn live(&self) -> bool {
        self.used.elapsed() < self.ttl
    }
}
/// At most this many paginated lists in progress are kept (the oldest go first).
const PIN_MAX: usize = 64;

/// What a watch needs to start: the history to replay and the live feed.
pub struct Subscription {
    pub snapshot: Snapshot,
    pub history: Vec<Arc<CacheEvent>>,
    pub live: broadcast::Receiver<Arc<CacheEvent>>,
}

/// Store key prefixes of pods and nodes, for the pods' derived region field.
static POD_PREFIX: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| prefix_of("pods"));
static NODE_PREFIX: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| prefix_of("nodes"));

fn prefix_of(plural: &str) -> String {
    meridian_api::Resource::find("", "v1", plural)
        .map(|r| r.storage_prefix())
        .unwrap_or_default()
}

/// For a pod with a node: adds the region label of that node, looked up in
/// `objects` (the cache as of the pod's write), as the derived field the
/// `meridian.io/region` pod field selector matches.
fn add_node_region(
    key: &str,
    fields: &mut Vec<(&'static str, String)>,
    objects: &OrdMap<Arc<str>, Arc<CachedObject>>,
) {
    if !key.starts_with(POD_PREFIX.as_str()) {
        return;
    }
    let Some((_, node)) = fields
        .iter()
        .find(|(p, v)| *p == "spec.nodeName" && !v.is_empty())
    else {
        return;
    };
    let node_key = format!("{}{node}", *NODE_PREFIX);
    if let Some(region) = objects
        .get(node_key.as_str())
        .and_then(|n| n.label(REGION_LABEL))
    {
        fields.push((REGION_LABEL, region.to_owned()));
    }
}

/// Builds the cached object from what a render found.
fn finish<'a>(
    key: &str,
    revision: Revision,
    name: &str,
    namespace: Option<&str>,
    labels: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
    fields: &[(&'static str, String)],
    json: Vec<u8>,
) -> CachedObject {
    CachedObject::new(
        Arc::from(key),
        revision,
        name,
        namespace,
        labels,
        fields.iter().map(|(p, v)| (*p, v.as_str())),
        Bytes::from(json),
    )
}

fn render(
    kv: &KeyValue,
    revision: Revision,
    objects: &OrdMap<Arc<str>, Arc<CachedObject>>,
) -> Option<CachedObject> {
    render_fast(kv, revision, objects).or_else(|| render_slow(kv, revision, objects))
}

/// A JSON object's members, borrowed from the input (values unparsed).
type RawMembers<'a> = BTreeMap<&'a str, &'a RawValue>;

#[derive(serde::Deserialize)]
struct MetaHead<'a> {
    #[serde(borrow, default)]
    name: Option<&'a str>,
    #[serde(borrow, default)]
    namespace: Option<&'a str>,
    /// Borrowed: a label with an escape in it sends the object to the slow path.
    #[serde(borrow, default)]
    labels: Option<BTreeMap<&'a str, &'a str>>,
    #[serde(borrow, default, rename = "resourceVersion")]
    resource_version: Option<&'a RawValue>,
}

/// Where `inner` (a slice of `outer`) starts in `outer`.
fn offset_in(outer: &[u8], inner: &str) -> Option<usize> {
    let at = (inner.as_ptr() as usize).checked_sub(outer.as_ptr() as usize)?;
    (at + inner.len() <= outer.len()).then_some(at)
}

/// [`render_slow`]'s result without building the object's tree: the members on
/// the way to metadata and the selectable fields are looked at unparsed, and the
/// resourceVersion is written into the stored bytes in place. `None` for anything
/// unusual (escaped keys, a metadata that is not an object, duplicate members...):
/// the slow path decides.
fn render_fast(
    kv: &KeyValue,
    revision: Revision,
    objects: &OrdMap<Arc<str>, Arc<CachedObject>>,
) -> Option<CachedObject> {
    let input: &[u8] = &kv.value;
    let top: RawMembers = serde_json::from_slice(input).ok()?;
    let meta_raw = top.get("metadata")?;
    let meta: MetaHead = serde_json::from_str(meta_raw.get()).ok()?;
    let mut nested: BTreeMap<&str, RawMembers> = BTreeMap::new();
    let mut fields: Vec<(&'static str, String)> = Vec::new();
    for path in resource_fields(&kv.key) {
        let (first, rest) = match path.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (*path, None),
        };
        let raw = match rest {
            None => top.get(first).copied(),
            Some(rest) if !rest.contains('.') => {
                let Some(parent) = top.get(first) else {
                    continue;
                };
                if !nested.contains_key(first) {
                    if !parent.get().starts_with('{') {
                        continue;
                    }
                    nested.insert(first, serde_json::from_str(parent.get()).ok()?);
                }
                nested.get(first).and_then(|m| m.get(rest)).copied()
            }
            // Deeper paths are not used by any resource: the slow path copes.
            Some(_) => return None,
        };
        let Some(raw) = raw else { continue };
        let v: Value = serde_json::from_str(raw.get()).ok()?;
        if let Some(text) = field_text(path, &v) {
            fields.push((path, text.into_owned()));
        }
    }
    add_node_region(&kv.key, &mut fields, objects);
    // The resourceVersion, written in place (or first in metadata).
    let rv = format!("\"{revision}\"");
    let mut json = Vec::with_capacity(input.len() + rv.len() + 20);
    match meta.resource_version {
        Some(old) => {
            let at = offset_in(input, old.get())?;
            json.extend_from_slice(&input[..at]);
            json.extend_from_slice(rv.as_bytes());
            json.extend_from_slice(&input[at + old.get().len()..]);
        }
        None => {
            let at = offset_in(input, meta_raw.get())?;
            let body = meta_raw.get().strip_prefix('{')?;
            json.extend_from_slice(&input[..=at]);
            json.extend_from_slice(b"\"resourceVersion\":");
            json.extend_from_slice(rv.as_bytes());
            if !body.trim_start().starts_with('}') {
                json.push(b',');
            }
            json.extend_from_slice(&input[at + 1..]);
        }
    }
    Some(finish(
        &kv.key,
        revision,
        meta.name.unwrap_or_default(),
        meta.namespace,
        meta.labels.unwrap_or_default().into_iter(),
        &fields,
        json,
    ))
}

/// Renders by parsing the whole object: the reference for [`render_fast`].
fn render_slow(
    kv: &KeyValue,
    revision: Revision,
    objects: &OrdMap<Arc<str>, Arc<CachedObject>>,
) -> Option<CachedObject> {
    let mut v: Value = match serde_json::from_slice(&kv.value) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(key = %kv.key, error = %e, "skipping undecodable object in the store");
            return None;
        }
    };
    // Internal records (tokens) are cached as they are; they are never served.
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".into(),
            Value::String(revision.to_string()),
        );
    }
    let name = v["metadata"]["name"].as_str().unwrap_or_default();
    let namespace = v["metadata"]["namespace"].as_str();
    let labels: BTreeMap<String, String> = v["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let mut fields: Vec<(&'static str, String)> = resource_fields(&kv.key)
        .iter()
        .filter_map(|p| field_value(&v, p).map(|val| (*p, val.into_owned())))
        .collect();
    add_node_region(&kv.key, &mut fields, objects);
    let mut json = serde_json::to_vec(&v).ok()?;
    json.shrink_to_fit();
    Some(finish(
        &kv.key,
        revision,
        name,
        namespace,
        labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        &fields,
        json,
    ))
}

fn resource_fields(key: &str) -> &'static [&'static str] {
    RESOURCES
        .iter()
        .find(|r| key.starts_with(&r.storage_prefix()))
        .map_or(&[], |r| r.fields)
}

impl Cache {
    /// Loads every object and starts following the store. The cache is ready when
    /// this returns.
    pub async fn start(
        store: DynStore,
        ring_capacity: usize,
        ring_min_age: Duration,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, CacheError> {
        let (snapshot, from) = Self::load(&store).await?;
        let revision = snapshot.revision;
        let cache = Arc::new(Self {
            state: RwLock::new(State {
                snapshot,
                ring: VecDeque::new(),
                window_start: revision,
            }),
            events: broadcast::channel(64 * 1024).0,
            revision: watch::channel(revision).0,
            ring_capacity,
            ring_min_age,
            pinned: Default::default(),
        });
        let me = cache.clone();
        // The follower has a thread of its own: as one task among a loaded
        // server's thousands it got too few turns to keep up with a million pods'
        // events (every watch, the scheduler's too, was ~45 s behind during
        // density and then relisted). It ends with the server, or with the
        // runtime that started it (a task there holds `alive`).
        let (alive, runtime_gone) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _alive = alive;
            std::future::pending::<()>().await
        });
        on_own_thread("watch-cache", move || async move {
            tokio::select! {
                _ = me.follow(store, from, shutdown) => {}
                _ = runtime_gone => {}
            }
        })
        .map_err(CacheError::Thread)?;
        Ok(cache)
    }

    /// Loads every object in pages (so the whole store is never held twice). Pages
    /// may be read at different revisions; following the store from the first page's
    /// revision replays every later change in order, which converges to the truth.
    async fn load(store: &DynStore) -> Result<(Snapshot, Revision), CacheError> {
        const PAGE: usize = 10_000;
        let mut objects = OrdMap::new();
        let mut after: Option<String> = None;
        let mut first_revision = None;
        loop {
            let page = store.range(ROOT, after.as_deref(), PAGE).await?;
            first_revision.get_or_insert(page.revision);
            for kv in &page.kvs {
                if let Some(o) = render(kv, kv.mod_revision, &objects) {
                    objects.insert(o.key.clone(), Arc::new(o));
                }
            }
            after = page.kvs.last().map(|kv| kv.key.clone());
            if !page.more || after.is_none() {
                break;
            }
        }
        let revision = first_revision.unwrap_or(1);
        Ok((Snapshot { revision, objects }, revision + 1))
    }

    /// The writer loop: applies store events; on a broken store watch, relists.
    async fn follow(
        self: Arc<Self>,
        store: DynStore,
        mut from: Revision,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = store.watch(ROOT, from) => s,
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "watch cache lost the store watch; relisting");
                    if !self.relist(&store, &mut from).await {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = stream.next() => n,
                };
                match next {
                    Some(Ok(event)) => {
                        from = event.revision() + 1;
                        self.apply(event);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "watch cache store watch failed; resuming");
                        break;
                    }
                    None => break,
                }
            }
        }
    }

    async fn relist(&self, store: &DynStore, from: &mut Revision) -> bool {
        match Self::load(store).await {
            Ok((snapshot, next)) => {
                let revision = snapshot.revision;
                {
                    let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
                    st.snapshot = snapshot;
                    st.ring.clear();
                    st.window_start = revision;
                }
                *from = next;
                self.revision.send_replace(revision);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "watch cache relist failed");
                false
            }
        }
    }

    fn apply(&self, event: meridian_store::Event) {
        let revision = event.revision();
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        let key: &str = &event.kv.key;
        let prev = st.snapshot.objects.get(key).cloned();
        let cache_event = match event.kind {
            EventType::Put => {
                let Some(obj) = render(&event.kv, revision, &st.snapshot.objects) else {
                    st.snapshot.revision = revision;
                    drop(st);
                    self.revision.send_replace(revision);
                    return;
                };
                let obj = Arc::new(obj);
                st.snapshot.objects.insert(obj.key.clone(), obj.clone());
                CacheEvent {
                    kind: if prev.is_some() {
                        WatchKind::Modified
                    } else {
                        WatchKind::Added
                    },
                    revision,
                    object: obj,
                    prev,
                }
            }
            EventType::Delete => {
                st.snapshot.objects.remove(key);
                let last = event
                    .prev
                    .as_ref()
                    .and_then(|p| render(p, revision, &st.snapshot.objects))
                    .map(Arc::new)
                    .or_else(|| prev.clone());
                let Some(object) = last else {
                    st.snapshot.revision = revision;
                    drop(st);
                    self.revision.send_replace(revision);
                    return;
                };
                CacheEvent {
                    kind: WatchKind::Deleted,
                    revision,
                    object,
                    prev,
                }
            }
        };
        let cache_event = Arc::new(cache_event);
        st.snapshot.revision = revision;
        let now = Instant::now();
        st.ring.push_back((now, cache_event.clone()));
        // At least `ring_capacity` events, and every event of the last
        // `ring_min_age` up to RING_STRETCH times that: when a million pods are
        // created, 100,000 events are half a minute, and a watcher that fell
        // further behind (a loaded consumer) had to relist everything, which put
        // it further behind still.
        while st.ring.len() > self.ring_capacity
            && (st.ring.len() > self.ring_capacity.saturating_mul(RING_STRETCH)
                || st
                    .ring
                    .front()
                    .is_some_and(|(at, _)| now.duration_since(*at) > self.ring_min_age))
        {
            if let Some((_, old)) = st.ring.pop_front() {
                st.window_start = old.revision;
            }
        }
        // Sent under the lock: subscribers that read the ring see each event once.
        let _ = self.events.send(cache_event);
        drop(st);
        self.revision.send_replace(revision);
    }

    /// Keeps `snap` for the next pages of a paginated list.
    pub fn pin(&self, snap: &Snapshot) {
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        pinned.retain(|p| p.snapshot.revision != snap.revision && p.live());
        pinned.push_back(Pin {
            snapshot: snap.clone(),
            used: std::time::Instant::now(),
            ttl: PIN_TTL,
        });
        while pinned.len() > PIN_MAX {
            pinned.pop_front();
        }
    }

    /// A paginated list read its last page: its snapshot is kept only a little
    /// longer, for another list begun at the same revision.
    pub fn release(&self, revision: Revision) {
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        pinned.retain(Pin::live);
        if let Some(p) = pinned.iter_mut().find(|p| p.snapshot.revision == revision) {
            p.ttl = PIN_LINGER;
        }
    }

    /// How many paginated lists are being read (their last page not read yet).
    pub fn open_lists(&self) -> usize {
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        pinned.retain(Pin::live);
        pinned.iter().filter(|p| p.ttl == PIN_TTL).count()
    }

    /// The snapshot a paginated list began at `revision`, if it is still kept (or
    /// is the current one).
    pub fn pinned(&self, revision: Revision) -> Option<Snapshot> {
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        pinned.retain(Pin::live);
        if let Some(p) = pinned.iter_mut().find(|p| p.snapshot.revision == revision) {
            p.used = std::time::Instant::now();
            return Some(p.snapshot.clone());
        }
        drop(pinned);
        Some(self.snapshot()).filter(|s| s.revision == revision)
    }

    pub fn snapshot(&self) -> Snapshot {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot
            .clone()
    }

    pub fn revision(&self) -> Revision {
        *self.revision.borrow()
    }

    /// Waits until the cache has caught up with `revision` (bounded by `timeout`).
    pub async fn wait_for(&self, revision: Revision, timeout: Duration) -> Result<(), CacheError> {
        let mut rx = self.revision.subscribe();
        let wait = rx.wait_for(|r| *r >= revision);
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(CacheError::NotYet(revision)),
        }
    }

    /// A snapshot no older than the store's current revision (a consistent read).
    pub async fn fresh_snapshot(&self, store: &DynStore) -> Result<Snapshot, CacheError> {
        let current = store.current_revision().await?;
        self.wait_for(current, Duration::from_secs(10)).await?;
        Ok(self.snapshot())
    }

    /// Starts a watch. With `after = Some(rv)`, history holds every event after `rv`;
    /// with `None`, history is empty and the caller replays the snapshot instead.
    pub fn subscribe(&self, after: Option<Revision>) -> Result<Subscription, CacheError> {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        let live = self.events.subscribe();
        let history = match after {
            None => Vec::new(),
            Some(rv) if rv >= st.snapshot.revision => Vec::new(),
            Some(rv) if rv < st.window_start => {
                return Err(CacheError::TooOld {
                    requested: rv,
                    oldest: st.window_start,
                });
            }
            Some(rv) => {
                let start = st.ring.partition_point(|(_, e)| e.revision <= rv);
                st.ring.iter().skip(start).map(|(_, e)| e.clone()).collect()
            }
        };
        Ok(Subscription {
            snapshot: st.snapshot.clone(),
            history,
            live,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kv(key: &str, v: &Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: serde_json::to_vec(v).unwrap().into(),
            create_revision: 1,
            mod_revision: 7,
        }
    }

    fn same(a: &CachedObject, b: &CachedObject) {
        assert_eq!(a.name(), b.name());
        assert_eq!(a.namespace(), b.namespace());
        assert!(a.labels().eq(b.labels()));
        let mut fa: Vec<_> = a.fields().collect();
        let mut fb: Vec<_> = b.fields().collect();
        fa.sort();
        fb.sort();
        assert_eq!(fa, fb);
        let va: Value = serde_json::from_slice(&a.json).unwrap();
        let vb: Value = serde_json::from_slice(&b.json).unwrap();
        assert_eq!(va, vb);
    }

    #[test]
    fn an_objects_strings_read_back_from_one_allocation() {
        let o = CachedObject::new(
            Arc::from("/registry/core/pods/ns/p"),
            3,
            "p",
            Some("ns"),
            [("app", "web"), ("tier", "")].into_iter(),
            [("spec.nodeName", "n1"), ("status.phase", "Running")].into_iter(),
            Bytes::from_static(b"{}"),
        );
        assert_eq!((o.name(), o.namespace()), ("p", Some("ns")));
        assert_eq!(
            o.labels().collect::<Vec<_>>(),
            [("app", "web"), ("tier", "")]
        );
        assert_eq!((o.label("tier"), o.label("x")), (Some(""), None));
        assert_eq!(o.field("status.phase"), Some("Running"));
        assert_eq!(o.field("metadata.namespace"), Some("ns"));
        assert_eq!(o.field("spec.schedulerName"), None);
        let bare = CachedObject::new(
            Arc::from("/registry/core/nodes/n"),
            3,
            "n",
            None,
            std::iter::empty(),
            std::iter::empty(),
            Bytes::new(),
        );
        assert_eq!((bare.name(), bare.namespace()), ("n", None));
        assert_eq!((bare.labels().count(), bare.fields().count()), (0, 0));
    }

    #[test]
    fn rendering_in_place_gives_what_parsing_the_whole_object_gives() {
        let mut objects = OrdMap::new();
        let node = kv(
            "/registry/core/nodes/n1",
            &json!({"kind": "Node", "metadata": {"name": "n1", "labels": {"meridian.io/region": "eu"}}}),
        );
        let n = render_slow(&node, 3, &objects).unwrap();
        objects.insert(n.key.clone(), Arc::new(n));
        let cases = [
            (
                "/registry/core/pods/default/a",
                json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "a", "namespace": "default", "labels": {"app": "w"}},
                    "spec": {"nodeName": "n1", "restartPolicy": "Always", "containers": []},
                    "status": {"phase": "Running", "podIP": "10.0.0.1"}}),
            ),
            (
                "/registry/core/pods/default/b",
                json!({"metadata": {"name": "b", "namespace": "default", "resourceVersion": "3"},
                    "spec": {"nodeName": "gone"}, "status": null}),
            ),
            ("/registry/core/pods/default/c", json!({"metadata": {}})),
            (
                "/registry/core/events/default/e",
                json!({"metadata": {"name": "e", "namespace": "default"},
                    "involvedObject": {"kind": "Pod", "name": "a", "resourceVersion": "5"},
                    "reason": "Started", "source": {"component": "kubelet"}, "count": 2}),
            ),
            (
                "/registry/core/nodes/n2",
                json!({"metadata": {"name": "n2"}, "spec": {"unschedulable": true}}),
            ),
            // Escaped keys and non-string labels: the slow path's answer.
            (
                "/registry/core/pods/default/d",
                json!({"metadata": {"name": "d", "labels": {"x": 1}}, "sp\"ec": {}}),
            ),
        ];
        for (key, v) in cases {
            let kv = kv(key, &v);
            let fast = render(&kv, 7, &objects).unwrap();
            let slow = render_slow(&kv, 7, &objects).unwrap();
            same(&fast, &slow);
            let out: Value = serde_json::from_slice(&fast.json).unwrap();
            assert_eq!(out["metadata"]["resourceVersion"], "7", "{key}");
        }
        // A bound pod carries its node's region; the event keeps its own
        // involvedObject.resourceVersion.
        let a = render_fast(
            &kv(
                "/registry/core/pods/default/a",
                &json!({"metadata": {"name": "a"}, "spec": {"nodeName": "n1"}}),
            ),
            7,
            &objects,
        )
        .unwrap();
        assert_eq!(a.field(REGION_LABEL), Some("eu"));
        let e = kv(
            "/registry/core/events/default/e",
            &json!({"metadata": {"name": "e"}, "involvedObject": {"resourceVersion": "5"}}),
        );
        let e = render_fast(&e, 7, &objects).unwrap();
        assert_eq!(e.field("involvedObject.resourceVersion"), Some("5"));
        // Whatever the fast path cannot read, it leaves to the slow one.
        let odd = kv(
            "/registry/core/pods/default/d",
            &json!({"metadata": {"name": "d", "labels": {"x": 1}}}),
        );
        assert!(render_fast(&odd, 7, &objects).is_none());
    }
}
