//! tern-scheduler: pure, deterministic DRS (load model, imbalance, balancing plans, placement,
//! evacuation, destination ranking, migration queue). No I/O, no clock, no hidden randomness.
//!
//! Entry points: build a [`Cluster`] from a [`Snapshot`] (or JSON), then [`balance`],
//! [`evacuate`], [`rank_destinations`] or [`place`]; [`Snapshot::apply`] applies a plan's moves.
//! See docs/scheduler.md for the snapshot format and the model.
#![forbid(unsafe_code)]

mod apply;
mod balance;
mod choose;
mod cluster;
mod constraints;
pub mod entitlement;
mod error;
mod evacuate;
pub mod example;
mod load;
mod model;
mod plan;
mod queue;
mod rank;

pub use balance::balance;
pub use cluster::{Cluster, VmUpdate};
pub use error::{SchedError, SnapshotError};
pub use evacuate::{evacuate, Evacuation};
pub use model::{
    Alloc, Host, HostGroup, HostRuleMode, HostState, InFlight, Pool, PoolAlloc, Rule, Snapshot, Vm,
};
pub use plan::{balance_priority, Config, Move, MoveKind, Plan, Unresolved};
pub use queue::{Admission, MigrationQueue, QueueError, QueuePriority, Request, SlotLimits};
pub use rank::{place, rank_destinations, Candidate, Excluded, Placement, Ranking};

impl Cluster {
    /// Current imbalance (std-dev of normalized host load, CPU and memory combined).
    pub fn imbalance(&self) -> f64 {
        load::LoadState::new(self).imbalance()
    }

    /// Normalized (cpu, memory) load of a host.
    pub fn host_load(&self, host: &str) -> Option<(f64, f64)> {
        let h = *self.host_ix.get(host)?;
        let s = load::LoadState::new(self);
        Some((s.load_cpu(h), s.load_mem(h)))
    }
}
