//! The pod manager: one worker task per pod (like the kubelet's pod workers) that
//! converges the pod's containers on its spec through the [`Runtime`], applies the
//! restart policy with back-off, runs probes, and publishes the pod's status.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus, Probe,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use meridian_proto::{PodEvent, PodStatusUpdate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, watch};

use crate::refs::Refs;
use crate::runtime::{
    ContainerHandle, ExecRequest, Exit, ImageRequest, Mount, PullPolicy, RunState, Runtime,
    RuntimeError, StartRequest,
};
use crate::state::{ContainerRecord, LocalState};

/// Condition type telling that the node does not enforce the pod's cpu/memory limits.
pub const LIMITS_CONDITION: &str = "meridian.io/LimitsEnforced";

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Clone, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    /// A container that ran this long starts again from `base`.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(10),
            cap: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

/// What pod workers produce for the region: the latest status of every pod and
/// events. The connection drains it; on reconnect it resends every status.
#[derive(Default)]
pub struct Outbox {
    dirty: Mutex<HashMap<String, PodStatusUpdate>>,
    latest: Mutex<HashMap<String, PodStatusUpdate>>,
    events: Mutex<Vec<PodEvent>>,
    pub notify: Notify,
}

impl Outbox {
    fn status(&self, u: PodStatusUpdate) {
        if let Ok(mut l) = self.latest.lock() {
            l.insert(u.uid.clone(), u.clone());
        }
        if let Ok(mut d) = self.dirty.lock() {
            d.insert(u.uid.clone(), u);
        }
        self.notify.notify_one();
    }

    fn forget(&self, uid: &str) {
        self.latest.lock().map(|mut l| l.remove(uid)).ok();
        self.dirty.lock().map(|mut d| d.remove(uid)).ok();
    }

    fn event(&self, e: PodEvent) {
        if let Ok(mut v) = self.events.lock()
            && v.len() < 1000
        {
            v.push(e);
        }
        self.notify.notify_one();
    }

    /// Status updates since the last call.
    pub fn take_statuses(&self) -> Vec<PodStatusUpdate> {
        self.dirty
            .lock()
            .map(|mut d| d.drain().map(|(_, v)| v).collect())
            .unwrap_or_default()
    }

