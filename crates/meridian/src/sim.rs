//! `meridian sim`: a whole fleet on this machine, measured (see `meridian-sim`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use meridian_sim::{Report, Scenario, SimConfig};

use crate::edge::parse_duration;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SimCli {
    #[command(subcommand)]
    command: Option<SimCommand>,
    #[command(flatten)]
    run: SimArgs,
}

#[derive(clap::Subcommand)]
enum SimCommand {
    /// Write docs/scale.md and docs/scale.svg from the JSON reports of several runs.
    Chart {
        /// Reports written by `meridian sim --report`.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// Directory to write scale.md and scale.svg into.
        #[arg(long, default_value = "docs")]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct SimArgs {
    /// Fraction of the full size (100,000 nodes, 1,000,000 pods); 0.01 is the CI smoke test.
    #[arg(long, default_value_t = 0.1)]
    scale: f64,
    /// Nodes (overrides --scale).
    #[arg(long)]
    nodes: Option<usize>,
    /// Pods created through Deployments (overrides --scale).
    #[arg(long)]
    pods: Option<usize>,
    #[arg(long, default_value_t = 5)]
    regions: usize,
    #[arg(long, default_value_t = 20)]
    tenants: usize,
    #[arg(long, default_value_t = 400)]
    namespaces: usize,
    /// Pods created at 10/s into the full cluster after density: the pod startup SLO.
    #[arg(long, default_value_t = 500)]
    latency_pods: usize,
    /// Scenarios after bring-up, in order.
    #[arg(long, value_delimiter = ',', default_value = "density,churn,loss")]
    scenarios: Vec<Scenario>,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// How long a hollow node takes to report a pod Running.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    start_delay: Duration,
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    churn: Duration,
    /// Operations per second per tenant during churn.
    #[arg(long, default_value_t = 20.0)]
    churn_rate: f64,
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    lease_timeout: Duration,
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    eviction_grace: Duration,
    /// Nodes per second per region whose pods may be marked for rescheduling.
    #[arg(long, default_value_t = 10.0)]
    eviction_rate: f64,
    /// How long evictions are watched after the grace.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    loss_window: Duration,
    /// Longest wait for any one step.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    step_timeout: Duration,
    /// Keep the processes' data and logs here (default: a temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "sim-report.json")]
    report: PathBuf,
}

pub async fn run(cli: SimCli) -> Result<()> {
    if let Some(SimCommand::Chart { reports, out }) = cli.command {
        let mut rs: Vec<Report> = Vec::new();
        for p in &reports {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            rs.push(
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a sim report", p.display()))?,
            );
        }
        let (md, svg) = meridian_sim::render_scale_doc(&rs);
        std::fs::create_dir_all(&out)?;
        std::fs::write(out.join("scale.md"), md)?;
        std::fs::write(out.join("scale.svg"), svg)?;
        println!(
            "wrote {} and {}",
            out.join("scale.md").display(),
            out.join("scale.svg").display()
        );
        return Ok(());
    }
    let a = cli.run;
    if !(a.scale > 0.0 && a.scale <= 10.0) {
        bail!("--scale must be within (0, 10], not {}", a.scale);
    }
    let mut cfg = SimConfig::at_scale(
        std::env::current_exe().context("finding the meridian binary")?,
        a.scale,
    );
    if let Some(n) = a.nodes {
        cfg.nodes = n;
    }
    if let Some(p) = a.pods {
        cfg.pods = p;
    }
    cfg.work_dir = a.work_dir;
    cfg.regions = a.regions;
    cfg.tenants = a.tenants;
    cfg.namespaces = a.namespaces;
    cfg.scenarios = a.scenarios;
    cfg.latency_pods = a.latency_pods;
    cfg.heartbeat = a.heartbeat;
    cfg.start_delay = a.start_delay;
    cfg.churn = a.churn;
    cfg.churn_rate = a.churn_rate;
    cfg.lease_timeout = a.lease_timeout;
    cfg.eviction_grace = a.eviction_grace;
    cfg.eviction_rate = a.eviction_rate;
    cfg.loss_window = a.loss_window;
    cfg.step_timeout = a.step_timeout;
    let report = meridian_sim::run(cfg).await?;
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&a.report, json).with_context(|| format!("writing {}", a.report.display()))?;
    print!("{}", report.summary());
    println!("report: {}", a.report.display());
    if !report.ok() {
        bail!("some checks failed (see the report)");
    }
    Ok(())
}
