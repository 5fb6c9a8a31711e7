//! The agent hub: the gRPC service every agent holds one stream to.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::Stream;
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use meridian_proto::agent_hub_server::{AgentHub, AgentHubServer};
use meridian_proto::{
    AgentMessage, NodeFacts, RegionMessage, Register, Registered, Rejected, agent_message,
    region_message,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::REGION_LABEL;
use crate::state::{Health, NodeEntry, Session, Shared, lock};

pub struct Hub {
    shared: Arc<Shared>,
}

pub fn service(shared: Arc<Shared>) -> AgentHubServer<Hub> {
    AgentHubServer::new(Hub { shared })
        .max_decoding_message_size(meridian_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(meridian_proto::MAX_MESSAGE_BYTES)
}

fn rejected(reason: &str, message: String, fatal: bool) -> RegionMessage {
    RegionMessage {
        msg: Some(region_message::Msg::Rejected(Rejected {
            reason: reason.into(),
            message,
            fatal,
        })),
    }
}

type OutStream = Pin<Box<dyn Stream<Item = Result<RegionMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentHub for Hub {
    type AttachStream = OutStream;

    async fn attach(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let peer = request
            .extensions()
            .get::<meridian_pki::Peer>()
            .and_then(|p| p.0.clone());
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no registration within 10s"))?
            .ok_or_else(|| Status::cancelled("stream closed before registration"))??;
        let Some(agent_message::Msg::Register(reg)) = first.msg else {
            self.shared.metrics.rejected.inc();
            return Err(Status::failed_precondition(
                "the first message on the stream must be Register",
            ));
        };
        let node = validate(&reg).map_err(|e| {
            self.shared.metrics.rejected.inc();
            Status::invalid_argument(e)
        })?;
        // With mutual TLS the certificate is the node's identity, and the region it
        // names is the center's assignment: it overrides an older owner.
        let assigned_here = match (&self.shared.cfg.tls, peer) {
            (None, _) => false,
            (Some(_), None) => {
                self.shared.metrics.rejected.inc();
                return Err(Status::unauthenticated(
                    "this region requires a node certificate (join through the center: \
                     meridian agent join --center URL --token T)",
                ));
            }
            (Some(_), Some(id)) if id.node != node || id.region != self.shared.cfg.name => {
                self.shared.metrics.rejected.inc();
                return Err(Status::permission_denied(format!(
                    "the certificate of node {:?} (region {:?}) cannot register as node {node:?} in region {:?}",
                    id.node, id.region, self.shared.cfg.name
                )));
            }
            (Some(_), Some(_)) => true,
        };
        if !assigned_here && let Err(e) = self.check_ownership(&node).await {
            self.shared.metrics.rejected.inc();
            return Err(Status::permission_denied(e));
        }
        let (tx, rx) = mpsc::channel(64);
        let tx = crate::state::SessionTx(tx);
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let session = Session {
            id,
            tx: tx.clone(),
            told: reg
                .accepts_changes
                .then(|| Arc::new(std::sync::Mutex::new(crate::state::Told::NotYet))),
        };
        let told = session.told.clone();
        let known = self.register(&node, reg, session).await;
        let welcome = RegionMessage {
            msg: Some(region_message::Msg::Registered(Registered {
                region: self.shared.cfg.name.clone(),
                heartbeat_seconds: self.shared.cfg.heartbeat.as_secs() as u32,
            })),
        };
        let _ = tx.send(welcome).await;
        if !known && let Ok(_permit) = self.shared.register_calls.acquire().await {
            crate::global::fetch_node_pods(&self.shared, &node).await;
        }
        self.shared.send_first_desired(&node, &tx, told.as_ref());
        crate::prepull::node_joined(&self.shared, &node, &tx).await;
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let reason = serve(&shared, &node, &tx, &mut inbound).await;
            tracing::info!(%node, "agent stream ended: {reason}");
            let mut nodes = lock(&shared.nodes);
            if let Some(n) = nodes.get_mut(&node)
                && n.session.as_ref().is_some_and(|s| s.id == id)
            {
                n.session = None;
            }
        });
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|m| Ok(*m)),
        )))
    }
}