    /// Every pod's latest status (for a fresh connection).
    pub fn all_statuses(&self) -> Vec<PodStatusUpdate> {
        self.dirty.lock().map(|mut d| d.clear()).ok();
        self.latest
            .lock()
            .map(|l| l.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn take_events(&self) -> Vec<PodEvent> {
        self.events
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

pub struct Ctx {
    pub runtime: Arc<dyn Runtime>,
    pub state: Arc<LocalState>,
    pub data_dir: PathBuf,
    pub node_name: String,
    pub node_ip: String,
    pub backoff: Backoff,
    pub outbox: Outbox,
}

impl Ctx {
    pub fn container_dir(&self, uid: &str, container: &str) -> PathBuf {
        self.data_dir.join("pods").join(uid).join(container)
    }

    pub fn log_path(&self, uid: &str, container: &str, attempt: u32) -> PathBuf {
        self.container_dir(uid, container)
            .join(format!("{attempt}.log"))
    }
}

#[derive(Clone)]
enum Cmd {
    Run(Arc<Pod>, Arc<Refs>),
    Stop,
}

struct Worker {
    tx: watch::Sender<Cmd>,
    task: tokio::task::JoinHandle<()>,
}

pub struct PodManager {
    pub ctx: Arc<Ctx>,
    workers: tokio::sync::Mutex<HashMap<String, Worker>>,
}

impl PodManager {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Self {
            ctx,
            workers: Default::default(),
        }
    }

    /// Starts workers for every pod in the local cache (agent start, online or not).
    pub async fn restore(&self) -> Result<usize, crate::state::StateError> {
        let pods = self.ctx.state.pods()?;
        let n = pods.len();
        let mut workers = self.workers.lock().await;
        for (uid, json) in pods {
            match serde_json::from_slice::<Pod>(&json) {
                Ok(pod) => {
                    let refs = self.ctx.state.refs(&uid).unwrap_or_default();
                    workers.insert(uid.clone(), spawn_worker(self.ctx.clone(), uid, pod, refs));
                }
                Err(e) => tracing::warn!(%uid, "dropping unreadable cached pod: {e}"),
            }
        }
        Ok(n)
    }

    /// Pods (uid) the agent currently runs.
    pub async fn running(&self) -> Vec<String> {
        self.workers.lock().await.keys().cloned().collect()
    }

    /// Replaces the desired set (uid, pod JSON, referenced objects): new pods
    /// start, missing ones stop, the rest carry on.
    pub async fn set_desired(&self, pods: Vec<(String, Vec<u8>, Refs)>) {
        let mut workers = self.workers.lock().await;
        workers.retain(|_, w| !w.task.is_finished());
        let mut keep = std::collections::HashSet::new();
        for (uid, json, refs) in pods {
            let pod: Pod = match serde_json::from_slice(&json) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(%uid, "ignoring undecodable desired pod: {e}");
                    continue;
                }
            };
            keep.insert(uid.clone());
            // What the region could not resolve this time keeps its last known value.
            let mut merged = self.ctx.state.refs(&uid).unwrap_or_default();
            let refs_changed = refs.iter().any(|(k, v)| merged.get(k) != Some(v));
            merged.extend(refs);
            if refs_changed && let Err(e) = self.ctx.state.put_refs(&uid, &merged) {
                tracing::error!(%uid, "cannot cache pod references: {e}");
            }
            match workers.get(&uid) {
                Some(w) => {
                    if let Cmd::Run(old, _) = &*w.tx.borrow()
                        && old.metadata == pod.metadata
                        && old.spec == pod.spec
                        && !refs_changed
                    {
                        continue;
                    }
                    if let Err(e) = self.ctx.state.put_pod(&uid, &json) {
                        tracing::error!(%uid, "cannot cache pod: {e}");
                    }
                    let _ = w.tx.send(Cmd::Run(Arc::new(pod), Arc::new(merged)));
                }
                None => {
                    if let Err(e) = self.ctx.state.put_pod(&uid, &json) {
                        tracing::error!(%uid, "cannot cache pod: {e}");
                    }
                    workers.insert(
                        uid.clone(),
                        spawn_worker(self.ctx.clone(), uid, pod, merged),
                    );
                }
            }
        }
        for (uid, w) in workers.iter() {
            if !keep.contains(uid) {
                let _ = w.tx.send(Cmd::Stop);
            }
        }
    }

    /// Cumulative cpu (ns) and memory of every running container, by pod uid.
    pub async fn usage(&self) -> HashMap<String, (u64, u64)> {
        let uids = self.running().await;
        let mut out = HashMap::new();
        for uid in uids {
            let Ok(recs) = self.ctx.state.containers(&uid) else {
                continue;
            };
            for (_, rec) in recs {
                if let Some(h) = &rec.handle
                    && rec.exit.is_none()
                    && let Some((cpu, mem)) = self.ctx.runtime.usage(h).await
                {
                    let e = out.entry(uid.clone()).or_insert((0, 0));
                    e.0 += cpu;
                    e.1 += mem;
                }
            }
        }
        out
    }

    /// The container ports pod `uid` declares, if this agent runs it.
    pub async fn declared_ports(&self, uid: &str) -> Option<Vec<i32>> {
        let workers = self.workers.lock().await;
        let w = workers.get(uid)?;
        let Cmd::Run(pod, _) = &*w.tx.borrow() else {
            return None;
        };
        Some(
            pod.spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .map(|p| p.container_port)
                .collect(),
        )
    }

    /// What `kubectl exec` needs to run a command in container `name` of pod `uid`
    /// (empty: the pod's only container): its handle and environment, or why not.
    pub async fn exec_target(
        &self,
        uid: &str,
        name: &str,
    ) -> Result<(ContainerHandle, ExecRequest), String> {
        let (pod, refs) = match self.workers.lock().await.get(uid) {
            Some(w) => match &*w.tx.borrow() {
                Cmd::Run(p, r) => (p.clone(), r.clone()),
                Cmd::Stop => return Err(format!("pod {uid} is stopping")),
            },
            None => return Err(format!("pod {uid} is not on this node")),
        };
        let containers: Vec<Container> = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        let c = if name.is_empty() {
            match containers.as_slice() {
                [one] => one.clone(),
                many => {
                    let names: Vec<&str> = many.iter().map(|c| c.name.as_str()).collect();
                    return Err(format!(
                        "a container name must be specified, choose one of: [{}]",
                        names.join(" ")
                    ));
                }
            }
        } else {
            containers
                .iter()
                .find(|c| c.name == name)
                .cloned()
                .ok_or_else(|| format!("container {name} is not valid for this pod"))?
        };
        let rec = self
            .ctx
            .state
            .containers(uid)
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|(n, _)| *n == c.name)
            .map(|(_, r)| r);
        let handle = match rec {
            Some(r) if r.exit.is_none() => r.handle,
            _ => None,
        }
        .ok_or_else(|| format!("container {} is not running", c.name))?;
        let view = PodWorker {
            ctx: self.ctx.clone(),
            uid: uid.to_owned(),
            pod,
            refs,
            records: HashMap::new(),
            live: HashMap::new(),
            started: Timestamp::now(),
            last_status: None,
            transitions: HashMap::new(),
        };
        let req = ExecRequest {
            env: view.env(&c),
            working_dir: c.working_dir.clone(),
            ..Default::default()
        };
        Ok((handle, req))
    }

    /// Stops everything (agent shutdown keeps pods running: this is for tests).
    pub async fn shutdown_workers(&self) {
        for (_, w) in self.workers.lock().await.drain() {
            w.task.abort();
        }
    }
}

fn spawn_worker(ctx: Arc<Ctx>, uid: String, pod: Pod, refs: Refs) -> Worker {
    let (tx, rx) = watch::channel(Cmd::Run(Arc::new(pod), Arc::new(refs)));
    let task = tokio::spawn(run_worker(ctx, uid, rx));
    Worker { tx, task }
}

