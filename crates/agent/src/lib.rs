//! The node agent. It dials its region and holds one gRPC stream open (so it works
//! behind NAT), registers the node, heartbeats, receives the node's desired pods and
//! reports their status. Desired pods and container state live in a local redb
//! file, so the node keeps running and restarting its pods while disconnected and
//! after its own restart, and resynchronises without restarting unchanged pods.

pub mod facts;
pub mod hollow;
pub mod join;
pub mod logs;
pub mod pods;
pub mod refs;
pub mod runtime;
pub mod shim;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_proto::agent_hub_client::AgentHubClient;
use meridian_proto::{
    AgentMessage, ExecInput, ExecOutput, ExecStart, Heartbeat, ImagePullResult, ImagesPulled,
    LogChunk, LogRequest, NodeFacts, PodStatusBatch, PodUsage, Register, agent_message,
    region_message,
};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub use pods::Backoff;
use pods::{Ctx, Outbox, PodManager};
use runtime::Runtime;
use state::LocalState;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid agent configuration: {0}")]
    Config(String),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("cannot create {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Region agent-hub URLs (`http://host:port`); the agent fails over between them.
    pub regions: Vec<String>,
    pub node_name: String,
    pub labels: BTreeMap<String, String>,
    /// Taints for the Node, `key=value:Effect`.
    pub taints: Vec<String>,
    pub data_dir: PathBuf,
    pub heartbeat: Duration,
    /// The address pods and probes use (process runtime pods share the host network).
    pub node_ip: String,
    pub max_pods: i64,
    pub backoff: Backoff,
    /// Upper bound of the reconnect back-off.
    pub reconnect_cap: Duration,
    /// Declared location (latitude, longitude in degrees).
    pub coordinates: Option<(f64, f64)>,
    /// When unused images are removed (image runtimes only).
    pub image_gc: runtime::ImageGcPolicy,
    /// Joined through the center: the region and the TLS identity come from
    /// `DATA/identity` (see [`join`]) instead of `regions`.
    pub onboarding: Option<Onboarding>,
}

/// How a node that joined through the center keeps its place.
#[derive(Clone, Debug)]
pub struct Onboarding {
    pub dir: join::IdentityDir,
    /// What the node re-plans with (name, labels, facts).
    pub spec: join::JoinSpec,
    /// Re-plan after the region has been unreachable this long.
    pub replan_after: Duration,
    /// How often the node asks the center whether to move (its region draining).
    pub center_interval: Duration,
}

impl AgentConfig {
    pub fn new(node_name: impl Into<String>, regions: Vec<String>, data_dir: PathBuf) -> Self {
        Self {
            regions,
            node_name: node_name.into(),
            labels: BTreeMap::new(),
            taints: Vec::new(),
            data_dir,
            heartbeat: Duration::from_secs(10),
            node_ip: "127.0.0.1".into(),
            max_pods: 110,
            backoff: Backoff::default(),
            reconnect_cap: Duration::from_secs(30),
            coordinates: None,
            image_gc: Default::default(),
            onboarding: None,
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Removes unused images when the image filesystem fills up, every
/// `policy.interval` (a no-op for runtimes without images).
async fn image_gc(runtime: Arc<dyn Runtime>, policy: runtime::ImageGcPolicy) {
    loop {
        tokio::time::sleep(policy.interval).await;
        match runtime.gc_images(&policy).await {
            None => return,
            Some(Ok(r)) if !r.removed.is_empty() => tracing::info!(
                used_percent = r.used_percent,
                removed = r.removed.len(),
                freed_bytes = r.freed_bytes,
                "image garbage collection"
            ),
            Some(Ok(_)) => {}
            Some(Err(e)) => tracing::warn!("image garbage collection: {e}"),
        }
    }
}

/// Valid node names are DNS-1123 subdomains.
pub fn valid_node_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !p.starts_with('-')
                && !p.ends_with('-')
        })
}

pub struct Agent {
    cfg: AgentConfig,
    manager: Arc<PodManager>,
    facts: NodeFacts,
    /// Set when the node moved to another region: the current session ends.
    moved: Arc<tokio::sync::Notify>,
    /// When a region last accepted the node's registration.
    registered_at: std::sync::Mutex<Instant>,
}

