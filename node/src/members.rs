//! Cluster membership: this node's Raft status, and adding (learner, then voter) or removing a
//! host. Membership changes run on the leader; a follower forwards them once.
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use tern_consensus::openraft::{BasicNode, ChangeMembers, ServerState};
use tern_consensus::state::Command;
use tern_consensus::CommandError;

use super::access::check_join_token;
use super::cluster::Cluster;
use super::error::ServiceError;

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

/// This node's view of Raft: role, leader, term, log positions, members.
pub fn status(c: &Cluster) -> Status {
    let m = c.node.raft.metrics().borrow().clone();
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
    Status {
        id: m.id,
        state: state.to_string(),
        leader: m.current_leader,
        term: m.current_term,
        last_log_index: m.last_log_index,
        last_applied: m.last_applied.map(|l| l.index),
        snapshot_index: m.snapshot.map(|l| l.index),
        members,
    }
}

/// The leader's address to forward a membership request to, or `None` when this node leads.
async fn forward_to_leader(c: &Cluster, forwarded: bool) -> Result<Option<String>, ServiceError> {
    if c.node.raft.current_leader().await == Some(c.node.id) {
        return Ok(None);
    }
    let (_, addr) = c
        .leader_addr()
        .ok_or_else(|| ServiceError::unavailable("no leader known"))?;
    c.forward_target(forwarded, Some(BasicNode { addr }))
        .map(Some)
}

/// Add a node as learner (waiting until it has caught up), then promote it to voter while the
/// cluster has fewer than `MAX_VOTERS`. Needs a valid join token; the node must already hold a
/// certificate naming its id (`access::certify`), or the leader cannot reach it.
pub async fn join(
    c: &Cluster,
    body: JoinBody,
    forwarded: bool,
) -> Result<serde_json::Value, ServiceError> {
    check_join_token(c, body.join_token.as_deref().unwrap_or(""))?;
    if let Some(target) = forward_to_leader(c, forwarded).await? {
        return c.post_json(&target, "/v1/members/join", &body, true).await;
    }
    // One join at a time, so that concurrent joins cannot all count the same voters and
    // together promote more than `MAX_VOTERS`.
    static JOINS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one_at_a_time = JOINS.lock().await;
    let m = c.node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let known = membership.get_node(&body.id).map(|n| n.addr.clone());
    if known.as_deref() != Some(body.addr.as_str()) {
        c.node
            .raft
            .add_learner(
                body.id,
                BasicNode {
                    addr: body.addr.clone(),
                },
                true,
            )
            .await
            .map_err(|e| ServiceError::unavailable(format!("adding learner: {e}")))?;
    }
    // The membership as it is now that the learner is in.
    let m = c.node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters = membership.voter_ids().count();
    let voter = membership.voter_ids().any(|v| v == body.id);
    if !voter && voters < MAX_VOTERS {
        c.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([body.id])))
            .await?;
    }
    Ok(serde_json::json!({ "joined": body.id, "voter": voter || voters < MAX_VOTERS }))
}

/// Remove a host: drop it from the cluster state (refused while it owns VMs), then from Raft.
pub async fn remove(
    c: &Cluster,
    body: RemoveBody,
    forwarded: bool,
) -> Result<serde_json::Value, ServiceError> {
    if let Some(target) = forward_to_leader(c, forwarded).await? {
        return c
            .post_json(&target, "/v1/members/remove", &body, true)
            .await;
    }
    let m = c.node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let is_member = membership.get_node(&body.id).is_some();
    match c
        .propose(
            format!("host/{}", c.node.id),
            None,
            Command::RemoveHost { id: body.id },
            true,
        )
        .await
    {
        Ok(_) => {}
        Err(ServiceError {
            rejected: Some(CommandError::UnknownHost { .. }),
            ..
        }) if is_member => {}
        Err(e) => return Err(e),
    }
    if membership.voter_ids().any(|v| v == body.id) {
        c.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([body.id])))
            .await?;
    }
    if is_member {
        c.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([body.id])))
            .await?;
    }
    Ok(serde_json::json!({ "removed": body.id }))
}
