//! Region planning: which regions a node should probe, and which one it gets once
//! it has measured them.

use std::collections::BTreeMap;

use meridian_api::onboarding::{Candidate, ProbeResult};

/// What the center knows of a region (from its `EdgeCluster` and its own joins).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RegionInfo {
    pub name: String,
    pub endpoint: String,
    pub max_nodes: Option<u32>,
    pub draining: bool,
    /// Nodes the region reports plus nodes assigned since its last report.
    pub nodes: u32,
    /// Location (from its city label), for the shortlist.
    pub location: Option<(f64, f64)>,
    /// The region reported within the last minute.
    pub alive: bool,
}

impl RegionInfo {
    pub fn full(&self) -> bool {
        self.max_nodes.is_some_and(|m| self.nodes >= m)
    }

    pub fn open(&self) -> bool {
        !self.draining && !self.full() && !self.endpoint.is_empty()
    }

    /// Fraction of capacity in use (0 without a limit: headroom unknown, assume plenty).
    pub fn load(&self) -> f64 {
        match self.max_nodes {
            Some(0) => 1.0,
            Some(m) => self.nodes as f64 / m as f64,
            None => 0.0,
        }
    }
}

/// Why no region could be offered.
pub fn no_region_reason(regions: &[RegionInfo]) -> String {
    if regions.is_empty() {
        return "no region has registered with the global API yet".into();
    }
    let draining = regions.iter().filter(|r| r.draining).count();
    let full = regions.iter().filter(|r| !r.draining && r.full()).count();
    format!(
        "no region takes new nodes: {} regions, {draining} draining, {full} full",
        regions.len()
    )
}

/// The candidates to probe: open regions (minus `exclude`), nearest first when the
/// node's location is known (live regions before silent ones), at most `k`.
pub fn shortlist(
    regions: &[RegionInfo],
    location: Option<(f64, f64)>,
    exclude: Option<&str>,
    k: usize,
) -> Vec<Candidate> {
    let mut open: Vec<(bool, f64, f64, &RegionInfo)> = regions
        .iter()
        .filter(|r| r.open() && Some(r.name.as_str()) != exclude)
        .map(|r| {
            let d = match (location, r.location) {
                (Some(a), Some(b)) => meridian_api::geo::distance_km(a, b),
                _ => f64::NAN,
            };
            (!r.alive, d, r.load(), r)
        })
        .collect();
    open.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then(a.1.total_cmp(&b.1))
            .then(a.2.total_cmp(&b.2))
            .then(a.3.name.cmp(&b.3.name))
    });
    open.into_iter()
        .take(k.max(1))
        .map(|(_, d, _, r)| Candidate {
            region: r.name.clone(),
            endpoint: r.endpoint.clone(),
            distance_km: d.is_finite().then_some((d * 10.0).round() / 10.0),
        })
        .collect()
}

/// Round trips within this many milliseconds count as equal, so load decides
/// between regions that are about as near.
pub const RTT_BUCKET_MS: f64 = 5.0;

/// Orders the probed candidates best first: reachable (loss below half) before
/// lossy, then median RTT (in [`RTT_BUCKET_MS`] buckets), then load, then p90
/// (in buckets four times as wide), then the shortlist order (nearest first). Regions that are no longer open, or that the node
/// could not reach at all, are dropped. Returns (region, explanation) pairs.
pub fn rank(
    candidates: &[Candidate],
    probes: &[ProbeResult],
    regions: &BTreeMap<String, RegionInfo>,
) -> Vec<(Candidate, String)> {
    let mut scored: Vec<(bool, i64, f64, f64, usize, Candidate, String)> = Vec::new();
    for (i, c) in candidates.iter().enumerate() {
        let Some(p) = probes.iter().find(|p| p.region == c.region) else {
            continue;
        };
        let Some(r) = regions.get(&c.region) else {
            continue;
        };
        if !r.open() || p.loss >= 1.0 {
            continue;
        }
        let why = format!(
            "{}: median {:.1} ms, p90 {:.1} ms, loss {:.0}%, load {:.0}%",
            c.region,
            p.median_ms,
            p.p90_ms,
            p.loss * 100.0,
            r.load() * 100.0
        );
        scored.push((
            p.loss >= 0.5,
            // Floor, not round: sub-millisecond loopback probes jittering to 3 ms
            // on a busy machine must not land in another bucket.
            (p.median_ms / RTT_BUCKET_MS).floor() as i64,
            r.load(),
            // p90 is the noisier signal: only a jitter of 20 ms or more counts.
            (p.p90_ms / (4.0 * RTT_BUCKET_MS)).floor(),
            i,
            c.clone(),
            why,
        ));
    }
    scored.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.total_cmp(&b.2))
            .then(a.3.total_cmp(&b.3))
            .then(a.4.cmp(&b.4))
    });
    scored.into_iter().map(|s| (s.5, s.6)).collect()
}

