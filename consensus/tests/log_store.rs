//! The sled log store: what openraft saves is what it reads back after a reopen, and the
//! committed index it reports (for the `tern_raft_commit_index` metric) follows
//! `save_committed`, not the applied index.
use openraft::storage::RaftLogStorage;
use openraft::{CommittedLeaderId, LogId};
use tern_consensus::openraft;
use tern_consensus::store::{open_db, LogStore};

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

#[tokio::test]
async fn committed_index_follows_save_committed_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.sled");
    {
        let db = open_db(&path).unwrap();
        let mut log = LogStore::open(&db, true).unwrap();
        assert_eq!(log.committed_index(), None);
        log.save_committed(Some(log_id(1, 7))).await.unwrap();
        assert_eq!(log.committed_index(), Some(7));
        // Clones (the one openraft owns and the one the node keeps) share it.
        let mut other = log.clone();
        other.save_committed(Some(log_id(2, 12))).await.unwrap();
        assert_eq!(log.committed_index(), Some(12));
        db.flush().unwrap();
    }
    let db = open_db(&path).unwrap();
    let mut log = LogStore::open(&db, true).unwrap();
    assert_eq!(
        log.committed_index(),
        Some(12),
        "read back from disk on open"
    );
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 12)));
}