/// Checks a registration; returns the node name.
fn validate(reg: &Register) -> Result<String, String> {
    if let Some(p) = meridian_api::validation::dns1123_subdomain_problem(&reg.node_name) {
        return Err(format!("node name {:?}: {p}", reg.node_name));
    }
    if reg.labels.len() > 64 {
        return Err("at most 64 labels per node".into());
    }
    for (k, v) in &reg.labels {
        use meridian_api::validation::{label_key_problem, label_value_problem};
        if let Some(p) = label_key_problem(k).or_else(|| label_value_problem(v)) {
            return Err(format!("label {k:?}={v:?}: {p}"));
        }
    }
    if reg.taints.len() > 32 {
        return Err("at most 32 taints per node".into());
    }
    for t in &reg.taints {
        meridian_api::validation::parse_taint(t)?;
    }
    let Some(f) = &reg.facts else {
        return Err("registration carries no node facts".into());
    };
    if f.has_coordinates
        && !((-90.0..=90.0).contains(&f.latitude) && (-180.0..=180.0).contains(&f.longitude))
    {
        return Err(format!(
            "coordinates {},{} are not on Earth",
            f.latitude, f.longitude
        ));
    }
    Ok(reg.node_name.clone())
}

fn quantity(v: i64) -> Quantity {
    Quantity(v.to_string())
}

