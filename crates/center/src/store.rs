//! The center's durable state in one redb file: bootstrap tokens (secrets hashed),
//! the inventory of every machine that ever joined, and node names. A join commits
//! its token use, inventory record and name in one transaction, so concurrent joins
//! on a token's last use admit exactly one and a refused join leaves nothing.

use std::path::Path;

use meridian_api::onboarding::{InventoryNode, JoinEvent, TokenInfo, TokenRequest, TokenUse};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// Token id → [`TokenRecord`] JSON.
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// Machine id → [`InventoryNode`] JSON.
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
/// Node name → machine id.
const NAMES: TableDefinition<&str, &str> = TableDefinition::new("names");

/// History kept per token and per node (oldest dropped first).
const HISTORY: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("center store: {0}")]
    Db(String),
    #[error("{0}")]
    Token(TokenProblem),
    #[error("node name {name:?} belongs to another machine ({machine})")]
    NameTaken { name: String, machine: String },
    #[error("machine {0:?} is not in the inventory")]
    UnknownMachine(String),
}

fn db(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Why a bootstrap token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenProblem {
    Unknown,
    Expired,
    Revoked,
    UsedUp,
}

impl TokenProblem {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Unknown => "TokenUnknown",
            Self::Expired => "TokenExpired",
            Self::Revoked => "TokenRevoked",
            Self::UsedUp => "TokenUsedUp",
        }
    }
}

impl std::fmt::Display for TokenProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unknown => "the bootstrap token is not valid (unknown id or wrong secret)",
            Self::Expired => "the bootstrap token has expired",
            Self::Revoked => "the bootstrap token was revoked",
            Self::UsedUp => "the bootstrap token has no uses left",
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    pub info: TokenInfo,
    /// SHA-256 of the secret part, hex.
    pub secret_sha256: String,
    pub expires_unix: i64,
}

/// Splits `id.secret` (kubeadm's shape: 6 and 16 of `[a-z0-9]`).
pub fn parse_token(t: &str) -> Option<(&str, &str)> {
    let (id, secret) = t.trim().split_once('.')?;
    let ok = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    (ok(id, 6) && ok(secret, 16)).then_some((id, secret))
}

fn random_part(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..n)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn sha256_hex(s: &str) -> String {
    meridian_pki::hex(&sha2::Sha256::digest(s.as_bytes()))
}

fn now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}

pub struct Store {
    db: Database,
}

