//! Reading a stopped node's sled data directly, to check what it holds on disk.
use std::collections::BTreeMap;
use std::path::Path;

use tern_consensus::openraft::storage::RaftLogStorage;
use tern_consensus::openraft::RaftLogReader;
use tern_consensus::store::{open_db, LogStore};

/// A node's on-disk Raft log: each entry as JSON (log id and payload) by index.
pub struct DiskLog {
    pub committed: Option<u64>,
    pub entries: BTreeMap<u64, String>,
}

impl DiskLog {
    /// Whether any entry at or below the committed index contains `needle` (in its JSON).
    pub fn committed_contains(&self, needle: &str) -> bool {
        let upto = self.committed.unwrap_or(0);
        self.entries.range(..=upto).any(|(_, e)| e.contains(needle))
    }
}

/// Open the (stopped) node's data directory and read its whole log and committed index.
pub fn read_log(data_dir: &Path) -> DiskLog {
    let db = open_db(&data_dir.join("raft.sled")).expect("open node's sled (is it stopped?)");
    let mut log = LogStore::open(&db, true).expect("open log");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let committed = log
            .read_committed()
            .await
            .expect("committed")
            .map(|c| c.index);
        let entries = log
            .try_get_log_entries(0..)
            .await
            .expect("log entries")
            .into_iter()
            .map(|e| {
                let json = serde_json::to_string(&e).expect("entry to json");
                (e.log_id.index, json)
            })
            .collect();
        DiskLog { committed, entries }
    })
}

/// Assert that the logs agree on every index all of them hold as committed, and return that
/// index. A committed entry that differs between two nodes is a Raft safety violation.
pub fn assert_committed_prefix_agrees(logs: &[(u64, DiskLog)]) -> u64 {
    let upto = logs
        .iter()
        .map(|(_, l)| l.committed.unwrap_or(0))
        .min()
        .unwrap_or(0);
    let (first_id, first) = &logs[0];
    for (id, log) in &logs[1..] {
        for index in 1..=upto {
            // Entries below a purged prefix are absent on every node alike here (no snapshots).
            assert_eq!(
                first.entries.get(&index),
                log.entries.get(&index),
                "committed entry {index} differs between node {first_id} and node {id}"
            );
        }
    }
    upto
}
