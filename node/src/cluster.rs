//! The cluster client every part of the node uses: commit a command through the leader
//! (forwarding once from a follower: a forwarded request is never forwarded again), read the
//! committed state linearizably, talk JSON to peer nodes, change Raft membership.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tern_consensus::openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use tern_consensus::openraft::{BasicNode, ChangeMembers};
use tern_consensus::state::Command;
use tern_consensus::{Applied, ClusterState, CommandError, ConsensusError, ConsensusNode, Request};

use super::error::ServiceError;

/// Header marking a request one node forwarded to another (to the leader).
pub const FORWARDED: &str = "x-tern-forwarded";

/// Mutual-TLS clients to peers and their base URLs, by (node id, address).
type PeerClients = HashMap<(u64, String), (reqwest::Client, String)>;

#[derive(Clone)]
pub struct Cluster {
    pub node: ConsensusNode,
    peers: Arc<Mutex<PeerClients>>,
}

/// A command to commit, as sent to `/v1/write` (by an operator, or forwarded by a node).
#[derive(Debug, Serialize, Deserialize)]
pub struct WriteBody {
    #[serde(default)]
    pub actor: Option<String>,
    /// Ignored when received: the time of a write is the leader's clock.
    #[serde(default)]
    pub at_ms: Option<u64>,
    pub command: Command,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WriteReply {
    pub applied: Applied,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The committed state as shown outside the nodes: migration tokens authenticate streams and
/// token hashes authenticate operators and joiners, so they never leave the nodes.
pub fn redacted(state: &ClusterState) -> ClusterState {
    state.without_secrets()
}

impl Cluster {
    pub fn new(node: ConsensusNode) -> anyhow::Result<Self> {
        Ok(Cluster {
            node,
            peers: Arc::default(),
        })
    }

    /// A mutual-TLS client to the member at `addr` and its base URL: the member's certificate
    /// must name the node id the membership gives that address.
    fn peer(&self, addr: &str) -> Result<(reqwest::Client, String), ServiceError> {
        let m = self.node.raft.metrics().borrow().clone();
        let id = m
            .membership_config
            .membership()
            .nodes()
            .find(|(_, n)| n.addr == addr)
            .map(|(id, _)| *id)
            .ok_or_else(|| ServiceError::unavailable(format!("{addr} is not a cluster member")))?;
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = peers.get(&(id, addr.to_string())) {
            return Ok(c.clone());
        }
        let c = self
            .node
            .peers
            .client(id, addr, Some(Duration::from_secs(10)))
            .map_err(|e| ServiceError::unavailable(e.to_string()))?;
        peers.insert((id, addr.to_string()), c.clone());
        Ok(c)
    }

    /// POST a JSON body to another node and decode its JSON answer, mapping API errors back.
    pub async fn post_json<B: Serialize, R: serde::de::DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: &B,
        as_forward: bool,
    ) -> Result<R, ServiceError> {
        let (client, base) = self.peer(addr)?;
        let mut request = client.post(format!("{base}{path}")).json(body);
        if as_forward {
            request = request.header(FORWARDED, "1");
        }
        let reply = request
            .send()
            .await
            .map_err(|e| ServiceError::unavailable(format!("forwarding to {addr}: {e}")))?;
        decode_reply(reply).await
    }

    pub async fn get_json<R: serde::de::DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
    ) -> Result<R, ServiceError> {
        let (client, base) = self.peer(addr)?;
        let reply = client
            .get(format!("{base}{path}"))
            .header(FORWARDED, "1")
            .send()
            .await
            .map_err(|e| ServiceError::unavailable(format!("forwarding to {addr}: {e}")))?;
        decode_reply(reply).await
    }

    /// Commit a command through the leader (forwarding if needed) and return what it produced.
    pub async fn propose(
        &self,
        actor: String,
        at_ms: Option<u64>,
        command: Command,
        forwarded: bool,
    ) -> Result<Applied, ServiceError> {
        let at_ms = at_ms.unwrap_or_else(now_ms);
        let started = std::time::Instant::now();
        match self
            .node
            .write(Request {
                actor: actor.clone(),
                at_ms,
                command: command.clone(),
            })
            .await
        {
            Ok(resp) => {
                metrics::histogram!("tern_raft_write_seconds")
                    .record(started.elapsed().as_secs_f64());
                resp.result.map_err(|e| ServiceError {
                    status: StatusCode::CONFLICT,
                    message: format!("rejected: {e}"),
                    rejected: Some(e),
                })
            }
            Err(ConsensusError::Write(RaftError::APIError(ClientWriteError::ForwardToLeader(
                f,
            )))) => {
                let leader = self.forward_target(forwarded, f.leader_node)?;
                let body = WriteBody {
                    actor: Some(actor),
                    at_ms: Some(at_ms),
                    command,
                };
                let reply: WriteReply = self.post_json(&leader, "/v1/write", &body, true).await?;
                Ok(reply.applied)
            }
            Err(e) => Err(ServiceError::unavailable(e.to_string())),
        }
    }

    /// Where to forward a request for the leader; refused for a request already forwarded.
    pub fn forward_target(
        &self,
        forwarded: bool,
        leader: Option<BasicNode>,
    ) -> Result<String, ServiceError> {
        match leader {
            _ if forwarded => Err(ServiceError::unavailable(
                "not the leader (request was already forwarded)",
            )),
            Some(node) => Ok(node.addr),
            None => Err(ServiceError::unavailable("no leader known (no quorum?)")),
        }
    }

    /// Linearizable read of the whole state, forwarded to the leader from a follower.
    pub async fn read(&self, forwarded: bool) -> Result<Arc<ClusterState>, ServiceError> {
        match self.node.read().await {
            Ok(state) => Ok(state),
            Err(ConsensusError::Read(RaftError::APIError(
                CheckIsLeaderError::ForwardToLeader(f),
            ))) => {
                let leader = self.forward_target(forwarded, f.leader_node)?;
                Ok(Arc::new(self.get_json(&leader, "/v1/state").await?))
            }
            Err(e) => Err(ServiceError::unavailable(e.to_string())),
        }
    }

    pub async fn change_membership(
        &self,
        change: ChangeMembers<u64, BasicNode>,
    ) -> Result<(), ServiceError> {
        match self.node.raft.change_membership(change, false).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(
                ServiceError::unavailable("leadership changed during membership change"),
            ),
            Err(e) => Err(ServiceError::conflict(e.to_string())),
        }
    }

    pub fn leader_addr(&self) -> Option<(u64, String)> {
        let m = self.node.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&leader)?
            .addr
            .clone();
        Some((leader, addr))
    }
}

async fn decode_reply<R: serde::de::DeserializeOwned>(
    reply: reqwest::Response,
) -> Result<R, ServiceError> {
    let status = StatusCode::from_u16(reply.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let bytes = reply
        .bytes()
        .await
        .map_err(|e| ServiceError::unavailable(format!("reading reply: {e}")))?;
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| {
            ServiceError::new(StatusCode::BAD_GATEWAY, format!("bad reply from peer: {e}"))
        });
    }
    #[derive(Deserialize)]
    struct ErrBody {
        error: String,
        rejected: Option<CommandError>,
    }
    match serde_json::from_slice::<ErrBody>(&bytes) {
        Ok(b) => Err(ServiceError {
            status,
            message: b.error,
            rejected: b.rejected,
        }),
        Err(_) => Err(ServiceError::new(
            status,
            String::from_utf8_lossy(&bytes).into_owned(),
        )),
    }
}
