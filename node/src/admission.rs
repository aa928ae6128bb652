//! Admission on a host: a VM starts on a host only if the pool reservations of what runs there,
//! with it, fit the host's capacity. A pool's reservation is spread evenly over its VMs, so each
//! VM brings `reservation / VMs in its pool` to the host that runs it; a pool whose VMs all run
//! on one host needs its whole reservation there. An I/O-free function of the committed state.
use std::collections::BTreeMap;

use tern_consensus::state::{HostId, VmState};
use tern_consensus::ClusterState;

use super::sched_view::MHZ_PER_CPU;

/// Whether `host` can honour the pool reservations with `vm` (in `pool`) running on it; the
/// reason when it cannot. `vm` may be in the state already or about to be created.
pub fn check(
    state: &ClusterState,
    host: HostId,
    vm: &str,
    pool: Option<&str>,
) -> Result<(), String> {
    let h = state
        .hosts
        .get(&host)
        .ok_or_else(|| format!("host {host} is not a member"))?;
    let pool_of = |name: &str| -> Option<String> {
        if name == vm {
            pool.map(str::to_string)
        } else {
            state.vms.get(name).and_then(|v| v.pool.clone())
        }
    };
    // VMs per pool, cluster-wide and here (counting `vm` once, here).
    let mut total: BTreeMap<String, u64> = BTreeMap::new();
    let mut here: BTreeMap<String, u64> = BTreeMap::new();
    let names = state
        .vms
        .keys()
        .map(String::as_str)
        .chain((!state.vms.contains_key(vm)).then_some(vm));
    for name in names {
        let Some(p) = pool_of(name) else { continue };
        *total.entry(p.clone()).or_default() += 1;
        let runs_here = name == vm
            || state
                .vms
                .get(name)
                .is_some_and(|v| v.owner == host && v.state != VmState::Stopped);
        if runs_here {
            *here.entry(p).or_default() += 1;
        }
    }
    let (mut cpu, mut mem) = (0.0, 0.0);
    let mut parts = Vec::new();
    for (p, n) in &here {
        let Some(rp) = state.pools.get(p) else {
            continue;
        };
        let share = *n as f64 / total[p] as f64;
        let (c, m) = (
            rp.cpu_reservation_mhz as f64 * share,
            rp.memory_reservation_mib as f64 * share,
        );
        if c > 0.0 || m > 0.0 {
            parts.push(format!(
                "{p}: {c:.0} MHz, {m:.0} MiB for {n} of its {} VMs",
                total[p]
            ));
        }
        cpu += c;
        mem += m;
    }
    let cap_cpu = f64::from(h.capacity.cpus) * MHZ_PER_CPU;
    let cap_mem = h.capacity.memory_mib as f64;
    if cpu > cap_cpu + 1e-6 || mem > cap_mem + 1e-6 {
        return Err(format!(
            "host {host} cannot honour the pool reservations with vm {vm:?}: they would need \
             {cpu:.0} MHz CPU and {mem:.0} MiB memory ({}), above its capacity of {cap_cpu:.0} MHz \
             and {cap_mem:.0} MiB",
            parts.join("; ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_consensus::state::{Capacity, Command, ResourcePool, VmSpec};
    use tern_consensus::Request;

    /// Host 1 with 2 CPUs (4000 MHz) and 4 GiB; pool `gold` reserving `cpu` MHz and 1 GiB.
    fn state(cpu: u64) -> ClusterState {
        let mut s = ClusterState::default();
        let mut apply = |command| {
            let req = Request {
                actor: "test".into(),
                at_ms: 1,
                command,
            };
            s.apply(1, &req).expect("apply");
        };
        for id in [1, 2] {
            apply(Command::RegisterHost {
                id,
                address: format!("h{id}"),
                capacity: Capacity {
                    cpus: 2,
                    memory_mib: 4096,
                },
                cpu_features: vec![],
            });
        }
        apply(Command::PutPool {
            pool: ResourcePool {
                name: "gold".into(),
                cpu_reservation_mhz: cpu,
                cpu_limit_mhz: None,
                memory_reservation_mib: 1024,
                memory_limit_mib: None,
                shares: 4000,
            },
        });
        s
    }

    fn add_vm(s: &mut ClusterState, name: &str, owner: u64) {
        let req = Request {
            actor: "test".into(),
            at_ms: 1,
            command: Command::CreateVm {
                spec: VmSpec {
                    name: name.into(),
                    vcpus: 1,
                    memory_mib: 64,
                    cpu_features: vec![],
                },
                pool: Some("gold".into()),
                owner,
            },
        };
        s.apply(1, &req).expect("create vm");
        let req = Request {
            actor: "test".into(),
            at_ms: 1,
            command: Command::SetVmState {
                vm: name.into(),
                state: VmState::Running,
            },
        };
        s.apply(1, &req).expect("start vm");
    }

    #[test]
    fn a_reservation_the_host_can_hold_is_admitted() {
        let s = state(4000);
        assert_eq!(check(&s, 1, "a", Some("gold")), Ok(()));
        assert_eq!(check(&s, 1, "a", None), Ok(()));
    }

    #[test]
    fn a_reservation_above_capacity_is_refused_with_the_reason() {
        let s = state(6000);
        let why = check(&s, 1, "a", Some("gold")).unwrap_err();
        assert!(
            why.contains("6000 MHz") && why.contains("4000 MHz"),
            "{why}"
        );
        assert!(why.contains("gold"), "{why}");
        // Outside the pool there is nothing to reserve.
        assert_eq!(check(&s, 1, "b", None), Ok(()));
    }

    #[test]
    fn a_pool_spread_over_hosts_reserves_its_share_on_each() {
        let mut s = state(6000);
        add_vm(&mut s, "a", 2);
        // Two VMs in gold, one per host: 3000 MHz each, which fits 4000.
        assert_eq!(check(&s, 1, "b", Some("gold")), Ok(()));
        // Both on host 1: the whole 6000 MHz, which does not.
        add_vm(&mut s, "b", 1);
        assert!(check(&s, 1, "a", Some("gold")).is_err());
        assert_eq!(check(&s, 1, "b", Some("gold")), Ok(()));
    }

    #[test]
    fn an_unknown_host_is_refused() {
        assert!(check(&state(0), 9, "a", None).is_err());
    }
}
