//! The two baselines of Beloglazov & Buyya 2012 that never migrate: NPA (non power aware:
//! every host draws its peak power all the time) and DVFS (hosts draw power by their load,
//! idle hosts are off). Both place VMs first fit at full MIPS, as CloudSim's
//! `PowerVmAllocationPolicySimple` does.
use crate::cluster::Cluster;
use crate::policy::detect::Detector;
use crate::policy::lrmmt::{evacuate_pabfd, restart_pabfd};
use crate::policy::plan::Plan;
use crate::policy::{Move, Policy};

pub struct Baseline {
    /// NPA: power at 100 % on every host that is up, whatever its load.
    pub peak_power: bool,
}

/// First fit: each VM, in list order, on the first host that can take its full MIPS, one of
/// its cores on one physical core, and its memory and bandwidth.
pub fn first_fit(c: &Cluster) -> Vec<Option<usize>> {
    let mut plan = Plan::new(c);
    plan.placed_ask_nothing = true;
    (0..c.vms.len())
        .map(|v| {
            let h = (0..c.hosts.len()).find(|&h| plan.suitable(h, v));
            if let Some(h) = h {
                plan.create(h, v);
            }
            h
        })
        .collect()
}

impl Policy for Baseline {
    fn name(&self) -> String {
        if self.peak_power { "npa" } else { "dvfs" }.into()
    }
    fn peak_power(&self) -> bool {
        self.peak_power
    }
    fn initial_placement(&mut self, c: &Cluster) -> Vec<Option<usize>> {
        first_fit(c)
    }
    fn restart(&mut self, c: &Cluster, vms: &[usize]) -> Vec<Option<usize>> {
        restart_pabfd(c, vms, Detector::Thr(1.0))
    }
    fn evacuate(&mut self, c: &Cluster, h: usize) -> Vec<Move> {
        evacuate_pabfd(c, h, Detector::Thr(1.0))
    }
    fn optimize(&mut self, _c: &Cluster, _t: f64) -> Vec<Move> {
        Vec::new()
    }
}
