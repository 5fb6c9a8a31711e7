//! The scheduler and the workload controllers on a live fleet: a Deployment from
//! `examples/` spreads over cities, rolls out without losing availability, and is
//! garbage-collected; a pod that fits nowhere says why.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};

use crate::harness::*;

fn ready(p: &Pod) -> bool {
    is_running_ready(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_example_spreads_over_cities_rolls_out_safely_and_is_collected() {
    let mut w = World::start(RegionOpts::default()).await;
    for (n, city) in [
        ("paris-1", "Paris"),
        ("tokyo-1", "Tokyo"),
        ("nyc-1", "New-York"),
    ] {
        w.add_agent_in(n, city).await;
    }
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/web-deployment.yaml"
    ))
    .unwrap();
    let deploy: Deployment = serde_yaml::from_str(&text).unwrap();
    let deploys: Api<Deployment> = Api::namespaced(w.client.clone(), "edge");
    deploys
        .create(&PostParams::default(), &deploy)
        .await
        .unwrap();
    let pods = w.pods();
    let lp = ListParams::default().labels("app=web");
    eventually(
        "3 web replicas ready, one per city",
        Duration::from_secs(60),
        || {
            let (pods, lp) = (pods.clone(), lp.clone());
            async move {
                let list = pods.list(&lp).await.unwrap().items;
                let nodes: BTreeSet<String> = list
                    .iter()
                    .filter(|p| ready(p))
                    .filter_map(|p| p.spec.as_ref()?.node_name.clone())
                    .collect();
                list.len() == 3 && nodes.len() == 3
            }
        },
    )
    .await;
    eventually(
        "the Deployment reports 3 available",
        Duration::from_secs(30),
        || {
            let d = deploys.clone();
            async move {
                let s = d.get("web").await.unwrap().status.unwrap_or_default();
                s.available_replicas == Some(3) && s.updated_replicas == Some(3)
            }
        },
    )
    .await;

    // A rolling update (maxUnavailable 0): ready replicas never drop below 3.
    let patch =
        serde_json::json!({"spec": {"template": {"metadata": {"annotations": {"rollout": "2"}}}}});
    deploys
        .patch("web", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    let old_hash = pods.list(&lp).await.unwrap().items[0]
        .metadata
        .labels
        .as_ref()
        .unwrap()["pod-template-hash"]
        .clone();
    let mut min_ready = usize::MAX;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let list = pods.list(&lp).await.unwrap().items;
        let n_ready = list.iter().filter(|p| ready(p)).count();
        if n_ready < min_ready || n_ready < 3 {
            let view: Vec<String> = list
                .iter()
                .map(|p| {
                    format!(
                        "{}:{}",
                        p.metadata.name.as_deref().unwrap_or_default(),
                        ready(p)
                    )
                })
                .collect();
            eprintln!("ready {n_ready}: {view:?}");
        }
        min_ready = min_ready.min(n_ready);
        let all_new = list.len() == 3
            && list.iter().all(|p| {
                ready(p) && p.metadata.labels.as_ref().unwrap()["pod-template-hash"] != old_hash
            });
        if all_new {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rollout did not finish: {} pods",
            list.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        min_ready >= 3,
        "ready replicas fell to {min_ready} during a maxUnavailable=0 rollout"
    );
    let d = deploys.get("web").await.unwrap();
    assert_eq!(
        d.metadata.annotations.unwrap()["deployment.kubernetes.io/revision"],
        "2"
    );

    // Deleting the Deployment collects its ReplicaSets and pods.
    deploys.delete("web", &Default::default()).await.unwrap();
    eventually(
        "garbage collection removes the pods",
        Duration::from_secs(60),
        || {
            let (pods, lp) = (pods.clone(), lp.clone());
            async move { pods.list(&lp).await.unwrap().items.is_empty() }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_fits_nowhere_is_unschedulable_with_the_causes_counted() {
    let mut w = World::start(RegionOpts::default()).await;
    w.add_agent_in("lyon-1", "Lyon").await;
    w.add_agent_in("nice-1", "Nice").await;
    let pod = serde_json::json!({
        "metadata": {"name": "on-mars"},
        "spec": {"nodeSelector": {"topology.meridian.io/city": "Mars"}, "containers": [
            {"name": "main", "image": "busybox", "command": ["/bin/sleep", "3600"]}]},
    });
    w.create_pod(pod).await;
    let huge = serde_json::json!({
        "metadata": {"name": "too-big"},
        "spec": {"containers": [{"name": "main", "image": "busybox", "command": ["/bin/sleep", "3600"],
            "resources": {"requests": {"cpu": "100000"}}}]},
    });
    w.pods()
        .create(
            &PostParams::default(),
            &serde_json::from_value(huge).unwrap(),
        )
        .await
        .unwrap();
    let pods = w.pods();
    for (name, want) in [
        (
            "on-mars",
            "0/2 nodes are available: 2 node(s) didn't match Pod's node selector.",
        ),
        ("too-big", "0/2 nodes are available: 2 Insufficient cpu."),
    ] {
        eventually(
            &format!("{name} reported unschedulable"),
            Duration::from_secs(30),
            || {
                let pods = pods.clone();
                async move {
                    let p = pods.get(name).await.unwrap();
                    p.status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| {
                            c.type_ == "PodScheduled"
                                && c.status == "False"
                                && c.reason.as_deref() == Some("Unschedulable")
                                && c.message.as_deref() == Some(want)
                        })
                }
            },
        )
        .await;
    }
    // and a pod without constraints is bound and runs
    w.pods()
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                serde_json::json!({"metadata": {"name": "anywhere"}, "spec": {"containers": [
                {"name": "main", "image": "busybox", "command": ["/bin/sleep", "3600"]}]}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    w.wait_running_ready("anywhere").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_a_node_lost_past_the_grace_are_replaced_in_the_same_city() {
    // lease 2s, grace 2s, 0.5 nodes/s; four nodes so one lost node is 25% < 55%
    let mut w = World::start(RegionOpts {
        grace: "2s",
        ..Default::default()
    })
    .await;
    for (n, city) in [
        ("a-tokyo", "Tokyo"),
        ("b-paris-1", "Paris"),
        ("c-lima", "Lima"),
        ("d-paris-2", "Paris"),
    ] {
        w.add_agent_in(n, city).await;
    }
    let deploy = serde_json::json!({
        "metadata": {"name": "svc"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "svc"}}, "template": {
            "metadata": {"labels": {"app": "svc"}},
            "spec": {
                "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                    {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "svc"}}}]}},
                "topologySpreadConstraints": [{"topologyKey": "topology.meridian.io/city", "maxSkew": 1,
                    "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "svc"}}}],
                "containers": [{"name": "main", "image": "busybox", "command": ["/bin/sleep", "3600"]}]}}},
    });
    let deploys: Api<Deployment> = Api::namespaced(w.client.clone(), "edge");
    deploys
        .create(
            &PostParams::default(),
            &serde_json::from_value(deploy).unwrap(),
        )
        .await
        .unwrap();
    let pods = w.pods();
    let lp = ListParams::default().labels("app=svc");
    let running_nodes = |list: &[Pod]| -> BTreeSet<String> {
        list.iter()
            .filter(|p| ready(p))
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect()
    };
    eventually("2 replicas on 2 nodes", Duration::from_secs(60), || {
        let (pods, lp) = (pods.clone(), lp.clone());
        async move { running_nodes(&pods.list(&lp).await.unwrap().items).len() == 2 }
    })
    .await;
    let before = running_nodes(&pods.list(&lp).await.unwrap().items);
    // Spread over cities: one replica in Tokyo, one in Paris (the first by name).
    assert_eq!(
        before,
        BTreeSet::from(["a-tokyo".to_owned(), "b-paris-1".to_owned()])
    );
    let lost = "b-paris-1".to_owned();
    let i = w.agent(&lost);
    w.agents[i].2.cut();
    // Lima is as good for the spread; the lost pod's city wins.
    eventually(
        "a replacement runs on the other node in Paris",
        Duration::from_secs(60),
        || {
            let (pods, lp, lost) = (pods.clone(), lp.clone(), lost.clone());
            async move {
                let list = pods.list(&lp).await.unwrap().items;
                let marked = list.iter().any(|p| {
                    is_marked(p)
                        && p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                            == Some(lost.as_str())
                });
                let nodes = running_nodes(&list);
                marked && nodes == BTreeSet::from(["a-tokyo".to_owned(), "d-paris-2".to_owned()])
            }
        },
    )
    .await;
    let list = pods.list(&lp).await.unwrap().items;
    let replacement = list
        .iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("d-paris-2"))
        .unwrap();
    assert_eq!(
        replacement
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("meridian.io/replaces-node"))
            .map(String::as_str),
        Some("b-paris-1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonsets_cover_matching_nodes_including_late_joiners_and_jobs_complete_or_fail() {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use k8s_openapi::api::batch::v1::Job;
    let mut w = World::start(RegionOpts::default()).await;
    w.add_agent_in("cdn-1", "Paris").await;
    w.add_agent_in("cdn-2", "Lyon").await;
    let ds = serde_json::json!({
        "metadata": {"name": "logs"},
        "spec": {"selector": {"matchLabels": {"app": "logs"}}, "template": {
            "metadata": {"labels": {"app": "logs"}},
            "spec": {"nodeSelector": {"topology.meridian.io/country": "FR"},
                "containers": [{"name": "main", "image": "busybox", "command": ["/bin/sleep", "3600"]}]}}},
    });
    let dsapi: Api<DaemonSet> = Api::namespaced(w.client.clone(), "edge");
    dsapi
        .create(&PostParams::default(), &serde_json::from_value(ds).unwrap())
        .await
        .unwrap();
    let pods = w.pods();
    let on_nodes = |pods: Api<Pod>, label: &'static str| async move {
        let list = pods
            .list(&ListParams::default().labels(label))
            .await
            .unwrap()
            .items;
        list.iter()
            .filter(|p| ready(p))
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect::<BTreeSet<String>>()
    };
    eventually("a logs pod on both nodes", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move { on_nodes(pods, "app=logs").await.len() == 2 }
    })
    .await;
    w.add_agent_in("cdn-3", "Nice").await;
    eventually(
        "the node that joined later gets one too",
        Duration::from_secs(30),
        || {
            let pods = pods.clone();
            async move { on_nodes(pods, "app=logs").await.contains("cdn-3") }
        },
    )
    .await;
    let st = dsapi.get("logs").await.unwrap().status.unwrap();
    assert_eq!(st.desired_number_scheduled, 3);

    let jobs: Api<Job> = Api::namespaced(w.client.clone(), "edge");
    let job = |name: &str, cmd: &str, completions: i32| {
        serde_json::from_value::<Job>(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"completions": completions, "parallelism": 2, "backoffLimit": 1, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": "busybox", "command": ["/bin/sh", "-c", cmd]}]}}},
        }))
        .unwrap()
    };
    jobs.create(
        &PostParams::default(),
        &job("batch", "echo work; sleep 0.2", 3),
    )
    .await
    .unwrap();
    jobs.create(&PostParams::default(), &job("broken", "exit 2", 3))
        .await
        .unwrap();
    let cond = |jobs: Api<Job>, name: &'static str| async move {
        jobs.get(name)
            .await
            .unwrap()
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .find(|c| c.status == "True")
            .map(|c| (c.type_.clone(), c.reason.clone().unwrap_or_default()))
    };
    eventually(
        "the batch job completes 3 of 3",
        Duration::from_secs(60),
        || {
            let jobs = jobs.clone();
            async move { cond(jobs, "batch").await.is_some_and(|c| c.0 == "Complete") }
        },
    )
    .await;
    let s = jobs.get("batch").await.unwrap().status.unwrap();
    assert_eq!(s.succeeded, Some(3));
    eventually(
        "the broken job fails after its backoff limit",
        Duration::from_secs(60),
        || {
            let jobs = jobs.clone();
            async move {
                cond(jobs, "broken").await == Some(("Failed".into(), "BackoffLimitExceeded".into()))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_deletion_waits_for_dependents_and_orphan_deletion_releases_them() {
    use k8s_openapi::api::apps::v1::ReplicaSet;
    use kube::api::DeleteParams;
    let w = World::start(RegionOpts::default()).await;
    let deploys: Api<Deployment> = Api::namespaced(w.client.clone(), "edge");
    let sets: Api<ReplicaSet> = Api::namespaced(w.client.clone(), "edge");
    let pods = w.pods();
    let make = |name: &str| -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}}, "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": "busybox", "command": ["/bin/sleep", "3600"]}]}}},
        }))
        .unwrap()
    };
    for name in ["fg", "orph"] {
        deploys
            .create(&PostParams::default(), &make(name))
            .await
            .unwrap();
        let (pods, lp) = (
            pods.clone(),
            ListParams::default().labels(&format!("app={name}")),
        );
        eventually(
            "two pods of the deployment",
            Duration::from_secs(30),
            || {
                let (pods, lp) = (pods.clone(), lp.clone());
                async move { pods.list(&lp).await.unwrap().items.len() == 2 }
            },
        )
        .await;
    }

    // Foreground: the Deployment is still there, terminating, while it has dependents;
    // then everything is gone.
    let fg = ListParams::default().labels("app=fg");
    deploys
        .delete("fg", &DeleteParams::foreground())
        .await
        .unwrap();
    let d = deploys.get("fg").await.unwrap();
    assert!(d.metadata.deletion_timestamp.is_some());
    assert!(
        d.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"foregroundDeletion".to_owned())
    );
    eventually(
        "deployment, replicaset and pods gone",
        Duration::from_secs(30),
        || {
            let (deploys, sets, pods, fg) =
                (deploys.clone(), sets.clone(), pods.clone(), fg.clone());
            async move {
                deploys.get_opt("fg").await.unwrap().is_none()
                    && sets.list(&fg).await.unwrap().items.is_empty()
                    && pods.list(&fg).await.unwrap().items.is_empty()
            }
        },
    )
    .await;

    // Orphan: the Deployment goes, its ReplicaSet and pods stay, no longer owned,
    // and the background collector leaves them alone.
    let orph = ListParams::default().labels("app=orph");
    deploys
        .delete("orph", &DeleteParams::orphan())
        .await
        .unwrap();
    eventually("deployment gone", Duration::from_secs(30), || {
        let deploys = deploys.clone();
        async move { deploys.get_opt("orph").await.unwrap().is_none() }
    })
    .await;
    // past the collector's 10 s age threshold
    tokio::time::sleep(Duration::from_secs(11)).await;
    let rs = sets.list(&orph).await.unwrap().items;
    assert_eq!(rs.len(), 1);
    assert!(
        rs[0]
            .metadata
            .owner_references
            .as_ref()
            .is_none_or(|o| o.is_empty())
    );
    assert_eq!(pods.list(&orph).await.unwrap().items.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_loss_eviction_inside_a_deny_window_waits_until_the_window_closes() {
    let mut w = World::start(RegionOpts {
        grace: "2s",
        ..Default::default()
    })
    .await;
    for n in ["a-1", "b-2", "c-3", "d-4"] {
        w.add_agent(n).await;
    }
    let policies: Api<kube::api::DynamicObject> = Api::namespaced_with(
        w.client.clone(),
        "edge",
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("meridian.io", "v1alpha1", "RiskPolicy"),
            "riskpolicies",
        ),
    );
    let now = jiff::Timestamp::now();
    let hours = |h: i64| (now + jiff::SignedDuration::from_hours(h)).to_string();
    let policy = |start: String, end: String| {
        serde_json::json!({"apiVersion": "meridian.io/v1alpha1", "kind": "RiskPolicy",
            "metadata": {"name": "freeze"},
            "spec": {"selector": {"kinds": ["Deployment"], "names": ["svc"]},
                "rules": {"denyWindows": [{"start": start, "end": end}]}}})
    };
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(policy(hours(-1), hours(1))).unwrap(),
        )
        .await
        .unwrap();
    let deploy = serde_json::json!({
        "metadata": {"name": "svc"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "svc"}}, "template": {
            "metadata": {"labels": {"app": "svc"}},
            "spec": {"containers": [{"name": "main", "image": "busybox", "command": ["/bin/sleep", "3600"]}]}}},
    });
    Api::<Deployment>::namespaced(w.client.clone(), "edge")
        .create(
            &PostParams::default(),
            &serde_json::from_value(deploy).unwrap(),
        )
        .await
        .unwrap();
    let pods = w.pods();
    let lp = ListParams::default().labels("app=svc");
    let mut node = String::new();
    eventually("the replica runs", Duration::from_secs(60), || {
        let (pods, lp) = (pods.clone(), lp.clone());
        async move { pods.list(&lp).await.unwrap().items.iter().any(ready) }
    })
    .await;
    let pod = pods.list(&lp).await.unwrap().items.remove(0);
    node.push_str(pod.spec.as_ref().unwrap().node_name.as_deref().unwrap());
    let name = pod.metadata.name.clone().unwrap();
    let i = w.agent(&node);
    w.agents[i].2.cut();
    // Past the grace the region tries to evict; risk control refuses, and says so.
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(w.client.clone(), "edge");
    eventually("an EvictionRefused event", Duration::from_secs(60), || {
        let (events, name) = (events.clone(), name.clone());
        async move {
            events
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("EvictionRefused")
                        && e.involved_object.name.as_deref() == Some(name.as_str())
                        && e.message
                            .as_deref()
                            .is_some_and(|m| m.contains("denyWindows[0]"))
                })
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let list = pods.list(&lp).await.unwrap().items;
    assert_eq!(
        list.len(),
        1,
        "no replacement while the eviction is refused"
    );
    assert!(!is_marked(&list[0]), "not marked inside the window");
    // The window moves into the past: the eviction goes through, a replacement runs.
    let mut p = policies.get("freeze").await.unwrap();
    p.data["spec"] = policy(hours(-3), hours(-2))["spec"].clone();
    policies
        .replace("freeze", &PostParams::default(), &p)
        .await
        .unwrap();
    eventually("marked and replaced", Duration::from_secs(60), || {
        let (pods, lp, name) = (pods.clone(), lp.clone(), name.clone());
        async move {
            let list = pods.list(&lp).await.unwrap().items;
            list.iter()
                .any(|p| is_marked(p) && p.metadata.name.as_deref() == Some(name.as_str()))
                && list.iter().any(ready)
        }
    })
    .await;
}
