//! The default backend: an embedded, durable store on redb.
//!
//! All writes go through one writer thread that commits in groups: it takes every
//! request waiting in its queue (up to [`MAX_BATCH`]), applies them one after another
//! in a single redb write transaction (each successful one gets its own revision), and
//! commits once with `Durability::Immediate` (fsync). Only then are the callers
//! answered and the events published, so an acknowledged write survives `kill -9`,
//! and N concurrent writers cost one fsync, not N. A batch of only lazy
//! transactions (Events and the like, [`Txn::lazy`]) commits without the fsync; the
//! next durable commit, or an empty one at most [`crate::LAZY_FLUSH`] later, puts it
//! on disk. A durable write queued behind it then waits for a memory commit, not
//! for the disk twice.
//!
//! Tables: `kv` (key → [`record::encode_kv`]), `log` (revision → the events of that
//! revision, for watches from a past revision), `meta` (current and compacted revision).

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, mpsc};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, oneshot};

use crate::apply::{self, TxnView};
use crate::record;
use crate::watch::{self, Batch};
use crate::{
    KeyValue, RangeResult, Result, Revision, Store, StoreError, Txn, TxnResult, WatchStream,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<i64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";

/// redb's page cache.
pub const CACHE_BYTES: usize = 128 * 1024 * 1024;

/// The most requests committed together.
pub const MAX_BATCH: usize = 1024;
/// Commits the live channel holds for a slow watcher (the watch cache) before it
/// must resume from the log. Each slot is a whole commit (up to `MAX_BATCH`
/// writes) and holds its events until overwritten: at 16k slots a 300k-pod run
/// kept ~2 GB of old events alive.
const LIVE_CAPACITY: usize = 512;

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Embedded(e.to_string())
}

enum Request {
    Txn(Txn, oneshot::Sender<Result<TxnResult>>),
    Compact(Revision, oneshot::Sender<Result<()>>),
}

struct Shared {
    db: Database,
    revision: AtomicI64,
    live: broadcast::Sender<Batch>,
}

pub struct EmbeddedStore {
    shared: Arc<Shared>,
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for EmbeddedStore {
    /// Stops the writer after it has committed everything queued, so the file can be
    /// reopened as soon as this returns.
    fn drop(&mut self) {
        self.requests.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        // The watch cache above keeps every object in memory already; a small page
        // cache here keeps the process from holding the data twice.
        Self::open_with_cache(path, CACHE_BYTES)
    }

    /// Opens (or creates) the store file with a page cache of `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self> {
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(db_err)?;
        let wtxn = db.begin_write().map_err(db_err)?;
        let revision = {
            wtxn.open_table(KV).map_err(db_err)?;
            wtxn.open_table(LOG).map_err(db_err)?;
            let meta = wtxn.open_table(META).map_err(db_err)?;
            meta.get(META_REVISION)
                .map_err(db_err)?
                .map_or(1, |v| v.value())
        };
        wtxn.commit().map_err(db_err)?;
        let shared = Arc::new(Shared {
            db,
            revision: AtomicI64::new(revision),
            live: broadcast::channel(LIVE_CAPACITY).0,
        });
        let (requests, rx) = mpsc::channel();
        let writer = shared.clone();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(&writer, &rx))
            .map_err(db_err)?;
        Ok(Self {
            shared,
            requests: Some(requests),
            writer: Some(writer),
        })
    }

    fn sender(&self) -> Result<&mpsc::Sender<Request>> {
        self.requests.as_ref().ok_or(StoreError::Closed)
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared.db))
            .await
            .map_err(db_err)?
    }
}

struct RedbView<'a, 't>(&'a mut redb::Table<'t, &'static str, &'static [u8]>);

impl TxnView for RedbView<'_, '_> {
    fn get(&mut self, key: &str) -> Result<Option<KeyValue>> {
        match self.0.get(key).map_err(db_err)? {
            Some(v) => Ok(Some(record::decode_kv(key, v.value())?)),
            None => Ok(None),
        }
    }
    fn put(&mut self, kv: &KeyValue) -> Result<()> {
        self.0
            .insert(kv.key.as_str(), record::encode_kv(kv).as_slice())
            .map_err(db_err)?;
        Ok(())
    }
    fn remove(&mut self, key: &str) -> Result<()> {
        self.0.remove(key).map_err(db_err)?;
        Ok(())
    }
}

