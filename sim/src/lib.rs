//! tern-sim: discrete-event fleet simulator running the same scheduler code as the cluster.
#![forbid(unsafe_code)]
