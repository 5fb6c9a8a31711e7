//! In-memory backend for tests and hollow fleets. Not durable.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;

use crate::apply::{self, TxnView};
use crate::watch::{self, Batch};
use crate::{
    KeyValue, RangeResult, Result, Revision, Store, StoreError, Txn, TxnResult, WatchStream,
};

const LIVE_CAPACITY: usize = 16 * 1024;

struct State {
    kv: BTreeMap<String, KeyValue>,
    revision: Revision,
    compacted: Revision,
    history: VecDeque<Batch>,
}

impl TxnView for BTreeMap<String, KeyValue> {
    fn get(&mut self, key: &str) -> Result<Option<KeyValue>> {
        Ok(BTreeMap::get(self, key).cloned())
    }
    fn put(&mut self, kv: &KeyValue) -> Result<()> {
        self.insert(kv.key.clone(), kv.clone());
        Ok(())
    }
    fn remove(&mut self, key: &str) -> Result<()> {
        BTreeMap::remove(self, key);
        Ok(())
    }
}

pub struct MemoryStore {
    state: Mutex<State>,
    live: broadcast::Sender<Batch>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                kv: BTreeMap::new(),
                revision: 1,
                compacted: 0,
                history: VecDeque::new(),
            }),
            live: broadcast::channel(LIVE_CAPACITY).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-written: every
        // mutation happens after all fallible steps.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn current_revision(&self) -> Result<Revision> {
        Ok(self.lock().revision)
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        Ok(self.lock().kv.get(key).cloned())
    }

    async fn range(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<RangeResult> {
        let state = self.lock();
        let start = match after {
            Some(a) if a >= prefix => std::ops::Bound::Excluded(a.to_owned()),
            _ => std::ops::Bound::Included(prefix.to_owned()),
        };
        let mut kvs = Vec::new();
        let mut more = false;
        for (k, v) in state.kv.range((start, std::ops::Bound::Unbounded)) {
            if !k.starts_with(prefix) {
                break;
            }
            if limit > 0 && kvs.len() == limit {
                more = true;
                break;
            }
            kvs.push(v.clone());
        }
        Ok(RangeResult {
            kvs,
            more,
            revision: state.revision,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        apply::validate(&txn)?;
        let mut state = self.lock();
        let next = state.revision + 1;
        // Apply to a scratch copy of the touched keys only, so a failure leaves no trace.
        let mut scratch: BTreeMap<String, KeyValue> = BTreeMap::new();
        for key in txn
            .compares
            .iter()
            .map(|crate::Compare::ModRevision { key, .. }| key.as_str())
            .chain(txn.ops.iter().map(|o| o.key()))
        {
            if let Some(kv) = state.kv.get(key) {
                scratch.insert(key.to_owned(), kv.clone());
            }
        }
        let Some(events) = apply::apply(&mut scratch, &txn, next)? else {
            return Ok(TxnResult {
                succeeded: false,
                revision: state.revision,
            });
        };
        if events.is_empty() {
            return Ok(TxnResult {
                succeeded: true,
                revision: state.revision,
            });
        }
        for e in &events {
            match e.kind {
                crate::EventType::Put => {
                    state.kv.insert(e.kv.key.clone(), e.kv.clone());
                }
                crate::EventType::Delete => {
                    state.kv.remove(&e.kv.key);
                }
            }
        }
        state.revision = next;
        let batch = Arc::new(events);
        state.history.push_back(batch.clone());
        // Sent under the lock so live order equals revision order.
        let _ = self.live.send(batch);
        Ok(TxnResult {
            succeeded: true,
            revision: next,
        })
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        let state = self.lock();
        let from = if from <= 0 { state.revision + 1 } else { from };
        if from < state.compacted {
            return Err(StoreError::Compacted {
                requested: from,
                compacted: state.compacted,
            });
        }
        let rx = self.live.subscribe();
        let history = state
            .history
            .iter()
            .filter(|b| b[0].revision() >= from)
            .flat_map(|b| b.iter())
            .filter(|e| e.kv.key.starts_with(prefix))
            .cloned()
            .collect();
        Ok(watch::join(prefix.to_owned(), history, from - 1, rx))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let mut state = self.lock();
        if revision > state.revision {
            return Err(StoreError::InvalidRequest(format!(
                "cannot compact to future revision {revision} (current {})",
                state.revision
            )));
        }
        if revision <= state.compacted {
            return Ok(());
        }
        while state
            .history
            .front()
            .is_some_and(|b| b[0].revision() < revision)
        {
            state.history.pop_front();
        }
        state.compacted = revision;
        Ok(())
    }
}
