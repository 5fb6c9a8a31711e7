//! Properties of PlacementPolicy placement over random fleets: per-location counts
//! exact, locations never violated, group spread within bounds, latency objective
//! met whenever it can be.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use meridian_api::geo;
use meridian_api::meridian::PlacementPolicy;
use meridian_scheduler::engine::{Fleet, Labels, NodeInfo, Placement, PodRequest, Resources};
use meridian_scheduler::policy::PolicyRules;
use proptest::prelude::*;
use serde_json::json;

const CITIES: &[(&str, &str)] = &[
    ("Paris", "eu-west"),
    ("London", "eu-west"),
    ("Berlin", "eu-central"),
    ("Tokyo", "ap-northeast"),
    ("Shanghai", "cn-east"),
    ("Lima", "sa-east"),
    ("Lagos", "af-north"),
];

fn node(i: usize, city: usize, cpu: i64) -> NodeInfo {
    let (name, region) = CITIES[city];
    let c = geo::city(name).unwrap();
    NodeInfo {
        name: format!("n{i:03}"),
        labels: Labels::from([
            ("topology.meridian.io/city".into(), name.into()),
            ("topology.kubernetes.io/region".into(), region.into()),
            ("kubernetes.io/hostname".into(), format!("n{i:03}")),
        ]),
        allocatable: Resources {
            cpu_milli: cpu,
            memory: 16 << 30,
            ephemeral: 50 << 30,
            pods: 50,
            gpu: 0,
        },
        ready: true,
        coordinates: Some((c.lat + (i % 5) as f64 * 0.01, c.lon)),
        ..Default::default()
    }
}

/// Between one and four nodes in each of the cities, random sizes.
fn arb_fleet() -> impl Strategy<Value = Vec<NodeInfo>> {
    prop::collection::vec(prop::collection::vec(1000i64..8000, 1..4), CITIES.len()).prop_map(
        |per_city| {
            let mut out = Vec::new();
            for (c, cpus) in per_city.iter().enumerate() {
                for cpu in cpus {
                    out.push(node(out.len(), c, *cpu));
                }
            }
            out
        },
    )
}

fn rules(spec: serde_json::Value) -> Arc<PolicyRules> {
    let p: PlacementPolicy = serde_json::from_value(json!({
        "metadata": {"name": "p", "namespace": "default", "resourceVersion": "1"},
        "spec": spec,
    }))
    .unwrap();
    Arc::new(PolicyRules::compile(&p))
}

fn pod(policy: &Arc<PolicyRules>, size: i64, cpu: i64) -> PodRequest {
    PodRequest {
        labels: Arc::new(Labels::from([("app".into(), "g".into())])),
        requests: Resources {
            cpu_milli: cpu,
            pods: 1,
            ..Default::default()
        },
        group: Some(Arc::from("rs-uid")),
        group_size: size,
        policy: Some(policy.clone()),
        ..Default::default()
    }
}

