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
        "spec": {"nodeSelector": {"meridian.io/city": "Mars"}, "containers": [
            {"name": "main", "image": "busybox", "command": ["/bin/sleep", "3600"]}]},
    });
    w.pods()
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod).unwrap(),
        )
        .await
        .unwrap();
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
