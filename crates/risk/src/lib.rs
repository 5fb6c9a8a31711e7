//! Risk control, the pure part: RiskPolicies compiled for fast matching, deny
//! windows and protection decided from the object and a clock, and deletion budgets
//! kept as small records the API server stores and updates in the same transaction
//! as the deletion they count. Nothing here does I/O; the API server is the one
//! choke point that calls it (see ARCHITECTURE.md, "Risk control").

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use jiff::{SignedDuration, Timestamp};
use meridian_api::cron::Window;
use meridian_api::meridian::{RiskPolicy, UNLOCK_ANNOTATION};
use meridian_api::selectors::LabelSelector;
use serde::{Deserialize, Serialize};

/// The time risk decisions are made at: the system clock, or a manual one that
/// tests set and advance.
#[derive(Clone, Debug, Default)]
pub struct Clock(Option<Arc<AtomicI64>>);

impl Clock {
    pub fn system() -> Clock {
        Clock(None)
    }

    pub fn manual(start: Timestamp) -> Clock {
        Clock(Some(Arc::new(AtomicI64::new(start.as_microsecond()))))
    }

    pub fn now(&self) -> Timestamp {
        match &self.0 {
            None => Timestamp::now(),
            Some(us) => Timestamp::from_microsecond(us.load(Ordering::SeqCst))
                .unwrap_or(Timestamp::UNIX_EPOCH),
        }
    }

    /// Moves a manual clock on (no effect on the system clock).
    pub fn advance(&self, by: SignedDuration) {
        if let Some(us) = &self.0 {
            us.fetch_add(by.as_micros() as i64, Ordering::SeqCst);
        }
    }

    pub fn set(&self, to: Timestamp) {
        if let Some(us) = &self.0 {
            us.store(to.as_microsecond(), Ordering::SeqCst);
        }
    }
}

/// The top-level workload a pod belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub kind: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// An object about to be removed.
#[derive(Clone, Debug)]
pub struct Subject {
    pub kind: String,
    /// Stored (physical) namespace; `None` for cluster-scoped objects.
    pub namespace: Option<String>,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The value of the unlock annotation, if set.
    pub unlock_until: Option<String>,
    /// For pods: the workload that owns them (a ReplicaSet's Deployment).
    pub workload: Option<Workload>,
}

impl Subject {
    /// `Deployment/web`, or the object itself when it has no workload.
    pub fn workload_ref(&self) -> String {
        match &self.workload {
            Some(w) => format!("{}/{}", w.kind, w.name),
            None => format!("{}/{}", self.kind, self.name),
        }
    }

