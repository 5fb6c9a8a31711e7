//! Risk control's choke point. Every path that removes an object or a running
//! replica — DELETE, deletecollection, namespace and tenant deletion, scale-down,
//! the garbage collector's and controllers' deletes (they use DELETE too), and a
//! region's node-loss eviction (a pod status write) — asks [`RiskGate::check`]
//! before it writes. A permitted removal carries its budget updates into the same
//! store transaction as the removal itself, guarded by the budgets' revisions, so
//! concurrent deleters on any number of API servers sharing one store never
//! overspend a budget: the losers of the race re-read and are denied.
//!
//! Allowed, denied and (in audit mode) would-be-denied removals go to a background
//! task that appends them to `DATA/audit.log`, records Events and keeps each
//! policy's status (budgets in use, last denials) current.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
use meridian_api::meridian::{BudgetStatus, DenialRecord, RiskPolicy, UNLOCK_ANNOTATION};
use meridian_api::{ApiError, Reason, Resource};
use meridian_risk::{BudgetRecord, Clock, DenialKind, Policy, Subject, Workload};
use meridian_store::{DynStore, Revision, Txn};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cache::Snapshot;
use crate::tenancy::split_physical;

/// What kind of removal is being checked (for messages and the audit log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Delete,
    /// A region marking a pod of an unreachable node for rescheduling.
    Evict,
    /// Lowering a workload's replicas (checked for windows and protection; each
    /// pod then removed is counted against budgets when it is deleted).
    ScaleDown,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Delete => "delete",
            Action::Evict => "evict",
            Action::ScaleDown => "scale-down",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Allowed,
    Unlocked,
    Denied,
    WouldDeny,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Unlocked => "allowed-by-unlock",
            Outcome::Denied => "denied",
            Outcome::WouldDeny => "would-deny",
        }
    }
    fn reason(self) -> &'static str {
        match self {
            Outcome::Allowed => "RiskAllowed",
            Outcome::Unlocked => "RiskUnlocked",
            Outcome::Denied => "RiskDenied",
            Outcome::WouldDeny => "RiskWouldDeny",
        }
    }
}

/// One line of the audit trail.
#[derive(Clone, Debug)]
struct AuditEntry {
    time: Timestamp,
    user: String,
    action: Action,
    kind: String,
    namespace: Option<String>,
    name: String,
    uid: Option<String>,
    policy_key: Arc<str>,
    policy: String,
    rule: String,
    outcome: Outcome,
    message: String,
}

/// The writes a permitted removal must commit with it, and what to audit once
/// it has.
#[derive(Default)]
pub struct Permit {
    compares: Vec<(String, Revision)>,
    puts: Vec<(String, Bytes)>,
    audit: Vec<AuditEntry>,
}

impl Permit {
    /// Adds the budget guards and updates to a transaction.
    pub fn apply(&self, mut txn: Txn) -> Txn {
        for (k, rev) in &self.compares {
            txn = txn.when(k.clone(), *rev);
        }
        for (k, v) in &self.puts {
            txn = txn.put(k.clone(), v.clone());
        }
        txn
    }

    /// The removal was written: record it.
    pub fn committed(self, gate: &RiskGate) {
        for e in self.audit {
            let _ = gate.audit.send(e);
        }
    }
}

/// A stored policy compiled at a revision (`None`: it does not compile).
type Compiled = (Revision, Option<Arc<Policy>>);
/// Policies by key.
type Policies = Vec<(Arc<str>, Arc<Policy>)>;

/// Shared by all request handlers of one API server.
pub struct RiskGate {
    pub clock: Clock,
    compiled: RwLock<HashMap<Arc<str>, Compiled>>,
    audit: mpsc::UnboundedSender<AuditEntry>,
}

fn resource(plural: &str) -> Option<&'static Resource> {
    meridian_api::resources::RESOURCES
        .iter()
        .find(|r| r.plural == plural && r.group == meridian_api::meridian::GROUP)
}

