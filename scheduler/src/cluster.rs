//! A validated, indexed snapshot with entitlements computed: what every planner reads.
use crate::entitlement::{divvy_tree, Node, Resource};
use crate::error::SnapshotError;
use crate::model::{HostRuleMode, HostState, InFlight, Rule, Snapshot};
use std::collections::HashMap;

/// What may change about one VM between two passes over the same cluster (see
/// [`Cluster::refresh`]). Hosts are given by their index in the snapshot's host list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VmUpdate {
    pub host: usize,
    pub cpu_demand_mhz: f64,
    pub dirty_rate_mib_s: f64,
    pub do_not_migrate: bool,
    pub last_migrated_s: Option<f64>,
    /// The host it is migrating to, if a migration is in flight.
    pub in_flight_to: Option<usize>,
}

/// A rule with ids resolved to indexes.
#[derive(Debug, Clone)]
pub(crate) enum RuleIx {
    KeepTogether(Vec<usize>),
    Separate(Vec<usize>),
    VmHost { group: usize, mode: HostRuleMode },
}

/// A validated cluster. Build with [`Cluster::new`] or [`Cluster::from_json`].
#[derive(Debug, Clone)]
pub struct Cluster {
    pub(crate) snap: Snapshot,
    pub(crate) host_ix: HashMap<String, usize>,
    pub(crate) vm_ix: HashMap<String, usize>,
    pub(crate) vm_host: Vec<usize>,
    pub(crate) in_flight_to: Vec<Option<usize>>,
    /// Entitled CPU (MHz) and memory (MiB) of each VM under the cluster's contention.
    pub(crate) cpu_ent: Vec<f64>,
    pub(crate) mem_ent: Vec<f64>,
    /// `group_has[g][h]`: is host h in host group g.
    pub(crate) group_has: Vec<Vec<bool>>,
    pub(crate) rules: Vec<RuleIx>,
    /// Rules each VM appears in.
    pub(crate) vm_rules: Vec<Vec<usize>>,
    /// Parent pool of each pool and pool of each VM (for entitlements on refresh).
    pool_parent: Vec<Option<usize>>,
    vm_pool: Vec<Option<usize>>,
}

