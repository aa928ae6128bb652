//! Starting placement by demand (`--initial-placement demand`): each VM is sized by what it
//! asks for at t = 0 with headroom, and VMs go best fit decreasing. Memory and bandwidth are
//! always respected; CPU is not reserved at full size, so hosts drift into contention as
//! loads rise, which is what a balancing policy has to relieve.
use crate::cluster::Cluster;
use crate::fleet::DEMAND_HEADROOM;

/// MIPS VM `v` is sized at: its first demand sample x headroom, at most its full size.
pub fn demand_size(c: &Cluster, v: usize) -> f64 {
    let vs = c.vm_spec(v);
    (vs.workload.at(0.0) * DEMAND_HEADROOM).clamp(0.0, 1.0) * vs.total_mips()
}

/// Best fit decreasing by demand size: each VM to the usable host with memory left whose CPU
/// left after taking it is smallest. A VM no host has CPU for goes to the host with memory
/// left and the most CPU left (contention from the start); None only when memory is full.
pub fn demand_initial(c: &Cluster) -> Vec<Option<usize>> {
    let sizes: Vec<f64> = (0..c.vms.len()).map(|v| demand_size(c, v)).collect();
    let mut order: Vec<usize> = (0..c.vms.len()).collect();
    order.sort_by(|&a, &b| {
        sizes[b]
            .total_cmp(&sizes[a])
            .then(c.vm_spec(b).ram_mb.cmp(&c.vm_spec(a).ram_mb))
            .then(a.cmp(&b))
    });
    let n = c.hosts.len();
    let mut cpu_left: Vec<f64> = (0..n).map(|h| c.host_spec(h).total_mips()).collect();
    let mut ram_left: Vec<u64> = (0..n).map(|h| c.host_spec(h).ram_mb).collect();
    let mut bw_left: Vec<f64> = (0..n).map(|h| c.host_spec(h).bw_mbps).collect();
    let mut out = vec![None; c.vms.len()];
    for v in order {
        let vs = c.vm_spec(v);
        let per_pe = sizes[v] / vs.pes as f64;
        let (mut best, mut fallback) = (None::<(usize, f64)>, None::<(usize, f64)>);
        for h in 0..n {
            let hr = &c.hosts[h];
            if !hr.up || hr.maintenance || ram_left[h] < vs.ram_mb || bw_left[h] + 1e-9 < vs.bw_mbps
            {
                continue;
            }
            let left = cpu_left[h] - sizes[v];
            if left >= -1e-9 && c.host_spec(h).pe_mips + 1e-9 >= per_pe {
                if best.is_none_or(|(_, l)| left < l) {
                    best = Some((h, left));
                }
            } else if fallback.is_none_or(|(_, l)| left > l) {
                fallback = Some((h, left));
            }
        }
        if let Some((h, _)) = best.or(fallback) {
            cpu_left[h] -= sizes[v];
            ram_left[h] -= vs.ram_mb;
            bw_left[h] -= vs.bw_mbps;
            out[v] = Some(h);
        }
    }
    out
}
