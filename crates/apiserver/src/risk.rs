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
    /// The policy object: (kind, namespace, name).
    policy_ref: (&'static str, Option<String>, String),
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

    /// How many budgets this removal spends.
    pub fn charges(&self) -> usize {
        self.puts.len()
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
    /// The newest revision at which this server wrote a risk policy: checks wait
    /// for the cache to reach it (a policy applies from the moment its write was
    /// answered), not for the whole store, so audit writes in flight never hold a
    /// delete up. Policies written through another API server apply once this
    /// server's cache has them (milliseconds).
    policy_rev: std::sync::atomic::AtomicI64,
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
            policy_rev: Default::default(),
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

    /// Notes a write answered at `rev` (only risk policies matter).
    pub fn wrote(&self, r: &Resource, rev: Revision) {
        if r.group == meridian_api::meridian::GROUP
            && matches!(r.plural, "riskpolicies" | "clusterriskpolicies")
        {
            self.policy_rev
                .fetch_max(rev, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A snapshot holding every risk policy this server has written.
    pub async fn snapshot(&self, cache: &crate::cache::Cache) -> Result<Snapshot, ApiError> {
        let rev = self.policy_rev.load(std::sync::atomic::Ordering::SeqCst);
        cache.wait_for(rev, Duration::from_secs(10)).await?;
        Ok(cache.snapshot())
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
        if charge {
            // Read every budget this removal may spend at once, not one by one.
            let mut keys = Vec::new();
            for (s, _) in subjects {
                let policies = cache
                    .entry(s.namespace.clone())
                    .or_insert_with(|| self.policies(snap, s.namespace.as_deref()));
                for (_, p) in policies.iter().filter(|(_, p)| p.selects(s)) {
                    for b in &p.budgets {
                        keys.push((p.budget_key(b, s), BudgetRecord::new(p, b, s)));
                    }
                }
            }
            keys.sort_by(|a, b| a.0.cmp(&b.0));
            keys.dedup_by(|a, b| a.0 == b.0);
            let read =
                futures::future::try_join_all(keys.into_iter().map(|(k, fresh)| async move {
                    let kv = store.get(&k).await?;
                    Ok::<_, meridian_store::StoreError>((k, kv, fresh))
                }))
                .await
                .map_err(|e| ApiError::internal(format!("risk budget: {e}")))?;
            for (k, kv, fresh) in read {
                let (rev, rec) = match kv {
                    Some(kv) => (
                        kv.mod_revision,
                        serde_json::from_slice(&kv.value).unwrap_or(fresh),
                    ),
                    None => (0, fresh),
                };
                records.insert(k, (rev, rec, false));
            }
        }
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
                    policy_ref: (p.kind(), p.namespace.clone(), p.name.clone()),
                    rule: rule.to_owned(),
                    outcome,
                    message: message.to_owned(),
                };
                let mut denial = p.check_rules(s, now);
                if denial.is_none() && charge {
                    for b in &p.budgets {
                        let bkey = p.budget_key(b, s);
                        let Some((_, rec, dirty)) = records.get_mut(&bkey) else {
                            // Read above for every selecting policy; never fail open.
                            return Err(ApiError::internal(format!("risk budget {bkey} not read")));
                        };
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
                                        rec.used(),
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
const STATUS_BUDGETS: usize = 20;
/// Budget records looked at per policy and status pass.
const STATUS_SCAN: usize = 2_000;

/// Budgets in use among `kvs`, and the records that are all spent (to delete).
fn budget_statuses(
    kvs: Vec<meridian_store::KeyValue>,
    now: Timestamp,
) -> (Vec<BudgetStatus>, Vec<(String, Revision)>) {
    let mut budgets = Vec::new();
    let mut expired = Vec::new();
    for kv in kvs {
        let Ok(mut rec) = serde_json::from_slice::<BudgetRecord>(&kv.value) else {
            continue;
        };
        let period = jiff::SignedDuration::from_secs(rec.period_seconds);
        rec.prune(now, period);
        if rec.times.is_empty() {
            expired.push((kv.key, kv.mod_revision));
            continue;
        }
        budgets.push(BudgetStatus {
            rule: rec.rule.clone(),
            scope: rec.scope.clone(),
            used: rec.used() as i64,
            limit: rec.limit.into(),
            frees_at: rec.frees_at(period).map(|t| t.to_string()),
        });
    }
    (budgets, expired)
}

async fn audit_task(
    mut rx: mpsc::UnboundedReceiver<AuditEntry>,
    store: DynStore,
    path: std::path::PathBuf,
    clock: Clock,
    shutdown: CancellationToken,
) {
    let mut file = open_log(&path);
    // Policies whose status is due, with their new denials: written at most once
    // per STATUS_EVERY each, so a storm of deletions is not a storm of writes.
    let mut dirty: BTreeMap<Arc<str>, Vec<AuditEntry>> = BTreeMap::new();
    let mut flushed = tokio::time::Instant::now();
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = rx.recv() => match e { Some(e) => Some(e), None => return },
            _ = tokio::time::sleep(STATUS_EVERY), if !dirty.is_empty() => None,
        };
        let mut batch: Vec<AuditEntry> = first.into_iter().collect();
        // Gather what arrives within a moment, so storms become one write each.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        while !batch.is_empty() && batch.len() < 10_000 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e)) => batch.push(e),
                _ => break,
            }
        }
        let mut lines = Vec::new();
        for e in &batch {
            tracing::debug!(
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
        if file.is_none() {
            file = open_log(&path);
        }
        if !lines.is_empty()
            && let Some(mut f) = file.take()
        {
            // A write and an fsync: blocking work, off the runtime's threads.
            let written = tokio::task::spawn_blocking(move || {
                let r = f.write_all(&lines).and_then(|_| f.sync_data());
                (f, r)
            })
            .await;
            match written {
                Ok((f, r)) => {
                    if let Err(e) = r {
                        tracing::error!(path = %path.display(), "cannot write the audit log: {e}");
                    }
                    file = Some(f);
                }
                Err(e) => tracing::error!("audit log writer failed: {e}"),
            }
        }
        write_events(&store, &batch).await;
        for e in batch {
            let denied = matches!(e.outcome, Outcome::Denied | Outcome::WouldDeny);
            let list = dirty.entry(e.policy_key.clone()).or_default();
            if denied {
                list.push(e);
            }
        }
        if flushed.elapsed() >= STATUS_EVERY {
            write_statuses(&store, std::mem::take(&mut dirty), clock.now()).await;
            flushed = tokio::time::Instant::now();
        }
    }
}

const STATUS_EVERY: Duration = Duration::from_secs(1);

fn open_log(path: &std::path::Path) -> Option<std::fs::File> {
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::error!(path = %path.display(), "cannot open the audit log: {e}");
            None
        }
    }
}

/// One Event per object and outcome in the batch (naming every policy and rule
/// involved), with a count.
async fn write_events(store: &DynStore, batch: &[AuditEntry]) {
    let Some(events) = meridian_api::resources::RESOURCES
        .iter()
        .find(|r| r.plural == "events" && r.group.is_empty())
    else {
        return;
    };
    // Allowed removals: one Event per policy and batch, on the policy (the objects
    // are gone; `kubectl describe riskpolicy` shows what it let through). A storm of
    // deletions is then one write per policy instead of one per object, which kept
    // the store's writer from the deletions themselves. audit.log keeps a line each.
    let mut allowed: BTreeMap<&str, Vec<&AuditEntry>> = BTreeMap::new();
    for e in batch.iter().filter(|e| e.outcome == Outcome::Allowed) {
        allowed.entry(&*e.policy_key).or_default().push(e);
    }
    let mut txn = Txn::new().lazy();
    for entries in allowed.values() {
        let e = entries[0];
        let (kind, pns, pname) = &e.policy_ref;
        let ns = pns.clone().unwrap_or_else(|| "default".into());
        let now = e.time.to_string();
        let name = format!("{pname}.risk.{}", uuid::Uuid::new_v4().simple());
        const SHOWN: usize = 10;
        let mut objects: Vec<String> = entries
            .iter()
            .take(SHOWN)
            .map(|x| match &x.namespace {
                Some(n) => format!("{} {n}/{} ({})", x.kind, x.name, x.action.as_str()),
                None => format!("{} {} ({})", x.kind, x.name, x.action.as_str()),
            })
            .collect();
        if entries.len() > SHOWN {
            objects.push(format!("and {} more", entries.len() - SHOWN));
        }
        let mut users: Vec<&str> = entries.iter().map(|x| x.user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        let ev = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": ns, "uid": uuid::Uuid::new_v4().to_string(),
                "creationTimestamp": now},
            "involvedObject": {"apiVersion": meridian_api::meridian::API_VERSION, "kind": kind,
                "name": pname, "namespace": pns},
            "reason": Outcome::Allowed.reason(),
            "message": format!("allowed {} removal(s) by {}: {}", entries.len(), users.join(", "), objects.join(", ")),
            "type": "Normal",
            "source": {"component": "meridian-risk-control"},
            "reportingComponent": "meridian-risk-control",
            "firstTimestamp": now, "lastTimestamp": entries[entries.len() - 1].time.to_string(),
            "count": entries.len(),
        });
        let key = events.storage_key(Some(&ns), &name);
        txn = txn
            .when(key.clone(), 0)
            .put(key, Bytes::from(ev.to_string()));
    }
    // Everything else (refusals, unlocks, audit-mode would-be refusals): one Event
    // per object. (namespace, kind, name, outcome) -> (count, entries)
    type Key<'a> = (Option<&'a str>, &'a str, &'a str, &'a str);
    let mut groups: BTreeMap<Key<'_>, (usize, Vec<&AuditEntry>)> = BTreeMap::new();
    for e in batch.iter().filter(|e| e.outcome != Outcome::Allowed) {
        let k = (
            e.namespace.as_deref(),
            e.kind.as_str(),
            e.name.as_str(),
            e.outcome.as_str(),
        );
        let g = groups.entry(k).or_default();
        if !g.1.iter().any(|x| x.policy == e.policy && x.rule == e.rule) {
            g.1.push(e);
        }
        g.0 += 1;
    }
    for (count, entries) in groups.into_values() {
        let e = entries[0];
        if e.name.is_empty() {
            continue;
        }
        let count = count / entries.len().max(1);
        let ns = e.namespace.clone().unwrap_or_else(|| "default".into());
        let now = e.time.to_string();
        let name = format!("{}.risk.{}", e.name, uuid::Uuid::new_v4().simple());
        let under = entries
            .iter()
            .map(|x| {
                if x.rule.is_empty() {
                    x.policy.clone()
                } else {
                    format!("{} rule {}", x.policy, x.rule)
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        let message = match e.outcome {
            Outcome::Unlocked => format!(
                "{} by {} of a protected object allowed by its {UNLOCK_ANNOTATION} annotation ({under})",
                e.action.as_str(),
                e.user
            ),
            _ => format!(
                "{} by {} refused{}: {under}: {}",
                e.action.as_str(),
                e.user,
                if e.outcome == Outcome::WouldDeny {
                    " (audit mode: allowed)"
                } else {
                    ""
                },
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
        txn = txn
            .when(key.clone(), 0)
            .put(key, Bytes::from(ev.to_string()));
    }
    // One write for the whole batch (names are unique, so it cannot conflict).
    if !txn.ops.is_empty()
        && let Err(err) = store.txn(txn).await
    {
        tracing::warn!("cannot record risk events: {err}");
    }
}

/// Refreshes the status of every policy the batch touched: budgets from the
/// store, the newest denials first.
async fn write_statuses(
    store: &DynStore,
    touched: BTreeMap<Arc<str>, Vec<AuditEntry>>,
    now: Timestamp,
) {
    // All of them in one write; a policy changed meanwhile means a fresh attempt.
    for _ in 0..5 {
        let mut txn = Txn::new().lazy();
        for (key, denials) in &touched {
            let Ok(Some(kv)) = store.get(key).await else {
                continue;
            };
            let Ok(mut obj) = serde_json::from_slice::<Value>(&kv.value) else {
                continue;
            };
            let uid = obj["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let prefix = format!("{}{uid}/", meridian_risk::BUDGET_PREFIX);
            let kvs = store
                .range(&prefix, None, STATUS_SCAN)
                .await
                .map(|r| r.kvs)
                .unwrap_or_default();
            // Parsing thousands of records is CPU work: keep it off the runtime.
            let (mut budgets, expired) =
                tokio::task::spawn_blocking(move || budget_statuses(kvs, now))
                    .await
                    .unwrap_or_default();
            for (k, rev) in expired {
                // Spent deletions all left the period: forget the record (unless a
                // deletion was just counted in it).
                let _ = store.delete(&k, rev).await;
            }
            // The busiest budgets, at most STATUS_BUDGETS of them.
            budgets.sort_by(|a, b| b.used.cmp(&a.used).then_with(|| a.scope.cmp(&b.scope)));
            budgets.truncate(STATUS_BUDGETS);
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
            let status = json!({"budgets": budgets, "lastDenials": last});
            if obj["status"] == status {
                continue;
            }
            obj["status"] = status;
            txn = txn
                .when(key.to_string(), kv.mod_revision)
                .put(key.to_string(), Bytes::from(obj.to_string()));
        }
        if txn.ops.is_empty() {
            return;
        }
        match store.txn(txn).await {
            Ok(r) if r.succeeded => return,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!("cannot write risk policy status: {e}");
                return;
            }
        }
    }
}
