//! Tern's own policies on the real scheduler code: `drs` (balance, evacuate, place from
//! tern-scheduler) and `drs+dpm` (adds power management in the spirit of VMware DPM:
//! when the powered-on hosts are lightly loaded, empty the least-loaded ones with the
//! scheduler's evacuation and switch them off; switch hosts back on when load rises).
use crate::cluster::Cluster;
use crate::policy::lrmmt::packed_initial;
use crate::policy::{Move, Policy};
use tern_scheduler::Config;
use tern_scheduler::{Host, HostState, InFlight, Snapshot, Vm, VmUpdate};

pub struct Drs {
    pub cfg: Config,
    pub dpm: Option<Dpm>,
    standby: Vec<bool>,
    draining: Vec<bool>,
    last_moved: Vec<Option<f64>>,
    /// Plain DRS claims each VM's full size when the VMs' full sizes fit the hosts' MIPS;
    /// otherwise (an over-sized fleet, where full-size claims would block every move) its
    /// recent peak with headroom, as DPM does. Decided at the first call.
    full_claims: Option<bool>,
    /// The scheduler's view, kept between ticks and refreshed in place (building it from a
    /// snapshot hashes every id: O(VMs) allocations a tick on a large fleet).
    view: Option<View>,
}

/// A scheduler cluster and the simulated VMs it holds, in its order.
struct View {
    cluster: tern_scheduler::Cluster,
    vms: Vec<usize>,
    /// Position of each simulated VM in `vms` (usize::MAX: not in the view).
    pos: Vec<usize>,
}

/// Ticks of history a claim by recent peak looks back over.
const PEAK_WINDOW: usize = 12;
/// Headroom over the recent peak a claim adds.
const PEAK_HEADROOM: f64 = 1.15;

/// DPM settings: keep the powered-on hosts' CPU demand between `low` and `high`.
#[derive(Debug, Clone)]
pub struct Dpm {
    pub low: f64,
    pub high: f64,
    /// Aim after a power change.
    pub target: f64,
    /// Hosts switched off per tick at most (bounds the migrations it causes).
    pub max_off_per_tick: usize,
    /// A VM's claim is its highest demand over this many past ticks...
    pub peak_window: usize,
    /// ... times this headroom.
    pub headroom: f64,
}

impl Default for Dpm {
    fn default() -> Self {
        Dpm {
            low: 0.4,
            high: 0.65,
            target: 0.5,
            max_off_per_tick: 3,
            peak_window: PEAK_WINDOW,
            headroom: PEAK_HEADROOM,
        }
    }
}

impl Drs {
    pub fn new(dpm: bool) -> Self {
        // Plain DRS balances harder; with DPM, power decisions do most of the moving.
        // In a fleet of hundreds of hosts one move shifts the fleet-wide deviation only a
        // little, so the cost weight is lower than the cluster default.
        let cfg = Config {
            threshold: 5,
            max_moves: if dpm { 6 } else { 32 },
            cost_weight: 0.002,
            ..Config::default()
        };
        Drs {
            cfg,
            dpm: dpm.then(Dpm::default),
            standby: Vec::new(),
            draining: Vec::new(),
            last_moved: Vec::new(),
            full_claims: None,
            view: None,
        }
    }

    fn size(&mut self, c: &Cluster) {
        if self.standby.len() != c.hosts.len() {
            self.standby = vec![false; c.hosts.len()];
            self.draining = vec![false; c.hosts.len()];
            if self.dpm.is_some() {
                // DPM starts with the hosts that hold nothing switched off.
                for h in 0..c.hosts.len() {
                    self.standby[h] = c.hosts[h].vms.is_empty();
                }
            }
        }
        if self.last_moved.len() != c.vms.len() {
            self.last_moved = vec![None; c.vms.len()];
        }
        if self.full_claims.is_none() {
            let sizes: f64 = c.fleet.vms.iter().map(|v| v.total_mips()).sum();
            let cap: f64 = (0..c.hosts.len())
                .filter(|&h| c.hosts[h].up)
                .map(|h| c.host_spec(h).total_mips())
                .sum();
            self.full_claims = Some(sizes <= cap);
        }
    }

    /// How the scheduler sees host `h`.
    fn host_state(&self, c: &Cluster, h: usize) -> HostState {
        let hr = &c.hosts[h];
        if !hr.up {
            HostState::Down
        } else if hr.maintenance || self.standby[h] || self.draining[h] {
            HostState::InMaintenance
        } else {
            HostState::Connected
        }
    }

