//! The fleet's demand against its capacity, computed before a run: whether a fleet is
//! over-committed is a property of its shape, not of the policy that runs it.
use crate::fleet::Fleet;
use serde::Serialize;

/// Samples per simulated hour used for the demand figures (every 5 minutes).
const SAMPLES_PER_HOUR: f64 = 12.0;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Commitment {
    /// MIPS of all hosts.
    pub cpu_capacity_mips: f64,
    /// Sum of every VM's full size over the capacity (above 1: not every VM can run at full
    /// size at once; placements that reserve full sizes cannot hold the fleet).
    pub full_size_ratio: f64,
    /// Mean over time of the fleet's total CPU demand over the capacity.
    pub mean_demand_ratio: f64,
    /// Highest total CPU demand at one instant over the capacity.
    pub peak_demand_ratio: f64,
    /// VM memory over host memory (memory is never over-committed by the simulator).
    pub memory_ratio: f64,
    /// Share of the sampled instants at which total demand exceeded `HIGH_DEMAND` of capacity.
    pub time_above_high: f64,
}

/// Fleet-wide demand above this share of capacity leaves a policy no room to pack or to
/// absorb a host failure (the VMware DRS guidance keeps clusters under 80 %).
pub const HIGH_DEMAND: f64 = 0.8;

impl Commitment {
    pub fn of(fleet: &Fleet) -> Commitment {
        let cap: f64 = fleet.hosts.iter().map(|h| h.total_mips()).sum();
        let ram_cap: f64 = fleet.hosts.iter().map(|h| h.ram_mb as f64).sum();
        let full: f64 = fleet.vms.iter().map(|v| v.total_mips()).sum();
        let ram: f64 = fleet.vms.iter().map(|v| v.ram_mb as f64).sum();
        let samples = ((fleet.duration_s / 3600.0) * SAMPLES_PER_HOUR)
            .ceil()
            .max(1.0) as usize;
        let step = fleet.duration_s / samples as f64;
        let (mut sum, mut peak, mut high) = (0.0, 0.0f64, 0usize);
        for k in 0..samples {
            let t = k as f64 * step;
            let d: f64 = fleet
                .vms
                .iter()
                .map(|v| v.workload.at(t) * v.total_mips())
                .sum();
            sum += d;
            peak = peak.max(d);
            if d > HIGH_DEMAND * cap {
                high += 1;
            }
        }
        let r = |x: f64, of: f64| if of > 0.0 { x / of } else { f64::INFINITY };
        Commitment {
            cpu_capacity_mips: cap,
            full_size_ratio: r(full, cap),
            mean_demand_ratio: r(sum / samples as f64, cap),
            peak_demand_ratio: r(peak, cap),
            memory_ratio: r(ram, ram_cap),
            time_above_high: high as f64 / samples as f64,
        }
    }

    /// Over-committed: the fleet's demand at its peak exceeds what the hosts have, or its
    /// memory does not fit. No policy can then serve all demand.
    pub fn over_committed(&self) -> bool {
        self.peak_demand_ratio > 1.0 || self.memory_ratio > 1.0
    }

    /// A few lines for the operator, ending with the verdict.
    pub fn describe(&self) -> String {
        let verdict = if self.over_committed() {
            "OVER-COMMITTED: demand at its peak or memory exceeds the hosts; no policy can serve it all"
        } else if self.peak_demand_ratio > HIGH_DEMAND {
            "tight: demand fits, but its peak leaves under 20 % headroom"
        } else {
            "demand fits the hosts"
        };
        format!(
            "fleet demand vs capacity: mean {:.0} %, peak {:.0} % (above {:.0} % for {:.0} % of the time); \
             full sizes {:.0} %; memory {:.0} %\nverdict: {verdict}{}",
            100.0 * self.mean_demand_ratio,
            100.0 * self.peak_demand_ratio,
            100.0 * HIGH_DEMAND,
            100.0 * self.time_above_high,
            100.0 * self.full_size_ratio,
            100.0 * self.memory_ratio,
            if self.full_size_ratio > 1.0 {
                " (full sizes exceed capacity: placements that reserve full sizes cannot hold it)"
            } else {
                ""
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{HostSpec, VmSpec};
    use crate::migration::MigrationModel;
    use crate::power::PowerModel;
    use crate::workload::Workload;

    fn fleet(demands: &[f64]) -> Fleet {
        let host = HostSpec {
            pes: 1,
            pe_mips: 1000.0,
            ram_mb: 4096,
            bw_mbps: 1000.0,
            power: PowerModel::ML110_G4,
        };
        let vms = demands
            .iter()
            .map(|&d| VmSpec {
                pes: 1,
                mips: 1000.0,
                ram_mb: 1024,
                bw_mbps: 0.0,
                dirty_mb_s: 0.0,
                // 0.5 x d for the first hour, then d.
                workload: Workload::Samples {
                    samples: vec![0.5 * d, d].into(),
                    interval_s: 3600.0,
                },
            })
            .collect();
        Fleet {
            hosts: vec![host.clone(), host],
            vms,
            interval_s: 300.0,
            duration_s: 7200.0,
            migration: MigrationModel::cloudsim(),
            events: Vec::new(),
            cloudsim_ram: false,
            cloudsim_engine: false,
            spread_initial: false,
            initial_placement: Default::default(),
        }
    }

    #[test]
    fn demand_against_capacity_by_hand() {
        // Three 1000-MIPS VMs on 2000 MIPS: full sizes 150 %, memory 3/8.
        let c = Commitment::of(&fleet(&[0.5, 0.5, 0.5]));
        assert!((c.full_size_ratio - 1.5).abs() < 1e-12);
        assert!((c.memory_ratio - 0.375).abs() < 1e-12);
        // Demand 0.25 -> 0.5 per VM over the first hour (linear), 0.5 after: peak 75 %.
        assert!((c.peak_demand_ratio - 0.75).abs() < 1e-12);
        assert!(c.mean_demand_ratio > 0.375 && c.mean_demand_ratio < 0.75);
        assert!(!c.over_committed());
        assert!(c.describe().contains("demand fits"));
        // At 0.8 each the peak is 120 % of capacity.
        let c = Commitment::of(&fleet(&[0.8, 0.8, 0.8]));
        assert!((c.peak_demand_ratio - 1.2).abs() < 1e-12);
        assert!(c.over_committed());
        assert!(c.time_above_high > 0.4, "{}", c.time_above_high);
        assert!(c.describe().contains("OVER-COMMITTED"));
    }
}
