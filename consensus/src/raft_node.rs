//! Opening a Raft member: sled storage under the data directory, the HTTP network, and
//! timeouts tuned for a LAN (loopback in tests).
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, Config, SnapshotPolicy};

use crate::network::{HttpNetworkFactory, PeerTls};
use crate::state::ClusterState;
use crate::store::{open_db, LogStore, StateMachineStore, StateView};
use crate::{NodeId, Raft, Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    #[error("opening storage: {0}")]
    Storage(#[from] sled::Error),
    #[error("state machine storage: {0}")]
    StateMachine(#[from] crate::StorageError),
    #[error("raft config: {0}")]
    Config(#[from] openraft::ConfigError),
    #[error("raft: {0}")]
    Fatal(#[from] openraft::error::Fatal<NodeId>),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("write: {0}")]
    Write(#[from] RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>),
    #[error("read: {0}")]
    Read(#[from] RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>),
    /// The entry may still commit later (it is in this node's log): the caller must treat the
    /// outcome as unknown, not as failed.
    #[error("write not committed within {ms} ms (no quorum reachable?); its outcome is unknown")]
    Timeout { ms: u64 },
}

/// Bytes of snapshot per install-snapshot request.
pub const SNAPSHOT_CHUNK: usize = 1 << 20;

/// Raft timing and log compaction knobs.
#[derive(Clone, Debug)]
pub struct RaftOptions {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot (for followers slightly behind).
    pub keep_after_snapshot: u64,
    /// Flush sled before acknowledging log appends (turn off only to measure its cost).
    pub durable: bool,
    /// How long `write` waits for its entry to commit before answering `Timeout`.
    pub write_timeout_ms: u64,
    /// Outgoing peer connections leave from this address (the node's listen IP), so peers and
    /// test proxies can tell which node is calling. `None`: the kernel picks.
    pub source_ip: Option<IpAddr>,
}

impl Default for RaftOptions {
    fn default() -> Self {
        RaftOptions {
            heartbeat_ms: 100,
            election_min_ms: 300,
            election_max_ms: 600,
            snapshot_every: 5000,
            keep_after_snapshot: 1000,
            durable: true,
            write_timeout_ms: 5000,
            source_ip: None,
        }
    }
}

/// A running Raft member with its storage handles.
#[derive(Clone)]
pub struct ConsensusNode {
    pub id: NodeId,
    pub addr: String,
    pub raft: Raft,
    pub machine: StateMachineStore,
    /// See `RaftOptions::source_ip`; the node's other peer clients should use it too.
    pub source_ip: Option<IpAddr>,
    /// How this node reaches its peers (mutual TLS); the node's other peer calls use it too.
    pub peers: PeerTls,
    log: LogStore,
    write_timeout: Duration,
}

impl ConsensusNode {
    pub async fn open(
        id: NodeId,
        addr: String,
        data_dir: &Path,
        opts: &RaftOptions,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, ConsensusError> {
        let config = Config {
            cluster_name: "tern".to_string(),
            heartbeat_interval: opts.heartbeat_ms,
            election_timeout_min: opts.election_min_ms,
            election_timeout_max: opts.election_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(opts.snapshot_every),
            max_in_snapshot_log_to_keep: opts.keep_after_snapshot,
            purge_batch_size: 256,
            // Snapshots of any size travel in chunks small enough for one request each (JSON
            // makes a chunk up to 4x larger; the peer's body limit is far above that), with
            // time for a loaded peer to take each one.
            snapshot_max_chunk_size: SNAPSHOT_CHUNK as u64,
            install_snapshot_timeout: 10_000,
            ..Default::default()
        }
        .validate()?;
        let peers = PeerTls {
            config: tls,
            self_id: id,
            source_ip: opts.source_ip,
        };
        let db = open_db(&data_dir.join("raft.sled"))?;
        let log = LogStore::open(&db, opts.durable)?;
        let machine = StateMachineStore::open(&db)?;
        let raft = Raft::new(
            id,
            Arc::new(config),
            HttpNetworkFactory::new(peers.clone()),
            log.clone(),
            machine.clone(),
        )
        .await?;
        Ok(ConsensusNode {
            id,
            addr,
            raft,
            machine,
            source_ip: opts.source_ip,
            peers,
            log,
            write_timeout: Duration::from_millis(opts.write_timeout_ms),
        })
    }

    /// Make this node a one-member cluster, unless it already has state.
    pub async fn bootstrap(&self) -> Result<(), ConsensusError> {
        if self.raft.is_initialized().await? {
            return Ok(());
        }
        let mut members = BTreeMap::new();
        members.insert(
            self.id,
            BasicNode {
                addr: self.addr.clone(),
            },
        );
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(e)) => {
                tracing::info!("bootstrap skipped: {e}");
                Ok(())
            }
            Err(RaftError::Fatal(f)) => Err(f.into()),
        }
    }

    /// Propose a command on this node (which must be the leader) and wait for it to apply.
    /// Gives up after `RaftOptions::write_timeout_ms` with `Timeout` (outcome unknown).
    pub async fn write(&self, req: Request) -> Result<Response, ConsensusError> {
        match tokio::time::timeout(self.write_timeout, self.raft.client_write(req)).await {
            Ok(result) => Ok(result?.data),
            Err(_) => Err(ConsensusError::Timeout {
                ms: self.write_timeout.as_millis() as u64,
            }),
        }
    }

    /// The highest log index this node knows to be committed (openraft 0.9's metrics only
    /// report the applied index, which trails it).
    pub fn committed_index(&self) -> Option<u64> {
        self.log.committed_index()
    }

    /// A linearizable read: confirms leadership with a quorum and waits until this node has
    /// applied everything committed before the read began.
    pub async fn read(&self) -> Result<Arc<ClusterState>, ConsensusError> {
        self.raft.ensure_linearizable().await?;
        Ok(self.machine.view().state)
    }

    /// The latest applied state on this node (may be stale on a follower).
    pub fn local_view(&self) -> StateView {
        self.machine.view()
    }
}
