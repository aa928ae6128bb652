//! The Raft network: each RPC is one HTTPS POST of a JSON body to the target node's API
//! (`/raft/append`, `/raft/vote`, `/raft/snapshot`), answered with a JSON
//! `Result<response, RaftError>`. Every peer call is mutual TLS: the caller presents its node
//! certificate and names itself in `x-tern-node`; it reaches the target as `node-ID.tern`
//! (resolved to the member's address), so the target's certificate must name the expected
//! node. Connections are kept alive per target.
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{NodeId, TypeConfig};

pub const APPEND_PATH: &str = "/raft/append";
pub const VOTE_PATH: &str = "/raft/vote";
pub const SNAPSHOT_PATH: &str = "/raft/snapshot";
/// The header in which a node names itself on peer calls (its certificate must agree).
pub const NODE_HEADER: &str = "x-tern-node";

/// The DNS name a node's certificate carries and peers verify: `node-ID.tern`.
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}.tern")
}

/// How this node calls its peers: its TLS client configuration (cluster CA pinned, node
/// certificate presented), its id, and the address its connections leave from.
#[derive(Clone)]
pub struct PeerTls {
    pub config: Arc<rustls::ClientConfig>,
    pub self_id: NodeId,
    /// See `RaftOptions::source_ip`.
    pub source_ip: Option<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer address {addr:?} does not resolve: {reason}")]
    Address { addr: String, reason: String },
    #[error("http client: {0}")]
    Client(#[from] reqwest::Error),
}

impl PeerTls {
    /// A client for node `id` at `addr` (host:port) and the base URL to use with it
    /// (`https://node-ID.tern:PORT`): the TLS handshake fails unless the peer's certificate
    /// is the cluster's and names node `id`.
    pub fn client(
        &self,
        id: NodeId,
        addr: &str,
        timeout: Option<Duration>,
    ) -> Result<(reqwest::Client, String), PeerError> {
        let socket = resolve(addr)?;
        let name = node_name(id);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            NODE_HEADER,
            reqwest::header::HeaderValue::from(self.self_id),
        );
        let mut builder = reqwest::Client::builder()
            .use_preconfigured_tls((*self.config).clone())
            .resolve(&name, socket)
            .default_headers(headers)
            .local_address(self.source_ip)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_millis(500))
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(t) = timeout {
            builder = builder.timeout(t);
        }
        Ok((
            builder.build()?,
            format!("https://{name}:{}", socket.port()),
        ))
    }
}

fn resolve(addr: &str) -> Result<SocketAddr, PeerError> {
    if let Ok(socket) = addr.parse() {
        return Ok(socket);
    }
    let err = |reason: String| PeerError::Address {
        addr: addr.to_string(),
        reason,
    };
    addr.to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address".into()))
}

#[derive(Clone)]
pub struct HttpNetworkFactory {
    tls: PeerTls,
}

impl HttpNetworkFactory {
    pub fn new(tls: PeerTls) -> Self {
        HttpNetworkFactory { tls }
    }
}

pub struct HttpNetwork {
    /// None when the target's address does not resolve (every RPC reports it unreachable).
    client: Result<(reqwest::Client, String), String>,
    target: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for HttpNetworkFactory {
    type Network = HttpNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> HttpNetwork {
        HttpNetwork {
            client: self
                .tls
                .client(target, &node.addr, None)
                .map_err(|e| e.to_string()),
            target,
        }
    }
}

impl HttpNetwork {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let (client, base) = match &self.client {
            Ok(c) => c,
            Err(e) => {
                let err = std::io::Error::other(e.clone());
                return Err(RPCError::Unreachable(Unreachable::new(&err)));
            }
        };
        let sent = client
            .post(format!("{base}{path}"))
            .timeout(option.hard_ttl())
            .json(req)
            .send()
            .await;
        // Whatever is not a Raft answer (no connection, a failed TLS handshake, an HTTP error,
        // an undecodable body) is reported as unreachable, so that openraft backs off
        // (`backoff`) instead of retrying at once; only a timeout is retried as usual.
        let response = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Err(RPCError::Network(NetworkError::new(&e))),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&e))),
        };
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if !status.is_success() {
            let err = std::io::Error::other(format!(
                "{path}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            ));
            return Err(RPCError::Unreachable(Unreachable::new(&err)));
        }
        let decoded: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&body)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        decoded.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// Waits before each retry to a failing peer: 100 ms doubling to at most 1 s (short enough that a restarted
/// follower hears from the leader before its election timer runs out twice) (reset by the
/// first RPC that succeeds), instead of hundreds of requests a second.
pub fn retry_delays() -> impl Iterator<Item = Duration> + Send + 'static {
    (0u32..).map(|i| Duration::from_millis(100u64 << i.min(5)).min(Duration::from_secs(1)))
}

impl RaftNetwork<TypeConfig> for HttpNetwork {
    fn backoff(&self) -> Backoff {
        Backoff::new(retry_delays())
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(APPEND_PATH, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(SNAPSHOT_PATH, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(VOTE_PATH, &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_to_a_failing_peer_back_off_to_one_second() {
        let d: Vec<u64> = retry_delays()
            .take(8)
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(d, vec![100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        // At most a handful of requests a minute once backed off, not hundreds a second.
        let first_minute: u64 = retry_delays()
            .scan(0u64, |t, d| {
                *t += d.as_millis() as u64;
                (*t <= 60_000).then_some(())
            })
            .count() as u64;
        assert!(first_minute < 70, "{first_minute}");
    }
}