    pub fn describe(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Per {
    Object,
    Workload,
    Namespace,
    Policy,
}

#[derive(Clone, Debug)]
pub struct Budget {
    /// Index in `spec.rules.maxDeletions`.
    pub index: usize,
    pub count: u32,
    pub period: SignedDuration,
    pub per: Per,
}

impl Budget {
    pub fn rule(&self) -> String {
        format!("maxDeletions[{}]", self.index)
    }

    /// What one budget covers for this subject, as shown in status.
    pub fn scope(&self, s: &Subject) -> String {
        match self.per {
            Per::Object => format!("{}/{}", s.kind, s.name),
            Per::Workload => s.workload_ref(),
            Per::Namespace => format!("Namespace/{}", s.namespace.as_deref().unwrap_or("-")),
            Per::Policy => "all".to_owned(),
        }
    }

    pub fn describe(&self) -> String {
        let per = match self.per {
            Per::Object => "object",
            Per::Workload => "workload",
            Per::Namespace => "namespace",
            Per::Policy => "policy",
        };
        format!("{} per {} per {per}", self.count, human(self.period))
    }
}

fn human(d: SignedDuration) -> String {
    let s = d.as_secs();
    if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// The deny window open at some time: its index and when it closes.
type OpenWindow = Option<(usize, Timestamp)>;

/// A policy ready to match: `RiskPolicy ns/name` or `ClusterRiskPolicy name`.
#[derive(Debug)]
pub struct Policy {
    pub cluster: bool,
    /// Stored namespace of a RiskPolicy.
    pub namespace: Option<String>,
    pub name: String,
    pub uid: String,
    pub audit: bool,
    kinds: Vec<String>,
    names: Vec<String>,
    namespaces: Vec<String>,
    selector: Option<LabelSelector>,
    windows: Vec<Window>,
    pub budgets: Vec<Budget>,
    protect: bool,
    /// The open window found for the minute last asked about.
    memo: Mutex<Option<(i64, OpenWindow)>>,
}

/// Why a removal is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenialKind {
    Window,
    Protected,
    Budget,
}

#[derive(Clone, Debug)]
pub struct Denial {
    pub kind: DenialKind,
    /// `denyWindows[0]`, `protect`, `maxDeletions[1]`.
    pub rule: String,
    pub message: String,
    /// When the removal could be allowed again, if known.
    pub until: Option<Timestamp>,
}

impl Policy {
    /// Compiles a stored policy (already validated on admission; an invalid one
    /// from an older version fails here and is reported, never half-applied).
    pub fn compile(p: &RiskPolicy, cluster: bool) -> Result<Policy, String> {
        let s = &p.spec;
        let selector = s
            .selector
            .label_selector
            .as_ref()
            .map(LabelSelector::from_k8s)
            .transpose()?;
        let windows = s
            .rules
            .deny_windows
            .iter()
            .map(|w| Window::from_spec(w).map_err(|(f, e)| format!("{f}: {e}")))
            .collect::<Result<_, _>>()?;
        let budgets = s
            .rules
            .max_deletions
            .iter()
            .enumerate()
            .map(|(index, b)| {
                let period = meridian_api::duration::parse(&b.period)?;
                Ok(Budget {
                    index,
                    count: b.count.unwrap_or(0).clamp(0, u32::MAX.into()) as u32,
                    period: SignedDuration::try_from(period).map_err(|e| e.to_string())?,
                    per: match b.per.as_deref() {
                        Some("Object") => Per::Object,
                        Some("Namespace") => Per::Namespace,
                        Some("Policy") => Per::Policy,
                        _ => Per::Workload,
                    },
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Policy {
            cluster,
            namespace: p.metadata.namespace.clone(),
            name: p.metadata.name.clone().unwrap_or_default(),
            uid: p.metadata.uid.clone().unwrap_or_default(),
            audit: s.mode.as_deref() == Some("Audit"),
            kinds: s.selector.kinds.clone(),
            names: s.selector.names.clone(),
            namespaces: s.selector.namespaces.clone(),
            selector,
            windows,
            budgets,
            protect: s.rules.protect,
            memo: Mutex::new(None),
        })
    }

    /// `RiskPolicy acme.default/no-friday-deletes` (physical namespace; the API
    /// server shows tenants their own names).
    pub fn kind(&self) -> &'static str {
        if self.cluster {
            "ClusterRiskPolicy"
        } else {
            "RiskPolicy"
        }
    }

    fn matches(&self, kind: &str, name: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.kinds.is_empty() || self.kinds.iter().any(|k| k == kind))
            && (self.names.is_empty() || self.names.iter().any(|n| n == name))
            && self.selector.as_ref().is_none_or(|s| s.matches(labels))
    }

    /// Whether this policy covers the subject: the object itself matches, or it is
    /// a pod of a workload that matches (a policy on a Deployment guards its
    /// replicas).
    pub fn selects(&self, s: &Subject) -> bool {
        let ns_ok = if self.cluster {
            self.namespaces.is_empty()
                || s.namespace
                    .as_deref()
                    .is_some_and(|ns| self.namespaces.iter().any(|n| n == ns))
                || (s.kind == "Namespace" && self.namespaces.contains(&s.name))
        } else {
            s.namespace.is_some() && s.namespace == self.namespace
        };
        ns_ok
            && (self.matches(&s.kind, &s.name, &s.labels)
                || s.workload
                    .as_ref()
                    .is_some_and(|w| self.matches(&w.kind, &w.name, &w.labels)))
    }

    fn open_window(&self, now: Timestamp) -> OpenWindow {
        let minute = now.as_second().div_euclid(60);
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((m, found)) = *memo
            && m == minute
            && found.is_none_or(|(_, end)| now < end)
        {
            return found;
        }
        let found = self
            .windows
            .iter()
            .enumerate()
            .filter_map(|(i, w)| w.open_until(now).map(|end| (i, end)))
            .max_by_key(|(_, end)| *end);
        *memo = Some((minute, found));
        found
    }

    /// Deny windows and protection: decided without the store.
    pub fn check_rules(&self, s: &Subject, now: Timestamp) -> Option<Denial> {
        if let Some((i, end)) = self.open_window(now) {
            return Some(Denial {
                kind: DenialKind::Window,
                rule: format!("denyWindows[{i}]"),
                message: format!("deletions are not allowed until {end}"),
                until: Some(end),
            });
        }
        if self.protect {
            let unlock = s.unlock_until.as_deref();
            let until = unlock.and_then(|u| u.parse::<Timestamp>().ok());
            let limit = now.checked_add(SignedDuration::from_hours(24)).ok();
            let why = match (unlock, until) {
                (None, _) => format!(
                    "the object is protected; to delete it, first annotate it \
                     {UNLOCK_ANNOTATION}=<RFC 3339 time within 24h>"
                ),
                (Some(u), None) => format!("{UNLOCK_ANNOTATION}={u:?} is not an RFC 3339 time"),
                (Some(_), Some(t)) if t <= now => {
                    format!("the unlock {UNLOCK_ANNOTATION}={t} has expired")
                }
                (Some(_), Some(t)) if limit.is_some_and(|l| t > l) => format!(
                    "the unlock {UNLOCK_ANNOTATION}={t} is more than 24h ahead; \
                     unlocks must be short"
                ),
                _ => return None,
            };
            return Some(Denial {
                kind: DenialKind::Protected,
                rule: "protect".into(),
                message: why,
                until: None,
            });
        }
        None
    }

    /// Whether the subject is deletable only thanks to an unlock annotation (for
    /// the audit trail).
    pub fn unlocked(&self, s: &Subject) -> bool {
        self.protect && s.unlock_until.is_some()
    }

    /// The store key of the budget this subject counts against.
    pub fn budget_key(&self, b: &Budget, s: &Subject) -> String {
        let scope = b.scope(s);
        format!("{BUDGET_PREFIX}{}/{}/{}", self.uid, b.index, scope)
    }
}

/// Budgets live outside `/registry/`: never served, never in the watch cache.
pub const BUDGET_PREFIX: &str = "/meridian/riskbudgets/";

/// The stored form of one budget: the deletions it counted inside the period, as
/// (unix milliseconds, count) pairs, oldest first. Deletions within the same
/// wall-clock second share one entry stamped with the latest of them, so a record
/// stays small however many deletions a burst makes; a deletion may then leave the
/// period up to a second late, never early.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetRecord {
    /// `RiskPolicy acme.default/web-safety`.
    pub policy: String,
    pub rule: String,
    pub scope: String,
    pub limit: u32,
    pub period_seconds: i64,
    pub times: Vec<(i64, u32)>,
}

impl BudgetRecord {
    pub fn new(policy: &Policy, b: &Budget, s: &Subject) -> Self {
        BudgetRecord {
            policy: format!(
                "{} {}",
                policy.kind(),
                match &policy.namespace {
                    Some(ns) => format!("{ns}/{}", policy.name),
                    None => policy.name.clone(),
                }
            ),
            rule: b.rule(),
            scope: b.scope(s),
            limit: b.count,
            period_seconds: b.period.as_secs(),
            times: Vec::new(),
        }
    }

    /// Deletions counted inside the period.
    pub fn used(&self) -> u64 {
        self.times.iter().map(|(_, n)| u64::from(*n)).sum()
    }

    /// Forgets deletions that left the period (up to `now`).
    pub fn prune(&mut self, now: Timestamp, period: SignedDuration) {
        let cutoff = now.as_millisecond() - period.as_millis() as i64;
        self.times.retain(|&(t, _)| t > cutoff);
    }

    /// Counts one more deletion at `now`, or says when the next one fits (`None`:
    /// never, the budget is zero).
    pub fn charge(&mut self, b: &Budget, now: Timestamp) -> Result<(), Option<Timestamp>> {
        self.prune(now, b.period);
        self.limit = b.count;
        self.period_seconds = b.period.as_secs();
        if self.used() < u64::from(b.count) {
            let ms = now.as_millisecond();
            match self.times.last_mut() {
                Some((t, n)) if t.div_euclid(1000) == ms.div_euclid(1000) && ms >= *t => {
                    *t = ms;
                    *n += 1;
                }
                _ => self.times.push((ms, 1)),
            }
            return Ok(());
        }
        Err(self.frees_at(b.period))
    }

    /// When the oldest counted deletion leaves the period.
    pub fn frees_at(&self, period: SignedDuration) -> Option<Timestamp> {
        let (first, _) = *self.times.first()?;
        Timestamp::from_millisecond(first + period.as_millis() as i64).ok()
    }
}

#[cfg(test)]
mod tests;
