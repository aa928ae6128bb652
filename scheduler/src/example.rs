//! A realistic, imbalanced example snapshot: three host generations, a skewed VM spread,
//! pools with reservations and limits, host groups and every kind of rule. Deterministic per seed.
use crate::model::*;
use std::collections::BTreeSet;

/// splitmix64: small, seedable, good enough for synthetic data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
}

fn feats(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Generate a snapshot with `hosts` hosts and `vms` VMs.
pub fn example(hosts: usize, vms: usize, seed: u64) -> Snapshot {
    let mut rng = Rng::new(seed);
    let gens: [(f64, f64, BTreeSet<String>); 3] = [
        (76_800.0, 524_288.0, feats(&["sse4_2", "avx", "avx2"])),
        (
            124_800.0,
            786_432.0,
            feats(&["sse4_2", "avx", "avx2", "avx512f"]),
        ),
        (
            179_200.0,
            1_048_576.0,
            feats(&["sse4_2", "avx", "avx2", "avx512f", "amx"]),
        ),
    ];
    let hw = hosts.max(1).to_string().len().max(3);
    let mut hs = Vec::with_capacity(hosts);
    let mut gen_of = Vec::with_capacity(hosts);
    for i in 0..hosts {
        let g = (i * 3) / hosts.max(1);
        let (cpu, mem, f) = &gens[g.min(2)];
        gen_of.push(g.min(2));
        let state = if hosts >= 8 && i == hosts - 1 {
            HostState::InMaintenance
        } else {
            HostState::Connected
        };
        hs.push(Host {
            id: format!("h{i:0hw$}"),
            cpu_mhz: *cpu,
            memory_mib: *mem,
            cpu_features: f.clone(),
            state,
        });
    }
    let pools = vec![
        pool("prod", None, 8000.0, 0.0, None),
        pool("prod-db", Some("prod"), 4000.0, 0.0, None),
        pool("dev", None, 2000.0, 0.0, None),
        pool("test", None, 1000.0, 0.0, Some(hosts as f64 * 20_000.0)),
    ];
    // Skew: the first quarter of hosts attracts three times the VMs of the rest.
    let weights: Vec<f64> = (0..hosts)
        .map(|i| {
            let usable = hs[i].state == HostState::Connected;
            if !usable {
                0.0
            } else if i < hosts.div_ceil(4) {
                3.0
            } else {
                1.0 + rng.unit()
            }
        })
        .collect();
    let total_w: f64 = weights.iter().sum();
    let mut mem_used = vec![0.0; hosts];
    let sizes = [
        (1u32, 2048.0),
        (2, 4096.0),
        (4, 8192.0),
        (8, 16384.0),
        (16, 65536.0),
    ];
    let size_w = [30, 35, 20, 12, 3];
    let vw = vms.max(1).to_string().len().max(4);
    let mut out_vms = Vec::with_capacity(vms);
    let mut host_vms: Vec<Vec<usize>> = vec![Vec::new(); hosts];
    for i in 0..vms {
        let mut pick = rng.below(100);
        let mut k = 0;
        while pick >= size_w[k] {
            pick -= size_w[k];
            k += 1;
        }
        let (vcpus, mem) = sizes[k];
        let active = mem * rng.range(0.25, 0.7);
        let mut r = rng.unit() * total_w;
        let mut h = 0;
        while h + 1 < hosts && r >= weights[h] {
            r -= weights[h];
            h += 1;
        }
        // Full host: take the next one with room (the cluster is not overcommitted at start).
        let mut tries = 0;
        while tries < hosts && (weights[h] == 0.0 || mem_used[h] + active > hs[h].memory_mib * 0.95)
        {
            h = (h + 1) % hosts;
            tries += 1;
        }
        mem_used[h] += active;
        let p = rng.below(10);
        let pool = match p {
            0..=2 => Some("prod"),
            3 => Some("prod-db"),
            4..=6 => Some("dev"),
            7..=8 => Some("test"),
            _ => None,
        };
        let mut memory = Alloc::default();
        let mut cpu = Alloc::default();
        if pool == Some("prod-db") {
            memory.reservation = (active * 0.8).round();
            cpu.shares = 2000.0;
        }
        if pool == Some("test") && rng.below(4) == 0 {
            cpu.limit = Some(vcpus as f64 * 500.0);
        }
        let baseline = if rng.below(10) == 0 {
            hs[h].cpu_features.clone()
        } else {
            gens[0].2.clone()
        };
        let dirty = if rng.below(50) == 0 {
            rng.range(800.0, 1500.0)
        } else {
            rng.range(0.0, 120.0)
        };
        out_vms.push(Vm {
            id: format!("vm{i:0vw$}"),
            host: hs[h].id.clone(),
            vcpus,
            memory_mib: mem,
            cpu_demand_mhz: (vcpus as f64 * rng.range(30.0, 450.0)).round(),
            active_memory_mib: active.round(),
            dirty_rate_mib_s: (dirty * 10.0).round() / 10.0,
            cpu,
            memory,
            pool: pool.map(str::to_string),
            cpu_baseline: baseline,
            do_not_migrate: rng.below(200) == 0,
            last_migrated_s: None,
        });
        host_vms[h].push(i);
    }
    let gen3: Vec<String> = (0..hosts)
        .filter(|&h| gen_of[h] == 2)
        .map(|h| hs[h].id.clone())
        .collect();
    let rack_a: Vec<String> = (0..hosts.div_ceil(4)).map(|h| hs[h].id.clone()).collect();
    let host_groups = vec![
        HostGroup {
            id: "gen3".into(),
            hosts: gen3,
        },
        HostGroup {
            id: "rack-a".into(),
            hosts: rack_a,
        },
    ];
    let rules = rules(&mut rng, hosts, &out_vms, &host_vms);
    Snapshot {
        now_s: 0.0,
        hosts: hs,
        vms: out_vms,
        pools,
        host_groups,
        rules,
        in_flight: Vec::new(),
    }
}

fn rules(rng: &mut Rng, hosts: usize, vms: &[Vm], host_vms: &[Vec<usize>]) -> Vec<Rule> {
    let mut rules = Vec::new();
    let mut used = vec![false; vms.len()];
    if vms.is_empty() || hosts < 2 {
        return rules;
    }
    // Anti-affinity triples already on distinct hosts.
    for r in 0..vms.len() / 200 {
        let mut members: Vec<usize> = Vec::new();
        for _ in 0..20 {
            let v = rng.below(vms.len());
            if !used[v] && members.iter().all(|&m| vms[m].host != vms[v].host) {
                members.push(v);
            }
            if members.len() == 3 {
                break;
            }
        }
        if members.len() >= 2 {
            members.iter().for_each(|&m| used[m] = true);
            rules.push(Rule::Separate {
                id: format!("apart-{r}"),
                vms: ids(vms, &members),
            });
        }
    }
    // Keep-together pairs already sharing a host.
    for r in 0..vms.len() / 400 {
        let h = rng.below(hosts);
        let free: Vec<usize> = host_vms[h]
            .iter()
            .copied()
            .filter(|&v| !used[v])
            .take(2)
            .collect();
        if free.len() == 2 {
            free.iter().for_each(|&m| used[m] = true);
            rules.push(Rule::KeepTogether {
                id: format!("together-{r}"),
                vms: ids(vms, &free),
            });
        }
    }
    // Licensed VMs that must stay in rack A (they are there now).
    let rack_a = hosts.div_ceil(4);
    let licensed: Vec<usize> = (0..rack_a)
        .flat_map(|h| host_vms[h].iter().copied())
        .filter(|&v| !used[v] && v % 97 == 0)
        .collect();
    if !licensed.is_empty() {
        licensed.iter().for_each(|&m| used[m] = true);
        rules.push(Rule::VmHost {
            id: "license-rack-a".into(),
            vms: ids(vms, &licensed),
            group: "rack-a".into(),
            mode: HostRuleMode::MustRunOn,
        });
    }
    // Databases should run on the newest hosts (some do not yet: preference moves).
    let dbs: Vec<usize> = (0..vms.len())
        .filter(|&v| !used[v] && vms[v].pool.as_deref() == Some("prod-db") && v % 5 == 0)
        .collect();
    if !dbs.is_empty() {
        rules.push(Rule::VmHost {
            id: "db-on-gen3".into(),
            vms: ids(vms, &dbs),
            group: "gen3".into(),
            mode: HostRuleMode::ShouldRunOn,
        });
    }
    rules
}

fn ids(vms: &[Vm], ix: &[usize]) -> Vec<String> {
    ix.iter().map(|&i| vms[i].id.clone()).collect()
}

fn pool(
    id: &str,
    parent: Option<&str>,
    shares: f64,
    reservation: f64,
    cpu_limit: Option<f64>,
) -> Pool {
    Pool {
        id: id.into(),
        parent: parent.map(str::to_string),
        cpu: PoolAlloc {
            reservation,
            limit: cpu_limit,
            shares,
            expandable: true,
        },
        memory: PoolAlloc {
            shares,
            ..PoolAlloc::default()
        },
    }
}