fn labels_of(obj: &Value, at: &str) -> BTreeMap<String, String> {
    obj.pointer(at)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn controller(obj: &Value) -> Option<(String, String)> {
    obj["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| o["controller"] == Value::Bool(true))
        .map(|o| {
            (
                o["kind"].as_str().unwrap_or_default().to_owned(),
                o["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

/// A workload object by kind, from the snapshot.
fn workload_object(snap: &Snapshot, ns: &str, kind: &str, name: &str) -> Option<Value> {
    let r = meridian_api::resources::RESOURCES
        .iter()
        .find(|r| r.kind == kind && r.namespaced())?;
    snap.get(&r.storage_key(Some(ns), name)).map(|o| o.value())
}

impl RiskGate {
    pub fn new(
        clock: Clock,
        store: DynStore,
        data_dir: &std::path::Path,
        shutdown: CancellationToken,
    ) -> Arc<RiskGate> {
        let (tx, rx) = mpsc::unbounded_channel();
        let gate = Arc::new(RiskGate {
            clock,
            compiled: RwLock::new(HashMap::new()),
            audit: tx,
        });
        tokio::spawn(audit_task(
            rx,
            store,
            data_dir.join("audit.log"),
            gate.clock.clone(),
            shutdown,
        ));
        gate
    }

    /// The subject of a stored object (physical names), with its workload.
    pub fn subject(snap: &Snapshot, r: &Resource, obj: &Value) -> Subject {
        let meta = &obj["metadata"];
        let namespace = meta["namespace"].as_str().map(str::to_owned);
        let mut workload = None;
        if r.kind == "Pod"
            && let (Some(ns), Some((mut kind, mut name))) = (namespace.as_deref(), controller(obj))
        {
            let mut labels = BTreeMap::new();
            // A ReplicaSet's pods belong to its Deployment when it has one.
            if let Some(w) = workload_object(snap, ns, &kind, &name) {
                labels = labels_of(&w, "/metadata/labels");
                if kind == "ReplicaSet"
                    && let Some((k, n)) = controller(&w)
                    && let Some(d) = workload_object(snap, ns, &k, &n)
                {
                    labels = labels_of(&d, "/metadata/labels");
                    (kind, name) = (k, n);
                }
            }
            workload = Some(Workload { kind, name, labels });
        }
        Subject {
            kind: r.kind.to_owned(),
            namespace,
            name: meta["name"].as_str().unwrap_or_default().to_owned(),
            labels: labels_of(obj, "/metadata/labels"),
            unlock_until: meta["annotations"][UNLOCK_ANNOTATION]
                .as_str()
                .map(str::to_owned),
            workload,
        }
    }

    /// A stand-in for the replicas a scale-down of `workload` removes.
    pub fn replica_of(snap: &Snapshot, r: &Resource, workload: &Value) -> Subject {
        let meta = &workload["metadata"];
        let ns = meta["namespace"].as_str().unwrap_or_default();
        let mut w = Workload {
            kind: r.kind.to_owned(),
            name: meta["name"].as_str().unwrap_or_default().to_owned(),
            labels: labels_of(workload, "/metadata/labels"),
        };
        if r.kind == "ReplicaSet"
            && let Some((k, n)) = controller(workload)
            && let Some(d) = workload_object(snap, ns, &k, &n)
        {
            w = Workload {
                kind: k,
                name: n,
                labels: labels_of(&d, "/metadata/labels"),
            };
        }
        Subject {
            kind: "Pod".into(),
            namespace: Some(ns.to_owned()),
            name: String::new(),
            labels: labels_of(workload, "/spec/template/metadata/labels"),
            unlock_until: None,
            workload: Some(w),
        }
    }

    fn compiled(
        &self,
        key: &Arc<str>,
        rev: Revision,
        json: &Bytes,
        cluster: bool,
    ) -> Option<Arc<Policy>> {
        if let Some((r, p)) = self
            .compiled
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            && *r == rev
        {
            return p.clone();
        }
        let p = serde_json::from_slice::<RiskPolicy>(json)
            .map_err(|e| e.to_string())
            .and_then(|p| Policy::compile(&p, cluster));
        let p = match p {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                tracing::error!(policy = %key, "risk policy cannot be compiled, ignored: {e}");
                None
            }
        };
        let mut map = self.compiled.write().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            map.clear();
        }
        map.insert(key.clone(), (rev, p.clone()));
        p
    }

    /// The policies that may cover objects of namespace `ns` (and cluster-scoped
    /// objects when `None`).
    fn policies(&self, snap: &Snapshot, ns: Option<&str>) -> Policies {
        let mut out = Vec::new();
        if let (Some(ns), Some(r)) = (ns, resource("riskpolicies")) {
            let prefix = format!("{}{ns}/", r.storage_prefix());
            for o in snap.range(&prefix, None) {
                if let Some(p) = self.compiled(&o.key, o.mod_revision, &o.json, false) {
                    out.push((o.key.clone(), p));
                }
            }
        }
        if let Some(r) = resource("clusterriskpolicies") {
            for o in snap.range(&r.storage_prefix(), None) {
                if let Some(p) = self.compiled(&o.key, o.mod_revision, &o.json, true) {
                    out.push((o.key.clone(), p));
                }
            }
        }
        out
    }

    /// Decides whether `subjects` may be removed by `user`. With `charge`, the
    /// removal counts against deletion budgets (the returned permit carries the
    /// updates); without, only windows and protection apply. `tenant` is the
    /// caller's tenant, to show policy names as the caller knows them.
    #[allow(clippy::too_many_arguments)]
    pub async fn check(
        &self,
        store: &DynStore,
        snap: &Snapshot,
        user: &str,
        tenant: Option<&str>,
        action: Action,
        subjects: &[(Subject, Option<String>)],
        charge: bool,
    ) -> Result<Permit, ApiError> {
        let now = self.clock.now();
        let mut permit = Permit::default();
        let mut records: HashMap<String, (Revision, BudgetRecord, bool)> = HashMap::new();
        let mut cache: HashMap<Option<String>, Policies> = HashMap::new();
        let show_ns = |ns: &str| match tenant {
            Some(_) => split_physical(ns).1.to_owned(),
            None => ns.to_owned(),
        };
        for (s, uid) in subjects {
            let policies = cache
                .entry(s.namespace.clone())
                .or_insert_with(|| self.policies(snap, s.namespace.as_deref()));
            for (key, p) in policies.iter() {
                if !p.selects(s) {
                    continue;
                }
                let policy = match &p.namespace {
                    Some(ns) => format!("{} {}/{}", p.kind(), show_ns(ns), p.name),
                    None => format!("{} {}", p.kind(), p.name),
                };
                let entry = |outcome: Outcome, rule: &str, message: &str| AuditEntry {
                    time: now,
                    user: user.to_owned(),
                    action,
                    kind: s.kind.clone(),
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    uid: uid.clone(),
                    policy_key: key.clone(),
                    policy: policy.clone(),
                    rule: rule.to_owned(),
                    outcome,
                    message: message.to_owned(),
                };
                let mut denial = p.check_rules(s, now);
                if denial.is_none() && charge {
                    for b in &p.budgets {
                        let bkey = p.budget_key(b, s);
                        if !records.contains_key(&bkey) {
                            let kv = store
                                .get(&bkey)
                                .await
                                .map_err(|e| ApiError::internal(format!("risk budget: {e}")))?;
                            let (rev, rec) = match kv {
                                Some(kv) => (
                                    kv.mod_revision,
                                    serde_json::from_slice(&kv.value)
                                        .unwrap_or_else(|_| BudgetRecord::new(p, b, s)),
                                ),
                                None => (0, BudgetRecord::new(p, b, s)),
                            };
                            records.insert(bkey.clone(), (rev, rec, false));
                        }
                        let (_, rec, dirty) = records.get_mut(&bkey).expect("just inserted");
                        match rec.charge(b, now) {
                            Ok(()) => *dirty = true,
                            Err(until) => {
                                let when = match until {
                                    Some(t) => format!("the budget frees up at {t}"),
                                    None => "the budget is zero".to_owned(),
                                };
                                denial = Some(meridian_risk::Denial {
                                    kind: DenialKind::Budget,
                                    rule: b.rule(),
                                    message: format!(
                                        "{} already deleted {} ({}); {when}",
                                        rec.times.len(),
                                        b.scope(s),
                                        b.describe()
                                    ),
                                    until,
                                });
                                break;
                            }
                        }
                    }
                }
                match denial {
                    Some(d) if p.audit => {
                        permit
                            .audit
                            .push(entry(Outcome::WouldDeny, &d.rule, &d.message));
                    }
                    Some(d) => {
                        let message = format!(
                            "{} of {} denied by {policy}, rule {}: {}",
                            action.as_str(),
                            match &s.namespace {
                                Some(ns) if s.name.is_empty() =>
                                    format!("replicas in {}", show_ns(ns)),
                                Some(ns) => format!("{} {}/{}", s.kind, show_ns(ns), s.name),
                                None => format!("{} {}", s.kind, s.name),
                            },
                            d.rule,
                            d.message
                        );
                        let _ = self.audit.send(entry(Outcome::Denied, &d.rule, &d.message));
                        return Err(denied(&d, &policy, message, now));
                    }
                    None => {
                        let (outcome, rule) = if p.unlocked(s) {
                            (Outcome::Unlocked, "protect")
                        } else {
                            (Outcome::Allowed, "")
                        };
                        if action != Action::ScaleDown {
                            permit.audit.push(entry(outcome, rule, ""));
                        }
                    }
                }
            }
        }
        for (key, (rev, rec, dirty)) in records {
            if dirty {
                let value = serde_json::to_vec(&rec)
                    .map_err(|e| ApiError::internal(format!("risk budget: {e}")))?;
                permit.compares.push((key.clone(), rev));
                permit.puts.push((key, Bytes::from(value)));
            }
        }
        Ok(permit)
    }

    /// Sends audit entries of a permit that needs no store write (scale-down).
    pub fn record(&self, permit: Permit) {
        permit.committed(self);
    }
}

fn denied(d: &meridian_risk::Denial, policy: &str, message: String, now: Timestamp) -> ApiError {
    let reason = match d.kind {
        DenialKind::Budget => Reason::TooManyRequests,
        DenialKind::Window | DenialKind::Protected => Reason::Forbidden,
    };
    let mut e = ApiError::new(reason, message);
    e.causes = vec![meridian_api::Cause {
        reason: "RiskPolicy",
        field: format!("spec.rules.{}", d.rule),
        message: format!("{policy}: {}", d.message),
    }];
    e.retry_after = d
        .until
        .map(|t| now.duration_until(t).as_secs().max(1) as u64);
    e
}

// ------------------------------------------------------------------ audit task

const LAST_DENIALS: usize = 10;

async fn audit_task(
    mut rx: mpsc::UnboundedReceiver<AuditEntry>,
    store: DynStore,
    path: std::path::PathBuf,
    clock: Clock,
    shutdown: CancellationToken,
) {
    let mut file = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::error!(path = %path.display(), "cannot open the audit log: {e}");
            None
        }
    };
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = rx.recv() => match e { Some(e) => e, None => return },
        };
        let mut batch = vec![first];
        // Gather what arrives within a moment, so storms become one write each.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        while batch.len() < 10_000 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e)) => batch.push(e),
                _ => break,
            }
        }
        let mut lines = Vec::new();
        for e in &batch {
            tracing::info!(
                target: "meridian::audit",
                user = %e.user, action = e.action.as_str(), kind = %e.kind,
                namespace = e.namespace.as_deref().unwrap_or(""), name = %e.name,
                policy = %e.policy, rule = %e.rule, outcome = e.outcome.as_str(),
                "{}", e.message
            );
            let line = json!({"time": e.time.to_string(), "user": e.user, "action": e.action.as_str(),
                "kind": e.kind, "namespace": e.namespace, "name": e.name, "policy": e.policy,
                "rule": e.rule, "outcome": e.outcome.as_str(), "message": e.message});
            lines.extend_from_slice(line.to_string().as_bytes());
            lines.push(b'\n');
        }
        if let Some(f) = file.as_mut()
            && let Err(e) = f.write_all(&lines).and_then(|_| f.sync_data())
        {
            tracing::error!(path = %path.display(), "cannot write the audit log: {e}");
        }
        write_events(&store, &batch).await;
        write_statuses(&store, &batch, clock.now()).await;
    }
}

