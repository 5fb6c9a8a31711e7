//! The scenarios, in order: bring-up, then density, churn and loss as configured.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

use crate::fleet::{CITY_LABEL, Fleet};
use crate::metrics::{self, Snapshot};
use crate::observe::{Observer, SIM_LABEL};
use crate::plane::{Plane, Usage};
use crate::{Check, Goal, Phase, Report, Result, Scenario, SimConfig, SimError, api, io};

struct Tenant {
    name: String,
    client: kube::Client,
    namespaces: Vec<String>,
    /// (namespace, deployment name)
    deployments: Vec<(String, String)>,
}

/// Fields drop in order: the watchers and the fleet stop before the processes do.
struct Run {
    obs: Observer,
    fleet: Option<Fleet>,
    cfg: SimConfig,
    plane: Plane,
    http: reqwest::Client,
    usage: Usage,
    tenants: Vec<Tenant>,
    phases: Vec<Phase>,
    checks: Vec<Check>,
    goals: Vec<Goal>,
    metrics0: Snapshot,
}

struct Begun {
    at: Instant,
    metrics: Snapshot,
}

pub async fn run(cfg: SimConfig) -> Result<Report> {
    let _tmp;
    let dir: PathBuf = match &cfg.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
            d.clone()
        }
        None => {
            let t = tempfile::tempdir().map_err(io("creating a work directory"))?;
            let p = t.path().to_owned();
            _tmp = t;
            p
        }
    };
    eprintln!(
        "meridian sim: {} nodes over {} regions, {} pods; starting the global plane and the regions (logs in {})",
        cfg.nodes,
        cfg.regions,
        cfg.pods,
        dir.display()
    );
    let plane = Plane::start(&cfg, &dir).await?;
    let http = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(plane.ca_pem.as_bytes()).map_err(|source| {
                SimError::Http {
                    what: "the server's CA".into(),
                    source,
                }
            })?,
        )
        .build()
        .map_err(|source| SimError::Http {
            what: "an HTTP client".into(),
            source,
        })?;
    let mut procs = vec![("server".to_owned(), plane.server.pid())];
    for r in &plane.regions {
        procs.push((r.proc.name.clone(), r.proc.pid()));
    }
    procs.push(("sim (hollow)".to_owned(), std::process::id()));
    let usage = Usage::new(&procs);
    let obs = Observer::start(&plane.url, &plane.ca_pem, &plane.admin_token).await?;
    let metrics0 = metrics::scrape(&http, &plane.url).await?;
    let mut run = Run {
        cfg,
        plane,
        http,
        usage,
        obs,
        fleet: None,
        tenants: Vec::new(),
        phases: Vec::new(),
        checks: Vec::new(),
        goals: Vec::new(),
        metrics0,
    };
    run.bringup().await?;
    for s in run.cfg.scenarios.clone() {
        match s {
            Scenario::Bringup => {}
            Scenario::Density => run.density().await?,
            Scenario::Churn => run.churn().await?,
            Scenario::Loss => run.loss().await?,
        }
    }
    run.report().await
}

fn check(checks: &mut Vec<Check>, name: &str, ok: bool, detail: String) {
    if !ok {
        eprintln!("  CHECK FAILED: {name}: {detail}");
    }
    checks.push(Check {
        name: name.into(),
        ok,
        detail,
    });
}

/// The longest the latency phase waits for the server to settle after density.
const SETTLE_MAX: Duration = Duration::from_secs(180);

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

impl Run {
    fn fleet(&mut self) -> &mut Fleet {
        self.fleet.as_mut().expect("bring-up runs first")
    }

    async fn begin(&self, name: &str) -> Result<Begun> {
        eprintln!("==> {name}");
        self.usage.phase_start();
        let _ = self.obs.lock().take_samples();
        Ok(Begun {
            at: Instant::now(),
            metrics: metrics::scrape(&self.http, &self.plane.url).await?,
        })
    }

    async fn end(&mut self, name: &str, b: Begun, details: serde_json::Value) -> Result<()> {
        let seconds = secs(b.at.elapsed());
        let after = metrics::scrape(&self.http, &self.plane.url).await?;
        let (samples, observer_relists) = {
            let mut st = self.obs.lock();
            let relists = st
                .relists
                .iter()
                .filter(|(at, _)| *at >= b.at)
                .map(|(_, took)| took.map_or(-1.0, secs))
                .collect();
            (st.take_samples(), relists)
        };
        let phase = Phase {
            name: name.into(),
            seconds,
            pod_startup: samples.startup,
            pod_scheduling: samples.scheduling,
            watch_lag: samples.lag,
            observer_relists,
            api: metrics::delta(&b.metrics, &after),
            processes: self.usage.phase(),
            details,
        };
        eprintln!(
            "    {name} done in {seconds:.1}s; {:.0} MiB resident in total",
            self.usage.now_mib()
        );
        self.phases.push(phase);
        Ok(())
    }

