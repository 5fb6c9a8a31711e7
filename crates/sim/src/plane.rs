//! The real processes: one `meridian server` (API, scheduler, controllers) and one
//! `meridian region` per simulated region, and their resource usage.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Result, SimConfig, SimError, io};

pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(bin: &Path, name: &str, args: &[String], log: &Path) -> Result<Proc> {
    let out = std::fs::File::create(log).map_err(io(format!("creating {}", log.display())))?;
    let child = Command::new(bin)
        .args(args)
        // Warnings only, unless MERIDIAN_SIM_LOG asks for more (a tracing filter,
        // e.g. `warn,meridian_scheduler=debug`).
        .env(
            "RUST_LOG",
            std::env::var("MERIDIAN_SIM_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .map_err(|source| SimError::Spawn {
            what: format!("{name} ({})", bin.display()),
            source,
        })?;
    Ok(Proc {
        name: name.to_owned(),
        child,
    })
}

fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("finding a free loopback port"))
}

async fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            return Err(SimError::Timeout(what.to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

pub struct Region {
    pub name: String,
    pub port: u16,
    pub cities: Vec<&'static meridian_api::geo::City>,
    pub proc: Proc,
}

pub struct Plane {
    pub dir: PathBuf,
    pub url: String,
    pub ca_pem: String,
    pub server: Proc,
    pub regions: Vec<Region>,
    pub admin: kube::Client,
    pub admin_token: String,
}

/// The `regions` suggested regions of world-cities.csv with the most cities.
fn pick_regions(n: usize) -> Vec<(String, Vec<&'static meridian_api::geo::City>)> {
    let mut by: std::collections::BTreeMap<&str, Vec<&'static meridian_api::geo::City>> =
        Default::default();
    for c in meridian_api::geo::cities() {
        by.entry(c.region.as_str()).or_default().push(c);
    }
    let mut all: Vec<_> = by.into_iter().collect();
    all.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
    all.into_iter()
        .take(n)
        .map(|(r, c)| (r.to_owned(), c))
        .collect()
}

impl Plane {
    pub async fn start(cfg: &SimConfig, dir: &Path) -> Result<Plane> {
        let g = dir.join("global");
        let port = free_port()?;
        let s = |x: &str| x.to_owned();
        let server = spawn(
            &cfg.meridian,
            "server",
            &[
                s("server"),
                s("--data-dir"),
                g.to_string_lossy().into_owned(),
                s("--listen"),
                format!("127.0.0.1:{port}"),
            ],
            &dir.join("server.log"),
        )?;
        let token_file = g.join("system-region.token");
        let admin_file = g.join("admin.kubeconfig");
        wait_for(
            "the API server to write its credentials",
            Duration::from_secs(120),
            || token_file.exists() && admin_file.exists(),
        )
        .await?;
        let url = format!("https://127.0.0.1:{port}");
        let ca_pem = std::fs::read_to_string(g.join("pki/ca.crt")).map_err(io("reading the CA"))?;
        let kc = kube::config::Kubeconfig::read_from(&admin_file)
            .map_err(|e| SimError::Invalid(format!("admin kubeconfig: {e}")))?;
        let admin_token = kc
            .auth_infos
            .first()
            .and_then(|a| a.auth_info.as_ref())
            .and_then(|a| a.token.as_ref())
            .map(|t| {
                use secrecy::ExposeSecret;
                t.expose_secret().to_owned()
            })
            .unwrap_or_default();
        let admin = crate::observe::client(&url, &ca_pem, &admin_token).await?;
        let mut regions = Vec::new();
        for (name, cities) in pick_regions(cfg.regions) {
            let port = free_port()?;
            let rdir = dir.join(format!("region-{name}"));
            let secs = |d: Duration| format!("{}s", d.as_secs());
            let args = vec![
                s("region"),
                s("--name"),
                name.clone(),
                s("--global"),
                url.clone(),
                s("--token-file"),
                token_file.to_string_lossy().into_owned(),
                s("--ca-file"),
                g.join("pki/ca.crt").to_string_lossy().into_owned(),
                s("--listen"),
                format!("127.0.0.1:{port}"),
                s("--data-dir"),
                rdir.to_string_lossy().into_owned(),
                s("--lease-timeout"),
                secs(cfg.lease_timeout),
                s("--eviction-grace"),
                secs(cfg.eviction_grace),
                s("--eviction-rate"),
                cfg.eviction_rate.to_string(),
                s("--labels"),
                format!("topology.meridian.io/region={name}"),
            ];
            let proc = spawn(
                &cfg.meridian,
                &format!("region {name}"),
                &args,
                &dir.join(format!("region-{name}.log")),
            )?;
            regions.push(Region {
                name,
                port,
                cities,
                proc,
            });
        }
        for r in &regions {
            let deadline = Instant::now() + Duration::from_secs(60);
            while tokio::net::TcpStream::connect(("127.0.0.1", r.port))
                .await
                .is_err()
            {
                if Instant::now() > deadline {
                    return Err(SimError::Timeout(format!(
                        "region {} to listen (see {}/region-{}.log)",
                        r.name,
                        dir.display(),
                        r.name
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(Plane {
            dir: dir.to_owned(),
            url,
            ca_pem,
            server,
            regions,
            admin,
            admin_token,
        })
    }

    /// Bytes of every store file under the global data directory.
    pub fn store_bytes(&self) -> u64 {
        fn walk(p: &Path, total: &mut u64) {
            let Ok(rd) = std::fs::read_dir(p) else { return };
            for e in rd.flatten() {
                let path = e.path();
                if path.is_dir() {
                    walk(&path, total);
                } else if path.extension().is_some_and(|x| x == "redb") {
                    *total += e.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
        }
        let mut total = 0;
        walk(&self.dir.join("global"), &mut total);
        total
    }
}

/// (cpu seconds, resident bytes) of a process.
pub fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks as f64 / 100.0, rss_kb * 1024))
}

#[derive(Clone, Default)]
struct Track {
    name: String,
    pid: u32,
    cpu: f64,
    rss: u64,
    peak: u64,
    /// Peak since the current phase began.
    phase_peak: u64,
    phase_cpu0: f64,
    run_cpu0: f64,
}

/// Samples every process every second: peaks per process and of their sum.
#[derive(Clone)]
pub struct Usage {
    inner: Arc<Mutex<(Vec<Track>, u64, Instant)>>,
    started: Instant,
}

impl Usage {
    pub fn new(procs: &[(String, u32)]) -> Usage {
        let tracks = procs
            .iter()
            .map(|(name, pid)| {
                let cpu = proc_usage(*pid).map_or(0.0, |u| u.0);
                Track {
                    name: name.clone(),
                    pid: *pid,
                    cpu,
                    phase_cpu0: cpu,
                    run_cpu0: cpu,
                    ..Default::default()
                }
            })
            .collect();
        let u = Usage {
            inner: Arc::new(Mutex::new((tracks, 0, Instant::now()))),
            started: Instant::now(),
        };
        let me = u.clone();
        tokio::spawn(async move {
            loop {
                me.sample();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        u
    }

    fn sample(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut sum = 0;
        for t in g.0.iter_mut() {
            if let Some((cpu, rss)) = proc_usage(t.pid) {
                t.cpu = cpu;
                t.rss = rss;
                t.peak = t.peak.max(rss);
                t.phase_peak = t.phase_peak.max(rss);
            }
            sum += t.rss;
        }
        g.1 = g.1.max(sum);
    }

    /// Starts a phase: per-phase cpu and peaks restart.
    pub fn phase_start(&self) {
        self.sample();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.2 = Instant::now();
        for t in g.0.iter_mut() {
            t.phase_cpu0 = t.cpu;
            t.phase_peak = t.rss;
        }
    }

    pub fn phase(&self) -> Vec<crate::ProcessUsage> {
        self.sample();
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let secs = g.2.elapsed().as_secs_f64().max(0.001);
        g.0.iter()
            .map(|t| crate::ProcessUsage {
                name: t.name.clone(),
                cpu_cores: (t.cpu - t.phase_cpu0) / secs,
                cpu_seconds: t.cpu - t.phase_cpu0,
                rss_peak_mib: mib(t.phase_peak),
                rss_end_mib: mib(t.rss),
            })
            .collect()
    }

    pub fn run(&self) -> (Vec<crate::ProcessUsage>, f64) {
        self.sample();
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let procs =
            g.0.iter()
                .map(|t| crate::ProcessUsage {
                    name: t.name.clone(),
                    cpu_cores: (t.cpu - t.run_cpu0) / secs,
                    cpu_seconds: t.cpu - t.run_cpu0,
                    rss_peak_mib: mib(t.peak),
                    rss_end_mib: mib(t.rss),
                })
                .collect();
        (procs, mib(g.1))
    }

    /// Resident memory of every process right now, in MiB.
    pub fn now_mib(&self) -> f64 {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        mib(g.0.iter().map(|t| t.rss).sum())
    }
}

fn mib(b: u64) -> f64 {
    (b as f64 / 1048576.0 * 10.0).round() / 10.0
}
