//! Scale simulation on one machine: the real global plane (`meridian server`: API,
//! scheduler, controllers) and real region processes, with hollow nodes in this
//! process speaking the real region protocol (their pods report Running after a
//! delay). Four scenarios, measured the way Kubernetes SIG-Scalability defines its
//! SLIs, written as a JSON report:
//!
//! - `bringup`: N nodes join and stay Ready at their heartbeat;
//! - `density`: P pods through Deployments across the namespaces of many tenants;
//! - `churn`: steady creates, updates and deletes per tenant while 1% of the nodes
//!   flap;
//! - `loss`: one region's nodes all disappear (a partition: nothing may be
//!   evicted), then 20% of every region's nodes (evicted after the grace, at the
//!   configured rate, and replaced elsewhere).
//!
//! Correctness is checked (the report's `checks`; the CI smoke test runs a 1% scale);
//! timings are measured against the goals (the report's `goals`), never asserted.

mod chart;
mod fleet;
mod metrics;
mod observe;
mod plane;
mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use chart::render_scale_doc;
pub use plane::proc_usage;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("starting {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: {source}")]
    Http {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("{0}")]
    Invalid(String),
    #[error("report {what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T, E = SimError> = std::result::Result<T, E>;

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SimError {
    let what = what.into();
    move |source| SimError::Io { what, source }
}

pub(crate) fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> SimError {
    let what = what.into();
    move |source| SimError::Api { what, source }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Bringup,
    Density,
    Churn,
    Loss,
}

impl std::str::FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bringup" => Ok(Self::Bringup),
            "density" => Ok(Self::Density),
            "churn" => Ok(Self::Churn),
            "loss" => Ok(Self::Loss),
            _ => Err(format!(
                "unknown scenario {s:?} (bringup, density, churn, loss)"
            )),
        }
    }
}

/// What to simulate. `SimConfig::at_scale(1.0)` is the full size: 100,000
/// nodes and 1,000,000 pods.
#[derive(Clone, Debug, Serialize)]
pub struct SimConfig {
    /// The `meridian` binary to start the server and regions from.
    #[serde(skip)]
    pub meridian: PathBuf,
    /// Where the processes keep their data (a temporary directory if `None`).
    #[serde(skip)]
    pub work_dir: Option<PathBuf>,
    pub nodes: usize,
    pub pods: usize,
    pub regions: usize,
    pub tenants: usize,
    pub namespaces: usize,
    pub deployments_per_namespace: usize,
    /// Pods created at 10/s after density, for the pod startup SLO (0: none).
    pub latency_pods: usize,
    /// Scenarios run in this order after bring-up (which always runs).
    pub scenarios: Vec<Scenario>,
    pub heartbeat: Duration,
    /// How long a hollow node takes to report a pod Running.
    pub start_delay: Duration,
    /// Hollow nodes per HTTP/2 connection to their region.
    pub nodes_per_connection: usize,
    pub churn: Duration,
    /// Operations per second per tenant during churn.
    pub churn_rate: f64,
    /// Fraction of nodes flapping during churn.
    pub flap_fraction: f64,
    pub lease_timeout: Duration,
    pub eviction_grace: Duration,
    /// Nodes per second per region whose pods may be marked for rescheduling.
    pub eviction_rate: f64,
    /// Fraction of every region's nodes lost in the second half of `loss`.
    pub loss_fraction: f64,
    /// How long evictions are watched after the grace has passed.
    pub loss_window: Duration,
    /// Longest wait for any one step (all pods Running, all nodes Ready, ...).
    pub step_timeout: Duration,
}

