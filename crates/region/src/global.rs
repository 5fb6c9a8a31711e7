//! Everything between the region and the global API, through the `kube` crate.
//! Every loop tolerates the global API being away: the region keeps serving its
//! agents from its cache, and what should go up waits and is sent when it returns.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Event, Node, NodeCondition, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;

use crate::NODE_LOST;
use crate::state::{CachedPod, Health, Shared, lock};

pub fn edgecluster_resource() -> ApiResource {
    ApiResource {
        group: "meridian.io".into(),
        version: "v1alpha1".into(),
        api_version: "meridian.io/v1alpha1".into(),
        kind: "EdgeCluster".into(),
        plural: "edgeclusters".into(),
    }
}

pub fn spawn(shared: Arc<Shared>) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(edgecluster_loop(shared.clone())),
        tokio::spawn(watch_pods(shared.clone())),
        tokio::spawn(upload_loop(shared.clone())),
        tokio::spawn(node_loop(shared.clone())),
        tokio::spawn(summary_loop(shared)),
    ]
}

/// Registers the region's EdgeCluster and keeps its status fresh.
async fn edgecluster_loop(shared: Arc<Shared>) {
    let ar = edgecluster_resource();
    let api: Api<DynamicObject> = Api::all_with(shared.client.clone(), &ar);
    let name = shared.cfg.name.clone();
    let mut registered = false;
    let mut reported = true;
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        if !registered {
            let obj = json!({
                "apiVersion": ar.api_version, "kind": ar.kind,
                "metadata": {"name": name, "labels": shared.cfg.labels},
                "spec": {"endpoint": shared.cfg.endpoint()},
            });
            let obj: DynamicObject = match serde_json::from_value(obj) {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!("EdgeCluster object: {e}");
                    continue;
                }
            };
            let res = match api.create(&PostParams::default(), &obj).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    let patch = json!({"metadata": {"labels": shared.cfg.labels}, "spec": {"endpoint": shared.cfg.endpoint()}});
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                        .await
                        .map(|_| ())
                }
                Err(e) => Err(e),
            };
            match res {
                Ok(()) => {
                    registered = true;
                    shared.global_ok.store(true, Ordering::Relaxed);
                    tracing::info!(region = %name, "EdgeCluster registered");
                }
                Err(e) => {
                    shared.global_ok.store(false, Ordering::Relaxed);
                    tracing::warn!("cannot register EdgeCluster (will retry): {e}");
                    continue;
                }
            }
        }
        let status = cluster_status(&shared);
        match api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
        {
            Ok(_) => {
                if !reported {
                    // Back after a gap: the global plane may have marked our nodes
                    // Unknown meanwhile (region watchdog); rewrite them all.
                    let all: Vec<String> = lock(&shared.nodes).keys().cloned().collect();
                    lock(&shared.upload).nodes.extend(all);
                    shared.upload_notify.notify_one();
                }
                reported = true;
                shared.global_ok.store(true, Ordering::Relaxed);
            }
            Err(kube::Error::Api(s)) if s.code == 404 => registered = false,
            Err(e) => {
                reported = false;
                shared.global_ok.store(false, Ordering::Relaxed);
                tracing::debug!("EdgeCluster status: {e}");
            }
        }
    }
}

fn cluster_status(shared: &Shared) -> serde_json::Value {
    let (count, ready, connected, cpu, mem) = {
        let nodes = lock(&shared.nodes);
        let ready = nodes.values().filter(|n| n.health == Health::Ready).count();
        let connected = nodes.values().filter(|n| n.session.is_some()).count();
        let (mut cpu, mut mem) = (0i64, 0i64);
        for n in nodes.values() {
            cpu += n.node.cpu_millis;
            mem += n.node.memory_bytes;
        }
        (nodes.len(), ready, connected, cpu, mem)
    };
    let pods = lock(&shared.pods).by_uid.len();
    let partitioned = shared.partitioned.load(Ordering::Relaxed);
    json!({
        "phase": if partitioned { "Partitioned" } else { "Ready" },
        "nodes": count,
        "readyNodes": ready,
        "unreachableNodes": count - ready,
        "connectedAgents": connected,
        "pods": pods,
        "capacity": {"cpu": format!("{cpu}m"), "memory": mem.to_string()},
        "lastHeartbeatTime": jiff::Timestamp::now().to_string(),
    })
}