    /// What changes about VM `v` (which has a host) from one tick to the next.
    fn vm_update(&self, c: &Cluster, v: usize) -> VmUpdate {
        let vm = &c.vms[v];
        let vs = c.vm_spec(v);
        VmUpdate {
            host: vm.host.unwrap_or(0),
            // Under DPM the scheduler plans on each VM's claim (recent peak with headroom),
            // so that consolidated hosts still fit the next rise in demand.
            cpu_demand_mhz: if self.dpm.is_some() {
                self.claim(c, v)
            } else {
                vm.req_mips
            },
            dirty_rate_mib_s: vs.dirty_mb_s * vm.req_mips / vs.total_mips(),
            do_not_migrate: vm.dest.is_some(),
            last_migrated_s: self.last_moved[v],
            in_flight_to: vm.dest,
        }
    }

    /// The scheduler's view of the simulated fleet right now.
    fn snapshot(&self, c: &Cluster, t: f64) -> Snapshot {
        let hosts = (0..c.hosts.len())
            .map(|h| {
                let spec = c.host_spec(h);
                // In CloudSim-compatible runs memory is not a placement limit (see Fleet::cloudsim_ram).
                let memory_mib = if c.fleet.cloudsim_ram {
                    1e12
                } else {
                    spec.ram_mb as f64
                };
                Host {
                    id: host_id(h),
                    cpu_mhz: spec.total_mips(),
                    memory_mib,
                    cpu_features: Default::default(),
                    state: self.host_state(c, h),
                }
            })
            .collect();
        let mut vms = Vec::with_capacity(c.vms.len());
        let mut in_flight = Vec::new();
        for v in 0..c.vms.len() {
            if c.vms[v].host.is_none() {
                continue;
            }
            let vs = c.vm_spec(v);
            let u = self.vm_update(c, v);
            vms.push(Vm {
                id: vm_id(v),
                host: host_id(u.host),
                vcpus: vs.pes,
                memory_mib: vs.ram_mb as f64,
                cpu_demand_mhz: u.cpu_demand_mhz,
                active_memory_mib: vs.ram_mb as f64,
                dirty_rate_mib_s: u.dirty_rate_mib_s,
                cpu: Default::default(),
                memory: Default::default(),
                pool: None,
                cpu_baseline: Default::default(),
                do_not_migrate: u.do_not_migrate,
                last_migrated_s: u.last_migrated_s,
            });
            if let Some(d) = u.in_flight_to {
                in_flight.push(InFlight {
                    vm: vm_id(v),
                    to: host_id(d),
                });
            }
        }
        Snapshot {
            now_s: t,
            hosts,
            vms,
            in_flight,
            ..Default::default()
        }
    }

    /// The scheduler's cluster at `t`: the kept view refreshed in place when the same VMs
    /// have hosts as when it was built (the usual tick), else built again from a snapshot.
    fn view(&mut self, c: &Cluster, t: f64) -> Option<&mut View> {
        let same = self.view.as_ref().is_some_and(|w| {
            let mut k = 0;
            c.vms.iter().enumerate().all(|(v, vm)| {
                let hosted = vm.host.is_some();
                let ok = hosted == (w.pos[v] != usize::MAX);
                k += hosted as usize;
                ok
            }) && k == w.vms.len()
        });
        if same {
            let w = self.view.as_ref()?;
            let states: Vec<HostState> =
                (0..c.hosts.len()).map(|h| self.host_state(c, h)).collect();
            let updates: Vec<VmUpdate> = w.vms.iter().map(|&v| self.vm_update(c, v)).collect();
            let w = self.view.as_mut()?;
            if w.cluster.refresh(t, &states, &updates).is_ok() {
                return self.view.as_mut();
            }
        }
        let cluster = tern_scheduler::Cluster::new(self.snapshot(c, t)).ok();
        self.view = cluster.map(|cluster| {
            let vms: Vec<usize> = (0..c.vms.len())
                .filter(|&v| c.vms[v].host.is_some())
                .collect();
            let mut pos = vec![usize::MAX; c.vms.len()];
            for (i, &v) in vms.iter().enumerate() {
                pos[v] = i;
            }
            View { cluster, vms, pos }
        });
        self.view.as_mut()
    }

    /// MIPS a VM may ask for soon: under plain DRS its full size (so a balancing move can
    /// never create contention: the initial placement reserves full sizes too) when the
    /// fleet's full sizes fit its hosts; under DPM, or when they do not fit, its recent peak
    /// with headroom (consolidation needs to pack tighter than full sizes, and in a fleet sized
    /// below its VMs' full sizes no host could take a full-size claim).
    fn claim(&self, c: &Cluster, v: usize) -> f64 {
        let vs = c.vm_spec(v);
        let (window, headroom) = match &self.dpm {
            None if self.full_claims != Some(false) => return vs.total_mips(),
            None => (PEAK_WINDOW, PEAK_HEADROOM),
            Some(d) => (d.peak_window, d.headroom),
        };
        let now = c.vms[v].req_mips / vs.total_mips();
        let peak = c.vms[v]
            .history
            .iter()
            .take(window)
            .fold(now, |a, &b| a.max(b));
        (peak * headroom).min(1.0) * vs.total_mips()
    }

