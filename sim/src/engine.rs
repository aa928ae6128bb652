//! The discrete-event loop: scheduling ticks, migration completions and host events, in time
//! order, with every state change feeding the metrics.
use crate::cluster::Cluster;
use crate::error::{Result, SimError};
use crate::fleet::{positive, EventKind, Fleet};
use crate::metrics::{Accum, Report, TimePoint};
use crate::policy::{Move, Policy};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Debug, Clone, Copy)]
struct Completion {
    at: f64,
    seq: u64,
    vm: usize,
    to: usize,
}

impl PartialEq for Completion {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Completion {}
impl PartialOrd for Completion {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Completion {
    // Min-heap by (time, start order).
    fn cmp(&self, o: &Self) -> Ordering {
        o.at.total_cmp(&self.at).then(o.seq.cmp(&self.seq))
    }
}

pub struct Engine<'f> {
    pub c: Cluster<'f>,
    acc: Accum,
    /// Time of the last update of the whole fleet.
    last_t: f64,
    /// Per host and per VM: the time up to which it has been charged to the metrics. Equal
    /// to `last_t` except for hosts updated on their own at a migration completion.
    host_t: Vec<f64>,
    vm_t: Vec<f64>,
    inflight: BinaryHeap<Completion>,
    /// When each VM's latest migration started.
    started_at: Vec<f64>,
    seq: u64,
    timeline: Vec<TimePoint>,
    /// The policy's hosts draw peak power whatever their load (NPA).
    peak_power: bool,
}

/// Runs `fleet` under `policy`. `progress(done, total)` is called after each tick.
pub fn run(
    fleet: &Fleet,
    policy: &mut dyn Policy,
    seed: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report> {
    if !positive(fleet.interval_s) || !positive(fleet.duration_s) {
        return Err(SimError::Invalid(
            "interval and duration must be positive".into(),
        ));
    }
    let mut e = Engine {
        c: Cluster::new(fleet, policy.history_len()),
        acc: Accum::default(),
        last_t: 0.0,
        host_t: vec![0.0; fleet.hosts.len()],
        vm_t: vec![0.0; fleet.vms.len()],
        inflight: BinaryHeap::new(),
        started_at: vec![f64::NAN; fleet.vms.len()],
        seq: 0,
        timeline: Vec::new(),
        peak_power: policy.peak_power(),
    };
    let placement = policy.initial_placement(&e.c);
    for (v, h) in placement.into_iter().enumerate() {
        match h {
            Some(h) if e.c.has_room(h, v) => {
                e.c.attach(v, h);
                e.c.vms[v].host = Some(h);
            }
            _ => return Err(SimError::NoRoom { vm: v }),
        }
    }
    let mut events = fleet.events.clone();
    events.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    let mut next_event = 0;
    let ticks = ((fleet.duration_s / fleet.interval_s).ceil() as u64).saturating_sub(1);
    let offset = if fleet.cloudsim_engine { 0.1 } else { 0.0 };

    for k in 1..=ticks {
        let t = k as f64 * fleet.interval_s + offset;
        e.drain_until(t, &events, &mut next_event, policy);
        e.update_all(t, true);
        e.sample(t);
        for h in 0..e.c.hosts.len() {
            if e.c.hosts[h].maintenance
                && e.c.hosts[h]
                    .vms
                    .iter()
                    .any(|&v| e.c.vms[v].host == Some(h) && e.c.vms[v].dest.is_none())
            {
                let moves = policy.evacuate(&e.c, h);
                e.start(&moves, t);
            }
        }
        let moves = policy.optimize(&e.c, t);
        e.start(&moves, t);
        progress(k, ticks);
    }
    e.drain_until(fleet.duration_s, &events, &mut next_event, policy);
    Ok(e.acc.report(
        &policy.name(),
        fleet.hosts.len(),
        fleet.vms.len(),
        fleet.duration_s,
        seed,
        e.timeline,
    ))
}

impl<'f> Engine<'f> {
    /// Processes migration completions and host events strictly before `t`.
    fn drain_until(
        &mut self,
        t: f64,
        events: &[crate::fleet::HostEvent],
        next: &mut usize,
        policy: &mut dyn Policy,
    ) {
        loop {
            let mig = self.inflight.peek().map(|m| m.at).filter(|&a| a < t);
            let ev = events.get(*next).map(|e| e.at_s).filter(|&a| a < t);
            match (mig, ev) {
                (Some(a), Some(b)) if b < a => self.host_event(&events[*next], policy, next),
                (Some(a), _) => self.complete_at(a),
                (None, Some(_)) => self.host_event(&events[*next], policy, next),
                (None, None) => break,
            }
        }
    }

    /// Completes the migrations that end at `at`. Under CloudSim's engine every host is
    /// updated (CloudSim updates the whole datacentre at each event); otherwise only the
    /// hosts the migrations touch are, so a completion costs O(VMs on them), not O(fleet).
    fn complete_at(&mut self, at: f64) {
        let mut done = Vec::new();
        while let Some(m) = self.inflight.peek().copied() {
            if m.at != at {
                break;
            }
            self.inflight.pop();
            done.push(m);
        }
        let local = !self.c.fleet.cloudsim_engine;
        let mut touched = Vec::new();
        if local {
            for m in &done {
                let vm = &self.c.vms[m.vm];
                touched.extend([Some(m.to), vm.host, vm.dest].into_iter().flatten());
            }
            touched.sort_unstable();
            touched.dedup();
            self.update_hosts(&touched, at);
        } else {
            self.update_all(at, false);
        }
        for m in done {
            if self.c.vms[m.vm].dest != Some(m.to) {
                // Cancelled by a host failure, or the first of CloudSim's two simultaneous
                // migrations of one VM (see start): the destination lets the VM go.
                if self.c.vms[m.vm].host != Some(m.to) {
                    self.c.detach(m.vm, m.to);
                }
                continue;
            }
            let src = self.c.vms[m.vm].host;
            if let Some(s) = src {
                self.c.detach(m.vm, s);
            }
            // The VM joins the end of the destination's list, as a fresh placement would.
            self.c.detach(m.vm, m.to);
            self.c.attach(m.vm, m.to);
            let vm = &mut self.c.vms[m.vm];
            vm.host = Some(m.to);
            vm.dest = None;
            vm.in_migration = false;
        }
        if local {
            self.update_hosts(&touched, at);
        } else {
            self.update_all(at, false);
        }
    }

    fn host_event(
        &mut self,
        ev: &crate::fleet::HostEvent,
        policy: &mut dyn Policy,
        next: &mut usize,
    ) {
        *next += 1;
        let (h, t) = (ev.host, ev.at_s);
        self.update_all(t, false);
        match ev.kind {
            EventKind::Fail => {
                self.c.hosts[h].up = false;
                let on_host = self.c.hosts[h].vms.clone();
                let mut lost = Vec::new();
                for v in on_host {
                    self.c.detach(v, h);
                    if self.c.vms[v].dest == Some(h) {
                        self.c.vms[v].dest = None; // incoming migration aborted, VM stays home
                        continue;
                    }
                    if self.c.vms[v].host != Some(h) {
                        continue; // a second incoming copy (CloudSim double migration)
                    }
                    if let Some(d) = self.c.vms[v].dest.take() {
                        self.c.detach(v, d);
                    }
                    self.c.vms[v].host = None;
                    self.c.vms[v].alloc_mips = 0.0;
                    self.c.vms[v].in_migration = false;
                    lost.push(v);
                }
                let homes = policy.restart(&self.c, &lost);
                for (&v, h2) in lost.iter().zip(homes) {
                    if let Some(h2) = h2.filter(|&h2| self.c.has_room(h2, v)) {
                        self.c.attach(v, h2);
                        self.c.vms[v].host = Some(h2);
                        self.acc.restarts += 1;
                    }
                }
            }
            EventKind::Recover => self.c.hosts[h].up = true,
            EventKind::MaintenanceEnter => {
                self.c.hosts[h].maintenance = true;
                let moves = policy.evacuate(&self.c, h);
                self.start(&moves, t);
            }
            EventKind::MaintenanceExit => self.c.hosts[h].maintenance = false,
        }
        self.update_all(t, false);
    }

    /// Starts the migrations a policy asked for; moves that do not fit are refused.
    fn start(&mut self, moves: &[Move], t: f64) {
        for m in moves {
            let vm = &self.c.vms[m.vm];
            // CloudSim starts every move it planned, even a second one of a VM whose first
            // move starts in the same round: both destinations hold it while it moves, both
            // count, and it ends on the second (its events complete in order).
            let again = self.c.fleet.cloudsim_engine
                && vm.dest.is_some()
                && self.started_at.get(m.vm) == Some(&t)
                && !self.c.hosts[m.to].vms.contains(&m.vm);
            let ok = (vm.dest.is_none() || again)
                && vm.host.is_some()
                && vm.host != Some(m.to)
                && self.c.has_room(m.to, m.vm);
            if !ok {
                self.acc.rejected_moves += 1;
                continue;
            }
            let src = vm.host.unwrap_or(m.to);
            let vs = self.c.vm_spec(m.vm);
            let demand = vm.req_mips / vs.total_mips();
            let link = self
                .c
                .host_spec(src)
                .bw_mbps
                .min(self.c.host_spec(m.to).bw_mbps);
            let cost = self
                .c
                .fleet
                .migration
                .cost(vs.ram_mb as f64, vs.dirty_mb_s * demand, link);
            self.c.attach(m.vm, m.to);
            self.c.vms[m.vm].dest = Some(m.to);
            self.started_at[m.vm] = t;
            self.seq += 1;
            self.inflight.push(Completion {
                at: t + cost.total_s,
                seq: self.seq,
                vm: m.vm,
                to: m.to,
            });
            self.acc.migrations += 1;
            self.acc.bytes_moved += cost.bytes;
            self.acc.downtimes_s.push(cost.downtime_s);
            self.c.recompute_host(src);
            self.c.recompute_host(m.to);
            let hs = self.c.host_spec(m.to);
            let ratio = self.c.hosts[m.to].ram_used as f64 / hs.ram_mb as f64;
            self.acc.peak_ram_ratio = self.acc.peak_ram_ratio.max(ratio);
        }
    }

    /// Advances the clock to `t`: charges the interval since the last update to the metrics,
    /// then takes every VM's new demand and recomputes every host.
    fn update_all(&mut self, t: f64, tick: bool) {
        let c = &mut self.c;
        for (h, hr) in c.hosts.iter().enumerate() {
            charge_host(&mut self.acc, hr, t - self.host_t[h]);
        }
        for v in 0..c.vms.len() {
            refresh_vm(&mut self.acc, c, &mut self.vm_t, v, t);
        }
        for h in 0..c.hosts.len() {
            recompute_and_charge(&mut self.acc, c, &mut self.host_t, h, t, self.peak_power);
        }
        if t > self.last_t {
            self.last_t = t;
        }
        if c.fleet.cloudsim_engine && self.last_t > 0.0 {
            retire_finished(c);
        }
        if tick {
            c.push_history();
        }
    }

    /// Brings only `hosts` (sorted, distinct) and the VMs that live on them up to `t`.
    fn update_hosts(&mut self, hosts: &[usize], t: f64) {
        let c = &mut self.c;
        for &h in hosts {
            charge_host(&mut self.acc, &c.hosts[h], t - self.host_t[h]);
        }
        for &h in hosts {
            for i in 0..c.hosts[h].vms.len() {
                let v = c.hosts[h].vms[i];
                if c.vms[v].host == Some(h) {
                    refresh_vm(&mut self.acc, c, &mut self.vm_t, v, t);
                }
            }
        }
        for &h in hosts {
            recompute_and_charge(&mut self.acc, c, &mut self.host_t, h, t, self.peak_power);
        }
    }

    fn sample(&mut self, t: f64) {
        let c = &self.c;
        let (mut demand, mut cap, mut served) = (0.0, 0.0, 0.0);
        let mut loads = Vec::new();
        let mut active = 0;
        for (h, hr) in c.hosts.iter().enumerate() {
            let hc = c.fleet.hosts[h].total_mips();
            if hr.up {
                cap += hc;
            }
            if hr.util_mips > 0.0 {
                active += 1;
            }
            if !hr.vms.is_empty() {
                loads.push(hr.req_mips / hc);
            }
        }
        for vm in &c.vms {
            demand += vm.req_mips;
            served += vm.alloc_mips.min(vm.req_mips);
        }
        let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
        let var = loads.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / loads.len().max(1) as f64;
        self.timeline.push(TimePoint {
            t_s: t,
            load: if cap > 0.0 { demand / cap } else { 0.0 },
            imbalance: var.sqrt(),
            active_hosts: active,
            unmet: if demand > 0.0 {
                (demand - served) / demand
            } else {
                0.0
            },
            migrations: self.acc.migrations,
        });
    }
}

/// Charges host time since the host's last update (`dt`) to SLATAH's counters.
fn charge_host(acc: &mut Accum, hr: &crate::cluster::HostRt, dt: f64) {
    if dt > 0.0 && hr.util_mips > 0.0 {
        acc.host_active_s += dt;
        if hr.util_mips < hr.req_mips {
            acc.host_short_s += dt;
        }
    }
}

/// Charges VM `v`'s demand and allocation since its last update, then reads its demand at
/// `t`. Before the first update VMs have no measured share yet (CloudSim starts its per-VM
/// history at the first tick), so the first interval is not charged.
fn refresh_vm(acc: &mut Accum, c: &mut Cluster, vm_t: &mut [f64], v: usize, t: f64) {
    let dt = t - vm_t[v];
    if dt <= 0.0 {
        return;
    }
    let vm = &mut c.vms[v];
    if vm_t[v] > 0.0 {
        acc.vm_requested += vm.req_mips * dt;
        acc.vm_allocated += vm.alloc_mips * dt;
        if vm.in_migration {
            acc.vm_short_in_migration += (vm.req_mips - vm.alloc_mips) * dt;
        }
        let entitled = if vm.in_migration {
            0.9 * vm.req_mips
        } else {
            vm.req_mips
        };
        acc.vm_short_contention += (entitled - vm.alloc_mips).max(0.0) * dt;
    }
    let vs = &c.fleet.vms[v];
    vm.req_mips = if vm.retired {
        0.0
    } else {
        vs.workload.at(t) * vs.total_mips()
    };
    if vm.host.is_none() {
        vm.alloc_mips = 0.0;
    }
    vm_t[v] = t;
}

/// Recomputes host `h` and charges its energy since its last update (the trapezoid between
/// its utilisation then and now, or peak power under NPA).
fn recompute_and_charge(
    acc: &mut Accum,
    c: &mut Cluster,
    host_t: &mut [f64],
    h: usize,
    t: f64,
    peak_power: bool,
) {
    let before = c.utilization(h);
    c.recompute_host(h);
    let dt = t - host_t[h];
    if dt > 0.0 {
        let power = &c.fleet.hosts[h].power;
        acc.energy_j += if peak_power {
            if c.hosts[h].up {
                power.watts_at(1.0) * dt
            } else {
                0.0
            }
        } else {
            power.energy_joules(before, c.utilization(h), dt)
        };
        host_t[h] = t;
    }
}

/// CloudSim removes a VM that asks for exactly 0 MIPS at an update and is not migrating:
/// its cloudlet scheduler reports it finished. The VM leaves its host for good.
fn retire_finished(c: &mut Cluster) {
    for v in 0..c.vms.len() {
        let vm = &c.vms[v];
        if vm.retired || vm.dest.is_some() || vm.req_mips != 0.0 {
            continue;
        }
        let Some(h) = vm.host else { continue };
        c.detach(v, h);
        let vm = &mut c.vms[v];
        vm.host = None;
        vm.retired = true;
        vm.alloc_mips = 0.0;
        vm.in_migration = false;
    }
}
