//! Hollow nodes: many lightweight agents in one process, speaking the real region
//! protocol (register, heartbeat, status), running nothing. Pods pushed to a hollow
//! node are reported Running after `start_delay`. For scale benchmarks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meridian_proto::agent_hub_client::AgentHubClient;
use meridian_proto::{
    AgentMessage, Heartbeat, NodeFacts, NodeUsage, PodStatusBatch, PodStatusUpdate, Register,
    agent_message, region_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

#[derive(Default)]
pub struct HollowStats {
    pub registered: AtomicU64,
    pub heartbeats: AtomicU64,
    pub pods_started: AtomicU64,
    pub errors: AtomicU64,
}

#[derive(Clone)]
pub struct HollowConfig {
    pub heartbeat: Duration,
    pub start_delay: Duration,
    pub labels: Vec<(String, String)>,
}

fn facts() -> NodeFacts {
    NodeFacts {
        cpu_millis: 4000,
        memory_bytes: 8 << 30,
        ephemeral_storage_bytes: 100 << 30,
        max_pods: 110,
        arch: "amd64".into(),
        os: "linux".into(),
        kernel: "hollow".into(),
        runtime: "fake".into(),
        addresses: vec!["10.0.0.1".into()],
        ..Default::default()
    }
}

/// Runs one hollow node on `channel` (shared by many nodes: one HTTP/2 connection
/// carries many streams). Reconnects forever with a short pause.
pub async fn run_node(channel: Channel, name: String, cfg: HollowConfig, stats: Arc<HollowStats>) {
    let mut first = true;
    loop {
        if let Err(e) = session(&channel, &name, &cfg, &stats, first).await {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(node = %name, "hollow session: {e}");
        }
        first = false;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn session(
    channel: &Channel,
    name: &str,
    cfg: &HollowConfig,
    stats: &HollowStats,
    first: bool,
) -> Result<(), String> {
    let mut client = AgentHubClient::new(channel.clone());
    let (tx, rx) = mpsc::channel::<AgentMessage>(16);
    let reg = Register {
        node_name: name.to_owned(),
        labels: cfg.labels.iter().cloned().collect(),
        facts: Some(facts()),
        running_pods: vec![],
        agent_version: "hollow".into(),
    };
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Register(reg)),
    })
    .await
    .map_err(|_| "closed")?;
    let mut inbound = client
        .attach(ReceiverStream::new(rx))
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let mut running: std::collections::HashSet<String> = Default::default();
    // Spread heartbeats over the period so N nodes do not beat in lockstep.
    let offset =
        Duration::from_millis(rand::random::<u64>() % cfg.heartbeat.as_millis().max(1) as u64);
    let mut hb = tokio::time::interval_at(tokio::time::Instant::now() + offset, cfg.heartbeat);
    let mut seq = 0;
    loop {
        tokio::select! {
            m = inbound.message() => {
                let Some(m) = m.map_err(|s| s.message().to_owned())? else { return Ok(()) };
                match m.msg {
                    Some(region_message::Msg::Registered(_)) if first => {
                        stats.registered.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(region_message::Msg::Desired(d)) => {
                        let mut updates = Vec::new();
                        for p in d.pods {
                            if running.insert(p.uid.clone()) {
                                let Ok(pod) = serde_json::from_slice::<serde_json::Value>(&p.pod_json) else { continue };
                                updates.push(running_status(&p.uid, &pod));
                            }
                        }
                        if !updates.is_empty() {
                            tokio::time::sleep(cfg.start_delay).await;
                            stats.pods_started.fetch_add(updates.len() as u64, Ordering::Relaxed);
                            let batch = PodStatusBatch { updates };
                            tx.send(AgentMessage { msg: Some(agent_message::Msg::PodStatus(batch)) }).await.map_err(|_| "closed")?;
                        }
                    }
                    _ => {}
                }
            }
            _ = hb.tick() => {
                seq += 1;
                let beat = Heartbeat { seq, usage: Some(NodeUsage { cpu_millis: 100, memory_bytes: 1 << 30, disk_bytes: 1 << 30 }), pods: vec![] };
                tx.send(AgentMessage { msg: Some(agent_message::Msg::Heartbeat(beat)) }).await.map_err(|_| "closed")?;
                stats.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn running_status(uid: &str, pod: &serde_json::Value) -> PodStatusUpdate {
    let now = jiff::Timestamp::now().to_string();
    let containers: Vec<serde_json::Value> = pod["spec"]["containers"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    serde_json::json!({
                        "name": c["name"], "image": c["image"], "imageID": "", "ready": true,
                        "started": true, "restartCount": 0, "state": {"running": {"startedAt": now}},
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let status = serde_json::json!({
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
        "containerStatuses": containers,
        "startTime": now,
    });
    PodStatusUpdate {
        uid: uid.to_owned(),
        namespace: pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        name: pod["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        status_json: serde_json::to_vec(&status).unwrap_or_default(),
    }
}