/// Per-container state that is not worth persisting.
#[derive(Default)]
struct Live {
    waiting: Option<(String, String)>,
    /// Starts that could not begin (image pull or configuration lookup failed) in
    /// a row, and when to try again.
    start_failures: u32,
    pull_retry_at: Option<Instant>,
    ready: bool,
    liveness: ProbeState,
    readiness: ProbeState,
}

impl Live {
    /// Whether a failed pull or configuration lookup is still backing off (a
    /// failed pull then shows as `ImagePullBackOff`).
    fn backing_off(&mut self, c: &Container) -> bool {
        if self.pull_retry_at.is_none_or(|at| Instant::now() >= at) {
            return false;
        }
        if self
            .waiting
            .as_ref()
            .is_some_and(|(r, _)| r == "ErrImagePull")
        {
            self.waiting = Some((
                "ImagePullBackOff".into(),
                format!(
                    "Back-off pulling image {:?}",
                    c.image.clone().unwrap_or_default()
                ),
            ));
        }
        true
    }
}

#[derive(Default)]
struct ProbeState {
    next: Option<Instant>,
    successes: u32,
    failures: u32,
}

struct PodWorker {
    ctx: Arc<Ctx>,
    uid: String,
    pod: Arc<Pod>,
    refs: Arc<Refs>,
    records: HashMap<String, ContainerRecord>,
    live: HashMap<String, Live>,
    started: Timestamp,
    last_status: Option<Vec<u8>>,
    transitions: HashMap<String, (String, Timestamp)>,
}

