//! A what-if copy of host contents used while a policy plans (VMs tentatively added to and
//! removed from hosts), with CloudSim's power-aware best-fit decreasing placement.
use crate::cluster::Cluster;
use crate::policy::detect::Detector;
use crate::policy::Move;

/// Longest demand history a policy can use.
pub const MAX_HISTORY: usize = 64;

pub struct Plan<'c, 'f> {
    pub c: &'c Cluster<'f>,
    pub members: Vec<Vec<usize>>,
    ram_used: Vec<u64>,
    bw_used: Vec<f64>,
    /// Utilisation measured at the last update; planning does not change it.
    pub util_field: Vec<f64>,
    /// At initial placement, VMs already placed ask for nothing yet (as in CloudSim).
    pub placed_ask_nothing: bool,
    /// Power-aware best fit rates a host by the MIPS allocated to its planned members
    /// (CloudSim 4.0); when false, by the load measured at the last update, so that every
    /// VM of one round goes to the same cheapest host until it is full (CloudSim 3.0).
    pub rate_planned_load: bool,
    /// Overload rule (LR 1.2 unless the policy sets another).
    pub detector: Detector,
    cpu_cache: Vec<HostCpu>,
    power_now: Vec<f64>,
    /// Per host: its members' demand histories weighted by MIPS share, untrimmed.
    hist_base: Vec<[f64; MAX_HISTORY]>,
}

#[derive(Clone, Copy)]
pub struct HostCpu {
    /// MIPS allocated to planned members.
    pub used: f64,
    /// What VMs migrating in will add once they arrive (their other 90 %).
    pub incoming_extra: f64,
    pub available: f64,
}

impl<'c, 'f> Plan<'c, 'f> {
    pub fn new(c: &'c Cluster<'f>) -> Self {
        let mut p = Plan {
            c,
            members: c.hosts.iter().map(|h| h.vms.clone()).collect(),
            ram_used: c.hosts.iter().map(|h| h.ram_used).collect(),
            bw_used: c.hosts.iter().map(|h| h.bw_used).collect(),
            util_field: (0..c.hosts.len()).map(|h| c.utilization(h)).collect(),
            placed_ask_nothing: false,
            rate_planned_load: true,
            detector: Detector::Lr(1.2),
            cpu_cache: Vec::new(),
            power_now: Vec::new(),
            hist_base: Vec::new(),
        };
        if c.history_len > 0 {
            p.hist_base = (0..c.hosts.len()).map(|h| p.weighted_history(h)).collect();
        }
        p.cpu_cache = (0..c.hosts.len()).map(|h| p.compute_cpu(h)).collect();
        p.power_now = (0..c.hosts.len())
            .map(|h| c.host_spec(h).power.watts_at(p.util_field[h]))
            .collect();
        p
    }

    pub fn cpu(&self, h: usize) -> HostCpu {
        self.cpu_cache[h]
    }

    /// Memory and bandwidth are only checked when the fleet enforces them (CloudSim's
    /// PlanetLab VMs ask for no RAM once started, so its runs never check it).
    fn memory_checked(&self) -> bool {
        self.placed_ask_nothing || !self.c.fleet.cloudsim_ram
    }

    pub fn create(&mut self, h: usize, v: usize) {
        let vs = self.c.vm_spec(v);
        self.members[h].push(v);
        self.ram_used[h] += vs.ram_mb;
        self.bw_used[h] += vs.bw_mbps;
        self.cpu_cache[h] = self.compute_cpu(h);
        if !self.hist_base.is_empty() {
            self.hist_base[h] = self.weighted_history(h);
        }
    }

    pub fn destroy(&mut self, h: usize, v: usize) {
        if let Some(p) = self.members[h].iter().position(|&x| x == v) {
            let vs = self.c.vm_spec(v);
            self.members[h].remove(p);
            self.ram_used[h] -= vs.ram_mb;
            self.bw_used[h] -= vs.bw_mbps;
            self.cpu_cache[h] = self.compute_cpu(h);
            if !self.hist_base.is_empty() {
                self.hist_base[h] = self.weighted_history(h);
            }
        }
    }

    /// CPU allocation of host `h` with its planned members (time-shared, over-subscribed).
    fn compute_cpu(&self, h: usize) -> HostCpu {
        let spec = self.c.host_spec(h);
        let cap = spec.total_mips();
        let capped = |v: usize| {
            let vs = self.c.vm_spec(v);
            (self.c.vms[v].req_mips / vs.pes as f64).min(spec.pe_mips)
        };
        let mut required = 0.0;
        for &v in &self.members[h] {
            let r = capped(v) * self.c.vm_spec(v).pes as f64;
            required += if self.c.vms[v].dest == Some(h) {
                r * 0.1
            } else {
                r
            };
        }
        let scale = if required > cap {
            Some(cap / required)
        } else {
            None
        };
        let (mut used, mut incoming_extra) = (0.0, 0.0);
        for &v in &self.members[h] {
            let incoming = self.c.vms[v].dest == Some(h);
            let outgoing = self.c.vms[v].dest.is_some() && !incoming;
            let f = if outgoing {
                0.9
            } else if incoming {
                0.1
            } else {
                1.0
            };
            let mut per_pe = capped(v) * f;
            if let Some(s) = scale {
                per_pe = (per_pe * s).floor();
            }
            let a = per_pe * self.c.vm_spec(v).pes as f64;
            used += a;
            if incoming {
                incoming_extra += a * 0.9 / 0.1;
            }
        }
        HostCpu {
            used,
            incoming_extra,
            available: if scale.is_some() { 0.0 } else { cap - required },
        }
    }

