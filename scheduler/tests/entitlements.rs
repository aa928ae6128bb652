//! Entitlements under contention against hand-computed cases.
use tern_scheduler::entitlement::{divvy, Claim};
use tern_scheduler::{Alloc, Cluster, Host, Pool, PoolAlloc, Snapshot, Vm};

fn claim(reservation: f64, want: f64, shares: f64) -> Claim {
    Claim {
        reservation,
        want,
        shares,
    }
}

fn close(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "got {got:?}, want {want:?}");
    }
}

#[test]
fn no_contention_everyone_gets_its_demand() {
    close(
        &divvy(
            10_000.0,
            &[claim(0.0, 2000.0, 1000.0), claim(0.0, 3000.0, 1000.0)],
        ),
        &[2000.0, 3000.0],
    );
}

#[test]
fn equal_shares_split_evenly() {
    close(
        &divvy(
            4000.0,
            &[claim(0.0, 3000.0, 1000.0), claim(0.0, 3000.0, 1000.0)],
        ),
        &[2000.0, 2000.0],
    );
}

#[test]
fn shares_two_to_one() {
    close(
        &divvy(
            3000.0,
            &[claim(0.0, 3000.0, 2000.0), claim(0.0, 3000.0, 1000.0)],
        ),
        &[2000.0, 1000.0],
    );
}

#[test]
fn a_small_demand_frees_capacity_for_others() {
    // Fair share would be 1500 each; A wants only 500, so B gets the other 2500.
    close(
        &divvy(
            3000.0,
            &[claim(0.0, 500.0, 1000.0), claim(0.0, 3000.0, 1000.0)],
        ),
        &[500.0, 2500.0],
    );
}

#[test]
fn reservations_are_served_first() {
    // A reserves 2000; the remaining 1000 is split by shares: 500 each.
    close(
        &divvy(
            3000.0,
            &[claim(2000.0, 2500.0, 1000.0), claim(0.0, 3000.0, 1000.0)],
        ),
        &[2500.0, 500.0],
    );
}

#[test]
fn reservations_above_capacity_scale_down() {
    close(
        &divvy(
            1000.0,
            &[claim(1500.0, 1500.0, 1000.0), claim(500.0, 800.0, 1000.0)],
        ),
        &[750.0, 250.0],
    );
}

#[test]
fn three_way_water_fill() {
    // 6000 MHz, shares 1:1:2. Fair 1500/1500/3000; A wants 1000 -> 5000 left over 1:2 ->
    // B 1666.67, C 3333.33; C wants only 3000 -> B gets 2000.
    close(
        &divvy(
            6000.0,
            &[
                claim(0.0, 1000.0, 1.0),
                claim(0.0, 4000.0, 1.0),
                claim(0.0, 3000.0, 2.0),
            ],
        ),
        &[1000.0, 2000.0, 3000.0],
    );
}

fn vm(id: &str, cpu_demand: f64, pool: Option<&str>) -> Vm {
    Vm {
        id: id.into(),
        host: "h1".into(),
        vcpus: 4,
        memory_mib: 1024.0,
        cpu_demand_mhz: cpu_demand,
        active_memory_mib: 512.0,
        dirty_rate_mib_s: 0.0,
        cpu: Alloc::default(),
        memory: Alloc::default(),
        pool: pool.map(str::to_string),
        cpu_baseline: Default::default(),
        do_not_migrate: false,
        last_migrated_s: None,
    }
}

#[test]
fn pool_limit_and_vm_limit_through_the_tree() {
    // One host of 10000 MHz. Pool P (limit 3000, shares 1000) holds a (demand 4000).
    // b (root, demand 8000) and c (root, demand 5000, limit 1000).
    // Root: P wants 3000, b 8000, c 1000; 10000 by shares 1000 each: c capped at 1000,
    // P capped at 3000, b gets the remaining 6000.
    let mut c = vm("c", 5000.0, None);
    c.cpu.limit = Some(1000.0);
    let snap = Snapshot {
        hosts: vec![Host {
            id: "h1".into(),
            cpu_mhz: 10_000.0,
            memory_mib: 65_536.0,
            cpu_features: Default::default(),
            state: Default::default(),
        }],
        vms: vec![vm("a", 4000.0, Some("P")), vm("b", 8000.0, None), c],
        pools: vec![Pool {
            id: "P".into(),
            parent: None,
            cpu: PoolAlloc {
                limit: Some(3000.0),
                shares: 1000.0,
                ..PoolAlloc::default()
            },
            memory: PoolAlloc::default(),
        }],
        ..Snapshot::default()
    };
    let cl = Cluster::new(snap).expect("valid");
    let cpu = |id: &str| cl.entitlement(id).expect("known").0;
    assert!((cpu("a") - 3000.0).abs() < 1e-6, "a {}", cpu("a"));
    assert!((cpu("b") - 6000.0).abs() < 1e-6, "b {}", cpu("b"));
    assert!((cpu("c") - 1000.0).abs() < 1e-6, "c {}", cpu("c"));
    // Memory is not contended: everyone gets its active memory.
    assert!((cl.entitlement("a").expect("known").1 - 512.0).abs() < 1e-6);
}

#[test]
fn reservation_lifts_entitlement_above_demand() {
    let mut a = vm("a", 100.0, None);
    a.cpu.reservation = 2000.0;
    let snap = Snapshot {
        hosts: vec![Host {
            id: "h1".into(),
            cpu_mhz: 10_000.0,
            memory_mib: 65_536.0,
            cpu_features: Default::default(),
            state: Default::default(),
        }],
        vms: vec![a],
        ..Snapshot::default()
    };
    let cl = Cluster::new(snap).expect("valid");
    assert!((cl.entitlement("a").expect("known").0 - 2000.0).abs() < 1e-6);
}