enum Reply {
    Txn(oneshot::Sender<Result<TxnResult>>, Result<TxnResult>),
    Compact(oneshot::Sender<Result<()>>, Result<()>),
}

fn writer_loop(shared: &Shared, rx: &mpsc::Receiver<Request>) {
    // Whether a lazy commit is not on disk yet.
    let mut unflushed = false;
    loop {
        let first = if unflushed {
            match rx.recv_timeout(crate::LAZY_FLUSH) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    match flush(shared) {
                        Ok(()) => unflushed = false,
                        Err(e) => tracing::error!(error = %e, "embedded store flush failed"),
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = flush(shared);
                    return;
                }
            }
        } else {
            match rx.recv() {
                Ok(r) => r,
                Err(_) => return,
            }
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let lazy = batch
            .iter()
            .all(|r| matches!(r, Request::Txn(t, _) if t.lazy));
        let start = shared.revision.load(Ordering::Acquire);
        match commit_batch(shared, batch, start, lazy) {
            Ok((revision, replies, published)) => {
                unflushed = lazy;
                shared.revision.store(revision, Ordering::Release);
                for b in published {
                    let _ = shared.live.send(b);
                }
                for r in replies {
                    match r {
                        Reply::Txn(tx, v) => {
                            let _ = tx.send(v);
                        }
                        Reply::Compact(tx, v) => {
                            let _ = tx.send(v);
                        }
                    }
                }
            }
            Err((e, replies)) => {
                tracing::error!(error = %e, "embedded store commit failed; batch rejected");
                for r in replies {
                    match r {
                        Reply::Txn(tx, _) => {
                            let _ = tx.send(Err(db_err(&e)));
                        }
                        Reply::Compact(tx, _) => {
                            let _ = tx.send(Err(db_err(&e)));
                        }
                    }
                }
            }
        }
    }
}

/// An empty durable commit: puts earlier lazy commits on disk.
fn flush(shared: &Shared) -> Result<()> {
    let wtxn = shared.db.begin_write().map_err(db_err)?;
    wtxn.commit().map_err(db_err)
}

type BatchOutcome = (Revision, Vec<Reply>, Vec<Batch>);

fn commit_batch(
    shared: &Shared,
    batch: Vec<Request>,
    start: Revision,
    lazy: bool,
) -> std::result::Result<BatchOutcome, (StoreError, Vec<Reply>)> {
    let mut replies = Vec::with_capacity(batch.len());
    let mut published = Vec::new();
    let mut revision = start;
    let outcome = (|| -> Result<()> {
        let mut wtxn = shared.db.begin_write().map_err(db_err)?;
        if lazy {
            wtxn.set_durability(redb::Durability::None)
                .map_err(db_err)?;
        }
        {
            let mut kv = wtxn.open_table(KV).map_err(db_err)?;
            let mut log = wtxn.open_table(LOG).map_err(db_err)?;
            let mut meta = wtxn.open_table(META).map_err(db_err)?;
            for req in batch {
                match req {
                    Request::Txn(txn, tx) => {
                        let result = match apply::validate(&txn) {
                            Err(e) => Err(e),
                            Ok(()) => {
                                // A failure here aborts the whole batch (see below), so a
                                // half-applied transaction is never committed.
                                let applied =
                                    apply::apply(&mut RedbView(&mut kv), &txn, revision + 1)?;
                                match applied {
                                    None => Ok(TxnResult {
                                        succeeded: false,
                                        revision,
                                    }),
                                    Some(events) if events.is_empty() => Ok(TxnResult {
                                        succeeded: true,
                                        revision,
                                    }),
                                    Some(events) => {
                                        revision += 1;
                                        log.insert(
                                            revision,
                                            record::encode_events(&events).as_slice(),
                                        )
                                        .map_err(db_err)?;
                                        published.extend(events);
                                        Ok(TxnResult {
                                            succeeded: true,
                                            revision,
                                        })
                                    }
                                }
                            }
                        };
                        replies.push(Reply::Txn(tx, result));
                    }
                    Request::Compact(to, tx) => {
                        let result = if to > revision {
                            Err(StoreError::InvalidRequest(format!(
                                "cannot compact to future revision {to} (current {revision})"
                            )))
                        } else {
                            let done = meta
                                .get(META_COMPACTED)
                                .map_err(db_err)?
                                .map_or(0, |v| v.value());
                            if to > done {
                                log.retain_in(..to, |_, _| false).map_err(db_err)?;
                                meta.insert(META_COMPACTED, to).map_err(db_err)?;
                            }
                            Ok(())
                        };
                        replies.push(Reply::Compact(tx, result));
                    }
                }
            }
            meta.insert(META_REVISION, revision).map_err(db_err)?;
        }
        wtxn.commit().map_err(db_err)?;
        Ok(())
    })();
    match outcome {
        // One live batch per commit (not per transaction): a commit of 500
        // writes is one slot of the live channel, so a watcher falls behind by
        // commits, not by writes.
        Ok(()) => Ok((
            revision,
            replies,
            (!published.is_empty())
                .then(|| Arc::new(published))
                .into_iter()
                .collect(),
        )),
        Err(e) => Err((e, replies)),
    }
}