    async fn bringup(&mut self) -> Result<()> {
        let b = self.begin("bringup").await?;
        let n = self.cfg.nodes;
        let fleet = Fleet::start(&self.cfg, &self.plane.regions).await?;
        let stats = fleet.stats.clone();
        self.fleet = Some(fleet);
        let t0 = b.at;
        let reg_deadline = t0 + self.cfg.step_timeout;
        while (stats.registered.load(Ordering::Relaxed) as usize) < n {
            if Instant::now() > reg_deadline {
                return Err(SimError::Timeout(format!(
                    "{} of {n} nodes registered",
                    stats.registered.load(Ordering::Relaxed)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let registered = t0.elapsed();
        self.obs
            .wait(
                "bringup",
                self.cfg.step_timeout,
                |s| s.ready >= n,
                |s| format!("{} of {n} nodes Ready in the global API", s.ready),
            )
            .await?;
        let ready = t0.elapsed();
        // Stay Ready at the heartbeat: hold three periods and watch for any drop.
        let hold = (self.cfg.heartbeat * 3).max(Duration::from_secs(10));
        eprintln!(
            "  all {n} nodes Ready after {:.1}s; holding {}s at {}s heartbeats",
            ready.as_secs_f64(),
            hold.as_secs(),
            self.cfg.heartbeat.as_secs()
        );
        let h0 = stats.heartbeats.load(Ordering::Relaxed);
        let e0 = stats.errors.load(Ordering::Relaxed);
        let t = Instant::now();
        let mut min_ready = n;
        while t.elapsed() < hold {
            min_ready = min_ready.min(self.obs.lock().ready);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let beats =
            (stats.heartbeats.load(Ordering::Relaxed) - h0) as f64 / t.elapsed().as_secs_f64();
        let errors = stats.errors.load(Ordering::Relaxed) - e0;
        check(
            &mut self.checks,
            "bringup: every node Ready and staying Ready",
            min_ready == n && errors == 0,
            format!(
                "{min_ready} of {n} Ready at the lowest over {}s; {errors} stream errors",
                hold.as_secs()
            ),
        );
        let details = json!({
            "nodes": n,
            "registered_s": secs(registered),
            "ready_s": secs(ready),
            "heartbeats_per_s": beats.round(),
            "min_ready_during_hold": min_ready,
            "stream_errors": errors,
        });
        self.end("bringup", b, details).await
    }

    async fn make_tenants(&mut self) -> Result<()> {
        if !self.tenants.is_empty() {
            return Ok(());
        }
        let gvk = GroupVersionKind::gvk("meridian.io", "v1alpha1", "Tenant");
        let tenants: Api<DynamicObject> = Api::all_with(
            self.plane.admin.clone(),
            &ApiResource::from_gvk_with_plural(&gvk, "tenants"),
        );
        for t in 0..self.cfg.tenants {
            let name = format!("sim-t{t:02}");
            let obj: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "meridian.io/v1alpha1", "kind": "Tenant",
                "metadata": {"name": name}, "spec": {}}))
            .map_err(|source| SimError::Json {
                what: "tenant".into(),
                source,
            })?;
            tenants
                .create(&PostParams::default(), &obj)
                .await
                .map_err(api(format!("creating tenant {name}")))?;
            let issued: serde_json::Value = tenants
                .create_subresource("token", &name, &PostParams::default(), &json!({}))
                .await
                .map_err(api(format!("issuing a token for tenant {name}")))?;
            let token = issued["status"]["token"].as_str().unwrap_or_default();
            let client = crate::observe::client(&self.plane.url, &self.plane.ca_pem, token).await?;
            self.tenants.push(Tenant {
                name,
                client,
                namespaces: Vec::new(),
                deployments: Vec::new(),
            });
        }
        for i in 0..self.cfg.namespaces {
            let t = &mut self.tenants[i % self.cfg.tenants];
            let ns = format!("ns-{i:03}");
            let nss: Api<Namespace> = Api::all(t.client.clone());
            let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))
                .map_err(|source| SimError::Json {
                    what: "namespace".into(),
                    source,
                })?;
            nss.create(&PostParams::default(), &obj)
                .await
                .map_err(api(format!("tenant {} creating namespace {ns}", t.name)))?;
            t.namespaces.push(ns);
        }
        Ok(())
    }

    async fn density(&mut self) -> Result<()> {
        let b = self.begin("density").await?;
        self.make_tenants().await?;
        let total = self.cfg.pods;
        let per_ns = self.cfg.deployments_per_namespace;
        let slots = self.cfg.namespaces * per_ns;
        // Every (namespace, deployment) slot gets total/slots replicas, the first
        // total%slots one more.
        let mut work = Vec::new();
        for i in 0..self.cfg.namespaces {
            let t = i % self.cfg.tenants;
            let ns = self.tenants[t].namespaces[i / self.cfg.tenants].clone();
            for d in 0..per_ns {
                let slot = i * per_ns + d;
                let replicas = total / slots + usize::from(slot < total % slots);
                if replicas == 0 {
                    continue;
                }
                let name = format!("app-{d}");
                self.tenants[t].deployments.push((ns.clone(), name.clone()));
                work.push((self.tenants[t].client.clone(), ns.clone(), name, replicas));
            }
        }
        let deployments = work.len();
        let t0 = Instant::now();
        let results: Vec<Result<()>> =
            futures::stream::iter(work)
                .map(|(client, ns, name, replicas)| async move {
                    let deps: Api<Deployment> = Api::namespaced(client, &ns);
                    let d: Deployment = serde_json::from_value(deployment(&name, replicas))
                        .map_err(|source| SimError::Json {
                            what: "deployment".into(),
                            source,
                        })?;
                    deps.create(&PostParams::default(), &d)
                        .await
                        .map_err(api(format!("creating deployment {ns}/{name}")))?;
                    Ok(())
                })
                .buffer_unordered(32)
                .collect()
                .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        let created = t0.elapsed();
        eprintln!(
            "  {deployments} Deployments ({total} replicas) created in {:.1}s",
            created.as_secs_f64()
        );
        let mut bound_at = None;
        let running = self
            .obs
            .wait(
                "density",
                self.cfg.step_timeout,
                |s| {
                    if s.density.1 >= total && bound_at.is_none() {
                        bound_at = Some(t0.elapsed());
                    }
                    s.density.2 >= total
                },
                |s| {
                    format!(
                        "{} pods created, {} bound, {} Running of {total}",
                        s.density.0, s.density.1, s.density.2
                    )
                },
            )
            .await?;
        let (existing, unknown, peak) = {
            let s = self.obs.lock();
            (s.density.0, s.bound_to_unknown.len(), s.density_peak)
        };
        check(
            &mut self.checks,
            "density: never more pods than replicas",
            peak <= total,
            format!("at most {peak} pods existed at once for {total} replicas"),
        );
        check(
            &mut self.checks,
            "density: every pod Running, exactly as many as asked",
            existing == total,
            format!(
                "{existing} pods for {total} replicas, all Running after {:.1}s",
                running.as_secs_f64()
            ),
        );
        check(
            &mut self.checks,
            "density: every pod bound to a node that exists",
            unknown == 0,
            format!("{unknown} node names bound to that no Node has"),
        );
        // Cluster-wide reads, timed from here (their server-side latency is in `api`).
        let list_pods = self.timed_list("/api/v1/pods").await?;
        let list_nodes = self.timed_list("/api/v1/nodes").await?;
        let details = json!({
            "deployments": deployments,
            "pods": total,
            "created_s": secs(created),
            "bound_s": bound_at.map(secs),
            "running_s": secs(running),
            "pods_per_s": (total as f64 / running.as_secs_f64()).round(),
            "peak_pods": peak,
            "list_all_pods_s": list_pods.0,
            "list_all_pods_mib": list_pods.1,
            "list_all_nodes_s": list_nodes.0,
        });
        self.goals.push(Goal {
            name: "density run time".into(),
            goal: "< 15 min".into(),
            measured: format!("{:.1} min", b.at.elapsed().as_secs_f64() / 60.0),
            met: b.at.elapsed() < Duration::from_secs(900),
        });
        self.end("density", b, details).await?;
        self.latency_pods().await
    }

    /// Pod startup as the Kubernetes SLO measures it: pods created at a steady,
    /// modest rate into the full cluster (after density's saturation, whose
    /// latencies are mostly queueing behind everything created at once).
    async fn latency_pods(&mut self) -> Result<()> {
        const PER_SECOND: f64 = 10.0;
        let pods_n = self.cfg.latency_pods;
        if pods_n == 0 {
            return Ok(());
        }
        // A cluster at steady state, as the SLO has it: after density the server
        // and the controllers can be a minute behind (watch lag p99 55 s at
        // 100,000 nodes); pods created meanwhile measure that backlog. Wait
        // (bounded) until five probes in a row come back within 500 ms.
        const CALM: usize = 5;
        self.obs.lock().calm_probes = 0;
        let settle = self
            .obs
            .wait(
                "settle",
                SETTLE_MAX,
                |s| s.calm_probes >= CALM,
                |s| format!("{} of {CALM} quick watch probes in a row", s.calm_probes),
            )
            .await;
        let (settle_s, settled) = match settle {
            Ok(d) => (secs(d), true),
            Err(_) => (secs(SETTLE_MAX), false),
        };
        let b = self.begin("latency").await?;
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / PER_SECOND));
        for i in 0..pods_n {
            tick.tick().await;
            let t = &self.tenants[i % self.tenants.len()];
            let ns = &t.namespaces[(i / self.tenants.len()) % t.namespaces.len()];
            let pods: Api<Pod> = Api::namespaced(t.client.clone(), ns);
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("latency-{i}"), "labels": {SIM_LABEL: "latency"}},
                "spec": {"containers": [{"name": "c", "image": "busybox",
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}))
            .map_err(|source| SimError::Json {
                what: "pod".into(),
                source,
            })?;
            pods.create(&PostParams::default(), &pod)
                .await
                .map_err(api(format!("creating latency pod {ns}/latency-{i}")))?;
        }
        let running = self
            .obs
            .wait(
                "latency",
                self.cfg.step_timeout,
                |s| s.latency.2 >= pods_n,
                |s| format!("{} of {pods_n} latency pods Running", s.latency.2),
            )
            .await?;
        // When each latency pod was created (s into the phase), and how long it
        // took to be bound and to be Running (ms): shows whether slow ones cluster.
        let timeline: Vec<[f64; 3]> = {
            let st = self.obs.lock();
            let ms = |d: Duration| (d.as_secs_f64() * 1000.0).round();
            st.timeline
                .iter()
                .filter(|(created, _, _)| *created >= b.at)
                .map(|&(created, bound, running)| {
                    [
                        secs(created - b.at),
                        bound.map_or(-1.0, |t| ms(t - created)),
                        ms(running - created),
                    ]
                })
                .collect()
        };
        let details = json!({"pods": pods_n, "per_second": PER_SECOND,
            "all_running_s": secs(running), "settle_s": settle_s, "settled": settled,
            "timeline": timeline});
        self.end("latency", b, details).await
    }

    /// An unpaged cluster-wide LIST: (seconds, MiB received).
    /// Times an unpaged LIST as a client reads it, counting the body's bytes as they
    /// arrive instead of holding them (at 1M pods the body is over a gigabyte, and
    /// keeping it would count against the simulator's own memory).
    async fn timed_list(&self, path: &str) -> Result<(f64, f64)> {
        let t = Instant::now();
        let what = || format!("listing {path}");
        let mut resp = self
            .http
            .get(format!("{}{path}", self.plane.url))
            .bearer_auth(&self.plane.admin_token)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|source| SimError::Http {
                what: what(),
                source,
            })?;
        let mut len = 0usize;
        while let Some(chunk) = resp.chunk().await.map_err(|source| SimError::Http {
            what: what(),
            source,
        })? {
            len += chunk.len();
        }
        Ok((
            (t.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
            (len as f64 / 1048576.0 * 10.0).round() / 10.0,
        ))
    }

    async fn churn(&mut self) -> Result<()> {
        let b = self.begin("churn").await?;
        self.make_tenants().await?;
        let n = self.cfg.nodes;
        let marks0 = self.obs.lock().marks.len();
        let end = Instant::now() + self.cfg.churn;
        let mut tasks = Vec::new();
        for t in &self.tenants {
            tasks.push(tokio::spawn(tenant_churn(
                t.client.clone(),
                t.namespaces.clone(),
                t.deployments.clone(),
                self.cfg.churn_rate,
                end,
            )));
        }
        // Flapping: every k-th node goes away for a little longer than the lease
        // timeout (it turns NotReady) and comes back, over and over.
        let every = (1.0 / self.cfg.flap_fraction.max(1e-9)).round().max(1.0) as usize;
        let flappers: Vec<usize> = if self.cfg.flap_fraction > 0.0 {
            (0..n).filter(|i| i % every == every / 2).collect()
        } else {
            Vec::new()
        };
        let down = self.cfg.lease_timeout + Duration::from_secs(5);
        let up = (self.cfg.heartbeat * 2).max(Duration::from_secs(10));
        let period = (down + up).as_millis() as u64;
        let offsets: Vec<u64> = flappers
            .iter()
            .map(|_| rand::random::<u64>() % period)
            .collect();
        let t0 = Instant::now();
        let mut flaps = 0u64;
        let mut min_ready = n;
        let mut last = Instant::now();
        while Instant::now() < end {
            let el = t0.elapsed().as_millis() as u64;
            for (k, &i) in flappers.iter().enumerate() {
                let want_down = (el + offsets[k]) % period < down.as_millis() as u64;
                let fleet = self.fleet();
                if want_down && fleet.is_up(i) {
                    fleet.down(i);
                    flaps += 1;
                } else if !want_down && !fleet.is_up(i) {
                    fleet.up(i);
                }
            }
            min_ready = min_ready.min(self.obs.lock().ready);
            if last.elapsed() >= Duration::from_secs(5) {
                last = Instant::now();
                let s = self.obs.lock();
                eprintln!(
                    "  churn {:>6.1}s: {} churn pods ({} Running), {} of {n} nodes Ready, {flaps} flaps",
                    t0.elapsed().as_secs_f64(),
                    s.churn.0,
                    s.churn.2,
                    s.ready
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut ops: BTreeMap<String, u64> = BTreeMap::new();
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        let mut samples = Vec::new();
        for t in tasks {
            let r = t
                .await
                .map_err(|e| SimError::Invalid(format!("a tenant's churn task failed: {e}")))?;
            for (k, v) in r.ops {
                *ops.entry(k).or_default() += v;
            }
            for (k, v) in r.errors {
                *errors.entry(k).or_default() += v;
            }
            samples.extend(r.samples);
        }
        for &i in &flappers {
            self.fleet().up(i);
        }
        let churned = t0.elapsed();
        self.obs
            .wait(
                "churn recovery",
                self.cfg.step_timeout,
                |s| s.ready >= n && s.churn.2 >= s.churn.0,
                |s| {
                    format!(
                        "{} of {n} nodes Ready, {} of {} churn pods Running",
                        s.ready, s.churn.2, s.churn.0
                    )
                },
            )
            .await?;
        let marks = self.obs.lock().marks.len() - marks0;
        let total_ops: u64 = ops.values().sum();
        let total_errors: u64 = errors.values().sum();
        check(
            &mut self.checks,
            "churn: every operation succeeded",
            total_errors == 0,
            format!(
                "{total_ops} operations, {total_errors} errors{}",
                samples
                    .first()
                    .map(|s| format!(" (first: {s})"))
                    .unwrap_or_default()
            ),
        );
        check(
            &mut self.checks,
            "churn: flapping nodes lose no pods (they return within the grace)",
            marks == 0,
            format!("{marks} pods marked for rescheduling"),
        );
        check(
            &mut self.checks,
            "churn: flapping nodes were seen NotReady",
            flappers.is_empty() || min_ready < n,
            format!(
                "lowest Ready count {min_ready} of {n}; {} flapping nodes",
                flappers.len()
            ),
        );
        let details = json!({
            "seconds": secs(churned),
            "tenants": self.tenants.len(),
            "ops_per_s": (total_ops as f64 / churned.as_secs_f64()).round(),
            "ops": ops,
            "errors": errors,
            "error_samples": samples.into_iter().take(5).collect::<Vec<_>>(),
            "flapping_nodes": flappers.len(),
            "flaps": flaps,
            "min_ready": min_ready,
            "pods_marked": marks,
        });
        self.end("churn", b, details).await
    }

    async fn loss(&mut self) -> Result<()> {
        let b = self.begin("loss").await?;
        let n = self.cfg.nodes;
        let grace = self.cfg.eviction_grace;
        let wait_out = self.cfg.lease_timeout + grace + self.cfg.loss_window;
        let want_running = self.obs.lock().density.0;

        // 1. A whole region's nodes vanish: inside that region it is 100% of the
        // nodes, a partition; nothing may be marked, ever.
        let lost: Vec<usize> = (0..n)
            .filter(|&i| self.fleet().nodes[i].region == 0)
            .collect();
        let region = self.plane.regions[0].name.clone();
        let (_, region_pods) = self.names_and_pods(&lost);
        let region_nodes = lost.len();
        eprintln!(
            "  region {region}: all {region_nodes} nodes ({region_pods} pods) disappear; watching {}s",
            wait_out.as_secs()
        );
        let marks0 = self.obs.lock().marks.len();
        let t = Instant::now();
        for &i in &lost {
            self.fleet().down(i);
        }
        let unknown_after = self
            .obs
            .wait(
                "region loss",
                self.cfg.lease_timeout * 3 + Duration::from_secs(60),
                |s| s.ready + lost.len() <= n,
                |s| format!("{} of {n} nodes Ready", s.ready),
            )
            .await?;
        while t.elapsed() < wait_out {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let region_marks = self.obs.lock().marks.len() - marks0;
        let back = self
            .bring_back(&lost, "region return", want_running)
            .await?;
        check(
            &mut self.checks,
            "loss: a whole region gone is a partition: no pod marked",
            region_marks == 0,
            format!(
                "{} nodes NotReady after {:.1}s, {region_marks} pods marked over {}s; back and Running {:.1}s after return",
                lost.len(),
                unknown_after.as_secs_f64(),
                wait_out.as_secs(),
                back.as_secs_f64()
            ),
        );

        // 2. 20% of every region's nodes vanish: below the partition threshold, so
        // after the grace their pods are marked at the configured rate and replaced.
        let every = (1.0 / self.cfg.loss_fraction.max(1e-9)).round().max(1.0) as usize;
        let regions = self.plane.regions.len();
        let lost: Vec<usize> = (0..n)
            .filter(|&i| (i / regions).is_multiple_of(every))
            .collect();
        let (names, pods_there) = self.names_and_pods(&lost);
        eprintln!(
            "  {} nodes ({:.0}% of every region, {pods_there} pods) disappear; watching {}s",
            lost.len(),
            self.cfg.loss_fraction * 100.0,
            wait_out.as_secs()
        );
        let marks0 = self.obs.lock().marks.len();
        let t = Instant::now();
        for &i in &lost {
            self.fleet().down(i);
        }
        while t.elapsed() < wait_out {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let marks: Vec<crate::observe::Mark> = self.obs.lock().marks[marks0..].to_vec();
        // Nodes by the first time one of their pods was marked.
        let mut first_by_node: BTreeMap<&str, Instant> = BTreeMap::new();
        for m in &marks {
            first_by_node.entry(m.node.as_str()).or_insert(m.at);
        }
        let outside = first_by_node
            .keys()
            .filter(|n| !names.contains(**n))
            .count();
        let first = marks.iter().map(|m| m.at).min();
        let last = marks.iter().map(|m| m.at).max();
        let early = first.is_some_and(|f| f.duration_since(t) < grace);
        let configured = self.cfg.eviction_rate * regions as f64;
        let span = match (first, last) {
            (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
            _ => 0.0,
        };
        let marked_nodes = first_by_node.len();
        let rate = if span > 0.0 {
            (marked_nodes.saturating_sub(1)) as f64 / span
        } else {
            0.0
        };
        // Each region's token bucket holds half a second's worth (at least one node):
        // never more than rate × time plus one full bucket per region.
        let bucket = (self.cfg.eviction_rate * 0.5).max(1.0).ceil();
        let bound = configured * span + regions as f64 * bucket + 1.0;
        check(
            &mut self.checks,
            "loss: no pod marked before the grace",
            !early,
            format!(
                "first mark {:.1}s after the loss (grace {}s)",
                first.map_or(0.0, |f| f.duration_since(t).as_secs_f64()),
                grace.as_secs()
            ),
        );
        check(
            &mut self.checks,
            "loss: pods of lost nodes are marked, at most at the configured rate",
            marked_nodes > 0 && (marked_nodes as f64) <= bound,
            format!(
                "{marked_nodes} nodes' pods ({} pods) marked over {span:.1}s: {rate:.1} nodes/s (configured {configured} nodes/s)",
                marks.len()
            ),
        );
        check(
            &mut self.checks,
            "loss: only lost nodes have pods marked",
            outside == 0,
            format!("{outside} healthy nodes had pods marked"),
        );
        // Replacements run elsewhere; then the lost nodes return.
        let replaced = self
            .obs
            .wait(
                "replacement",
                self.cfg.step_timeout,
                |s| s.density.2 >= want_running,
                |s| format!("{} of {want_running} pods Running", s.density.2),
            )
            .await?;
        let back = self.bring_back(&lost, "return", want_running).await?;
        let active = self.obs.lock().active(1);
        check(
            &mut self.checks,
            "loss: every workload back to full strength, replaced exactly once",
            active == want_running,
            format!(
                "{active} live pods for {want_running} replicas; all Running {:.1}s after the window, all nodes Ready {:.1}s after they returned",
                replaced.as_secs_f64(),
                back.as_secs_f64()
            ),
        );
        self.goals.push(Goal {
            name: "region loss: evictions before the grace".into(),
            goal: "0".into(),
            measured: format!("{}", region_marks + usize::from(early)),
            met: region_marks == 0 && !early,
        });
        self.goals.push(Goal {
            name: "region loss: eviction rate after the grace".into(),
            goal: format!(
                "{configured} nodes/s ({} per region)",
                self.cfg.eviction_rate
            ),
            measured: format!("{rate:.1} nodes/s"),
            met: marked_nodes > 0 && (marked_nodes as f64) <= bound,
        });
        let details = json!({
            "region": {"name": region, "nodes": region_nodes, "pods": region_pods,
                "not_ready_after_s": secs(unknown_after), "pods_marked": region_marks,
                "recovered_after_return_s": secs(back)},
            "scattered": {"nodes": lost.len(), "pods": pods_there,
                "first_mark_after_s": first.map(|f| secs(f.duration_since(t))),
                "nodes_marked": marked_nodes, "pods_marked": marks.len(),
                "nodes_per_s": (rate * 10.0).round() / 10.0, "configured_nodes_per_s": configured,
                "replaced_s": secs(replaced), "recovered_after_return_s": secs(back)},
        });
        self.end("loss", b, details).await
    }

    /// The names of these nodes and how many pods the watch shows on them.
    fn names_and_pods(&mut self, nodes: &[usize]) -> (HashSet<String>, usize) {
        let names: HashSet<String> = nodes
            .iter()
            .map(|&i| self.fleet().nodes[i].name.clone())
            .collect();
        let pods = self
            .obs
            .lock()
            .pods_on(&names.iter().map(String::as_str).collect());
        (names, pods)
    }

    /// Starts `nodes` again and waits until every node is Ready and `want_running`
    /// density pods run.
    async fn bring_back(
        &mut self,
        nodes: &[usize],
        what: &str,
        want_running: usize,
    ) -> Result<Duration> {
        for &i in nodes {
            self.fleet().up(i);
        }
        let n = self.cfg.nodes;
        self.obs
            .wait(
                what,
                self.cfg.step_timeout,
                |s| s.ready >= n && s.density.2 >= want_running,
                |s| {
                    format!(
                        "{} of {n} nodes Ready, {} of {want_running} pods Running",
                        s.ready, s.density.2
                    )
                },
            )
            .await
    }

    async fn report(self) -> Result<Report> {
        let after = metrics::scrape(&self.http, &self.plane.url).await?;
        let api = metrics::delta(&self.metrics0, &after);
        let (processes, total_rss) = self.usage.run();
        let mut goals = Vec::new();
        for (phase, name) in [
            (
                "latency",
                "pod startup p99 (10 pods/s into the full cluster, the SLO's measure)",
            ),
            (
                "density",
                "pod startup p99 (saturation: every Deployment created at once)",
            ),
        ] {
            if let Some(q) = self
                .phases
                .iter()
                .find(|p| p.name == phase)
                .and_then(|p| p.pod_startup.as_ref())
            {
                goals.push(Goal {
                    name: name.into(),
                    goal: "< 5 s".into(),
                    measured: format!("{:.2} s", q.p99_ms / 1000.0),
                    met: q.p99_ms < 5000.0,
                });
            }
        }
        let worst = |f: &dyn Fn(&crate::ApiLatency) -> bool| {
            api.iter()
                .filter(|l| f(l))
                .max_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms))
                .cloned()
        };
        let show = |l: &Option<crate::ApiLatency>| {
            l.as_ref().map_or("no calls".into(), |l| {
                format!("{:.0} ms ({} {})", l.p99_ms, l.verb, l.scope)
            })
        };
        type Pick = fn(&crate::ApiLatency) -> bool;
        let slos: [(&str, Pick, f64); 3] = [
            (
                "mutating API call p99 (worst verb and scope, single objects)",
                metrics::is_single_object_mutation,
                1000.0,
            ),
            (
                "read API call p99, single object",
                |l| l.verb == "get",
                1000.0,
            ),
            (
                "read API call p99, lists (namespace and cluster)",
                |l| l.verb == "list",
                30_000.0,
            ),
        ];
        for (name, pick, limit_ms) in slos {
            let w = worst(&pick);
            goals.push(Goal {
                name: name.into(),
                goal: format!("< {} s", limit_ms / 1000.0),
                measured: show(&w),
                met: w.as_ref().is_none_or(|l| l.p99_ms < limit_ms),
            });
        }
        goals.push(Goal {
            name: "total resident memory".into(),
            goal: "< 16 GiB".into(),
            measured: format!("{:.2} GiB", total_rss / 1024.0),
            met: total_rss < 16.0 * 1024.0,
        });
        goals.extend(self.goals.iter().cloned());
        let mut config = serde_json::to_value(&self.cfg).map_err(|source| SimError::Json {
            what: "config".into(),
            source,
        })?;
        for k in [
            "heartbeat",
            "start_delay",
            "churn",
            "lease_timeout",
            "eviction_grace",
            "loss_window",
            "step_timeout",
        ] {
            if let Some(v) = config.get_mut(k) {
                *v = json!(
                    v["secs"].as_u64().unwrap_or(0) as f64
                        + v["nanos"].as_u64().unwrap_or(0) as f64 / 1e9
                );
            }
        }
        let report = Report {
            date: jiff::Timestamp::now().to_string(),
            machine: machine(),
            config,
            phases: self.phases,
            processes,
            total_rss_peak_mib: total_rss,
            store_bytes: self.plane.store_bytes(),
            checks: self.checks,
            goals,
        };
        Ok(report)
    }
}

fn machine() -> crate::Machine {
    let mem_kb: f64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0);
    crate::Machine {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: (mem_kb / 1048576.0 * 10.0).round() / 10.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
    }
}

fn deployment(name: &str, replicas: usize) -> serde_json::Value {
    json!({
        "metadata": {"name": name, "labels": {SIM_LABEL: "density"}},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name, SIM_LABEL: "density"}}, "spec": {
                "topologySpreadConstraints": [{"topologyKey": CITY_LABEL, "maxSkew": 1,
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": {"app": name}}}],
                "containers": [{"name": "app", "image": "busybox",
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}},
    })
}

#[derive(Default)]
struct ChurnResult {
    ops: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    samples: Vec<String>,
}

/// One tenant's steady load, `rate` operations a second: in turn create a pod,
/// update a Deployment's annotations, and delete the oldest pod it created (or
/// create one while it has fewer than ten); every tenth operation also reads one
/// Deployment and every fiftieth lists a namespace's pods.
async fn tenant_churn(
    client: kube::Client,
    namespaces: Vec<String>,
    deployments: Vec<(String, String)>,
    rate: f64,
    end: Instant,
) -> ChurnResult {
    let mut r = ChurnResult::default();
    if rate <= 0.0 || namespaces.is_empty() {
        return r;
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut created: std::collections::VecDeque<(String, String)> = Default::default();
    let mut i = 0usize;
    let note = |r: &mut ChurnResult, verb: &str, res: Result<(), kube::Error>| {
        *r.ops.entry(verb.into()).or_default() += 1;
        if let Err(e) = res {
            *r.errors.entry(verb.into()).or_default() += 1;
            if r.samples.len() < 5 {
                r.samples.push(format!("{verb}: {e}"));
            }
        }
    };
    while Instant::now() < end {
        tick.tick().await;
        let ns = &namespaces[i % namespaces.len()];
        match i % 3 {
            // Each tenant keeps about ten churn pods alive, so they get to run.
            2 if created.len() >= 10 => {
                if let Some((dns, name)) = created.pop_front() {
                    let pods: Api<Pod> = Api::namespaced(client.clone(), &dns);
                    let res = pods
                        .delete(&name, &DeleteParams::default())
                        .await
                        .map(|_| ());
                    note(&mut r, "delete", res);
                }
            }
            1 if !deployments.is_empty() => {
                let (dns, d) = &deployments[i % deployments.len()];
                let api: Api<Deployment> = Api::namespaced(client.clone(), dns);
                let patch =
                    json!({"metadata": {"annotations": {"meridian.io/sim-touch": i.to_string()}}});
                let res = api
                    .patch(d, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .map(|_| ());
                note(&mut r, "patch", res);
            }
            _ => {
                let name = format!("churn-{i}");
                let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
                let pod = json!({"metadata": {"name": name, "labels": {SIM_LABEL: "churn"}},
                    "spec": {"terminationGracePeriodSeconds": 0, "containers": [{"name": "c", "image": "busybox",
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}});
                let res = match serde_json::from_value::<Pod>(pod) {
                    Ok(p) => pods.create(&PostParams::default(), &p).await.map(|_| ()),
                    Err(e) => Err(kube::Error::SerdeError(e)),
                };
                if res.is_ok() {
                    created.push_back((ns.clone(), name));
                }
                note(&mut r, "create", res);
            }
        }
        if i % 10 == 5 && !deployments.is_empty() {
            let (dns, d) = &deployments[i % deployments.len()];
            let api: Api<Deployment> = Api::namespaced(client.clone(), dns);
            let res = api.get(d).await.map(|_| ());
            note(&mut r, "get", res);
        }
        if i % 50 == 25 {
            let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
            let res = pods.list(&Default::default()).await.map(|_| ());
            note(&mut r, "list", res);
        }
        i += 1;
    }
    r
}