async fn run_worker(ctx: Arc<Ctx>, uid: String, mut rx: watch::Receiver<Cmd>) {
    let Cmd::Run(pod, refs) = rx.borrow().clone() else {
        return;
    };
    let records: HashMap<String, ContainerRecord> = ctx
        .state
        .containers(&uid)
        .map(|v| v.into_iter().collect())
        .unwrap_or_default();
    let started = records
        .values()
        .filter_map(|r| r.handle.as_ref().map(|h| h.started_at))
        .min()
        .unwrap_or_else(Timestamp::now);
    let mut w = PodWorker {
        ctx,
        uid,
        pod,
        refs,
        records,
        live: HashMap::new(),
        started,
        last_status: None,
        transitions: HashMap::new(),
    };
    w.announce_image_use();
    loop {
        let cmd = rx.borrow_and_update().clone();
        match cmd {
            Cmd::Stop => {
                w.stop_all().await;
                return;
            }
            Cmd::Run(pod, refs) => {
                w.pod = pod;
                w.refs = refs;
                w.reconcile().await;
                w.publish();
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

fn restart_policy(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always")
}

fn should_restart(policy: &str, exit: &Exit) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit.exit_code != 0,
        _ => true,
    }
}

impl PodWorker {
    fn containers(&self) -> Vec<Container> {
        self.pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default()
    }

    fn namespace(&self) -> String {
        self.pod.metadata.namespace.clone().unwrap_or_default()
    }

    fn name(&self) -> String {
        self.pod.metadata.name.clone().unwrap_or_default()
    }

    fn event(&self, kind: &str, reason: &str, message: String) {
        self.ctx.outbox.event(PodEvent {
            uid: self.uid.clone(),
            namespace: self.namespace(),
            name: self.name(),
            r#type: kind.into(),
            reason: reason.into(),
            message,
        });
    }

    fn announce_image_use(&self) {
        if self.ctx.runtime.name() != "process" {
            return;
        }
        let marker = self
            .ctx
            .data_dir
            .join("pods")
            .join(&self.uid)
            .join(".image-notice");
        if marker.exists() {
            return;
        }
        let images: Vec<String> = self
            .containers()
            .iter()
            .filter_map(|c| c.image.clone())
            .collect();
        self.event(
            "Normal",
            "ImageNotUsed",
            format!(
                "the process runtime does not use images ({}): each container's command runs \
                 directly on the node",
                images.join(", ")
            ),
        );
        if let Some(p) = marker.parent() {
            let _ = std::fs::create_dir_all(p);
        }
        let _ = std::fs::write(marker, b"");
    }

    fn persist(&self, name: &str) {
        if let Some(rec) = self.records.get(name)
            && let Err(e) = self.ctx.state.put_container(&self.uid, name, rec)
        {
            tracing::error!(uid = %self.uid, container = name, "cannot persist container state: {e}");
        }
    }

    fn env(&self, c: &Container) -> Vec<(String, String)> {
        self.env_checked(c).0
    }

    /// The container's environment, and the first reference that could not be
    /// resolved (a missing ConfigMap, Secret or key: the container cannot start).
    fn env_checked(&self, c: &Container) -> (Vec<(String, String)>, Option<String>) {
        let meta = &self.pod.metadata;
        let mut problem = None;
        // Image runtimes take PATH and HOME from the image's config.
        let mut env: Vec<(String, String)> = if self.ctx.runtime.name() == "process" {
            vec![
                ("PATH".into(), DEFAULT_PATH.into()),
                ("HOME".into(), "/root".into()),
            ]
        } else {
            Vec::new()
        };
        env.push(("HOSTNAME".into(), self.name()));
        let mut set = |k: &str, v: String| {
            env.retain(|(x, _)| x != k);
            env.push((k.to_owned(), v));
        };
        match crate::refs::env_from(&self.refs, c) {
            Ok(vars) => {
                for (k, v) in vars {
                    set(&k, v);
                }
            }
            Err(e) => problem = Some(e),
        }
        for e in c.env.iter().flatten() {
            let from_ref = e
                .value_from
                .as_ref()
                .map(|f| crate::refs::env_value(&self.refs, f));
            let value = if let Some(v) = &e.value {
                expand(v, |k| lookup(&env_snapshot(&e.name, &c.env), k))
            } else if let Some(f) = e.value_from.as_ref().and_then(|f| f.field_ref.as_ref()) {
                match f.field_path.as_str() {
                    "metadata.name" => self.name(),
                    // Tenants see their own namespace name, not the physical `tenant.ns`.
                    "metadata.namespace" => {
                        let ns = self.namespace();
                        ns.split_once('.').map(|(_, n)| n.to_owned()).unwrap_or(ns)
                    }
                    "metadata.uid" => self.uid.clone(),
                    "spec.nodeName" => self.ctx.node_name.clone(),
                    "status.hostIP" | "status.podIP" => self.ctx.node_ip.clone(),
                    p => label_or_annotation(meta, p).unwrap_or_default(),
                }
            } else {
                match from_ref {
                    Some(Ok(Some(v))) => v,
                    // An optional reference that is missing: no variable at all.
                    Some(Ok(None)) => continue,
                    Some(Err(why)) => {
                        problem.get_or_insert(why);
                        continue;
                    }
                    None => String::new(),
                }
            };
            set(&e.name, value);
        }
        (env, problem)
    }

    fn start_request(&self, c: &Container, attempt: u32) -> Result<StartRequest, String> {
        let (env, problem) = self.env_checked(c);
        if let Some(p) = problem {
            return Err(p);
        }
        let lookup_env = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let expanded = |v: &Option<Vec<String>>| -> Vec<String> {
            v.iter().flatten().map(|a| expand(a, lookup_env)).collect()
        };
        let (command, args) = (expanded(&c.command), expanded(&c.args));
        let argv: Vec<String> = command.iter().chain(&args).cloned().collect();
        let image = c.image.clone().unwrap_or_default();
        let credentials = meridian_oci::Reference::parse(&image)
            .ok()
            .and_then(|r| crate::refs::pull_credentials(&self.refs, &self.pod, &r.registry));
        let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref());
        let milli = |k: &str| {
            limits
                .and_then(|l| l.get(k))
                .and_then(|q| meridian_api::quantity::parse_milli(&q.0).ok())
        };
        Ok(StartRequest {
            pod_uid: self.uid.clone(),
            container: c.name.clone(),
            attempt,
            argv,
            env: env.clone(),
            working_dir: c.working_dir.clone(),
            log_path: self.ctx.log_path(&self.uid, &c.name, attempt),
            state_dir: self
                .ctx
                .container_dir(&self.uid, &c.name)
                .join(attempt.to_string()),
            cpu_limit_millis: milli("cpu").map(|m| m as i64),
            memory_limit_bytes: milli("memory").map(|m| (m / 1000) as i64),
            image: ImageRequest {
                pod_name: self.name(),
                pod_namespace: self.namespace(),
                pull_policy: PullPolicy::resolve(c.image_pull_policy.as_deref(), &image),
                image,
                credentials,
                command,
                args,
            },
            mounts: self.mounts(c)?,
        })
    }

    fn volumes(&self) -> Vec<k8s_openapi::api::core::v1::Volume> {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default()
    }

    /// Host directories for the container's volume mounts: emptyDir volumes live
    /// in the pod's directory (gone with the pod), ConfigMap and Secret volumes
    /// are written there from the objects the region shipped (read-only mounts),
    /// hostPath volumes are the node's own paths. Other kinds are reported by
    /// [`PodWorker::unsupported_volumes`].
    fn mounts(&self, c: &Container) -> Result<Vec<Mount>, String> {
        let volumes = self.volumes();
        let mut out = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let Some(v) = volumes.iter().find(|v| v.name == m.name) else {
                continue;
            };
            let dir = self
                .ctx
                .data_dir
                .join("pods")
                .join(&self.uid)
                .join("volumes")
                .join(&v.name);
            let mut read_only = m.read_only.unwrap_or(false);
            let host_path = if v.empty_dir.is_some() {
                if let Err(e) = std::fs::create_dir_all(&dir) {
                    tracing::warn!(uid = %self.uid, volume = %v.name, "cannot create emptyDir: {e}");
                }
                dir
            } else if crate::refs::write_volume(&self.refs, v, &dir)? {
                read_only = true;
                dir
            } else if let Some(h) = &v.host_path {
                PathBuf::from(&h.path)
            } else {
                continue;
            };
            let host_path = match &m.sub_path {
                Some(sp) if !sp.is_empty() && !sp.split('/').any(|c| c == "..") => {
                    host_path.join(sp)
                }
                _ => host_path,
            };
            out.push(Mount {
                host_path,
                container_path: m.mount_path.clone(),
                read_only,
            });
        }
        Ok(out)
    }

    /// Volume mounts of `c` whose volume kind this node cannot provide.
    fn unsupported_volumes(&self, c: &Container) -> Vec<String> {
        let volumes = self.volumes();
        c.volume_mounts
            .iter()
            .flatten()
            .filter_map(|m| {
                let v = volumes.iter().find(|v| v.name == m.name)?;
                let supported = v.empty_dir.is_some()
                    || v.host_path.is_some()
                    || v.config_map.is_some()
                    || v.secret.is_some();
                (!supported).then(|| v.name.clone())
            })
            .collect()
    }

    async fn reconcile(&mut self) {
        let policy = restart_policy(&self.pod).to_owned();
        for c in self.containers() {
            let rec = self.records.entry(c.name.clone()).or_default().clone();
            let live = self.live.entry(c.name.clone()).or_default();
            match (&rec.handle, &rec.exit) {
                (None, _) => {
                    if live.backing_off(&c) {
                        continue;
                    }
                    if live.waiting.is_none() {
                        live.waiting = Some(("ContainerCreating".into(), String::new()));
                    }
                    self.start(&c, 0, rec).await;
                }
                (Some(h), None) => match self.ctx.runtime.inspect(h).await {
                    RunState::Running => self.probe(&c).await,
                    RunState::Exited(exit) => {
                        let ran = h.started_at.duration_until(exit.finished_at);
                        let mut rec = rec.clone();
                        if ran.as_secs() >= self.ctx.backoff.reset_after.as_secs() as i64 {
                            rec.backoff_secs = 0;
                        }
                        let (kind, reason) = if exit.exit_code == 0 {
                            ("Normal", "Completed")
                        } else {
                            ("Warning", "Exited")
                        };
                        self.event(
                            kind,
                            reason,
                            format!(
                                "container {} exited with code {}{}",
                                c.name,
                                exit.exit_code,
                                exit.reason
                                    .as_ref()
                                    .map(|r| format!(" ({r})"))
                                    .unwrap_or_default()
                            ),
                        );
                        rec.exit = Some(exit);
                        let live = self.live.entry(c.name.clone()).or_default();
                        live.ready = false;
                        self.records.insert(c.name.clone(), rec);
                        self.persist(&c.name);
                    }
                },
                (Some(_), Some(exit)) => {
                    if !should_restart(&policy, exit) {
                        continue;
                    }
                    // A restart that could not get its image or configuration.
                    if live.backing_off(&c) {
                        continue;
                    }
                    let delay = self.delay_ms(&rec);
                    let due = exit.finished_at + jiff::SignedDuration::from_millis(delay as i64);
                    if Timestamp::now() < due {
                        let pod_name = self.name();
                        let live = self.live.entry(c.name.clone()).or_default();
                        live.waiting = Some((
                            "CrashLoopBackOff".into(),
                            format!(
                                "back-off {}s restarting failed container={} pod={}",
                                delay.div_ceil(1000),
                                c.name,
                                pod_name
                            ),
                        ));
                        continue;
                    }
                    let mut next = rec.clone();
                    next.backoff_secs = delay; // milliseconds, despite the name
                    next.restart_count += 1;
                    next.last_exit = next.exit.take();
                    let attempt = rec.attempt + 1;
                    // Clean the previous-but-one attempt; the previous one serves --previous.
                    if attempt >= 2 {
                        let dir = self.ctx.container_dir(&self.uid, &c.name);
                        let _ = std::fs::remove_dir_all(dir.join((attempt - 2).to_string()));
                        let _ = std::fs::remove_file(self.ctx.log_path(
                            &self.uid,
                            &c.name,
                            attempt - 2,
                        ));
                    }
                    self.start(&c, attempt, next).await;
                }
            }
        }
    }

    /// The back-off before the next restart, in milliseconds.
    fn delay_ms(&self, rec: &ContainerRecord) -> u64 {
        let b = &self.ctx.backoff;
        if rec.backoff_secs == 0 {
            b.base.as_millis() as u64
        } else {
            (rec.backoff_secs * 2).min(b.cap.as_millis() as u64)
        }
    }

    async fn start(&mut self, c: &Container, attempt: u32, mut rec: ContainerRecord) {
        rec.attempt = attempt;
        let unsupported = self.unsupported_volumes(c);
        let result = if self.ctx.runtime.name() != "process" && !unsupported.is_empty() {
            Err(RuntimeError::Config(format!(
                "volume(s) {} cannot be mounted: this node provides emptyDir, hostPath, \
                 configMap and secret volumes",
                unsupported.join(", ")
            )))
        } else {
            match self.start_request(c, attempt) {
                Ok(req) => {
                    // Say when a pull is about to happen, and how long it took.
                    let pulling = req.image.pull_policy != PullPolicy::Never
                        && self.ctx.runtime.image_present(&req.image.image).await == Some(false);
                    let image = req.image.image.clone();
                    if pulling {
                        self.event("Normal", "Pulling", format!("Pulling image {image:?}"));
                        // The pull may take a while: say so in the pod's status now.
                        let live = self.live.entry(c.name.clone()).or_default();
                        live.waiting = Some((
                            "ContainerCreating".into(),
                            format!("pulling image {image:?}"),
                        ));
                        self.publish();
                    }
                    let t0 = Instant::now();
                    let r = self.ctx.runtime.start(req).await;
                    if pulling && !matches!(r, Err(RuntimeError::Image { .. })) {
                        self.event(
                            "Normal",
                            "Pulled",
                            format!(
                                "Pulled image {image:?} and started the container in {:.3}s",
                                t0.elapsed().as_secs_f64()
                            ),
                        );
                    }
                    r
                }
                Err(why) => Err(RuntimeError::Config(why)),
            }
        };
        let not_started = match &result {
            Err(RuntimeError::Image { reason, message }) => Some((*reason, message.clone())),
            Err(RuntimeError::Config(m)) => Some(("CreateContainerConfigError", m.clone())),
            _ => None,
        };
        if let Some((reason, message)) = &not_started {
            // Pull failures and missing configuration are not container restarts:
            // retry with back-off, stay Pending (as kubelet does).
            let base = self.ctx.backoff.base;
            let cap = self.ctx.backoff.cap;
            let live = self.live.entry(c.name.clone()).or_default();
            live.start_failures += 1;
            let delay = if *reason == "InvalidImageName" {
                cap
            } else {
                (base * 2u32.saturating_pow(live.start_failures.min(16) - 1)).min(cap)
            };
            live.pull_retry_at = Some(Instant::now() + delay);
            live.waiting = Some(((*reason).into(), message.clone()));
            self.event("Warning", "Failed", format!("Error: {reason}: {message}"));
            return;
        }
        match result {
            Ok(h) => {
                let what = if h.pid != 0 {
                    format!("pid {}", h.pid)
                } else {
                    format!("id {}", h.id)
                };
                self.event(
                    "Normal",
                    "Started",
                    format!("Started container {} ({what})", c.name),
                );
                rec.handle = Some(h);
                rec.exit = None;
                let live = self.live.entry(c.name.clone()).or_default();
                *live = Live::default();
                let now = Instant::now();
                let delay = |p: &Option<Probe>| {
                    p.as_ref()
                        .map(|p| now + Duration::from_secs(p.initial_delay_seconds.unwrap_or(0).max(0) as u64))
                };
                live.liveness.next = delay(&c.liveness_probe);
                live.readiness.next = delay(&c.readiness_probe);
                live.ready = c.readiness_probe.is_none();
            }
            Err(e) => {
                let reason = match e {
                    RuntimeError::Config(_) => "CreateContainerConfigError",
                    RuntimeError::Image { reason, .. } => reason,
                    _ => "RunContainerError",
                };
                self.event("Warning", "Failed", format!("Error: {e}"));
                // Count it as a failed attempt so the restart policy and back-off apply.
                rec.handle
                    .get_or_insert_with(|| crate::runtime::ContainerHandle {
                        id: String::new(),
                        pid: 0,
                        start_ticks: 0,
                        state_dir: PathBuf::new(),
                        started_at: Timestamp::now(),
                    });
                rec.exit = Some(Exit {
                    exit_code: 128,
                    signal: None,
                    finished_at: Timestamp::now(),
                    reason: Some(reason.into()),
                    message: Some(e.to_string()),
                });
                let live = self.live.entry(c.name.clone()).or_default();
                live.waiting = Some((reason.into(), e.to_string()));
            }
        }
        self.records.insert(c.name.clone(), rec);
        self.persist(&c.name);
    }

    async fn probe(&mut self, c: &Container) {
        let Some(h) = self.records.get(&c.name).and_then(|r| r.handle.clone()) else {
            return;
        };
        let env = self.env(c);
        let now = Instant::now();
        for (kind, probe) in [
            ("Liveness", &c.liveness_probe),
            ("Readiness", &c.readiness_probe),
        ] {
            let Some(probe) = probe else { continue };
            let live = self.live.entry(c.name.clone()).or_default();
            let st = if kind == "Liveness" {
                &mut live.liveness
            } else {
                &mut live.readiness
            };
            if st.next.is_some_and(|n| now < n) {
                continue;
            }
            st.next =
                Some(now + Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64));
            let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
            let result = run_probe(&*self.ctx.runtime, &h, probe, c, &env, timeout).await;
            let live = self.live.entry(c.name.clone()).or_default();
            let st = if kind == "Liveness" {
                &mut live.liveness
            } else {
                &mut live.readiness
            };
            match result {
                Ok(()) => {
                    st.successes += 1;
                    st.failures = 0;
                }
                Err(why) => {
                    st.failures += 1;
                    st.successes = 0;
                    self.event(
                        "Warning",
                        "Unhealthy",
                        format!("{kind} probe failed: {why}"),
                    );
                }
            }
            let live = self.live.entry(c.name.clone()).or_default();
            let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1) as u32;
            let success_threshold = probe.success_threshold.unwrap_or(1).max(1) as u32;
            if kind == "Readiness" {
                if live.readiness.successes >= success_threshold {
                    live.ready = true;
                } else if live.readiness.failures >= failure_threshold {
                    live.ready = false;
                }
            } else if live.liveness.failures >= failure_threshold {
                live.liveness = ProbeState::default();
                self.event(
                    "Normal",
                    "Killing",
                    format!(
                        "Container {} failed liveness probe, will be restarted",
                        c.name
                    ),
                );
                self.ctx.runtime.stop(&h, grace(&self.pod)).await;
            }
        }
    }

    async fn stop_all(&mut self) {
        let grace = grace(&self.pod);
        let stops = self.records.iter().filter_map(|(name, r)| {
            let h = r.handle.clone()?;
            if r.exit.is_some() {
                return None;
            }
            let rt = self.ctx.runtime.clone();
            let name = name.clone();
            Some(async move {
                rt.stop(&h, grace).await;
                name
            })
        });
        let stopped = futures::future::join_all(stops).await;
        for name in stopped {
            tracing::info!(uid = %self.uid, container = %name, "stopped");
        }
        self.ctx.runtime.remove_pod(&self.uid).await;
        if let Err(e) = self.ctx.state.remove_pod(&self.uid) {
            tracing::error!(uid = %self.uid, "cannot forget pod: {e}");
        }
        self.ctx.outbox.forget(&self.uid);
        let _ = std::fs::remove_dir_all(self.ctx.data_dir.join("pods").join(&self.uid));
    }

    fn transition(&mut self, kind: &str, value: &str) -> Time {
        let e = self
            .transitions
            .entry(kind.to_owned())
            .or_insert_with(|| (value.to_owned(), Timestamp::now()));
        if e.0 != value {
            *e = (value.to_owned(), Timestamp::now());
        }
        Time(e.1)
    }

    fn build_status(&mut self) -> PodStatus {
        let policy = restart_policy(&self.pod).to_owned();
        let mut statuses = Vec::new();
        let (mut all_ready, mut any_started, mut all_done, mut any_failed) =
            (true, false, true, false);
        for c in self.containers() {
            let rec = self.records.get(&c.name).cloned().unwrap_or_default();
            let live = self.live.get(&c.name);
            let terminated = |e: &Exit, started: Option<Timestamp>| ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: e.exit_code,
                    signal: e.signal,
                    reason: e.reason.clone(),
                    message: e.message.clone(),
                    started_at: started.map(Time),
                    finished_at: Some(Time(e.finished_at)),
                    container_id: None,
                }),
                ..Default::default()
            };
            let started_at = rec.handle.as_ref().map(|h| h.started_at);
            let (state, running) = match (&rec.handle, &rec.exit) {
                (Some(h), None) => (
                    ContainerState {
                        running: Some(ContainerStateRunning {
                            started_at: Some(Time(h.started_at)),
                        }),
                        ..Default::default()
                    },
                    true,
                ),
                (Some(_), Some(e)) if !should_restart(&policy, e) => {
                    if e.exit_code != 0 {
                        any_failed = true;
                    }
                    (terminated(e, started_at), false)
                }
                _ => {
                    let (reason, message) = live
                        .and_then(|l| l.waiting.clone())
                        .unwrap_or_else(|| ("ContainerCreating".into(), String::new()));
                    (
                        ContainerState {
                            waiting: Some(ContainerStateWaiting {
                                reason: Some(reason),
                                message: (!message.is_empty()).then_some(message),
                            }),
                            ..Default::default()
                        },
                        false,
                    )
                }
            };
            let restarting = rec
                .exit
                .as_ref()
                .is_some_and(|e| should_restart(&policy, e));
            if running || restarting || rec.handle.is_none() {
                all_done = false;
            }
            any_started |=
                rec.handle.is_some() && !rec.handle.as_ref().is_some_and(|h| h.id.is_empty());
            let ready = running && live.is_some_and(|l| l.ready);
            all_ready &= ready;
            let last = match (&rec.exit, &rec.last_exit) {
                (Some(e), _) if restarting => Some(terminated(e, started_at)),
                (_, Some(e)) => Some(terminated(e, None)),
                _ => None,
            };
            statuses.push(ContainerStatus {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                image_id: String::new(),
                container_id: rec
                    .handle
                    .as_ref()
                    .and_then(|h| self.ctx.runtime.container_id(h)),
                ready,
                started: Some(running),
                restart_count: rec.restart_count as i32,
                state: Some(state),
                last_state: last,
                ..Default::default()
            });
        }
        let phase = if all_done && !statuses.is_empty() {
            if any_failed { "Failed" } else { "Succeeded" }
        } else if any_started {
            "Running"
        } else {
            "Pending"
        };
        let ready = if all_ready && phase == "Running" {
            "True"
        } else {
            "False"
        };
        let mut conditions = Vec::new();
        for (kind, value) in [
            ("PodScheduled", "True"),
            ("Initialized", "True"),
            ("ContainersReady", ready),
            ("Ready", ready),
        ] {
            let t = self.transition(kind, value);
            conditions.push(PodCondition {
                type_: kind.into(),
                status: value.into(),
                last_transition_time: Some(t),
                ..Default::default()
            });
        }
        let has_limits = self.containers().iter().any(|c| {
            c.resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .is_some_and(|l| !l.is_empty())
        });
        if has_limits && let Some(why) = self.ctx.runtime.limits_not_enforced() {
            let t = self.transition(LIMITS_CONDITION, "False");
            conditions.push(PodCondition {
                type_: LIMITS_CONDITION.into(),
                status: "False".into(),
                reason: Some("NotEnforced".into()),
                message: Some(format!(
                    "cpu/memory limits are not enforced on this node: {why}"
                )),
                last_transition_time: Some(t),
                ..Default::default()
            });
        }
        let ip = self.ctx.node_ip.clone();
        PodStatus {
            phase: Some(phase.into()),
            conditions: Some(conditions),
            container_statuses: Some(statuses),
            host_ip: Some(ip.clone()),
            host_ips: Some(vec![HostIP { ip: ip.clone() }]),
            pod_ip: Some(ip.clone()),
            pod_ips: Some(vec![PodIP { ip }]),
            start_time: Some(Time(self.started)),
            ..Default::default()
        }
    }

    fn publish(&mut self) {
        let status = self.build_status();
        let Ok(json) = serde_json::to_vec(&status) else {
            return;
        };
        if self.last_status.as_ref() == Some(&json) {
            return;
        }
        self.last_status = Some(json.clone());
        self.ctx.outbox.status(PodStatusUpdate {
            uid: self.uid.clone(),
            namespace: self.namespace(),
            name: self.name(),
            status_json: json,
        });
    }
}

