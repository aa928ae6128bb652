//! Run metrics: energy, SLA (SLATAH, PDM, SLAV, ESV), migrations, unmet demand, timelines.
use serde::Serialize;

/// Accumulators fed by the engine at every state change.
#[derive(Debug, Default, Clone)]
pub struct Accum {
    pub energy_j: f64,
    pub host_active_s: f64,
    pub host_short_s: f64,
    pub vm_requested: f64,
    pub vm_allocated: f64,
    pub vm_short_in_migration: f64,
    /// Shortfall beyond the migration overhead: the host could not give what was asked.
    pub vm_short_contention: f64,
    pub migrations: u64,
    pub bytes_moved: f64,
    pub downtimes_s: Vec<f64>,
    pub rejected_moves: u64,
    pub restarts: u64,
    pub peak_ram_ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimePoint {
    pub t_s: f64,
    /// Demand of all VMs over the capacity of all hosts that are up.
    pub load: f64,
    /// Standard deviation of demand/capacity over the hosts that hold VMs.
    pub imbalance: f64,
    pub active_hosts: usize,
    /// Share of demanded MIPS not served at this instant.
    pub unmet: f64,
    /// Migrations started since the run began (before this tick's moves).
    pub migrations: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Downtime {
    pub count: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub policy: String,
    pub hosts: usize,
    pub vms: usize,
    pub simulated_s: f64,
    pub seed: u64,
    pub energy_kwh: f64,
    /// SLA violation time per active host (fraction).
    pub slatah: f64,
    /// Performance degradation due to migrations (fraction).
    pub pdm: f64,
    pub slav: f64,
    pub esv: f64,
    pub migrations: u64,
    pub bytes_moved: f64,
    /// Share of all demanded MIPS-seconds not served (migration overhead included).
    pub unmet_demand: f64,
    /// Share of demanded MIPS-seconds not served because a host was short of CPU: the
    /// unmet demand without the 10 % a migrating VM loses by construction (PDM counts that).
    pub contention_unmet: f64,
    pub mean_imbalance: f64,
    pub mean_active_hosts: f64,
    pub rejected_moves: u64,
    pub restarts: u64,
    /// Highest memory use of any host over its memory, over the whole run.
    pub peak_ram_ratio: f64,
    pub downtime: Downtime,
    /// The fleet's demand against its capacity (set by the CLI, which computes it first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commitment: Option<crate::commitment::Commitment>,
    pub timeline: Vec<TimePoint>,
}

impl Accum {
    pub fn report(
        mut self,
        policy: &str,
        hosts: usize,
        vms: usize,
        simulated_s: f64,
        seed: u64,
        timeline: Vec<TimePoint>,
    ) -> Report {
        let slatah = ratio(self.host_short_s, self.host_active_s);
        let pdm = ratio(self.vm_short_in_migration, self.vm_requested);
        let energy_kwh = self.energy_j / 3.6e6;
        let n = timeline.len().max(1) as f64;
        self.downtimes_s.sort_by(f64::total_cmp);
        let pct = |p: f64| -> f64 {
            if self.downtimes_s.is_empty() {
                return 0.0;
            }
            let i = ((self.downtimes_s.len() - 1) as f64 * p).round() as usize;
            self.downtimes_s[i] * 1000.0
        };
        let downtime = Downtime {
            count: self.downtimes_s.len(),
            p50_ms: pct(0.5),
            p95_ms: pct(0.95),
            p99_ms: pct(0.99),
            max_ms: self.downtimes_s.last().copied().unwrap_or(0.0) * 1000.0,
        };
        Report {
            policy: policy.to_string(),
            hosts,
            vms,
            simulated_s,
            seed,
            energy_kwh,
            slatah,
            pdm,
            slav: slatah * pdm,
            esv: energy_kwh * slatah * pdm,
            migrations: self.migrations,
            bytes_moved: self.bytes_moved,
            unmet_demand: ratio(self.vm_requested - self.vm_allocated, self.vm_requested),
            contention_unmet: ratio(self.vm_short_contention, self.vm_requested),
            mean_imbalance: timeline.iter().map(|p| p.imbalance).sum::<f64>() / n,
            mean_active_hosts: timeline.iter().map(|p| p.active_hosts as f64).sum::<f64>() / n,
            rejected_moves: self.rejected_moves,
            restarts: self.restarts,
            peak_ram_ratio: self.peak_ram_ratio,
            downtime,
            commitment: None,
            timeline,
        }
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        (a / b).max(0.0)
    } else {
        0.0
    }
}
