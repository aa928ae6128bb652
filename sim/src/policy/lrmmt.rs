//! LR-MMT, the published baseline (Beloglazov & Buyya 2012, as CloudSim implements it):
//! local-regression overload detection, minimum-migration-time VM selection, power-aware
//! best-fit placement, then consolidation of the least-loaded hosts.
use crate::cluster::Cluster;
use crate::policy::plan::Plan;
use crate::policy::{Move, Policy};

#[derive(Default)]
pub struct LrMmt;

/// History kept per VM (CloudSim's PowerVm keeps 30 samples).
const HISTORY: usize = 30;

impl Policy for LrMmt {
    fn name(&self) -> String {
        "lr-mmt".into()
    }

    fn history_len(&self) -> usize {
        HISTORY
    }

    fn initial_placement(&mut self, c: &Cluster) -> Vec<Option<usize>> {
        pabfd_initial(c)
    }

    fn restart(&mut self, c: &Cluster, vms: &[usize]) -> Vec<Option<usize>> {
        restart_pabfd(c, vms)
    }

    fn evacuate(&mut self, c: &Cluster, h: usize) -> Vec<Move> {
        evacuate_pabfd(c, h)
    }

    fn optimize(&mut self, c: &Cluster, _t: f64) -> Vec<Move> {
        let n = c.hosts.len();
        let mut plan = Plan::new(c);
        // 1. Overloaded hosts.
        let over: Vec<usize> = (0..n)
            .filter(|&h| c.hosts[h].up && plan.overloaded(h, None))
            .collect();
        let mut is_over = vec![false; n];
        for &h in &over {
            is_over[h] = true;
        }
        // 2. Minimum migration time selection until each is no longer overloaded.
        let mut to_move = Vec::new();
        for &h in &over {
            loop {
                let pick = plan.members[h]
                    .iter()
                    .copied()
                    .filter(|&v| c.vms[v].dest.is_none())
                    .fold(None, |best: Option<usize>, v| match best {
                        Some(b) if c.vm_spec(b).ram_mb <= c.vm_spec(v).ram_mb => Some(b),
                        _ => Some(v),
                    });
                let Some(v) = pick else { break };
                to_move.push(v);
                plan.destroy(h, v);
                if !plan.overloaded(h, None) {
                    break;
                }
            }
        }
        // 3. Place them, never back on an overloaded host.
        let mut moves = plan.place_sorted(&mut to_move, &is_over, false);
        let mut planned = vec![false; c.vms.len()];
        for m in &moves {
            planned[m.vm] = true;
        }
        // 4. Consolidation: try to empty hosts from the least utilised up.
        let off: Vec<bool> = (0..n)
            .map(|h| plan.util_field[h] == 0.0 || !c.hosts[h].up)
            .collect();
        let mut skip_source: Vec<bool> = (0..n).map(|h| is_over[h] || off[h]).collect();
        let mut skip_dest = skip_source.clone();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| plan.util_field[a].total_cmp(&plan.util_field[b]));
        let mut excluded = skip_source.iter().filter(|&&x| x).count();
        while excluded < n {
            let Some(u) = order.iter().copied().find(|&h| {
                let util = plan.util_field[h];
                !skip_source[h] && util > 0.0 && util < 1.0 && has_settled_vm(&plan, h)
            }) else {
                break;
            };
            skip_source[u] = true;
            skip_dest[u] = true;
            excluded += 1;
            // A VM placed here by the overload step this round is evacuated again, as in
            // CloudSim (which then runs both migrations; see below).
            let mut vms: Vec<usize> = plan.members[u]
                .iter()
                .copied()
                .filter(|&v| c.vms[v].dest.is_none())
                .collect();
            if vms.is_empty() {
                continue;
            }
            let placed = plan.place_sorted(&mut vms, &skip_dest, true);
            for m in &placed {
                if !skip_source[m.to] {
                    skip_source[m.to] = true;
                    excluded += 1;
                }
                if planned[m.vm] {
                    // CloudSim keeps both moves and runs both (see Engine::start); elsewhere
                    // the first move is redirected.
                    if c.fleet.cloudsim_engine {
                        moves.push(*m);
                    } else if let Some(prev) = moves.iter_mut().find(|p| p.vm == m.vm) {
                        prev.to = m.to;
                    }
                    continue;
                }
                planned[m.vm] = true;
                moves.push(*m);
            }
        }
        moves
    }
}

