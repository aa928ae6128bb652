//! Cluster membership: this node's Raft status, and adding (learner, then voter) or removing a
//! host. Membership changes run on the leader; a follower forwards them once.
use std::collections::BTreeSet;
use std::time::Duration;

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
        // Not blocking: openraft's own wait for a learner to catch up has no end, and a node
        // that never catches up must not hold the join queue (`wait_caught_up` has a deadline).
        c.node
            .raft
            .add_learner(
                body.id,
                BasicNode {
                    addr: body.addr.clone(),
                },
                false,
            )
            .await
            .map_err(|e| ServiceError::unavailable(format!("adding learner: {e}")))?;
    }
    let caught_up = wait_caught_up(c, body.id, CATCH_UP_WITHIN).await;
    // The membership as it is now that the learner is in.
    let m = c.node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters = membership.voter_ids().count();
    let voter = membership.voter_ids().any(|v| v == body.id);
    match promotion(voters, voter, caught_up, MAX_VOTERS) {
        Promotion::Promote => {
            c.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([body.id])))
                .await?;
            Ok(serde_json::json!({ "joined": body.id, "voter": true }))
        }
        Promotion::AlreadyVoter => Ok(serde_json::json!({ "joined": body.id, "voter": true })),
        Promotion::StayLearner => Ok(serde_json::json!({ "joined": body.id, "voter": false })),
        Promotion::NotCaughtUp => Err(ServiceError::unavailable(format!(
            "node {} joined as a learner but has not caught up within {}s; it stays a \
             learner (the voters, and so the quorum, are unchanged): ask again to retry",
            body.id,
            CATCH_UP_WITHIN.as_secs()
        ))),
    }
}

/// How long a joining learner has to catch up before the join gives up promoting it.
pub const CATCH_UP_WITHIN: Duration = Duration::from_secs(30);

/// What becomes of a node that asked to join, now that it is a learner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    /// Caught up and the cluster has fewer than the most voters: make it a voter.
    Promote,
    AlreadyVoter,
    /// The cluster has its voters: the node stays a learner (and runs VMs all the same).
    StayLearner,
    /// Never promote a node that is behind: with it a voter, a quorum could need it.
    NotCaughtUp,
}

/// The automatic rule for a learner: `voters` the cluster has now, whether the node is one,
/// whether its log has caught up with the leader's, and the most voters to keep.
pub fn promotion(voters: usize, is_voter: bool, caught_up: bool, max_voters: usize) -> Promotion {
    if is_voter {
        Promotion::AlreadyVoter
    } else if voters >= max_voters {
        Promotion::StayLearner
    } else if !caught_up {
        Promotion::NotCaughtUp
    } else {
        Promotion::Promote
    }
}

/// Whether a follower that has `matched` the leader's log up to this index is caught up with a
/// leader whose last entry is `leader_last`: within a heartbeat's worth of entries.
pub fn is_caught_up(matched: Option<u64>, leader_last: Option<u64>) -> bool {
    match (matched, leader_last) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(m), Some(l)) => m + CAUGHT_UP_SLACK >= l,
    }
}

/// Entries a learner may still be behind and count as caught up.
const CAUGHT_UP_SLACK: u64 = 10;

/// Wait (up to `within`) until this leader has replicated to node `id` up to its log's end.
async fn wait_caught_up(c: &Cluster, id: u64, within: Duration) -> bool {
    let mut rx = c.node.raft.metrics();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ok = {
            let m = rx.borrow_and_update();
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned().flatten())
                .map(|l| l.index);
            is_caught_up(matched, m.last_log_index)
        };
        if ok {
            return true;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => return false,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learners_become_voters_only_caught_up_and_up_to_the_most_voters() {
        // Seven hosts joining one by one, each caught up: five voters, then learners.
        let mut voters = 1;
        let mut learners = 0;
        for _ in 2..=7 {
            match promotion(voters, false, true, MAX_VOTERS) {
                Promotion::Promote => voters += 1,
                Promotion::StayLearner => learners += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((voters, learners), (5, 2));
        // A node that never catches up is never promoted: the quorum stays as it was.
        assert_eq!(promotion(3, false, false, 5), Promotion::NotCaughtUp);
        assert_eq!(promotion(5, false, false, 5), Promotion::StayLearner);
        assert_eq!(promotion(3, true, false, 5), Promotion::AlreadyVoter);
    }

    #[test]
    fn caught_up_means_within_a_few_entries_of_the_leader() {
        assert!(is_caught_up(None, None));
        assert!(!is_caught_up(None, Some(0)));
        assert!(is_caught_up(Some(95), Some(100)));
        assert!(!is_caught_up(Some(50), Some(100)));
        assert!(is_caught_up(Some(100), Some(100)));
    }
}
