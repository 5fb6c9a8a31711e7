//! `meridian region`, `meridian agent`, and the small edge world `meridian up` starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use meridian_agent::hollow::{HollowConfig, HollowStats, run_node};
use meridian_agent::runtime::Runtime;
use meridian_agent::runtime::containerd::Mirrors;
use meridian_agent::{Agent, AgentConfig};
use meridian_api::meridian::{
    BANDWIDTH_PRICE_KEY, CITY_KEY, COUNTRY_KEY, ISP_KEY, MACHINE_KEY, SOURCE_KEY, ZONE_KEY,
};
use meridian_apiserver::Server;
use meridian_apiserver::auth::SystemRole;
use meridian_region::{Region, RegionConfig};

pub use meridian_api::duration::parse as parse_duration;

pub use meridian_api::geo::parse_coordinates;

fn check_taint(s: &str) -> Result<String, String> {
    meridian_api::validation::parse_taint(s).map(|_| s.to_owned())
}

/// Parses `k=v,k2=v2`.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("label {pair:?} is not key=value"))?;
        out.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(out)
}

/// How a platform component reaches the global API.
#[derive(clap::Args)]
pub struct GlobalArgs {
    /// URL of the global API server.
    #[arg(long)]
    global: Option<String>,
    /// File with the component's bearer token for the global API (the server writes
    /// `system-region.token` in its data dir).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) of the global API (the server's `pki/ca.crt`).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Alternatively, a kubeconfig for the global API.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct RegionArgs {
    /// Region name (a DNS label), e.g. eu-west.
    #[arg(long)]
    name: String,
    #[command(flatten)]
    global: GlobalArgs,
    /// Address for the agent hub and the region's HTTP API.
    #[arg(long, default_value = "127.0.0.1:7100")]
    listen: SocketAddr,
    /// URL agents and the global API use to reach this region (default
    /// http(s)://LISTEN).
    #[arg(long)]
    advertise: Option<String>,
    /// Serve TLS with this certificate (PEM) and require node certificates from
    /// `--client-ca` on agent streams (`meridian center serving-cert` writes all three).
    #[arg(long, requires_all = ["tls_key", "client_ca"])]
    tls_cert: Option<PathBuf>,
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// CA of node certificates (the center's `pki/ca.crt`).
    #[arg(long)]
    client_ca: Option<PathBuf>,
    #[arg(long, default_value = ".meridian-region")]
    data_dir: PathBuf,
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    lease_timeout: Duration,
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    eviction_grace: Duration,
    /// Nodes per second whose pods may be marked for rescheduling.
    #[arg(long, default_value_t = 0.1)]
    eviction_rate: f64,
    #[arg(long, default_value_t = 0.55)]
    partition_threshold: f64,
    /// How often each node's status is written to the global API when nothing
    /// changed (Kubernetes' node status report frequency is also 5 minutes).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    summary_interval: Duration,
    /// Labels of the EdgeCluster object, k=v,...
    #[arg(long, default_value = "", value_parser = parse_labels)]
    labels: BTreeMap<String, String>,
    /// Upstream registries (host:port) the image cache reaches over plain HTTP.
    #[arg(long, value_delimiter = ',')]
    insecure_registry: Vec<String>,
    /// Size limit of the image cache in GiB (least recently used blobs are
    /// evicted; imported images never are). 0: unbounded.
    #[arg(long, default_value_t = 50.0)]
    image_cache_gib: f64,
    /// How long the image cache trusts a tag's digest before checking upstream
    /// again (a HEAD request; the manifest is fetched only if it changed).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    image_tag_ttl: Duration,
    /// OCI image archives to load into the image cache at start (for regions
    /// without registry access; `meridian image busybox` writes one).
    #[arg(long, value_delimiter = ',')]
    import_images: Vec<PathBuf>,
}