/// What a successful join writes.
pub struct JoinCommit<'a> {
    /// Token id to consume (None for a re-plan by certificate).
    pub token: Option<&'a str>,
    pub node: InventoryNode,
    pub event: JoinEvent,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // Small records, read through the page cache: a modest cache suffices.
        let database = redb::Builder::new()
            .set_cache_size(16 << 20)
            .create(path)
            .map_err(db)?;
        let tx = database.begin_write().map_err(db)?;
        tx.open_table(TOKENS).map_err(db)?;
        tx.open_table(NODES).map_err(db)?;
        tx.open_table(NAMES).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(Self { db: database })
    }

    /// Creates a token; returns its info with the secret (shown once).
    pub fn create_token(&self, req: &TokenRequest) -> Result<TokenInfo, StoreError> {
        let ttl_seconds = req.ttl_seconds;
        let (id, secret) = (random_part(6), random_part(16));
        let created = now();
        let expires = created
            .checked_add(jiff::SignedDuration::from_secs(ttl_seconds as i64))
            .map_err(db)?;
        let info = TokenInfo {
            id: id.clone(),
            token: None,
            created: created.to_string(),
            expires: expires.to_string(),
            uses: req.uses,
            used: 0,
            revoked: false,
            labels: req.labels.clone(),
            description: req.description.clone(),
            regions: req.regions.clone(),
            history: Vec::new(),
        };
        let rec = TokenRecord {
            info: info.clone(),
            secret_sha256: sha256_hex(&secret),
            expires_unix: expires.as_second(),
        };
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut t = tx.open_table(TOKENS).map_err(db)?;
            let json = serde_json::to_vec(&rec).map_err(db)?;
            t.insert(id.as_str(), json.as_slice()).map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(TokenInfo {
            token: Some(format!("{id}.{secret}")),
            ..info
        })
    }

    pub fn tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(TOKENS).map_err(db)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db)? {
            let (_, v) = row.map_err(db)?;
            let rec: TokenRecord = serde_json::from_slice(v.value()).map_err(db)?;
            out.push(rec.info);
        }
        Ok(out)
    }

    /// Revokes a token; false when there is no such token.
    pub fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let found = {
            let mut t = tx.open_table(TOKENS).map_err(db)?;
            let rec = match t.get(id).map_err(db)? {
                Some(v) => Some(serde_json::from_slice::<TokenRecord>(v.value()).map_err(db)?),
                None => None,
            };
            match rec {
                Some(mut rec) => {
                    rec.info.revoked = true;
                    let json = serde_json::to_vec(&rec).map_err(db)?;
                    t.insert(id, json.as_slice()).map_err(db)?;
                    true
                }
                None => false,
            }
        };
        tx.commit().map_err(db)?;
        Ok(found)
    }

    fn check(rec: Option<TokenRecord>, secret: &str) -> Result<TokenRecord, StoreError> {
        let rec = rec.ok_or(StoreError::Token(TokenProblem::Unknown))?;
        let want = rec.secret_sha256.as_bytes();
        let got = sha256_hex(secret);
        let same = want.len() == got.len()
            && want
                .iter()
                .zip(got.as_bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0;
        if !same {
            return Err(StoreError::Token(TokenProblem::Unknown));
        }
        if rec.info.revoked {
            return Err(StoreError::Token(TokenProblem::Revoked));
        }
        if now().as_second() >= rec.expires_unix {
            return Err(StoreError::Token(TokenProblem::Expired));
        }
        if rec.info.used >= rec.info.uses {
            return Err(StoreError::Token(TokenProblem::UsedUp));
        }
        Ok(rec)
    }

    /// Checks a presented token without using it; returns its record.
    pub fn validate_token(&self, token: &str) -> Result<TokenRecord, StoreError> {
        let (id, secret) = parse_token(token).ok_or(StoreError::Token(TokenProblem::Unknown))?;
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(TOKENS).map_err(db)?;
        let rec = match t.get(id).map_err(db)? {
            Some(v) => Some(serde_json::from_slice(v.value()).map_err(db)?),
            None => None,
        };
        Self::check(rec, secret)
    }

    pub fn node_by_machine(&self, machine: &str) -> Result<Option<InventoryNode>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(NODES).map_err(db)?;
        match t.get(machine).map_err(db)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(db)?)),
            None => Ok(None),
        }
    }

    pub fn node_by_name(&self, name: &str) -> Result<Option<InventoryNode>, StoreError> {
        let machine = {
            let tx = self.db.begin_read().map_err(db)?;
            let t = tx.open_table(NAMES).map_err(db)?;
            match t.get(name).map_err(db)? {
                Some(v) => v.value().to_owned(),
                None => return Ok(None),
            }
        };
        self.node_by_machine(&machine)
    }

    /// The machine that holds `name`, if any.
    pub fn name_owner(&self, name: &str) -> Result<Option<String>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(NAMES).map_err(db)?;
        Ok(t.get(name).map_err(db)?.map(|v| v.value().to_owned()))
    }

    pub fn inventory(&self) -> Result<Vec<InventoryNode>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(NODES).map_err(db)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db)? {
            let (_, v) = row.map_err(db)?;
            out.push(serde_json::from_slice(v.value()).map_err(db)?);
        }
        Ok(out)
    }

    /// Commits a join, re-join, move or renewal in one transaction: re-checks and
    /// consumes the token (`secret` given), records the use, upserts the inventory
    /// record and claims the node name. Returns the stored record.
    pub fn commit(
        &self,
        c: JoinCommit<'_>,
        secret: Option<&str>,
    ) -> Result<InventoryNode, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let stored = {
            let mut names = tx.open_table(NAMES).map_err(db)?;
            let mut nodes = tx.open_table(NODES).map_err(db)?;
            let mut tokens = tx.open_table(TOKENS).map_err(db)?;
            let machine = c.node.machine_id.clone();
            if let Some(owner) = names.get(c.node.node_name.as_str()).map_err(db)?
                && owner.value() != machine
            {
                return Err(StoreError::NameTaken {
                    name: c.node.node_name.clone(),
                    machine: owner.value().to_owned(),
                });
            }
            if let (Some(id), Some(secret)) = (c.token, secret) {
                let rec = match tokens.get(id).map_err(db)? {
                    Some(v) => Some(serde_json::from_slice(v.value()).map_err(db)?),
                    None => None,
                };
                let mut rec = Self::check(rec, secret)?;
                rec.info.used += 1;
                rec.info.history.push(TokenUse {
                    at: c.event.at.clone(),
                    machine_id: machine.clone(),
                    node_name: c.node.node_name.clone(),
                    region: c.node.region.clone(),
                });
                trim(&mut rec.info.history);
                let json = serde_json::to_vec(&rec).map_err(db)?;
                tokens.insert(id, json.as_slice()).map_err(db)?;
            }
            let old: Option<InventoryNode> = match nodes.get(machine.as_str()).map_err(db)? {
                Some(v) => Some(serde_json::from_slice(v.value()).map_err(db)?),
                None => None,
            };
            let mut node = c.node;
            if let Some(old) = old {
                node.first_joined = old.first_joined;
                node.history = old.history;
            }
            node.history.push(c.event);
            trim(&mut node.history);
            let json = serde_json::to_vec(&node).map_err(db)?;
            nodes
                .insert(machine.as_str(), json.as_slice())
                .map_err(db)?;
            names
                .insert(node.node_name.as_str(), machine.as_str())
                .map_err(db)?;
            node
        };
        tx.commit().map_err(db)?;
        Ok(stored)
    }
}

