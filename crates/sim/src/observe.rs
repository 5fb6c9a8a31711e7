//! What the simulation sees through the API, as a user would: watches of every Node
//! and every Pod (decoded into small types, not full objects), and a probe object
//! whose changes time the watch delivery.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde::Deserialize;

use crate::{Quantiles, Result, SimError, api};

pub async fn client(url: &str, ca_pem: &str, token: &str) -> Result<kube::Client> {
    let yaml = meridian_apiserver::kubeconfig::render("sim", url, ca_pem, token, None);
    let kc = kube::config::Kubeconfig::from_yaml(&yaml)
        .map_err(|e| SimError::Invalid(format!("kubeconfig: {e}")))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| SimError::Invalid(format!("kubeconfig: {e}")))?;
    kube::Client::try_from(cfg).map_err(api("building a client"))
}

macro_rules! lite_resource {
    ($t:ident, $kind:literal, $plural:literal, $scope:ty) => {
        impl kube::Resource for $t {
            type DynamicType = ();
            type Scope = $scope;
            fn kind(_: &()) -> Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                "".into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                "v1".into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

#[derive(Clone, Debug, Deserialize)]
struct Cond {
    #[serde(rename = "type")]
    type_: String,
    status: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct NodeStatusLite {
    #[serde(default)]
    conditions: Vec<Cond>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct NodeLite {
    metadata: ObjectMeta,
    #[serde(default)]
    status: Option<NodeStatusLite>,
}
lite_resource!(NodeLite, "Node", "nodes", k8s_openapi::ClusterResourceScope);

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpecLite {
    #[serde(default)]
    node_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct PodStatusLite {
    #[serde(default)]
    phase: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PodLite {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<PodSpecLite>,
    #[serde(default)]
    status: Option<PodStatusLite>,
}
lite_resource!(PodLite, "Pod", "pods", k8s_openapi::NamespaceResourceScope);

pub const SIM_LABEL: &str = "meridian.io/sim";

#[derive(Default)]
struct PodRec {
    /// When the watch first showed it not yet running (startup latency starts).
    pending_since: Option<Instant>,
    /// The same instant, kept after Running (for the scheduling stage and the
    /// timeline).
    created: Option<Instant>,
    /// When the watch first showed it bound.
    bound_at: Option<Instant>,
    running: bool,
    bound: bool,
    lost: bool,
    /// Succeeded or Failed.
    terminal: bool,
    kind: u8, // 0 other, 1 density, 2 churn, 3 latency
}

/// A pod marked for rescheduling (NodeLost), as the watch showed it.
#[derive(Clone, Debug)]
pub struct Mark {
    pub at: Instant,
    pub node: String,
}

#[derive(Default)]
pub struct State {
    pub nodes: HashMap<String, bool>,
    pub ready: usize,
    pods: HashMap<String, PodRec>,
    /// Pods of each kind: (existing, bound, running).
    pub density: (usize, usize, usize),
    pub churn: (usize, usize, usize),
    pub latency: (usize, usize, usize),
    /// The most density pods that existed at once.
    pub density_peak: usize,
    pub marks: Vec<Mark>,
    /// Node of every pod (by uid) still existing, for the loss checks.
    pub pod_nodes: HashMap<String, String>,
    startup: Option<Histogram<u64>>,
    /// Create -> bound, the scheduler's share of startup.
    scheduling: Option<Histogram<u64>>,
    lag: Option<Histogram<u64>>,
    /// Latency pods as they went Running: (created, bound, running).
    pub timeline: Vec<(Instant, Option<Instant>, Instant)>,
    /// Relists of the pod watch: when each began and how long it took.
    pub relists: Vec<(Instant, Option<Duration>)>,
    /// Probes in a row whose change the watch showed within [`CALM_LAG`].
    pub calm_probes: usize,
    /// Pods seen bound to a node the watch of Nodes has never shown.
    pub bound_to_unknown: HashSet<String>,
}

/// A probe this quick counts towards a settled server.
pub const CALM_LAG: Duration = Duration::from_millis(500);

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

pub fn quantiles(h: &Histogram<u64>) -> Option<Quantiles> {
    if h.is_empty() {
        return None;
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Some(Quantiles {
        count: h.len(),
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: h.max() as f64 / 1000.0,
    })
}

impl State {
    fn counts(&mut self, kind: u8) -> Option<&mut (usize, usize, usize)> {
        match kind {
            1 => Some(&mut self.density),
            2 => Some(&mut self.churn),
            3 => Some(&mut self.latency),
            _ => None,
        }
    }

    fn pod(&mut self, p: PodLite, initial: bool) {
        let uid = p.metadata.uid.clone().unwrap_or_default();
        let kind = match p
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SIM_LABEL))
            .map(String::as_str)
        {
            Some("density") => 1,
            Some("churn") => 2,
            Some("latency") => 3,
            _ => 0,
        };
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty());
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        let running = phase == Some("Running");
        let lost = p.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("NodeLost");
        let now = Instant::now();
        let new = !self.pods.contains_key(&uid);
        let rec = self.pods.entry(uid.clone()).or_default();
        rec.kind = kind;
        let (was_bound, was_running, was_lost) = (rec.bound, rec.running, rec.lost);
        if new && !running && !initial && phase.is_none_or(|p| p == "Pending") {
            rec.pending_since = Some(now);
            rec.created = Some(now);
        }
        let mut scheduled = None;
        if node.is_some() && !was_bound && rec.bound_at.is_none() {
            rec.bound_at = Some(now);
            scheduled = rec.created.map(|t| now.duration_since(t));
        }
        let mut sample = None;
        if running
            && !was_running
            && let Some(t) = rec.pending_since.take()
        {
            sample = Some(now.duration_since(t));
            if kind == 3 {
                self.timeline.push((t, rec.bound_at, now));
            }
        }
        rec.running = running;
        rec.bound = node.is_some();
        rec.lost = lost;
        rec.terminal = matches!(phase, Some("Succeeded" | "Failed"));
        if let Some(n) = &node {
            if !self.nodes.contains_key(n) {
                self.bound_to_unknown.insert(n.clone());
            }
            self.pod_nodes.insert(uid.clone(), n.clone());
        }
        if lost && !was_lost {
            self.marks.push(Mark {
                at: now,
                node: node.clone().unwrap_or_default(),
            });
        }
        if let Some(d) = sample {
            let h = self.startup.get_or_insert_with(hist);
            let _ = h.record(d.as_micros().max(1) as u64);
        }
        if let Some(d) = scheduled {
            let h = self.scheduling.get_or_insert_with(hist);
            let _ = h.record(d.as_micros().max(1) as u64);
        }
        if let Some(c) = self.counts(kind) {
            if new {
                c.0 += 1;
            }
            let now_existing = c.0;
            if kind == 1 {
                self.density_peak = self.density_peak.max(now_existing);
            }
            let Some(c) = self.counts(kind) else { return };
            rec_delta(was_bound, node.is_some(), &mut c.1);
            rec_delta(was_running, running, &mut c.2);
        }
    }

    fn pod_gone(&mut self, p: PodLite) {
        let uid = p.metadata.uid.clone().unwrap_or_default();
        self.pod_nodes.remove(&uid);
        if let Some(rec) = self.pods.remove(&uid) {
            let (bound, running) = (rec.bound, rec.running);
            if let Some(c) = self.counts(rec.kind) {
                c.0 -= 1;
                if bound {
                    c.1 -= 1;
                }
                if running {
                    c.2 -= 1;
                }
            }
        }
    }

    fn node(&mut self, n: NodeLite) {
        let name = n.metadata.name.clone().unwrap_or_default();
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        let was = self.nodes.insert(name.clone(), ready);
        self.bound_to_unknown.remove(&name);
        match (was.unwrap_or(false), ready) {
            (false, true) => self.ready += 1,
            (true, false) => self.ready -= 1,
            _ => {}
        }
    }

    /// Startup latencies, their scheduling stage and watch lags recorded since
    /// the last call.
    pub fn take_samples(&mut self) -> Samples {
        Samples {
            startup: self.startup.take().and_then(|h| quantiles(&h)),
            scheduling: self.scheduling.take().and_then(|h| quantiles(&h)),
            lag: self.lag.take().and_then(|h| quantiles(&h)),
        }
    }

    /// Pods of a kind (1 density, 2 churn) not marked lost and not finished.
    pub fn active(&self, kind: u8) -> usize {
        self.pods
            .values()
            .filter(|r| r.kind == kind && !r.lost && !r.terminal)
            .count()
    }

    /// Pods on `node` (by the watch).
    pub fn pods_on(&self, nodes: &HashSet<&str>) -> usize {
        self.pod_nodes
            .values()
            .filter(|n| nodes.contains(n.as_str()))
            .count()
    }
}

/// What [`State::take_samples`] hands over.
pub struct Samples {
    pub startup: Option<Quantiles>,
    pub scheduling: Option<Quantiles>,
    pub lag: Option<Quantiles>,
}

/// Adjusts `count` when a pod's flag changed.
fn rec_delta(was: bool, is: bool, count: &mut usize) {
    match (was, is) {
        (false, true) => *count += 1,
        (true, false) => *count -= 1,
        _ => {}
    }
}

#[derive(Clone)]
pub struct Observer {
    state: Arc<Mutex<State>>,
    /// Ends the observer's thread (sent when the last clone is dropped).
    stop: Arc<Mutex<Option<tokio::sync::oneshot::Sender<()>>>>,
}

impl Drop for Observer {
    fn drop(&mut self) {
        if Arc::strong_count(&self.stop) == 1
            && let Some(stop) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take()
        {
            let _ = stop.send(());
        }
    }
}

impl Observer {
    /// Starts the watches on a thread and runtime of their own, with a client of
    /// their own: on the simulator's runtime, among 100,000 hollow nodes' tasks,
    /// the pod watch got a turn too seldom and fell minutes behind a million pods'
    /// events, so everything it measured came late.
    pub async fn start(url: &str, ca_pem: &str, token: &str) -> Result<Observer> {
        let state = Arc::new(Mutex::new(State::default()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<()>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (url, ca_pem, token) = (url.to_owned(), ca_pem.to_owned(), token.to_owned());
        let s = state.clone();
        meridian_apiserver::cache::on_own_thread("sim-observer", move || async move {
            let admin = match client(&url, &ca_pem, &token).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let tasks = Self::watch(&admin, s);
            let _ = ready_tx.send(Ok(()));
            let _ = stop_rx.await;
            for t in tasks {
                t.abort();
            }
        })
        .map_err(|source| SimError::Spawn {
            what: "the observer's thread".into(),
            source,
        })?;
        ready_rx
            .await
            .map_err(|_| SimError::Invalid("the observer's thread ended".into()))??;
        Ok(Observer {
            state,
            stop: Arc::new(Mutex::new(Some(stop_tx))),
        })
    }

    /// Spawns the node and pod watches and the probe on the current runtime.
    fn watch(admin: &kube::Client, state: Arc<Mutex<State>>) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        let nodes: Api<NodeLite> = Api::all(admin.clone());
        let s = state.clone();
        tasks.push(tokio::spawn(async move {
            let mut w = watcher(nodes, watcher::Config::default()).boxed();
            while let Some(ev) = w.next().await {
                let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
                match ev {
                    Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => st.node(n),
                    Ok(watcher::Event::Delete(n)) => {
                        let name = n.metadata.name.unwrap_or_default();
                        if st.nodes.remove(&name) == Some(true) {
                            st.ready -= 1;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!("node watch: {e}"),
                }
            }
        }));
        let pods: Api<PodLite> = Api::all(admin.clone());
        let s = state.clone();
        tasks.push(tokio::spawn(async move {
            let cfg = watcher::Config::default().page_size(5000);
            let mut w = watcher(pods, cfg).boxed();
            let mut last_error = None;
            while let Some(ev) = w.next().await {
                if let Err(e) = &ev {
                    last_error = Some(e.to_string());
                }
                let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
                match ev {
                    Ok(watcher::Event::Apply(p)) => st.pod(p, false),
                    Ok(watcher::Event::InitApply(p)) => st.pod(p, true),
                    Ok(watcher::Event::Delete(p)) => st.pod_gone(p),
                    // A relist shows pods that went Running meanwhile late: say so,
                    // as their startup samples include it.
                    Ok(watcher::Event::Init) => {
                        if !st.pods.is_empty() {
                            eprintln!(
                                "  (the simulator's pod watch relists after: {})",
                                last_error.take().unwrap_or_else(|| "no error".into())
                            );
                        }
                        st.relists.push((Instant::now(), None));
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some((at, took)) = st.relists.last_mut() {
                            *took = Some(at.elapsed());
                        }
                    }
                    Err(e) => tracing::debug!("pod watch: {e}"),
                }
            }
        }));
        tasks.push(tokio::spawn(probe(admin.clone(), state)));
        tasks
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `done` holds, printing `progress` every 5 s.
    pub async fn wait(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&State) -> bool,
        mut progress: impl FnMut(&State) -> String,
    ) -> Result<Duration> {
        let t0 = Instant::now();
        let mut last = Instant::now();
        loop {
            {
                let st = self.lock();
                if done(&st) {
                    return Ok(t0.elapsed());
                }
                if last.elapsed() >= Duration::from_secs(5) {
                    last = Instant::now();
                    eprintln!(
                        "  {what} {:>6.1}s: {}",
                        t0.elapsed().as_secs_f64(),
                        progress(&st)
                    );
                }
                if t0.elapsed() > timeout {
                    return Err(SimError::Timeout(format!("{what}: {}", progress(&st))));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Every second: patch a ConfigMap and time until its watch shows the change.
async fn probe(admin: kube::Client, state: Arc<Mutex<State>>) {
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(admin, "default");
    let cm = serde_json::json!({"metadata": {"name": "sim-probe"}, "data": {"seq": "0"}});
    if let Ok(obj) = serde_json::from_value(cm) {
        let _ = cms.create(&PostParams::default(), &obj).await;
    }
    let sent: Mutex<BTreeMap<u64, Instant>> = Default::default();
    let watch = async {
        let cfg = watcher::Config::default().fields("metadata.name=sim-probe");
        let mut w = watcher(cms.clone(), cfg).boxed();
        while let Some(ev) = w.next().await {
            let Ok(watcher::Event::Apply(cm)) = ev else {
                continue;
            };
            let Some(seq) = cm
                .data
                .as_ref()
                .and_then(|d| d.get("seq"))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let at = sent.lock().unwrap_or_else(|p| p.into_inner()).remove(&seq);
            if let Some(at) = at {
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                let lag = at.elapsed();
                s.calm_probes = if lag < CALM_LAG { s.calm_probes + 1 } else { 0 };
                let h = s.lag.get_or_insert_with(hist);
                let _ = h.record(lag.as_micros().max(1) as u64);
            }
        }
    };
    let patches = async {
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            seq += 1;
            {
                let mut s = sent.lock().unwrap_or_else(|p| p.into_inner());
                // Forget probes whose event never came (a relist skipped them).
                while s.len() > 100 {
                    s.pop_first();
                }
                s.insert(seq, Instant::now());
            }
            let patch = serde_json::json!({"data": {"seq": seq.to_string()}});
            if let Err(e) = cms
                .patch("sim-probe", &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                tracing::debug!("probe: {e}");
            }
        }
    };
    tokio::select! {
        _ = watch => {}
        _ = patches => {}
    }
}
