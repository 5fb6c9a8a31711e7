//! Properties of the placement engine over random fleets and workloads.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Taint, Toleration, TopologySpreadConstraint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use meridian_scheduler::engine::{Fleet, Labels, NodeInfo, Placement, PodRequest, Resources};
use proptest::prelude::*;

const CITIES: &[&str] = &["Paris", "Tokyo", "Lagos", "Lima", "Oslo"];
/// The region of each city.
const REGIONS: &[&str] = &["eu", "ap", "af", "sa", "eu"];

fn arb_node(i: usize) -> impl Strategy<Value = NodeInfo> {
    (
        0..CITIES.len(),
        500i64..8000,
        1i64..16,
        any::<bool>(),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
    )
        .prop_map(move |(city, cpu, gib, gpu, tainted, cordoned)| NodeInfo {
            name: format!("n{i:03}"),
            labels: Labels::from([
                ("topology.meridian.io/city".into(), CITIES[city].into()),
                ("topology.kubernetes.io/region".into(), REGIONS[city].into()),
                // Two zones per city, on a third of the nodes.
                (
                    "topology.kubernetes.io/zone".into(),
                    format!("{}-{}", CITIES[city], i % 2),
                ),
                ("kubernetes.io/hostname".into(), format!("n{i:03}")),
                ("gpu".into(), gpu.to_string()),
            ])
            .into_iter()
            .filter(|(k, _)| k != "topology.kubernetes.io/zone" || i.is_multiple_of(3))
            .collect(),
            taints: if tainted {
                vec![Taint {
                    key: "dedicated".into(),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                }]
            } else {
                vec![]
            },
            allocatable: Resources {
                cpu_milli: cpu,
                memory: gib << 30,
                ephemeral: 50 << 30,
                pods: 20,
                gpu: if gpu { 2 } else { 0 },
            },
            used: Resources::default(),
            ready: true,
            cordoned,
            pods: vec![],
            ..Default::default()
        })
}

fn arb_fleet() -> impl Strategy<Value = Vec<NodeInfo>> {
    (1usize..40).prop_flat_map(|n| (0..n).map(arb_node).collect::<Vec<_>>())
}