impl SimConfig {
    /// The full size times `scale` (at least one node per region and a pod
    /// per namespace), with the timings of a real fleet.
    pub fn at_scale(meridian: PathBuf, scale: f64) -> Self {
        let regions = 5;
        let tenants = 20;
        let namespaces = 400;
        Self {
            meridian,
            work_dir: None,
            nodes: ((100_000.0 * scale) as usize).max(regions),
            pods: ((1_000_000.0 * scale) as usize).max(namespaces),
            regions,
            tenants,
            namespaces,
            deployments_per_namespace: 5,
            latency_pods: 500,
            scenarios: vec![Scenario::Density, Scenario::Churn, Scenario::Loss],
            heartbeat: Duration::from_secs(10),
            start_delay: Duration::from_secs(1),
            nodes_per_connection: 100,
            churn: Duration::from_secs(60),
            churn_rate: 20.0,
            flap_fraction: 0.01,
            lease_timeout: Duration::from_secs(40),
            eviction_grace: Duration::from_secs(60),
            eviction_rate: 10.0,
            loss_fraction: 0.2,
            loss_window: Duration::from_secs(60),
            step_timeout: Duration::from_secs(1800),
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(SimError::Invalid(m));
        if self.regions == 0 || self.regions > 16 {
            return bad(format!(
                "regions must be 1..=16 (the regions of world-cities.csv), not {}",
                self.regions
            ));
        }
        if self.nodes < self.regions {
            return bad(format!(
                "need at least one node per region ({} nodes, {} regions)",
                self.nodes, self.regions
            ));
        }
        if self.tenants == 0 || self.namespaces < self.tenants {
            return bad(format!(
                "need at least one namespace per tenant ({} namespaces, {} tenants)",
                self.namespaces, self.tenants
            ));
        }
        if self.deployments_per_namespace == 0 {
            return bad("deployments per namespace must be at least 1".into());
        }
        if self.lease_timeout <= self.heartbeat {
            return bad(format!(
                "the lease timeout ({:?}) must be longer than the heartbeat ({:?})",
                self.lease_timeout, self.heartbeat
            ));
        }
        // A flapping node stays away a little longer than the lease timeout; it must
        // come back before its grace runs out or flapping would evict.
        if self.eviction_grace <= self.lease_timeout + Duration::from_secs(10) {
            return bad(format!(
                "the eviction grace ({:?}) must exceed the lease timeout ({:?}) by more than 10s",
                self.eviction_grace, self.lease_timeout
            ));
        }
        if !(0.0..=0.5).contains(&self.loss_fraction) || !(0.0..=0.5).contains(&self.flap_fraction)
        {
            return bad(
                "loss and flap fractions must be within 0..=0.5 (below the partition threshold)"
                    .into(),
            );
        }
        if self.eviction_rate <= 0.0 || self.churn_rate < 0.0 {
            return bad("rates must be positive".into());
        }
        Ok(())
    }
}

/// Quantiles of a latency distribution, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Quantiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// API call latency from the server's histograms (SIG-Scalability: by verb and
/// scope; watches excluded).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiLatency {
    pub verb: String,
    pub scope: String,
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessUsage {
    pub name: String,
    /// Average cores used over the phase (or the run).
    pub cpu_cores: f64,
    pub cpu_seconds: f64,
    pub rss_peak_mib: f64,
    pub rss_end_mib: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub seconds: f64,
    pub pod_startup: Option<Quantiles>,
    /// Create -> bound: the scheduler's share of `pod_startup`.
    #[serde(default)]
    pub pod_scheduling: Option<Quantiles>,
    pub watch_lag: Option<Quantiles>,
    /// Relists of the simulator's own pod watch begun in the phase, seconds each
    /// took: pods that went Running during one are seen (and timed) late.
    #[serde(default)]
    pub observer_relists: Vec<f64>,
    pub api: Vec<ApiLatency>,
    pub processes: Vec<ProcessUsage>,
    /// Scenario-specific measurements.
    pub details: serde_json::Value,
}

/// A correctness check: must hold at any scale.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// A goal of the issue: measured, compared, never asserted.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Goal {
    pub name: String,
    pub goal: String,
    pub measured: String,
    pub met: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub date: String,
    pub machine: Machine,
    pub config: serde_json::Value,
    pub phases: Vec<Phase>,
    /// Whole run, per process.
    pub processes: Vec<ProcessUsage>,
    /// Highest sum of every process's resident memory at one sample.
    pub total_rss_peak_mib: f64,
    pub store_bytes: u64,
    pub checks: Vec<Check>,
    pub goals: Vec<Goal>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// A short text summary.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let c = &self.config;
        let _ = writeln!(
            s,
            "meridian sim: {} nodes in {} regions, {} pods, {} tenants, {} namespaces ({} cpus, {:.0} GiB)",
            c["nodes"],
            c["regions"],
            c["pods"],
            c["tenants"],
            c["namespaces"],
            self.machine.cpus,
            self.machine.memory_gib
        );
        for p in &self.phases {
            let _ = write!(s, "  {:<10} {:>7.1}s", p.name, p.seconds);
            if let Some(q) = &p.pod_startup {
                let _ = write!(
                    s,
                    "  pod startup p50/p90/p99 {:.0}/{:.0}/{:.0} ms ({} pods)",
                    q.p50_ms, q.p90_ms, q.p99_ms, q.count
                );
            }
            if let Some(q) = &p.pod_scheduling {
                let _ = write!(s, "  (scheduling p99 {:.0} ms)", q.p99_ms);
            }
            if let Some(q) = &p.watch_lag {
                let _ = write!(s, "  watch lag p99 {:.0} ms", q.p99_ms);
            }
            if !p.observer_relists.is_empty() {
                let _ = write!(s, "  {} relists of the pod watch", p.observer_relists.len());
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(
            s,
            "  memory: {:.0} MiB resident in total at peak; store {:.1} MiB",
            self.total_rss_peak_mib,
            self.store_bytes as f64 / 1048576.0
        );
        for p in &self.processes {
            let _ = writeln!(
                s,
                "    {:<14} {:>6.2} cores avg  {:>7.0} MiB peak",
                p.name, p.cpu_cores, p.rss_peak_mib
            );
        }
        let _ = writeln!(s, "goals:");
        for g in &self.goals {
            let _ = writeln!(
                s,
                "  [{}] {}: {} (goal {})",
                if g.met { "met" } else { "MISSED" },
                g.name,
                g.measured,
                g.goal
            );
        }
        let _ = writeln!(s, "checks:");
        for c in &self.checks {
            let _ = writeln!(
                s,
                "  [{}] {}: {}",
                if c.ok { "ok" } else { "FAILED" },
                c.name,
                c.detail
            );
        }
        s
    }
}

/// Runs the simulation and returns its report. Progress goes to stderr.
pub async fn run(cfg: SimConfig) -> Result<Report> {
    cfg.validate()?;
    // Interrupted: dropping the run stops the processes it started.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("installing a SIGTERM handler"))?;
    tokio::select! {
        r = scenarios::run(cfg) => r,
        _ = tokio::signal::ctrl_c() => Err(SimError::Invalid("interrupted".into())),
        _ = term.recv() => Err(SimError::Invalid("terminated".into())),
    }
}
