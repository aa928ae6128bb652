//! What the leader knows beyond the committed state: the recent load of every VM (a window the
//! scheduler sees as averages) and the last DRS pass.
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use tern_consensus::ClusterState;
use tern_scheduler::Move;

use super::sched_view::{Loads, VmLoad};

/// Samples of each VM kept on the leader (the scheduler sees their average).
const WINDOW: usize = 5;

#[derive(Default)]
pub struct LeaderState {
    samples: Mutex<HashMap<String, VecDeque<VmLoad>>>,
    pub last_plan: Mutex<Option<DrsReport>>,
    pub last_drs: Mutex<Option<Instant>>,
    /// When each host's last report (its heartbeat) arrived, in `clock_ms`.
    beats: Mutex<HashMap<u64, u64>>,
    started: Mutex<Option<Instant>>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DrsReport {
    pub at_ms: u64,
    pub imbalance: f64,
    pub target: Option<f64>,
    pub recommendations: Vec<Move>,
    /// Per host: (cpu load, memory load), normalized.
    pub host_load: Vec<(u64, f64, f64)>,
}

impl LeaderState {
    /// Milliseconds on this node's monotonic clock (from the first call).
    pub fn clock_ms(&self) -> u64 {
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        started
            .get_or_insert_with(Instant::now)
            .elapsed()
            .as_millis() as u64
    }

    pub fn beat(&self, host: u64) {
        let now = self.clock_ms();
        let mut beats = self.beats.lock().unwrap_or_else(|p| p.into_inner());
        beats.insert(host, now);
    }

    pub fn beats(&self) -> HashMap<u64, u64> {
        self.beats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn record(&self, vms: HashMap<String, VmLoad>) {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        for (name, load) in vms {
            let q = s.entry(name).or_default();
            q.push_back(load);
            while q.len() > WINDOW {
                q.pop_front();
            }
        }
    }

    /// Window averages, for VMs that still exist.
    pub fn loads(&self, state: &ClusterState) -> Loads {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.retain(|name, _| state.vms.contains_key(name));
        s.iter()
            .map(|(name, q)| {
                let n = q.len().max(1) as f64;
                let avg = VmLoad {
                    cpu_percent: q.iter().map(|l| l.cpu_percent).sum::<f64>() / n,
                    active_mib: (q.iter().map(|l| l.active_mib as f64).sum::<f64>() / n) as u64,
                    dirty_mib_s: q.iter().map(|l| l.dirty_mib_s).sum::<f64>() / n,
                };
                (name.clone(), avg)
            })
            .collect()
    }
}
