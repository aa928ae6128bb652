//! The node's HTTP API: one router. Raft RPCs under /raft, the operator API under /v1,
//! Prometheus under /metrics. Writes and linearizable reads that reach a follower are forwarded
//! to the leader (once: a forwarded request is never forwarded again).
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Json, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tern_consensus::network::{APPEND_PATH, SNAPSHOT_PATH, VOTE_PATH};

use crate::auth::Principal;
use tern_consensus::openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use tern_consensus::openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tern_consensus::openraft::{BasicNode, ChangeMembers, ServerState, Vote};
use tern_consensus::state::{Command, Host};
use tern_consensus::{
    Applied, ClusterState, CommandError, ConsensusError, ConsensusNode, Request, TypeConfig,
};

const FORWARDED: &str = "x-tern-forwarded";
/// Largest Raft request body: a snapshot chunk or append batch, JSON-encoded.
pub const RAFT_BODY_LIMIT: usize = 64 << 20;

#[derive(Clone)]
pub struct ApiState {
    node: ConsensusNode,
    prometheus: PrometheusHandle,
    /// Mutual-TLS clients to peers, by (node id, address).
    peers: Arc<Mutex<HashMap<(u64, String), (reqwest::Client, String)>>>,
}

/// An API failure with its HTTP status; the body is `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// A rejected command carries its typed reason.
    pub rejected: Option<CommandError>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            rejected: None,
        }
    }
    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message, "rejected": self.rejected });
        (self.status, Json(body)).into_response()
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WriteBody {
    #[serde(default)]
    pub actor: Option<String>,
    /// Set by the first node that receives the write, kept when forwarded.
    #[serde(default)]
    pub at_ms: Option<u64>,
    pub command: Command,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WriteReply {
    pub applied: Applied,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinBody {
    pub id: u64,
    pub addr: String,
    /// Checked by every node the request passes (`tern cluster join-token`).
    #[serde(default)]
    pub join_token: Option<String>,
}

/// Voters the automatic rule keeps; further hosts stay learners (they run VMs all the same).
pub const MAX_VOTERS: usize = 5;

#[derive(Debug, Serialize, Deserialize)]
pub struct RemoveBody {
    pub id: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    pub addr: String,
    pub voter: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub id: u64,
    pub state: String,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub members: Vec<Member>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        // Append batches and snapshot chunks are large (JSON-encoded bytes); only member nodes
        // get this far (the auth middleware runs before any body is read).
        .route(
            APPEND_PATH,
            post(raft_append).layer(DefaultBodyLimit::max(RAFT_BODY_LIMIT)),
        )
        .route(VOTE_PATH, post(raft_vote))
        .route(
            SNAPSHOT_PATH,
            post(raft_snapshot).layer(DefaultBodyLimit::max(RAFT_BODY_LIMIT)),
        )
        .route("/v1/status", get(status))
        .route("/v1/state", get(read_state))
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/write", post(write))
        .route("/v1/members/join", post(join))
        .route("/v1/members/remove", post(remove))
        .route("/metrics", get(prometheus))
        .with_state(state)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ApiState {
    pub fn new(node: ConsensusNode, prometheus: PrometheusHandle) -> anyhow::Result<Self> {
        Ok(ApiState {
            node,
            prometheus,
            peers: Arc::default(),
        })
    }

    pub fn node(&self) -> &ConsensusNode {
        &self.node
    }

    /// A mutual-TLS client to the member at `addr` and its base URL: the member's certificate
    /// must name the node id the membership gives that address.
    fn peer(&self, addr: &str) -> Result<(reqwest::Client, String), ApiError> {
        let m = self.node.raft.metrics().borrow().clone();
        let id = m
            .membership_config
            .membership()
            .nodes()
            .find(|(_, n)| n.addr == addr)
            .map(|(id, _)| *id)
            .ok_or_else(|| ApiError::unavailable(format!("{addr} is not a cluster member")))?;
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = peers.get(&(id, addr.to_string())) {
            return Ok(c.clone());
        }
        let c = self
            .node
            .peers
            .client(id, addr, Some(Duration::from_secs(10)))
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
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
    ) -> Result<R, ApiError> {
        let (client, base) = self.peer(addr)?;
        let mut request = client.post(format!("{base}{path}")).json(body);
        if as_forward {
            request = request.header(FORWARDED, "1");
        }
        let reply = request
            .send()
            .await
            .map_err(|e| ApiError::unavailable(format!("forwarding to {addr}: {e}")))?;
        decode_reply(reply).await
    }

    pub async fn get_json<R: serde::de::DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
    ) -> Result<R, ApiError> {
        let (client, base) = self.peer(addr)?;
        let reply = client
            .get(format!("{base}{path}"))
            .header(FORWARDED, "1")
            .send()
            .await
            .map_err(|e| ApiError::unavailable(format!("forwarding to {addr}: {e}")))?;
        decode_reply(reply).await
    }

    /// Commit a command through the leader (forwarding if needed) and return what it produced.
    pub async fn propose(
        &self,
        actor: String,
        at_ms: Option<u64>,
        command: Command,
        forwarded: bool,
    ) -> Result<Applied, ApiError> {
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
                resp.result.map_err(|e| ApiError {
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
            Err(e) => Err(ApiError::unavailable(e.to_string())),
        }
    }

    fn forward_target(
        &self,
        forwarded: bool,
        leader: Option<BasicNode>,
    ) -> Result<String, ApiError> {
        match leader {
            _ if forwarded => Err(ApiError::unavailable(
                "not the leader (request was already forwarded)",
            )),
            Some(node) => Ok(node.addr),
            None => Err(ApiError::unavailable("no leader known (no quorum?)")),
        }
    }

    /// Linearizable read of the whole state, forwarded to the leader from a follower.
    async fn read(&self, forwarded: bool) -> Result<Arc<ClusterState>, ApiError> {
        match self.node.read().await {
            Ok(state) => Ok(state),
            Err(ConsensusError::Read(RaftError::APIError(
                CheckIsLeaderError::ForwardToLeader(f),
            ))) => {
                let leader = self.forward_target(forwarded, f.leader_node)?;
                Ok(Arc::new(self.get_json(&leader, "/v1/state").await?))
            }
            Err(e) => Err(ApiError::unavailable(e.to_string())),
        }
    }

    async fn change_membership(
        &self,
        change: ChangeMembers<u64, BasicNode>,
    ) -> Result<(), ApiError> {
        match self.node.raft.change_membership(change, false).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(
                ApiError::unavailable("leadership changed during membership change"),
            ),
            Err(e) => Err(ApiError::new(StatusCode::CONFLICT, e.to_string())),
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
) -> Result<R, ApiError> {
    let status = StatusCode::from_u16(reply.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let bytes = reply
        .bytes()
        .await
        .map_err(|e| ApiError::unavailable(format!("reading reply: {e}")))?;
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(StatusCode::BAD_GATEWAY, format!("bad reply from peer: {e}"))
        });
    }
    #[derive(Deserialize)]
    struct ErrBody {
        error: String,
        rejected: Option<CommandError>,
    }
    match serde_json::from_slice::<ErrBody>(&bytes) {
        Ok(b) => Err(ApiError {
            status,
            message: b.error,
            rejected: b.rejected,
        }),
        Err(_) => Err(ApiError::new(
            status,
            String::from_utf8_lossy(&bytes).into_owned(),
        )),
    }
}

fn is_forwarded(headers: &HeaderMap) -> bool {
    headers.contains_key(FORWARDED)
}

/// The sender of a Raft RPC must be the node its vote names: a member cannot speak for another.
fn check_sender(who: &Principal, vote: &Vote<u64>) -> Result<(), ApiError> {
    match who {
        Principal::Node(id) if vote.leader_id().voted_for() == Some(*id) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "a Raft RPC must come from the node its vote names",
        )),
    }
}

