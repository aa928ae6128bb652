//! A what-if copy of host contents used while a policy plans (VMs tentatively added to and
//! removed from hosts), with CloudSim's power-aware best-fit decreasing placement.
use crate::cluster::Cluster;
use crate::policy::candidates::{Candidates, Class, LrQuery};
use crate::policy::detect::{least_squares, Detector, LR_WINDOW};
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
    /// The host index best fit searches (see `Candidates`).
    cand: Candidates,
    /// Per host: LR's (intercept, slope) on `hist_base`, its trimmed length, its members'
    /// largest RAM (for LR's look-ahead). Lets best fit test LR overload in O(1).
    lr_base: Vec<(f64, f64)>,
    base_len: Vec<usize>,
    max_ram: Vec<u64>,
    /// Hosts taken out of the index for the rest of this plan (see `exclude`).
    index_excluded: Vec<bool>,
    /// LR's look-ahead when it is the same for every host and VM of the fleet (then whole
    /// buckets can be skipped for overload).
    uniform_look_ahead: Option<f64>,
    /// Whether idle hosts (nothing planned, measured at 0 %) may take VMs in this search; a
    /// caller that excludes every idle host clears it so the search skips them in O(1).
    pub idle_dest: bool,
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
            cand: Candidates::new(&[]),
            idle_dest: true,
            lr_base: Vec::new(),
            base_len: Vec::new(),
            max_ram: Vec::new(),
            uniform_look_ahead: None,
            index_excluded: vec![false; c.hosts.len()],
        };
        let mut specs: Vec<&crate::fleet::HostSpec> = Vec::new();
        let mut keyed = Vec::with_capacity(c.hosts.len());
        for h in 0..c.hosts.len() {
            let spec = c.host_spec(h);
            let id = specs.iter().position(|s| *s == spec).unwrap_or_else(|| {
                specs.push(spec);
                specs.len() - 1
            });
            keyed.push((&spec.power, spec.total_mips(), id));
        }
        p.cand = Candidates::new(&keyed);
        p.max_ram = (0..c.hosts.len())
            .map(|h| {
                p.members[h]
                    .iter()
                    .map(|&v| c.vm_spec(v).ram_mb)
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        if c.history_len > 0 {
            p.hist_base = (0..c.hosts.len()).map(|h| p.weighted_history(h)).collect();
            p.lr_base = vec![(0.0, 0.0); c.hosts.len()];
            p.base_len = vec![0; c.hosts.len()];
            for h in 0..c.hosts.len() {
                p.refit(h);
            }
        }
        p.cpu_cache = (0..c.hosts.len()).map(|h| p.compute_cpu(h)).collect();
        p.power_now = (0..c.hosts.len())
            .map(|h| c.host_spec(h).power.watts_at(p.util_field[h]))
            .collect();
        for h in 0..c.hosts.len() {
            p.classify(h);
        }
        p
    }

    /// Keeps busy hosts in buckets of planned load, so that best fit rates few of them
    /// (see `Candidates`). Worth it for searches over many hosts.
    pub fn index_by_load(&mut self) {
        if !self.lr_base.is_empty() && !self.c.hosts.is_empty() {
            // The look-ahead grows with RAM and falls with bandwidth: the extremes bound it.
            let c = self.c;
            let rams = c.fleet.vms.iter().map(|v| v.ram_mb);
            let (lo, hi) = (rams.clone().min().unwrap_or(0), rams.max().unwrap_or(0));
            let ahead = |ram: u64, h: usize| self.look_ahead(h, ram);
            let mut all = (0..c.hosts.len()).flat_map(|h| [ahead(lo, h), ahead(hi, h)]);
            let first = all.next();
            if first.is_some_and(|f| all.all(|x| x == f)) {
                self.uniform_look_ahead = first;
            }
        }
        self.cand.with_buckets();
        for h in self.cand.busy().to_vec() {
            self.classify(h);
        }
    }

    /// Takes host `h` out of best fit's index for the rest of this plan: a caller that will
    /// exclude it from every later search says so, so that searches do not pass over it.
    pub fn exclude(&mut self, h: usize) {
        if !self.index_excluded[h] {
            self.index_excluded[h] = true;
            self.classify(h);
        }
    }

    /// Refreshes the LR summary of host `h`'s history after `hist_base[h]` changed.
    fn refit(&mut self, h: usize) {
        if self.lr_base.is_empty() {
            return;
        }
        let base = &self.hist_base[h];
        self.lr_base[h] = least_squares(&base[..LR_WINDOW]);
        self.base_len[h] = trimmed_len(base, self.c.history_len);
    }

    /// MIPS best fit counts as already used on `h`.
    fn planned(&self, h: usize) -> f64 {
        let cpu = self.cpu(h);
        let used = if self.rate_planned_load {
            cpu.used
        } else {
            self.c.hosts[h].util_mips
        };
        used + cpu.incoming_extra
    }

    /// Puts host `h` in the right part of the candidate index after its plan changed.
    fn classify(&mut self, h: usize) {
        let hr = &self.c.hosts[h];
        let class = if !hr.up || hr.maintenance || self.index_excluded[h] {
            Class::Unusable
        } else if self.members[h].is_empty() && self.util_field[h] == 0.0 {
            Class::Idle
        } else {
            let spec = self.c.host_spec(h);
            let planned = self.planned(h);
            let load = planned / spec.total_mips();
            // A bucket may be skipped for LR overload only if each of its hosts would be
            // tested (something planned) on a full window of its own history.
            let lr_predicted = match (self.detector, self.uniform_look_ahead) {
                (Detector::Lr(_) | Detector::Lrr(_), Some(ahead))
                    if planned != 0.0 && self.base_len[h] >= LR_WINDOW =>
                {
                    let (a, b) = self.lr_base[h];
                    Some(a + b * (LR_WINDOW as f64 + ahead))
                }
                _ => None,
            };
            Class::Busy {
                load,
                delta_w: spec.power.watts_at(load) - self.power_now[h],
                lr_predicted,
                available: self.cpu(h).available,
                free_ram: if self.memory_checked() {
                    spec.ram_mb.saturating_sub(self.ram_used[h])
                } else {
                    u64::MAX
                },
            }
        };
        self.cand.set(h, class);
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
        self.max_ram[h] = self.max_ram[h].max(vs.ram_mb);
        self.cpu_cache[h] = self.compute_cpu(h);
        if !self.hist_base.is_empty() {
            self.hist_base[h] = self.weighted_history(h);
            self.refit(h);
        }
        self.classify(h);
    }

    pub fn destroy(&mut self, h: usize, v: usize) {
        if let Some(p) = self.members[h].iter().position(|&x| x == v) {
            let vs = self.c.vm_spec(v);
            self.members[h].remove(p);
            self.ram_used[h] -= vs.ram_mb;
            self.bw_used[h] -= vs.bw_mbps;
            let c = self.c;
            self.max_ram[h] = self.members[h]
                .iter()
                .map(|&x| c.vm_spec(x).ram_mb)
                .max()
                .unwrap_or(0);
            self.cpu_cache[h] = self.compute_cpu(h);
            if !self.hist_base.is_empty() {
                self.hist_base[h] = self.weighted_history(h);
                self.refit(h);
            }
            self.classify(h);
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
        let len = trimmed_len(&out, self.c.history_len);
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
                .unwrap_or(0);
            self.look_ahead(h, max_ram)
        };
        self.detector
            .overloaded(&hist[..len], asked / spec.total_mips(), intervals)
    }

    /// Scheduling intervals LR looks ahead on host `h` whose largest VM has `max_ram` MB:
    /// that VM's migration time.
    fn look_ahead(&self, h: usize, max_ram: u64) -> f64 {
        let bw = self.c.host_spec(h).bw_mbps;
        let mig_s = self.c.fleet.migration.cost(max_ram as f64, 0.0, bw).total_s;
        (mig_s / self.c.fleet.interval_s).ceil()
    }

    /// Power-aware best fit: the allowed host whose power rises least by taking `v` (the
    /// lowest-numbered one on a tie). Only some hosts are rated (see `Candidates`); the
    /// host is the one rating every host gives.
    pub fn find_host(&self, v: usize, excluded: &[bool]) -> Option<usize> {
        let mut best = (f64::MAX, usize::MAX);
        let fit = self.vm_fit(v);
        if self.idle_dest {
            for h in self.cand.idle_representatives(excluded) {
                self.try_host(h, v, &fit, &mut best);
            }
        }
        if self.cand.has_buckets() {
            let lr = match (self.detector, self.uniform_look_ahead) {
                (Detector::Lr(safety) | Detector::Lrr(safety), Some(ahead)) => Some(LrQuery {
                    vm_mips: self.c.vm_spec(v).mips,
                    vm_predicted: fit.0 + fit.1 * (LR_WINDOW as f64 + ahead),
                    safety,
                }),
                _ => None,
            };
            for (bound, s, k) in
                self.cand
                    .buckets_by_bound(self.c.vms[v].req_mips, self.c.vm_spec(v).ram_mb, lr)
            {
                if bound > best.0 {
                    break;
                }
                for h in self.cand.bucket(s, k, lr) {
                    if !excluded[h] {
                        self.try_host(h, v, &fit, &mut best);
                    }
                }
            }
        } else {
            for &h in self.cand.busy() {
                if !excluded[h] {
                    self.try_host(h, v, &fit, &mut best);
                }
            }
        }
        (best.1 != usize::MAX).then_some(best.1)
    }

    /// LR's view of VM `v`'s history: (intercept, slope) on its last samples and how many
    /// samples it has (zero tail trimmed).
    fn vm_fit(&self, v: usize) -> (f64, f64, usize) {
        if self.lr_base.is_empty() {
            return (0.0, 0.0, 0);
        }
        let mut hist = [0.0; MAX_HISTORY];
        for (i, u) in self.c.vms[v].history.iter().take(MAX_HISTORY).enumerate() {
            hist[i] = *u;
        }
        let (a, b) = least_squares(&hist[..LR_WINDOW]);
        (a, b, trimmed_len(&hist, self.c.history_len))
    }

    /// Rates host `h` for `v` and makes it `best` (power rise, host) if it may take it and
    /// beats it.
    fn try_host(&self, h: usize, v: usize, fit: &(f64, f64, usize), best: &mut (f64, usize)) {
        if !self.suitable(h, v) {
            return;
        }
        let req = self.c.vms[v].req_mips;
        let spec = self.c.host_spec(h);
        // As CloudSim 4.0 (getUtilizationOfCpuMips): the MIPS allocated to the host's
        // planned members, including VMs planned onto it this round, plus the other 90 % of
        // what is migrating in. The power it is compared with is the measured one.
        let planned = self.planned(h);
        let after = (planned + req) / spec.total_mips();
        if after > 1.0 + 1e-12 {
            return;
        }
        let diff = spec.power.watts_at(after) - self.power_now[h];
        if diff > best.0 || (diff == best.0 && h > best.1) {
            return;
        }
        if planned != 0.0 && self.overloaded_with(h, v, fit) {
            return;
        }
        *best = (diff, h);
    }

    /// `overloaded(h, Some(v))`, in O(1) for LR where the answer is clear: LR's prediction is
    /// linear in the history, so the host's and the VM's fits add up (weighted by the VM's
    /// share of the host); within rounding of the threshold the full test decides.
    fn overloaded_with(&self, h: usize, v: usize, fit: &(f64, f64, usize)) -> bool {
        if let (Detector::Lr(safety) | Detector::Lrr(safety), false) =
            (self.detector, self.lr_base.is_empty())
        {
            if self.base_len[h].max(fit.2) >= LR_WINDOW {
                let w = self.c.vm_spec(v).mips / self.c.host_spec(h).total_mips();
                let (a, b) = self.lr_base[h];
                let ram = self.max_ram[h].max(self.c.vm_spec(v).ram_mb);
                let x = LR_WINDOW as f64 + self.look_ahead(h, ram);
                let predicted = ((a + w * fit.0) + (b + w * fit.1) * x) * safety;
                if predicted >= 1.0 + 1e-9 {
                    return true;
                }
                if predicted < 1.0 - 1e-9 {
                    return false;
                }
            }
        }
        self.overloaded(h, Some(v))
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

/// Samples in `hist` (most recent first) up to `history_len`, without the zero tail.
fn trimmed_len(hist: &[f64; MAX_HISTORY], history_len: usize) -> usize {
    let mut len = history_len.min(MAX_HISTORY);
    while len > 0 && hist[len - 1] == 0.0 {
        len -= 1;
    }
    len
}
