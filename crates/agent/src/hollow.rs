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
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// What a hollow node says to logs and exec requests.
const SIMULATED: &str = "this is a simulated node: its pods run nothing, so there are no logs and no processes to exec into";

#[derive(Default)]
pub struct HollowStats {
    pub registered: AtomicU64,
    pub heartbeats: AtomicU64,
    pub pods_started: AtomicU64,
    pub errors: AtomicU64,
}

#[derive(Clone, Default)]
pub struct HollowConfig {
    pub heartbeat: Duration,
    pub start_delay: Duration,
    pub labels: Vec<(String, String)>,
    pub taints: Vec<String>,
    pub gpus: i32,
    pub coordinates: Option<(f64, f64)>,
    /// Pods that do not restart (`restartPolicy` Never or OnFailure) succeed after
    /// this long; `None`: they run forever like the others.
    pub run_for: Option<Duration>,
}

fn facts(cfg: &HollowConfig) -> NodeFacts {
    NodeFacts {
        gpus: cfg.gpus,
        has_coordinates: cfg.coordinates.is_some(),
        latitude: cfg.coordinates.map_or(0.0, |c| c.0),
        longitude: cfg.coordinates.map_or(0.0, |c| c.1),
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
    // Boxed: a channel allocates its slots 32 at a time, and an `AgentMessage` is
    // ~400 bytes (12.5 KB per node idle, 1.2 GB at 100k nodes); a box is 8.
    let (tx, rx) = mpsc::channel::<Box<AgentMessage>>(16);
    let reg = Register {
        node_name: name.to_owned(),
        labels: cfg.labels.iter().cloned().collect(),
        facts: Some(facts(cfg)),
        running_pods: vec![],
        agent_version: "hollow".into(),
        taints: cfg.taints.clone(),
        accepts_changes: true,
    };
    send(&tx, agent_message::Msg::Register(reg)).await?;
    let mut inbound = client
        .attach(ReceiverStream::new(rx).map(|m| *m))
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let mut running: std::collections::HashSet<String> = Default::default();
    // Spread heartbeats over the period so N nodes do not beat in lockstep.
    let offset =
        Duration::from_millis(rand::random::<u64>() % cfg.heartbeat.as_millis().max(1) as u64);
    let mut hb = tokio::time::interval_at(tokio::time::Instant::now() + offset, cfg.heartbeat);
    let mut seq = 0;
    // Status reports due later, (when, status), each queue in time order: pods
    // starting (after `start_delay`) and pods that will succeed. One timer for the
    // earliest, so a node with nothing pending costs no wakeups, and the node keeps
    // heartbeating while its pods start.
    let mut starting: Due = Default::default();
    let mut finishing: Due = Default::default();
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    loop {
        let next = [starting.front(), finishing.front()]
            .into_iter()
            .flatten()
            .map(|(t, _)| *t)
            .min();
        tokio::select! {
            _ = tokio::time::sleep_until(next.unwrap_or(far)), if next.is_some() => {
                let now = tokio::time::Instant::now();
                let mut updates = Vec::new();
                let mut started = 0;
                for (q, is_start) in [(&mut starting, true), (&mut finishing, false)] {
                    while q.front().is_some_and(|(t, _)| *t <= now) {
                        if let Some((_, u)) = q.pop_front() {
                            updates.push(u);
                            started += u64::from(is_start);
                        }
                    }
                }
                if !updates.is_empty() {
                    stats.pods_started.fetch_add(started, Ordering::Relaxed);
                    let batch = PodStatusBatch { updates };
                    send(&tx, agent_message::Msg::PodStatus(batch)).await?;
                }
            }
            m = inbound.message() => {
                let Some(m) = m.map_err(|s| s.message().to_owned())? else { return Ok(()) };
                match m.msg {
                    Some(region_message::Msg::Registered(_)) if first => {
                        stats.registered.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(region_message::Msg::Desired(d)) => {
                        let keep: std::collections::HashSet<&str> = d.pods.iter().map(|p| p.uid.as_str()).collect();
                        running.retain(|uid| keep.contains(uid.as_str()));
                        start(cfg, d.pods, &mut running, &mut starting, &mut finishing);
                    }
                    Some(region_message::Msg::Changes(c)) => {
                        for uid in &c.removed {
                            running.remove(uid);
                        }
                        start(cfg, c.upserts, &mut running, &mut starting, &mut finishing);
                    }
                    // A hollow node has every image at once.
                    Some(region_message::Msg::PullImages(p)) => {
                        let results = p.images.into_iter().map(|image| meridian_proto::ImagePullResult { image, error: String::new() }).collect();
                        let done = meridian_proto::ImagesPulled { id: p.id, results };
                        send(&tx, agent_message::Msg::ImagesPulled(done)).await?;
                    }
                    // Nothing runs here: logs and exec get an answer saying so, at once.
                    Some(region_message::Msg::LogRequest(r)) => {
                        let chunk = meridian_proto::LogChunk { request_id: r.request_id, data: Vec::new(), eof: true, error: SIMULATED.into() };
                        send(&tx, agent_message::Msg::LogChunk(chunk)).await?;
                    }
                    Some(region_message::Msg::ExecStart(e)) => {
                        let out = meridian_proto::ExecOutput { session_id: e.session_id, exited: true, exit_code: 126, error: SIMULATED.into(), ..Default::default() };
                        send(&tx, agent_message::Msg::ExecOutput(out)).await?;
                    }
                    _ => {}
                }
            }
            _ = hb.tick() => {
                seq += 1;
                let beat = Heartbeat { seq, usage: Some(NodeUsage { cpu_millis: 100, memory_bytes: 1 << 30, disk_bytes: 1 << 30 }), pods: vec![] };
                send(&tx, agent_message::Msg::Heartbeat(beat)).await?;
                stats.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Status reports due later, (when, status), in time order.
type Due = std::collections::VecDeque<(tokio::time::Instant, PodStatusUpdate)>;

/// Queues the Running (and, for pods that finish, Succeeded) report of every pod
/// not already running here.
fn start(
    cfg: &HollowConfig,
    pods: Vec<meridian_proto::DesiredPod>,
    running: &mut std::collections::HashSet<String>,
    starting: &mut Due,
    finishing: &mut Due,
) {
    let now = tokio::time::Instant::now();
    for p in pods {
        if running.contains(&p.uid) {
            continue;
        }
        let Ok(pod) = serde_json::from_slice::<serde_json::Value>(&p.pod_json) else {
            continue;
        };
        starting.push_back((now + cfg.start_delay, running_status(&p.uid, &pod)));
        let restarts = pod["spec"]["restartPolicy"].as_str().unwrap_or("Always") == "Always";
        if let (Some(d), false) = (cfg.run_for, restarts) {
            finishing.push_back((now + cfg.start_delay + d, succeeded_status(&p.uid, &pod)));
        }
        running.insert(p.uid);
    }
}

async fn send(tx: &mpsc::Sender<Box<AgentMessage>>, m: agent_message::Msg) -> Result<(), String> {
    tx.send(Box::new(AgentMessage { msg: Some(m) }))
        .await
        .map_err(|_| "closed".to_owned())
}

/// One status per container of the pod, all in `state`.
fn containers(
    pod: &serde_json::Value,
    running: bool,
    state: serde_json::Value,
) -> serde_json::Value {
    let list: Vec<serde_json::Value> = pod["spec"]["containers"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    serde_json::json!({
                        "name": c["name"], "image": c["image"], "imageID": "", "ready": running,
                        "started": running, "restartCount": 0, "state": state,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    serde_json::Value::Array(list)
}

fn succeeded_status(uid: &str, pod: &serde_json::Value) -> PodStatusUpdate {
    let now = jiff::Timestamp::now().to_string();
    let state = serde_json::json!({"terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": now}});
    let status = serde_json::json!({
        "phase": "Succeeded",
        "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now}],
        "containerStatuses": containers(pod, false, state),
    });
    update(uid, pod, status)
}

fn running_status(uid: &str, pod: &serde_json::Value) -> PodStatusUpdate {
    let now = jiff::Timestamp::now().to_string();
    let state = serde_json::json!({"running": {"startedAt": now}});
    let status = serde_json::json!({
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
        "containerStatuses": containers(pod, true, state),
        "startTime": now,
    });
    update(uid, pod, status)
}

fn update(uid: &str, pod: &serde_json::Value, status: serde_json::Value) -> PodStatusUpdate {
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