fn city_of(f: &Fleet, node: &str) -> String {
    f.node(node).unwrap().labels["topology.meridian.io/city"].clone()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    #[test]
    fn per_location_counts_are_exact(nodes in arb_fleet(), counts in prop::collection::vec(0i64..6, 3)) {
        let cities = ["Paris", "Tokyo", "Lima"];
        let entries: Vec<_> = cities.iter().zip(&counts)
            .map(|(c, n)| json!({"city": c, "replicas": n})).collect();
        let total: i64 = counts.iter().sum();
        let p = rules(json!({"workloads": [{"kind": "Deployment", "name": "g"}],
            "distribution": {"counts": entries}}));
        let mut f = Fleet::new(nodes);
        let mut placed: BTreeMap<String, i64> = BTreeMap::new();
        for _ in 0..total {
            // 100m per pod: every city has room for its count.
            match f.place(&pod(&p, total, 100)) {
                Placement::Node(n) => *placed.entry(city_of(&f, &n)).or_default() += 1,
                Placement::Unschedulable(m) => prop_assert!(false, "{m}"),
            }
        }
        for (c, n) in cities.iter().zip(&counts) {
            prop_assert_eq!(placed.get(*c).copied().unwrap_or(0), *n, "{:?}", placed);
        }
        // One more than the counts allow has nowhere to go... unless the group
        // grew: the engine then keeps to the listed locations.
        if let Placement::Node(n) = f.place(&pod(&p, total, 100)) {
            prop_assert!(cities.contains(&city_of(&f, &n).as_str()));
        }
    }

    #[test]
    fn locations_are_never_violated(nodes in arb_fleet(), excluded in 0..CITIES.len(), replicas in 1i64..40) {
        let (xc, _) = CITIES[excluded];
        let p = rules(json!({"selector": {"matchLabels": {"app": "g"}},
            "locations": {"include": [{"regions": ["eu-west", "eu-central", "ap-northeast", "cn-east", "sa-east"]}],
                          "exclude": [{"cities": [xc]}]}}));
        let mut f = Fleet::new(nodes);
        for _ in 0..replicas {
            if let Placement::Node(n) = f.place(&pod(&p, replicas, 200)) {
                let node = f.node(&n).unwrap();
                prop_assert_ne!(&node.labels["topology.meridian.io/city"], xc);
                prop_assert_ne!(&node.labels["topology.kubernetes.io/region"], "af-north");
            }
        }
    }

    #[test]
    fn group_spread_respects_min_and_max_groups(nodes in arb_fleet(), replicas in 1i64..30,
        min in 1i32..4, extra in 0i32..3, skew in 1i32..3) {
        let max = min + extra;
        let p = rules(json!({"workloads": [{"kind": "Deployment", "name": "g"}],
            "spread": {"maxSkew": skew, "minGroups": min, "maxGroups": max}}));
        let mut f = Fleet::new(nodes);
        let mut placed: BTreeMap<String, i64> = BTreeMap::new();
        for _ in 0..replicas {
            if let Placement::Node(n) = f.place(&pod(&p, replicas, 100)) {
                *placed.entry(city_of(&f, &n)).or_default() += 1;
            }
        }
        prop_assert!(placed.len() <= max as usize, "{placed:?} uses more than {max} cities");
        prop_assert!(placed.len() >= (replicas as usize).min(min as usize));
        let hi = placed.values().max().copied().unwrap_or(0);
        let lo = placed.values().min().copied().unwrap_or(0);
        prop_assert!(hi - lo <= i64::from(skew), "skew {} > {skew}: {placed:?}", hi - lo);
    }

    #[test]
    fn latency_objective_is_met_when_feasible(nodes in arb_fleet(),
        areas in prop::collection::btree_set(0..CITIES.len(), 1..5), spare in 0i64..4) {
        let names: Vec<&str> = areas.iter().map(|&i| CITIES[i].0).collect();
        let p = rules(json!({"selector": {"matchLabels": {"app": "g"}},
            "latency": {"maxRttMs": 10, "areas": names.iter().map(|c| json!({"city": c})).collect::<Vec<_>>()}}));
        let replicas = names.len() as i64 + spare;
        let mut f = Fleet::new(nodes);
        let mut covered = BTreeSet::new();
        for _ in 0..replicas {
            if let Placement::Node(n) = f.place(&pod(&p, replicas, 100)) {
                covered.insert(city_of(&f, &n));
            }
        }
        // Every city has a node: each area is coverable, and only from itself
        // (these cities are all further than 10 ms apart... except Paris/London).
        for a in &names {
            let near = covered.iter().any(|c| {
                let (x, y) = (geo::city(c).unwrap(), geo::city(a).unwrap());
                geo::estimate_rtt_ms(geo::distance_km((x.lat, x.lon), (y.lat, y.lon))) <= 10.0 + 0.5
            });
            prop_assert!(near, "area {a} not covered by {covered:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// The incremental class path makes the same choices as one-by-one placement
    /// for policies it handles (locations, latency, bin-packing), with or without
    /// a topology spread constraint.
    #[test]
    fn class_placement_equals_one_by_one_under_policies(
        nodes in arb_fleet(),
        areas in prop::collection::btree_set(0..CITIES.len(), 1..4),
        count in 1i64..40,
        excluded in prop::option::of(0..CITIES.len()),
        most in any::<bool>(),
        spread in any::<bool>(),
    ) {
        let names: Vec<&str> = areas.iter().map(|&i| CITIES[i].0).collect();
        let mut spec = json!({"selector": {"matchLabels": {"app": "g"}},
            "latency": {"maxRttMs": 10, "areas": names.iter().map(|c| json!({"city": c})).collect::<Vec<_>>()}});
        if let Some(x) = excluded {
            spec["locations"] = json!({"exclude": [{"cities": [CITIES[x].0]}]});
        }
        if most {
            spec["scoring"] = json!({"strategy": "MostAllocated"});
        }
        let p = rules(spec);
        let mut req = pod(&p, count, 300);
        if spread {
            req.spread = vec![k8s_openapi::api::core::v1::TopologySpreadConstraint {
                topology_key: "topology.meridian.io/city".into(),
                max_skew: 1,
                when_unsatisfiable: "DoNotSchedule".into(),
                label_selector: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                    match_labels: Some(BTreeMap::from([("app".into(), "g".into())])),
                    ..Default::default()
                }),
                ..Default::default()
            }];
        }
        let mut one = Fleet::new(nodes.clone());
        let mut class = Fleet::new(nodes);
        let name = |p: Placement| match p {
            Placement::Node(n) => Some(n),
            Placement::Unschedulable(_) => None,
        };
        let expected: Vec<_> = (0..count).map(|_| name(one.place(&req))).collect();
        let got: Vec<_> = class.place_class(&req, count as usize).into_iter().map(name).collect();
        prop_assert_eq!(got, expected);
    }
}
