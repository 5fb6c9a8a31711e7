//! Meridian's store: a key-value store whose semantics mirror etcd's.
//!
//! Invariants every backend keeps (the conformance suite in `tests/` checks them):
//! - One global revision, incremented by exactly one for every successful transaction
//!   that writes; all writes of one transaction share that revision.
//! - `mod_revision` of a key is the revision of its last write, `create_revision` the
//!   revision that created it; a key that does not exist has mod revision 0, so
//!   "compare mod revision == 0" means create-if-absent.
//! - A transaction's compares and operations are applied all or nothing.
//! - A watch from revision `r` delivers every event with revision `>= r` in revision
//!   order, then live events; if `r` is at or below the compacted revision it fails
//!   with [`StoreError::Compacted`].
//! - Stored records carry a format version ([`record::FORMAT_VERSION`]).

mod apply;
pub mod embedded;
pub mod etcd;
pub mod etcd_server;
pub mod memory;
pub mod record;
mod watch;

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;
pub use memory::MemoryStore;

/// A store revision. Revisions start at 1 for an empty store and only grow.
pub type Revision = i64;

/// One key with its value and revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    pub create_revision: Revision,
    pub mod_revision: Revision,
}

/// A condition a transaction checks before applying its operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key's mod revision equals the value; 0 means "the key does not exist".
    ModRevision { key: String, equals: Revision },
}

/// A write inside a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Bytes },
    Delete { key: String },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// Compares plus the operations applied when all of them hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
    /// Best-effort records (Events, status summaries): the embedded store may
    /// answer before the disk has them and persists them with the next durable
    /// commit, or within [`LAZY_FLUSH`] if none comes. A crash in that window
    /// loses them. Other backends commit every transaction durably.
    pub lazy: bool,
}

/// Longest a lazy transaction waits for a durable commit to carry it to disk.
pub const LAZY_FLUSH: std::time::Duration = std::time::Duration::from_millis(100);

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    /// Marks the transaction best-effort (see [`Txn::lazy`]).
    pub fn lazy(mut self) -> Self {
        self.lazy = true;
        self
    }
    pub fn when(mut self, key: impl Into<String>, mod_revision: Revision) -> Self {
        self.compares.push(Compare::ModRevision {
            key: key.into(),
            equals: mod_revision,
        });
        self
    }
    pub fn put(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value: value.into(),
        });
        self
    }
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }
}

/// The outcome of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether every compare held (and the operations were applied).
    pub succeeded: bool,
    /// The store revision after the transaction (the transaction's own revision when it
    /// succeeded and wrote something).
    pub revision: Revision,
}

/// A page of a range read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// More keys match after the last one returned.
    pub more: bool,
    /// The store revision the page was read at.
    pub revision: Revision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Put,
    Delete,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventType,
    /// For puts, the new key-value. For deletes, the key with the deleting revision
    /// as `mod_revision` and an empty value.
    pub kv: KeyValue,
    /// The value before this event, when there was one.
    pub prev: Option<KeyValue>,
}

impl Event {
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<Event, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("required revision {requested} has been compacted (compacted revision {compacted})")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error(
        "watch fell too far behind the store and was closed; resume from revision {resume_from}"
    )]
    WatchLagged { resume_from: Revision },
    #[error("record for key {key:?} is corrupt or of an unknown format: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("embedded store: {0}")]
    Embedded(String),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd: {0}")]
    EtcdProtocol(String),
    #[error("store is shut down")]
    Closed,
    #[error("invalid request to the store: {0}")]
    InvalidRequest(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The store. See the crate docs for the invariants.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The current revision.
    async fn current_revision(&self) -> Result<Revision>;

    /// One key, or `None`.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Keys starting with `prefix`, in key order, strictly after `after` when given,
    /// at most `limit` of them (`0` = no limit).
    async fn range(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<RangeResult>;

    /// Applies `txn` atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnResult>;

    /// Events for keys starting with `prefix`, from revision `from` (inclusive).
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream>;

    /// Forgets history before `revision`; watches from below it fail with `Compacted`.
    async fn compact(&self, revision: Revision) -> Result<()>;

    /// Creates `key` if absent. Returns the new revision, or `None` if the key exists.
    async fn create(&self, key: &str, value: Bytes) -> Result<Option<Revision>> {
        let r = self.txn(Txn::new().when(key, 0).put(key, value)).await?;
        Ok(r.succeeded.then_some(r.revision))
    }

    /// Replaces `key` if its mod revision is `expected`. Returns the new revision, or
    /// `None` if the key changed (or is gone).
    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Revision,
    ) -> Result<Option<Revision>> {
        if expected <= 0 {
            return Err(StoreError::InvalidRequest(format!(
                "update of {key:?} needs a positive expected mod revision"
            )));
        }
        let r = self
            .txn(Txn::new().when(key, expected).put(key, value))
            .await?;
        Ok(r.succeeded.then_some(r.revision))
    }

    /// Deletes `key` if its mod revision is `expected`. Returns the deleting revision,
    /// or `None` if the key changed (or is gone).
    async fn delete(&self, key: &str, expected: Revision) -> Result<Option<Revision>> {
        if expected <= 0 {
            return Err(StoreError::InvalidRequest(format!(
                "delete of {key:?} needs a positive expected mod revision"
            )));
        }
        let r = self.txn(Txn::new().when(key, expected).delete(key)).await?;
        Ok(r.succeeded.then_some(r.revision))
    }
}

pub type DynStore = Arc<dyn Store>;

/// The smallest key greater than every key starting with `prefix`, or `None` when the
/// prefix has no upper bound.
pub fn prefix_end(prefix: &str) -> Option<Vec<u8>> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}
