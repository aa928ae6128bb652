//! tern-consensus: openraft with sled storage, the Raft network, and the replicated
//! `ClusterState` with its commands.
#![forbid(unsafe_code)]
