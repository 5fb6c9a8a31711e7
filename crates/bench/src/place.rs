//! The placement engine alone: R replicas of W mixed workloads onto N synthetic
//! nodes spread over the cities of `world-cities.csv`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use k8s_openapi::api::core::v1::TopologySpreadConstraint;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use meridian_scheduler::engine::{Fleet, Labels, NodeInfo, Placement, PodRequest, Resources};
use meridian_scheduler::policy::{self, PolicyRules};

pub fn run(
    nodes: usize,
    replicas: usize,
    workloads: usize,
    max_cities: usize,
    lose_region: bool,
) -> Result<()> {
    let cities: Vec<&meridian_api::geo::City> = meridian_api::geo::cities()
        .iter()
        .take(max_cities)
        .collect();
    let regions: Vec<String> = {
        let mut r: Vec<String> = cities.iter().map(|c| c.region.clone()).collect();
        r.sort();
        r.dedup();
        r
    };
    let infos: Vec<NodeInfo> = (0..nodes)
        .map(|i| {
            let c = cities[i % cities.len()];
            let (city, region) = (&c.name, &c.region);
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
                coordinates: Some((c.lat, c.lon)),
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
            if w % 100 == 99 {
                // One workload in a hundred: a PlacementPolicy latency objective, four
                // cities of a region within 15 ms (the engine's general path).
                let region = &regions[w % regions.len()];
                let areas: Vec<serde_json::Value> = cities
                    .iter()
                    .filter(|c| &c.region == region)
                    .take(4)
                    .map(|c| serde_json::json!({"city": c.name}))
                    .collect();
                let p: meridian_api::meridian::PlacementPolicy =
                    serde_json::from_value(serde_json::json!({
                        "metadata": {"name": format!("w{w}"), "namespace": "bench", "resourceVersion": "1"},
                        "spec": {"selector": {"matchLabels": {"app": format!("w{w}")}},
                                 "latency": {"maxRttMs": 15, "areas": areas}},
                    }))
                    .expect("policy");
                r.policy = Some(Arc::new(PolicyRules::compile(&p)));
                r.group = Some(Arc::from(format!("w{w}").as_str()));
                r.group_size = (replicas / workloads) as i64;
                return r;
            }
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
    // As the scheduler does: the pending replicas of one workload form one class.
    let mut where_: Vec<Vec<String>> = vec![Vec::new(); workloads];
    for (w, req) in reqs.iter().enumerate() {
        let n = replicas / workloads + usize::from(w < replicas % workloads);
        for p in fleet.place_class(req, n) {
            match p {
                Placement::Node(name) => {
                    placed += 1;
                    where_[w].push(name.clone());
                    if !req.node_selector.is_empty() {
                        let n = fleet.node(&name);
                        if !n.is_some_and(|n| Fleet::admits(n, req)) {
                            violations += 1;
                        }
                    }
                }
                Placement::Unschedulable(_) => failed += 1,
            }
        }
        if last.elapsed().as_secs() >= 10 {
            eprintln!(
                "  ... {placed} placed ({:.0}/s)",
                placed as f64 / t0.elapsed().as_secs_f64()
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
    // Quality: spread skew over cities, capacity balance, latency coverage.
    let mut worst_skew = 0i64;
    let mut covered = (0usize, 0usize);
    for (w, req) in reqs.iter().enumerate() {
        let nodes_of: Vec<&NodeInfo> = where_[w].iter().filter_map(|n| fleet.node(n)).collect();
        if !req.spread.is_empty() {
            let mut per_city: BTreeMap<&str, i64> =
                cities.iter().map(|c| (c.name.as_str(), 0)).collect();
            for n in &nodes_of {
                *per_city
                    .entry(n.labels["topology.meridian.io/city"].as_str())
                    .or_insert(0) += 1;
            }
            let (lo, hi) = (
                per_city.values().min().copied().unwrap_or(0),
                per_city.values().max().copied().unwrap_or(0),
            );
            worst_skew = worst_skew.max(hi - lo);
        }
        if let Some(rules) = &req.policy {
            let st = policy::report(rules, &nodes_of, 0, nodes_of.len() as i64);
            for o in st.objectives.iter().filter(|o| o.type_ == "Latency") {
                covered.1 += 1;
                covered.0 += usize::from(o.met);
            }
        }
    }
    let utils: Vec<f64> = fleet
        .nodes
        .iter()
        .map(|n| n.used.cpu_milli as f64 / n.allocatable.cpu_milli.max(1) as f64)
        .collect();
    let mean = utils.iter().sum::<f64>() / utils.len().max(1) as f64;
    let sd =
        (utils.iter().map(|u| (u - mean).powi(2)).sum::<f64>() / utils.len().max(1) as f64).sqrt();
    println!(
        "{replicas} replicas of {workloads} workloads onto {nodes} nodes in {} cities / {} regions: {:.2}s, {:.0} placements/s on one core, {placed} placed, {failed} unschedulable, {violations} violations",
        cities.len(),
        regions.len(),
        secs,
        replicas as f64 / secs
    );
    println!(
        "quality: worst spread skew over {} cities {worst_skew}; cpu use per node mean {:.1}% sd {:.1}%; latency areas met {}/{}",
        cities.len(),
        mean * 100.0,
        sd * 100.0,
        covered.0,
        covered.1
    );
    if lose_region {
        replace_lost(&mut fleet, &reqs, &where_, &regions[0]);
    }
    Ok(())
}

/// Every node of `region` becomes NotReady; each pod it held is replaced by a pod
/// that names its lost node, the replacements of one workload and lost node
/// forming one class (as in the scheduler's queue).
fn replace_lost(fleet: &mut Fleet, reqs: &[PodRequest], where_: &[Vec<String>], region: &str) {
    let lost: std::collections::HashSet<String> = fleet
        .nodes
        .iter()
        .filter(|n| n.labels.get("meridian.io/region").map(String::as_str) == Some(region))
        .map(|n| n.name.clone())
        .collect();
    for name in &lost {
        if let Some(n) = fleet.node(name) {
            let mut down = n.clone();
            down.ready = false;
            fleet.update_node(down);
        }
    }
    let mut classes: BTreeMap<(usize, &str), usize> = BTreeMap::new();
    for (w, names) in where_.iter().enumerate() {
        for name in names.iter().filter(|n| lost.contains(*n)) {
            fleet.unbind(name, &reqs[w]);
            *classes.entry((w, name.as_str())).or_insert(0) += 1;
        }
    }
    let pods: usize = classes.values().sum();
    let t0 = Instant::now();
    let (mut placed, mut failed, mut violations) = (0usize, 0usize, 0usize);
    for ((w, node), count) in &classes {
        let mut req = reqs[*w].clone();
        req.replaces = Some((*node).to_owned());
        for p in fleet.place_class(&req, *count) {
            match p {
                Placement::Node(name) if lost.contains(&name) => violations += 1,
                Placement::Node(_) => placed += 1,
                Placement::Unschedulable(_) => failed += 1,
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "region {region} lost ({} of {} nodes): {pods} replacements in {} classes, {:.2}s, {:.0} placements/s, {placed} placed, {failed} unschedulable, {violations} on lost nodes",
        lost.len(),
        fleet.nodes.len(),
        classes.len(),
        secs,
        pods as f64 / secs.max(1e-9)
    );
}
