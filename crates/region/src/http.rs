//! The region's one port: the agent hub (gRPC over HTTP/2) plus a small HTTP API for
//! the global plane: pod logs streamed from the agent, health and metrics.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Body;
use axum::extract::RawQuery;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use meridian_proto::{
    CancelLog, ExecInput, ExecOutput, ExecStart, LogRequest, RegionMessage, region_message,
};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::state::{Shared, lock};

#[derive(Default)]
pub struct Metrics {
    pub heartbeats: Counter,
    pub registrations: Counter,
    pub rejected: Counter,
    pub evictions: Counter,
    pub status_uploads: Counter,
}

pub fn router(shared: Arc<Shared>) -> Router {
    let http = Router::new()
        .route("/v1/logs/{uid}", get(logs))
        .route("/v1/exec/{uid}", get(exec))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .with_state(shared.clone());
    let images = crate::images::router(shared.images.clone());
    tonic::service::Routes::new(crate::hub::service(shared))
        .into_axum_router()
        .merge(http)
        .merge(images)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct LogQuery {
    #[serde(default)]
    container: String,
    #[serde(default)]
    follow: bool,
    tail_lines: Option<i64>,
    #[serde(default)]
    previous: bool,
    #[serde(default)]
    timestamps: bool,
    limit_bytes: Option<i64>,
}

/// The node a pod is on and that node's agent stream, or the error response.
fn session_of(
    shared: &Shared,
    uid: &str,
    offline_note: &str,
) -> Result<(String, crate::state::SessionTx), Response> {
    let node = match lock(&shared.pods).by_uid.get(uid) {
        Some(p) => p.node.clone(),
        None => {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!("pod {uid} is not on a node of this region"),
            ));
        }
    };
    let tx = lock(&shared.nodes)
        .get(&node)
        .and_then(|n| n.session.as_ref().map(|s| s.tx.clone()));
    match tx {
        Some(tx) => Ok((node, tx)),
        None => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "node {node} is not connected to region {}{offline_note}",
                shared.cfg.name
            ),
        )),
    }
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, msg.into()).into_response()
}

/// Constant-time comparison of the presented bearer token.
fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let want = shared.cfg.proxy_token.as_bytes();
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::as_bytes)
        .unwrap_or_default();
    !want.is_empty()
        && got.len() == want.len()
        && got.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn logs(
    State(shared): State<Arc<Shared>>,
    Path(uid): Path<String>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&shared, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "a valid region proxy token is required",
        );
    }
    let (node, tx) = match session_of(&shared, &uid, "; its logs stay on the node") {
        Ok(s) => s,
        Err(r) => return r,
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (chunk_tx, mut chunk_rx) = mpsc::channel(16);
    lock(&shared.logs).insert(id, chunk_tx);
    let req = LogRequest {
        request_id: id,
        uid,
        container: q.container,
        follow: q.follow,
        tail_lines: q.tail_lines.unwrap_or(-1),
        previous: q.previous,
        timestamps: q.timestamps,
        limit_bytes: q.limit_bytes.unwrap_or(0),
    };
    let msg = RegionMessage {
        msg: Some(region_message::Msg::LogRequest(req)),
    };
    if tx.send(msg).await.is_err() {
        lock(&shared.logs).remove(&id);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("node {node} disconnected"),
        );
    }
    // The first chunk decides the status code: an agent-side error becomes a 4xx.
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), chunk_rx.recv()).await;
    let first = match first {
        Ok(Some(c)) => c,
        _ => {
            lock(&shared.logs).remove(&id);
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                format!("node {node} did not answer the log request"),
            );
        }
    };
    if !first.error.is_empty() {
        lock(&shared.logs).remove(&id);
        return error(StatusCode::BAD_REQUEST, first.error);
    }
    let guard = Cleanup {
        shared: shared.clone(),
        id,
        tx,
    };
    let stream = async_stream(first, chunk_rx, guard);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}

/// The channels of the Kubernetes streaming protocol (v4/v5.channel.k8s.io).
const STDIN: u8 = 0;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
/// v5: `[255, channel]` closes that channel (stdin's EOF).
const CLOSE: u8 = 255;

/// Go's WebSocket clients take a close without a code as an error.
const NORMAL_CLOSE: axum::extract::ws::CloseFrame = axum::extract::ws::CloseFrame {
    code: 1000,
    reason: axum::extract::ws::Utf8Bytes::from_static(""),
};

