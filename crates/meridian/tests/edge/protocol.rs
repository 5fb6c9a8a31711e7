//! What the region sends an agent's stream: the full desired set first, then only
//! what changed (to agents that register with `accepts_changes`), or the full set
//! on every change (to agents that do not).

use std::collections::HashMap;
use std::time::Duration;

use kube::api::{DeleteParams, Patch, PatchParams};
use meridian_proto::agent_hub_client::AgentHubClient;
use meridian_proto::{AgentMessage, NodeFacts, Register, agent_message, region_message};
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