/// What openraft assumes of an append but does not check: entries numbered consecutively
/// after `prev_log_id`, terms never decreasing and never above the sender's term.
pub fn check_append(rpc: &AppendEntriesRequest<TypeConfig>) -> Result<(), String> {
    let mut index = rpc.prev_log_id.map_or(0, |l| l.index + 1);
    let mut term = rpc.prev_log_id.map_or(0, |l| l.leader_id.term);
    let vote_term = rpc.vote.leader_id().term;
    if term > vote_term {
        return Err("prev_log_id is from a later term than the sender's".into());
    }
    for e in &rpc.entries {
        if e.log_id.index != index {
            return Err(format!("entry {} where {index} was due", e.log_id.index));
        }
        if e.log_id.leader_id.term < term || e.log_id.leader_id.term > vote_term {
            return Err(format!("entry {index} has an impossible term"));
        }
        term = e.log_id.leader_id.term;
        index += 1;
    }
    if rpc.leader_commit.is_some_and(|c| c.leader_id.term > vote_term) {
        return Err("commit index from a later term than the sender's".into());
    }
    Ok(())
}

async fn raft_append(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Json(rpc): Json<AppendEntriesRequest<TypeConfig>>,
) -> Result<Response, ApiError> {
    check_sender(&who, &rpc.vote)?;
    check_append(&rpc).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    Ok(Json(s.node.raft.append_entries(rpc).await).into_response())
}

async fn raft_vote(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Json(rpc): Json<VoteRequest<u64>>,
) -> Result<Response, ApiError> {
    check_sender(&who, &rpc.vote)?;
    Ok(Json(s.node.raft.vote(rpc).await).into_response())
}

async fn raft_snapshot(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    Json(rpc): Json<InstallSnapshotRequest<TypeConfig>>,
) -> Result<Response, ApiError> {
    check_sender(&who, &rpc.vote)?;
    Ok(Json(s.node.raft.install_snapshot(rpc).await).into_response())
}

