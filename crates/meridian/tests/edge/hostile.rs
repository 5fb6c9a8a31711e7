//! Bad or hostile messages on the agent stream get a clear error and disturb no one.

use std::collections::HashMap;
use std::time::Duration;

use meridian_proto::agent_hub_client::AgentHubClient;
use meridian_proto::{
    AgentMessage, Heartbeat, NodeFacts, PodStatusBatch, PodStatusUpdate, Register, agent_message,
    region_message,
};
use tokio_stream::wrappers::ReceiverStream;

use crate::harness::*;

fn register(name: &str, labels: HashMap<String, String>) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Register(Register {
            node_name: name.into(),
            labels,
            facts: Some(NodeFacts {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
                max_pods: 10,
                arch: "amd64".into(),
                os: "linux".into(),
                ..Default::default()
            }),
            running_pods: vec![],
            agent_version: "test".into(),
            taints: vec![],
            // The old protocol: a full desired set on every change.
            accepts_changes: false,
        })),
    }
}

async fn client(port: u16) -> AgentHubClient<tonic::transport::Channel> {
    AgentHubClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap()
        .max_encoding_message_size(64 * 1024 * 1024)
}

/// Opens a stream, sends `msgs`, returns the first answer or the error status.
async fn attempt(port: u16, msgs: Vec<AgentMessage>) -> Result<region_message::Msg, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    let mut c = client(port).await;
    let mut inbound = c.attach(ReceiverStream::new(rx)).await?.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(15), inbound.message())
        .await
        .expect("an answer within 15s")?;
    drop(tx);
    Ok(first.and_then(|m| m.msg).expect("a message"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_hostile_agent_messages_are_rejected_and_disturb_no_one() {
    let mut w = World::start(RegionOpts::default()).await;
    w.add_agent("good-1").await;
    w.run_pod("bystander", "good-1", "exec sleep 3600").await;
    let before = container_pid(&w.wait_running_ready("bystander").await);
    let port = w.region_port;

    // not registering first
    let hb = AgentMessage {
        msg: Some(agent_message::Msg::Heartbeat(Heartbeat::default())),
    };
    let e = attempt(port, vec![hb]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("must be Register"), "{}", e.message());

    // an invalid node name
    let e = attempt(port, vec![register("Bad_Name!", HashMap::new())])
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("Bad_Name!"), "{}", e.message());

    // a label that is not a label
    let labels = HashMap::from([("bad key".to_owned(), "v".to_owned())]);
    let e = attempt(port, vec![register("fine-1", labels)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // a taint that is not a taint
    let mut reg = register("fine-2", HashMap::new());
    if let Some(agent_message::Msg::Register(r)) = &mut reg.msg {
        r.taints = vec!["gpu=yes:Sometimes".into()];
    }
    let e = attempt(port, vec![reg]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("effect must be"), "{}", e.message());

    // an oversized message (8 MiB against a 4 MiB limit)
    let labels = HashMap::from([("x".to_owned(), "y".repeat(8 << 20))]);
    let e = attempt(port, vec![register("big-1", labels)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange | tonic::Code::Internal
        ),
        "{e:?}"
    );

    // a node the global API knows in another region
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(w.client.clone());
    let foreign = serde_json::json!({"metadata": {"name": "elsewhere-1", "labels": {"meridian.io/region": "other"}}});
    nodes
        .create(
            &Default::default(),
            &serde_json::from_value(foreign).unwrap(),
        )
        .await
        .unwrap();
    let e = attempt(port, vec![register("elsewhere-1", HashMap::new())])
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("belongs to region \"other\""),
        "{}",
        e.message()
    );

    // status for a pod that is not on this node: rejected, the stream lives on
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(register("intruder-1", HashMap::new()))
        .await
        .unwrap();
    let mut c = client(port).await;
    let mut inbound = c
        .attach(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let bystander_uid = w.pod("bystander").await.metadata.uid.unwrap();
    let forged = PodStatusUpdate {
        uid: bystander_uid,
        namespace: "edge".into(),
        name: "bystander".into(),
        status_json: br#"{"phase":"Failed"}"#.to_vec(),
    };
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::PodStatus(PodStatusBatch {
            updates: vec![forged],
        })),
    })
    .await
    .unwrap();
    let mut rejected = None;
    for _ in 0..5 {
        let m = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(region_message::Msg::Rejected(r)) = m.msg {
            rejected = Some(r);
            break;
        }
    }
    let r = rejected.expect("the forged status is rejected");
    assert_eq!(r.reason, "UnknownPod");
    assert!(!r.fatal);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Heartbeat(Heartbeat::default())),
    })
    .await
    .unwrap();

    // the honest node and its pod were not disturbed
    tokio::time::sleep(Duration::from_secs(1)).await;
    let p = w.pod("bystander").await;
    assert!(is_running_ready(&p), "{:?}", p.status);
    assert_eq!(container_pid(&p), before);
    assert_eq!(w.node_ready("good-1").await.as_deref(), Some("True"));
    assert!(
        w.region_metric("meridian_region_rejected_total")
            .await
            .unwrap_or(0.0)
            >= 5.0
    );
}