impl Agent {
    /// Opens the local cache and re-adopts (or restarts) every cached pod before
    /// talking to anyone.
    pub async fn start(cfg: AgentConfig, runtime: Arc<dyn Runtime>) -> Result<Self, AgentError> {
        if !valid_node_name(&cfg.node_name) {
            return Err(AgentError::Config(format!(
                "node name {:?} is not a DNS-1123 subdomain",
                cfg.node_name
            )));
        }
        if cfg.regions.is_empty() && cfg.onboarding.is_none() {
            return Err(AgentError::Config(
                "at least one region address is needed".into(),
            ));
        }
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| AgentError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
        let state = Arc::new(LocalState::open(&cfg.data_dir.join("agent.redb"))?);
        let mut facts = facts::detect(&cfg.data_dir, cfg.max_pods, vec![cfg.node_ip.clone()]);
        facts.runtime = runtime.name().into();
        facts.limits_not_enforced = runtime.limits_not_enforced().unwrap_or_default();
        if let Some((lat, lon)) = cfg.coordinates {
            facts.has_coordinates = true;
            facts.latitude = lat;
            facts.longitude = lon;
        }
        let ctx = Arc::new(Ctx {
            runtime,
            state,
            data_dir: cfg.data_dir.clone(),
            node_name: cfg.node_name.clone(),
            node_ip: cfg.node_ip.clone(),
            backoff: cfg.backoff.clone(),
            outbox: Outbox::default(),
        });
        let manager = Arc::new(PodManager::new(ctx));
        let n = manager.restore().await?;
        if n > 0 {
            tracing::info!(node = %cfg.node_name, pods = n, "resumed pods from the local cache");
        }
        Ok(Self {
            cfg,
            manager,
            facts,
            moved: Arc::new(tokio::sync::Notify::new()),
            registered_at: std::sync::Mutex::new(Instant::now()),
        })
    }

    pub fn manager(&self) -> &Arc<PodManager> {
        &self.manager
    }