/// One Event per object, policy, rule and outcome in the batch, with a count.
async fn write_events(store: &DynStore, batch: &[AuditEntry]) {
    let Some(events) = meridian_api::resources::RESOURCES
        .iter()
        .find(|r| r.plural == "events" && r.group.is_empty())
    else {
        return;
    };
    // (namespace, kind, name, policy, rule, outcome) -> (count, an entry)
    type Key<'a> = (String, String, String, String, &'a str, &'a str);
    let mut groups: BTreeMap<Key<'_>, (usize, &AuditEntry)> = BTreeMap::new();
    for e in batch {
        let k = (
            e.namespace.clone().unwrap_or_default(),
            e.kind.clone(),
            e.name.clone(),
            e.policy.clone(),
            e.rule.as_str(),
            e.outcome.as_str(),
        );
        groups.entry(k).or_insert((0, e)).0 += 1;
    }
    for ((_, _, _, _, _, _), (count, e)) in groups {
        if e.name.is_empty() {
            continue;
        }
        let ns = e.namespace.clone().unwrap_or_else(|| "default".into());
        let now = e.time.to_string();
        let name = format!("{}.risk.{}", e.name, uuid::Uuid::new_v4().simple());
        let message = match e.outcome {
            Outcome::Allowed => format!("{} allowed under {}", e.action.as_str(), e.policy),
            Outcome::Unlocked => format!(
                "{} of a protected object allowed by its {UNLOCK_ANNOTATION} annotation ({})",
                e.action.as_str(),
                e.policy
            ),
            _ => format!(
                "{} by {}: {} rule {}: {}",
                e.action.as_str(),
                e.user,
                e.policy,
                e.rule,
                e.message
            ),
        };
        let warning = matches!(e.outcome, Outcome::Denied | Outcome::WouldDeny);
        let ev = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": ns, "uid": uuid::Uuid::new_v4().to_string(),
                "creationTimestamp": now},
            "involvedObject": {"kind": e.kind, "name": e.name, "namespace": e.namespace, "uid": e.uid},
            "reason": e.outcome.reason(),
            "message": message,
            "type": if warning { "Warning" } else { "Normal" },
            "source": {"component": "meridian-risk-control"},
            "reportingComponent": "meridian-risk-control",
            "firstTimestamp": now, "lastTimestamp": now, "count": count,
        });
        let key = events.storage_key(Some(&ns), &name);
        if let Err(err) = store.create(&key, Bytes::from(ev.to_string())).await {
            tracing::warn!("cannot record a risk event: {err}");
        }
    }
}