async fn status(State(s): State<ApiState>) -> Json<Status> {
    let m = s.node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, node)| Member {
            id: *id,
            addr: node.addr.clone(),
            voter: voters.contains(id),
        })
        .collect();
    let state = match m.state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    };
    Json(Status {
        id: m.id,
        state: state.to_string(),
        leader: m.current_leader,
        term: m.current_term,
        last_log_index: m.last_log_index,
        last_applied: m.last_applied.map(|l| l.index),
        snapshot_index: m.snapshot.map(|l| l.index),
        members,
    })
}

async fn read_state(
    State(s): State<ApiState>,
    headers: HeaderMap,
) -> Result<Json<ClusterState>, ApiError> {
    let state = s.read(is_forwarded(&headers)).await?;
    let mut state = (*state).clone();
    // Migration tokens authenticate streams; they never leave the nodes.
    for t in state.tasks.values_mut() {
        t.token.clear();
    }
    state.access = state.access.redacted();
    Ok(Json(state))
}

async fn list_hosts(
    State(s): State<ApiState>,
    headers: HeaderMap,
) -> Result<Json<Vec<Host>>, ApiError> {
    let state = s.read(is_forwarded(&headers)).await?;
    Ok(Json(state.hosts.values().cloned().collect()))
}

/// Commit one command. Who did it is the authenticated caller (a member node forwarding an
/// operator's request names that operator); when is the leader's clock.
async fn write(
    State(s): State<ApiState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    Json(body): Json<WriteBody>,
) -> Result<Json<WriteReply>, ApiError> {
    who.may(&body.command).map_err(|e| ApiError::new(StatusCode::FORBIDDEN, e.to_string()))?;
    let actor = who.actor_for(body.actor);
    let applied = s
        .propose(actor, None, body.command, is_forwarded(&headers))
        .await?;
    Ok(Json(WriteReply { applied }))
}

/// Add a node as learner (waiting until it has caught up), then promote it to voter while the
/// cluster has fewer than `MAX_VOTERS`. Needs a valid join token; the node must already hold a
/// certificate naming its id (`/v1/members/certify`), or the leader cannot reach it.
async fn join(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Json(body): Json<JoinBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    crate::access_api::check_join_token(&s, body.join_token.as_deref().unwrap_or(""))?;
    if s.node.raft.current_leader().await != Some(s.node.id) {
        let (_, addr) = s
            .leader_addr()
            .ok_or_else(|| ApiError::unavailable("no leader known"))?;
        let target = s.forward_target(is_forwarded(&headers), Some(BasicNode { addr }))?;
        return s
            .post_json(&target, "/v1/members/join", &body, true)
            .await
            .map(Json);
    }
    let m = s.node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let known = membership.get_node(&body.id).map(|n| n.addr.clone());
    if known.as_deref() != Some(body.addr.as_str()) {
        s.node
            .raft
            .add_learner(
                body.id,
                BasicNode {
                    addr: body.addr.clone(),
                },
                true,
            )
            .await
            .map_err(|e| ApiError::unavailable(format!("adding learner: {e}")))?;
    }
    let voters = membership.voter_ids().count();
    let voter = membership.voter_ids().any(|v| v == body.id);
    if !voter && voters < MAX_VOTERS {
        s.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([body.id])))
            .await?;
    }
    Ok(Json(
        serde_json::json!({ "joined": body.id, "voter": voter || voters < MAX_VOTERS }),
    ))
}

/// Remove a host: drop it from the cluster state (refused while it owns VMs), then from Raft.
async fn remove(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Json(body): Json<RemoveBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let forwarded = is_forwarded(&headers);
    if s.node.raft.current_leader().await != Some(s.node.id) {
        let (_, addr) = s
            .leader_addr()
            .ok_or_else(|| ApiError::unavailable("no leader known"))?;
        let target = s.forward_target(forwarded, Some(BasicNode { addr }))?;
        return s
            .post_json(&target, "/v1/members/remove", &body, true)
            .await
            .map(Json);
    }
    let m = s.node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let is_member = membership.get_node(&body.id).is_some();
    match s
        .propose(
            format!("host/{}", s.node.id),
            None,
            Command::RemoveHost { id: body.id },
            true,
        )
        .await
    {
        Ok(_) => {}
        Err(ApiError {
            rejected: Some(CommandError::UnknownHost { .. }),
            ..
        }) if is_member => {}
        Err(e) => return Err(e),
    }
    if membership.voter_ids().any(|v| v == body.id) {
        s.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([body.id])))
            .await?;
    }
    if is_member {
        s.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([body.id])))
            .await?;
    }
    Ok(Json(serde_json::json!({ "removed": body.id })))
}

async fn prometheus(State(s): State<ApiState>) -> String {
    s.prometheus.render()
}
