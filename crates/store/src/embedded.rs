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

/// History to remove below the compacted revision: compaction marks the log
/// compacted at once (watches from before it fail from then on) and the writer
/// removes the entries a few hundred revisions at a time, with the commits it makes
/// anyway or, when idle, on its own. Removing five minutes of history (a million
/// revisions at density load, gigabytes of pages) in the compaction's own commit
/// held every write behind it for seconds.
struct Purge {
    /// Log entries below this revision are gone.
    floor: Revision,
    /// The compacted revision: entries below it are to go.
    compacted: Revision,
}

/// Revisions removed with each commit of writes.
const PURGE_WITH_WRITES: i64 = 256;
/// Revisions removed by a commit of its own while no write waits.
const PURGE_IDLE: i64 = 4096;
/// How long the writer waits for a write before purging on its own.
const PURGE_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

impl Purge {
    fn load(db: &Database) -> Result<Purge> {
        let rtxn = db.begin_read().map_err(db_err)?;
        let compacted = meta_value(&rtxn.open_table(META).map_err(db_err)?, META_COMPACTED, 0)?;
        let log = rtxn.open_table(LOG).map_err(db_err)?;
        let floor = log
            .first()
            .map_err(db_err)?
            .map_or(compacted, |(k, _)| k.value());
        Ok(Purge { floor, compacted })
    }

    fn pending(&self) -> bool {
        self.floor < self.compacted
    }

    /// Removes up to `n` revisions of history; the new floor, once committed.
    fn some(&self, log: &mut redb::Table<i64, &[u8]>, n: i64) -> Result<Revision> {
        if !self.pending() {
            return Ok(self.floor);
        }
        let upto = self.compacted.min(self.floor.saturating_add(n));
        log.retain_in(self.floor..upto, |_, _| false)
            .map_err(db_err)?;
        Ok(upto)
    }
}

fn writer_loop(shared: &Shared, rx: &mpsc::Receiver<Request>) {
    let mut purge = match Purge::load(&shared.db) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "embedded store: cannot read its history bounds");
            Purge {
                floor: 0,
                compacted: 0,
            }
        }
    };
    // Since when a lazy commit is not on disk.
    let mut unflushed: Option<std::time::Instant> = None;
    loop {
        let wait = if purge.pending() {
            Some(PURGE_WAIT)
        } else {
            unflushed.map(|t| crate::LAZY_FLUSH.saturating_sub(t.elapsed()))
        };
        let first = match wait {
            None => match rx.recv() {
                Ok(r) => Some(r),
                Err(_) => return,
            },
            Some(d) => match rx.recv_timeout(d) {
                Ok(r) => Some(r),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = flush(shared);
                    return;
                }
            },
        };
        let Some(first) = first else {
            if purge.pending() {
                match purge_alone(shared, &purge) {
                    Ok(floor) => {
                        purge.floor = floor;
                        unflushed.get_or_insert_with(std::time::Instant::now);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "embedded store: removing history failed")
                    }
                }
            }
            if unflushed.is_some_and(|t| t.elapsed() >= crate::LAZY_FLUSH) {
                match flush(shared) {
                    Ok(()) => unflushed = None,
                    Err(e) => tracing::error!(error = %e, "embedded store flush failed"),
                }
            }
            continue;
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
        match commit_batch(shared, batch, start, lazy, &purge) {
            Ok((revision, replies, published, next)) => {
                if lazy {
                    unflushed.get_or_insert_with(std::time::Instant::now);
                } else {
                    unflushed = None;
                }
                purge = next;
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

/// A commit that only removes history (lazy: lost, it is removed again).
fn purge_alone(shared: &Shared, purge: &Purge) -> Result<Revision> {
    let mut wtxn = shared.db.begin_write().map_err(db_err)?;
    wtxn.set_durability(redb::Durability::None)
        .map_err(db_err)?;
    let floor = {
        let mut log = wtxn.open_table(LOG).map_err(db_err)?;
        purge.some(&mut log, PURGE_IDLE)?
    };
    wtxn.commit().map_err(db_err)?;
    Ok(floor)
}

/// An empty durable commit: puts earlier lazy commits on disk.
fn flush(shared: &Shared) -> Result<()> {
    let wtxn = shared.db.begin_write().map_err(db_err)?;
    wtxn.commit().map_err(db_err)
}

type BatchOutcome = (Revision, Vec<Reply>, Vec<Batch>, Purge);

fn commit_batch(
    shared: &Shared,
    batch: Vec<Request>,
    start: Revision,
    lazy: bool,
    purge: &Purge,
) -> std::result::Result<BatchOutcome, (StoreError, Vec<Reply>)> {
    let mut replies = Vec::with_capacity(batch.len());
    let mut published = Vec::new();
    let mut revision = start;
    let mut next = Purge {
        floor: purge.floor,
        compacted: purge.compacted,
    };
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
                            // The history below goes a little at a time (see `Purge`).
                            if to > next.compacted {
                                meta.insert(META_COMPACTED, to).map_err(db_err)?;
                                next.compacted = to;
                            }
                            Ok(())
                        };
                        replies.push(Reply::Compact(tx, result));
                    }
                }
            }
            meta.insert(META_REVISION, revision).map_err(db_err)?;
            next.floor = next.some(&mut log, PURGE_WITH_WRITES)?;
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
            next,
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