/// The subprotocols spoken: each message is a channel byte then data.
pub const EXEC_PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// `GET /v1/exec/{uid}?container=&command=...&stdin=&tty=` or `?port=` (WebSocket, the
/// Kubernetes streaming protocol): runs the command on the pod's node through its
/// agent stream and relays standard input, output and error; the exit status
/// arrives on the error channel as a Kubernetes `Status`, as kubelet sends it.
async fn exec(
    State(shared): State<Arc<Shared>>,
    Path(uid): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !authorized(&shared, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "a valid region proxy token is required",
        );
    }
    let mut start = ExecStart {
        uid: uid.clone(),
        ..Default::default()
    };
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "container" => start.container = v.into_owned(),
            "command" => start.command.push(v.into_owned()),
            "stdin" => start.stdin = v == "true" || v == "1",
            "tty" => start.tty = v == "true" || v == "1",
            "port" => start.port = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    if start.command.is_empty() && start.port == 0 {
        return error(StatusCode::BAD_REQUEST, "a command or a port is required");
    }
    let tx = match session_of(&shared, &uid, "") {
        Ok((_, tx)) => tx,
        Err(r) => return r,
    };
    ws.protocols(EXEC_PROTOCOLS)
        .on_upgrade(move |socket| relay_exec(socket, shared, tx, start))
}

/// Ends the agent's side of a session that ends early (the client went away).
struct ExecCleanup {
    shared: Arc<Shared>,
    id: u64,
    tx: crate::state::SessionTx,
    exited: bool,
}

impl Drop for ExecCleanup {
    fn drop(&mut self) {
        lock(&self.shared.execs).remove(&self.id);
        if !self.exited {
            let msg = RegionMessage {
                msg: Some(region_message::Msg::ExecInput(ExecInput {
                    session_id: self.id,
                    cancel: true,
                    ..Default::default()
                })),
            };
            let _ = self.tx.try_send(msg);
        }
    }
}