fn is_ours(shared: &Shared, node: &str) -> bool {
    lock(&shared.nodes).contains_key(node)
}

/// Watches the pods on this region's nodes (`meridian.io/region=<name>`, a field
/// the global API derives from the pod's node), keeps the ones on nodes it
/// manages, and pushes each affected node's desired set. Resumes by
/// resourceVersion; relists when told to. Against a global API without that
/// field it watches every bound pod and drops the others, as before.
async fn watch_pods(shared: Arc<Shared>) {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let own = format!("{}={}", crate::REGION_LABEL, shared.cfg.name);
    let mut stream = watcher(
        api.clone(),
        watcher::Config::default()
            .fields(&own)
            .page_size(meridian_api::POD_LIST_PAGE),
    )
    .boxed();
    let mut init: Option<HashSet<String>> = None;
    // An error met while draining a batch, handled first on the next turn.
    let mut pending = None;
    let mut last_slow: Option<Instant> = None;
    loop {
        let next = match pending.take() {
            Some(r) => r,
            None => stream.try_next().await,
        };
        let first = match next {
            Ok(Some(ev)) => ev,
            Ok(None) => return,
            Err(watcher::Error::InitialListFailed(kube::Error::Api(s)))
                if s.code == 400 && s.message.contains("field label not supported") =>
            {
                tracing::warn!(
                    "the global API cannot select pods by region ({}); watching every bound pod",
                    s.message
                );
                let every = watcher::Config::default()
                    .fields("spec.nodeName!=")
                    .page_size(meridian_api::POD_LIST_PAGE);
                stream = watcher(api.clone(), every).boxed();
                continue;
            }
            Err(e) => {
                shared.global_ok.store(false, Ordering::Relaxed);
                tracing::warn!("pod watch (serving from cache, retrying): {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        shared.global_ok.store(true, Ordering::Relaxed);
        // Every event already received goes into one batch: one write to the
        // region's store and one push per node for all of them. (One store commit
        // per event held a region to a few hundred events a second; its watch fell
        // behind the server's event window and relisted.)
        let mut batch = vec![first];
        while batch.len() < WATCH_BATCH {
            match stream.try_next().now_or_never() {
                Some(Ok(Some(ev))) => batch.push(ev),
                Some(other) => {
                    pending = Some(other);
                    break;
                }
                None => break,
            }
        }
        let began = Instant::now();
        let events = batch.len();
        let mut touched = HashSet::new();
        let mut puts = Vec::new();
        let mut deletes = Vec::new();
        for ev in batch {
            apply_event(
                &shared,
                ev,
                &mut init,
                &mut touched,
                &mut puts,
                &mut deletes,
            );
        }
        let applied = began.elapsed();
        shared.persist_pods(puts, deletes).await;
        let persisted = began.elapsed();
        let nodes = touched.len();
        for node in touched {
            shared.push_desired(&node);
        }
        // A pod bound meanwhile waits for this batch: say when one is slow.
        let took = began.elapsed();
        if took >= SLOW_BATCH && last_slow.is_none_or(|t| t.elapsed() >= SLOW_REPORT_EVERY) {
            last_slow = Some(Instant::now());
            tracing::warn!(
                events,
                nodes,
                apply_ms = applied.as_millis(),
                persist_ms = (persisted - applied).as_millis(),
                push_ms = (took - persisted).as_millis(),
                "a batch of pod watch events took {} ms",
                took.as_millis()
            );
        }
    }
}

/// A watch batch slower than this is reported (at most every
/// [`SLOW_REPORT_EVERY`]).
const SLOW_BATCH: Duration = Duration::from_secs(1);
const SLOW_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Most pod watch events applied (and persisted) together.
const WATCH_BATCH: usize = 2_000;

fn apply_event(
    shared: &Shared,
    ev: watcher::Event<Pod>,
    init: &mut Option<HashSet<String>>,
    touched: &mut HashSet<String>,
    puts: &mut Vec<(String, bytes::Bytes)>,
    deletes: &mut Vec<String>,
) {
    match ev {
        watcher::Event::Init => *init = Some(HashSet::new()),
        watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
            if let Some(seen) = init.as_mut()
                && let Some(uid) = &pod.metadata.uid
            {
                seen.insert(uid.clone());
            }
            apply_pod(shared, &pod, touched, puts, deletes);
        }
        watcher::Event::Delete(pod) => {
            if let Some(uid) = &pod.metadata.uid
                && let Some(node) = lock(&shared.pods).remove(uid)
            {
                touched.insert(node);
                deletes.push(uid.clone());
            }
        }
        watcher::Event::InitDone => {
            if let Some(seen) = init.take() {
                let mut pods = lock(&shared.pods);
                let stale: Vec<String> = pods
                    .by_uid
                    .keys()
                    .filter(|u| !seen.contains(*u))
                    .cloned()
                    .collect();
                for uid in stale {
                    if let Some(node) = pods.remove(&uid) {
                        touched.insert(node);
                        deletes.push(uid);
                    }
                }
            }
        }
    }
}

fn apply_pod(
    shared: &Shared,
    pod: &Pod,
    touched: &mut HashSet<String>,
    puts: &mut Vec<(String, bytes::Bytes)>,
    deletes: &mut Vec<String>,
) {
    let Some((uid, cached)) = CachedPod::from_pod(pod) else {
        return;
    };
    // Lock order (see `state::lock`): nodes before pods, never both here.
    let ours = is_ours(shared, &cached.node);
    let mut pods = lock(&shared.pods);
    if !ours {
        if let Some(old) = pods.remove(&uid) {
            touched.insert(old);
            deletes.push(uid);
        }
        return;
    }
    // Status-only changes (most of them are our own uploads) do not change what the
    // agent should run: skip the push when the desired view is unchanged.
    let unchanged = pods.by_uid.get(&uid).is_some_and(|old| {
        old.gone == cached.gone && old.node == cached.node && old.desired == cached.desired
    });
    puts.push((uid.clone(), cached.json.clone()));
    let node = cached.node.clone();
    let mut cached = cached;
    // The pod spec's references cannot change: keep what was resolved.
    if let Some(old) = pods.by_uid.get(&uid) {
        cached.refs = old.refs.clone();
    }
    if let Some(old) = pods.insert(uid.clone(), cached)
        && old != node
    {
        touched.insert(old);
    }
    drop(pods);
    crate::refs::enqueue_if_needed(shared, &uid, pod);
    if !unchanged {
        touched.insert(node);
    }
}

/// Picks up a newly registered node's pods at once (the watch only keeps pods of
/// nodes it already knew).
pub async fn fetch_node_pods(shared: &Arc<Shared>, node: &str) {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let list = match tokio::time::timeout(Duration::from_secs(5), api.list(&lp)).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            tracing::warn!(
                node,
                "cannot list the node's pods (the watch will catch up): {e}"
            );
            return;
        }
        Err(_) => return,
    };
    let (mut touched, mut puts, mut deletes) = (HashSet::new(), Vec::new(), Vec::new());
    for pod in &list.items {
        apply_pod(shared, pod, &mut touched, &mut puts, &mut deletes);
    }
    shared.persist_pods(puts, deletes).await;
}

