//! `meridian center`, `meridian token`, and `meridian agent join`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use meridian_agent::join::{CenterClient, IdentityDir, JoinSpec};
use meridian_api::onboarding::{TokenInfo, TokenRequest};
use meridian_center::{Center, CenterConfig};

use crate::edge::{GlobalArgs, parse_duration, parse_labels};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CenterCli {
    #[command(subcommand)]
    command: Option<CenterCommand>,
    #[command(flatten)]
    args: CenterArgs,
}

#[derive(Subcommand)]
enum CenterCommand {
    /// Issue a region's TLS serving certificate from the center's CA: writes
    /// tls.crt, tls.key and ca.crt (for `meridian region --tls-cert/--tls-key/--client-ca`).
    ServingCert {
        #[arg(long, default_value = ".meridian-center")]
        data_dir: PathBuf,
        /// The region's name.
        #[arg(long)]
        name: String,
        /// Names or addresses agents reach the region at.
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct CenterArgs {
    #[arg(long, default_value = ".meridian-center")]
    data_dir: PathBuf,
    #[command(flatten)]
    global: GlobalArgs,
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
    /// Extra names/addresses for the center's serving certificate.
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Regions offered to a joining node for probing.
    #[arg(long, default_value_t = 3)]
    shortlist: usize,
    /// Round trips a node measures to each candidate.
    #[arg(long, default_value_t = 5)]
    probes: u32,
    /// Lifetime of node certificates (renewed at two thirds).
    #[arg(long, default_value = "720h", value_parser = parse_duration)]
    cert_ttl: Duration,
    /// How often the region list is read from the global API.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    region_refresh: Duration,
}

pub async fn run_center(cli: CenterCli) -> Result<()> {
    if let Some(CenterCommand::ServingCert {
        data_dir,
        name,
        hosts,
        out,
    }) = cli.command
    {
        let ca = meridian_pki::Ca::load_or_create(&data_dir.join("pki"), "meridian-nodes-ca")?;
        let pair = ca.serving(&name, &hosts)?;
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        meridian_pki::write_private(&out.join("tls.crt"), pair.cert_pem.as_bytes())?;
        meridian_pki::write_private(&out.join("tls.key"), pair.key_pem.as_bytes())?;
        meridian_pki::write_private(&out.join("ca.crt"), ca.cert_pem.as_bytes())?;
        println!(
            "wrote {}/tls.crt, tls.key, ca.crt for region {name}",
            out.display()
        );
        return Ok(());
    }
    let args = cli.args;
    let (global, _) = crate::edge::global_config(&args.global)
        .await
        .context("the center reads regions from the global API")?;
    let mut cfg = CenterConfig::new(args.data_dir.clone(), args.listen, Some(global));
    cfg.hosts = args.hosts;
    cfg.shortlist = args.shortlist;
    cfg.probes = args.probes;
    cfg.cert_ttl = args.cert_ttl;
    cfg.region_refresh = args.region_refresh;
    let center = Center::start(cfg).await.context("starting the center")?;
    println!("center serving on {}", center.url);
    println!(
        "CA hash (for `meridian agent join --ca-hash`): {}",
        center.ca_hash
    );
    println!("CA: {}", args.data_dir.join("pki/ca.crt").display());
    crate::wait_for_signal().await;
    center.shutdown();
    Ok(())
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a bootstrap token (admins only) and print the join command.
    Create {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        /// How many nodes may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Labels every node joining with it gets, k=v,...
        #[arg(long, default_value = "", value_parser = parse_labels)]
        labels: BTreeMap<String, String>,
        #[arg(long, default_value = "")]
        description: String,
        /// Regions nodes joining with it may go to, comma separated (default: any).
        #[arg(long, value_delimiter = ',')]
        regions: Vec<String>,
    },
    /// List bootstrap tokens and their uses.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revoke a bootstrap token by id (the part before the dot).
    Revoke {
        #[command(flatten)]
        admin: AdminArgs,
        id: String,
    },
}

#[derive(clap::Args)]
pub struct AdminArgs {
    /// The center's URL.
    #[arg(long, default_value = "https://127.0.0.1:7000")]
    center: String,
    /// The center's CA certificate (its `pki/ca.crt`).
    #[arg(long)]
    center_ca: PathBuf,
    /// An admin kubeconfig of the global API (its bearer token authenticates you).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
}

impl AdminArgs {
    fn client(&self) -> Result<(reqwest::Client, String, String)> {
        let ca = std::fs::read_to_string(&self.center_ca)
            .with_context(|| format!("reading {}", self.center_ca.display()))?;
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)
            .with_context(|| format!("reading {}", self.kubeconfig.display()))?;
        let token =
            crate::edge::kubeconfig_token(&kc).context("the kubeconfig has no bearer token")?;
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?)
            .tls_built_in_root_certs(false)
            .timeout(Duration::from_secs(20))
            .build()?;
        Ok((client, token, ca))
    }
}

