//! The etcd backend, for operators who want a replicated store. A thin adapter: etcd's
//! own revisions, compare-and-swap transactions and watches are the semantics we mirror.

use bytes::Bytes;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, EventType as EtcdEventType, GetOptions,
    KeyValue as EtcdKeyValue, Txn as EtcdTxn, TxnOp, WatchOptions,
};
use futures::StreamExt;

use crate::{
    Compare, Event, EventType, KeyValue, Op, RangeResult, Result, Revision, Store, StoreError, Txn,
    TxnResult, WatchStream, prefix_end, record,
};

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

fn is_compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("compacted"))
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
    h.map(|h| h.revision())
        .ok_or_else(|| StoreError::EtcdProtocol("response without header".into()))
}

fn convert(kv: &EtcdKeyValue) -> Result<KeyValue> {
    let key = String::from_utf8(kv.key().to_vec())
        .map_err(|_| StoreError::EtcdProtocol("non UTF-8 key".into()))?;
    let value = if kv.value().is_empty() {
        Bytes::new()
    } else {
        record::decode_value(&key, kv.value())?
    };
    Ok(KeyValue {
        key,
        value,
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

fn range_end(prefix: &str) -> Vec<u8> {
    // "\0" as range end means "every key from the start key on".
    prefix_end(prefix).unwrap_or_else(|| vec![0])
}

impl EtcdStore {
    /// Connects to etcd at the given endpoints (`http://127.0.0.1:2379`, ...).
    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        let client = Client::connect(endpoints, None).await?;
        let store = Self { client };
        store.current_revision().await?;
        Ok(store)
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn current_revision(&self) -> Result<Revision> {
        let resp = self
            .client
            .kv_client()
            .get("\0", Some(GetOptions::new().with_count_only()))
            .await?;
        header_revision(resp.header())
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self.client.kv_client().get(key, None).await?;
        resp.kvs().first().map(convert).transpose()
    }

    async fn range(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<RangeResult> {
        let start = match after {
            Some(a) if a >= prefix => {
                let mut s = a.as_bytes().to_vec();
                s.push(0);
                s
            }
            _ => prefix.as_bytes().to_vec(),
        };
        let mut opts = GetOptions::new().with_range(range_end(prefix));
        if limit > 0 {
            opts = opts.with_limit(limit as i64);
        }
        let resp = self.client.kv_client().get(start, Some(opts)).await?;
        Ok(RangeResult {
            kvs: resp.kvs().iter().map(convert).collect::<Result<_>>()?,
            more: resp.more(),
            revision: header_revision(resp.header())?,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        crate::apply::validate(&txn)?;
        let compares: Vec<EtcdCompare> = txn
            .compares
            .iter()
            .map(|Compare::ModRevision { key, equals }| {
                EtcdCompare::mod_revision(key.as_str(), CompareOp::Equal, *equals)
            })
            .collect();
        let ops: Vec<TxnOp> = txn
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => {
                    TxnOp::put(key.as_str(), record::encode_value(value), None)
                }
                Op::Delete { key } => TxnOp::delete(key.as_str(), None),
            })
            .collect();
        let resp = self
            .client
            .kv_client()
            .txn(EtcdTxn::new().when(compares).and_then(ops))
            .await?;
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision: header_revision(resp.header())?,
        })
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        let mut opts = WatchOptions::new()
            .with_range(range_end(prefix))
            .with_prev_key();
        if from > 0 {
            // Fail fast, like the other backends, when `from` is compacted away.
            let current = self.current_revision().await?;
            if from <= current {
                let probe = self
                    .client
                    .kv_client()
                    .get(
                        "\0",
                        Some(GetOptions::new().with_count_only().with_revision(from)),
                    )
                    .await;
                if let Err(e) = probe {
                    if is_compacted(&e) {
                        return Err(StoreError::Compacted {
                            requested: from,
                            compacted: 0,
                        });
                    }
                    return Err(e.into());
                }
            }
            opts = opts.with_start_revision(from);
        }
        let stream = self.client.watch_client().watch(prefix, Some(opts)).await?;
        let events = stream
            .map(|resp| -> Vec<Result<Event>> {
                let resp = match resp {
                    Ok(r) => r,
                    Err(e) => return vec![Err(e.into())],
                };
                if resp.compact_revision() > 0 {
                    return vec![Err(StoreError::Compacted {
                        requested: 0,
                        compacted: resp.compact_revision(),
                    })];
                }
                if resp.canceled() {
                    return vec![Err(StoreError::EtcdProtocol(format!(
                        "watch canceled: {}",
                        resp.cancel_reason()
                    )))];
                }
                resp.events()
                    .iter()
                    .map(|e| {
                        let kv = e
                            .kv()
                            .ok_or_else(|| StoreError::EtcdProtocol("event without kv".into()))?;
                        let prev = e.prev_kv().map(convert).transpose()?;
                        let kind = match e.event_type() {
                            EtcdEventType::Put => EventType::Put,
                            EtcdEventType::Delete => EventType::Delete,
                        };
                        let mut kv = convert(kv)?;
                        if kind == EventType::Delete {
                            kv.create_revision = prev.as_ref().map_or(0, |p| p.create_revision);
                        }
                        Ok(Event { kind, kv, prev })
                    })
                    .collect()
            })
            .flat_map(futures::stream::iter);
        Ok(Box::pin(events))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        match self.client.kv_client().compact(revision, None).await {
            Ok(_) => Ok(()),
            // Compacting to a revision already compacted is not an error.
            Err(e) if is_compacted(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
