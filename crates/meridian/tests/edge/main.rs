//! The two-layer control plane with real processes on loopback: `meridian server`,
//! `meridian region`, `meridian agent` (process runtime), links cut with a proxy.

mod containers;
mod harness;
mod hostile;
mod onboarding;
mod protocol;
mod workloads;

use std::time::{Duration, Instant};

use futures::{AsyncBufReadExt, TryStreamExt};
use harness::*;
use kube::api::LogParams;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_bound_to_a_node_runs_becomes_ready_and_streams_its_logs() {
    let mut w = World::start(RegionOpts::default()).await;
    w.add_agent("paris-1").await;
    w.run_pod(
        "hello",
        "paris-1",
        "echo hello from $HOSTNAME; i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.3; done",
    )
    .await;
    let node: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(w.client.clone());
    let n = node.get("paris-1").await.unwrap();
    let ann = n.metadata.annotations.unwrap_or_default();
    assert_eq!(
        ann.get("meridian.io/coordinates").map(String::as_str),
        Some("48.8534,2.3488")
    );
    let labels = n.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels.get("topology.meridian.io/city").map(String::as_str),
        Some("Paris")
    );
    assert_eq!(
        labels.get("meridian.io/region").map(String::as_str),
        Some("test-region")
    );
    let cap = n.status.unwrap().capacity.unwrap();
    assert!(cap.contains_key("cpu") && cap.contains_key("memory") && cap.contains_key("pods"));
    let pod = w.wait_running_ready("hello").await;
    assert!(
        container_pid(&pod).is_some_and(alive),
        "the container is a live process"
    );
    let pods = w.pods();
    eventually("logs reach the global API", Duration::from_secs(10), || {
        let pods = pods.clone();
        async move {
            let out = pods
                .logs("hello", &LogParams::default())
                .await
                .unwrap_or_default();
            out.contains("hello from hello") && out.contains("tick 2")
        }
    })
    .await;
    let tail = pods
        .logs(
            "hello",
            &LogParams {
                tail_lines: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        tail.lines().count(),
        1,
        "tailLines=1 gives one line: {tail:?}"
    );
    // follow: lines written after the request arrive on the open stream
    let stream = pods
        .log_stream(
            "hello",
            &LogParams {
                follow: true,
                tail_lines: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut lines = stream.lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.try_next())
        .await
        .expect("a followed line arrives")
        .unwrap()
        .unwrap();
    assert!(first.starts_with("tick "), "{first}");
    // a container that is not in the pod is a clear 400
    let err = pods
        .logs(
            "hello",
            &LogParams {
                container: Some("nope".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not valid for pod hello"), "{err}");

    // tenants read their own pods' logs and nobody else's
    let acme = w.tenant("acme").await;
    let globex = w.tenant("globex").await;
    let acme_pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(acme, "default");
    let pod = serde_json::json!({
        "metadata": {"name": "diary"},
        "spec": {"nodeName": "paris-1", "containers": [{"name": "main", "image": "busybox",
            "command": ["/bin/sh", "-c", "echo acme secret; exec sleep 3600"]}]},
    });
    acme_pods
        .create(&Default::default(), &serde_json::from_value(pod).unwrap())
        .await
        .unwrap();
    eventually(
        "the tenant reads its pod's logs",
        Duration::from_secs(30),
        || {
            let p = acme_pods.clone();
            async move {
                p.logs("diary", &LogParams::default())
                    .await
                    .is_ok_and(|l| l.contains("acme secret"))
            }
        },
    )
    .await;
    let globex_pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(globex, "default");
    let err = globex_pods
        .logs("diary", &LogParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "another tenant gets NotFound, not the logs: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_survive_agent_sigkill_and_are_readopted_offline_without_restart() {
    let mut w = World::start(RegionOpts::default()).await;
    w.add_agent("tokyo-1").await;
    w.run_pod("steady", "tokyo-1", "echo up; exec sleep 3600")
        .await;
    let pod = w.wait_running_ready("steady").await;
    let pid = container_pid(&pod).unwrap();
    let i = w.agent("tokyo-1");
    w.agents[i].1.as_mut().unwrap().kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alive(pid), "the workload outlives its agent");
    // restart the agent with its region unreachable: it resumes from its cache
    w.agents[i].2.cut();
    w.start_agent(i);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(alive(pid), "the re-adopted workload still runs");
    // reconnect: same process, no restart
    w.agents[i].2.heal();
    let pods = w.pods();
    eventually(
        "the agent reports the adopted pod again",
        Duration::from_secs(30),
        || {
            let pods = pods.clone();
            async move {
                let p = pods.get("steady").await.unwrap();
                is_running_ready(&p) && container_pid(&p) == Some(pid)
            }
        },
    )
    .await;
    let p = w.pod("steady").await;
    assert_eq!(restart_count(&p), 0, "no restart happened");
    assert!(alive(pid));
    assert!(!is_marked(&p));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_link_cuts_mark_nothing_long_ones_mark_pods_at_the_configured_rate() {
    let mut w = World::start(RegionOpts {
        grace: "6s",
        ..Default::default()
    })
    .await; // lease 2s, 0.5 nodes/s
    for n in ["n1", "n2", "n3", "n4"] {
        w.add_agent(n).await;
        w.run_pod(&format!("p-{n}"), n, "exec sleep 3600").await;
    }
    // a pinned workload on n1: never rescheduled
    create(
        &w,
        serde_json::json!({
            "metadata": {"name": "pinned", "annotations": {"meridian.io/reschedule-grace": "never"}},
            "spec": {"nodeName": "n1", "containers": [
                {"name": "main", "image": "busybox", "command": ["/bin/sleep", "3600"]}]},
        }),
    )
    .await;
    for n in ["n1", "n2", "n3", "n4"] {
        w.wait_running_ready(&format!("p-{n}")).await;
    }
    w.wait_running_ready("pinned").await;
    // shorter than the grace: nodes go Unknown, no pod is touched
    for n in ["n1", "n2"] {
        let i = w.agent(n);
        w.agents[i].2.cut();
    }
    w.wait_node("n1", "Unknown").await;
    w.wait_node("n2", "Unknown").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for n in ["n1", "n2"] {
        let i = w.agent(n);
        w.agents[i].2.heal();
    }
    w.wait_node("n1", "True").await;
    w.wait_node("n2", "True").await;
    tokio::time::sleep(Duration::from_secs(6)).await; // past the grace of the first cut
    for n in ["n1", "n2", "n3", "n4"] {
        assert!(
            !is_marked(&w.pod(&format!("p-{n}")).await),
            "p-{n} was marked after a short cut"
        );
    }
    // longer than the grace: marked, one node per 2 s (0.5 nodes/s)
    for n in ["n1", "n2"] {
        let i = w.agent(n);
        w.agents[i].2.cut();
    }
    let start = Instant::now();
    let mut marked_at: Vec<(String, Instant)> = Vec::new();
    while marked_at.len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "pods were not marked: {marked_at:?}"
        );
        for n in ["n1", "n2"] {
            let name = format!("p-{n}");
            if !marked_at.iter().any(|m| m.0 == name) && is_marked(&w.pod(&name).await) {
                marked_at.push((name, Instant::now()));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = marked_at[0].1.duration_since(start);
    assert!(
        first >= Duration::from_secs(7),
        "marked after {first:?}, before lease + grace (8s)"
    );
    let gap = marked_at[1].1.duration_since(marked_at[0].1);
    assert!(
        gap >= Duration::from_millis(1500),
        "two nodes marked {gap:?} apart, faster than 0.5/s"
    );
    let p = w.pod("p-n1").await;
    let cond = p.status.unwrap().conditions.unwrap();
    assert!(
        cond.iter()
            .any(|c| c.type_ == "DisruptionTarget" && c.status == "True")
    );
    for n in ["p-n3", "p-n4"] {
        let p = w.pod(n).await;
        assert!(
            !is_marked(&p) && is_running_ready(&p),
            "{n} on a healthy node is untouched"
        );
    }
    assert!(
        !is_marked(&w.pod("pinned").await),
        "reschedule-grace: never keeps a pinned pod in place"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_percent_of_a_region_dropping_together_marks_nothing_and_then_grants_a_fresh_grace() {
    let mut w = World::start(RegionOpts {
        grace: "5s",
        ..Default::default()
    })
    .await;
    let nodes = ["m1", "m2", "m3", "m4", "m5"];
    for n in nodes {
        w.add_agent(n).await;
        w.run_pod(&format!("p-{n}"), n, "exec sleep 3600").await;
    }
    for n in nodes {
        w.wait_running_ready(&format!("p-{n}")).await;
    }
    for n in ["m1", "m2", "m3"] {
        let i = w.agent(n);
        w.agents[i].2.cut();
    }
    for n in ["m1", "m2", "m3"] {
        w.wait_node(n, "Unknown").await;
    }
    // well past lease + grace (2s + 5s), at a rate that would have marked all three
    tokio::time::sleep(Duration::from_secs(9)).await;
    for n in nodes {
        assert!(
            !is_marked(&w.pod(&format!("p-{n}")).await),
            "p-{n} marked during a partition"
        );
    }
    assert_eq!(
        w.region_metric("meridian_region_pods_marked_total").await,
        Some(0.0)
    );
    // The partition heals but for m3: its grace starts when the partition ends
    // (its clock ran all through the partition), as in Kubernetes.
    for n in ["m1", "m2"] {
        let i = w.agent(n);
        w.agents[i].2.heal();
    }
    for n in ["m1", "m2"] {
        w.wait_node(n, "True").await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !is_marked(&w.pod("p-m3").await),
        "p-m3 marked the moment the partition ended"
    );
    eventually(
        "p-m3 marked a grace after the partition ended",
        Duration::from_secs(20),
        || {
            let w = &w;
            async move { is_marked(&w.pod("p-m3").await) }
        },
    )
    .await;
    for n in ["m1", "m2", "m4", "m5"] {
        assert!(!is_marked(&w.pod(&format!("p-{n}")).await), "p-{n} marked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_global_api_down_the_region_keeps_agents_serving_and_status_catches_up() {
    let mut w = World::start(RegionOpts::default()).await;
    w.add_agent("berlin-1").await;
    w.run_pod("worker", "berlin-1", "exec sleep 3600").await;
    let pod = w.wait_running_ready("worker").await;
    let pid = container_pid(&pod).unwrap();
    w.server.as_mut().unwrap().kill9();
    // the container crashes while the global API is away; the node restarts it
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        w.region_metric("meridian_region_agent_streams").await,
        Some(1.0),
        "the agent stays connected to its region"
    );
    w.start_server().await;
    let pods = w.pods();
    eventually(
        "the restart reaches the global API",
        Duration::from_secs(30),
        || {
            let pods = pods.clone();
            async move {
                let p = pods.get("worker").await.unwrap();
                restart_count(&p) >= 1 && is_running_ready(&p) && container_pid(&p) != Some(pid)
            }
        },
    )
    .await;
    w.wait_node("berlin-1", "True").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_registers_its_edgecluster_and_keeps_its_status_fresh() {
    let mut w = World::start(RegionOpts::default()).await;
    w.add_agent("lisbon-1").await;
    let api: kube::Api<kube::api::DynamicObject> = kube::Api::all_with(
        w.client.clone(),
        &kube::api::ApiResource {
            group: "meridian.io".into(),
            version: "v1alpha1".into(),
            api_version: "meridian.io/v1alpha1".into(),
            kind: "EdgeCluster".into(),
            plural: "edgeclusters".into(),
        },
    );
    eventually(
        "the EdgeCluster counts its node",
        Duration::from_secs(30),
        || {
            let api = api.clone();
            async move {
                let Ok(ec) = api.get("test-region").await else {
                    return false;
                };
                ec.data["status"]["readyNodes"] == 1
                    && ec.data["spec"]["endpoint"].as_str().is_some()
            }
        },
    )
    .await;
}

async fn create(w: &World, pod: serde_json::Value) {
    w.pods()
        .create(&Default::default(), &serde_json::from_value(pod).unwrap())
        .await
        .unwrap();
}

fn terminated_exit(p: &k8s_openapi::api::core::v1::Pod) -> Option<i32> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_runtime_honours_restart_policies_probes_and_graceful_stop() {
    let mut w = World::start(RegionOpts::default()).await;
    w.add_agent("rome-1").await;
    let c = |cmd: &str| serde_json::json!([{"name": "main", "image": "busybox", "command": ["/bin/sh", "-c", cmd]}]);
    create(&w, serde_json::json!({"metadata": {"name": "once"}, "spec": {"nodeName": "rome-1", "restartPolicy": "OnFailure", "containers": c("echo done")}})).await;
    create(&w, serde_json::json!({"metadata": {"name": "fails"}, "spec": {"nodeName": "rome-1", "restartPolicy": "Never", "containers": c("exit 3")}})).await;
    create(&w, serde_json::json!({"metadata": {"name": "crashy"}, "spec": {"nodeName": "rome-1", "containers": c("exit 1")}})).await;
    let marker = w.path("sigterm-seen");
    let trap = format!(
        "trap 'echo bye > {}; exit 0' TERM; while true; do sleep 0.1; done",
        marker.display()
    );
    create(&w, serde_json::json!({"metadata": {"name": "graceful"}, "spec": {"nodeName": "rome-1", "terminationGracePeriodSeconds": 10, "containers": c(&trap)}})).await;
    create(&w, serde_json::json!({"metadata": {"name": "unhealthy"}, "spec": {"nodeName": "rome-1", "containers": [{
        "name": "main", "image": "busybox", "command": ["/bin/sh", "-c", "exec sleep 3600"],
        "livenessProbe": {"tcpSocket": {"port": 1}, "periodSeconds": 1, "failureThreshold": 2},
    }]}})).await;
    let pods = w.pods();
    eventually(
        "OnFailure + exit 0 => Succeeded",
        Duration::from_secs(30),
        || {
            let pods = pods.clone();
            async move {
                let p = pods.get("once").await.unwrap();
                p.status.and_then(|s| s.phase).as_deref() == Some("Succeeded")
            }
        },
    )
    .await;
    eventually(
        "Never + exit 3 => Failed with exit code 3",
        Duration::from_secs(30),
        || {
            let pods = pods.clone();
            async move {
                let p = pods.get("fails").await.unwrap();
                terminated_exit(&p) == Some(3)
                    && p.status.and_then(|s| s.phase).as_deref() == Some("Failed")
            }
        },
    )
    .await;
    eventually(
        "Always + crash => restarted with back-off",
        Duration::from_secs(30),
        || {
            let pods = pods.clone();
            async move {
                let p = pods.get("crashy").await.unwrap();
                let cs = p
                    .status
                    .and_then(|s| s.container_statuses)
                    .unwrap_or_default();
                cs.first().is_some_and(|c| {
                    c.restart_count >= 2
                        && c.last_state
                            .as_ref()
                            .and_then(|l| l.terminated.as_ref())
                            .is_some_and(|t| t.exit_code == 1)
                })
            }
        },
    )
    .await;
    eventually(
        "a failing liveness probe restarts the container",
        Duration::from_secs(30),
        || {
            let pods = pods.clone();
            async move { restart_count(&pods.get("unhealthy").await.unwrap()) >= 1 }
        },
    )
    .await;
    let p = w.wait_running_ready("graceful").await;
    let pid = container_pid(&p).unwrap();
    pods.delete("graceful", &Default::default()).await.unwrap();
    eventually(
        "deletion stops the process with SIGTERM",
        Duration::from_secs(15),
        || {
            let m = marker.clone();
            async move { m.exists() && !alive(pid) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_region_has_its_nodes_marked_unknown_by_the_global_plane_and_no_pod_moved() {
    let mut w = World::start(RegionOpts {
        grace: "2s",
        ..Default::default()
    })
    .await;
    w.add_agent("oslo-1").await;
    w.run_pod("keep", "oslo-1", "exec sleep 3600").await;
    let pid = container_pid(&w.wait_running_ready("keep").await).unwrap();
    w.region.as_mut().unwrap().kill9();
    // the server runs with --region-timeout 12s; the region reported every 10s
    let deadline = Duration::from_secs(40);
    let t0 = Instant::now();
    while w.node_ready("oslo-1").await.as_deref() != Some("Unknown") {
        assert!(
            t0.elapsed() < deadline,
            "the node of a silent region stayed Ready"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let p = w.pod("keep").await;
    assert!(
        !is_marked(&p),
        "a whole region gone is a partition: nothing is marked"
    );
    assert!(
        alive(pid),
        "the node keeps its workload while its region is away"
    );
    w.start_region().await;
    w.wait_node("oslo-1", "True").await;
    assert!(!is_marked(&w.pod("keep").await));
}
