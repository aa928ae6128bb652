//! The dynamic consolidation family of Beloglazov & Buyya 2012 as CloudSim 4.0 implements it
//! (LR-MMT is the published baseline): overload detection (THR, IQR, MAD, LR, LRR), VM
//! selection (MMT, MC, RS), power-aware best-fit placement, then consolidation of the
//! least-loaded hosts.
use crate::cluster::Cluster;
use crate::policy::detect::Detector;
use crate::policy::plan::Plan;
use crate::policy::select::{max_correlation, min_migration_time, Selector};
use crate::policy::{Move, Policy};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// One member of the family: an overload detector and a VM selector.
pub struct Consolidation {
    pub detector: Detector,
    pub selector: Selector,
    /// Random selection's generator (seeded, so runs repeat).
    rng: ChaCha8Rng,
}

impl Consolidation {
    pub fn new(detector: Detector, selector: Selector, seed: u64) -> Self {
        Consolidation {
            detector,
            selector,
            rng: crate::workload::rng(seed),
        }
    }

    /// `lr-mmt`, `thr-mc`, `mad-rs`, ... with CloudSim's default parameters.
    pub fn by_name(name: &str, seed: u64) -> Option<Self> {
        let (d, s) = name.split_once('-')?;
        Some(Self::new(
            Detector::by_name(d)?,
            Selector::by_name(s)?,
            seed,
        ))
    }

    fn plan<'c, 'f>(&self, c: &'c Cluster<'f>) -> Plan<'c, 'f> {
        let mut plan = Plan::new(c);
        plan.detector = self.detector;
        plan.index_by_load();
        plan
    }

    /// The VM to take off `h` next (among its VMs not migrating), or None.
    fn pick(&mut self, plan: &Plan, h: usize) -> Option<usize> {
        let c = plan.c;
        let vms: Vec<usize> = plan.members[h]
            .iter()
            .copied()
            .filter(|&v| c.vms[v].dest.is_none())
            .collect();
        if vms.is_empty() {
            return None;
        }
        let mmt = || {
            let ram: Vec<u64> = vms.iter().map(|&v| c.vm_spec(v).ram_mb).collect();
            min_migration_time(&ram).map(|i| vms[i])
        };
        match self.selector {
            Selector::Mmt => mmt(),
            Selector::Rs => Some(vms[self.rng.gen_range(0..vms.len())]),
            Selector::Mc => {
                let hist: Vec<Vec<f64>> = vms
                    .iter()
                    .map(|&v| c.vms[v].history.iter().copied().collect())
                    .collect();
                let refs: Vec<&[f64]> = hist.iter().map(Vec::as_slice).collect();
                // CloudSim falls back to MMT where its regression refuses the data.
                max_correlation(&refs).map(|i| vms[i]).or_else(mmt)
            }
        }
    }
}

/// The consolidation loop stops after this many hosts in a row could not be emptied
/// (CloudSim tries every host). Hosts are tried from the least utilised up, so once this many
/// have failed the fuller ones rarely succeed; without the stop a large fleet costs
/// O(hosts^2) per tick. PlanetLab runs (tens of busy hosts) never reach it.
pub const CONSOLIDATION_PATIENCE: usize = 64;

/// History kept per VM (CloudSim's PowerVm keeps 30 samples).
const HISTORY: usize = 30;

impl Policy for Consolidation {
    fn name(&self) -> String {
        format!("{}-{}", self.detector.name(), self.selector.name())
    }

    fn history_len(&self) -> usize {
        HISTORY
    }

    fn initial_placement(&mut self, c: &Cluster) -> Vec<Option<usize>> {
        best_fit_initial(c, true, self.detector)
    }

    fn restart(&mut self, c: &Cluster, vms: &[usize]) -> Vec<Option<usize>> {
        restart_pabfd(c, vms, self.detector)
    }

    fn evacuate(&mut self, c: &Cluster, h: usize) -> Vec<Move> {
        evacuate_pabfd(c, h, self.detector)
    }

    fn optimize(&mut self, c: &Cluster, _t: f64) -> Vec<Move> {
        let n = c.hosts.len();
        let mut plan = self.plan(c);
        // 1. Overloaded hosts.
        let over: Vec<usize> = (0..n)
            .filter(|&h| c.hosts[h].up && plan.overloaded(h, None))
            .collect();
        let mut is_over = vec![false; n];
        for &h in &over {
            is_over[h] = true;
            plan.exclude(h);
        }
        // 2. Select VMs until each is no longer overloaded.
        let mut to_move = Vec::new();
        for &h in &over {
            while let Some(v) = self.pick(&plan, h) {
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
        // Every idle host is off, so excluded as a destination here: best fit skips them.
        plan.idle_dest = false;
        for h in (0..n).filter(|&h| skip_dest[h]) {
            plan.exclude(h);
        }
        let mut failed_in_a_row = 0;
        // A host passed over once stays unsuitable as a source this round (exclusions only
        // grow; a host gains VMs only as a destination, which excludes it), so one cursor
        // walks the order instead of searching it from the start each time.
        let mut cursor = 0;
        while excluded < n && failed_in_a_row < CONSOLIDATION_PATIENCE {
            let Some(i) = order[cursor..].iter().position(|&h| {
                let util = plan.util_field[h];
                !skip_source[h] && util > 0.0 && util < 1.0 && has_settled_vm(&plan, h)
            }) else {
                break;
            };
            let u = order[cursor + i];
            cursor += i + 1;
            skip_source[u] = true;
            skip_dest[u] = true;
            plan.exclude(u);
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
            if placed.is_empty() {
                failed_in_a_row += 1;
            } else {
                failed_in_a_row = 0;
            }
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

/// Tern's own starting placement for the `none`, `drs` and `drs+dpm` runs: VM by VM, each
/// reserving its full MIPS, on the host whose power rises least from its measured (zero)
/// load: this fills the most power-efficient hosts first, never beyond their MIPS.
/// (CloudSim's rule above instead spreads one VM per host, which no operator would do.)
pub fn packed_initial(c: &Cluster) -> Vec<Option<usize>> {
    if c.fleet.initial_placement == crate::fleet::InitialPlacement::Demand {
        return crate::policy::initial::demand_initial(c);
    }
    best_fit_initial(c, false, Detector::Lr(1.2))
}

/// CloudSim's initial placement (`rate_planned_load`): VM by VM in list order, each asking
/// for its full MIPS, power-aware best fit rating each host by the full MIPS of the VMs
/// already placed on it (their allocation at creation). Since an empty host's power is its
/// idle draw, the first VMs each get a host of their own.
fn best_fit_initial(
    c: &Cluster,
    rate_planned_load: bool,
    detector: Detector,
) -> Vec<Option<usize>> {
    if c.fleet.spread_initial {
        return spread_initial(c);
    }
    let mut plan = Plan::new(c);
    plan.detector = detector;
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

/// Place VMs of a failed host again, one after the other, power-aware best fit.
pub fn restart_pabfd(c: &Cluster, vms: &[usize], detector: Detector) -> Vec<Option<usize>> {
    let mut plan = Plan::new(c);
    plan.detector = detector;
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

/// Moves every VM off `h` with power-aware best fit.
pub fn evacuate_pabfd(c: &Cluster, h: usize, detector: Detector) -> Vec<Move> {
    let mut plan = Plan::new(c);
    plan.detector = detector;
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