    /// Claimed MIPS per host: every VM on it, including VMs migrating in.
    fn claims(&self, c: &Cluster) -> Vec<f64> {
        let mut out = vec![0.0; c.hosts.len()];
        for (v, vm) in c.vms.iter().enumerate() {
            if let Some(h) = vm.dest.or(vm.host) {
                out[h] += self.claim(c, v);
            }
        }
        out
    }

    /// Whether `v` fits on `to` without risking contention: its claim fits the host's
    /// unclaimed MIPS and one of its virtual cores fits a physical core.
    fn fits(&self, c: &Cluster, claims: &[f64], v: usize, to: usize) -> bool {
        let (hs, vs) = (c.host_spec(to), c.vm_spec(v));
        hs.pe_mips + 1e-9 >= self.claim(c, v).min(vs.total_mips()) / vs.pes as f64
            && claims[to] + self.claim(c, v) <= hs.total_mips() + 1e-9
    }

    /// The cost-benefit filter on the scheduler's plan: moves whose destination would be
    /// claimed beyond its capacity are dropped (the scheduler balances on current demand).
    fn without_contention(&self, c: &Cluster, moves: Vec<Move>) -> Vec<Move> {
        let mut claims = self.claims(c);
        let mut out = Vec::new();
        for m in moves {
            let Some(from) = c.vms[m.vm].host else {
                continue;
            };
            if !self.fits(c, &claims, m.vm, m.to) {
                continue;
            }
            let k = self.claim(c, m.vm);
            claims[m.to] += k;
            claims[from] -= k;
            out.push(m);
        }
        out
    }

    fn sim_moves(&mut self, moves: &[tern_scheduler::Move], t: f64) -> Vec<Move> {
        let mut out = Vec::new();
        for m in moves {
            if let (Some(vm), Some(to)) = (parse(&m.vm, 'v'), parse(&m.to, 'h')) {
                if vm < self.last_moved.len() {
                    self.last_moved[vm] = Some(t);
                }
                out.push(Move { vm, to });
            }
        }
        out
    }

    fn power_management(&mut self, c: &Cluster, t: f64, dpm: &Dpm) -> Vec<Move> {
        let n = c.hosts.len();
        // Hosts that finished draining are switched off; a drain whose moves were refused
        // (a VM still settled on the host) is called off, so the host serves again.
        for h in 0..n {
            if self.draining[h] && c.hosts[h].vms.is_empty() {
                self.draining[h] = false;
                self.standby[h] = true;
            } else if self.draining[h]
                && c.hosts[h]
                    .vms
                    .iter()
                    .any(|&v| c.vms[v].host == Some(h) && c.vms[v].dest.is_none())
            {
                self.draining[h] = false;
            }
        }
        let on: Vec<usize> = (0..n)
            .filter(|&h| {
                c.hosts[h].up && !c.hosts[h].maintenance && !self.standby[h] && !self.draining[h]
            })
            .collect();
        let demand: f64 = c.vms.iter().map(|v| v.req_mips).sum();
        let mut cap: f64 = on.iter().map(|&h| c.host_spec(h).total_mips()).sum();
        let util = if cap > 0.0 { demand / cap } else { 1.0 };
        if util > dpm.high {
            // Wake standby hosts until the target is reachable.
            for h in 0..n {
                if demand / cap.max(1e-9) <= dpm.target {
                    break;
                }
                if self.standby[h] && c.hosts[h].up {
                    self.standby[h] = false;
                    cap += c.host_spec(h).total_mips();
                }
            }
            return Vec::new();
        }
        if util >= dpm.low {
            return Vec::new();
        }
        // Switch off the least-loaded hosts while the rest stay under the target.
        let mut order = on.clone();
        order.sort_by(|&a, &b| {
            let la = c.hosts[a].req_mips / c.host_spec(a).total_mips();
            let lb = c.hosts[b].req_mips / c.host_spec(b).total_mips();
            la.total_cmp(&lb).then(a.cmp(&b))
        });
        let mut moves = Vec::new();
        let (mut off, mut tries) = (0, 0);
        // One view for the whole pass: each drain's moves are added to it as in flight, so
        // the next drain sees the room they take on their destinations.
        if self.view(c, t).is_none() {
            return moves;
        }
        let mut states: Vec<HostState> = (0..n).map(|h| self.host_state(c, h)).collect();
        let Some(w) = self.view.as_ref() else {
            return moves;
        };
        let mut updates: Vec<VmUpdate> = w.vms.iter().map(|&v| self.vm_update(c, v)).collect();
        for h in order {
            tries += 1;
            if off >= dpm.max_off_per_tick || tries > 4 * dpm.max_off_per_tick {
                break;
            }
            let rest = cap - c.host_spec(h).total_mips();
            if rest <= 0.0 || demand / rest > dpm.target {
                break;
            }
            let Some(w) = self.view.as_mut() else {
                break;
            };
            let Ok(ev) = tern_scheduler::evacuate(&w.cluster, &host_id(h), &self.cfg) else {
                continue;
            };
            if !ev.stuck.is_empty() {
                continue;
            }
            states[h] = HostState::InMaintenance;
            for m in &ev.moves {
                let (Some(v), Some(to)) = (parse(&m.vm, 'v'), parse(&m.to, 'h')) else {
                    continue;
                };
                if let Some(u) = w.pos.get(v).and_then(|&p| updates.get_mut(p)) {
                    u.in_flight_to = Some(to);
                    u.do_not_migrate = true;
                }
            }
            if w.cluster.refresh(t, &states, &updates).is_err() {
                self.view = None;
                break;
            }
            self.draining[h] = true;
            cap = rest;
            off += 1;
            moves.extend(self.sim_moves(&ev.moves, t));
        }
        moves
    }
}

