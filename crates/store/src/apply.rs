//! Transaction semantics shared by the memory and embedded backends.

use std::collections::HashSet;

use crate::{Compare, Event, EventType, KeyValue, Op, Revision, StoreError, Txn};

/// Read/write access to the current state inside one write transaction.
pub(crate) trait TxnView {
    fn get(&mut self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    fn put(&mut self, kv: &KeyValue) -> Result<(), StoreError>;
    fn remove(&mut self, key: &str) -> Result<(), StoreError>;
}

/// Rejects transactions etcd would reject: a key written twice, an empty key.
pub(crate) fn validate(txn: &Txn) -> Result<(), StoreError> {
    let mut seen = HashSet::new();
    for op in &txn.ops {
        if op.key().is_empty() {
            return Err(StoreError::InvalidRequest("empty key".into()));
        }
        if !seen.insert(op.key()) {
            return Err(StoreError::InvalidRequest(format!(
                "key {:?} is written twice in one transaction",
                op.key()
            )));
        }
    }
    Ok(())
}

/// Checks the compares and, if they hold, applies the operations at `revision`.
/// Returns `None` when a compare failed, else the events (empty if nothing changed).
pub(crate) fn apply(
    view: &mut impl TxnView,
    txn: &Txn,
    revision: Revision,
) -> Result<Option<Vec<Event>>, StoreError> {
    for Compare::ModRevision { key, equals } in &txn.compares {
        let current = view.get(key)?.map_or(0, |kv| kv.mod_revision);
        if current != *equals {
            return Ok(None);
        }
    }
    let mut events = Vec::with_capacity(txn.ops.len());
    for op in &txn.ops {
        match op {
            Op::Put { key, value } => {
                let prev = view.get(key)?;
                let kv = KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
                    mod_revision: revision,
                };
                view.put(&kv)?;
                events.push(Event {
                    kind: EventType::Put,
                    kv,
                    prev,
                });
            }
            Op::Delete { key } => {
                if let Some(prev) = view.get(key)? {
                    view.remove(key)?;
                    events.push(Event {
                        kind: EventType::Delete,
                        kv: KeyValue {
                            key: key.clone(),
                            value: Default::default(),
                            create_revision: prev.create_revision,
                            mod_revision: revision,
                        },
                        prev: Some(prev),
                    });
                }
            }
        }
    }
    Ok(Some(events))
}