/// The `Status` kubelet sends on the error channel when a command ends.
fn exit_status(o: &ExecOutput, command: &[String]) -> String {
    let status = if !o.error.is_empty() {
        serde_json::json!({"metadata": {}, "status": "Failure", "message": o.error,
            "reason": "InternalError"})
    } else if o.exit_code == 0 {
        serde_json::json!({"metadata": {}, "status": "Success"})
    } else {
        serde_json::json!({"metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command {command:?}, exit code {}", o.exit_code),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": o.exit_code.to_string()}]}})
    };
    status.to_string()
}

async fn relay_exec(
    mut socket: WebSocket,
    shared: Arc<Shared>,
    tx: crate::state::SessionTx,
    mut start: ExecStart,
) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    start.session_id = id;
    let command = start.command.clone();
    let (out_tx, mut out_rx) = mpsc::channel(64);
    lock(&shared.execs).insert(id, out_tx);
    let mut guard = ExecCleanup {
        shared: shared.clone(),
        id,
        tx: tx.clone(),
        exited: false,
    };
    let input = |i: ExecInput| RegionMessage {
        msg: Some(region_message::Msg::ExecInput(i)),
    };
    let started = RegionMessage {
        msg: Some(region_message::Msg::ExecStart(start)),
    };
    if tx.send(started).await.is_err() {
        let gone = ExecOutput {
            exited: true,
            error: "the node disconnected".into(),
            ..Default::default()
        };
        let mut frame = vec![ERROR];
        frame.extend_from_slice(exit_status(&gone, &command).as_bytes());
        let _ = socket.send(Message::Binary(frame.into())).await;
        let _ = socket.send(Message::Close(Some(NORMAL_CLOSE))).await;
        return;
    }
    loop {
        tokio::select! {
            m = socket.recv() => match m {
                Some(Ok(Message::Binary(b))) => {
                    let msg = match b.first() {
                        Some(&STDIN) => Some(ExecInput { session_id: id, data: b[1..].to_vec(), ..Default::default() }),
                        Some(&CLOSE) if b.get(1) == Some(&STDIN) => Some(ExecInput { session_id: id, eof: true, ..Default::default() }),
                        Some(&RESIZE) => {
                            let size: serde_json::Value = serde_json::from_slice(&b[1..]).unwrap_or_default();
                            let dim = |k: &str| size[k].as_u64().unwrap_or(0).min(u16::MAX.into()) as u32;
                            Some(ExecInput { session_id: id, width: dim("Width"), height: dim("Height"), ..Default::default() })
                        }
                        _ => None,
                    };
                    if let Some(i) = msg
                        && tx.send(input(i)).await.is_err()
                    {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            o = out_rx.recv() => {
                let Some(o) = o else { break };
                if o.exited {
                    guard.exited = true;
                    let mut frame = vec![ERROR];
                    frame.extend_from_slice(exit_status(&o, &command).as_bytes());
                    let _ = socket.send(Message::Binary(frame.into())).await;
                    let _ = socket.send(Message::Close(Some(NORMAL_CLOSE))).await;
                    break;
                }
                let mut frame = Vec::with_capacity(o.data.len() + 1);
                frame.push(o.stream.min(2) as u8);
                frame.extend_from_slice(&o.data);
                if socket.send(Message::Binary(frame.into())).await.is_err() {
                    break;
                }
            }
            _ = tx.closed() => {
                let gone = ExecOutput { exited: true, error: "the node disconnected".into(), ..Default::default() };
                let mut frame = vec![ERROR];
                frame.extend_from_slice(exit_status(&gone, &command).as_bytes());
                let _ = socket.send(Message::Binary(frame.into())).await;
                let _ = socket.send(Message::Close(Some(NORMAL_CLOSE))).await;
                break;
            }
        }
    }
    // Let the peer answer the close before the connection drops (a reset would
    // discard the exit status it has not read yet).
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Removes the waiter and tells the agent to stop when the response ends early.
struct Cleanup {
    shared: Arc<Shared>,
    id: u64,
    tx: crate::state::SessionTx,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        lock(&self.shared.logs).remove(&self.id);
        let msg = RegionMessage {
            msg: Some(region_message::Msg::CancelLog(CancelLog {
                request_id: self.id,
            })),
        };
        let _ = self.tx.try_send(msg);
    }
}

fn async_stream(
    first: meridian_proto::LogChunk,
    rx: mpsc::Receiver<meridian_proto::LogChunk>,
    guard: Cleanup,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    let state = (Some(first), rx, guard, false);
    futures::stream::unfold(state, |(mut pending, mut rx, guard, done)| async move {
        if done {
            return None;
        }
        loop {
            let c = match pending.take() {
                Some(c) => c,
                None => rx.recv().await?,
            };
            if !c.error.is_empty() {
                let data = bytes::Bytes::from(format!("\nlog stream ended: {}\n", c.error));
                return Some((Ok(data), (None, rx, guard, true)));
            }
            if c.eof && c.data.is_empty() {
                return None;
            }
            if !c.data.is_empty() {
                let done = c.eof;
                return Some((Ok(bytes::Bytes::from(c.data)), (None, rx, guard, done)));
            }
        }
    })
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let mut reg = Registry::with_prefix("meridian_region");
    let m = &shared.metrics;
    reg.register("heartbeats", "Heartbeats received", m.heartbeats.clone());
    reg.register(
        "registrations",
        "Agent registrations",
        m.registrations.clone(),
    );
    reg.register(
        "rejected",
        "Rejected agent messages or streams",
        m.rejected.clone(),
    );
    reg.register(
        "pods_marked",
        "Pods marked for rescheduling",
        m.evictions.clone(),
    );
    reg.register(
        "status_uploads",
        "Pod status writes to the global API",
        m.status_uploads.clone(),
    );
    let im = &shared.images.metrics;
    for (name, help, v) in [
        (
            "image_upstream_fetches",
            "Manifests and blobs the image cache fetched from upstream registries",
            &im.upstream_fetches,
        ),
        (
            "image_upstream_bytes",
            "Bytes the image cache fetched from upstream registries",
            &im.upstream_bytes,
        ),
        (
            "image_cache_hits",
            "Image requests answered from the cache",
            &im.hits,
        ),
        (
            "image_stale_served",
            "Tags served from the last known digest because the upstream failed",
            &im.stale_served,
        ),
        (
            "image_tags_revalidated",
            "Tags found unchanged upstream by a HEAD request (no manifest transferred)",
            &im.revalidated,
        ),
        (
            "image_evicted_bytes",
            "Blob bytes removed to keep the image cache under its size limit",
            &im.evicted_bytes,
        ),
    ] {
        let c = Counter::<u64>::default();
        c.inc_by(v.load(Ordering::Relaxed));
        reg.register(name, help, c);
    }
    let nodes = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    nodes.set(lock(&shared.nodes).len() as i64);
    reg.register("nodes", "Nodes known to the region", nodes);
    let sessions = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    sessions.set(shared.session_count() as i64);
    reg.register("agent_streams", "Connected agent streams", sessions);
    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
