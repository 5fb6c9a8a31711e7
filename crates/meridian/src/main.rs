//! `meridian`: every Meridian component as a subcommand of one binary.

mod edge;
mod onboard;
mod sim;
mod tenant;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use meridian_apiserver::{Server, ServerConfig};
use meridian_store::{DynStore, EmbeddedStore, EtcdStore};

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "Meridian, an edge container cloud"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StoreKind {
    /// Embedded redb file in the data directory (default, no setup).
    Embedded,
    /// An etcd cluster (`--etcd-endpoints`), for several API servers sharing one store.
    Etcd,
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Where the store, certificates and kubeconfigs live.
    #[arg(long, default_value = ".meridian")]
    data_dir: PathBuf,
    /// Address to serve HTTPS on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    #[arg(long, value_enum, default_value = "embedded")]
    store: StoreKind,
    /// etcd client URLs, comma separated (with `--store etcd`).
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Extra host names or addresses for the serving certificate.
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// A region silent for this long has its Nodes marked Ready=Unknown.
    #[arg(long, default_value = "40s", value_parser = edge::parse_duration)]
    region_timeout: Duration,
    /// Serve the API only: no scheduler, controllers or region watchdog. With
    /// several servers on one etcd, run those loops on exactly one of them (there is
    /// no leader election yet).
    #[arg(long)]
    api_only: bool,
}

