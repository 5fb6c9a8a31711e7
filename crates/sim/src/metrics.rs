//! API call latency from the server's own histograms
//! (`meridian_apiserver_request_duration_seconds`), by verb and scope, as the
//! Kubernetes API call latency SLIs count them: watches are not calls.

use std::collections::BTreeMap;

use crate::{ApiLatency, Result, SimError};

const METRIC: &str = "meridian_apiserver_request_duration_seconds_bucket";

/// Cumulative bucket counts per (verb, scope), summed over resources.
#[derive(Clone, Debug, Default)]
pub struct Snapshot(BTreeMap<(String, String), BTreeMap<u64, u64>>);

/// Bucket bounds are kept in nanoseconds so they can be map keys; `u64::MAX` is +Inf.
fn le_key(le: &str) -> Option<u64> {
    if le == "+Inf" {
        return Some(u64::MAX);
    }
    le.parse::<f64>().ok().map(|s| (s * 1e9).round() as u64)
}

fn labels(s: &str) -> BTreeMap<&str, &str> {
    let mut out = BTreeMap::new();
    for part in s.split(',') {
        if let Some((k, v)) = part.split_once('=') {
            out.insert(k.trim(), v.trim().trim_matches('"'));
        }
    }
    out
}

pub fn parse(text: &str) -> Snapshot {
    let mut snap = Snapshot::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(METRIC) else {
            continue;
        };
        let Some((inner, value)) = rest.strip_prefix('{').and_then(|r| r.split_once('}')) else {
            continue;
        };
        let l = labels(inner);
        let (Some(verb), Some(le)) = (l.get("verb"), l.get("le").and_then(|le| le_key(le))) else {
            continue;
        };
        if *verb == "watch" || *verb == "unknown" {
            continue;
        }
        // Bulk calls (up to 1,000 objects each) are not the single-object calls the
        // SLO measures: counted apart.
        let scope = if l.get("resource").is_some_and(|r| r.starts_with("bulk")) {
            BULK_SCOPE
        } else {
            l.get("scope").copied().unwrap_or("cluster")
        };
        let Ok(count) = value.trim().parse::<f64>() else {
            continue;
        };
        *snap
            .0
            .entry((verb.to_string(), scope.to_string()))
            .or_default()
            .entry(le)
            .or_default() += count as u64;
    }
    snap
}

pub async fn scrape(http: &reqwest::Client, url: &str) -> Result<Snapshot> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|source| SimError::Http {
            what: "reading the server's metrics".into(),
            source,
        })?
        .text()
        .await
        .map_err(|source| SimError::Http {
            what: "reading the server's metrics".into(),
            source,
        })?;
    Ok(parse(&text))
}

