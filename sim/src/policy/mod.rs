//! Placement and balancing policies the engine can run.
use crate::cluster::Cluster;

pub mod baseline;
pub mod candidates;
pub mod detect;
pub mod drs;
pub mod initial;
pub mod lrmmt;
pub mod none;
pub mod plan;
pub mod select;

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
    /// Every host that is up draws its peak power whatever its load (the NPA baseline).
    fn peak_power(&self) -> bool {
        false
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

/// Every policy name the CLI takes: Tern's own, the two baselines and the consolidation
/// family (detector x selector).
pub fn names() -> Vec<String> {
    let mut out: Vec<String> = ["none", "drs", "drs+dpm", "npa", "dvfs"]
        .map(String::from)
        .into();
    for d in ["thr", "iqr", "mad", "lr", "lrr"] {
        for s in ["mmt", "mc", "rs"] {
            out.push(format!("{d}-{s}"));
        }
    }
    out
}

/// Policy by CLI name; `seed` drives random selection (RS).
pub fn by_name_seeded(name: &str, seed: u64) -> Option<Box<dyn Policy>> {
    match name {
        "none" => Some(Box::new(none::NoMigration)),
        "drs" => Some(Box::new(drs::Drs::new(false))),
        "drs+dpm" => Some(Box::new(drs::Drs::new(true))),
        "npa" => Some(Box::new(baseline::Baseline { peak_power: true })),
        "dvfs" => Some(Box::new(baseline::Baseline { peak_power: false })),
        _ => Some(Box::new(lrmmt::Consolidation::by_name(name, seed)?)),
    }
}

/// Policy by CLI name with seed 1.
pub fn by_name(name: &str) -> Option<Box<dyn Policy>> {
    by_name_seeded(name, 1)
}