/// A revision kept in the `meta` table, `default` when none is.
fn meta_value(
    meta: &impl ReadableTable<&'static str, i64>,
    key: &str,
    default: i64,
) -> Result<i64> {
    Ok(meta
        .get(key)
        .map_err(db_err)?
        .map_or(default, |v| v.value()))
}

fn read_history(
    db: &Database,
    prefix: &str,
    from: Revision,
) -> Result<(Revision, Vec<crate::Event>)> {
    let rtxn = db.begin_read().map_err(db_err)?;
    let meta = rtxn.open_table(META).map_err(db_err)?;
    let compacted = meta_value(&meta, META_COMPACTED, 0)?;
    let current = meta_value(&meta, META_REVISION, 1)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures::StreamExt;

    fn first_logged(s: &EmbeddedStore) -> Option<Revision> {
        let rtxn = s.shared.db.begin_read().unwrap();
        let log = rtxn.open_table(LOG).unwrap();
        log.first().unwrap().map(|(k, _)| k.value())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_removes_history_a_little_at_a_time_and_keeps_what_is_newer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let s = EmbeddedStore::open(&path).unwrap();
        let n = 3 * PURGE_IDLE;
        // Written 64 at a time: the writer commits them in groups.
        let last = futures::stream::iter(0..n)
            .map(|i| {
                let txn = Txn::new().put(format!("/k/{}", i % 100), Bytes::from(vec![b'x'; 200]));
                s.txn(txn)
            })
            .buffer_unordered(64)
            .fold(0, |m, r| async move { m.max(r.unwrap().revision) })
            .await;
        assert_eq!(last, n + 1, "one revision per write");
        assert!(first_logged(&s).unwrap() <= 2);
        s.compact(last - 10).await.unwrap();
        // Compacted at once: watches from before it fail...
        assert!(matches!(
            s.watch("/k/", last - 20).await,
            Err(StoreError::Compacted { .. })
        ));
        // ...while the history itself goes in the background, a bounded amount
        // per commit, and nothing at or after the compacted revision goes.
        let mut floor = first_logged(&s).unwrap();
        for _ in 0..500 {
            if floor >= last - 10 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            floor = first_logged(&s).unwrap();
        }
        assert_eq!(floor, last - 10);
        let mut w = s.watch("/k/", last - 10).await.unwrap();
        let e = w.next().await.unwrap().unwrap();
        assert_eq!(e.revision(), last - 10);
        assert_eq!(s.get("/k/7").await.unwrap().unwrap().value.len(), 200);
        drop(w);
        drop(s);
        // Reopened, the store knows where its history begins.
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(first_logged(&s), Some(last - 10));
        assert!(matches!(
            s.watch("/k/", last - 11).await,
            Err(StoreError::Compacted { .. })
        ));
    }
}
