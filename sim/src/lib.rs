//! tern-sim: discrete-event fleet simulator running the same scheduler code as the cluster.
//!
//! A [`fleet::Fleet`] (hosts, VMs, workloads) runs under a [`policy::Policy`] in
//! [`engine::run`], which returns a [`metrics::Report`].
#![forbid(unsafe_code)]

pub mod cluster;
pub mod commitment;
pub mod engine;
pub mod error;
pub mod fleet;
pub mod metrics;
pub mod migration;
pub mod plot;
pub mod policy;
pub mod power;
pub mod sweep;
pub mod trace;
pub mod workload;

pub use engine::run;
pub use error::{Result, SimError};