async fn check(resp: reqwest::Response) -> Result<reqwest::Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<meridian_api::onboarding::CenterError>(&body) {
        Ok(e) => bail!("the center refused ({status}): {}: {}", e.reason, e.message),
        Err(_) => bail!("the center answered {status}: {body}"),
    }
}

pub async fn run_token(cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Create {
            admin,
            ttl,
            uses,
            labels,
            description,
            regions,
        } => {
            let (client, bearer, ca) = admin.client()?;
            let url = admin.center.trim_end_matches('/');
            let resp = client
                .post(format!("{url}/v1/tokens"))
                .bearer_auth(bearer)
                .json(&TokenRequest {
                    ttl_seconds: ttl.as_secs(),
                    uses,
                    labels,
                    description,
                    regions,
                })
                .send()
                .await
                .with_context(|| format!("reaching the center at {url}"))?;
            let info: TokenInfo = check(resp).await?.json().await?;
            let token = info.token.unwrap_or_default();
            println!(
                "token {} (id {}, {uses} uses, expires {})",
                token, info.id, info.expires
            );
            println!("join a node with:");
            println!(
                "  meridian agent join --center {url} --token {token} --ca-hash {} --node-name NAME",
                meridian_pki::ca_hash(&ca)?
            );
        }
        TokenCommand::List { admin } => {
            let (client, bearer, _) = admin.client()?;
            let url = admin.center.trim_end_matches('/');
            let resp = client
                .get(format!("{url}/v1/tokens"))
                .bearer_auth(bearer)
                .send()
                .await?;
            let list: Vec<TokenInfo> = check(resp).await?.json().await?;
            println!(
                "{:<8} {:<6} {:<9} {:<8} EXPIRES",
                "ID", "USED", "OF", "REVOKED"
            );
            for t in list {
                println!(
                    "{:<8} {:<6} {:<9} {:<8} {}",
                    t.id, t.used, t.uses, t.revoked, t.expires
                );
            }
        }
        TokenCommand::Revoke { admin, id } => {
            let (client, bearer, _) = admin.client()?;
            let url = admin.center.trim_end_matches('/');
            let resp = client
                .delete(format!("{url}/v1/tokens/{id}"))
                .bearer_auth(bearer)
                .send()
                .await?;
            check(resp).await?;
            println!("token {id} revoked");
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct JoinArgs {
    /// The center's URL.
    #[arg(long)]
    pub center: String,
    /// A bootstrap token (`meridian token create`).
    #[arg(long, env = "MERIDIAN_JOIN_TOKEN")]
    pub token: String,
    /// The center CA's hash, `sha256:...` (printed by `meridian token create`):
    /// the agent trusts the center only if its CA matches.
    #[arg(long)]
    pub ca_hash: String,
    /// This machine's id (default: derived once from /etc/machine-id and the data dir).
    #[arg(long)]
    pub machine_id: Option<String>,
    /// cdn | ens | third-party
    #[arg(long, default_value = "")]
    pub source: String,
    /// physical | vm | arm-array
    #[arg(long, default_value = "")]
    pub machine_type: String,
    #[command(flatten)]
    pub agent: crate::edge::AgentArgs,
}

/// `meridian agent join`: joins through the center unless this data dir already
/// has, then runs the agent on that identity.
pub async fn join_and_run(args: JoinArgs) -> Result<()> {
    if args.agent.node_name.is_empty() {
        bail!("--node-name is required");
    }
    let dir = IdentityDir::new(&args.agent.data_dir);
    let spec = JoinSpec {
        node_name: args.agent.node_name.clone(),
        machine_id: args.machine_id.clone(),
        labels: args.agent.labels.clone(),
        facts: meridian_agent::facts::machine(
            &args.source,
            &args.machine_type,
            args.agent.coordinates,
        ),
    };
    match dir.saved() {
        Some(saved) => println!(
            "already joined as {} in region {} ({}); running on that identity",
            saved.node_name, saved.region, saved.endpoint
        ),
        None => {
            let (client, _) = CenterClient::discover(&args.center, &args.ca_hash)
                .await
                .context("discovering the center")?;
            let a = meridian_agent::join::join(&client, Some(&args.token), &spec, &dir, None)
                .await
                .context("joining")?;
            println!(
                "joined as {} in region {} ({})",
                a.node_name, a.region, a.endpoint
            );
            for s in &a.scores {
                println!("  {s}");
            }
        }
    }
    crate::edge::run_agent_with(args.agent, Some(spec)).await
}
