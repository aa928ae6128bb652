//! Checks on incoming Raft RPCs before openraft sees them: the sender must be the node its
//! vote names (a member cannot speak for another), and an append must have the shape openraft
//! assumes without checking (a malformed one panicked its core in issue 13).
use axum::http::StatusCode;
use tern_consensus::openraft::raft::AppendEntriesRequest;
use tern_consensus::openraft::Vote;
use tern_consensus::TypeConfig;

use crate::auth::Principal;
use crate::error::ServiceError;

pub fn check_sender(who: &Principal, vote: &Vote<u64>) -> Result<(), ServiceError> {
    match who {
        Principal::Node(id) if vote.leader_id().voted_for() == Some(*id) => Ok(()),
        _ => Err(ServiceError::new(
            StatusCode::FORBIDDEN,
            "a Raft RPC must come from the node its vote names",
        )),
    }
}

/// Entries numbered consecutively after `prev_log_id`, terms never decreasing and never above
/// the sender's term, and a commit position not from a later term.
pub fn check_append(rpc: &AppendEntriesRequest<TypeConfig>) -> Result<(), String> {
    let vote_term = rpc.vote.leader_id().term;
    let first = rpc.prev_log_id.map_or(0, |l| l.index + 1);
    let mut term = rpc.prev_log_id.map_or(0, |l| l.leader_id.term);
    if term > vote_term {
        return Err("prev_log_id is from a later term than the sender's".into());
    }
    for (index, e) in (first..).zip(&rpc.entries) {
        if e.log_id.index != index {
            return Err(format!("entry {} where {index} was due", e.log_id.index));
        }
        let t = e.log_id.leader_id.term;
        if t < term || t > vote_term {
            return Err(format!("entry {index} has an impossible term {t}"));
        }
        term = t;
    }
    if rpc
        .leader_commit
        .is_some_and(|c| c.leader_id.term > vote_term)
    {
        return Err("commit position from a later term than the sender's".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_consensus::openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

    fn log_id(term: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn append(
        term: u64,
        prev: Option<LogId<u64>>,
        ids: &[(u64, u64)],
    ) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(term, 1),
            prev_log_id: prev,
            leader_commit: None,
            entries: ids
                .iter()
                .map(|&(t, i)| Entry {
                    log_id: log_id(t, i),
                    payload: EntryPayload::Blank,
                })
                .collect(),
        }
    }

    #[test]
    fn well_formed_appends_pass_and_malformed_ones_are_refused() {
        assert!(check_append(&append(3, None, &[(1, 0), (2, 1), (3, 2)])).is_ok());
        assert!(check_append(&append(3, Some(log_id(2, 4)), &[(2, 5), (3, 6)])).is_ok());
        assert!(check_append(&append(3, None, &[])).is_ok());
        // A gap, a repeat, a term going back, a term above the sender's, a prev from the future.
        assert!(check_append(&append(3, None, &[(1, 0), (1, 2)])).is_err());
        assert!(check_append(&append(3, Some(log_id(2, 4)), &[(2, 4)])).is_err());
        assert!(check_append(&append(3, None, &[(2, 0), (1, 1)])).is_err());
        assert!(check_append(&append(3, None, &[(4, 0)])).is_err());
        assert!(check_append(&append(3, Some(log_id(5, 0)), &[])).is_err());
    }

    #[test]
    fn only_the_node_a_vote_names_may_send_it() {
        let vote = Vote::new(4, 2);
        assert!(check_sender(&Principal::Node(2), &vote).is_ok());
        assert!(check_sender(&Principal::Node(3), &vote).is_err());
        let op = Principal::Operator {
            name: "admin".into(),
            role: tern_consensus::access::AccessRole::Admin,
        };
        assert!(check_sender(&op, &vote).is_err());
    }
}
