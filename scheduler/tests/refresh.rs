//! `Cluster::refresh` brings a kept cluster to the next pass: planning on it gives what
//! planning on a cluster built from the equivalent snapshot gives, and bad updates change
//! nothing.
use tern_scheduler::example::{example, Rng};
use tern_scheduler::*;

/// A random next pass: new demands, some VMs on other hosts, some in flight, a host down.
fn next_pass(s: &Snapshot, seed: u64) -> (Snapshot, Vec<HostState>, Vec<VmUpdate>) {
    let mut r = Rng::new(seed);
    let mut next = s.clone();
    next.now_s = s.now_s + 300.0;
    let nh = s.hosts.len();
    let down = r.below(nh);
    let states: Vec<HostState> = (0..nh)
        .map(|h| {
            if h == down {
                HostState::InMaintenance
            } else {
                s.hosts[h].state
            }
        })
        .collect();
    for (h, st) in next.hosts.iter_mut().zip(&states) {
        h.state = *st;
    }
    next.in_flight.clear();
    let mut updates = Vec::new();
    for v in next.vms.iter_mut() {
        let mut host = s.hosts.iter().position(|h| h.id == v.host).unwrap();
        if r.unit() < 0.1 {
            host = r.below(nh);
        }
        let in_flight_to = (r.unit() < 0.05)
            .then(|| (host + 1 + r.below(nh - 1)) % nh)
            .filter(|&t| t != host);
        let u = VmUpdate {
            host,
            cpu_demand_mhz: r.range(0.0, 4000.0),
            dirty_rate_mib_s: r.range(0.0, 50.0),
            do_not_migrate: in_flight_to.is_some(),
            last_migrated_s: (r.unit() < 0.2).then_some(next.now_s - 100.0),
            in_flight_to,
        };
        v.host = s.hosts[host].id.clone();
        v.cpu_demand_mhz = u.cpu_demand_mhz;
        v.dirty_rate_mib_s = u.dirty_rate_mib_s;
        v.do_not_migrate = u.do_not_migrate;
        v.last_migrated_s = u.last_migrated_s;
        if let Some(t) = in_flight_to {
            next.in_flight.push(InFlight {
                vm: v.id.clone(),
                to: s.hosts[t].id.clone(),
            });
        }
        updates.push(u);
    }
    (next, states, updates)
}

#[test]
fn a_refreshed_cluster_plans_as_one_built_from_the_snapshot() {
    for seed in 1..6 {
        let s = example(12, 120, seed);
        let mut kept = Cluster::new(s.clone()).expect("valid");
        let (next, states, updates) = next_pass(&s, seed + 100);
        kept.refresh(next.now_s, &states, &updates)
            .expect("refresh");
        let built = Cluster::new(next.clone()).expect("valid");
        assert_eq!(kept.snapshot(), built.snapshot());
        let cfg = Config::default();
        let (a, b) = (
            balance(&kept, &cfg).unwrap(),
            balance(&built, &cfg).unwrap(),
        );
        assert_eq!(a.moves, b.moves, "seed {seed}");
        assert_eq!(a.imbalance_before, b.imbalance_before);
        for v in &next.vms {
            assert_eq!(kept.entitlement(&v.id), built.entitlement(&v.id));
        }
    }
}

#[test]
fn a_bad_refresh_is_refused_and_changes_nothing() {
    let s = example(6, 30, 7);
    let mut kept = Cluster::new(s.clone()).expect("valid");
    let (next, states, mut updates) = next_pass(&s, 8);
    assert!(matches!(
        kept.refresh(next.now_s, &states[1..], &updates),
        Err(SnapshotError::CountMismatch { what: "hosts", .. })
    ));
    updates[3].cpu_demand_mhz = f64::NAN;
    assert!(matches!(
        kept.refresh(next.now_s, &states, &updates),
        Err(SnapshotError::BadNumber {
            field: "cpu_demand_mhz",
            ..
        })
    ));
    updates[3].cpu_demand_mhz = 1.0;
    updates[4].host = 99;
    assert!(kept.refresh(next.now_s, &states, &updates).is_err());
    updates[4].host = 0;
    updates[4].in_flight_to = Some(0);
    assert!(matches!(
        kept.refresh(next.now_s, &states, &updates),
        Err(SnapshotError::InFlightToSelf { .. })
    ));
    assert_eq!(kept.snapshot(), &s);
}