    /// Connects, serves, and reconnects forever with jittered exponential back-off,
    /// rotating through the region addresses.
    pub async fn run(self) {
        let _gc = AbortOnDrop(tokio::spawn(image_gc(
            self.manager.ctx.runtime.clone(),
            self.cfg.image_gc,
        )));
        let _maintain = self
            .cfg
            .onboarding
            .clone()
            .map(|o| AbortOnDrop(tokio::spawn(maintain_identity(o, self.moved.clone()))));
        let mut failures: u32 = 0;
        let mut idx = 0usize;
        loop {
            if let Some(o) = &self.cfg.onboarding
                && failures >= 3
                && failures.is_multiple_of(3)
                && let Err(e) = join::refresh_endpoint(&o.dir).await
            {
                tracing::debug!("asking the center for the region's endpoint: {e}");
            }
            if let Some(o) = &self.cfg.onboarding {
                let since = self
                    .registered_at
                    .lock()
                    .map(|t| t.elapsed())
                    .unwrap_or_default();
                if since > o.replan_after {
                    tracing::warn!(unreachable_for = ?since, "region unreachable for long: re-planning through the center");
                    match replan(o, "unreachable").await {
                        Ok(a) => tracing::info!(region = %a.region, "re-planned"),
                        Err(e) => tracing::warn!("re-plan: {e}"),
                    }
                    if let Ok(mut t) = self.registered_at.lock() {
                        *t = Instant::now();
                    }
                }
            }
            let addr = match self.cfg.onboarding.as_ref().and_then(|o| o.dir.saved()) {
                Some(saved) => saved.endpoint,
                None if self.cfg.regions.is_empty() => {
                    tracing::error!(
                        "no region: the identity directory has no assignment (join first)"
                    );
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
                None => self.cfg.regions[idx % self.cfg.regions.len()].clone(),
            };
            let began = Instant::now();
            match self.session(&addr).await {
                Ok(()) => tracing::info!(region = %addr, "region closed the stream"),
                Err(e) => tracing::warn!(region = %addr, "region session: {e}"),
            }
            if began.elapsed() > Duration::from_secs(30) {
                failures = 0;
            } else {
                failures = failures.saturating_add(1);
                idx += 1; // try the next region address
            }
            let base = Duration::from_millis(500).saturating_mul(1 << failures.min(8));
            let base = base.min(self.cfg.reconnect_cap);
            let jitter = rand::rng().random_range(0.5..1.5);
            tokio::time::sleep(base.mul_f64(jitter)).await;
        }
    }

    async fn session(&self, addr: &str) -> Result<(), String> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(addr.to_owned())
            .map_err(|e| format!("bad region address {addr:?}: {e}"))?;
        let mut labels = self.cfg.labels.clone();
        if let Some(o) = &self.cfg.onboarding {
            let tls = o.dir.client_tls().map_err(|e| e.to_string())?;
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| format!("TLS configuration: {e}"))?;
            if let Some(saved) = o.dir.saved() {
                labels.extend(saved.labels);
            }
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut client = AgentHubClient::new(channel)
            .max_decoding_message_size(meridian_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(meridian_proto::MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel::<AgentMessage>(256);
        let register = Register {
            node_name: self.cfg.node_name.clone(),
            labels: labels.into_iter().collect(),
            facts: Some(self.facts.clone()),
            running_pods: self.manager.running().await,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            taints: self.cfg.taints.clone(),
            accepts_changes: true,
        };
        let _ = tx.send(msg(agent_message::Msg::Register(register))).await;
        let mut inbound = client
            .attach(ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("open stream: {}", s.message()))?
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(15), inbound.message())
            .await
            .map_err(|_| "no answer to registration within 15s".to_string())?
            .map_err(|s| format!("registration: {}", s.message()))?
            .ok_or("stream closed during registration")?;
        let heartbeat = match first.msg {
            Some(region_message::Msg::Registered(r)) => {
                tracing::info!(region = %r.region, node = %self.cfg.node_name, "registered");
                if let Ok(mut t) = self.registered_at.lock() {
                    *t = Instant::now();
                }
                if r.heartbeat_seconds > 0 && self.cfg.heartbeat == Duration::from_secs(10) {
                    Duration::from_secs(r.heartbeat_seconds.into())
                } else {
                    self.cfg.heartbeat
                }
            }
            Some(region_message::Msg::Rejected(r)) => {
                return Err(format!(
                    "registration rejected: {}: {}",
                    r.reason, r.message
                ));
            }
            _ => return Err("unexpected first message from region".into()),
        };
        let outbox = &self.manager.ctx.outbox;
        let all = outbox.all_statuses();
        if !all.is_empty() {
            let _ = tx
                .send(msg(agent_message::Msg::PodStatus(PodStatusBatch {
                    updates: all,
                })))
                .await;
        }
        let mut hb = tokio::time::interval(heartbeat);
        hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        // The region's desired set as this stream has told it: a full set first,
        // then changes to it.
        let mut desired: BTreeMap<String, (Vec<u8>, refs::Refs)> = BTreeMap::new();
        let mut sampler = facts::UsageSampler::default();
        let mut last_cpu: HashMap<String, (u64, Instant)> = HashMap::new();
        let mut logs: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
        let mut execs: HashMap<u64, mpsc::UnboundedSender<ExecInput>> = HashMap::new();
        loop {
            tokio::select! {
                m = inbound.message() => {
                    let m = m.map_err(|s| format!("stream: {}", s.message()))?;
                    let Some(m) = m else { return Ok(()) };
                    match m.msg {
                        Some(region_message::Msg::Desired(d)) => {
                            desired = d.pods.into_iter().map(desired_pod).collect();
                            self.manager.set_desired(desired_list(&desired)).await;
                        }
                        Some(region_message::Msg::Changes(c)) => {
                            for uid in &c.removed {
                                desired.remove(uid);
                            }
                            desired.extend(c.upserts.into_iter().map(desired_pod));
                            self.manager.set_desired(desired_list(&desired)).await;
                        }
                        Some(region_message::Msg::LogRequest(r)) => {
                            logs.retain(|_, h| !h.is_finished());
                            let id = r.request_id;
                            let task = tokio::spawn(serve_log(self.manager.ctx.clone(), r, tx.clone()));
                            logs.insert(id, task.abort_handle());
                        }
                        Some(region_message::Msg::CancelLog(c)) => {
                            if let Some(h) = logs.remove(&c.request_id) {
                                h.abort();
                            }
                        }
                        Some(region_message::Msg::ExecStart(e)) => {
                            execs.retain(|_, t| !t.is_closed());
                            let (in_tx, in_rx) = mpsc::unbounded_channel();
                            execs.insert(e.session_id, in_tx);
                            tokio::spawn(serve_exec(self.manager.clone(), e, in_rx, tx.clone()));
                        }
                        Some(region_message::Msg::ExecInput(i)) => {
                            if i.cancel {
                                execs.remove(&i.session_id);
                            } else if let Some(t) = execs.get(&i.session_id) {
                                let _ = t.send(i);
                            }
                        }
                        Some(region_message::Msg::Rejected(r)) => {
                            tracing::warn!(reason = %r.reason, "region rejected a message: {}", r.message);
                            if r.fatal {
                                return Err(format!("{}: {}", r.reason, r.message));
                            }
                        }
                        Some(region_message::Msg::PullImages(p)) => {
                            let runtime = self.manager.ctx.runtime.clone();
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                let mut results = Vec::with_capacity(p.images.len());
                                for image in p.images {
                                    let error = match runtime.pull_image(&image, None).await {
                                        Ok(()) => String::new(),
                                        Err(e) => e.to_string(),
                                    };
                                    results.push(ImagePullResult { image, error });
                                }
                                let done = ImagesPulled { id: p.id, results };
                                let _ = tx.send(msg(agent_message::Msg::ImagesPulled(done))).await;
                            });
                        }
                        Some(region_message::Msg::Registered(_)) | None => {}
                    }
                }
                _ = hb.tick() => {
                    seq += 1;
                    let usage = sampler.sample(&self.cfg.data_dir);
                    let now = Instant::now();
                    let pods = self.manager.usage().await.into_iter().map(|(uid, (cpu_ns, mem))| {
                        let millis = match last_cpu.get(&uid) {
                            Some((prev, t)) => {
                                let secs = now.duration_since(*t).as_secs_f64().max(0.001);
                                (cpu_ns.saturating_sub(*prev) as f64 / 1e6 / secs) as i64
                            }
                            None => 0,
                        };
                        last_cpu.insert(uid.clone(), (cpu_ns, now));
                        PodUsage { uid, cpu_millis: millis, memory_bytes: mem as i64 }
                    }).collect();
                    let beat = Heartbeat { seq, usage: Some(usage), pods };
                    tx.send(msg(agent_message::Msg::Heartbeat(beat))).await.map_err(|_| "stream closed")?;
                }
                _ = self.moved.notified() => {
                    return Err("the node moved to another region".into());
                }
                _ = outbox.notify.notified() => {
                    let updates = outbox.take_statuses();
                    for chunk in updates.chunks(100) {
                        let batch = PodStatusBatch { updates: chunk.to_vec() };
                        tx.send(msg(agent_message::Msg::PodStatus(batch))).await.map_err(|_| "stream closed")?;
                    }
                    for e in outbox.take_events() {
                        tx.send(msg(agent_message::Msg::Event(e))).await.map_err(|_| "stream closed")?;
                    }
                }
            }
        }
    }
}