fn grace(pod: &Pod) -> Duration {
    let s = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30)
        .max(0);
    Duration::from_secs(s as u64)
}

fn env_snapshot<'a>(
    upto: &str,
    env: &'a Option<Vec<k8s_openapi::api::core::v1::EnvVar>>,
) -> Vec<&'a k8s_openapi::api::core::v1::EnvVar> {
    env.iter()
        .flatten()
        .take_while(|e| e.name != upto)
        .collect()
}

fn lookup(prior: &[&k8s_openapi::api::core::v1::EnvVar], key: &str) -> Option<String> {
    prior
        .iter()
        .rev()
        .find(|e| e.name == key)
        .and_then(|e| e.value.clone())
}

fn label_or_annotation(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    path: &str,
) -> Option<String> {
    let key = |p: &str| {
        path.strip_prefix(p)
            .and_then(|r| r.strip_prefix("['"))
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_owned)
    };
    if let Some(k) = key("metadata.labels") {
        return meta.labels.as_ref()?.get(&k).cloned();
    }
    if let Some(k) = key("metadata.annotations") {
        return meta.annotations.as_ref()?.get(&k).cloned();
    }
    None
}

/// Kubernetes `$(VAR)` expansion: known variables are replaced, `$$` escapes,
/// unknown references stay as written.
pub fn expand(s: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match lookup(name) {
                Some(v) => out.push_str(&v),
                None => out.push_str(&rest[i..i + 2 + end + 1]),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn port_of(p: &IntOrString, c: &Container) -> Result<u16, String> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("bad port {n}")),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .ok_or_else(|| format!("no container port named {name:?}")),
    }
}