/// The Node object for a registration.
pub fn node_object(
    region: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    taints: &[String],
    f: &NodeFacts,
) -> Node {
    let mut l = labels.clone();
    l.insert("kubernetes.io/hostname".into(), name.into());
    l.insert("kubernetes.io/arch".into(), f.arch.clone());
    l.insert("kubernetes.io/os".into(), f.os.clone());
    l.insert(REGION_LABEL.into(), region.into());
    l.entry("topology.kubernetes.io/region".into())
        .or_insert_with(|| region.into());
    let mut capacity = BTreeMap::new();
    capacity.insert("cpu".into(), Quantity(format!("{}m", f.cpu_millis)));
    capacity.insert("memory".into(), quantity(f.memory_bytes));
    capacity.insert(
        "ephemeral-storage".into(),
        quantity(f.ephemeral_storage_bytes),
    );
    capacity.insert("pods".into(), quantity(f.max_pods));
    if f.gpus > 0 {
        capacity.insert("nvidia.com/gpu".into(), quantity(f.gpus.into()));
    }
    let mut addresses: Vec<NodeAddress> = f
        .addresses
        .iter()
        .map(|a| NodeAddress {
            type_: "InternalIP".into(),
            address: a.clone(),
        })
        .collect();
    addresses.push(NodeAddress {
        type_: "Hostname".into(),
        address: name.into(),
    });
    let mut annotations = BTreeMap::new();
    if f.has_coordinates {
        annotations.insert(
            meridian_api::geo::COORDINATES_ANNOTATION.into(),
            format!("{:.4},{:.4}", f.latitude, f.longitude),
        );
    }
    if !f.limits_not_enforced.is_empty() {
        annotations.insert(
            "meridian.io/limits-not-enforced".into(),
            f.limits_not_enforced.clone(),
        );
    }
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(l),
            annotations: Some(annotations),
            ..Default::default()
        },
        // Declared taints apply when the Node is created; later changes are the
        // operator's (kubectl taint), never overwritten.
        spec: Some(NodeSpec {
            taints: Some(
                taints
                    .iter()
                    .filter_map(|t| meridian_api::validation::parse_taint(t).ok())
                    .collect(),
            )
            .filter(|t: &Vec<_>| !t.is_empty()),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            allocatable: Some(capacity.clone()),
            capacity: Some(capacity),
            addresses: Some(addresses),
            node_info: Some(NodeSystemInfo {
                architecture: f.arch.clone(),
                operating_system: f.os.clone(),
                kernel_version: f.kernel.clone(),
                os_image: f.os.clone(),
                container_runtime_version: format!("{}://meridian", f.runtime),
                kubelet_version: "meridian-agent".into(),
                kube_proxy_version: String::new(),
                boot_id: String::new(),
                machine_id: String::new(),
                system_uuid: String::new(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

impl Hub {
    /// A node known to the global API as another region's cannot register here.
    async fn check_ownership(&self, node: &str) -> Result<(), String> {
        if lock(&self.shared.nodes).contains_key(node) {
            return Ok(());
        }
        let Ok(_permit) = self.shared.register_calls.acquire().await else {
            return Ok(());
        };
        if let Some(Some(owner)) = self.shared.owner_in_global(node).await
            && !owner.is_empty()
            && owner != self.shared.cfg.name
        {
            return Err(format!(
                "node {node:?} belongs to region {owner:?}, not {:?}",
                self.shared.cfg.name
            ));
        }
        Ok(())
    }

    /// Records the registration; returns whether the node was known before.
    async fn register(&self, name: &str, reg: Register, session: Session) -> bool {
        let labels: BTreeMap<String, String> = reg.labels.into_iter().collect();
        let facts = reg.facts.unwrap_or_default();
        let node = node_object(&self.shared.cfg.name, name, &labels, &reg.taints, &facts);
        let now = Instant::now();
        let (known, old) = {
            let mut nodes = lock(&self.shared.nodes);
            let known = nodes.contains_key(name);
            let entry = nodes.entry(name.to_owned()).or_insert_with(|| NodeEntry {
                session: None,
                last_seen: now,
                health: Health::Ready,
                unreachable_since: None,
                unreachable_since_wall: None,
                transition_wall: jiff::Timestamp::now(),
                node: crate::state::NodeRecord::from_node(&node),
                usage: None,
                next_summary: crate::state::first_summary(
                    name,
                    now,
                    self.shared.cfg.summary_interval,
                ),
                created: false,
                written_annotations: None,
            });
            entry.last_seen = now;
            entry.node = crate::state::NodeRecord::from_node(&node);
            let old = entry.session.replace(session);
            (known, old)
        };
        if let Some(old) = old {
            let _ = old.tx.try_send(rejected(
                "Superseded",
                "a newer stream registered this node".into(),
                true,
            ));
        }
        self.shared.metrics.registrations.inc();
        self.shared.persist_node(name, &node).await;
        self.shared.mark_node_dirty(name);
        known
    }
}

/// Handles one agent's messages until its stream ends; returns why it ended.
async fn serve(
    shared: &Arc<Shared>,
    node: &str,
    tx: &crate::state::SessionTx,
    inbound: &mut Streaming<AgentMessage>,
) -> String {
    loop {
        let msg = match inbound.next().await {
            None => return "closed by the agent".into(),
            Some(Err(status)) => {
                shared.metrics.rejected.inc();
                return format!("stream error: {}", status.message());
            }
            Some(Ok(m)) => m,
        };
        let Some(msg) = msg.msg else {
            let _ = tx
                .send(rejected("Malformed", "empty message".into(), false))
                .await;
            continue;
        };
        match msg {
            agent_message::Msg::Register(_) => {
                let _ = tx
                    .send(rejected(
                        "AlreadyRegistered",
                        "this stream is registered; open a new stream to register again".into(),
                        false,
                    ))
                    .await;
            }
            agent_message::Msg::Heartbeat(hb) => {
                shared.metrics.heartbeats.inc();
                let mut nodes = lock(&shared.nodes);
                if let Some(n) = nodes.get_mut(node) {
                    n.last_seen = Instant::now();
                    if hb.usage.is_some() {
                        n.usage = hb.usage;
                    }
                }
            }
            agent_message::Msg::PodStatus(batch) => {
                let mut bad = Vec::new();
                {
                    let pods = lock(&shared.pods);
                    let mut up = lock(&shared.upload);
                    for u in batch.updates {
                        let ours = pods
                            .by_uid
                            .get(&u.uid)
                            .filter(|p| p.node == node && !p.marked);
                        let Some(p) = ours else {
                            bad.push(u.uid);
                            continue;
                        };
                        match serde_json::from_slice::<serde_json::Value>(&u.status_json) {
                            Ok(v) if v.is_object() => {
                                up.statuses
                                    .insert(u.uid, (p.namespace.clone(), p.name.clone(), v));
                            }
                            _ => bad.push(u.uid),
                        }
                    }
                }
                shared.upload_notify.notify_one();
                if !bad.is_empty() {
                    shared.metrics.rejected.inc();
                    let _ = tx
                        .send(rejected(
                            "UnknownPod",
                            format!(
                                "status for pods not bound to node {node} (or malformed): {}",
                                bad.join(", ")
                            ),
                            false,
                        ))
                        .await;
                }
            }
            agent_message::Msg::Event(e) => {
                let ok = lock(&shared.pods)
                    .by_uid
                    .get(&e.uid)
                    .is_some_and(|p| p.node == node);
                if ok && e.reason.len() <= 128 && e.message.len() <= 4096 {
                    let mut up = lock(&shared.upload);
                    if up.events.len() < 10_000 {
                        up.events.push((node.to_owned(), e));
                    }
                    drop(up);
                    shared.upload_notify.notify_one();
                } else {
                    shared.metrics.rejected.inc();
                }
            }
            agent_message::Msg::ImagesPulled(r) => crate::prepull::pulled(shared, node, r).await,
            agent_message::Msg::ExecOutput(o) => {
                let waiter = lock(&shared.execs).get(&o.session_id).cloned();
                // The WebSocket side removes its waiter when the session ends.
                if let Some(w) = waiter {
                    let _ = w.send(o).await;
                }
            }
            agent_message::Msg::LogChunk(c) => {
                let waiter = lock(&shared.logs).get(&c.request_id).cloned();
                // The HTTP side removes its waiter when the response ends.
                if let Some(w) = waiter {
                    let _ = w.send(c).await;
                }
            }
        }
    }
}
