//! The node's listener: TLS on every connection (a client certificate is optional; when given
//! it must chain to the cluster CA and is handed to the handlers as `auth::PeerCert`), caps on
//! open connections, and deadlines for the TLS handshake and for request headers, so that slow
//! or idle clients cannot exhaust the node or starve its Raft traffic.
//!
//! Connections go through three bounded stages. *Handshaking*: at most `max_handshaking` at
//! once; when a new one arrives and the stage is full, the oldest is dropped (a peer's
//! handshake takes milliseconds, a slowloris client's takes the whole deadline, so it is the
//! stalling ones that go). After the handshake, a connection with a cluster certificate (a
//! peer node: Raft, forwarded writes, load reports) takes one of `max_peer` slots, any other
//! connection one of `max_operator`; with its class full it is closed at once. Peers thus
//! always have room whatever operators' connections (or an attacker's) do, and at most
//! `max_handshaking + max_peer + max_operator` connections are ever open.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::auth::PeerCert;

#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections in their TLS handshake at once; the oldest gives way to a new one.
    pub max_handshaking: usize,
    /// Connections from member nodes (cluster certificate presented).
    pub max_peer: usize,
    /// Connections from anyone else (operators' clients).
    pub max_operator: usize,
    /// A client must finish the TLS handshake within this.
    pub handshake: Duration,
    /// A client must send a request's headers within this (HTTP/1).
    pub headers: Duration,
    /// Largest HTTP read buffer of a connection (bounds the memory of a slow request's headers).
    pub max_buf: usize,
    /// A connection is closed (gracefully) after this long; clients reconnect.
    pub lifetime: Duration,
    /// How long a closing connection may take to finish its request.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_handshaking: 128,
            max_peer: 256,
            max_operator: 512,
            handshake: Duration::from_secs(5),
            headers: Duration::from_secs(5),
            max_buf: 64 << 10,
            lifetime: Duration::from_secs(90),
            drain: Duration::from_secs(30),
        }
    }
}

impl Limits {
    /// The most connections open at once.
    pub fn max_open(&self) -> usize {
        self.max_handshaking + self.max_peer + self.max_operator
    }
}

/// Connections in their handshake, oldest first, each with the means to drop it.
#[derive(Default)]
struct Handshaking {
    queue: Mutex<VecDeque<(u64, oneshot::Sender<()>)>>,
}

impl Handshaking {
    /// Enter connection `id`, evicting the oldest when `max` are already in.
    fn enter(&self, id: u64, max: usize) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while q.len() >= max.max(1) {
            if let Some((_, evict)) = q.pop_front() {
                let _ = evict.send(());
            }
        }
        q.push_back((id, tx));
        rx
    }

    fn leave(&self, id: u64) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = q.iter().position(|(c, _)| *c == id) {
            q.remove(i);
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
    let handshaking = Arc::new(Handshaking::default());
    let peers = Arc::new(Semaphore::new(limits.max_peer));
    let operators = Arc::new(Semaphore::new(limits.max_operator));
    for id in 0u64.. {
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
        let evicted = handshaking.enter(id, limits.max_handshaking);
        let conn = Conn {
            acceptor: acceptor.clone(),
            router: router.clone(),
            limits: limits.clone(),
            handshaking: handshaking.clone(),
            peers: peers.clone(),
            operators: operators.clone(),
        };
        tokio::spawn(conn.run(id, tcp, evicted));
    }
    Ok(())
}

struct Conn {
    acceptor: TlsAcceptor,
    router: Router,
    limits: Limits,
    handshaking: Arc<Handshaking>,
    peers: Arc<Semaphore>,
    operators: Arc<Semaphore>,
}

impl Conn {
    async fn run(self, id: u64, tcp: TcpStream, evicted: oneshot::Receiver<()>) {
        let handshake = tokio::time::timeout(self.limits.handshake, self.acceptor.accept(tcp));
        let stream = tokio::select! {
            r = handshake => r,
            _ = evicted => {
                tracing::debug!("dropping a slow TLS handshake for a newer connection");
                return;
            }
        };
        self.handshaking.leave(id);
        let stream = match stream {
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
        let class = if peer.0.is_some() {
            &self.peers
        } else {
            &self.operators
        };
        let Ok(_permit) = class.clone().try_acquire_owned() else {
            tracing::debug!(peer = peer.0.is_some(), "connection limit reached; closing");
            return;
        };
        let router = self.router;
        let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
            req.extensions_mut().insert(peer.clone());
            router.clone().oneshot(req.map(axum::body::Body::new))
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.headers)
            .max_buf_size(self.limits.max_buf.max(8192))
            .serve_connection(TokioIo::new(stream), service);
        // After `lifetime` the connection finishes what it is serving and closes (clients
        // reconnect), so a connection cannot be held forever; a stuck one is dropped.
        let mut conn = std::pin::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => Some(r),
            _ = tokio::time::sleep(self.limits.lifetime) => None,
        };
        let result = match result {
            Some(r) => r,
            None => {
                conn.as_mut().graceful_shutdown();
                match tokio::time::timeout(self.limits.drain, conn).await {
                    Ok(r) => r,
                    Err(_) => return,
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!("connection: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_handshake_stage_drops_its_oldest_connection() {
        let h = Handshaking::default();
        let mut first = h.enter(1, 2);
        let mut second = h.enter(2, 2);
        assert!(first.try_recv().is_err() && second.try_recv().is_err());
        let mut third = h.enter(3, 2);
        // 1 was evicted (a value sent), 2 and 3 still wait.
        assert_eq!(first.try_recv(), Ok(()));
        assert!(second.try_recv().is_err());
        h.leave(2);
        let _fourth = h.enter(4, 2);
        // 2 had left: the stage held 3 only, so nobody is evicted for 4.
        assert!(third.try_recv().is_err());
        assert_eq!(h.queue.lock().unwrap().len(), 2);
    }
}