async fn run_probe(
    rt: &dyn Runtime,
    h: &crate::runtime::ContainerHandle,
    probe: &Probe,
    c: &Container,
    env: &[(String, String)],
    timeout: Duration,
) -> Result<(), String> {
    if let Some(e) = &probe.exec {
        let argv = e.command.clone().unwrap_or_default();
        return match rt.exec(h, &argv, env, timeout).await {
            Ok(0) => Ok(()),
            Ok(code) => Err(format!("command exited with {code}")),
            Err(e) => Err(e.to_string()),
        };
    }
    if let Some(t) = &probe.tcp_socket {
        let port = port_of(&t.port, c)?;
        let host = t.host.clone().unwrap_or_else(|| "127.0.0.1".into());
        return match tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial tcp {host}:{port}: {e}")),
            Err(_) => Err(format!("dial tcp {host}:{port}: timeout")),
        };
    }
    if let Some(g) = &probe.http_get {
        let port = port_of(&g.port, c)?;
        let host = g.host.clone().unwrap_or_else(|| "127.0.0.1".into());
        let path = g.path.clone().unwrap_or_else(|| "/".into());
        let fut = async {
            let mut s = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| format!("Get http://{host}:{port}{path}: {e}"))?;
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: meridian-probe\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 64];
            let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
            let line = String::from_utf8_lossy(&buf[..n]);
            let code: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("malformed HTTP response {line:?}"))?;
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {code}"))
            }
        };
        return match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!("Get http://{host}:{port}{path}: timeout")),
        };
    }
    // gRPC probes are not supported by this runtime yet: count as success.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn expands_known_variables_and_keeps_unknown_and_escaped() {
        let f = |k: &str| (k == "A").then(|| "x".to_owned());
        assert_eq!(
            expand("a=$(A) b=$(B) c=$$(A) d=$", f),
            "a=x b=$(B) c=$(A) d=$"
        );
    }
}