/// A probe result is plausible: finite, non-negative, loss within 0..=1.
pub fn valid_probe(p: &ProbeResult) -> bool {
    [p.median_ms, p.p90_ms, p.loss]
        .iter()
        .all(|v| v.is_finite() && *v >= 0.0)
        && p.loss <= 1.0
        && p.median_ms < 3_600_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(name: &str, loc: (f64, f64), nodes: u32, max: Option<u32>) -> RegionInfo {
        RegionInfo {
            name: name.into(),
            endpoint: format!("https://{name}"),
            max_nodes: max,
            nodes,
            location: Some(loc),
            alive: true,
            ..Default::default()
        }
    }

    fn probe(region: &str, ms: f64, loss: f64) -> ProbeResult {
        ProbeResult {
            region: region.into(),
            median_ms: ms,
            p90_ms: ms * 1.1,
            loss,
        }
    }

    #[test]
    fn the_shortlist_is_nearest_open_regions_first() {
        let paris = (48.85, 2.35);
        let regions = vec![
            region("us-east", (40.7, -74.0), 0, None),
            region("eu-west", (48.85, 2.35), 5, Some(5)), // full
            region("eu-central", (50.1, 8.7), 0, None),
            RegionInfo {
                draining: true,
                ..region("eu-north", (59.3, 18.1), 0, None)
            },
            region("ap-northeast", (35.7, 139.7), 0, None),
        ];
        let s = shortlist(&regions, Some(paris), None, 2);
        let names: Vec<&str> = s.iter().map(|c| c.region.as_str()).collect();
        assert_eq!(names, ["eu-central", "us-east"]);
        assert!(s[0].distance_km.unwrap() < 500.0);
        assert_eq!(
            shortlist(&regions, Some(paris), Some("eu-central"), 1)[0].region,
            "us-east"
        );
        assert!(no_region_reason(&regions[1..2]).contains("1 full"));
    }

    #[test]
    fn rtt_decides_then_load_and_unreachable_regions_are_dropped() {
        let regions: BTreeMap<String, RegionInfo> = [
            region("a", (0.0, 0.0), 9, Some(10)),
            region("b", (0.0, 0.0), 1, Some(10)),
            region("c", (0.0, 0.0), 0, None),
        ]
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
        let cands: Vec<Candidate> = ["a", "b", "c"]
            .iter()
            .map(|n| Candidate {
                region: (*n).into(),
                endpoint: String::new(),
                distance_km: None,
            })
            .collect();
        // a and b within one RTT bucket: the emptier b wins; c is nearer but lossy.
        let ranked = rank(
            &cands,
            &[
                probe("a", 40.2, 0.0),
                probe("b", 41.0, 0.0),
                probe("c", 5.0, 0.6),
            ],
            &regions,
        );
        let order: Vec<&str> = ranked.iter().map(|(c, _)| c.region.as_str()).collect();
        assert_eq!(order, ["b", "a", "c"]);
        // Far apart: RTT first.
        let ranked = rank(
            &cands,
            &[
                probe("a", 5.0, 0.0),
                probe("b", 120.0, 0.0),
                probe("c", 1.0, 1.0),
            ],
            &regions,
        );
        let order: Vec<&str> = ranked.iter().map(|(c, _)| c.region.as_str()).collect();
        assert_eq!(order, ["a", "b"]);
        assert!(!valid_probe(&probe("a", f64::NAN, 0.0)));
        assert!(!valid_probe(&probe("a", 1.0, 2.0)));
    }
}
