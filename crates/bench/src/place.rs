//! The placement engine alone: R replicas of W mixed workloads onto N synthetic
//! nodes spread over the cities of `world-cities.csv`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::TopologySpreadConstraint;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use meridian_scheduler::engine::{Fleet, Labels, NodeInfo, Placement, PodRequest, Resources};

fn cities() -> Result<Vec<(String, String)>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/data/world-cities.csv"
    );
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some((f.first()?.replace(' ', "-"), f.get(4)?.to_string()))
        })
        .collect())
}

pub fn run(nodes: usize, replicas: usize, workloads: usize, max_cities: usize) -> Result<()> {
    let all = cities()?;
    let cities: Vec<&(String, String)> = all.iter().take(max_cities).collect();
    let regions: Vec<String> = {
        let mut r: Vec<String> = cities.iter().map(|c| c.1.clone()).collect();
        r.sort();
        r.dedup();
        r
    };
    let infos: Vec<NodeInfo> = (0..nodes)
        .map(|i| {
            let (city, region) = cities[i % cities.len()];
            NodeInfo {
                name: format!("node-{i:06}"),
                labels: Labels::from([
                    ("topology.meridian.io/city".into(), city.clone()),
                    ("meridian.io/region".into(), region.clone()),
                    ("kubernetes.io/hostname".into(), format!("node-{i:06}")),
                ]),
                taints: vec![],
                allocatable: Resources {
                    cpu_milli: 32_000,
                    memory: 128 << 30,
                    ephemeral: 1 << 40,
                    pods: 110,
                    gpu: 0,
                },
                used: Resources::default(),
                ready: true,
                cordoned: false,
                pods: vec![],
                ..Default::default()
            }
        })
        .collect();
    let mut fleet = Fleet::new(infos);
    // Mixed workloads: a third pinned to a region, a third spread over cities, a
    // third unconstrained; cpu requests vary.
    let reqs: Vec<PodRequest> = (0..workloads)
        .map(|w| {
            let labels = Arc::new(Labels::from([("app".into(), format!("w{w}"))]));
            let mut r = PodRequest {
                labels: labels.clone(),
                requests: Resources {
                    cpu_milli: 100 + (w as i64 % 8) * 100,
                    memory: 64 << 20,
                    pods: 1,
                    ..Default::default()
                },
                ..Default::default()
            };
            match w % 3 {
                0 => {
                    r.node_selector = Labels::from([(
                        "meridian.io/region".into(),
                        regions[w % regions.len()].clone(),
                    )])
                }
                1 => {
                    r.spread = vec![TopologySpreadConstraint {
                        topology_key: "topology.meridian.io/city".into(),
                        max_skew: 1,
                        when_unsatisfiable: "ScheduleAnyway".into(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(BTreeMap::from([("app".into(), format!("w{w}"))])),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]
                }
                _ => {}
            }
            r
        })
        .collect();
    let t0 = Instant::now();
    let (mut placed, mut failed) = (0usize, 0usize);
    let mut violations = 0usize;
    let mut last = Instant::now();
    for i in 0..replicas {
        let req = &reqs[i % workloads];
        match fleet.place(req) {
            Placement::Node(name) => {
                placed += 1;
                if !req.node_selector.is_empty() {
                    let n = fleet.node(&name);
                    if !n.is_some_and(|n| Fleet::admits(n, req)) {
                        violations += 1;
                    }
                }
            }
            Placement::Unschedulable(_) => failed += 1,
        }
        if last.elapsed().as_secs() >= 10 {
            eprintln!(
                "  ... {i} placed ({:.0}/s)",
                i as f64 / t0.elapsed().as_secs_f64()
            );
            last = Instant::now();
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    violations += fleet
        .nodes
        .iter()
        .filter(|n| n.used.cpu_milli > n.allocatable.cpu_milli || n.used.pods > n.allocatable.pods)
        .count();
    println!(
        "{replicas} replicas of {workloads} workloads onto {nodes} nodes in {} cities / {} regions: {:.2}s, {:.0} placements/s on one core, {placed} placed, {failed} unschedulable, {violations} violations",
        cities.len(),
        regions.len(),
        secs,
        replicas as f64 / secs
    );
    Ok(())
}
