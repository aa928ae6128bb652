//! Maintenance mode: move every VM off a host, within capacity and rules, spread by load.
use crate::choose::best_host;
use crate::cluster::{Cluster, RuleIx};
use crate::constraints::movable;
use crate::load::LoadState;
use crate::plan::{Config, Move, MoveKind, Unresolved};
use crate::SchedError;
use serde::{Deserialize, Serialize};

/// The plan that empties one host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evacuation {
    pub host: String,
    pub moves: Vec<Move>,
    /// VMs that cannot leave, each with the reason.
    pub stuck: Vec<Unresolved>,
    pub imbalance_before: f64,
    pub imbalance_after: f64,
}

/// Plan moving every VM off `host` (for maintenance mode).
pub fn evacuate(cluster: &Cluster, host: &str, cfg: &Config) -> Result<Evacuation, SchedError> {
    cfg.validate()?;
    let h = *cluster
        .host_ix
        .get(host)
        .ok_or_else(|| SchedError::UnknownHost(host.to_string()))?;
    let mut s = LoadState::new(cluster);
    // The host being evacuated accepts nothing and leaves the balance statistics.
    s.exclude(h);
    let before = s.imbalance();
    let (moves, stuck) = evacuate_into(&mut s, h, cfg, MoveKind::Maintenance);
    Ok(Evacuation {
        host: host.to_string(),
        moves,
        stuck,
        imbalance_before: before,
        imbalance_after: s.imbalance(),
    })
}

/// Move every VM of host `h` within the bookkeeping `s`; keep-together groups move as one.
pub(crate) fn evacuate_into(
    s: &mut LoadState,
    h: usize,
    cfg: &Config,
    kind: MoveKind,
) -> (Vec<Move>, Vec<Unresolved>) {
    let c = s.c;
    let mut vms = s.host_vms[h].clone();
    // Biggest first: they are the hardest to fit.
    vms.sort_by(|&a, &b| c.mem_ent[b].total_cmp(&c.mem_ent[a]).then(a.cmp(&b)));
    let mut done = vec![false; c.snap.vms.len()];
    let mut moves = Vec::new();
    let mut stuck = Vec::new();
    let host_id = &c.snap.hosts[h].id;
    for v in vms {
        if done[v] {
            continue;
        }
        let group = together_on(s, v, h);
        for &g in &group {
            done[g] = true;
        }
        if let Some((g, why)) = group
            .iter()
            .find_map(|&g| movable(s, g).err().map(|e| (g, e)))
        {
            for &m in &group {
                let reason = if m == g {
                    why.clone()
                } else {
                    format!(
                        "kept together with vm {}, which cannot move: {why}",
                        c.snap.vms[g].id
                    )
                };
                stuck.push(Unresolved {
                    vm: c.snap.vms[m].id.clone(),
                    host: host_id.clone(),
                    reason,
                });
            }
            continue;
        }
        match best_host(s, &group) {
            Ok(to) => {
                for &m in &group {
                    let reason = match kind {
                        MoveKind::Maintenance => format!("host {host_id} is entering maintenance"),
                        _ => format!("host {host_id} is over capacity"),
                    };
                    moves.push(make_move(s, m, to, 1, kind, reason, cfg));
                }
            }
            Err(why) => {
                for &m in &group {
                    stuck.push(Unresolved {
                        vm: c.snap.vms[m].id.clone(),
                        host: host_id.clone(),
                        reason: why.clone(),
                    });
                }
            }
        }
    }
    (moves, stuck)
}

/// `v` plus every VM sharing a keep-together rule with it on host `h` (transitively).
pub(crate) fn together_on(s: &LoadState, v: usize, h: usize) -> Vec<usize> {
    let c = s.c;
    let mut group = vec![v];
    let mut k = 0;
    while k < group.len() {
        let x = group[k];
        for &r in &c.vm_rules[x] {
            if let RuleIx::KeepTogether(members) = &c.rules[r] {
                for &m in members {
                    if s.vm_host[m] == h && !group.contains(&m) {
                        group.push(m);
                    }
                }
            }
        }
        k += 1;
    }
    group
}

/// Record a move of `v` to `to` in `s` and describe it.
pub(crate) fn make_move(
    s: &mut LoadState,
    v: usize,
    to: usize,
    priority: u8,
    kind: MoveKind,
    reason: String,
    cfg: &Config,
) -> Move {
    let c = s.c;
    let from = s.vm_host[v];
    let before = s.imbalance();
    s.apply(v, to);
    let vm = &c.snap.vms[v];
    Move {
        vm: vm.id.clone(),
        from: c.snap.hosts[from].id.clone(),
        to: c.snap.hosts[to].id.clone(),
        priority,
        kind,
        reason,
        imbalance_before: before,
        imbalance_after: s.imbalance(),
        est_migration_s: cfg.migration_secs(vm.memory_mib, vm.dirty_rate_mib_s),
    }
}