/// Writes Node changes (registrations, transitions, summaries) up, in a loop of
/// their own: at 100,000 nodes a region has ~70 summaries a second to write, and
/// pod statuses queued behind them in one loop (steady-rate pod startup p99 8.6 s
/// at 100,000 nodes against 4.5 s at 30,000).
async fn node_loop(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let nodes = std::mem::take(&mut lock(&shared.upload).nodes);
        if !nodes.is_empty() {
            write_nodes(&shared, nodes).await;
        }
    }
}

/// Sends pod status (batched, latest wins) and events up.
async fn upload_loop(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.upload_notify.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        // Let a burst accumulate into one batch.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (statuses, events) = {
            let mut up = lock(&shared.upload);
            (
                std::mem::take(&mut up.statuses),
                std::mem::take(&mut up.events),
            )
        };
        if !statuses.is_empty() {
            upload_statuses(&shared, statuses).await;
        }
        if !events.is_empty() {
            upload_events(&shared, events).await;
        }
    }
}

/// Pod statuses in one `bulkpodstatuses` request (the server takes up to 1,000; a
/// smaller batch keeps each call well under the 1 s mutating-call SLO), and
/// how many such requests are in flight at once.
const STATUS_BATCH: usize = 200;
const STATUS_REQUESTS: usize = 4;

