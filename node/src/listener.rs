//! The node's listener: TLS on every connection (a client certificate is optional; when given
//! it must chain to the cluster CA and is handed to the handlers as `auth::PeerCert`), a cap on
//! open connections, and deadlines for the TLS handshake and for request headers, so that slow
//! or idle clients cannot exhaust the node.
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::auth::PeerCert;

#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections served at once; further ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A client must finish the TLS handshake within this.
    pub handshake: Duration,
    /// A client must send a request's headers within this (HTTP/1).
    pub headers: Duration,
    /// A connection is closed (gracefully) after this long; clients reconnect.
    pub lifetime: Duration,
    /// How long a closing connection may take to finish its request.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            handshake: Duration::from_secs(5),
            headers: Duration::from_secs(5),
            lifetime: Duration::from_secs(90),
            drain: Duration::from_secs(30),
        }
    }
}

/// Serve `router` on `listener` until the listener fails.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    router: Router,
    limits: Limits,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        // Waiting for a permit before accepting leaves excess clients in the kernel's queue
        // instead of holding a descriptor and a task for each.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return Ok(());
        };
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!("tls handshake: {e}");
                    return;
                }
                Err(_) => return,
            };
            let peer = PeerCert(
                stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.clone().into_owned()),
            );
            let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                req.extensions_mut().insert(peer.clone());
                router.clone().oneshot(req.map(axum::body::Body::new))
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.headers)
                .serve_connection(TokioIo::new(stream), service);
            // After `lifetime` the connection finishes what it is serving and closes (clients
            // reconnect), so a connection cannot be held forever; a stuck one is dropped.
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = tokio::time::sleep(limits.lifetime) => None,
            };
            let result = match result {
                Some(r) => r,
                None => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(limits.drain, conn).await {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!("connection: {e}");
            }
        });
    }
}