fn arb_pod() -> impl Strategy<Value = PodRequest> {
    (
        0i64..2000,
        0i64..4,
        0i64..2,
        prop::option::of(0..CITIES.len()),
        any::<bool>(),
    )
        .prop_map(|(cpu, gib, gpu, city, tolerate)| PodRequest {
            labels: Arc::new(Labels::from([("app".into(), "w".into())])),
            requests: Resources {
                cpu_milli: cpu,
                memory: gib << 30,
                ephemeral: 0,
                pods: 1,
                gpu,
            },
            node_selector: city
                .map(|c| Labels::from([("topology.meridian.io/city".into(), CITIES[c].into())]))
                .unwrap_or_default(),
            tolerations: if tolerate {
                vec![Toleration {
                    key: Some("dedicated".into()),
                    operator: Some("Exists".into()),
                    ..Default::default()
                }]
            } else {
                vec![]
            },
            ..Default::default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn never_overcommits_and_never_violates_required_constraints(
        nodes in arb_fleet(),
        pods in prop::collection::vec(arb_pod(), 1..200),
    ) {
        let before: HashMap<String, NodeInfo> = nodes.iter().map(|n| (n.name.clone(), n.clone())).collect();
        let mut fleet = Fleet::new(nodes);
        for p in &pods {
            if let Placement::Node(name) = fleet.place(p) {
                let n = &before[&name];
                prop_assert!(Fleet::admits(n, p), "placed on a node that does not admit the pod");
                prop_assert!(n.ready && !n.cordoned);
            }
        }
        for n in &fleet.nodes {
            let (a, u) = (&n.allocatable, &n.used);
            prop_assert!(u.cpu_milli <= a.cpu_milli && u.memory <= a.memory && u.pods <= a.pods && u.gpu <= a.gpu,
                "{} over-committed: {:?} > {:?}", n.name, u, a);
        }
    }

    #[test]
    fn spread_keeps_skew_within_max_skew(nodes in arb_fleet(), replicas in 1usize..60, max_skew in 1i32..3) {
        let mut fleet = Fleet::new(nodes);
        let req = PodRequest {
            labels: Arc::new(Labels::from([("app".into(), "s".into())])),
            requests: Resources { pods: 1, ..Default::default() },
            tolerations: vec![Toleration { operator: Some("Exists".into()), ..Default::default() }],
            spread: vec![TopologySpreadConstraint {
                topology_key: "topology.meridian.io/city".into(),
                max_skew,
                when_unsatisfiable: "DoNotSchedule".into(),
                label_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([("app".into(), "s".into())])),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut placed: BTreeMap<String, i32> = BTreeMap::new();
        for _ in 0..replicas {
            if let Placement::Node(name) = fleet.place(&req) {
                let city = fleet.nodes.iter().find(|n| n.name == name).unwrap().labels["topology.meridian.io/city"].clone();
                *placed.entry(city).or_default() += 1;
            }
        }
        // Domains that can take pods: cities with a schedulable node.
        let domains: std::collections::BTreeSet<String> = fleet.nodes.iter()
            .filter(|n| n.ready && !n.cordoned)
            .map(|n| n.labels["topology.meridian.io/city"].clone())
            .collect();
        let counts: Vec<i32> = domains.iter().map(|d| placed.get(d).copied().unwrap_or(0)).collect();
        if let (Some(max), Some(min)) = (counts.iter().max(), counts.iter().min()) {
            // Pods per node are capped (20), so a full city may lag; skew is bounded
            // among cities that still had room.
            let full = fleet.nodes.iter().any(|n| n.used.pods >= n.allocatable.pods);
            prop_assert!(full || max - min <= max_skew, "skew {} > {max_skew}: {placed:?}", max - min);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// The incremental path for a class of identical pods, and the fast path of
    /// one-by-one placement, make exactly the choices the general path makes, for
    /// replacements of a lost node's pods too.
    #[test]
    fn placing_a_class_equals_placing_its_pods_one_by_one(
        nodes in arb_fleet(),
        base in arb_pod(),
        count in 1usize..80,
        spread in prop::option::of((1i32..3, any::<bool>())),
        anti in prop::bool::weighted(0.2),
        replaces in prop::option::of(0usize..40),
    ) {
        let mut req = base;
        // A lost node: one of the fleet (NotReady) or one that is gone.
        req.replaces = replaces.map(|i| format!("n{i:03}"));
        let sel = LabelSelector {
            match_labels: Some(BTreeMap::from([("app".into(), "w".into())])),
            ..Default::default()
        };
        if let Some((max_skew, hard)) = spread {
            req.spread = vec![TopologySpreadConstraint {
                topology_key: "topology.meridian.io/city".into(),
                max_skew,
                when_unsatisfiable: if hard { "DoNotSchedule" } else { "ScheduleAnyway" }.into(),
                label_selector: Some(sel.clone()),
                ..Default::default()
            }];
        }
        if anti {
            req.anti_affinity = vec![sel];
        }
        let mut nodes = nodes;
        for n in &mut nodes {
            if req.replaces.as_deref() == Some(n.name.as_str()) {
                n.ready = false;
            }
        }
        let mut general = Fleet::new(nodes.clone());
        let mut one = Fleet::new(nodes.clone());
        let mut class = Fleet::new(nodes);
        let node_of = |p: Placement| match p {
            Placement::Node(n) => Some(n),
            Placement::Unschedulable(_) => None,
        };
        let expected: Vec<Option<String>> =
            (0..count).map(|_| node_of(general.place_general(&req))).collect();
        let singly: Vec<Option<String>> = (0..count).map(|_| node_of(one.place(&req))).collect();
        prop_assert_eq!(&singly, &expected);
        let got: Vec<Option<String>> = class
            .place_class(&req, count)
            .into_iter()
            .map(|p| match p {
                Placement::Node(n) => Some(n),
                Placement::Unschedulable(_) => None,
            })
            .collect();
        prop_assert_eq!(got, expected);
    }
}
