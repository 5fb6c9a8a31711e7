//! The agent's local cache (one redb file): the desired pods and what the runtime is
//! running for them. It is what lets a node restart, online or offline, and carry on
//! without asking anyone.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::runtime::{ContainerHandle, Exit};

const PODS: TableDefinition<&str, &[u8]> = TableDefinition::new("pods");
const CONTAINERS: TableDefinition<&str, &[u8]> = TableDefinition::new("containers");
/// Pod uid → the ConfigMaps and Secrets it references (JSON of [`crate::refs::Refs`]
/// as a list of `[kind, name, object]`).
const REFS: TableDefinition<&str, &[u8]> = TableDefinition::new("refs");

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("local state: {0}")]
    Db(String),
    #[error("local state record: {0}")]
    Decode(#[from] serde_json::Error),
}

fn dberr<E: std::fmt::Display>(e: E) -> StateError {
    StateError::Db(e.to_string())
}

/// What the agent remembers about one container of a pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRecord {
    /// The current (or last) attempt; `None` before the first start.
    pub handle: Option<ContainerHandle>,
    pub attempt: u32,
    pub restart_count: u32,
    /// How the current attempt ended, if it has.
    pub exit: Option<Exit>,
    /// How the previous attempt ended.
    pub last_exit: Option<Exit>,
    pub backoff_secs: u64,
}

pub struct LocalState {
    db: Database,
}

impl LocalState {
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let db = Database::builder()
            .set_cache_size(2 * 1024 * 1024)
            .create(path)
            .map_err(dberr)?;
        let tx = db.begin_write().map_err(dberr)?;
        tx.open_table(PODS).map_err(dberr)?;
        tx.open_table(CONTAINERS).map_err(dberr)?;
        tx.open_table(REFS).map_err(dberr)?;
        tx.commit().map_err(dberr)?;
        Ok(Self { db })
    }

    /// Every cached desired pod (uid, JSON).
    pub fn pods(&self) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(PODS).map_err(dberr)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    pub fn put_pod(&self, uid: &str, json: &[u8]) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        tx.open_table(PODS)
            .map_err(dberr)?
            .insert(uid, json)
            .map_err(dberr)?;
        tx.commit().map_err(dberr)
    }

    /// The pod's referenced objects as last received.
    pub fn refs(&self, uid: &str) -> Result<crate::refs::Refs, StateError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(REFS).map_err(dberr)?;
        let Some(v) = t.get(uid).map_err(dberr)? else {
            return Ok(Default::default());
        };
        let list: Vec<(String, String, serde_json::Value)> = serde_json::from_slice(v.value())?;
        Ok(list.into_iter().map(|(k, n, o)| ((k, n), o)).collect())
    }

    pub fn put_refs(&self, uid: &str, refs: &crate::refs::Refs) -> Result<(), StateError> {
        let list: Vec<(&String, &String, &serde_json::Value)> =
            refs.iter().map(|((k, n), o)| (k, n, o)).collect();
        let data = serde_json::to_vec(&list)?;
        let tx = self.db.begin_write().map_err(dberr)?;
        tx.open_table(REFS)
            .map_err(dberr)?
            .insert(uid, data.as_slice())
            .map_err(dberr)?;
        tx.commit().map_err(dberr)
    }

    /// Forgets a pod, its containers and its references.
    pub fn remove_pod(&self, uid: &str) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            tx.open_table(PODS)
                .map_err(dberr)?
                .remove(uid)
                .map_err(dberr)?;
            tx.open_table(REFS)
                .map_err(dberr)?
                .remove(uid)
                .map_err(dberr)?;
            let mut c = tx.open_table(CONTAINERS).map_err(dberr)?;
            let prefix = format!("{uid}/");
            let keys: Vec<String> = c
                .range(prefix.as_str()..)
                .map_err(dberr)?
                .filter_map(|r| r.ok())
                .map(|(k, _)| k.value().to_owned())
                .take_while(|k| k.starts_with(&prefix))
                .collect();
            for k in keys {
                c.remove(k.as_str()).map_err(dberr)?;
            }
        }
        tx.commit().map_err(dberr)
    }

    pub fn containers(&self, uid: &str) -> Result<Vec<(String, ContainerRecord)>, StateError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(CONTAINERS).map_err(dberr)?;
        let prefix = format!("{uid}/");
        let mut out = Vec::new();
        for row in t.range(prefix.as_str()..).map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            let Some(name) = k.value().strip_prefix(&prefix) else {
                break;
            };
            out.push((name.to_owned(), serde_json::from_slice(v.value())?));
        }
        Ok(out)
    }

    pub fn put_container(
        &self,
        uid: &str,
        name: &str,
        rec: &ContainerRecord,
    ) -> Result<(), StateError> {
        let data = serde_json::to_vec(rec)?;
        let key = format!("{uid}/{name}");
        let tx = self.db.begin_write().map_err(dberr)?;
        tx.open_table(CONTAINERS)
            .map_err(dberr)?
            .insert(key.as_str(), data.as_slice())
            .map_err(dberr)?;
        tx.commit().map_err(dberr)
    }
}
