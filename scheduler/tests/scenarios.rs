//! Hand-built scenarios for behaviour the property tests do not pin down exactly.
use tern_scheduler::*;

fn host(id: &str, state: HostState) -> Host {
    Host {
        id: id.into(),
        cpu_mhz: 10_000.0,
        memory_mib: 16_384.0,
        cpu_features: Default::default(),
        state,
    }
}

fn vm(id: &str, host: &str, mem: f64, cpu: f64) -> Vm {
    Vm {
        id: id.into(),
        host: host.into(),
        vcpus: 2,
        memory_mib: mem,
        cpu_demand_mhz: cpu,
        active_memory_mib: mem,
        dirty_rate_mib_s: 10.0,
        cpu: Alloc::default(),
        memory: Alloc::default(),
        pool: None,
        cpu_baseline: Default::default(),
        do_not_migrate: false,
        last_migrated_s: None,
    }
}

fn snap(hosts: Vec<Host>, vms: Vec<Vm>) -> Snapshot {
    Snapshot {
        hosts,
        vms,
        ..Snapshot::default()
    }
}

#[test]
fn evacuation_spreads_instead_of_piling() {
    let s = snap(
        vec![
            host("m", HostState::Connected),
            host("a", HostState::Connected),
            host("b", HostState::Connected),
        ],
        (0..4)
            .map(|i| vm(&format!("v{i}"), "m", 2048.0, 1000.0))
            .collect(),
    );
    let ev = evacuate(&Cluster::new(s).expect("valid"), "m", &Config::default()).expect("evacuate");
    assert!(ev.stuck.is_empty());
    let to_a = ev.moves.iter().filter(|m| m.to == "a").count();
    assert_eq!((to_a, ev.moves.len()), (2, 4), "{:?}", ev.moves);
}

#[test]
fn evacuation_keeps_groups_together_and_explains_the_stuck() {
    let mut pinned = vm("pinned", "m", 1024.0, 100.0);
    pinned.do_not_migrate = true;
    let big = vm("big", "m", 15_000.0, 100.0);
    let mut s = snap(
        vec![
            host("m", HostState::Connected),
            host("a", HostState::Connected),
            host("b", HostState::Connected),
        ],
        vec![
            vm("x", "m", 1024.0, 100.0),
            vm("y", "m", 1024.0, 100.0),
            pinned,
            big,
            vm("fill", "a", 8000.0, 10.0),
            vm("fill2", "b", 8000.0, 10.0),
        ],
    );
    s.rules.push(Rule::KeepTogether {
        id: "xy".into(),
        vms: vec!["x".into(), "y".into()],
    });
    let ev = evacuate(&Cluster::new(s).expect("valid"), "m", &Config::default()).expect("evacuate");
    let dest = |v: &str| ev.moves.iter().find(|m| m.vm == v).map(|m| m.to.clone());
    assert!(dest("x").is_some());
    assert_eq!(dest("x"), dest("y"));
    let why = |v: &str| {
        ev.stuck
            .iter()
            .find(|u| u.vm == v)
            .map(|u| u.reason.clone())
            .unwrap_or_default()
    };
    assert!(why("pinned").contains("do-not-migrate"), "{:?}", ev.stuck);
    assert!(why("big").contains("memory"), "{:?}", ev.stuck);
}

#[test]
fn maintenance_and_must_rules_are_priority_one() {
    let mut s = snap(
        vec![
            host("m", HostState::EnteringMaintenance),
            host("a", HostState::Connected),
            host("b", HostState::Connected),
        ],
        vec![vm("v1", "m", 1024.0, 100.0), vm("lic", "a", 1024.0, 100.0)],
    );
    s.host_groups.push(HostGroup {
        id: "g".into(),
        hosts: vec!["b".into()],
    });
    s.rules.push(Rule::VmHost {
        id: "r".into(),
        vms: vec!["lic".into()],
        group: "g".into(),
        mode: HostRuleMode::MustRunOn,
    });
    let plan = balance(&Cluster::new(s).expect("valid"), &Config::with_threshold(1)).expect("plan");
    let lic = plan
        .moves
        .iter()
        .find(|m| m.vm == "lic")
        .expect("lic moves");
    assert_eq!(
        (lic.to.as_str(), lic.priority, lic.kind),
        ("b", 1, MoveKind::RuleViolation)
    );
    let v1 = plan.moves.iter().find(|m| m.vm == "v1").expect("v1 moves");
    assert_eq!((v1.priority, v1.kind), (1, MoveKind::Maintenance));
}

