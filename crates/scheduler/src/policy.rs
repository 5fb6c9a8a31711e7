//! PlacementPolicy, compiled for the engine: node predicates for `locations`,
//! replica targets for `distribution`, group spread, latency areas and scoring
//! preferences. Pure; no I/O.

use std::collections::{BTreeMap, BTreeSet};

use meridian_api::geo;
use meridian_api::meridian::{
    CITY_KEY, COUNTRY_KEY, ISP_KEY, LocationTerm, MACHINE_KEY, ObjectiveStatus, PlacementPolicy,
    PlacementPolicyStatus, REGION_KEY, SOURCE_KEY,
};

use crate::engine::{Labels, NodeInfo};

/// At most this many latency areas per policy (a bit each in a node's coverage mask).
pub const MAX_AREAS: usize = 64;

/// AND of (label key, accepted values).
pub type Term = Vec<(&'static str, Vec<String>)>;

#[derive(Clone, Debug, PartialEq)]
pub enum DistributionRule {
    /// (label key, value, replicas): exact counts.
    Counts(Vec<(&'static str, String, i64)>),
    /// (label key, value, weight): proportional shares.
    Weights(Vec<(&'static str, String, i64)>),
    /// Shares in proportion to free cpu per domain of this key.
    ByCapacity(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct SpreadRule {
    pub key: String,
    pub max_skew: i64,
    pub min_groups: Option<usize>,
    pub max_groups: Option<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LatencyArea {
    pub name: String,
    pub point: (f64, f64),
    pub radius_km: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LatencyRule {
    pub max_rtt_ms: f64,
    pub areas: Vec<LatencyArea>,
}

/// A PlacementPolicy as the engine uses it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyRules {
    /// `namespace/name@resourceVersion`: identifies cached per-policy data.
    pub key: String,
    /// `namespace/name`, for messages.
    pub name: String,
    pub include: Vec<Term>,
    pub exclude: Vec<Term>,
    pub distribution: Option<DistributionRule>,
    pub spread: Option<SpreadRule>,
    pub latency: Option<LatencyRule>,
    pub most_allocated: bool,
    pub cheap_bandwidth: bool,
    /// Value for the pod's reschedule-grace annotation (`600s`, `never`).
    pub reschedule_grace: Option<String>,
}

fn term(t: &LocationTerm) -> Term {
    let mut out = Vec::new();
    for (key, values) in [
        (REGION_KEY, &t.regions),
        (COUNTRY_KEY, &t.countries),
        (ISP_KEY, &t.isps),
        (SOURCE_KEY, &t.sources),
        (MACHINE_KEY, &t.machines),
    ] {
        if !values.is_empty() {
            out.push((key, values.clone()));
        }
    }
    if !t.cities.is_empty() {
        out.push((
            CITY_KEY,
            t.cities.iter().map(|c| geo::city_label(c)).collect(),
        ));
    }
    out
}

fn term_matches(t: &Term, labels: &Labels) -> bool {
    t.iter()
        .all(|(k, vs)| labels.get(*k).is_some_and(|v| vs.iter().any(|x| x == v)))
}

impl PolicyRules {
    /// `namespace/name@resourceVersion`: one key per version of a policy.
    pub fn key_of(p: &PlacementPolicy) -> String {
        format!(
            "{}/{}@{}",
            p.metadata.namespace.as_deref().unwrap_or_default(),
            p.metadata.name.as_deref().unwrap_or_default(),
            p.metadata.resource_version.as_deref().unwrap_or_default()
        )
    }

    /// Compiles a stored (hence validated) policy.
    pub fn compile(p: &PlacementPolicy) -> PolicyRules {
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        let name = format!("{ns}/{}", p.metadata.name.clone().unwrap_or_default());
        let s = &p.spec;
        let shares = |list: &[meridian_api::meridian::LocationShare], counts: bool| {
            list.iter()
                .filter_map(|e| {
                    let (k, v) = e.label()?;
                    let n = if counts { e.replicas } else { e.weight };
                    Some((k, v, i64::from(n.unwrap_or(0).max(0))))
                })
                .collect::<Vec<_>>()
        };
        let distribution = s.distribution.as_ref().and_then(|d| {
            if !d.counts.is_empty() {
                Some(DistributionRule::Counts(shares(&d.counts, true)))
            } else if !d.weights.is_empty() {
                Some(DistributionRule::Weights(shares(&d.weights, false)))
            } else {
                d.by_capacity.clone().map(DistributionRule::ByCapacity)
            }
        });
        let latency = s.latency.as_ref().map(|l| LatencyRule {
            max_rtt_ms: l.max_rtt_ms,
            areas: l
                .areas
                .iter()
                .filter_map(|a| a.resolve().ok())
                .take(MAX_AREAS)
                .map(|(name, point, radius_km)| LatencyArea {
                    name,
                    point,
                    radius_km,
                })
                .collect(),
        });
        let reschedule_grace = s.failover.as_ref().map(|f| {
            if f.pin {
                "never".to_owned()
            } else {
                format!("{}s", f.after_seconds.unwrap_or(300))
            }
        });
        PolicyRules {
            key: Self::key_of(p),
            name,
            include: s
                .locations
                .iter()
                .flat_map(|l| l.include.iter().map(term))
                .collect(),
            exclude: s
                .locations
                .iter()
                .flat_map(|l| l.exclude.iter().map(term))
                .collect(),
            distribution,
            spread: s.spread.as_ref().map(|sp| SpreadRule {
                key: sp.topology_key.clone().unwrap_or_else(|| CITY_KEY.into()),
                max_skew: i64::from(sp.max_skew.unwrap_or(1).max(1)),
                min_groups: sp.min_groups.map(|g| g.max(1) as usize),
                max_groups: sp.max_groups.map(|g| g.max(1) as usize),
            }),
            latency,
            most_allocated: s.scoring.as_ref().and_then(|s| s.strategy.as_deref())
                == Some("MostAllocated"),
            cheap_bandwidth: s.scoring.as_ref().is_some_and(|s| s.prefer_cheap_bandwidth),
            reschedule_grace,
        }
    }

    /// Whether `locations` allows the node.
    pub fn allows(&self, labels: &Labels) -> bool {
        (self.include.is_empty() || self.include.iter().any(|t| term_matches(t, labels)))
            && !self.exclude.iter().any(|t| term_matches(t, labels))
    }

    /// The bit mask of latency areas this node serves within the objective.
    pub fn coverage(&self, n: &NodeInfo) -> u64 {
        let Some(l) = &self.latency else { return 0 };
        let mut mask = 0u64;
        for (i, a) in l.areas.iter().enumerate() {
            if rtt_ms(n, a).is_some_and(|r| r <= l.max_rtt_ms) {
                mask |= 1 << i;
            }
        }
        mask
    }
}

/// Round-trip time from a node to the farthest user of an area: measured when the
/// node reports it for the area's name, else estimated from coordinates.
pub fn rtt_ms(n: &NodeInfo, a: &LatencyArea) -> Option<f64> {
    if let Some((_, ms)) = n.measured_rtt.iter().find(|(k, _)| *k == a.name) {
        return Some(*ms);
    }
    let c = n.coordinates?;
    Some(geo::estimate_rtt_ms(
        geo::distance_km(c, a.point) + a.radius_km,
    ))
}

/// Divides `total` in proportion to `weights` (largest remainder; ties to the
/// earlier entry). Zero weights get zero; all-zero weights get nothing.
pub fn apportion(total: i64, weights: &[i64]) -> Vec<i64> {
    let sum: i64 = weights.iter().map(|w| (*w).max(0)).sum();
    if sum == 0 || total <= 0 {
        return vec![0; weights.len()];
    }
    let mut out: Vec<i64> = weights
        .iter()
        .map(|w| (total as i128 * (*w).max(0) as i128 / sum as i128) as i64)
        .collect();
    let mut rest = total - out.iter().sum::<i64>();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by_key(|&i| {
        let rem = (total as i128 * weights[i].max(0) as i128) % sum as i128;
        (std::cmp::Reverse(rem), i)
    });
    for i in order {
        if rest == 0 {
            break;
        }
        if weights[i] > 0 {
            out[i] += 1;
            rest -= 1;
        }
    }
    out
}

/// Replica targets per location label value, for a group of `total` replicas.
/// `capacity` gives free cpu per domain (for `ByCapacity`).
pub fn targets(
    rule: &DistributionRule,
    total: i64,
    capacity: impl FnOnce(&str) -> BTreeMap<String, i64>,
) -> Vec<(String, String, i64)> {
    match rule {
        DistributionRule::Counts(e) | DistributionRule::Weights(e) => {
            let w: Vec<i64> = e.iter().map(|x| x.2).collect();
            let t = apportion(total, &w);
            e.iter()
                .zip(t)
                .map(|((k, v, _), t)| ((*k).to_owned(), v.clone(), t))
                .collect()
        }
        DistributionRule::ByCapacity(key) => {
            let cap = capacity(key);
            let w: Vec<i64> = cap.values().copied().collect();
            let t = apportion(total, &w);
            cap.keys()
                .zip(t)
                .map(|(v, t)| (key.clone(), v.clone(), t))
                .collect()
        }
    }
}

/// The status of a policy: where its active replicas are (`bound`: the node of
/// each bound one), how many wait, and which objectives are met. `desired` is the
/// replica total of the selected workloads.
pub fn report(
    rules: &PolicyRules,
    bound: &[&NodeInfo],
    pending: i32,
    desired: i64,
) -> PlacementPolicyStatus {
    let mut st = PlacementPolicyStatus {
        replicas: bound.len() as i32 + pending,
        pending,
        ..Default::default()
    };
    for n in bound {
        let city = n
            .labels
            .get(CITY_KEY)
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        *st.replicas_by_city.entry(city).or_insert(0) += 1;
    }
    match &rules.distribution {
        Some(rule @ (DistributionRule::Counts(_) | DistributionRule::Weights(_))) => {
            for (k, v, t) in targets(rule, desired, |_| BTreeMap::new()) {
                let have = bound
                    .iter()
                    .filter(|n| n.labels.get(&k) == Some(&v))
                    .count() as i64;
                st.objectives.push(ObjectiveStatus {
                    type_: "Count".into(),
                    target: format!("{k}={v}"),
                    met: have == t,
                    message: format!("{have}/{t} replicas"),
                });
            }
        }
        Some(DistributionRule::ByCapacity(_)) | None => {}
    }
    if let Some(sp) = &rules.spread
        && let Some(min) = sp.min_groups
    {
        let used: BTreeSet<&String> = bound.iter().filter_map(|n| n.labels.get(&sp.key)).collect();
        let want = min.min(desired.max(0) as usize);
        st.objectives.push(ObjectiveStatus {
            type_: "MinGroups".into(),
            target: sp.key.clone(),
            met: used.len() >= want,
            message: format!("{} of at least {want} groups used", used.len()),
        });
    }
    if let Some(l) = &rules.latency {
        for a in &l.areas {
            let best = bound
                .iter()
                .filter_map(|n| rtt_ms(n, a).map(|r| (r, &n.name)))
                .min_by(|x, y| x.0.total_cmp(&y.0));
            let (met, message) = match best {
                Some((r, node)) if r <= l.max_rtt_ms => (
                    true,
                    format!(
                        "nearest replica on {node}: {r:.1} ms (limit {} ms)",
                        l.max_rtt_ms
                    ),
                ),
                Some((r, node)) => (
                    false,
                    format!(
                        "no replica within {} ms; nearest on {node}: {r:.1} ms",
                        l.max_rtt_ms
                    ),
                ),
                None => (false, "no replica with known coordinates".into()),
            };
            st.objectives.push(ObjectiveStatus {
                type_: "Latency".into(),
                target: a.name.clone(),
                met,
                message,
            });
        }
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apportions_exactly_and_stably() {
        assert_eq!(apportion(5, &[3, 2]), vec![3, 2]);
        assert_eq!(apportion(2, &[3, 2]), vec![1, 1]);
        assert_eq!(apportion(1, &[3, 2]), vec![1, 0]);
        assert_eq!(apportion(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(apportion(7, &[0, 0]), vec![0, 0]);
        assert_eq!(apportion(3, &[0, 5]), vec![0, 3]);
        for total in 0..50 {
            assert_eq!(apportion(total, &[7, 3, 1, 9]).iter().sum::<i64>(), total);
        }
    }
}
