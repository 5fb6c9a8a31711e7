//! Node lifecycle with edge autonomy.
//!
//! A node whose lease (last heartbeat) is older than `lease_timeout` becomes
//! `Ready=Unknown`; nothing happens to its pods then. Only after a grace (per node
//! or per workload, `never` allowed) are its pods marked for rescheduling
//! (`status.phase=Failed`, `reason=NodeLost`, condition `DisruptionTarget`), at most
//! `eviction_rate` nodes per second, and not at all while more than
//! `partition_threshold` of the region's nodes are unreachable together: that is a
//! partition (a cut uplink, a power event), not a mass failure, and moving every pod
//! would only make it worse.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use meridian_store::Txn;
use serde_json::json;

use crate::NODE_LOST;
use crate::state::{Health, LEASES_KEY, Shared, lock};

pub async fn run(shared: Arc<Shared>) {
    const TICK: Duration = Duration::from_millis(500);
    let mut tick = tokio::time::interval(TICK);
    // Token bucket: one node's worth of marking per 1/rate seconds. The bucket holds
    // one tick's worth (at least one node), so rates above one node per tick are
    // reached too, and never more.
    let burst = (shared.cfg.eviction_rate * TICK.as_secs_f64()).max(1.0);
    let mut tokens = 1.0f64;
    let mut last = Instant::now();
    loop {
        tick.tick().await;
        let now = Instant::now();
        tokens =
            (tokens + now.duration_since(last).as_secs_f64() * shared.cfg.eviction_rate).min(burst);
        last = now;
        check_leases(&shared, now);
        evict(&shared, now, &mut tokens).await;
    }
}

fn check_leases(shared: &Shared, now: Instant) {
    let timeout = shared.cfg.lease_timeout;
    let mut changed = Vec::new();
    {
        let mut nodes = lock(&shared.nodes);
        for (name, n) in nodes.iter_mut() {
            let expired = now.duration_since(n.last_seen) > timeout;
            match (n.health, expired) {
                (Health::Ready, true) => {
                    n.health = Health::Unknown;
                    n.unreachable_since = Some(now);
                    n.unreachable_since_wall = Some(jiff::Timestamp::now());
                    n.transition_wall = jiff::Timestamp::now();
                    tracing::warn!(node = %name, "lease expired: Ready=Unknown (pods untouched)");
                    changed.push(name.clone());
                }
                (Health::Unknown, false) => {
                    n.health = Health::Ready;
                    n.unreachable_since = None;
                    n.unreachable_since_wall = None;
                    n.transition_wall = jiff::Timestamp::now();
                    tracing::info!(node = %name, "heartbeats resumed: Ready=True");
                    changed.push(name.clone());
                }
                _ => {}
            }
        }
    }
    for name in changed {
        shared.mark_node_dirty(&name);
    }
}

/// The grace of a node: its annotation, or the region default. `None`: never.
fn node_grace(shared: &Shared, n: &crate::state::NodeEntry) -> Option<Duration> {
    n.node.grace.unwrap_or(Some(shared.cfg.eviction_grace))
}

/// Whether the global API still lists `node` under this region. A node the center
/// moved elsewhere is not ours to mark; `None` when the global API cannot say.
pub(crate) async fn still_ours(shared: &Shared, node: &str) -> Option<bool> {
    let owner = shared.owner_in_global(node).await?;
    Some(owner.is_none_or(|r| r == shared.cfg.name))
}

/// Drops a node that moved to another region, and its pods, from this region.
pub(crate) async fn forget(shared: &Shared, node: &str) {
    lock(&shared.nodes).remove(node);
    let uids: Vec<String> = {
        let mut pods = lock(&shared.pods);
        let uids: Vec<String> = pods
            .by_node
            .get(node)
            .map(|u| u.iter().cloned().collect())
            .unwrap_or_default();
        for u in &uids {
            pods.remove(u);
        }
        uids
    };
    let key = format!("{}{node}", crate::state::NODE_PREFIX);
    if let Err(e) = shared
        .store
        .txn(meridian_store::Txn::new().delete(key))
        .await
    {
        tracing::error!(%node, "cannot forget node: {e}");
    }
    shared.persist_pods(Vec::new(), uids).await;
    tracing::info!(%node, "node moved to another region: forgotten here, its pods untouched");
}