pub async fn global_config(args: &GlobalArgs) -> Result<(kube::Config, String)> {
    let kc = if let Some(path) = &args.kubeconfig {
        kube::config::Kubeconfig::read_from(path)
            .with_context(|| format!("reading {}", path.display()))?
    } else {
        let (Some(url), Some(tf), Some(ca)) = (&args.global, &args.token_file, &args.ca_file)
        else {
            bail!("give --kubeconfig, or --global with --token-file and --ca-file");
        };
        let token =
            std::fs::read_to_string(tf).with_context(|| format!("reading {}", tf.display()))?;
        let ca =
            std::fs::read_to_string(ca).with_context(|| format!("reading {}", ca.display()))?;
        let yaml = meridian_apiserver::kubeconfig::render("region", url, &ca, token.trim(), None);
        kube::config::Kubeconfig::from_yaml(&yaml)?
    };
    let token = kubeconfig_token(&kc).unwrap_or_default();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok((config, token))
}

/// The bearer token of a kubeconfig's first user.
pub fn kubeconfig_token(kc: &kube::config::Kubeconfig) -> Option<String> {
    kc.auth_infos
        .first()
        .and_then(|a| a.auth_info.as_ref())
        .and_then(|a| a.token.as_ref())
        .map(|t| {
            use secrecy::ExposeSecret;
            t.expose_secret().to_owned()
        })
}

pub async fn run_region(args: RegionArgs) -> Result<()> {
    let (global, token) = global_config(&args.global).await?;
    let mut cfg = RegionConfig::new(
        args.name.clone(),
        args.listen,
        args.data_dir.clone(),
        global,
    );
    cfg.advertise = args.advertise.clone();
    cfg.proxy_token = token;
    cfg.lease_timeout = args.lease_timeout;
    cfg.eviction_grace = args.eviction_grace;
    cfg.eviction_rate = args.eviction_rate;
    cfg.partition_threshold = args.partition_threshold;
    cfg.summary_interval = args.summary_interval;
    cfg.labels = args.labels.clone();
    cfg.insecure_registries = args.insecure_registry.clone();
    if let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.client_ca) {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        cfg.tls = Some(meridian_region::RegionTls {
            serving: meridian_pki::CertPair {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
            },
            client_ca: read(ca)?,
        });
    }
    if args.image_cache_gib.is_nan() || args.image_cache_gib < 0.0 {
        bail!("--image-cache-gib must be 0 (unbounded) or more");
    }
    cfg.image_cache_max_bytes =
        (args.image_cache_gib > 0.0).then_some((args.image_cache_gib * (1u64 << 30) as f64) as u64);
    let region = Region::start(cfg)
        .await
        .with_context(|| format!("starting region {}", args.name))?;
    for path in args
        .import_images
        .iter()
        .filter(|p| !p.as_os_str().is_empty())
    {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let names = region
            .shared
            .images
            .import_archive(&bytes)
            .with_context(|| format!("importing {}", path.display()))?;
        println!("imported {} from {}", names.join(", "), path.display());
    }
    println!("region {} serving agents on {}", args.name, region.addr);
    crate::wait_for_signal().await;
    region.shutdown();
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RuntimeKind {
    /// Containers run as supervised host processes (the image is not used).
    Process,
    /// Containers from OCI images through containerd's CRI API (`--containerd-socket`).
    Containerd,
    /// Runs nothing; for hollow nodes in scale tests.
    Fake,
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct AgentCli {
    #[command(subcommand)]
    command: Option<AgentCommand>,
    #[command(flatten)]
    args: AgentArgs,
}

#[derive(clap::Subcommand)]
enum AgentCommand {
    /// Join through the center (token, probes, certificate), then run as the
    /// node it assigned. Once joined, `meridian agent --data-dir D --node-name N`
    /// (or this same command) runs on the saved identity.
    Join(crate::onboard::JoinArgs),
}

pub async fn run_agent_cli(cli: AgentCli) -> Result<()> {
    match cli.command {
        Some(AgentCommand::Join(args)) => crate::onboard::join_and_run(args).await,
        None => run_agent_with(cli.args, None).await,
    }
}

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Region agent-hub address(es), comma separated; the agent fails over between
    /// them. Not needed once the node joined through the center.
    #[arg(long, value_delimiter = ',')]
    region: Vec<String>,
    /// The node's name (a DNS-1123 subdomain).
    #[arg(long, default_value = "")]
    pub node_name: String,
    /// Node labels, k=v,... (e.g. topology.meridian.io/city=Paris).
    #[arg(long, default_value = "", value_parser = parse_labels)]
    pub labels: BTreeMap<String, String>,
    /// Node taints, key=value:Effect,... (applied when the Node is created).
    #[arg(long, value_delimiter = ',', value_parser = check_taint)]
    taints: Vec<String>,
    #[arg(long, value_enum, default_value = "process")]
    runtime: RuntimeKind,
    /// containerd's socket (for `--runtime containerd`).
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd_socket: PathBuf,
    /// Where containerd reads registry host configuration (its CRI registry
    /// `config_path`); the agent writes mirror entries for its region there.
    #[arg(long, default_value = "/etc/containerd/certs.d")]
    containerd_hosts_dir: PathBuf,
    /// Pull images directly from their registries instead of through the region.
    #[arg(long)]
    no_image_mirror: bool,
    /// Image filesystem usage (percent) above which unused images are removed...
    #[arg(long, default_value_t = 85.0)]
    image_gc_high: f64,
    /// ...down to this usage (percent).
    #[arg(long, default_value_t = 80.0)]
    image_gc_low: f64,
    #[arg(long, default_value = ".meridian-agent")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// The node's address (pods of the process runtime share it).
    #[arg(long, default_value = "127.0.0.1")]
    node_ip: String,
    #[arg(long, default_value_t = 110)]
    max_pods: i64,
    /// Declared location, LAT,LON in degrees (e.g. 48.8534,2.3488).
    #[arg(long, value_parser = parse_coordinates)]
    pub coordinates: Option<(f64, f64)>,
    /// (Joined nodes) re-plan through the center after the region has been
    /// unreachable this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    replan_after: Duration,
    /// (Joined nodes) how often to ask the center whether to move.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    center_interval: Duration,
    /// Longest wait between reconnect attempts (jittered exponential back-off).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    reconnect_max: Duration,
    /// First restart back-off of a crashing container (doubles up to 5 minutes).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    restart_backoff: Duration,
}