#[test]
fn cooldown_and_in_flight_block_balancing() {
    let hot: Vec<Vm> = (0..6)
        .map(|i| vm(&format!("v{i}"), "a", 2048.0, 1500.0))
        .collect();
    let base = snap(
        vec![
            host("a", HostState::Connected),
            host("b", HostState::Connected),
        ],
        hot,
    );
    let c = Cluster::new(base.clone()).expect("valid");
    let plan = balance(&c, &Config::default()).expect("plan");
    assert!(
        !plan.moves.is_empty(),
        "an idle host next to a busy one gets VMs"
    );
    assert!(plan.imbalance_after < plan.imbalance_before);

    let mut cooled = base.clone();
    cooled.now_s = 1000.0;
    for v in &mut cooled.vms {
        v.last_migrated_s = Some(500.0);
    }
    let plan = balance(&Cluster::new(cooled).expect("valid"), &Config::default()).expect("plan");
    assert!(
        plan.moves.is_empty(),
        "every VM moved 500 s ago, cooldown 900 s: {:?}",
        plan.moves
    );

    let mut flying = base;
    flying.in_flight.push(InFlight {
        vm: "v0".into(),
        to: "b".into(),
    });
    let c = Cluster::new(flying).expect("valid");
    let plan = balance(&c, &Config::default()).expect("plan");
    assert!(plan.moves.iter().all(|m| m.vm != "v0"));
    let r = rank_destinations(&c, "v0", &Config::default()).expect("rank");
    assert!(r
        .blocked
        .as_deref()
        .unwrap_or("")
        .contains("already migrating to b"));
    // The in-flight VM already claims room on b.
    assert!(c.host_load("b").expect("b").1 > 0.0);
}

#[test]
fn place_picks_the_emptiest_compatible_host() {
    let mut fancy = host("fancy", HostState::Connected);
    fancy.cpu_features.insert("avx512f".into());
    let s = snap(
        vec![
            host("busy", HostState::Connected),
            host("idle", HostState::Connected),
            fancy,
        ],
        vec![
            vm("v", "busy", 8000.0, 5000.0),
            vm("w", "fancy", 100.0, 100.0),
        ],
    );
    let c = Cluster::new(s).expect("valid");
    let mut new = vm("new", "", 1024.0, 500.0);
    let p = place(&c, &new, &Config::default()).expect("place");
    assert_eq!(p.host.as_deref(), Some("idle"));
    new.cpu_baseline.insert("avx512f".into());
    let p = place(&c, &new, &Config::default()).expect("place");
    assert_eq!(p.host.as_deref(), Some("fancy"));
    assert_eq!(p.ranking.excluded.len(), 2);
    assert!(
        place(&c, &vm("v", "", 1.0, 1.0), &Config::default()).is_err(),
        "duplicate id"
    );
}

#[test]
fn overcommitted_host_sheds_load() {
    let s = snap(
        vec![
            host("a", HostState::Connected),
            host("b", HostState::Connected),
        ],
        vec![
            vm("v1", "a", 10_000.0, 100.0),
            vm("v2", "a", 10_000.0, 100.0),
        ],
    );
    let plan = balance(&Cluster::new(s).expect("valid"), &Config::with_threshold(1)).expect("plan");
    assert_eq!(plan.moves.len(), 1);
    assert_eq!(
        (plan.moves[0].kind, plan.moves[0].to.as_str()),
        (MoveKind::Overcommit, "b")
    );
}