/// Whether `h` holds a VM that is not migrating (CloudSim skips hosts where all VMs are
/// migrating out or any is migrating in).
fn has_settled_vm(plan: &Plan, h: usize) -> bool {
    for &v in &plan.members[h] {
        match plan.c.vms[v].dest {
            None => return true,
            Some(d) if d == h => return false,
            Some(_) => {}
        }
    }
    false
}

/// CloudSim's initial placement: VM by VM in list order, each asking for its full MIPS,
/// power-aware best fit rating each host by the full MIPS of the VMs already placed on it
/// (their allocation at creation). Since an empty host's power is its idle draw, the first
/// VMs each get a host of their own.
pub fn pabfd_initial(c: &Cluster) -> Vec<Option<usize>> {
    best_fit_initial(c, true)
}

/// Tern's own starting placement for the `none`, `drs` and `drs+dpm` runs: VM by VM, each
/// reserving its full MIPS, on the host whose power rises least from its measured (zero)
/// load: this fills the most power-efficient hosts first, never beyond their MIPS.
/// (CloudSim's rule above instead spreads one VM per host, which no operator would do.)
pub fn packed_initial(c: &Cluster) -> Vec<Option<usize>> {
    if c.fleet.initial_placement == crate::fleet::InitialPlacement::Demand {
        return crate::policy::initial::demand_initial(c);
    }
    best_fit_initial(c, false)
}

fn best_fit_initial(c: &Cluster, rate_planned_load: bool) -> Vec<Option<usize>> {
    if c.fleet.spread_initial {
        return spread_initial(c);
    }
    let mut plan = Plan::new(c);
    plan.placed_ask_nothing = true;
    plan.rate_planned_load = rate_planned_load;
    let none = vec![false; c.hosts.len()];
    (0..c.vms.len())
        .map(|v| {
            let h = plan.find_host(v, &none);
            if let Some(h) = h {
                plan.create(h, v);
            }
            h
        })
        .collect()
}

/// Moves every VM off `h` with power-aware best fit.
/// Place VMs of a failed host again, one after the other, power-aware best fit.
pub fn restart_pabfd(c: &Cluster, vms: &[usize]) -> Vec<Option<usize>> {
    let mut plan = Plan::new(c);
    let no_exclusions = vec![false; c.hosts.len()];
    vms.iter()
        .map(|&v| {
            let h = plan.find_host(v, &no_exclusions);
            if let Some(h) = h {
                plan.create(h, v);
            }
            h
        })
        .collect()
}

pub fn evacuate_pabfd(c: &Cluster, h: usize) -> Vec<Move> {
    let mut plan = Plan::new(c);
    let mut excluded = vec![false; c.hosts.len()];
    excluded[h] = true;
    let mut vms: Vec<usize> = c.hosts[h]
        .vms
        .iter()
        .copied()
        .filter(|&v| c.vms[v].dest.is_none() && c.vms[v].host == Some(h))
        .collect();
    plan.place_sorted(&mut vms, &excluded, false)
}

/// Initial placement for large generated fleets: VM v starts on host v mod H, or the next
/// host with memory left (linear time; power-aware best fit is quadratic).
pub fn spread_initial(c: &Cluster) -> Vec<Option<usize>> {
    let n = c.hosts.len();
    let mut ram: Vec<u64> = c.hosts.iter().map(|h| h.ram_used).collect();
    (0..c.vms.len())
        .map(|v| {
            let need = c.vm_spec(v).ram_mb;
            (0..n)
                .map(|i| (v + i) % n)
                .find(|&h| c.hosts[h].up && ram[h] + need <= c.host_spec(h).ram_mb)
                .inspect(|&h| ram[h] += need)
        })
        .collect()
}