fn with_scheme(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

async fn make_runtime(
    kind: RuntimeKind,
    containerd_socket: &Path,
    mirrors: Option<Mirrors>,
) -> Result<Arc<dyn Runtime>> {
    Ok(match kind {
        RuntimeKind::Process => Arc::new(meridian_agent::runtime::process::ProcessRuntime::new(
            std::env::current_exe().context("locating the meridian binary for the shim")?,
        )),
        RuntimeKind::Containerd => {
            let rt = meridian_agent::runtime::containerd::ContainerdRuntime::new(containerd_socket);
            let version = rt.check().await.with_context(|| {
                "--runtime containerd needs a running containerd with its CRI plugin \
                 (Debian: apt-get install containerd runc)"
            })?;
            tracing::info!("runtime: {version} at {}", containerd_socket.display());
            Arc::new(match mirrors {
                Some(m) => rt.with_mirrors(m),
                None => rt,
            })
        }
        RuntimeKind::Fake => Arc::new(meridian_agent::runtime::fake::FakeRuntime::default()),
    })
}

pub async fn run_agent_with(
    args: AgentArgs,
    spec: Option<meridian_agent::join::JoinSpec>,
) -> Result<()> {
    let mut cfg = AgentConfig::new(
        args.node_name.clone(),
        args.region.iter().map(|r| with_scheme(r)).collect(),
        args.data_dir.clone(),
    );
    if args.node_name.is_empty() {
        bail!("--node-name is required");
    }
    let identity = meridian_agent::join::IdentityDir::new(&args.data_dir);
    let saved = identity.saved();
    if let Some(saved) = &saved {
        if saved.node_name != args.node_name {
            bail!(
                "{} holds the identity of node {:?}, not {:?}",
                args.data_dir.display(),
                saved.node_name,
                args.node_name
            );
        }
        cfg.onboarding = Some(meridian_agent::Onboarding {
            dir: identity.clone(),
            spec: spec.unwrap_or_else(|| meridian_agent::join::JoinSpec {
                node_name: args.node_name.clone(),
                machine_id: None,
                labels: args.labels.clone(),
                facts: meridian_agent::facts::machine("", "", args.coordinates),
            }),
            replan_after: args.replan_after,
            center_interval: args.center_interval,
        });
    } else if args.region.is_empty() {
        bail!(
            "give --region ADDR, or join through the center first \
             (meridian agent join --center URL --token T --ca-hash H)"
        );
    }
    cfg.labels = args.labels;
    cfg.taints = args.taints;
    cfg.heartbeat = args.heartbeat;
    cfg.node_ip = args.node_ip;
    cfg.max_pods = args.max_pods;
    cfg.backoff.base = args.restart_backoff;
    cfg.reconnect_cap = args.reconnect_max;
    cfg.coordinates = args.coordinates;
    if !(0.0..=100.0).contains(&args.image_gc_low) || args.image_gc_low > args.image_gc_high {
        bail!("--image-gc-low must be within 0..=--image-gc-high (percent)");
    }
    cfg.image_gc.high_percent = args.image_gc_high;
    cfg.image_gc.low_percent = args.image_gc_low;
    let agent = Agent::start(
        cfg,
        make_runtime(
            args.runtime,
            &args.containerd_socket,
            (!args.no_image_mirror).then(|| Mirrors {
                hosts_dir: args.containerd_hosts_dir.clone(),
                endpoints: match &saved {
                    Some(s) => vec![s.endpoint.clone()],
                    None => args.region.iter().map(|r| with_scheme(r)).collect(),
                },
                ca: saved.as_ref().map(|_| identity.ca_file()),
                identity: saved.as_ref().map(|_| identity.clone()),
            }),
        )
        .await?,
    )
    .await
    .with_context(|| format!("starting agent {}", args.node_name))?;
    tokio::select! {
        _ = agent.run() => {}
        _ = crate::wait_for_signal() => {}
    }
    Ok(())
}

/// The node `examples/hello-pod.yaml` is bound to.
pub const DEMO_HELLO_NODE: &str = "paris-1";

/// (node, city, country, latitude, longitude)
type DemoNode = (&'static str, &'static str, &'static str, f64, f64);

/// Where each demo region is (its `topology.meridian.io/city` label): the center
/// shortlists regions nearest to a joining node.
const DEMO_REGION_CITIES: &[(&str, &str)] = &[
    ("ap-northeast", "Tokyo"),
    ("eu-west", "Paris"),
    ("us-east", "New-York-City"),
];

/// Regions and their nodes, cities from `world-cities.csv`.
const DEMO: &[(&str, &[DemoNode])] = &[
    (
        "ap-northeast",
        &[
            ("tokyo-1", "Tokyo", "JP", 35.6895, 139.6917),
            ("hong-kong-1", "Hong Kong", "HK", 22.2783, 114.1747),
        ],
    ),
    (
        "eu-west",
        &[
            ("paris-1", "Paris", "FR", 48.8534, 2.3488),
            ("london-1", "London", "GB", 51.5085, -0.1257),
        ],
    ),
    (
        "us-east",
        &[("new-york-1", "New York City", "US", 40.7143, -74.0060)],
    ),
];

pub struct DemoWorld {
    pub center: meridian_center::Center,
    regions: Vec<Region>,
    agents: Vec<tokio::task::JoinHandle<()>>,
    simulated: Vec<tokio::task::JoinHandle<()>>,
    runtime: &'static str,
}

/// Taint and label of the demo's simulated (hollow) nodes.
pub const SIMULATED_KEY: &str = "node.meridian.io/simulated";
/// Cities per region in the simulated fleet.
const SIMULATED_CITIES: usize = 8;

/// The simulated nodes of one demo region: two per city for the first cities of
/// the region in `world-cities.csv` (a CDN PoP and an edge VM; in ap-northeast the
/// second is a GPU box), with the labels a real fleet carries.
pub fn simulated_nodes(region: &str) -> Vec<(String, HollowConfig)> {
    const ISPS: &[&str] = &["telco-a", "telco-b", "cable-c"];
    let mut out = Vec::new();
    let cities = meridian_api::geo::cities()
        .iter()
        .filter(|c| c.region == region && c.country_code != "KP")
        .take(SIMULATED_CITIES);
    for (j, c) in cities.enumerate() {
        let city = meridian_api::geo::city_label(&c.name);
        let slug = city.to_lowercase();
        let gpu_box = region == "ap-northeast";
        for (k, (kind, source, machine)) in [
            ("cdn", "cdn", "physical"),
            if gpu_box {
                ("gpu", "ens", "physical")
            } else {
                ("vm", if j % 2 == 0 { "ens" } else { "third-party" }, "vm")
            },
        ]
        .into_iter()
        .enumerate()
        {
            let labels = [
                (CITY_KEY, city.clone()),
                (COUNTRY_KEY, c.country_code.clone()),
                (ZONE_KEY, format!("{region}-{slug}-{kind}")),
                (ISP_KEY, ISPS[(j + k) % ISPS.len()].to_owned()),
                (SOURCE_KEY, source.to_owned()),
                (MACHINE_KEY, machine.to_owned()),
                (BANDWIDTH_PRICE_KEY, format!("{}", 1 + (j + 2 * k) % 5)),
                (SIMULATED_KEY, "true".to_owned()),
            ];
            out.push((
                format!("sim-{slug}-{kind}"),
                HollowConfig {
                    heartbeat: Duration::from_secs(10),
                    start_delay: Duration::from_millis(200),
                    labels: labels.map(|(k, v)| (k.to_owned(), v)).to_vec(),
                    taints: vec![format!("{SIMULATED_KEY}=true:NoSchedule")],
                    gpus: if kind == "gpu" { 2 } else { 0 },
                    coordinates: Some((c.lat, c.lon)),
                    run_for: Some(Duration::from_secs(10)),
                },
            ));
        }
    }
    out
}

impl DemoWorld {
    pub fn describe(&self) -> String {
        let r: Vec<String> = self
            .regions
            .iter()
            .map(|r| format!("{} ({})", r.shared.cfg.name, r.addr))
            .collect();
        format!(
            "center {}, {} regions [{}], {} {}-runtime nodes, {} simulated nodes",
            self.center.url,
            r.len(),
            r.join(", "),
            self.agents.len(),
            self.runtime,
            self.simulated.len()
        )
    }
}

impl Drop for DemoWorld {
    fn drop(&mut self) {
        for a in self.agents.iter().chain(&self.simulated) {
            a.abort();
        }
        for r in &self.regions {
            r.shutdown();
        }
        self.center.shutdown();
    }
}

/// Starts three regions and five agents in this process (process runtime, or
/// containerd when `containerd` is given: images come from the regions' image
/// caches, which serve the built-in `meridian.local` images), plus, when
/// `simulated`, the simulated fleet of [`simulated_nodes`].
pub async fn start_demo_world(
    server: &Server,
    data_dir: &Path,
    center_listen: SocketAddr,
    simulated: bool,
    containerd: Option<&meridian_agent::runtime::private::PrivateContainerd>,
) -> Result<DemoWorld> {
    let token = server.system_token(SystemRole::Region).await?;
    let yaml =
        meridian_apiserver::kubeconfig::render("region", &server.url, &server.ca_pem, &token, None);
    let kc = kube::config::Kubeconfig::from_yaml(&yaml)?;
    // The center: the nodes' CA, tokens, inventory, region planning.
    let global = kube::Config::from_custom_kubeconfig(kc.clone(), &Default::default()).await?;
    let mut center_cfg =
        meridian_center::CenterConfig::new(data_dir.join("center"), center_listen, Some(global));
    center_cfg.region_refresh = Duration::from_secs(1);
    let center = meridian_center::Center::start(center_cfg)
        .await
        .context("starting the center")?;
    // The API server reaches regions (for logs) over TLS with the nodes' CA.
    meridian_pki::write_private(
        &data_dir.join(meridian_apiserver::REGIONS_CA_FILE),
        center.ca_pem.as_bytes(),
    )?;
    let mut world = DemoWorld {
        center,
        regions: Vec::new(),
        agents: Vec::new(),
        simulated: Vec::new(),
        runtime: if containerd.is_some() {
            "containerd"
        } else {
            "process"
        },
    };
    let builtin = match containerd {
        Some(_) => meridian_oci::build::builtin_images(Path::new(meridian_oci::build::BUSYBOX))
            .context(
                "the containerd demo builds its images from a static busybox \
                 (Debian: apt-get install busybox-static)",
            )?,
        None => Vec::new(),
    };
    for (region, _) in DEMO {
        let global = kube::Config::from_custom_kubeconfig(kc.clone(), &Default::default()).await?;
        let mut cfg = RegionConfig::new(
            *region,
            "127.0.0.1:0".parse()?,
            data_dir.join("regions").join(region),
            global,
        );
        cfg.proxy_token = token.clone();
        cfg.labels = DEMO_REGION_CITIES
            .iter()
            .filter(|(r, _)| r == region)
            .map(|(_, c)| (CITY_KEY.to_owned(), (*c).to_owned()))
            .collect();
        cfg.tls = Some(meridian_region::RegionTls {
            serving: world.center.ca().serving(region, &[])?,
            client_ca: world.center.ca_pem.clone(),
        });
        let r = Region::start(cfg)
            .await
            .with_context(|| format!("starting region {region}"))?;
        for (name, image) in &builtin {
            r.shared
                .images
                .import(&meridian_oci::Reference::parse(name)?, image)
                .with_context(|| format!("storing {name} in region {region}"))?;
        }
        world.regions.push(r);
    }
    let endpoints: Vec<String> = world
        .regions
        .iter()
        .map(|r| format!("https://{}", r.addr))
        .collect();
    let ca_file = data_dir.join(meridian_apiserver::REGIONS_CA_FILE);
    let runtime: Arc<dyn Runtime> = match containerd {
        Some(c) => Arc::new(
            meridian_agent::runtime::containerd::ContainerdRuntime::new(&c.socket).with_mirrors(
                Mirrors {
                    hosts_dir: c.hosts_dir.clone(),
                    endpoints: endpoints.clone(),
                    ca: Some(ca_file.clone()),
                    identity: None,
                },
            ),
        ),
        None => make_runtime(RuntimeKind::Process, Path::new(""), None).await?,
    };
    let stats = Arc::new(HollowStats::default());
    // Local nodes join through the center like real ones (probing included); a
    // node that joined before re-joins with its machine id and keeps its name.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        world.center.refresh().await;
        // Each region as it runs now (its endpoint changes with its port).
        let known = world.center.regions();
        let current = world.regions.iter().all(|r| {
            known.iter().any(|k| {
                k.name == r.shared.cfg.name
                    && k.alive
                    && k.endpoint == format!("https://{}", r.addr)
            })
        });
        if current {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("the regions did not register with the global API within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let local: usize = DEMO.iter().map(|(_, n)| n.len()).sum();
    let join_token = world
        .center
        .create_token(Duration::from_secs(600), local as u32)?
        .token
        .unwrap_or_default();
    let center =
        meridian_agent::join::CenterClient::new(&world.center.url, &world.center.ca_pem, None)?;
    for (_, nodes) in DEMO {
        for (node, city, country, lat, lon) in *nodes {
            let node_dir = data_dir.join("nodes").join(node);
            let labels = BTreeMap::from([
                (CITY_KEY.to_owned(), city.replace(' ', "-")),
                (COUNTRY_KEY.to_owned(), country.to_string()),
            ]);
            let spec = meridian_agent::join::JoinSpec {
                node_name: (*node).to_owned(),
                machine_id: None,
                labels: labels.clone(),
                facts: meridian_agent::facts::machine("ens", "vm", Some((*lat, *lon))),
            };
            let identity = meridian_agent::join::IdentityDir::new(&node_dir);
            let a = meridian_agent::join::join(&center, Some(&join_token), &spec, &identity, None)
                .await
                .with_context(|| format!("{node} joining through the center"))?;
            let mut cfg = AgentConfig::new(*node, Vec::new(), node_dir.clone());
            cfg.coordinates = Some((*lat, *lon));
            cfg.labels = labels;
            cfg.labels.insert(
                ZONE_KEY.to_owned(),
                format!("{}-{}", a.region, city.to_lowercase().replace(' ', "-")),
            );
            cfg.onboarding = Some(meridian_agent::Onboarding {
                dir: identity,
                spec,
                replan_after: Duration::from_secs(300),
                center_interval: Duration::from_secs(60),
            });
            let agent = Agent::start(cfg, runtime.clone())
                .await
                .with_context(|| format!("starting agent {node}"))?;
            world.agents.push(tokio::spawn(agent.run()));
        }
    }
    if simulated {
        // Hollow nodes get certificates straight from the CA (they run nothing,
        // so they skip probing), one TLS identity and connection each.
        for ((region, _), endpoint) in DEMO.iter().zip(&endpoints) {
            for (name, cfg) in simulated_nodes(region) {
                let (key, csr) = meridian_pki::node_key_and_csr(&name)?;
                let cert = world.center.ca().sign_node(
                    &csr,
                    &name,
                    region,
                    Duration::from_secs(365 * 86400),
                )?;
                let tls = meridian_agent::join::client_tls(&world.center.ca_pem, &cert, &key);
                let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())?
                    .tls_config(tls)?
                    .connect_lazy();
                world
                    .simulated
                    .push(tokio::spawn(run_node(channel, name, cfg, stats.clone())));
            }
        }
    }
    Ok(world)
}

/// A client of the global API acting as a platform component.
async fn system_client(server: &Server, role: SystemRole) -> Result<kube::Client> {
    let token = server.system_token(role).await?;
    let yaml =
        meridian_apiserver::kubeconfig::render("system", &server.url, &server.ca_pem, &token, None);
    let kc = kube::config::Kubeconfig::from_yaml(&yaml)?;
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    // Level-triggered loops retry themselves; a retrying client would sit for
    // minutes on a 429 from risk control.
    cfg.default_retry = false;
    Ok(kube::Client::try_from(cfg)?)
}

/// The global plane's loops beside the API server: the scheduler, the workload
/// controllers, and the region watchdog (silent region => its Nodes Ready=Unknown).
pub async fn spawn_global_loops(
    server: &Server,
    region_timeout: Duration,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let regions = system_client(server, SystemRole::Region).await?;
    let scheduler = system_client(server, SystemRole::Scheduler).await?;
    let controllers = system_client(server, SystemRole::Controllers).await?;
    Ok(vec![
        tokio::spawn(meridian_region::global::region_watchdog(
            regions,
            region_timeout,
        )),
        tokio::spawn(meridian_scheduler::run(scheduler)),
        tokio::spawn(meridian_controllers::run(controllers)),
    ])
}