/// Refreshes the status of every policy the batch touched: budgets from the
/// store, the newest denials first.
async fn write_statuses(store: &DynStore, batch: &[AuditEntry], now: Timestamp) {
    let mut touched: BTreeMap<Arc<str>, Vec<&AuditEntry>> = BTreeMap::new();
    for e in batch {
        let list = touched.entry(e.policy_key.clone()).or_default();
        if matches!(e.outcome, Outcome::Denied | Outcome::WouldDeny) {
            list.push(e);
        }
    }
    for (key, denials) in touched {
        for _ in 0..5 {
            let Ok(Some(kv)) = store.get(&key).await else {
                break;
            };
            let Ok(mut obj) = serde_json::from_slice::<Value>(&kv.value) else {
                break;
            };
            let uid = obj["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let prefix = format!("{}{uid}/", meridian_risk::BUDGET_PREFIX);
            let mut budgets = Vec::new();
            if let Ok(r) = store.range(&prefix, None, 10_000).await {
                for kv in r.kvs {
                    let Ok(mut rec) = serde_json::from_slice::<BudgetRecord>(&kv.value) else {
                        continue;
                    };
                    let period = jiff::SignedDuration::from_secs(rec.period_seconds);
                    rec.prune(now, period);
                    if rec.times.is_empty() {
                        continue;
                    }
                    budgets.push(BudgetStatus {
                        rule: rec.rule.clone(),
                        scope: rec.scope.clone(),
                        used: rec.times.len() as i64,
                        limit: rec.limit.into(),
                        frees_at: rec.frees_at(period).map(|t| t.to_string()),
                    });
                }
            }
            let mut last: Vec<DenialRecord> = denials
                .iter()
                .rev()
                .take(LAST_DENIALS)
                .map(|e| DenialRecord {
                    time: e.time.to_string(),
                    user: e.user.clone(),
                    object: format!("{}/{}", e.kind, e.name),
                    rule: e.rule.clone(),
                    message: e.message.clone(),
                    audit_only: e.outcome == Outcome::WouldDeny,
                })
                .collect();
            if let Some(old) = obj["status"]["lastDenials"].as_array() {
                last.extend(
                    old.iter()
                        .filter_map(|v| serde_json::from_value(v.clone()).ok())
                        .take(LAST_DENIALS.saturating_sub(last.len())),
                );
            }
            obj["status"] = json!({"budgets": budgets, "lastDenials": last});
            match store
                .update(&key, Bytes::from(obj.to_string()), kv.mod_revision)
                .await
            {
                Ok(Some(_)) => break,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(policy = %key, "cannot write risk policy status: {e}");
                    break;
                }
            }
        }
    }
}
