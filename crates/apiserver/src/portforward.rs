//! `GET .../pods/{name}/portforward` (`kubectl port-forward`, 1.31+): a WebSocket
//! with the subprotocol `SPDY/3.1+portforward.k8s.io`, inside which kubectl speaks
//! SPDY (`spdy`). For every local connection kubectl opens two streams with the
//! same `requestid`: an error stream and a data stream naming the `port`. Each data
//! stream becomes one TCP connection to that port of the pod, made by the node's
//! agent: the server opens the region's exec WebSocket with `?port=` and relays
//! bytes (client data → stdin, stdout → client data, end → FIN); a failure (nothing
//! listening, node offline) is written to the error stream, which kubectl prints.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use meridian_api::error::ApiError;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite;

use crate::handlers::Ctx;
use crate::logs::{Located, locate};
use crate::spdy::{self, FLAG_FIN, Frame, HeaderCodec};

const PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

pub async fn serve(cx: &Ctx<'_>, ws: Option<WebSocketUpgrade>) -> Result<Response, ApiError> {
    let at = locate(cx, "ports to forward to", false).await?;
    let offered = cx
        .headers
        .get(http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let (Some(ws), true) = (ws, offered.split(',').any(|p| p.trim() == PROTOCOL)) else {
        return Err(ApiError::bad_request(format!(
            "port-forward needs a WebSocket upgrade with the {PROTOCOL:?} subprotocol \
             (kubectl 1.31 or later; the client offered {offered:?}); plain SPDY is not supported"
        )));
    };
    let pod = cx.name().to_owned();
    Ok(ws
        .protocols([PROTOCOL])
        .on_upgrade(move |socket| session(socket, Arc::new(at), pod)))
}

async fn session(socket: WebSocket, at: Arc<Located>, pod: String) {
    let (mut ws_tx, mut ws_rx) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(64);
    let writer = tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            if ws_tx.send(Message::Binary(f.into())).await.is_err() {
                return;
            }
        }
        let _ = ws_tx
            .send(Message::Close(Some(crate::exec::CLIENT_NORMAL_CLOSE)))
            .await;
    });
    let mut codec = HeaderCodec::default();
    let mut buf = Vec::new();
    // requestid → its error stream; data stream → where the client's bytes go.
    let mut errors: HashMap<String, u32> = HashMap::new();
    let mut inputs: HashMap<u32, mpsc::UnboundedSender<Option<Vec<u8>>>> = HashMap::new();
    'session: while let Some(Ok(m)) = ws_rx.next().await {
        match m {
            Message::Binary(b) => buf.extend_from_slice(&b),
            Message::Close(_) => break,
            _ => continue,
        }
        loop {
            let frame = match spdy::parse(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(%pod, "port-forward: {e}");
                    break 'session;
                }
            };
            match frame {
                Frame::Control {
                    kind: spdy::SYN_STREAM,
                    data,
                    ..
                } => {
                    let (Ok(id), Some(block)) = (spdy::stream_of(&data), data.get(10..)) else {
                        break 'session;
                    };
                    let headers = match codec.decode(block) {
                        Ok(h) => h,
                        Err(e) => {
                            tracing::debug!(%pod, "port-forward headers: {e}");
                            break 'session;
                        }
                    };
                    let Ok(reply) = codec.syn_reply(id) else {
                        break 'session;
                    };
                    let _ = out_tx.send(reply).await;
                    let get = |k: &str| {
                        headers
                            .iter()
                            .find(|(n, _)| n == k)
                            .map(|(_, v)| v.as_str())
                            .unwrap_or_default()
                    };
                    let request = get("requestid").to_owned();
                    match (get("streamtype"), get("port").parse::<u16>()) {
                        ("error", _) => {
                            errors.insert(request, id);
                        }
                        ("data", Ok(port)) if port != 0 => {
                            let (in_tx, in_rx) = mpsc::unbounded_channel();
                            inputs.insert(id, in_tx);
                            let target = Target {
                                at: at.clone(),
                                pod: pod.clone(),
                                port,
                                data: id,
                                error: errors.remove(&request),
                            };
                            tokio::spawn(forward(target, in_rx, out_tx.clone()));
                        }
                        _ => {
                            let _ = out_tx.send(spdy::rst(id, 1)).await;
                        }
                    }
                }
                Frame::Control {
                    kind: spdy::HEADERS,
                    data,
                    ..
                } => {
                    // Decoded only to keep the compression context in step.
                    if codec.decode(data.get(4..).unwrap_or_default()).is_err() {
                        break 'session;
                    }
                }
                Frame::Control {
                    kind: spdy::PING,
                    data,
                    ..
                } => {
                    let _ = out_tx.send(spdy::ping(&data)).await;
                }
                Frame::Control {
                    kind: spdy::RST_STREAM,
                    data,
                    ..
                } => {
                    if let Ok(id) = spdy::stream_of(&data) {
                        inputs.remove(&id);
                    }
                }
                Frame::Control {
                    kind: spdy::GOAWAY, ..
                } => break 'session,
                Frame::Control { .. } => {} // SETTINGS, WINDOW_UPDATE
                Frame::Data {
                    stream,
                    flags,
                    data,
                } => {
                    if let Some(tx) = inputs.get(&stream) {
                        if !data.is_empty() {
                            let _ = tx.send(Some(data));
                        }
                        if flags & FLAG_FIN != 0 {
                            let _ = tx.send(None);
                        }
                    }
                }
            }
        }
    }
    // Ends every connection of the session, then the writer.
    drop(inputs);
    drop(out_tx);
    let _ = writer.await;
}