/// What became of one pod's status upload.
#[derive(Clone, Debug, PartialEq)]
enum Uploaded {
    Done,
    /// Refused for now (a network error, a busy server): send it again.
    Retry,
    /// Risk control refused the eviction it carries, for this many seconds.
    Refused(u32, String),
}

/// One item's outcome in a `bulkpodstatuses` answer.
fn uploaded(item: &serde_json::Value) -> Uploaded {
    if item["status"] == "Success" {
        return Uploaded::Done;
    }
    let details = &item["details"];
    let risk = details["causes"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["reason"] == "RiskPolicy"));
    if risk {
        let secs = details["retryAfterSeconds"].as_u64().unwrap_or(0);
        let why = item["message"].as_str().unwrap_or_default().to_owned();
        return Uploaded::Refused(u32::try_from(secs).unwrap_or(u32::MAX), why);
    }
    match item["code"].as_u64() {
        // The pod is gone or was replaced, or the status is refused: nothing to retry.
        Some(404 | 409 | 422 | 400) => Uploaded::Done,
        _ => Uploaded::Retry,
    }
}

/// Sends pod statuses up in bulk: `STATUS_BATCH` to a request, each applied by
/// the server as a merge patch of that pod's status (a `patch` per pod was most of
/// the server's work while a fleet's pods started).
async fn upload_statuses(
    shared: &Arc<Shared>,
    statuses: std::collections::HashMap<String, (String, String, serde_json::Value)>,
) {
    let n = statuses.len();
    /// A pod's uid and (namespace, name, status).
    type Item = (String, (String, String, serde_json::Value));
    let batches = in_batches::<Item>(statuses, STATUS_BATCH);
    type Outcome = (String, (String, String, serde_json::Value), Uploaded);
    let results: Vec<Vec<Outcome>> = futures::stream::iter(batches)
        .map(|batch| {
            let client = shared.client.clone();
            async move {
                let items: Vec<serde_json::Value> = batch
                    .iter()
                    .map(|(_, (ns, name, status))| {
                        json!({"namespace": ns, "name": name, "status": status})
                    })
                    .collect();
                let answer = match bulk_statuses(&client, "bulkpodstatuses", &items).await {
                    // A server without the endpoint (an older version during an
                    // upgrade): one patch per pod, as before it.
                    Err(kube::Error::Api(s)) if matches!(s.code, 404 | 405) => {
                        let mut each = Vec::with_capacity(items.len());
                        for (_, (ns, name, status)) in &batch {
                            each.push(patch_status(&client, ns, name, status).await);
                        }
                        Ok(each)
                    }
                    Err(e) => Err(e),
                    Ok(a) => Ok(a.iter().map(uploaded).collect()),
                };
                batch
                    .into_iter()
                    .enumerate()
                    .map(|(i, (uid, v))| {
                        let outcome = match &answer {
                            Ok(a) => a.get(i).cloned().unwrap_or(Uploaded::Retry),
                            Err(e) => {
                                tracing::debug!("pod status upload: {e}");
                                Uploaded::Retry
                            }
                        };
                        (uid, v, outcome)
                    })
                    .collect()
            }
        })
        .buffer_unordered(STATUS_REQUESTS)
        .collect()
        .await;
    let mut failed = 0;
    let mut refused = Vec::new();
    {
        // Lock order (see `state::lock`): evict_hold, pods, upload.
        let mut hold = lock(&shared.evict_hold);
        let mut pods = lock(&shared.pods);
        let mut up = lock(&shared.upload);
        for (uid, v, outcome) in results.into_iter().flatten() {
            match outcome {
                Uploaded::Done => {}
                Uploaded::Refused(secs, why) => {
                    // Not lost after all, for now: try again after the refusal's
                    // retry time (at least 5 s, at most 30 s, so a changed policy is
                    // seen soon).
                    if let Some(p) = pods.by_uid.get_mut(&uid) {
                        p.gone = false;
                        p.marked = false;
                    }
                    let wait = Duration::from_secs(u64::from(secs).clamp(5, 30));
                    hold.insert(uid.clone(), Instant::now() + wait);
                    refused.push((v.0, v.1, uid, why));
                }
                Uploaded::Retry => {
                    failed += 1;
                    // A newer status may have arrived meanwhile; it wins.
                    up.statuses.entry(uid).or_insert(v);
                }
            }
        }
    }
    for (ns, name, uid, why) in refused {
        eviction_refused(&shared.client, &ns, &name, &uid, &why).await;
    }
    shared.metrics.status_uploads.inc_by((n - failed) as u64);
    if failed > 0 {
        shared.global_ok.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One pod's status as a merge patch of its `status` subresource.
async fn patch_status(
    client: &kube::Client,
    ns: &str,
    name: &str,
    status: &serde_json::Value,
) -> Uploaded {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let patch = json!({ "status": status });
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Uploaded::Done,
        Err(kube::Error::Api(s)) => uploaded(&serde_json::to_value(&s).unwrap_or_default()),
        Err(e) => {
            tracing::debug!(%ns, %name, "pod status upload: {e}");
            Uploaded::Retry
        }
    }
}

/// One `bulkpodstatuses` (or `bulknodestatuses`) request: each item's outcome,
/// in order.
async fn bulk_statuses(
    client: &kube::Client,
    plural: &str,
    items: &[serde_json::Value],
) -> Result<Vec<serde_json::Value>, kube::Error> {
    let body = serde_json::to_vec(&json!({ "items": items })).map_err(kube::Error::SerdeError)?;
    let path = format!(
        "/apis/{}/{}/{plural}",
        meridian_api::meridian::GROUP,
        meridian_api::meridian::VERSION
    );
    let req = http::Request::post(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(kube::Error::HttpError)?;
    let mut answer: serde_json::Value = client.request(req).await?;
    match answer.get_mut("items").map(serde_json::Value::take) {
        Some(serde_json::Value::Array(items)) => Ok(items),
        _ => Ok(Vec::new()),
    }
}

/// A Warning Event on a pod whose eviction risk control refused.
async fn eviction_refused(client: &kube::Client, ns: &str, name: &str, uid: &str, why: &str) {
    tracing::warn!(%ns, %name, "eviction refused by risk control: {why}");
    let ev = meridian_api::events::pod_event(
        meridian_api::events::PodRef {
            namespace: ns,
            name,
            uid: Some(uid),
        },
        "meridian-region",
        None,
        true,
        "EvictionRefused",
        why,
    );
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let _ = api.create(&PostParams::default(), &ev).await;
}

async fn upload_events(shared: &Arc<Shared>, events: Vec<(String, meridian_proto::PodEvent)>) {
    let _now = jiff::Timestamp::now();
    futures::stream::iter(events)
        .for_each_concurrent(16, |(node, e)| {
            let client = shared.client.clone();
            async move {
                let api: Api<Event> = Api::namespaced(client, &e.namespace);
                let pod = meridian_api::events::PodRef {
                    namespace: &e.namespace,
                    name: &e.name,
                    uid: Some(&e.uid),
                };
                let warning = e.r#type == "Warning";
                let ev = meridian_api::events::pod_event(
                    pod,
                    "meridian-agent",
                    Some(node),
                    warning,
                    &e.reason,
                    &e.message,
                );
                if let Err(err) = api.create(&PostParams::default(), &ev).await {
                    tracing::debug!(pod = %e.name, "event upload: {err}");
                }
            }
        })
        .await;
}

fn ready_condition(e: &crate::state::NodeEntry) -> NodeCondition {
    let (status, reason, message) = match e.health {
        Health::Ready => (
            "True",
            "AgentReady",
            "the agent is posting heartbeats".to_owned(),
        ),
        Health::Unknown => (
            "Unknown",
            "NodeStatusUnknown",
            format!(
                "the agent stopped posting heartbeats (since {})",
                e.unreachable_since_wall
                    .map(|t| t.to_string())
                    .unwrap_or_default()
            ),
        ),
    };
    NodeCondition {
        type_: "Ready".into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_heartbeat_time: Some(Time(jiff::Timestamp::now())),
        last_transition_time: Some(Time(e.transition_wall)),
    }
}

/// Creates or updates Node objects (registrations, transitions, summaries).
async fn write_nodes(shared: &Arc<Shared>, names: HashSet<String>) {
    let tls = shared.cfg.tls.is_some();
    let work: Vec<(String, Node, bool, bool, bool)> = {
        let nodes = lock(&shared.nodes);
        names
            .into_iter()
            .filter_map(|name| {
                let e = nodes.get(&name)?;
                let mut node = e.node.to_node();
                let status = node.status.get_or_insert_with(Default::default);
                status.conditions = Some(vec![ready_condition(e)]);
                if let Some(u) = &e.usage {
                    let a = node.metadata.annotations.get_or_insert_with(BTreeMap::new);
                    a.insert(
                        "meridian.io/usage".into(),
                        format!(
                            "cpu={}m,memory={},disk={}",
                            u.cpu_millis, u.memory_bytes, u.disk_bytes
                        ),
                    );
                }
                // With a center, nodes move between regions: a node that is not
                // connected here may belong to another region by now. Asked once
                // per first write and per loss, not per summary.
                let verify =
                    tls && e.session.is_none() && (!e.created || e.health != Health::Ready);
                // Unchanged annotations (a hollow or idle node's usage): status only.
                // At 100,000 nodes the summaries were two writes each, 3,300 a
                // second asked of the global API, more than it could take besides
                // the pods.
                let annotate = e.written_annotations.as_ref() != node.metadata.annotations.as_ref();
                Some((name, node, e.created, verify, annotate))
            })
            .collect()
    };
    // A summary (the Node exists here: its status, and its annotations when they
    // changed) goes up in bulk; registrations and adoptions one by one.
    let (summaries, work): (Vec<_>, Vec<_>) = work
        .into_iter()
        .partition(|(_, _, created, verify, _)| *created && !*verify);
    let mut results = write_summaries(shared, summaries).await;
    let single: Vec<(String, Wrote, Option<Annotations>)> = futures::stream::iter(work)
        .map(|(name, node, created, verify, annotate)| {
            let client = shared.client.clone();
            let shared = shared.clone();
            async move {
                if verify && crate::lifecycle::still_ours(&shared, &name).await == Some(false) {
                    return (name, Wrote::Moved, None);
                }
                let api: Api<Node> = Api::all(client);
                let (wrote, annotated) = write_node(&api, &name, &node, created, annotate).await;
                let annotations = annotated.then(|| node.metadata.annotations.unwrap_or_default());
                (name, wrote, annotations)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results.extend(single);
    let mut failed = Vec::new();
    let mut moved = Vec::new();
    let mut adopted = Vec::new();
    {
        let mut nodes = lock(&shared.nodes);
        for (name, wrote, annotations) in results {
            if let Some(e) = nodes.get_mut(&name)
                && annotations.is_some()
            {
                e.written_annotations = annotations;
            }
            match wrote {
                Wrote::Written | Wrote::Adopted => {
                    if let Some(e) = nodes.get_mut(&name) {
                        e.created = true;
                    }
                    if wrote == Wrote::Adopted {
                        adopted.push(name);
                    }
                }
                Wrote::Failed => failed.push(name),
                Wrote::Moved => moved.push(name),
            }
        }
    }
    for name in moved {
        crate::lifecycle::forget(shared, &name).await;
    }
    // The pod watch sees a node's pods by the node's region label: pods written
    // while the label still named another region were missed. Read them now.
    for name in adopted {
        fetch_node_pods(shared, &name).await;
    }
    if !failed.is_empty() {
        shared.global_ok.store(false, Ordering::Relaxed);
        lock(&shared.upload).nodes.extend(failed);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `items` in consecutive batches of at most `n` (the bulk uploads' requests).
fn in_batches<T>(items: impl IntoIterator<Item = T>, n: usize) -> impl Iterator<Item = Vec<T>> {
    let mut all = items.into_iter();
    std::iter::from_fn(move || {
        let batch: Vec<T> = all.by_ref().take(n).collect();
        (!batch.is_empty()).then_some(batch)
    })
}

/// Node statuses in one `bulknodestatuses` request, and how many such requests
/// are in flight at once (as for pod statuses).
const NODE_BATCH: usize = 200;
const NODE_REQUESTS: usize = 2;

/// Writes the status of Nodes that exist, with their annotations where they
/// changed, `NODE_BATCH` to a `bulknodestatuses` request (one patch per node,
/// each a request and a whole Node in its answer, was the largest write load of
/// the global API at 100,000 nodes; a node's first summary, the first with its
/// usage, was two). A server without the endpoint gets single patches, as before
/// it.
async fn write_summaries(
    shared: &Arc<Shared>,
    summaries: Vec<(String, Node, bool, bool, bool)>,
) -> Vec<(String, Wrote, Option<Annotations>)> {
    let summaries = summaries
        .into_iter()
        .map(|(name, node, _, _, annotate)| (name, node, annotate));
    let batches = in_batches::<(String, Node, bool)>(summaries, NODE_BATCH);
    let done: Vec<Vec<(String, Wrote, Option<Annotations>)>> = futures::stream::iter(batches)
        .map(|batch| {
            let client = shared.client.clone();
            async move {
                let items: Vec<serde_json::Value> = batch
                    .iter()
                    .map(|(name, node, annotate)| {
                        let mut it = json!({"name": name, "status": node.status});
                        if *annotate {
                            it["annotations"] = json!(node.metadata.annotations);
                        }
                        it
                    })
                    .collect();
                let answer = match bulk_statuses(&client, "bulknodestatuses", &items).await {
                    Err(kube::Error::Api(s)) if matches!(s.code, 404 | 405) => {
                        let api: Api<Node> = Api::all(client);
                        let mut each = Vec::with_capacity(batch.len());
                        for (name, node, annotate) in batch {
                            let (wrote, annotated) =
                                write_node(&api, &name, &node, true, annotate).await;
                            let annotations =
                                annotated.then(|| node.metadata.annotations.unwrap_or_default());
                            each.push((name, wrote, annotations));
                        }
                        return each;
                    }
                    other => other,
                };
                batch
                    .into_iter()
                    .enumerate()
                    .map(|(i, (name, node, annotate))| {
                        let wrote = match &answer {
                            Ok(a) if a.get(i).is_some_and(|it| it["status"] == "Success") => {
                                Wrote::Written
                            }
                            Ok(a) => {
                                tracing::debug!(
                                    node = name,
                                    "node status: {}",
                                    a.get(i)
                                        .map(|it| it["message"].to_string())
                                        .unwrap_or_default()
                                );
                                Wrote::Failed
                            }
                            Err(e) => {
                                tracing::debug!(node = name, "node status: {e}");
                                Wrote::Failed
                            }
                        };
                        // The annotations went with the status: written if it was.
                        let written = annotate && wrote == Wrote::Written;
                        (
                            name,
                            wrote,
                            written.then(|| node.metadata.annotations.unwrap_or_default()),
                        )
                    })
                    .collect()
            }
        })
        .buffer_unordered(NODE_REQUESTS)
        .collect()
        .await;
    done.into_iter().flatten().collect()
}

/// What became of one node's write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wrote {
    Written,
    /// The Node already existed (moved here, or this region lost its state):
    /// now labelled as this region's.
    Adopted,
    Failed,
    /// Another region manages the node now.
    Moved,
}

type Annotations = BTreeMap<String, String>;

/// Writes one Node: created (or adopted) when `created` is false, its annotations
/// when `annotate`, and its status. Whether the annotations were written.
async fn write_node(
    api: &Api<Node>,
    name: &str,
    node: &Node,
    created: bool,
    annotate: bool,
) -> (Wrote, bool) {
    let mut wrote = Wrote::Written;
    let mut annotated = false;
    if !created {
        match api.create(&PostParams::default(), node).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let meta = json!({"metadata": {"labels": node.metadata.labels, "annotations": node.metadata.annotations}});
                if let Err(e) = api
                    .patch(name, &PatchParams::default(), &Patch::Merge(meta))
                    .await
                {
                    tracing::debug!(node = name, "node labels: {e}");
                    return (Wrote::Failed, false);
                }
                wrote = Wrote::Adopted;
            }
            Err(e) => {
                tracing::debug!(node = name, "node create: {e}");
                return (Wrote::Failed, false);
            }
        }
        annotated = true;
    } else if annotate && let Some(a) = &node.metadata.annotations {
        let meta = json!({"metadata": {"annotations": a}});
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(meta))
            .await
        {
            Ok(_) => annotated = true,
            Err(e) => tracing::debug!(node = name, "node annotations: {e}"),
        }
    }
    let status = json!({"status": node.status});
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
    {
        Ok(_) => (wrote, annotated),
        Err(e) => {
            tracing::debug!(node = name, "node status: {e}");
            (Wrote::Failed, annotated)
        }
    }
}

/// The periodic per-node summary, spread over the interval.
async fn summary_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = Instant::now();
        let due: Vec<String> = {
            let mut nodes = lock(&shared.nodes);
            nodes
                .iter_mut()
                .filter(|(_, e)| e.next_summary <= now)
                .map(|(name, e)| {
                    e.next_summary = now + shared.cfg.summary_interval;
                    name.clone()
                })
                .collect()
        };
        if !due.is_empty() {
            lock(&shared.upload).nodes.extend(due);
            shared.upload_notify.notify_one();
        }
    }
}

/// Whether the pod was marked for rescheduling by a region.
pub fn is_marked(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.reason.as_deref()) == Some(NODE_LOST)
}

/// Run by the global plane: when a region stops refreshing its EdgeCluster status for
/// longer than `timeout`, its Nodes become `Ready=Unknown`. The same rules as inside
/// a region then apply — a whole region gone is 100% of its nodes unreachable at once,
/// which is a partition, so no pod is marked for rescheduling. The region rewrites
/// its Nodes when it returns.
pub async fn region_watchdog(client: kube::Client, timeout: Duration) {
    let ar = edgecluster_resource();
    let clusters: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let nodes: Api<Node> = Api::all(client);
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let Ok(list) = clusters.list(&ListParams::default()).await else {
            continue;
        };
        let now = jiff::Timestamp::now();
        for ec in list.items {
            let name = ec.metadata.name.clone().unwrap_or_default();
            let last = ec.data["status"]["lastHeartbeatTime"]
                .as_str()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok());
            let Some(last) = last else { continue };
            let silent = last.duration_until(now);
            if silent.as_secs() < timeout.as_secs() as i64 {
                continue;
            }
            let lp = ListParams::default().labels(&format!("{}={name}", crate::REGION_LABEL));
            let Ok(region_nodes) = nodes.list(&lp).await else {
                continue;
            };
            for n in region_nodes.items {
                let ready = n
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                    .map(|c| c.status.clone());
                if ready.as_deref() != Some("True") {
                    continue;
                }
                let node = n.metadata.name.clone().unwrap_or_default();
                let cond = NodeCondition {
                    type_: "Ready".into(),
                    status: "Unknown".into(),
                    reason: Some("RegionUnreachable".into()),
                    message: Some(format!(
                        "region {name} has not reported for {}s; its nodes may be running fine",
                        silent.as_secs()
                    )),
                    last_heartbeat_time: Some(Time(last)),
                    last_transition_time: Some(Time(now)),
                };
                let patch = json!({"status": {"conditions": [cond]}});
                match nodes
                    .patch_status(&node, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                {
                    Ok(_) => {
                        tracing::warn!(region = %name, %node, "region silent: node Ready=Unknown")
                    }
                    Err(e) => tracing::debug!(%node, "watchdog patch: {e}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_status_outcomes_retry_only_what_may_succeed_later() {
        assert_eq!(uploaded(&json!({"status": "Success"})), Uploaded::Done);
        for gone in [404, 409, 422, 400] {
            let item = json!({"status": "Failure", "code": gone, "reason": "x"});
            assert_eq!(uploaded(&item), Uploaded::Done, "{gone}");
        }
        for busy in [
            json!({"status": "Failure", "code": 500}),
            json!({}),
            json!(null),
        ] {
            assert_eq!(uploaded(&busy), Uploaded::Retry, "{busy}");
        }
        let refused = json!({"status": "Failure", "code": 429, "message": "deny window",
            "details": {"retryAfterSeconds": 12,
                        "causes": [{"reason": "RiskPolicy", "message": "m", "field": ""}]}});
        assert_eq!(
            uploaded(&refused),
            Uploaded::Refused(12, "deny window".into())
        );
    }
}