    /// May `v` go to `h` at all: usable, one core big enough, CPU, memory and bandwidth left.
    pub fn suitable(&self, h: usize, v: usize) -> bool {
        let (hs, hr, vs) = (self.c.host_spec(h), &self.c.hosts[h], self.c.vm_spec(v));
        let req = self.c.vms[v].req_mips;
        hr.up
            && !hr.maintenance
            && hs.pe_mips >= req / vs.pes as f64
            && self.cpu(h).available >= req
            && (!self.memory_checked()
                || (self.ram_used[h] + vs.ram_mb <= hs.ram_mb
                    && self.bw_used[h] + vs.bw_mbps <= hs.bw_mbps + 1e-9))
    }

    fn add_history(&self, out: &mut [f64; MAX_HISTORY], h: usize, v: usize) {
        let w = self.c.vm_spec(v).mips / self.c.host_spec(h).total_mips();
        for (i, u) in self.c.vms[v].history.iter().take(MAX_HISTORY).enumerate() {
            out[i] += u * w;
        }
    }

    fn weighted_history(&self, h: usize) -> [f64; MAX_HISTORY] {
        let mut out = [0.0; MAX_HISTORY];
        for &v in &self.members[h] {
            self.add_history(&mut out, h, v);
        }
        out
    }

    /// Host demand history (most recent first) from its members' histories, zero tail
    /// trimmed: the samples and how many there are.
    fn history(&self, h: usize, extra: Option<usize>) -> ([f64; MAX_HISTORY], usize) {
        let mut out = match self.hist_base.get(h) {
            Some(base) => *base,
            None => self.weighted_history(h),
        };
        if let Some(v) = extra {
            self.add_history(&mut out, h, v);
        }
        let mut len = self.c.history_len.min(MAX_HISTORY);
        while len > 0 && out[len - 1] == 0.0 {
            len -= 1;
        }
        (out, len)
    }

    /// Whether `h` (with `extra` added, for a tentative placement) is overloaded by the
    /// plan's detector, on the host's demand history and requested MIPS.
    pub fn overloaded(&self, h: usize, extra: Option<usize>) -> bool {
        let (hist, len) = self.history(h, extra);
        let spec = self.c.host_spec(h);
        let asked: f64 = if self.placed_ask_nothing {
            extra.map(|v| self.c.vms[v].req_mips).unwrap_or(0.0)
        } else {
            self.members[h]
                .iter()
                .copied()
                .chain(extra)
                .map(|v| self.c.vms[v].req_mips)
                .sum()
        };
        // LR looks ahead by the migration time of the host's largest VM.
        let intervals = || {
            let max_ram = self.members[h]
                .iter()
                .copied()
                .chain(extra)
                .map(|v| self.c.vm_spec(v).ram_mb)
                .max()
                .unwrap_or(0) as f64;
            let mig_s = self
                .c
                .fleet
                .migration
                .cost(max_ram, 0.0, spec.bw_mbps)
                .total_s;
            (mig_s / self.c.fleet.interval_s).ceil()
        };
        self.detector
            .overloaded(&hist[..len], asked / spec.total_mips(), intervals)
    }

    /// Power-aware best fit: the allowed host whose power rises least by taking `v`.
    pub fn find_host(&self, v: usize, excluded: &[bool]) -> Option<usize> {
        let mut best = f64::MAX;
        let mut found = None;
        let req = self.c.vms[v].req_mips;
        for (h, &skip) in excluded.iter().enumerate() {
            if skip || !self.suitable(h, v) {
                continue;
            }
            let spec = self.c.host_spec(h);
            // As CloudSim 4.0 (getUtilizationOfCpuMips): the MIPS allocated to the host's
            // planned members, including VMs planned onto it this round, plus the other 90 % of
            // what is migrating in. The power it is compared with is the measured one.
            let cpu = self.cpu(h);
            let planned = if self.rate_planned_load {
                cpu.used
            } else {
                self.c.hosts[h].util_mips
            } + cpu.incoming_extra;
            let after = (planned + req) / spec.total_mips();
            if after > 1.0 + 1e-12 {
                continue;
            }
            let diff = spec.power.watts_at(after) - self.power_now[h];
            if diff >= best {
                continue;
            }
            if planned != 0.0 && self.overloaded(h, Some(v)) {
                continue;
            }
            best = diff;
            found = Some(h);
        }
        found
    }

    /// Places `vms` (sorted by demand, highest first) with power-aware best fit.
    pub fn place_sorted(
        &mut self,
        vms: &mut [usize],
        excluded: &[bool],
        all_or_nothing: bool,
    ) -> Vec<Move> {
        let c = self.c;
        vms.sort_by(|&a, &b| c.vms[b].req_mips.total_cmp(&c.vms[a].req_mips));
        let mut moves = Vec::new();
        for &v in vms.iter() {
            match self.find_host(v, excluded) {
                Some(h) => {
                    self.create(h, v);
                    moves.push(Move { vm: v, to: h });
                }
                None if all_or_nothing => {
                    for m in &moves {
                        self.destroy(m.to, m.vm);
                    }
                    return Vec::new();
                }
                None => {}
            }
        }
        moves
    }
}