/// One forwarded connection.
struct Target {
    at: Arc<Located>,
    pod: String,
    port: u16,
    data: u32,
    error: Option<u32>,
}

/// Relays one data stream through the region to the pod's port. `input` carries
/// the client's bytes (`None`: it finished sending); it closes when the session
/// ends.
async fn forward(
    t: Target,
    mut input: mpsc::UnboundedReceiver<Option<Vec<u8>>>,
    out: mpsc::Sender<Vec<u8>>,
) {
    let report = |msg: String| {
        let out = out.clone();
        let error = t.error;
        let text = format!("error forwarding port {} to pod {}: {msg}", t.port, t.pod);
        async move {
            if let Some(e) = error {
                let _ = out.send(spdy::data(e, text.as_bytes(), true)).await;
            }
        }
    };
    let query = [("port".to_owned(), t.port.to_string())];
    let region = match crate::exec::connect(&t.at, &query, "v5.channel.k8s.io").await {
        Ok(r) => r,
        Err(e) => {
            report(e.message).await;
            let _ = out.send(spdy::data(t.data, &[], true)).await;
            return;
        }
    };
    let (mut region_tx, mut region_rx) = region.split();
    let up = async {
        while let Some(item) = input.recv().await {
            let frame = match item {
                Some(d) => {
                    let mut f = Vec::with_capacity(d.len() + 1);
                    f.push(0);
                    f.extend_from_slice(&d);
                    f
                }
                None => vec![255, 0], // v5: stdin closed
            };
            if region_tx
                .send(tungstenite::Message::Binary(frame.into()))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let down = async {
        let mut failure = None;
        while let Some(Ok(m)) = region_rx.next().await {
            let tungstenite::Message::Binary(b) = m else {
                continue;
            };
            match b.first() {
                Some(1) => {
                    for chunk in b[1..].chunks(32 * 1024) {
                        if out.send(spdy::data(t.data, chunk, false)).await.is_err() {
                            return failure;
                        }
                    }
                }
                Some(3) => {
                    let status: serde_json::Value =
                        serde_json::from_slice(&b[1..]).unwrap_or_default();
                    if status["status"] == "Failure" {
                        failure = status["message"].as_str().map(str::to_owned);
                    }
                }
                _ => {}
            }
        }
        failure
    };
    let failure = tokio::select! {
        f = down => f,
        _ = up => None,
    };
    if let Some(msg) = failure {
        report(msg).await;
    } else if let Some(e) = t.error {
        let _ = out.send(spdy::data(e, &[], true)).await;
    }
    let _ = out.send(spdy::data(t.data, &[], true)).await;
}
