//! Removals refused by risk control (403/429 with a `RiskPolicy` cause): the
//! controller backs off — never sooner than the API server says the budget frees
//! up, doubling from 1 s up to 10 s while it keeps being refused — and says so
//! once per refusal in an Event on the workload.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Event;
use kube::Api;
use kube::api::PostParams;
use meridian_api::events::{PodRef, object_event};

const FIRST: Duration = Duration::from_secs(1);
const MAX: Duration = Duration::from_secs(10);

/// The refusal in an API error, if risk control refused: its message and the
/// seconds until it may be allowed.
pub fn risk_denial(e: &kube::Error) -> Option<(String, Option<u64>)> {
    let kube::Error::Api(s) = e else {
        return None;
    };
    let d = s.details.as_ref()?;
    d.causes.iter().any(|c| c.reason == "RiskPolicy").then(|| {
        (
            s.message.clone(),
            (d.retry_after_seconds > 0).then_some(d.retry_after_seconds.into()),
        )
    })
}

struct Entry {
    until: Instant,
    next: Duration,
    message: String,
}

/// Per workload (`Kind/namespace/name`): when removals may be tried again.
#[derive(Default)]
pub struct Denials(Mutex<HashMap<String, Entry>>);

impl Denials {
    /// Whether removals for `key` are backing off.
    pub fn blocked(&self, key: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .is_some_and(|e| Instant::now() < e.until)
    }

    /// Whether a refusal for `key` is on record (backing off or due for a retry).
    pub fn pending(&self, key: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(key)
    }

    /// The current refusal for `key`, if any (for status conditions).
    pub fn message(&self, key: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .map(|e| e.message.clone())
    }

    /// Removals for `key` went through: forget the refusal.
    pub fn clear(&self, key: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    /// Notes a failed removal. `Some(message)` when it was a risk refusal whose
    /// message is new (worth an Event); the caller backs off either way.
    pub fn note(&self, key: &str, e: &kube::Error) -> Option<String> {
        let (message, retry) = risk_denial(e)?;
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let prev = map.get(key);
        let backoff = prev.map_or(FIRST, |p| p.next);
        let wait = match retry {
            // The budget frees at a known time: no point asking before, but look
            // again within MAX in case the policy changes.
            Some(s) => Duration::from_secs(s)
                .clamp(FIRST, MAX)
                .max(backoff.min(MAX)),
            None => backoff,
        };
        let fresh = prev.is_none_or(|p| p.message != message);
        map.insert(
            key.to_owned(),
            Entry {
                until: Instant::now() + wait,
                next: (backoff * 2).min(MAX),
                message: message.clone(),
            },
        );
        fresh.then_some(message)
    }
}

/// Records a risk refusal as a Warning Event on the workload.
pub async fn report(
    client: &kube::Client,
    kind: &str,
    namespace: &str,
    name: &str,
    uid: Option<&str>,
    message: &str,
) {
    tracing::warn!(%kind, %namespace, %name, "removal refused by risk control: {message}");
    let ev = object_event(
        "apps/v1",
        kind,
        PodRef {
            namespace,
            name,
            uid,
        },
        "meridian-controllers",
        None,
        true,
        "FailedDelete",
        message,
    );
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let _ = api.create(&PostParams::default(), &ev).await;
}