fn read_range(
    db: &Database,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<RangeResult> {
    let rtxn = db.begin_read().map_err(db_err)?;
    let kv = rtxn.open_table(KV).map_err(db_err)?;
    let meta = rtxn.open_table(META).map_err(db_err)?;
    let revision = meta
        .get(META_REVISION)
        .map_err(db_err)?
        .map_or(1, |v| v.value());
    let mut out = RangeResult {
        revision,
        ..Default::default()
    };
    let iter = match after {
        Some(a) if a >= prefix => {
            kv.range::<&str>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
        }
        _ => kv.range::<&str>(prefix..),
    }
    .map_err(db_err)?;
    for entry in iter {
        let (k, v) = entry.map_err(db_err)?;
        let key = k.value();
        if !key.starts_with(prefix) {
            break;
        }
        if limit > 0 && out.kvs.len() == limit {
            out.more = true;
            break;
        }
        out.kvs.push(record::decode_kv(key, v.value())?);
    }
    Ok(out)
}

fn read_history(
    db: &Database,
    prefix: &str,
    from: Revision,
) -> Result<(Revision, Vec<crate::Event>)> {
    let rtxn = db.begin_read().map_err(db_err)?;
    let meta = rtxn.open_table(META).map_err(db_err)?;
    let compacted = meta
        .get(META_COMPACTED)
        .map_err(db_err)?
        .map_or(0, |v| v.value());
    let current = meta
        .get(META_REVISION)
        .map_err(db_err)?
        .map_or(1, |v| v.value());
    let from = if from <= 0 { current + 1 } else { from };
    if from < compacted {
        return Err(StoreError::Compacted {
            requested: from,
            compacted,
        });
    }
    let log = rtxn.open_table(LOG).map_err(db_err)?;
    let mut events = Vec::new();
    for entry in log.range(from..).map_err(db_err)? {
        let (rev, raw) = entry.map_err(db_err)?;
        let rev = rev.value();
        events.extend(
            record::decode_events(rev, raw.value())?
                .into_iter()
                .filter(|e| e.kv.key.starts_with(prefix)),
        );
    }
    Ok((from, events))
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn current_revision(&self) -> Result<Revision> {
        Ok(self.shared.revision.load(Ordering::Acquire))
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_owned();
        self.read(move |db| {
            let rtxn = db.begin_read().map_err(db_err)?;
            let kv = rtxn.open_table(KV).map_err(db_err)?;
            match kv.get(key.as_str()).map_err(db_err)? {
                Some(v) => Ok(Some(record::decode_kv(&key, v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn range(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<RangeResult> {
        let prefix = prefix.to_owned();
        let after = after.map(str::to_owned);
        self.read(move |db| read_range(db, &prefix, after.as_deref(), limit))
            .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        let (tx, rx) = oneshot::channel();
        self.sender()?
            .send(Request::Txn(txn, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        // Subscribe first: anything committed after this point is either in the
        // history read below or arrives live (duplicates are skipped by revision).
        let live = self.shared.live.subscribe();
        let p = prefix.to_owned();
        let (from, history) = self.read(move |db| read_history(db, &p, from)).await?;
        Ok(watch::join(prefix.to_owned(), history, from - 1, live))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.sender()?
            .send(Request::Compact(revision, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}
