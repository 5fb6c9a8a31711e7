//! Serving an axum router over TLS, with the peer's verified node identity (if it
//! presented a certificate) in every request's extensions as [`Peer`].

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::NodeIdentity;

/// The verified identity of the connection a request came on: `None` for a client
/// without a (node) certificate.
#[derive(Clone, Debug, Default)]
pub struct Peer(pub Option<Arc<NodeIdentity>>);

/// Accepts TLS connections forever. A handshake that fails or takes over 10 s
/// drops that connection only.
pub async fn serve(listener: TcpListener, config: Arc<rustls::ServerConfig>, router: axum::Router) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!("tls handshake: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            let peer = Peer(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| crate::node_identity(c.as_ref()))
                    .map(Arc::new),
            );
            let svc = router.map_request(
                move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    req
                },
            );
            let svc = TowerToHyperService::new(svc);
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!("connection: {e}");
            }
        });
    }
}
