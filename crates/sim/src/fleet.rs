//! The hollow fleet: every node a task in this process on a shared HTTP/2
//! connection to its region; stopping a node drops its stream, as a dead machine
//! or a cut link would.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use meridian_agent::hollow::{HollowConfig, HollowStats, run_node};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::plane::Region;
use crate::{Result, SimConfig, SimError};

pub const CITY_LABEL: &str = "topology.meridian.io/city";

pub struct Node {
    pub name: String,
    pub region: usize,
    channel: usize,
    cfg: HollowConfig,
    task: Option<JoinHandle<()>>,
}

pub struct Fleet {
    pub nodes: Vec<Node>,
    channels: Vec<Channel>,
    pub stats: Arc<HollowStats>,
}

impl Fleet {
    /// Connects and starts every node, paced so registrations do not pile up.
    pub async fn start(cfg: &SimConfig, regions: &[Region]) -> Result<Fleet> {
        let stats = Arc::new(HollowStats::default());
        let mut nodes = Vec::with_capacity(cfg.nodes);
        let mut per_region = vec![0usize; regions.len()];
        let mut channels = Vec::new();
        // (region, open channel index, nodes on it)
        let mut open: Vec<Option<(usize, usize)>> = vec![None; regions.len()];
        for i in 0..cfg.nodes {
            let r = i % regions.len();
            let k = per_region[r];
            per_region[r] += 1;
            let region = &regions[r];
            let city = region.cities[k % region.cities.len()];
            let channel = match open[r] {
                Some((c, n)) if n < cfg.nodes_per_connection => {
                    open[r] = Some((c, n + 1));
                    c
                }
                _ => {
                    let endpoint = format!("http://127.0.0.1:{}", region.port);
                    let ch = tonic::transport::Endpoint::from_shared(endpoint)
                        .map_err(|e| SimError::Invalid(format!("region endpoint: {e}")))?
                        .connect_lazy();
                    channels.push(ch);
                    open[r] = Some((channels.len() - 1, 1));
                    channels.len() - 1
                }
            };
            nodes.push(Node {
                name: format!("{}-{k:06}", region.name),
                region: r,
                channel,
                cfg: HollowConfig {
                    heartbeat: cfg.heartbeat,
                    start_delay: cfg.start_delay,
                    labels: vec![(CITY_LABEL.into(), meridian_api::geo::city_label(&city.name))],
                    coordinates: Some((city.lat, city.lon)),
                    ..Default::default()
                },
                task: None,
            });
        }
        let mut fleet = Fleet {
            nodes,
            channels,
            stats,
        };
        let started = Instant::now();
        let mut last = Instant::now();
        for i in 0..fleet.nodes.len() {
            fleet.up(i);
            // At most 20,000 registrations outstanding.
            while fleet.stats.registered.load(Ordering::Relaxed) as usize + 20_000 < i + 1 {
                if started.elapsed() > cfg.step_timeout {
                    return Err(SimError::Timeout("hollow nodes to register".into()));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if last.elapsed() > Duration::from_secs(5) {
                last = Instant::now();
                eprintln!(
                    "  bringup {:>6.1}s: {} nodes started, {} registered",
                    started.elapsed().as_secs_f64(),
                    i + 1,
                    fleet.stats.registered.load(Ordering::Relaxed)
                );
            }
        }
        Ok(fleet)
    }

    pub fn up(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if n.task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        n.task = Some(tokio::spawn(run_node(
            self.channels[n.channel].clone(),
            n.name.clone(),
            n.cfg.clone(),
            self.stats.clone(),
        )));
    }

    pub fn down(&mut self, i: usize) {
        if let Some(t) = self.nodes[i].task.take() {
            t.abort();
        }
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].task.is_some()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(t) = n.task.take() {
                t.abort();
            }
        }
    }
}