async fn evict(shared: &Shared, now: Instant, tokens: &mut f64) {
    // Unreachable nodes, longest first.
    let (total, mut candidates) = {
        let nodes = lock(&shared.nodes);
        let total = nodes.len();
        let c: Vec<(String, Instant, Option<Duration>, Option<jiff::Timestamp>)> = nodes
            .iter()
            .filter(|(_, n)| n.health == Health::Unknown)
            .filter_map(|(name, n)| {
                Some((
                    name.clone(),
                    n.unreachable_since?,
                    node_grace(shared, n),
                    n.unreachable_since_wall,
                ))
            })
            .collect();
        (total, c)
    };
    if total == 0 {
        return;
    }
    let fraction = candidates.len() as f64 / total as f64;
    let partitioned = fraction > shared.cfg.partition_threshold;
    if partitioned != shared.partitioned.swap(partitioned, Ordering::Relaxed) {
        if partitioned {
            tracing::warn!(
                unreachable = candidates.len(),
                total,
                "more than {:.0}% of the region's nodes are unreachable: treating it as a partition, no pod is marked for rescheduling",
                shared.cfg.partition_threshold * 100.0
            );
        } else {
            // As Kubernetes does on leaving full disruption: nodes still silent
            // get their grace afresh from now. Their clocks ran during the
            // partition; without this, a node a few seconds slower to reconnect
            // than the others had its pods marked the moment the partition ended.
            let mut restarted = 0;
            for n in lock(&shared.nodes).values_mut() {
                if n.health == Health::Unknown && n.unreachable_since.is_some() {
                    n.unreachable_since = Some(now);
                    restarted += 1;
                }
            }
            tracing::info!(
                still_unreachable = restarted,
                "partition over: node lifecycle resumes; the grace of nodes still unreachable starts now"
            );
            return;
        }
    }
    if partitioned {
        return;
    }
    candidates.sort_by_key(|c| c.1);
    for (node, since, grace, since_wall) in candidates {
        let down = now.duration_since(since);
        // Pods of this node whose own grace has passed and are not yet marked.
        let due: Vec<(String, String, String, Duration)> = {
            let mut hold = lock(&shared.evict_hold);
            hold.retain(|_, t| now < *t);
            let pods = lock(&shared.pods);
            pods.by_node
                .get(&node)
                .map(|uids| {
                    uids.iter()
                        .filter_map(|u| {
                            let p = pods.by_uid.get(u)?;
                            if p.gone || hold.contains_key(u) {
                                return None;
                            }
                            let g = match p.grace {
                                Some(g) => g?,
                                None => grace?,
                            };
                            (down >= g).then(|| (u.clone(), p.namespace.clone(), p.name.clone(), g))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        if due.is_empty() {
            continue;
        }
        if *tokens < 1.0 {
            return; // rate limit: the rest waits for the next token
        }
        // The center may have moved the node to another region meanwhile.
        match still_ours(shared, &node).await {
            Some(true) => {}
            Some(false) => {
                forget(shared, &node).await;
                continue;
            }
            None => return, // cannot tell now: mark nothing, ask again next round
        }
        *tokens -= 1.0;
        let since_text = since_wall.map(|t| t.to_string()).unwrap_or_default();
        tracing::warn!(%node, pods = due.len(), "marking pods of unreachable node for rescheduling");
        let mut changed = Vec::new();
        {
            let mut pods = lock(&shared.pods);
            let mut up = lock(&shared.upload);
            let now_text = jiff::Timestamp::now().to_string();
            for (uid, ns, name, g) in due {
                if let Some(p) = pods.by_uid.get_mut(&uid) {
                    p.gone = true;
                    p.marked = true;
                }
                let message = format!(
                    "node {node} unreachable since {since_text}, longer than the {}s grace; marked for rescheduling",
                    g.as_secs()
                );
                let status = json!({
                    "phase": "Failed",
                    "reason": NODE_LOST,
                    "message": message,
                    "conditions": [
                        {"type": "DisruptionTarget", "status": "True", "reason": "NodeUnreachable",
                         "message": message, "lastTransitionTime": now_text},
                        {"type": "Ready", "status": "False", "reason": "NodeLost", "lastTransitionTime": now_text},
                    ],
                });
                up.statuses.insert(uid.clone(), (ns, name, status));
                changed.push(uid);
            }
        }
        shared.metrics.evictions.inc_by(changed.len() as u64);
        shared.upload_notify.notify_one();
    }
}

/// Writes every node's lease (last heartbeat, wall-clock ms) to the region store as
/// one record every few seconds, so a restarted region knows how long each node has
/// been silent. One record per checkpoint, not one write per heartbeat: heartbeats
/// stay in memory. Old revisions are compacted away.
pub async fn checkpoint_leases(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    let mut rounds = 0u64;
    loop {
        tick.tick().await;
        let now = Instant::now();
        let wall = jiff::Timestamp::now().as_millisecond();
        let leases: std::collections::BTreeMap<String, i64> = {
            let nodes = lock(&shared.nodes);
            nodes
                .iter()
                .map(|(name, e)| {
                    (
                        name.clone(),
                        wall - now.duration_since(e.last_seen).as_millis() as i64,
                    )
                })
                .collect()
        };
        let Ok(blob) = serde_json::to_vec(&leases) else {
            continue;
        };
        match shared.store.txn(Txn::new().put(LEASES_KEY, blob)).await {
            Ok(r) => {
                rounds += 1;
                if rounds.is_multiple_of(6)
                    && let Err(e) = shared.store.compact(r.revision).await
                {
                    tracing::warn!("region store compaction: {e}");
                }
            }
            Err(e) => tracing::error!("lease checkpoint failed: {e}"),
        }
    }
}