fn trim<T>(v: &mut Vec<T>) {
    if v.len() > HISTORY {
        v.drain(..v.len() - HISTORY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(machine: &str, name: &str) -> InventoryNode {
        InventoryNode {
            machine_id: machine.into(),
            node_name: name.into(),
            region: "eu-west".into(),
            first_joined: now().to_string(),
            ..Default::default()
        }
    }

    fn token_req(ttl_seconds: u64, uses: u32) -> TokenRequest {
        TokenRequest {
            ttl_seconds,
            uses,
            ..Default::default()
        }
    }

    fn event() -> JoinEvent {
        JoinEvent {
            at: now().to_string(),
            kind: "joined".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_token_is_used_up_revoked_or_forged_and_says_which() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        let t = s.create_token(&token_req(3600, 1)).unwrap();
        let token = t.token.unwrap();
        let (id, secret) = parse_token(&token).unwrap();
        s.validate_token(&token).unwrap();
        let forged = format!("{id}.{}", "a".repeat(16));
        assert!(matches!(
            s.validate_token(&forged),
            Err(StoreError::Token(TokenProblem::Unknown))
        ));
        assert!(matches!(
            s.validate_token("not-a-token"),
            Err(StoreError::Token(TokenProblem::Unknown))
        ));
        let c = JoinCommit {
            token: Some(id),
            node: node("m1", "n1"),
            event: event(),
        };
        s.commit(c, Some(secret)).unwrap();
        let c = JoinCommit {
            token: Some(id),
            node: node("m2", "n2"),
            event: event(),
        };
        assert!(matches!(
            s.commit(c, Some(secret)),
            Err(StoreError::Token(TokenProblem::UsedUp))
        ));
        // The refused join left nothing behind.
        assert!(s.node_by_machine("m2").unwrap().is_none());
        assert!(s.name_owner("n2").unwrap().is_none());
        let t2 = s.create_token(&token_req(3600, 5)).unwrap();
        assert!(s.revoke(&t2.id).unwrap());
        assert!(matches!(
            s.validate_token(t2.token.as_ref().unwrap()),
            Err(StoreError::Token(TokenProblem::Revoked))
        ));
        let t3 = s.create_token(&token_req(0, 5)).unwrap();
        assert!(matches!(
            s.validate_token(t3.token.as_ref().unwrap()),
            Err(StoreError::Token(TokenProblem::Expired))
        ));
        let listed = s.tokens().unwrap();
        let first = listed.iter().find(|i| i.id == id).unwrap();
        assert_eq!((first.used, first.history.len()), (1, 1));
        assert!(listed.iter().all(|i| i.token.is_none()));
    }

    #[test]
    fn a_name_belongs_to_one_machine_and_rejoining_keeps_history() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        s.commit(
            JoinCommit {
                token: None,
                node: node("m1", "n1"),
                event: event(),
            },
            None,
        )
        .unwrap();
        let taken = s.commit(
            JoinCommit {
                token: None,
                node: node("m2", "n1"),
                event: event(),
            },
            None,
        );
        assert!(matches!(taken, Err(StoreError::NameTaken { .. })));
        let again = s
            .commit(
                JoinCommit {
                    token: None,
                    node: node("m1", "n1"),
                    event: event(),
                },
                None,
            )
            .unwrap();
        assert_eq!(again.history.len(), 2);
        assert_eq!(s.node_by_name("n1").unwrap().unwrap().machine_id, "m1");
    }
}