/// Quantile `q` of cumulative buckets, interpolated linearly inside the bucket
/// (the way Prometheus' `histogram_quantile` does), in milliseconds.
fn quantile(buckets: &[(u64, u64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0, |b| b.1);
    if total == 0 {
        return 0.0;
    }
    let rank = q * total as f64;
    let mut prev = (0u64, 0u64);
    for &(le, cum) in buckets {
        if cum as f64 >= rank {
            if le == u64::MAX {
                // Beyond the last finite bound: report that bound.
                return prev.0 as f64 / 1e6;
            }
            let in_bucket = (cum - prev.1).max(1) as f64;
            let frac = (rank - prev.1 as f64) / in_bucket;
            return (prev.0 as f64 + (le - prev.0) as f64 * frac) / 1e6;
        }
        prev = (le, cum);
    }
    prev.0 as f64 / 1e6
}

/// Latency per (verb, scope) of the calls made between two snapshots.
pub fn delta(before: &Snapshot, after: &Snapshot) -> Vec<ApiLatency> {
    let mut out = Vec::new();
    for ((verb, scope), b) in &after.0 {
        let a = before.0.get(&(verb.clone(), scope.clone()));
        let buckets: Vec<(u64, u64)> = b
            .iter()
            .map(|(le, c)| {
                (
                    *le,
                    c - a.and_then(|a| a.get(le)).copied().unwrap_or(0).min(*c),
                )
            })
            .collect();
        let count = buckets.last().map_or(0, |x| x.1);
        if count == 0 {
            continue;
        }
        out.push(ApiLatency {
            verb: verb.clone(),
            scope: scope.clone(),
            count,
            p50_ms: round(quantile(&buckets, 0.5)),
            p99_ms: round(quantile(&buckets, 0.99)),
        });
    }
    out
}

fn round(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}

pub fn is_mutating(verb: &str) -> bool {
    matches!(
        verb,
        "create" | "update" | "patch" | "delete" | "deletecollection"
    )
}

/// The scope the bulk endpoints' calls (`bulkpods`, `bulkbindings`,
/// `bulkpodstatuses`) are counted under.
pub const BULK_SCOPE: &str = "bulk";

/// A mutating call on one object: what the SLO's mutating latency covers.
pub fn is_single_object_mutation(l: &ApiLatency) -> bool {
    is_mutating(&l.verb) && l.scope != BULK_SCOPE
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE meridian_apiserver_request_duration_seconds histogram
meridian_apiserver_request_duration_seconds_sum{verb="create",resource="pods",scope="namespace"} 1.0
meridian_apiserver_request_duration_seconds_bucket{le="0.001",verb="create",resource="pods",scope="namespace"} 50
meridian_apiserver_request_duration_seconds_bucket{le="0.002",verb="create",resource="pods",scope="namespace"} 90
meridian_apiserver_request_duration_seconds_bucket{le="0.004",verb="create",resource="pods",scope="namespace"} 100
meridian_apiserver_request_duration_seconds_bucket{le="+Inf",verb="create",resource="pods",scope="namespace"} 100
meridian_apiserver_request_duration_seconds_bucket{le="0.001",verb="create",resource="configmaps",scope="namespace"} 0
meridian_apiserver_request_duration_seconds_bucket{le="0.002",verb="create",resource="configmaps",scope="namespace"} 0
meridian_apiserver_request_duration_seconds_bucket{le="0.004",verb="create",resource="configmaps",scope="namespace"} 0
meridian_apiserver_request_duration_seconds_bucket{le="+Inf",verb="create",resource="configmaps",scope="namespace"} 100
meridian_apiserver_request_duration_seconds_bucket{le="0.001",verb="watch",resource="pods",scope="cluster"} 0
meridian_apiserver_request_duration_seconds_bucket{le="+Inf",verb="watch",resource="pods",scope="cluster"} 7
"#;

    #[test]
    fn buckets_sum_over_resources_and_watches_are_not_calls() {
        let s = parse(TEXT);
        assert_eq!(s.0.len(), 1, "{s:?}");
        let lat = delta(&Snapshot::default(), &s);
        assert_eq!(lat.len(), 1);
        assert_eq!(
            (lat[0].verb.as_str(), lat[0].scope.as_str()),
            ("create", "namespace")
        );
        assert_eq!(lat[0].count, 200);
        // The 100th of 200 calls is the last pod create, in the 2-4 ms bucket.
        assert!((lat[0].p50_ms - 4.0).abs() < 1e-9, "{lat:?}");
        // The slowest 50% are beyond every finite bound: p99 reports the last bound.
        assert!((lat[0].p99_ms - 4.0).abs() < 1e-9, "{lat:?}");
    }

    #[test]
    fn bulk_calls_are_counted_apart_from_single_object_ones() {
        let text = TEXT.replace("resource=\"configmaps\"", "resource=\"bulkpods\"");
        let lat = delta(&Snapshot::default(), &parse(&text));
        let scopes: Vec<(&str, &str, u64)> = lat
            .iter()
            .map(|l| (l.verb.as_str(), l.scope.as_str(), l.count))
            .collect();
        assert_eq!(
            scopes,
            vec![("create", "bulk", 100), ("create", "namespace", 100)]
        );
        assert!(!is_single_object_mutation(&lat[0]));
        assert!(is_single_object_mutation(&lat[1]));
    }

    #[test]
    fn a_delta_counts_only_calls_made_in_between() {
        let before = parse(TEXT);
        let after = parse(
            &TEXT
                .replace("} 100\n", "} 110\n")
                .replace("} 90\n", "} 100\n"),
        );
        let lat = delta(&before, &after);
        assert_eq!(lat[0].count, 20, "{lat:?}");
        // Ten new calls between 1 and 2 ms, ten beyond 4 ms: p50 inside the 1-2 ms bucket.
        assert!(lat[0].p50_ms > 1.0 && lat[0].p50_ms <= 2.0, "{lat:?}");
    }
}