fn parse_moves(moves: &[tern_scheduler::Move]) -> Vec<Move> {
    moves
        .iter()
        .filter_map(|m| {
            Some(Move {
                vm: parse(&m.vm, 'v')?,
                to: parse(&m.to, 'h')?,
            })
        })
        .collect()
}

fn host_id(h: usize) -> String {
    format!("h{h}")
}
fn vm_id(v: usize) -> String {
    format!("v{v}")
}
fn parse(id: &str, prefix: char) -> Option<usize> {
    id.strip_prefix(prefix)?.parse().ok()
}

impl Policy for Drs {
    fn name(&self) -> String {
        if self.dpm.is_some() { "drs+dpm" } else { "drs" }.into()
    }

    fn history_len(&self) -> usize {
        self.dpm.as_ref().map_or(PEAK_WINDOW, |d| d.peak_window)
    }

    fn initial_placement(&mut self, c: &Cluster) -> Vec<Option<usize>> {
        // Same starting point as `none`, so runs compare policies, not placements.
        packed_initial(c)
    }

    fn restart(&mut self, c: &Cluster, vms: &[usize]) -> Vec<Option<usize>> {
        self.size(c);
        let Ok(mut cluster) = tern_scheduler::Cluster::new(self.snapshot(c, 0.0)) else {
            return vec![None; vms.len()];
        };
        let mut out = Vec::new();
        for &v in vms {
            let vs = c.vm_spec(v);
            let vm = Vm {
                id: vm_id(v),
                host: String::new(),
                vcpus: vs.pes,
                memory_mib: vs.ram_mb as f64,
                cpu_demand_mhz: c.vms[v].req_mips,
                active_memory_mib: vs.ram_mb as f64,
                dirty_rate_mib_s: 0.0,
                cpu: Default::default(),
                memory: Default::default(),
                pool: None,
                cpu_baseline: Default::default(),
                do_not_migrate: false,
                last_migrated_s: None,
            };
            let host = tern_scheduler::place(&cluster, &vm, &self.cfg)
                .ok()
                .and_then(|p| p.host)
                .and_then(|h| parse(&h, 'h'));
            if let Some(h) = host {
                let mut snap = cluster.snapshot().clone();
                snap.vms.push(Vm {
                    host: host_id(h),
                    ..vm
                });
                if let Ok(next) = tern_scheduler::Cluster::new(snap) {
                    cluster = next;
                }
            }
            out.push(host);
        }
        out
    }

    fn evacuate(&mut self, c: &Cluster, h: usize) -> Vec<Move> {
        self.size(c);
        let Ok(cluster) = tern_scheduler::Cluster::new(self.snapshot(c, 0.0)) else {
            return Vec::new();
        };
        match tern_scheduler::evacuate(&cluster, &host_id(h), &self.cfg) {
            Ok(ev) => self.sim_moves(&ev.moves, 0.0),
            Err(_) => Vec::new(),
        }
    }

    fn optimize(&mut self, c: &Cluster, t: f64) -> Vec<Move> {
        self.size(c);
        let mut moves = Vec::new();
        if let Some(dpm) = self.dpm.clone() {
            moves = self.power_management(c, t, &dpm);
            if !moves.is_empty() {
                return moves; // one kind of change per tick keeps the plans consistent
            }
        }
        let cfg = self.cfg.clone();
        let Some(w) = self.view(c, t) else {
            return moves;
        };
        let plan = tern_scheduler::balance(&w.cluster, &cfg);
        tracing::debug!(t, ?plan, "drs balance");
        if let Ok(plan) = plan {
            let all = parse_moves(&plan.moves);
            moves = self.without_contention(c, all);
            for m in &moves {
                self.last_moved[m.vm] = Some(t);
            }
        }
        moves
    }
}