/// Re-plans through the center with the node's certificate.
async fn replan(
    o: &Onboarding,
    reason: &str,
) -> Result<meridian_api::onboarding::Assignment, join::JoinError> {
    let (client, _) = o.dir.center_client()?;
    join::join(&client, None, &o.spec, &o.dir, Some(reason)).await
}

/// Renews the certificate before it expires (the stream stays up: TLS checks it
/// when connecting), and asks the center now and then whether to move.
async fn maintain_identity(o: Onboarding, moved: Arc<tokio::sync::Notify>) {
    let mut next_check = Instant::now() + o.center_interval;
    loop {
        let renew_in = join::next_renewal(&o.dir);
        let check_in = next_check.saturating_duration_since(Instant::now());
        tokio::time::sleep(renew_in.min(check_in)).await;
        if let Err(e) = join::renew_if_due(&o.dir, false).await {
            tracing::warn!("certificate renewal (will retry): {e}");
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        if Instant::now() < next_check {
            continue;
        }
        next_check = Instant::now() + o.center_interval;
        if o.dir.saved().is_none() {
            continue;
        }
        let status = match o.dir.center_client() {
            Ok((c, _)) => c.self_status().await,
            Err(e) => Err(e),
        };
        match status {
            Ok(s) if s.replan => {
                tracing::info!(reason = %s.reason, "the center asks this node to move");
                match replan(&o, "draining").await {
                    Ok(a) => {
                        tracing::info!(region = %a.region, "moved");
                        moved.notify_waiters();
                    }
                    Err(e) => tracing::warn!("re-plan: {e}"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("center check-in: {e}"),
        }
    }
}

fn msg(m: agent_message::Msg) -> AgentMessage {
    AgentMessage { msg: Some(m) }
}

/// One `kubectl exec` session: runs the command in the container, streams its
/// output back in order and ends with its exit code (or why it could not run).
/// Standard input arrives on `input`; the session's sender dropped (cancel) kills
/// the command.
async fn serve_exec(
    manager: Arc<PodManager>,
    start: ExecStart,
    mut input: mpsc::UnboundedReceiver<ExecInput>,
    tx: mpsc::Sender<AgentMessage>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let id = start.session_id;
    let out = |stream: u32, data: Vec<u8>| {
        msg(agent_message::Msg::ExecOutput(ExecOutput {
            session_id: id,
            stream,
            data,
            ..Default::default()
        }))
    };
    let end = |exit_code: i32, error: String| {
        msg(agent_message::Msg::ExecOutput(ExecOutput {
            session_id: id,
            exited: true,
            exit_code,
            error,
            ..Default::default()
        }))
    };
    let started = async {
        if start.port != 0 {
            return forward(&manager, &start).await;
        }
        let (handle, mut req) = manager.exec_target(&start.uid, &start.container).await?;
        if start.command.is_empty() {
            return Err("a command is required".to_owned());
        }
        req.argv = start.command.clone();
        req.stdin = start.stdin;
        req.tty = start.tty;
        manager
            .ctx
            .runtime
            .exec_stream(&handle, req)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    let p = match started {
        Ok(p) => p,
        Err(e) => {
            let _ = tx.send(end(126, e)).await;
            return;
        }
    };
    let runtime::ExecProcess {
        stdin,
        stdout,
        stderr,
        exit,
        resize,
    } = p;
    // Standard input is written by its own task, so a command that fills its
    // output pipe while we wait to write its input cannot stall the session.
    let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut stdin = stdin;
        loop {
            tokio::select! {
                i = input.recv() => match i {
                    Some(i) => {
                        if i.width > 0 && i.height > 0 && let Some(r) = &resize {
                            r(i.width.min(u16::MAX.into()) as u16, i.height.min(u16::MAX.into()) as u16);
                        }
                        if let Some(w) = stdin.as_mut()
                            && !i.data.is_empty()
                            && w.write_all(&i.data).await.is_err()
                        {
                            stdin = None;
                        }
                        if i.eof {
                            stdin = None; // closes the pipe: the command sees EOF
                        }
                    }
                    None => {
                        let _ = cancel_tx.send(());
                        return;
                    }
                },
                _ = &mut done_rx => return,
            }
        }
    });
    let stderr_stream = if start.tty { 1 } else { 2 };
    let pump = |mut r: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>, stream: u32| {
        let tx = tx.clone();
        async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send(out(stream, buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    };
    let run = async {
        let errs = async {
            if let Some(e) = stderr {
                pump(e, stderr_stream).await;
            }
        };
        tokio::join!(pump(stdout, 1), errs);
        exit.await
    };
    // A cancelled session drops `run`, and with it the command (killed on drop).
    let result = tokio::select! {
        r = run => r,
        _ = cancel_rx => return,
    };
    let _ = done_tx.send(());
    let _ = match result {
        Ok(code) => tx.send(end(code, String::new())).await,
        Err(e) => tx.send(end(126, e.to_string())).await,
    };
}

/// A desired pod as the manager takes it: uid, pod JSON and the references the
/// region resolved (those it could not are left out, keeping their last value).
fn desired_pod(p: meridian_proto::DesiredPod) -> (String, (Vec<u8>, refs::Refs)) {
    let refs = p
        .refs
        .into_iter()
        .filter(|r| !r.json.is_empty())
        .filter_map(|r| {
            let obj = serde_json::from_slice(&r.json).ok()?;
            Some(((r.kind, r.name), obj))
        })
        .collect();
    (p.uid, (p.pod_json, refs))
}

fn desired_list(
    set: &BTreeMap<String, (Vec<u8>, refs::Refs)>,
) -> Vec<(String, Vec<u8>, refs::Refs)> {
    set.iter()
        .map(|(uid, (json, refs))| (uid.clone(), json.clone(), refs.clone()))
        .collect()
}

/// `kubectl port-forward`: a TCP connection to the pod's port, as an exec session
/// whose input goes to the connection and whose output is what comes back. Pods
/// share the node's network (see ARCHITECTURE.md), so the port is on loopback; with
/// an isolating runtime (containerd) only ports the pod declares may be reached, so
/// a tenant cannot forward to other tenants' pods or the node's own services.
async fn forward(manager: &PodManager, start: &ExecStart) -> Result<runtime::ExecProcess, String> {
    let Some(declared) = manager.declared_ports(&start.uid).await else {
        return Err(format!("pod {} is not on this node", start.uid));
    };
    let port = u16::try_from(start.port).map_err(|_| format!("invalid port {}", start.port))?;
    if manager.ctx.runtime.name() != "process" && !declared.contains(&i32::from(port)) {
        return Err(format!(
            "port {port} is not a containerPort of the pod (declared: {declared:?}); pods share \
             the node's network, so only declared ports can be forwarded"
        ));
    }
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("failed to connect to port {port} of the pod: {e}"))?;
    let (read, write) = tcp.into_split();
    Ok(runtime::ExecProcess {
        stdin: Some(Box::pin(write)),
        stdout: Box::pin(read),
        stderr: None,
        exit: Box::pin(async { Ok(0) }),
        resize: None,
    })
}

async fn serve_log(ctx: Arc<Ctx>, r: LogRequest, tx: mpsc::Sender<AgentMessage>) {
    let id = r.request_id;
    let chunk = |data: Vec<u8>, eof: bool, error: String| {
        msg(agent_message::Msg::LogChunk(LogChunk {
            request_id: id,
            data,
            eof,
            error,
        }))
    };
    let target = (|| -> Result<(PathBuf, PathBuf), String> {
        let recs = ctx.state.containers(&r.uid).map_err(|e| e.to_string())?;
        if recs.is_empty() {
            return Err(format!("pod {} has no containers on this node yet", r.uid));
        }
        let (name, rec) = if r.container.is_empty() {
            if recs.len() > 1 {
                let names: Vec<&str> = recs.iter().map(|(n, _)| n.as_str()).collect();
                return Err(format!(
                    "a container name must be specified, choose one of: [{}]",
                    names.join(" ")
                ));
            }
            recs[0].clone()
        } else {
            recs.iter()
                .find(|(n, _)| *n == r.container)
                .cloned()
                .ok_or_else(|| format!("container {:?} is not valid for this pod", r.container))?
        };
        let attempt = if r.previous {
            if rec.restart_count == 0 || rec.attempt == 0 {
                return Err(format!("previous terminated container {name:?} not found"));
            }
            rec.attempt - 1
        } else {
            rec.attempt
        };
        Ok((
            ctx.log_path(&r.uid, &name, attempt),
            ctx.container_dir(&r.uid, &name).join(attempt.to_string()),
        ))
    })();
    let (path, dir) = match target {
        Ok(t) => t,
        Err(e) => {
            let _ = tx.send(chunk(Vec::new(), true, e)).await;
            return;
        }
    };
    let opts = logs::LogOptions {
        follow: r.follow && !r.previous,
        tail_lines: (r.tail_lines >= 0).then_some(r.tail_lines as usize),
        timestamps: r.timestamps,
        limit_bytes: (r.limit_bytes > 0).then_some(r.limit_bytes as usize),
    };
    let (ctx_tx, mut ctx_rx) = mpsc::channel::<Vec<u8>>(8);
    let exit_file = dir.join("exit");
    let reader = tokio::spawn(logs::stream(path, opts, move || exit_file.exists(), ctx_tx));
    while let Some(data) = ctx_rx.recv().await {
        if tx.send(chunk(data, false, String::new())).await.is_err() {
            reader.abort();
            return;
        }
    }
    let error = match reader.await {
        Ok(Ok(())) => String::new(),
        Ok(Err(e)) => e,
        Err(e) => e.to_string(),
    };
    let _ = tx.send(chunk(Vec::new(), true, error)).await;
}