#[derive(clap::Args)]
struct UpArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Skip the simulated fleet (hollow nodes in 23 cities that run nothing, for
    /// the placement examples).
    #[arg(long)]
    no_simulated: bool,
    /// How the local nodes run containers: `process` (host processes, the image
    /// is not used) or `containerd` (real containers from images, through a
    /// private containerd under the data dir; needs root, containerd, runc and
    /// busybox-static).
    #[arg(long, value_enum, default_value = "process")]
    runtime: UpRuntime,
    /// Where the center (node onboarding) listens.
    #[arg(long, default_value = "127.0.0.1:7000")]
    center_listen: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum UpRuntime {
    Process,
    Containerd,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Write an OCI archive of the built-in images (meridian.local/busybox:1 and
    /// meridian.local/pause:1) built from a static busybox, for
    /// `meridian region --import-images`.
    Busybox {
        #[arg(long)]
        out: PathBuf,
        /// The static busybox binary (Debian's busybox-static).
        #[arg(long, default_value = meridian_oci::build::BUSYBOX)]
        busybox: PathBuf,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run the global API server.
    Server(ServerArgs),
    /// Run a whole small edge cloud on this machine and print what to try next.
    Up(UpArgs),
    /// Manage tenants (virtual clusters).
    Tenant {
        #[command(subcommand)]
        command: tenant::TenantCommand,
    },
    /// Run a region: an agent hub and node lifecycle for one edge management cluster.
    Region(edge::RegionArgs),
    /// Run a node agent that dials its region and runs the node's pods
    /// (`meridian agent join ...` joins through the center first).
    Agent(Box<edge::AgentCli>),
    /// Run the resource management center: bootstrap tokens, node inventory,
    /// region planning and node certificates.
    Center(onboard::CenterCli),
    /// Manage bootstrap tokens for joining nodes (admins).
    Token {
        #[command(subcommand)]
        command: onboard::TokenCommand,
    },
    /// Build images without Docker.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Simulate a whole fleet on this machine (hollow nodes, real server and
    /// regions) and measure it against the Kubernetes scalability SLOs.
    Sim(sim::SimCli),
    /// (internal) Supervise one container process for the process runtime.
    Shim,
}

/// mimalloc, tuned (see `meridian-alloc`); the `system-alloc` feature leaves the
/// system allocator in place, for heap profilers such as `heaptrack`.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: meridian_alloc::Allocator = meridian_alloc::Allocator;

fn main() -> Result<()> {
    meridian_alloc::tune();
    // The shim runs without an async runtime: it is one per container and must stay small.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("shim") {
        std::process::exit(meridian_agent::shim::main(&argv[2..]));
    }
    if argv.get(1).map(String::as_str) == Some("shim-tty") {
        std::process::exit(meridian_agent::shim::tty_main(&argv[2..]));
    }
    let cli = Cli::parse();
    // An agent is a small process: one thread is plenty.
    let rt = if matches!(cli.command, Command::Agent(_)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Server(args) => {
            let server = start_server(&args).await?;
            println!("meridian API server listening on {}", server.url);
            server
                .system_token(meridian_apiserver::auth::SystemRole::Region)
                .await
                .context("issuing the region token")?;
            println!(
                "region token (for `meridian region --token-file`): {}",
                args.data_dir.join("system-region.token").display()
            );
            let _loops = if args.api_only {
                Vec::new()
            } else {
                edge::spawn_global_loops(&server, args.region_timeout).await?
            };
            println!(
                "admin kubeconfig: {}",
                args.data_dir.join("admin.kubeconfig").display()
            );
            wait_for_signal().await;
            tracing::info!("shutting down");
            server.shutdown(Duration::from_secs(5)).await;
            Ok(())
        }
        Command::Up(args) => up(args).await,
        Command::Tenant { command } => tenant::run(command).await,
        Command::Region(args) => edge::run_region(args).await,
        Command::Agent(args) => edge::run_agent_cli(*args).await,
        Command::Center(args) => onboard::run_center(args).await,
        Command::Token { command } => onboard::run_token(command).await,
        Command::Sim(cli) => sim::run(cli).await,
        Command::Image { command } => match command {
            ImageCommand::Busybox { out, busybox } => {
                let images = meridian_oci::build::builtin_images(&busybox)
                    .with_context(|| format!("building from {}", busybox.display()))?;
                let refs: Vec<(String, &meridian_oci::Image)> =
                    images.iter().map(|(n, i)| (n.clone(), i)).collect();
                let bytes = meridian_oci::archive::write(&refs)?;
                std::fs::write(&out, &bytes)
                    .with_context(|| format!("writing {}", out.display()))?;
                for (n, _) in &images {
                    println!("{n}");
                }
                println!("wrote {} ({} bytes)", out.display(), bytes.len());
                Ok(())
            }
        },
        Command::Shim => unreachable!("handled before the runtime starts"),
    }
}

async fn open_store(args: &ServerArgs) -> Result<DynStore> {
    Ok(match args.store {
        StoreKind::Embedded => {
            std::fs::create_dir_all(&args.data_dir)
                .with_context(|| format!("creating {}", args.data_dir.display()))?;
            let path = args.data_dir.join("store.redb");
            Arc::new(
                EmbeddedStore::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?,
            )
        }
        StoreKind::Etcd => {
            if args.etcd_endpoints.is_empty() {
                bail!("--store etcd needs --etcd-endpoints (for example http://127.0.0.1:2379)");
            }
            Arc::new(
                EtcdStore::connect(&args.etcd_endpoints)
                    .await
                    .with_context(|| {
                        format!("connecting to etcd at {}", args.etcd_endpoints.join(","))
                    })?,
            )
        }
    })
}

async fn start_server(args: &ServerArgs) -> Result<Server> {
    let store = open_store(args).await?;
    let mut config = ServerConfig::new(args.listen, &args.data_dir);
    config.hosts = args.hosts.clone();
    Server::start(config, store)
        .await
        .with_context(|| format!("starting the API server on {}", args.listen))
}

async fn up(up: UpArgs) -> Result<()> {
    let args = &up.server;
    let server = start_server(args).await?;
    let kubeconfig = tenant::create_tenant(&args.data_dir, "demo", None).await?;
    let containerd = match up.runtime {
        UpRuntime::Containerd => Some(
            meridian_agent::runtime::private::PrivateContainerd::start(
                &args.data_dir.join("containerd"),
                &format!("{}/pause:1", meridian_oci::LOCAL_REGISTRY),
            )
            .await
            .context("starting a private containerd")?,
        ),
        UpRuntime::Process => None,
    };
    let world = edge::start_demo_world(
        &server,
        &args.data_dir,
        up.center_listen,
        !up.no_simulated,
        containerd.as_ref(),
    )
    .await?;
    let _loops = edge::spawn_global_loops(&server, args.region_timeout).await?;
    let examples = std::env::current_dir()?.join("examples");
    println!();
    println!(
        "Meridian is up: API server on {} (embedded store in {})",
        server.url,
        args.data_dir.display()
    );
    println!(
        "  admin kubeconfig:        {}",
        args.data_dir.join("admin.kubeconfig").display()
    );
    println!("  tenant \"demo\" kubeconfig: {}", kubeconfig.display());
    println!();
    println!("Try, in another terminal:");
    println!("  export KUBECONFIG={}", kubeconfig.display());
    println!(
        "  kubectl apply -f {}",
        examples.join("web-deployment.yaml").display()
    );
    println!("  kubectl get deployments,namespaces -o wide");
    println!("  kubectl get nodes -L topology.meridian.io/city,topology.kubernetes.io/region");
    println!(
        "  kubectl apply -f {}   # GPU servers, players within 10 ms",
        examples.join("cloud-gaming.yaml").display()
    );
    println!("  kubectl get placementpolicy game-server -o yaml");
    println!(
        "  kubectl apply -f {}   # a pod bound to {}",
        examples.join("hello-pod.yaml").display(),
        edge::DEMO_HELLO_NODE
    );
    println!("  kubectl logs -f hello");
    println!("  kubectl exec -it hello -- sh        # a shell beside it, through its region");
    if containerd.is_some() {
        println!(
            "  kubectl apply -f {}   # real containers from meridian.local/busybox:1",
            examples.join("containerd-web.yaml").display()
        );
        println!("  curl http://127.0.0.1:18080/");
    }
    println!();
    println!("Join a machine of your own (the center plans its region from probes):");
    println!(
        "  meridian token create --center {} --center-ca {} --kubeconfig {} --uses 10",
        world.center.url,
        args.data_dir.join("center/pki/ca.crt").display(),
        args.data_dir.join("admin.kubeconfig").display()
    );
    println!();
    println!("Edge world: {}", world.describe());
    println!();
    println!(
        "Press Ctrl-C to stop; everything is kept in {}.",
        args.data_dir.display()
    );
    wait_for_signal().await;
    drop(world);
    drop(containerd);
    // A real node's workloads outlive its agent; the demo's should not outlive `up`.
    // They come back from the nodes' caches on the next `meridian up`.
    let stopped = meridian_agent::runtime::process::kill_leftovers(&args.data_dir.join("nodes"));
    if stopped > 0 {
        println!("stopped {stopped} demo container(s)");
    }
    server.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
