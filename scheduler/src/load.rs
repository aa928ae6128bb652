//! Host load bookkeeping with running sums, so the imbalance after a candidate move is O(1).
//!
//! Normalized load of a host = sum of its VMs' entitlements / capacity, per resource.
//! Imbalance = sqrt((var_cpu + var_mem) / 2) over connected hosts: the standard deviation of
//! normalized load with CPU and memory weighted equally.
use crate::cluster::Cluster;

/// `vm_host` value of a VM that runs nowhere yet.
pub(crate) const NOWHERE: usize = usize::MAX;

#[derive(Debug, Clone)]
pub(crate) struct LoadState<'a> {
    pub(crate) c: &'a Cluster,
    pub(crate) cpu: Vec<f64>,
    pub(crate) mem: Vec<f64>,
    pub(crate) cpu_res: Vec<f64>,
    pub(crate) vm_host: Vec<usize>,
    pub(crate) host_vms: Vec<Vec<usize>>,
    usable: Vec<bool>,
    n: f64,
    s1c: f64,
    s2c: f64,
    s1m: f64,
    s2m: f64,
}

impl<'a> LoadState<'a> {
    pub(crate) fn new(c: &'a Cluster) -> LoadState<'a> {
        let nh = c.snap.hosts.len();
        let mut cpu = vec![0.0; nh];
        let mut mem = vec![0.0; nh];
        let mut cpu_res = vec![0.0; nh];
        let mut host_vms = vec![Vec::new(); nh];
        for (v, &h) in c.vm_host.iter().enumerate() {
            let res = c.snap.vms[v].cpu.reservation;
            cpu[h] += c.cpu_ent[v];
            mem[h] += c.mem_ent[v];
            cpu_res[h] += res;
            host_vms[h].push(v);
            // An in-flight VM already holds room on its destination too.
            if let Some(t) = c.in_flight_to[v] {
                cpu[t] += c.cpu_ent[v];
                mem[t] += c.mem_ent[v];
                cpu_res[t] += res;
            }
        }
        let usable: Vec<bool> = (0..nh).map(|h| c.host_usable(h)).collect();
        let mut s = LoadState {
            c,
            cpu,
            mem,
            cpu_res,
            vm_host: c.vm_host.clone(),
            host_vms,
            usable,
            n: 0.0,
            s1c: 0.0,
            s2c: 0.0,
            s1m: 0.0,
            s2m: 0.0,
        };
        s.resum();
        s
    }

    /// Recompute the running sums from scratch (also bounds floating-point drift).
    pub(crate) fn resum(&mut self) {
        let (mut n, mut s1c, mut s2c, mut s1m, mut s2m) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for h in 0..self.cpu.len() {
            if self.usable[h] {
                let (lc, lm) = (self.load_cpu(h), self.load_mem(h));
                n += 1.0;
                s1c += lc;
                s2c += lc * lc;
                s1m += lm;
                s2m += lm * lm;
            }
        }
        (self.n, self.s1c, self.s2c, self.s1m, self.s2m) = (n, s1c, s2c, s1m, s2m);
    }

    /// Forget where VM `v` runs (a VM being placed): it then loads no host.
    pub(crate) fn detach(&mut self, v: usize) {
        let from = self.vm_host[v];
        let (dc, dm) = (self.c.cpu_ent[v], self.c.mem_ent[v]);
        self.adjust(from, -dc, -dm);
        self.cpu_res[from] -= self.c.snap.vms[v].cpu.reservation;
        if let Some(p) = self.host_vms[from].iter().position(|&x| x == v) {
            self.host_vms[from].swap_remove(p);
        }
        self.vm_host[v] = NOWHERE;
    }

    /// Take host `h` out of the statistics and out of the destinations (it is being emptied).
    pub(crate) fn exclude(&mut self, h: usize) {
        self.usable[h] = false;
        self.resum();
    }

    pub(crate) fn load_cpu(&self, h: usize) -> f64 {
        self.cpu[h] / self.c.snap.hosts[h].cpu_mhz
    }
    pub(crate) fn load_mem(&self, h: usize) -> f64 {
        self.mem[h] / self.c.snap.hosts[h].memory_mib
    }
    /// Combined normalized load used to order hosts.
    pub(crate) fn load(&self, h: usize) -> f64 {
        (self.load_cpu(h) + self.load_mem(h)) / 2.0
    }
    pub(crate) fn usable(&self, h: usize) -> bool {
        self.usable[h]
    }

    pub(crate) fn imbalance(&self) -> f64 {
        imbalance_of(self.n, self.s1c, self.s2c, self.s1m, self.s2m)
    }

    /// Imbalance if VM `v` (cpu `dc`, mem `dm`) went from `from` (None = a new VM) to `to`.
    pub(crate) fn imbalance_if(&self, dc: f64, dm: f64, from: Option<usize>, to: usize) -> f64 {
        let (n, mut s1c, mut s2c, mut s1m, mut s2m) =
            (self.n, self.s1c, self.s2c, self.s1m, self.s2m);
        let mut shift = |h: usize, sign: f64| {
            if !self.usable[h] {
                return;
            }
            let host = &self.c.snap.hosts[h];
            let (oc, om) = (self.load_cpu(h), self.load_mem(h));
            let (nc, nm) = (
                oc + sign * dc / host.cpu_mhz,
                om + sign * dm / host.memory_mib,
            );
            s1c += nc - oc;
            s2c += nc * nc - oc * oc;
            s1m += nm - om;
            s2m += nm * nm - om * om;
        };
        if let Some(f) = from {
            shift(f, -1.0);
        }
        shift(to, 1.0);
        imbalance_of(n, s1c, s2c, s1m, s2m)
    }

    /// Move VM `v` to host `to` in the bookkeeping.
    pub(crate) fn apply(&mut self, v: usize, to: usize) {
        let from = self.vm_host[v];
        let (dc, dm) = (self.c.cpu_ent[v], self.c.mem_ent[v]);
        let res = self.c.snap.vms[v].cpu.reservation;
        self.adjust(from, -dc, -dm);
        self.adjust(to, dc, dm);
        self.cpu_res[from] -= res;
        self.cpu_res[to] += res;
        self.vm_host[v] = to;
        if let Some(p) = self.host_vms[from].iter().position(|&x| x == v) {
            self.host_vms[from].swap_remove(p);
        }
        self.host_vms[to].push(v);
    }

    fn adjust(&mut self, h: usize, dc: f64, dm: f64) {
        if self.usable[h] {
            let (oc, om) = (self.load_cpu(h), self.load_mem(h));
            let host = &self.c.snap.hosts[h];
            let (nc, nm) = (oc + dc / host.cpu_mhz, om + dm / host.memory_mib);
            self.s1c += nc - oc;
            self.s2c += nc * nc - oc * oc;
            self.s1m += nm - om;
            self.s2m += nm * nm - om * om;
        }
        self.cpu[h] += dc;
        self.mem[h] += dm;
    }
}

fn imbalance_of(n: f64, s1c: f64, s2c: f64, s1m: f64, s2m: f64) -> f64 {
    if n < 1.0 {
        return 0.0;
    }
    let var = |s1: f64, s2: f64| (s2 / n - (s1 / n) * (s1 / n)).max(0.0);
    ((var(s1c, s2c) + var(s1m, s2m)) / 2.0).sqrt()
}
