//! Runtime state of the simulated fleet and how CPU is shared on a host.
//!
//! CPU sharing follows CloudSim's time-shared over-subscription scheduler, so that the
//! published baseline can be reproduced: each VM asks for demand x MIPS (capped at one core
//! per virtual core); a VM migrating out gets 90 % of that, the destination reserves 10 %;
//! when the asks exceed the host, everyone is scaled down proportionally.
use crate::fleet::{Fleet, HostSpec, VmSpec};
use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub struct HostRt {
    /// VMs on this host in arrival order, including VMs migrating in.
    pub vms: Vec<usize>,
    pub ram_used: u64,
    pub bw_used: f64,
    /// MIPS in use after the last update (0 means the host is off).
    pub util_mips: f64,
    /// MIPS the VMs asked for at the last update.
    pub req_mips: f64,
    pub up: bool,
    pub maintenance: bool,
}

#[derive(Debug, Clone)]
pub struct VmRt {
    pub host: Option<usize>,
    /// Destination while a migration is in flight.
    pub dest: Option<usize>,
    pub req_mips: f64,
    pub alloc_mips: f64,
    pub in_migration: bool,
    /// Left the run for good (CloudSim's finished VMs, see Fleet::cloudsim_engine).
    pub retired: bool,
    /// Demand samples taken at each scheduling tick, most recent first.
    pub history: VecDeque<f64>,
}

pub struct Cluster<'f> {
    pub fleet: &'f Fleet,
    pub hosts: Vec<HostRt>,
    pub vms: Vec<VmRt>,
    pub history_len: usize,
}

impl<'f> Cluster<'f> {
    pub fn new(fleet: &'f Fleet, history_len: usize) -> Self {
        let hosts = fleet
            .hosts
            .iter()
            .map(|_| HostRt {
                vms: Vec::new(),
                ram_used: 0,
                bw_used: 0.0,
                util_mips: 0.0,
                req_mips: 0.0,
                up: true,
                maintenance: false,
            })
            .collect();
        let vms = fleet
            .vms
            .iter()
            .map(|v| VmRt {
                host: None,
                dest: None,
                // Until the first tick a VM asks for all of its MIPS (as CloudSim does at creation).
                req_mips: v.total_mips(),
                alloc_mips: 0.0,
                in_migration: false,
                retired: false,
                history: VecDeque::with_capacity(history_len),
            })
            .collect();
        Cluster {
            fleet,
            hosts,
            vms,
            history_len,
        }
    }

    pub fn host_spec(&self, h: usize) -> &HostSpec {
        &self.fleet.hosts[h]
    }
    pub fn vm_spec(&self, v: usize) -> &VmSpec {
        &self.fleet.vms[v]
    }

    /// Can host `h` take VM `v` now: up, not in maintenance, memory and bandwidth left.
    pub fn has_room(&self, h: usize, v: usize) -> bool {
        let (hs, hr, vs) = (&self.fleet.hosts[h], &self.hosts[h], &self.fleet.vms[v]);
        hr.up
            && !hr.maintenance
            && (self.fleet.cloudsim_ram
                || hr.ram_used + vs.ram_mb <= hs.ram_mb
                    && hr.bw_used + vs.bw_mbps <= hs.bw_mbps + 1e-9)
    }

    /// Puts `v` on `h` (initial placement, restart, or the destination side of a migration).
    pub fn attach(&mut self, v: usize, h: usize) {
        let vs = &self.fleet.vms[v];
        let hr = &mut self.hosts[h];
        hr.vms.push(v);
        hr.ram_used += vs.ram_mb;
        hr.bw_used += vs.bw_mbps;
    }

    pub fn detach(&mut self, v: usize, h: usize) {
        let vs = &self.fleet.vms[v];
        let hr = &mut self.hosts[h];
        if let Some(pos) = hr.vms.iter().position(|&x| x == v) {
            hr.vms.remove(pos);
            hr.ram_used -= vs.ram_mb;
            hr.bw_used -= vs.bw_mbps;
        }
    }

    /// Recomputes the CPU each VM on `h` gets, the host's used MIPS and whether it is short.
    /// Returns (used MIPS, requested MIPS).
    pub fn recompute_host(&mut self, h: usize) -> (f64, f64) {
        let spec = &self.fleet.hosts[h];
        let cap = spec.total_mips();
        let mut required = 0.0;
        for &v in &self.hosts[h].vms {
            let vs = &self.fleet.vms[v];
            let per_pe = (self.vms[v].req_mips / vs.pes as f64).min(spec.pe_mips);
            let mut r = per_pe * vs.pes as f64;
            // A VM on this host's list that lives elsewhere is migrating in.
            if self.vms[v].host != Some(h) {
                r *= 0.1;
            }
            required += r;
        }
        let scale = if required > cap {
            Some(cap / required)
        } else {
            None
        };
        let (mut used, mut requested) = (0.0, 0.0);
        for i in 0..self.hosts[h].vms.len() {
            let v = self.hosts[h].vms[i];
            let vs = &self.fleet.vms[v];
            let vm = &mut self.vms[v];
            let incoming = vm.host != Some(h);
            let outgoing = vm.dest.is_some() && !incoming;
            let per_pe_req = vm.req_mips / vs.pes as f64;
            let mut per_pe = per_pe_req.min(spec.pe_mips);
            if outgoing {
                per_pe *= 0.9;
            } else if incoming {
                per_pe *= 0.1;
            }
            if let Some(s) = scale {
                per_pe = (per_pe * s).floor();
            }
            let mut alloc = per_pe * vs.pes as f64;
            if !incoming {
                vm.alloc_mips = alloc;
                vm.in_migration = outgoing;
                if outgoing {
                    // The source still burns the full share: 10 % is migration overhead.
                    alloc /= 0.9;
                }
            }
            used += alloc;
            requested += vm.req_mips;
        }
        let hr = &mut self.hosts[h];
        hr.util_mips = used;
        hr.req_mips = requested;
        (used, requested)
    }

    pub fn utilization(&self, h: usize) -> f64 {
        (self.hosts[h].util_mips / self.fleet.hosts[h].total_mips()).min(1.0)
    }

    /// Records the current demand of every VM in its history (at scheduling ticks).
    pub fn push_history(&mut self) {
        if self.history_len == 0 {
            return;
        }
        for (v, vm) in self.vms.iter_mut().enumerate() {
            let u = vm.req_mips / self.fleet.vms[v].total_mips();
            if vm.history.len() == self.history_len {
                vm.history.pop_back();
            }
            vm.history.push_front(u);
        }
    }
}
