//! Placement and balancing policies the engine can run.
use crate::cluster::Cluster;

pub mod drs;
pub mod initial;
pub mod lrmmt;
pub mod none;
pub mod plan;

/// Start a live migration of `vm` to host `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub vm: usize,
    pub to: usize,
}

pub trait Policy {
    fn name(&self) -> String;
    /// How many demand samples per VM the policy needs kept (0: none).
    fn history_len(&self) -> usize {
        0
    }
    /// A host for each VM at the start, or None when nothing fits.
    fn initial_placement(&mut self, c: &Cluster) -> Vec<Option<usize>>;
    /// Hosts for VMs that lost theirs (host failure), in order.
    fn restart(&mut self, c: &Cluster, vms: &[usize]) -> Vec<Option<usize>>;
    /// Moves that empty host `h` (entering maintenance).
    fn evacuate(&mut self, c: &Cluster, h: usize) -> Vec<Move>;
    /// Moves to start at scheduling tick `t`.
    fn optimize(&mut self, c: &Cluster, t: f64) -> Vec<Move>;
}

/// Policy by CLI name.
pub fn by_name(name: &str) -> Option<Box<dyn Policy>> {
    match name {
        "none" => Some(Box::new(none::NoMigration)),
        "lr-mmt" => Some(Box::new(lrmmt::LrMmt)),
        "drs" => Some(Box::new(drs::Drs::new(false))),
        "drs+dpm" => Some(Box::new(drs::Drs::new(true))),
        _ => None,
    }
}
