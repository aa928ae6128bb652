//! tern-consensus: openraft with sled storage, the Raft network, and the replicated
//! `ClusterState` with its commands.
#![forbid(unsafe_code)]
// openraft's StorageError is large and fixed by its traits; boxing it would not help callers.
#![allow(clippy::result_large_err)]

pub mod access;
pub mod network;
pub mod raft_node;
pub mod state;
pub mod store;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use openraft;
pub use raft_node::{ConsensusError, ConsensusNode, RaftOptions};
pub use state::{Applied, ClusterState, Command, CommandError, Request};
pub use store::{AppliedEvent, StateView};

/// The result of applying one committed command, returned to the proposer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub result: Result<Applied, CommandError>,
}

pub type NodeId = u64;

openraft::declare_raft_types!(
    /// openraft type configuration for Tern.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
