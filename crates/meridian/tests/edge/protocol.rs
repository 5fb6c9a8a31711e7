//! What the region sends an agent's stream: the full desired set first, then only
//! what changed (to agents that register with `accepts_changes`), or the full set
//! on every change (to agents that do not); and what it writes of a node upstream.

use std::collections::HashMap;
use std::time::Duration;

use kube::api::{DeleteParams, Patch, PatchParams};
use meridian_proto::agent_hub_client::AgentHubClient;
use meridian_proto::{
    AgentMessage, Heartbeat, NodeFacts, NodeUsage, Register, agent_message, region_message,
};
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;

use crate::harness::*;

/// A raw agent stream: registers `name` and hands back what the region sends.
async fn raw_agent(
    port: u16,
    name: &str,
    accepts_changes: bool,
) -> (
    tokio::sync::mpsc::Sender<AgentMessage>,
    tonic::Streaming<meridian_proto::RegionMessage>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let reg = Register {
        node_name: name.into(),
        labels: HashMap::new(),
        facts: Some(NodeFacts {
            cpu_millis: 4000,
            memory_bytes: 8 << 30,
            max_pods: 110,
            arch: "amd64".into(),
            os: "linux".into(),
            ..Default::default()
        }),
        agent_version: "test".into(),
        accepts_changes,
        ..Default::default()
    };
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Register(reg)),
    })
    .await
    .unwrap();
    let mut c = AgentHubClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let inbound = c
        .attach(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, inbound)
}

/// The next desired set or change on the stream (other messages skipped).
async fn next_desired(
    s: &mut tonic::Streaming<meridian_proto::RegionMessage>,
) -> region_message::Msg {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), s.message())
            .await
            .expect("a message within 20s")
            .expect("the stream is healthy")
            .expect("the stream is open");
        match m.msg {
            Some(m @ (region_message::Msg::Desired(_) | region_message::Msg::Changes(_))) => {
                return m;
            }
            _ => continue,
        }
    }
}

fn pod_on(name: &str, node: &str) -> serde_json::Value {
    json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox"}]},
    })
}