impl Cluster {
    /// Parse and validate a snapshot from JSON text.
    pub fn from_json(text: &str) -> Result<Cluster, SnapshotError> {
        let snap: Snapshot = serde_json::from_str(text).map_err(|e| SnapshotError::Json {
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        Cluster::new(snap)
    }

    /// Validate a snapshot and compute entitlements.
    pub fn new(snap: Snapshot) -> Result<Cluster, SnapshotError> {
        let mut host_ix = HashMap::with_capacity(snap.hosts.len());
        for (i, h) in snap.hosts.iter().enumerate() {
            let owner = format!("host {:?}", h.id);
            positive(&owner, "cpu_mhz", h.cpu_mhz)?;
            positive(&owner, "memory_mib", h.memory_mib)?;
            if host_ix.insert(h.id.clone(), i).is_some() {
                return Err(SnapshotError::DuplicateId {
                    kind: "host",
                    id: h.id.clone(),
                });
            }
        }
        let mut pool_ix = HashMap::with_capacity(snap.pools.len());
        for (i, p) in snap.pools.iter().enumerate() {
            let owner = format!("pool {:?}", p.id);
            for (res, a) in [("cpu", &p.cpu), ("memory", &p.memory)] {
                check_alloc(&owner, res, a.reservation, a.limit, a.shares)?;
            }
            if pool_ix.insert(p.id.clone(), i).is_some() {
                return Err(SnapshotError::DuplicateId {
                    kind: "pool",
                    id: p.id.clone(),
                });
            }
        }
        let mut pool_parent = vec![None; snap.pools.len()];
        for (i, p) in snap.pools.iter().enumerate() {
            if let Some(parent) = &p.parent {
                let pi = *pool_ix
                    .get(parent)
                    .ok_or_else(|| SnapshotError::UnknownId {
                        owner: format!("pool {:?}", p.id),
                        kind: "pool",
                        id: parent.clone(),
                    })?;
                pool_parent[i] = Some(pi);
            }
        }
        for (i, p) in snap.pools.iter().enumerate() {
            let mut cur = pool_parent[i];
            let mut steps = 0;
            while let Some(c) = cur {
                steps += 1;
                if c == i || steps > snap.pools.len() {
                    return Err(SnapshotError::PoolCycle(p.id.clone()));
                }
                cur = pool_parent[c];
            }
        }
        let mut vm_ix = HashMap::with_capacity(snap.vms.len());
        let mut vm_host = Vec::with_capacity(snap.vms.len());
        let mut vm_pool = Vec::with_capacity(snap.vms.len());
        for (i, v) in snap.vms.iter().enumerate() {
            let owner = format!("vm {:?}", v.id);
            positive(&owner, "memory_mib", v.memory_mib)?;
            nonneg(&owner, "cpu_demand_mhz", v.cpu_demand_mhz)?;
            nonneg(&owner, "active_memory_mib", v.active_memory_mib)?;
            nonneg(&owner, "dirty_rate_mib_s", v.dirty_rate_mib_s)?;
            if let Some(t) = v.last_migrated_s {
                if !t.is_finite() {
                    return Err(SnapshotError::BadNumber {
                        owner,
                        field: "last_migrated_s",
                        value: t,
                    });
                }
            }
            if v.vcpus == 0 {
                return Err(SnapshotError::NotPositive {
                    owner,
                    field: "vcpus",
                });
            }
            check_alloc(&owner, "cpu", v.cpu.reservation, v.cpu.limit, v.cpu.shares)?;
            check_alloc(
                &owner,
                "memory",
                v.memory.reservation,
                v.memory.limit,
                v.memory.shares,
            )?;
            let h = *host_ix
                .get(&v.host)
                .ok_or_else(|| SnapshotError::UnknownId {
                    owner: owner.clone(),
                    kind: "host",
                    id: v.host.clone(),
                })?;
            let pool = match &v.pool {
                None => None,
                Some(p) => Some(*pool_ix.get(p).ok_or_else(|| SnapshotError::UnknownId {
                    owner: owner.clone(),
                    kind: "pool",
                    id: p.clone(),
                })?),
            };
            if vm_ix.insert(v.id.clone(), i).is_some() {
                return Err(SnapshotError::DuplicateId {
                    kind: "vm",
                    id: v.id.clone(),
                });
            }
            vm_host.push(h);
            vm_pool.push(pool);
        }
        let mut group_ix = HashMap::new();
        let mut group_has = Vec::with_capacity(snap.host_groups.len());
        for (i, g) in snap.host_groups.iter().enumerate() {
            if group_ix.insert(g.id.clone(), i).is_some() {
                return Err(SnapshotError::DuplicateId {
                    kind: "host group",
                    id: g.id.clone(),
                });
            }
            let mut has = vec![false; snap.hosts.len()];
            for h in &g.hosts {
                let hi = *host_ix.get(h).ok_or_else(|| SnapshotError::UnknownId {
                    owner: format!("host group {:?}", g.id),
                    kind: "host",
                    id: h.clone(),
                })?;
                has[hi] = true;
            }
            group_has.push(has);
        }
        let mut rules = Vec::with_capacity(snap.rules.len());
        let mut vm_rules = vec![Vec::new(); snap.vms.len()];
        let mut rule_ids = HashMap::new();
        for (ri, r) in snap.rules.iter().enumerate() {
            if rule_ids.insert(r.id().to_string(), ri).is_some() {
                return Err(SnapshotError::DuplicateId {
                    kind: "rule",
                    id: r.id().to_string(),
                });
            }
            let mut vms = Vec::with_capacity(r.vms().len());
            for v in r.vms() {
                let vi = *vm_ix.get(v).ok_or_else(|| SnapshotError::UnknownId {
                    owner: format!("rule {:?}", r.id()),
                    kind: "vm",
                    id: v.clone(),
                })?;
                if vms.contains(&vi) {
                    return Err(SnapshotError::BadRule {
                        rule: r.id().to_string(),
                        problem: format!("vm {v:?} is listed twice"),
                    });
                }
                vms.push(vi);
                vm_rules[vi].push(ri);
            }
            let ix = match r {
                Rule::KeepTogether { .. } | Rule::Separate { .. } if vms.len() < 2 => {
                    return Err(SnapshotError::BadRule {
                        rule: r.id().to_string(),
                        problem: "a VM-VM rule needs at least two VMs".into(),
                    })
                }
                Rule::KeepTogether { .. } => RuleIx::KeepTogether(vms),
                Rule::Separate { .. } => RuleIx::Separate(vms),
                Rule::VmHost { group, mode, .. } => {
                    let g = *group_ix
                        .get(group)
                        .ok_or_else(|| SnapshotError::UnknownId {
                            owner: format!("rule {:?}", r.id()),
                            kind: "host group",
                            id: group.clone(),
                        })?;
                    RuleIx::VmHost {
                        group: g,
                        mode: *mode,
                    }
                }
            };
            rules.push(ix);
        }
        let mut in_flight_to = vec![None; snap.vms.len()];
        for f in &snap.in_flight {
            let owner = format!("in_flight entry for vm {:?}", f.vm);
            let vi = *vm_ix.get(&f.vm).ok_or_else(|| SnapshotError::UnknownId {
                owner: owner.clone(),
                kind: "vm",
                id: f.vm.clone(),
            })?;
            let to = *host_ix.get(&f.to).ok_or_else(|| SnapshotError::UnknownId {
                owner,
                kind: "host",
                id: f.to.clone(),
            })?;
            if to == vm_host[vi] {
                return Err(SnapshotError::InFlightToSelf {
                    vm: f.vm.clone(),
                    to: f.to.clone(),
                });
            }
            if in_flight_to[vi].replace(to).is_some() {
                return Err(SnapshotError::DuplicateId {
                    kind: "in_flight vm",
                    id: f.vm.clone(),
                });
            }
        }
        let (cpu_ent, mem_ent) = entitlements(&snap, &pool_parent, &vm_pool);
        Ok(Cluster {
            snap,
            host_ix,
            vm_ix,
            vm_host,
            in_flight_to,
            cpu_ent,
            mem_ent,
            group_has,
            rules,
            vm_rules,
            pool_parent,
            vm_pool,
        })
    }

    /// Brings the cluster to the next pass without building it again: the clock, every
    /// host's state and every VM's host, demand, dirty rate, pinning, last migration and
    /// in-flight move, in snapshot order. Ids, capacities, pools, groups and rules stay as
    /// they are. The same checks as [`Cluster::new`] apply to what changes; on an error the
    /// cluster is left unchanged. O(hosts + VMs) with no allocation per VM, where building
    /// from a snapshot hashes every id: for a caller that plans on a large fleet every few
    /// minutes (the fleet simulator).
    pub fn refresh(
        &mut self,
        now_s: f64,
        host_states: &[HostState],
        vms: &[VmUpdate],
    ) -> Result<(), SnapshotError> {
        let (nh, nv) = (self.snap.hosts.len(), self.snap.vms.len());
        for (what, expected, got) in [("hosts", nh, host_states.len()), ("vms", nv, vms.len())] {
            if expected != got {
                return Err(SnapshotError::CountMismatch {
                    what,
                    expected,
                    got,
                });
            }
        }
        if !now_s.is_finite() {
            return Err(SnapshotError::BadNumber {
                owner: "snapshot".into(),
                field: "now_s",
                value: now_s,
            });
        }
        for (u, v) in vms.iter().zip(&self.snap.vms) {
            let owner = || format!("vm {:?}", v.id);
            for (field, value) in [
                ("cpu_demand_mhz", u.cpu_demand_mhz),
                ("dirty_rate_mib_s", u.dirty_rate_mib_s),
            ] {
                if !(value.is_finite() && value >= 0.0) {
                    return Err(SnapshotError::BadNumber {
                        owner: owner(),
                        field,
                        value,
                    });
                }
            }
            if let Some(t) = u.last_migrated_s.filter(|t| !t.is_finite()) {
                return Err(SnapshotError::BadNumber {
                    owner: owner(),
                    field: "last_migrated_s",
                    value: t,
                });
            }
            for h in [Some(u.host), u.in_flight_to].into_iter().flatten() {
                if h >= nh {
                    return Err(SnapshotError::UnknownId {
                        owner: owner(),
                        kind: "host",
                        id: format!("#{h}"),
                    });
                }
            }
            if u.in_flight_to == Some(u.host) {
                return Err(SnapshotError::InFlightToSelf {
                    vm: v.id.clone(),
                    to: self.snap.hosts[u.host].id.clone(),
                });
            }
        }
        self.snap.now_s = now_s;
        for (h, &state) in self.snap.hosts.iter_mut().zip(host_states) {
            h.state = state;
        }
        self.snap.in_flight.clear();
        for (i, u) in vms.iter().enumerate() {
            let v = &mut self.snap.vms[i];
            if self.vm_host[i] != u.host {
                v.host.clone_from(&self.snap.hosts[u.host].id);
                self.vm_host[i] = u.host;
            }
            v.cpu_demand_mhz = u.cpu_demand_mhz;
            v.dirty_rate_mib_s = u.dirty_rate_mib_s;
            v.do_not_migrate = u.do_not_migrate;
            v.last_migrated_s = u.last_migrated_s;
            self.in_flight_to[i] = u.in_flight_to;
            if let Some(to) = u.in_flight_to {
                self.snap.in_flight.push(InFlight {
                    vm: v.id.clone(),
                    to: self.snap.hosts[to].id.clone(),
                });
            }
        }
        let (cpu_ent, mem_ent) = entitlements(&self.snap, &self.pool_parent, &self.vm_pool);
        self.cpu_ent = cpu_ent;
        self.mem_ent = mem_ent;
        Ok(())
    }

    /// The snapshot this cluster was built from.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    /// Entitled (CPU MHz, memory MiB) of a VM under the cluster's contention.
    pub fn entitlement(&self, vm: &str) -> Option<(f64, f64)> {
        self.vm_ix
            .get(vm)
            .map(|&i| (self.cpu_ent[i], self.mem_ent[i]))
    }

    /// Does this host take part in balancing and accept VMs?
    pub(crate) fn host_usable(&self, h: usize) -> bool {
        self.snap.hosts[h].state == HostState::Connected
    }
}

/// Per-VM (cpu, memory) entitlements: the pool tree divvied from the cluster's serving capacity.
fn entitlements(
    snap: &Snapshot,
    pool_parent: &[Option<usize>],
    vm_pool: &[Option<usize>],
) -> (Vec<f64>, Vec<f64>) {
    let serving = |s: HostState| matches!(s, HostState::Connected | HostState::EnteringMaintenance);
    let cpu_cap: f64 = snap
        .hosts
        .iter()
        .filter(|h| serving(h.state))
        .map(|h| h.cpu_mhz)
        .sum();
    let mem_cap: f64 = snap
        .hosts
        .iter()
        .filter(|h| serving(h.state))
        .map(|h| h.memory_mib)
        .sum();
    let mut out = Vec::with_capacity(2);
    for res in [Resource::Cpu, Resource::Memory] {
        // Node 0 is the root; pools are 1..=P; VMs follow.
        let np = snap.pools.len();
        let mut nodes: Vec<Node> = Vec::with_capacity(1 + np + snap.vms.len());
        nodes.push(Node::root());
        for (i, p) in snap.pools.iter().enumerate() {
            let a = match res {
                Resource::Cpu => &p.cpu,
                Resource::Memory => &p.memory,
            };
            nodes.push(Node::pool(pool_parent[i].map_or(0, |x| x + 1), a));
        }
        for (i, v) in snap.vms.iter().enumerate() {
            let (a, demand) = match res {
                Resource::Cpu => (&v.cpu, v.cpu_demand_mhz),
                Resource::Memory => (&v.memory, v.active_memory_mib.min(v.memory_mib)),
            };
            nodes.push(Node::vm(vm_pool[i].map_or(0, |x| x + 1), a, demand));
        }
        let cap = match res {
            Resource::Cpu => cpu_cap,
            Resource::Memory => mem_cap,
        };
        let ent = divvy_tree(&mut nodes, cap);
        out.push(ent[1 + np..].to_vec());
    }
    let mem = out.pop().unwrap_or_default();
    let cpu = out.pop().unwrap_or_default();
    (cpu, mem)
}

fn nonneg(owner: &str, field: &'static str, value: f64) -> Result<(), SnapshotError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(SnapshotError::BadNumber {
            owner: owner.to_string(),
            field,
            value,
        })
    }
}

fn positive(owner: &str, field: &'static str, value: f64) -> Result<(), SnapshotError> {
    nonneg(owner, field, value)?;
    if value > 0.0 {
        Ok(())
    } else {
        Err(SnapshotError::NotPositive {
            owner: owner.to_string(),
            field,
        })
    }
}

fn check_alloc(
    owner: &str,
    resource: &'static str,
    reservation: f64,
    limit: Option<f64>,
    shares: f64,
) -> Result<(), SnapshotError> {
    let field = |f: &'static str| -> &'static str {
        match (resource, f) {
            ("cpu", "r") => "cpu.reservation",
            ("cpu", "l") => "cpu.limit",
            ("cpu", _) => "cpu.shares",
            (_, "r") => "memory.reservation",
            (_, "l") => "memory.limit",
            _ => "memory.shares",
        }
    };
    nonneg(owner, field("r"), reservation)?;
    positive(owner, field("s"), shares)?;
    if let Some(l) = limit {
        nonneg(owner, field("l"), l)?;
        if reservation > l {
            return Err(SnapshotError::ReservationAboveLimit {
                owner: owner.to_string(),
                resource,
                reservation,
                limit: l,
            });
        }
    }
    Ok(())
}
