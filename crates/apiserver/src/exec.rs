//! `GET .../pods/{name}/exec` (`kubectl exec`): a WebSocket in the Kubernetes
//! streaming protocol (`v5.channel.k8s.io`, `v4.channel.k8s.io`: each message is a
//! channel byte — 0 stdin, 1 stdout, 2 stderr, 3 the exit `Status`, 4 resize, v5's
//! 255 close — then data). The server opens the same protocol to the region that
//! manages the pod's node (`/v1/exec/{uid}`, which runs the command through the
//! node's agent stream) before accepting the client's upgrade, so an unreachable
//! region is an ordinary error response; then it relays messages both ways
//! untouched. Tenancy applies as for any pod read: the path resolves inside the
//! caller's virtual cluster. SPDY (kubectl before 1.30) is not spoken.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use meridian_api::error::{ApiError, Reason};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::handlers::Ctx;
use crate::logs::{Located, internal, locate, unavailable};

/// The streaming subprotocols, preferred first.
const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// Either side of the relay may be TLS or not (a region without TLS in tests).
pub(crate) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

pub(crate) type RegionSocket = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

pub async fn serve(
    cx: &Ctx<'_>,
    raw_query: &str,
    ws: Option<WebSocketUpgrade>,
) -> Result<Response, ApiError> {
    let offered = cx
        .headers
        .get(http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let protocol = PROTOCOLS
        .into_iter()
        .find(|p| offered.split(',').any(|o| o.trim() == *p));
    let mut query: Vec<(String, String)> = Vec::new();
    let mut has_command = false;
    for (k, v) in form_urlencoded::parse(raw_query.as_bytes()) {
        match k.as_ref() {
            "command" => {
                has_command = true;
                query.push(("command".into(), v.into_owned()));
            }
            "stdin" | "tty" => query.push((k.into_owned(), v.into_owned())),
            _ => {}
        }
    }
    if !has_command {
        return Err(ApiError::bad_request("you must specify at least 1 command"));
    }
    // Checked before the protocol, so a client falling back to SPDY after a refused
    // upgrade (kubectl does) still hears why.
    let at = locate(cx, "processes to exec into", true).await?;
    let (Some(ws), Some(protocol)) = (ws, protocol) else {
        return Err(ApiError::bad_request(format!(
            "exec needs a WebSocket upgrade in the {PROTOCOLS:?} protocols (kubectl 1.30 or \
             later; the client offered {offered:?}); SPDY is not supported"
        )));
    };
    query.push(("container".into(), at.container.clone()));
    let region = connect(&at, &query, protocol).await?;
    Ok(ws
        .protocols([protocol])
        .on_upgrade(move |client| relay(client, region)))
}

/// Opens the region's exec WebSocket for the pod (a command, or `port=`).
pub(crate) async fn connect(
    at: &Located,
    query: &[(String, String)],
    protocol: &str,
) -> Result<RegionSocket, ApiError> {
    let qs: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(query)
        .finish();
    let (tls, rest) = if let Some(r) = at.endpoint.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = at.endpoint.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(unavailable(format!(
            "region {} has an endpoint that is not http(s): {}",
            at.region, at.endpoint
        )));
    };
    let authority = rest.split('/').next().unwrap_or(rest).to_owned();
    let url = format!(
        "{}://{authority}/v1/exec/{}?{qs}",
        if tls { "wss" } else { "ws" },
        at.uid
    );
    let mut req = url
        .into_client_request()
        .map_err(|e| internal(&format!("exec request: {e}")))?;
    let h = req.headers_mut();
    let bearer = format!("Bearer {}", at.token);
    h.insert(
        http::header::AUTHORIZATION,
        bearer.parse().map_err(|_| internal("region token"))?,
    );
    h.insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        http::HeaderValue::from_static(if protocol == PROTOCOLS[0] {
            PROTOCOLS[0]
        } else {
            PROTOCOLS[1]
        }),
    );
    let unreachable = |e: String| unavailable(format!("region {} is unreachable: {e}", at.region));
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(&authority),
    )
    .await
    .map_err(|_| unreachable("connect timed out".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = if tls {
        let mut roots = rustls::RootCertStore::empty();
        let pem = at
            .regions_ca
            .as_deref()
            .ok_or_else(|| unavailable("no CA for region certificates on this server".into()))?;
        for c in CertificateDer::pem_slice_iter(pem) {
            let c = c.map_err(|e| internal(&format!("regions CA: {e}")))?;
            roots
                .add(c)
                .map_err(|e| internal(&format!("regions CA: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| internal(&e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let host = authority
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(&authority)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let name =
            ServerName::try_from(host).map_err(|e| internal(&format!("region host name: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| unreachable(format!("TLS: {e}")))?;
        Box::new(stream)
    } else {
        Box::new(tcp)
    };
    let (socket, _) = tokio_tungstenite::client_async(req, io)
        .await
        .map_err(|e| match e {
            tungstenite::Error::Http(r) => {
                let body = r
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                let reason = match r.status().as_u16() {
                    400 => Reason::BadRequest,
                    404 => Reason::NotFound,
                    _ => Reason::ServiceUnavailable,
                };
                ApiError::new(reason, body)
            }
            other => unreachable(other.to_string()),
        })?;
    Ok(socket)
}

/// A normal closure (1000): Go's WebSocket clients take a close without a code as
/// an error.
fn normal_close() -> tungstenite::protocol::CloseFrame {
    tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "".into(),
    }
}

/// The same normal closure towards kubectl.
pub(crate) const CLIENT_NORMAL_CLOSE: axum::extract::ws::CloseFrame =
    axum::extract::ws::CloseFrame {
        code: 1000,
        reason: axum::extract::ws::Utf8Bytes::from_static(""),
    };

/// Relays messages between kubectl and the region until either side closes.
async fn relay(client: WebSocket, region: RegionSocket) {
    let (mut client_tx, mut client_rx) = client.split();
    let (mut region_tx, mut region_rx) = region.split();
    let up = async {
        while let Some(Ok(m)) = client_rx.next().await {
            let m = match m {
                Message::Binary(b) => tungstenite::Message::Binary(b),
                Message::Text(t) => tungstenite::Message::Text(t.as_str().into()),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if region_tx.send(m).await.is_err() {
                break;
            }
        }
        let _ = region_tx
            .send(tungstenite::Message::Close(Some(normal_close())))
            .await;
    };
    let down = async {
        while let Some(Ok(m)) = region_rx.next().await {
            let m = match m {
                tungstenite::Message::Binary(b) => Message::Binary(b),
                tungstenite::Message::Text(t) => Message::Text(t.as_str().into()),
                tungstenite::Message::Close(_) => break,
                _ => continue,
            };
            if client_tx.send(m).await.is_err() {
                break;
            }
        }
        let _ = client_tx
            .send(Message::Close(Some(CLIENT_NORMAL_CLOSE)))
            .await;
    };
    // Whichever side ends first ends the session.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
    // Wait (briefly) for kubectl to answer our close before dropping the
    // connection: a reset would discard the exit status it has not read yet.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = client_rx.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}
