//! `join`: N agents joining one center at once, the whole onboarding each: CA
//! discovery, offer, HTTPS probes of every candidate region, key and CSR,
//! assignment and certificate, then a mutual-TLS stream to the assigned region
//! (a hollow node). Real `meridian server`, `center` and TLS `region` processes;
//! the agents are tasks in this process.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node;
use meridian_agent::hollow::{HollowConfig, HollowStats, run_node};
use meridian_agent::join::{CenterClient, IdentityDir, JoinSpec};

use crate::edge::{free_port, proc_usage, spawn, wait_until};

fn run(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(crate::edge::meridian_bin()?)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()?;
    if !out.status.success() {
        bail!(
            "meridian {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// (city, lat, lon) the regions sit in; agents are spread around them.
const REGION_SITES: &[(&str, &str, f64, f64)] = &[
    ("eu-west", "Paris", 48.85, 2.35),
    ("us-east", "New-York-City", 40.71, -74.0),
    ("ap-northeast", "Tokyo", 35.69, 139.69),
    ("eu-central", "Frankfurt-am-Main", 50.11, 8.68),
    ("sa-east", "Sao-Paulo", -23.55, -46.63),
];

pub async fn join(agents: usize, regions: usize) -> Result<()> {
    let regions = regions.clamp(1, REGION_SITES.len());
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let g = d.join("global");
    let sp = free_port();
    let server = spawn(
        &[
            "server",
            "--data-dir",
            g.to_str().unwrap_or_default(),
            "--listen",
            &format!("127.0.0.1:{sp}"),
        ],
        &d.join("server.log"),
    )?;
    let token_file = g.join("system-region.token");
    wait_until("the API server", Duration::from_secs(60), || {
        token_file.exists()
    })
    .await?;
    let url = format!("https://127.0.0.1:{sp}");
    let global = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend([
            "--global".into(),
            url.clone(),
            "--token-file".into(),
            token_file.display().to_string(),
            "--ca-file".into(),
            g.join("pki/ca.crt").display().to_string(),
        ]);
        v
    };
    let c = d.join("center");
    let mut procs = Vec::new();
    for (name, city, _, _) in &REGION_SITES[..regions] {
        let tls = d.join(format!("tls-{name}"));
        run(&[
            "center",
            "serving-cert",
            "--data-dir",
            c.to_str().unwrap_or_default(),
            "--name",
            name,
            "--out",
            tls.to_str().unwrap_or_default(),
        ])?;
        let rp = free_port();
        let mut args = global(&["region", "--name", name]);
        args.extend([
            "--listen".into(),
            format!("127.0.0.1:{rp}"),
            "--data-dir".into(),
            d.join(format!("region-{name}")).display().to_string(),
            "--labels".into(),
            format!("topology.meridian.io/city={city}"),
            "--tls-cert".into(),
            tls.join("tls.crt").display().to_string(),
            "--tls-key".into(),
            tls.join("tls.key").display().to_string(),
            "--client-ca".into(),
            tls.join("ca.crt").display().to_string(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        procs.push(spawn(&args, &d.join(format!("region-{name}.log")))?);
    }
    let cp = free_port();
    let mut args = global(&["center", "--data-dir", c.to_str().unwrap_or_default()]);
    args.extend([
        "--listen".into(),
        format!("127.0.0.1:{cp}"),
        "--region-refresh".into(),
        "1s".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let center = spawn(&args, &d.join("center.log"))?;
    let center_url = format!("https://127.0.0.1:{cp}");
    let kc = kube::config::Kubeconfig::read_from(g.join("admin.kubeconfig"))?;
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
    )?;
    // Wait for every region to be registered and the center to have read them.
    let ec = kube::core::ApiResource {
        group: "meridian.io".into(),
        version: "v1alpha1".into(),
        api_version: "meridian.io/v1alpha1".into(),
        kind: "EdgeCluster".into(),
        plural: "edgeclusters".into(),
    };
    let api: kube::Api<kube::core::DynamicObject> = kube::Api::all_with(client.clone(), &ec);
    let deadline = Instant::now() + Duration::from_secs(60);
    while api
        .list(&Default::default())
        .await
        .map(|l| l.items.len())
        .unwrap_or(0)
        < regions
    {
        if Instant::now() > deadline {
            bail!("the regions did not register");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = run(&[
        "token",
        "create",
        "--center",
        &center_url,
        "--center-ca",
        c.join("pki/ca.crt").to_str().unwrap_or_default(),
        "--kubeconfig",
        g.join("admin.kubeconfig").to_str().unwrap_or_default(),
        "--uses",
        &agents.to_string(),
    ])?;
    let token = out
        .split_whitespace()
        .nth(1)
        .context("token create output")?
        .to_owned();
    let ca_hash = meridian_pki::ca_hash(&std::fs::read_to_string(c.join("pki/ca.crt"))?)?;
    let (c0, _) = proc_usage(center.pid()).context("center process")?;

    println!("{agents} agents joining at once ({regions} regions, loopback)...");
    let stats = Arc::new(HollowStats::default());
    let joined = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(agents);
    for i in 0..agents {
        let (_, _, lat, lon) = REGION_SITES[i % regions];
        let spec = JoinSpec {
            node_name: format!("edge-{i:05}"),
            machine_id: Some(format!("machine-{i:05}")),
            labels: Default::default(),
            facts: meridian_api::onboarding::MachineFacts {
                source: "cdn".into(),
                machine_type: "vm".into(),
                arch: "amd64".into(),
                cpus: 8,
                memory_bytes: 16 << 30,
                gpus: 0,
                latitude: Some(lat + (i % 7) as f64 * 0.3),
                longitude: Some(lon - (i % 5) as f64 * 0.3),
            },
        };
        let ident = IdentityDir::new(&d.join("agents").join(&spec.node_name));
        let (center_url, ca_hash, token) = (center_url.clone(), ca_hash.clone(), token.clone());
        let (stats, joined, failed) = (stats.clone(), joined.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let attempt = async {
                let (center, _) = CenterClient::discover(&center_url, &ca_hash).await?;
                meridian_agent::join::join(&center, Some(&token), &spec, &ident, None).await
            };
            let a = match attempt.await {
                Ok(a) => a,
                Err(e) => {
                    if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("  join of {} failed: {e}", spec.node_name);
                    }
                    return;
                }
            };
            joined.fetch_add(1, Ordering::Relaxed);
            let tls = meridian_agent::join::client_tls(
                &a.ca,
                &a.certificate,
                &ident.key_pem().unwrap_or_default(),
            );
            let Ok(ep) = tonic::transport::Endpoint::from_shared(a.endpoint.clone()) else {
                return;
            };
            let Ok(ep) = ep.tls_config(tls) else { return };
            let cfg = HollowConfig {
                heartbeat: Duration::from_secs(10),
                ..Default::default()
            };
            run_node(ep.connect_lazy(), a.node_name, cfg, stats).await;
        }));
    }
    let nodes: kube::Api<Node> = kube::Api::all(client.clone());
    let mut peak_rss = 0u64;
    let mut last_print = Instant::now();
    let ready_at = loop {
        if let Some((_, rss)) = proc_usage(center.pid()) {
            peak_rss = peak_rss.max(rss);
        }
        let ready = nodes
            .list(&Default::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|n| {
                        n.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                    })
                    .count()
            })
            .unwrap_or(0);
        if ready >= agents {
            break started.elapsed();
        }
        if failed.load(Ordering::Relaxed) + ready >= agents && failed.load(Ordering::Relaxed) > 0 {
            bail!("{} joins failed", failed.load(Ordering::Relaxed));
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("only {ready} of {agents} Ready after 600 s");
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  ... {} joined, {ready} Ready ({:.0}s)",
                joined.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (c1, rss) = proc_usage(center.pid()).context("center process")?;
    let joins_done = joined.load(Ordering::Relaxed);
    println!(
        "all {agents} Ready {:.1}s after the first join request",
        ready_at.as_secs_f64()
    );
    println!("  joins completed:      {joins_done}");
    println!(
        "  center cpu:           {:.2} core-seconds ({:.2} ms per join)",
        c1 - c0,
        (c1 - c0) * 1000.0 / agents as f64
    );
    println!(
        "  center resident:      {} MiB now, peak {} MiB",
        rss >> 20,
        peak_rss.max(rss) >> 20
    );
    let _ = (server, procs);
    report_assignments(d)?;
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// How many agents each region got (from the saved assignments).
fn report_assignments(d: &Path) -> Result<()> {
    let mut per: std::collections::BTreeMap<String, usize> = Default::default();
    for e in std::fs::read_dir(d.join("agents"))? {
        let dir = IdentityDir::new(&e?.path());
        if let Some(s) = dir.saved() {
            *per.entry(s.region).or_default() += 1;
        }
    }
    let parts: Vec<String> = per.iter().map(|(r, n)| format!("{r} {n}")).collect();
    println!("  assigned:             {}", parts.join(", "));
    Ok(())
}
