//! The committed cluster state as the scheduler's snapshot (host ids become strings).
use tern_consensus::state::{HostId, HostState, TaskState};
use tern_consensus::ClusterState;
use tern_scheduler::{Cluster, Snapshot};

use std::collections::HashMap;

/// The latest load sample of one VM, as reported by its node.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct VmLoad {
    /// vCPU-thread CPU time over the last interval, % of one host CPU.
    pub cpu_percent: f64,
    /// Memory the guest has touched, MiB.
    pub active_mib: u64,
    /// Guest dirty rate, MiB/s.
    pub dirty_mib_s: f64,
}

pub type Loads = HashMap<String, VmLoad>;

/// Assumed MHz per host CPU (hosts report a CPU count, the scheduler wants MHz).
pub const MHZ_PER_CPU: f64 = 2000.0;

pub fn host_key(id: HostId) -> String {
    id.to_string()
}

pub fn parse_host(key: &str) -> Option<HostId> {
    key.parse().ok()
}

fn host_state(s: HostState) -> tern_scheduler::HostState {
    use tern_scheduler::HostState as S;
    match s {
        HostState::Connected => S::Connected,
        HostState::EnteringMaintenance => S::EnteringMaintenance,
        HostState::InMaintenance => S::InMaintenance,
        // Unreachable either way: the scheduler places nothing on it and moves nothing off.
        HostState::NotResponding | HostState::Down => S::Down,
    }
}

/// Build the scheduler's view. `now_s` is the caller's clock for cooldowns.
pub fn snapshot(state: &ClusterState, loads: &Loads, now_s: f64) -> Snapshot {
    use tern_scheduler::{Host, InFlight, Vm};
    let hosts = state
        .hosts
        .values()
        .map(|h| Host {
            id: host_key(h.id),
            cpu_mhz: f64::from(h.capacity.cpus.max(1)) * MHZ_PER_CPU,
            memory_mib: h.capacity.memory_mib.max(1) as f64,
            cpu_features: Default::default(),
            state: host_state(h.state),
        })
        .collect();
    let vms = state
        .vms
        .iter()
        .filter(|(_, vm)| state.hosts.contains_key(&vm.owner))
        .map(|(name, vm)| {
            let load = loads.get(name);
            let last = state
                .tasks
                .values()
                .filter(|t| t.vm == *name && t.state == TaskState::Succeeded)
                .filter_map(|t| t.finished_at_ms)
                .max();
            Vm {
                id: name.clone(),
                host: host_key(vm.owner),
                vcpus: vm.spec.vcpus,
                memory_mib: vm.spec.memory_mib as f64,
                cpu_demand_mhz: load.map_or(0.0, |l| l.cpu_percent / 100.0 * MHZ_PER_CPU),
                active_memory_mib: load
                    .map_or(vm.spec.memory_mib as f64 / 4.0, |l| l.active_mib as f64),
                dirty_rate_mib_s: load.map_or(0.0, |l| l.dirty_mib_s),
                cpu: Default::default(),
                memory: Default::default(),
                pool: vm.pool.clone().filter(|p| state.pools.contains_key(p)),
                cpu_baseline: Default::default(),
                do_not_migrate: false,
                last_migrated_s: last.map(|ms| ms as f64 / 1000.0),
            }
        })
        .collect();
    let in_flight = state
        .tasks
        .values()
        .filter(|t| !t.state.is_final() && state.vms.contains_key(&t.vm))
        .filter(|t| state.vms.get(&t.vm).is_some_and(|v| v.owner != t.to))
        .map(|t| InFlight {
            vm: t.vm.clone(),
            to: host_key(t.to),
        })
        .collect();
    let (host_groups, rules) = rules(state);
    Snapshot {
        now_s,
        hosts,
        vms,
        pools: state.pools.values().map(pool).collect(),
        host_groups,
        rules,
        in_flight,
    }
}

fn pool(p: &tern_consensus::state::ResourcePool) -> tern_scheduler::Pool {
    use tern_scheduler::PoolAlloc;
    let shares = f64::from(p.shares.max(1));
    tern_scheduler::Pool {
        id: p.name.clone(),
        parent: None,
        cpu: PoolAlloc {
            reservation: p.cpu_reservation_mhz as f64,
            limit: p.cpu_limit_mhz.map(|l| l as f64),
            shares,
            expandable: true,
        },
        memory: PoolAlloc {
            reservation: p.memory_reservation_mib as f64,
            limit: p.memory_limit_mib.map(|l| l as f64),
            shares,
            expandable: true,
        },
    }
}

/// Committed rules as the scheduler's rules (VM-host rules get a host group of their own).
/// VMs that no longer exist are dropped; a rule left with nothing to constrain is skipped.
/// The scheduler's VM-VM rules are hard, so "should" VM-VM rules are enforced as "must".
fn rules(state: &ClusterState) -> (Vec<tern_scheduler::HostGroup>, Vec<tern_scheduler::Rule>) {
    use tern_consensus::state::RuleKind;
    use tern_scheduler::{HostGroup, HostRuleMode, Rule};
    let mut groups = Vec::new();
    let mut out = Vec::new();
    for r in state.rules.values() {
        let vms: Vec<String> = r
            .vms
            .iter()
            .filter(|v| state.vms.contains_key(*v))
            .cloned()
            .collect();
        let id = r.name.clone();
        match r.kind {
            RuleKind::VmVmAffinity | RuleKind::VmVmAntiAffinity if vms.len() < 2 => {}
            RuleKind::VmVmAffinity => out.push(Rule::KeepTogether { id, vms }),
            RuleKind::VmVmAntiAffinity => out.push(Rule::Separate { id, vms }),
            RuleKind::VmHostAffinity | RuleKind::VmHostAntiAffinity => {
                let hosts: Vec<String> = r
                    .hosts
                    .iter()
                    .filter(|h| state.hosts.contains_key(*h))
                    .map(|h| host_key(*h))
                    .collect();
                if vms.is_empty() || hosts.is_empty() {
                    continue;
                }
                let mode = match (r.kind == RuleKind::VmHostAffinity, r.mandatory) {
                    (true, true) => HostRuleMode::MustRunOn,
                    (true, false) => HostRuleMode::ShouldRunOn,
                    (false, true) => HostRuleMode::MustNotRunOn,
                    (false, false) => HostRuleMode::ShouldNotRunOn,
                };
                let group = format!("rule:{id}");
                groups.push(HostGroup {
                    id: group.clone(),
                    hosts,
                });
                out.push(Rule::VmHost {
                    id,
                    vms,
                    group,
                    mode,
                });
            }
        }
    }
    (groups, out)
}

pub fn cluster(state: &ClusterState, loads: &Loads, now_s: f64) -> anyhow::Result<Cluster> {
    Cluster::new(snapshot(state, loads, now_s))
        .map_err(|e| anyhow::anyhow!("scheduler snapshot: {e}"))
}
