//! The migration wizard: every host scored for one VM, or why it is excluded; and placement
//! of a new VM.
use crate::choose::SOFT_PENALTY;
use crate::cluster::Cluster;
use crate::constraints::{movable, soft_violations, violations};
use crate::load::{LoadState, NOWHERE};
use crate::model::Vm;
use crate::plan::Config;
use crate::SchedError;
use serde::{Deserialize, Serialize};

/// A host the VM may go to, best first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub host: String,
    /// 100 x (1 - imbalance after - 0.1 per broken `should` rule): higher is better.
    pub score: f64,
    pub imbalance_after: f64,
    pub cpu_load_after: f64,
    pub memory_load_after: f64,
    pub reasons: Vec<String>,
}

/// A host the VM may not go to, with every reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Excluded {
    pub host: String,
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ranking {
    pub vm: String,
    /// Current host (none when placing a new VM).
    pub from: Option<String>,
    /// Set when the VM itself cannot migrate (do-not-migrate, in flight, host down).
    pub blocked: Option<String>,
    pub imbalance_now: f64,
    pub candidates: Vec<Candidate>,
    pub excluded: Vec<Excluded>,
}

/// Where a new VM should be powered on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// Best host, none if no host can take it (see `ranking.excluded`).
    pub host: Option<String>,
    pub ranking: Ranking,
}

/// Score every host as a destination for VM `vm`.
pub fn rank_destinations(cluster: &Cluster, vm: &str, cfg: &Config) -> Result<Ranking, SchedError> {
    cfg.validate()?;
    let v = *cluster
        .vm_ix
        .get(vm)
        .ok_or_else(|| SchedError::UnknownVm(vm.to_string()))?;
    let s = LoadState::new(cluster);
    let blocked = movable(&s, v).err();
    Ok(rank(&s, v, cfg, blocked))
}

/// Choose a host for a new VM (its `host` field is ignored; it may not appear in rules).
pub fn place(cluster: &Cluster, vm: &Vm, cfg: &Config) -> Result<Placement, SchedError> {
    cfg.validate()?;
    if cluster.vm_ix.contains_key(&vm.id) {
        return Err(SchedError::InvalidVm(format!(
            "vm id {:?} already exists",
            vm.id
        )));
    }
    let first = cluster
        .snap
        .hosts
        .first()
        .ok_or_else(|| SchedError::InvalidVm("the cluster has no hosts".into()))?;
    let mut snap = cluster.snap.clone();
    let mut new_vm = vm.clone();
    new_vm.host = first.id.clone();
    snap.vms.push(new_vm);
    // Rebuilding validates the VM and gives it its entitlement under the cluster's contention.
    let with = Cluster::new(snap).map_err(|e| SchedError::InvalidVm(e.to_string()))?;
    let v = with.snap.vms.len() - 1;
    let mut s = LoadState::new(&with);
    s.detach(v);
    let ranking = rank(&s, v, cfg, None);
    let host = ranking.candidates.first().map(|c| c.host.clone());
    Ok(Placement { host, ranking })
}

fn rank(s: &LoadState, v: usize, cfg: &Config, blocked: Option<String>) -> Ranking {
    let c = s.c;
    let from = (s.vm_host[v] != NOWHERE).then(|| s.vm_host[v]);
    let now = s.imbalance();
    let vm = &c.snap.vms[v];
    let (dc, dm) = (c.cpu_ent[v], c.mem_ent[v]);
    let mut candidates = Vec::new();
    let mut excluded = Vec::new();
    for h in 0..c.snap.hosts.len() {
        let host = &c.snap.hosts[h];
        let why = violations(s, v, h, &[]);
        if !why.is_empty() {
            excluded.push(Excluded {
                host: host.id.clone(),
                reasons: why,
            });
            continue;
        }
        let after = s.imbalance_if(dc, dm, from, h);
        let soft = soft_violations(s, v, h);
        let cpu_after = (s.cpu[h] + dc) / host.cpu_mhz;
        let mem_after = (s.mem[h] + dm) / host.memory_mib;
        let mut reasons = vec![format!("imbalance {now:.4} -> {after:.4}")];
        reasons.push(format!(
            "load after: CPU {:.0}%, memory {:.0}% ({:.0} MiB free)",
            100.0 * cpu_after,
            100.0 * mem_after,
            host.memory_mib - s.mem[h] - dm
        ));
        if from.is_some() {
            match cfg.migration_secs(vm.memory_mib, vm.dirty_rate_mib_s) {
                Some(t) => reasons.push(format!("estimated migration {t:.1} s")),
                None => {
                    reasons.push("dirty rate exceeds link bandwidth: needs auto-converge".into())
                }
            }
        }
        reasons.extend(soft.iter().map(|r| format!("breaks {r}")));
        candidates.push(Candidate {
            host: host.id.clone(),
            score: 100.0 * (1.0 - after - SOFT_PENALTY * soft.len() as f64),
            imbalance_after: after,
            cpu_load_after: cpu_after,
            memory_load_after: mem_after,
            reasons,
        });
    }
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.host.cmp(&b.host)));
    Ranking {
        vm: vm.id.clone(),
        from: from.map(|h| c.snap.hosts[h].id.clone()),
        blocked,
        imbalance_now: now,
        candidates,
        excluded,
    }
}