fn uids(pods: &[meridian_proto::DesiredPod]) -> Vec<String> {
    let mut u: Vec<String> = pods.iter().map(|p| p.uid.clone()).collect();
    u.sort();
    u
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_takes_changes_is_sent_only_what_changed_and_an_old_one_the_full_set() {
    let w = World::start(RegionOpts::default()).await;
    let (tx, mut new) = raw_agent(w.region_port, "changes-1", true).await;
    let (_tx_old, mut old) = raw_agent(w.region_port, "full-1", false).await;
    for s in [&mut new, &mut old] {
        match next_desired(s).await {
            region_message::Msg::Desired(d) => assert!(d.pods.is_empty(), "{d:?}"),
            other => panic!("the first desired message is the full set, not {other:?}"),
        }
    }
    // Pods are bound to Nodes the global API knows (their region comes from it).
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(w.client.clone());
    eventually(
        "both Nodes in the global API",
        Duration::from_secs(20),
        || {
            let nodes = nodes.clone();
            async move {
                nodes.get_opt("changes-1").await.ok().flatten().is_some()
                    && nodes.get_opt("full-1").await.ok().flatten().is_some()
            }
        },
    )
    .await;

    w.create_pod(pod_on("a", "changes-1")).await;
    let a = w.pod("a").await.metadata.uid.unwrap();
    match next_desired(&mut new).await {
        region_message::Msg::Changes(c) => {
            assert_eq!(uids(&c.upserts), vec![a.clone()]);
            assert!(c.removed.is_empty(), "{c:?}");
        }
        other => panic!("expected a change, got {other:?}"),
    }
    w.create_pod(pod_on("b", "changes-1")).await;
    let b = w.pod("b").await.metadata.uid.unwrap();
    match next_desired(&mut new).await {
        region_message::Msg::Changes(c) => {
            assert_eq!(uids(&c.upserts), vec![b.clone()], "only the new pod");
            assert!(c.removed.is_empty(), "{c:?}");
        }
        other => panic!("expected a change, got {other:?}"),
    }
    // A label is part of what an agent acts on: the pod is sent again, alone.
    let label = json!({"metadata": {"labels": {"tier": "gold"}}});
    w.pods()
        .patch("a", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
    match next_desired(&mut new).await {
        region_message::Msg::Changes(c) => {
            assert_eq!(uids(&c.upserts), vec![a.clone()]);
            let pod: serde_json::Value = serde_json::from_slice(&c.upserts[0].pod_json).unwrap();
            assert_eq!(pod["metadata"]["labels"]["tier"], "gold");
            assert!(c.removed.is_empty(), "{c:?}");
        }
        other => panic!("expected a change, got {other:?}"),
    }
    w.pods()
        .delete("b", &DeleteParams::default())
        .await
        .unwrap();
    match next_desired(&mut new).await {
        region_message::Msg::Changes(c) => {
            assert!(c.upserts.is_empty(), "{c:?}");
            assert_eq!(c.removed, vec![b.clone()]);
        }
        other => panic!("expected a change, got {other:?}"),
    }

    // The agent that did not ask for changes gets the whole set each time.
    w.create_pod(pod_on("c", "full-1")).await;
    let c = w.pod("c").await.metadata.uid.unwrap();
    w.create_pod(pod_on("d", "full-1")).await;
    let d = w.pod("d").await.metadata.uid.unwrap();
    let mut want = vec![c, d];
    want.sort();
    let mut last = Vec::new();
    for _ in 0..5 {
        match next_desired(&mut old).await {
            region_message::Msg::Desired(set) => last = uids(&set.pods),
            other => panic!("an old agent is sent full sets only, not {other:?}"),
        }
        if last == want {
            break;
        }
    }
    assert_eq!(last, want);

    // A new stream for the node starts again from the full set.
    drop((tx, new));
    let (_tx2, mut again) = raw_agent(w.region_port, "changes-1", true).await;
    match next_desired(&mut again).await {
        region_message::Msg::Desired(set) => assert_eq!(uids(&set.pods), vec![a]),
        other => panic!("the first desired message is the full set, not {other:?}"),
    }
}

/// Heartbeats every 300 ms reporting `cpu` millicores, until the stream closes.
fn beat(tx: tokio::sync::mpsc::Sender<AgentMessage>, cpu: i64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for seq in 1.. {
            let usage = NodeUsage {
                cpu_millis: cpu,
                memory_bytes: 1 << 30,
                disk_bytes: 1 << 30,
            };
            let hb = Heartbeat {
                seq,
                usage: Some(usage),
                pods: vec![],
            };
            let msg = AgentMessage {
                msg: Some(agent_message::Msg::Heartbeat(hb)),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// A server counter (`meridian_apiserver_requests_total`) for `verb` and `resource`,
/// all codes together.
async fn requests(w: &World, verb: &str, resource: &str) -> f64 {
    let text = w
        .client
        .request_text(http::Request::get("/metrics").body(Vec::new()).unwrap())
        .await
        .unwrap();
    let want =
        format!("meridian_apiserver_requests_total{{verb=\"{verb}\",resource=\"{resource}\",");
    text.lines()
        .filter(|l| l.starts_with(&want))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn heartbeat_time(nodes: &kube::Api<k8s_openapi::api::core::v1::Node>, name: &str) -> String {
    let n = nodes.get(name).await.unwrap();
    let c = n.status.and_then(|s| s.conditions).unwrap_or_default();
    let ready = c.into_iter().find(|c| c.type_ == "Ready");
    ready
        .and_then(|c| c.last_heartbeat_time)
        .map(|t| t.0.to_string())
        .unwrap_or_default()
}

/// Waits until Node `name` carries the usage annotation of `cpu` millicores.
async fn wait_usage(nodes: &kube::Api<k8s_openapi::api::core::v1::Node>, name: &str, cpu: i64) {
    let want = format!("cpu={cpu}m,memory=1073741824,disk=1073741824");
    eventually("the Node with its usage", Duration::from_secs(30), || {
        let nodes = nodes.clone();
        let want = want.clone();
        async move {
            let n = nodes.get_opt(name).await.ok().flatten();
            let got = n.and_then(|n| n.metadata.annotations?.get("meridian.io/usage").cloned());
            got == Some(want)
        }
    })
    .await;
}

#[tokio::test]
async fn a_node_summary_writes_its_annotations_only_when_they_changed() {
    let w = World::start(RegionOpts::default()).await;
    let (tx, _rx) = raw_agent(w.region_port, "steady-1", true).await;
    let beating = beat(tx.clone(), 100);
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(w.client.clone());
    wait_usage(&nodes, "steady-1", 100).await;
    // Two summaries (every 5 s here) with the same usage: status writes only, in
    // bulk.
    let patches = requests(&w, "patch", "nodes").await;
    let statuses = requests(&w, "create", "bulknodestatuses").await;
    let mut seen = heartbeat_time(&nodes, "steady-1").await;
    for _ in 0..2 {
        let before = seen.clone();
        eventually("a summary", Duration::from_secs(20), || {
            let nodes = nodes.clone();
            let before = before.clone();
            async move { heartbeat_time(&nodes, "steady-1").await != before }
        })
        .await;
        seen = heartbeat_time(&nodes, "steady-1").await;
    }
    assert!(requests(&w, "create", "bulknodestatuses").await >= statuses + 2.0);
    assert_eq!(
        requests(&w, "patch", "nodes").await,
        patches,
        "unchanged annotations are not written again"
    );
    // A change of usage is written with the next summary, in the same bulk
    // request as the status (not a patch of its own).
    let statuses = requests(&w, "create", "bulknodestatuses").await;
    beating.abort();
    let _beating = beat(tx, 250);
    wait_usage(&nodes, "steady-1", 250).await;
    assert!(requests(&w, "create", "bulknodestatuses").await > statuses);
    assert_eq!(requests(&w, "patch", "nodes").await, patches);
}
