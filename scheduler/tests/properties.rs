//! Property tests: plans never break hard constraints, balancing never raises imbalance, a
//! plan is a fixed point, evacuation accounts for every VM, the queue respects its slots.
use proptest::prelude::*;
use std::collections::{BTreeSet, HashMap};
use tern_scheduler::example::Rng;
use tern_scheduler::*;

#[derive(Debug, Clone, Copy)]
struct Shape {
    hosts: usize,
    vms: usize,
    seed: u64,
    /// Rules, odd host states, do-not-migrate and reservations.
    messy: bool,
}

fn feats(rng: &mut Rng) -> BTreeSet<String> {
    let mut f: BTreeSet<String> = ["a".to_string()].into();
    if rng.below(2) == 0 {
        f.insert("b".into());
    }
    if rng.below(3) == 0 {
        f.insert("c".into());
    }
    f
}

fn snapshot(sh: Shape) -> Snapshot {
    let mut rng = Rng::new(sh.seed);
    let mut hosts = Vec::new();
    for i in 0..sh.hosts {
        let state = if !sh.messy {
            HostState::Connected
        } else {
            match rng.below(16) {
                0 => HostState::EnteringMaintenance,
                1 => HostState::InMaintenance,
                2 => HostState::Down,
                _ => HostState::Connected,
            }
        };
        hosts.push(Host {
            id: format!("h{i}"),
            cpu_mhz: rng.range(2000.0, 20000.0).round(),
            memory_mib: rng.range(4096.0, 32768.0).round(),
            cpu_features: feats(&mut rng),
            state,
        });
    }
    let mut mem_used = vec![0.0; sh.hosts];
    let mut res_used = vec![0.0; sh.hosts];
    let mut vms = Vec::new();
    for i in 0..sh.vms {
        let memory = rng.range(256.0, 4096.0).round();
        let active = (memory * rng.range(0.1, 1.0)).round();
        let h = rng.below(sh.hosts);
        let reservation = if sh.messy && rng.below(5) == 0 {
            rng.range(0.0, 1500.0).round()
        } else {
            0.0
        };
        // Start from a placement that fits (the scheduler fixes overcommit, tested elsewhere).
        if hosts[h].state == HostState::InMaintenance
            || mem_used[h] + active > hosts[h].memory_mib
            || res_used[h] + reservation > hosts[h].cpu_mhz
        {
            continue;
        }
        mem_used[h] += active;
        res_used[h] += reservation;
        let baseline = if rng.below(3) == 0 {
            hosts[h].cpu_features.clone()
        } else {
            ["a".to_string()].into()
        };
        vms.push(Vm {
            id: format!("v{i}"),
            host: hosts[h].id.clone(),
            vcpus: 1 + rng.below(8) as u32,
            memory_mib: memory,
            cpu_demand_mhz: rng.range(0.0, 5000.0).round(),
            active_memory_mib: active,
            dirty_rate_mib_s: if rng.below(10) == 0 {
                1500.0
            } else {
                rng.range(0.0, 200.0).round()
            },
            cpu: Alloc {
                reservation,
                ..Alloc::default()
            },
            memory: Alloc::default(),
            pool: match rng.below(3) {
                0 => Some("p1".into()),
                1 => Some("p2".into()),
                _ => None,
            },
            cpu_baseline: baseline,
            do_not_migrate: sh.messy && rng.below(10) == 0,
            last_migrated_s: None,
        });
    }
    let pools = vec![
        Pool {
            id: "p1".into(),
            parent: None,
            cpu: PoolAlloc {
                limit: Some(20000.0),
                ..PoolAlloc::default()
            },
            memory: PoolAlloc::default(),
        },
        Pool {
            id: "p2".into(),
            parent: Some("p1".into()),
            cpu: PoolAlloc::default(),
            memory: PoolAlloc::default(),
        },
    ];
    let mut rules = Vec::new();
    let mut host_groups = Vec::new();
    if sh.messy && vms.len() >= 4 {
        let group: Vec<String> = hosts
            .iter()
            .filter(|_| rng.below(2) == 0)
            .map(|h| h.id.clone())
            .collect();
        host_groups.push(HostGroup {
            id: "g".into(),
            hosts: group,
        });
        let pick = |n: usize, rng: &mut Rng| -> Vec<String> {
            let mut out: Vec<String> = Vec::new();
            while out.len() < n {
                let v = vms[rng.below(vms.len())].id.clone();
                if !out.contains(&v) {
                    out.push(v);
                }
            }
            out
        };
        let modes = [
            HostRuleMode::MustRunOn,
            HostRuleMode::ShouldRunOn,
            HostRuleMode::MustNotRunOn,
            HostRuleMode::ShouldNotRunOn,
        ];
        rules.push(Rule::Separate {
            id: "apart".into(),
            vms: pick(2, &mut rng),
        });
        rules.push(Rule::KeepTogether {
            id: "together".into(),
            vms: pick(2, &mut rng),
        });
        let mode = modes[rng.below(4)];
        rules.push(Rule::VmHost {
            id: "host-rule".into(),
            vms: pick(2, &mut rng),
            group: "g".into(),
            mode,
        });
    }
    Snapshot {
        now_s: 0.0,
        hosts,
        vms,
        pools,
        host_groups,
        rules,
        in_flight: Vec::new(),
    }
}

fn unlimited(threshold: u8) -> Config {
    Config {
        max_moves: 100_000,
        max_moves_per_host: 100_000,
        ..Config::with_threshold(threshold)
    }
}

/// Every hard constraint, checked independently of the planner's own bookkeeping.
fn check_hard_constraints(c: &Cluster, moves: &[Move]) -> Result<(), String> {
    let snap = c.snapshot();
    let host: HashMap<&str, &Host> = snap.hosts.iter().map(|h| (h.id.as_str(), h)).collect();
    let vm: HashMap<&str, &Vm> = snap.vms.iter().map(|v| (v.id.as_str(), v)).collect();
    let mut at: HashMap<&str, &str> = snap
        .vms
        .iter()
        .map(|v| (v.id.as_str(), v.host.as_str()))
        .collect();
    let mut received: BTreeSet<&str> = BTreeSet::new();
    for m in moves {
        let v = vm[m.vm.as_str()];
        let to = host[m.to.as_str()];
        if at[m.vm.as_str()] != m.from {
            return Err(format!(
                "{} moved from {} but is on {}",
                m.vm,
                m.from,
                at[m.vm.as_str()]
            ));
        }
        if v.do_not_migrate {
            return Err(format!("{} is do-not-migrate", m.vm));
        }
        if to.state != HostState::Connected {
            return Err(format!(
                "{} sent to {} which is {:?}",
                m.vm, to.id, to.state
            ));
        }
        if !v.cpu_baseline.is_subset(&to.cpu_features) {
            return Err(format!("{} sent to CPU-incompatible {}", m.vm, to.id));
        }
        at.insert(&v.id, &to.id);
        received.insert(&to.id);
    }
    for h in &received {
        let on: Vec<&&str> = at
            .iter()
            .filter(|(_, hh)| **hh == *h)
            .map(|(v, _)| v)
            .collect();
        let mem: f64 = on
            .iter()
            .map(|v| c.entitlement(v).unwrap_or_default().1)
            .sum();
        let res: f64 = on.iter().map(|v| vm[**v].cpu.reservation).sum();
        // Count an in-flight VM's destination claim? None in these snapshots.
        if mem > host[h].memory_mib + 1e-6 {
            return Err(format!("{h} memory {mem} > {}", host[h].memory_mib));
        }
        if res > host[h].cpu_mhz + 1e-6 {
            return Err(format!("{h} CPU reservations {res} > {}", host[h].cpu_mhz));
        }
    }
    let moved: BTreeSet<&str> = moves.iter().map(|m| m.vm.as_str()).collect();
    for r in &snap.rules {
        match r {
            Rule::VmHost {
                vms, group, mode, ..
            } if mode.is_must() => {
                let g = snap
                    .host_groups
                    .iter()
                    .find(|g| &g.id == group)
                    .ok_or("group")?;
                for v in vms.iter().filter(|v| moved.contains(v.as_str())) {
                    let inside = g.hosts.iter().any(|h| h == at[v.as_str()]);
                    if inside != mode.wants_in_group() {
                        return Err(format!("{v} moved against rule {}", r.id()));
                    }
                }
            }
            Rule::Separate { vms, .. } => {
                for a in vms {
                    for b in vms {
                        if a < b
                            && at[a.as_str()] == at[b.as_str()]
                            && (moved.contains(a.as_str()) || moved.contains(b.as_str()))
                        {
                            return Err(format!(
                                "move put {a} and {b} together against {}",
                                r.id()
                            ));
                        }
                    }
                }
            }
            Rule::KeepTogether { vms, .. } => {
                let before: BTreeSet<&str> =
                    vms.iter().map(|v| vm[v.as_str()].host.as_str()).collect();
                let after: BTreeSet<&str> = vms.iter().map(|v| at[v.as_str()]).collect();
                if before.len() == 1 && after.len() > 1 {
                    return Err(format!("moves split keep-together rule {}", r.id()));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn shapes(messy: bool) -> impl Strategy<Value = Shape> {
    (2usize..9, 0usize..60, any::<u64>()).prop_map(move |(hosts, vms, seed)| Shape {
        hosts,
        vms,
        seed,
        messy,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn plans_never_break_hard_constraints(sh in shapes(true), threshold in 1u8..=5) {
        let c = Cluster::new(snapshot(sh)).expect("generated snapshot is valid");
        let plan = balance(&c, &unlimited(threshold)).expect("plan");
        check_hard_constraints(&c, &plan.moves).map_err(TestCaseError::fail)?;
        // The planner's incremental bookkeeping agrees with a fresh computation.
        let mut after = c.snapshot().clone();
        after.apply(&plan.moves).expect("apply");
        let fresh = Cluster::new(after).expect("valid").imbalance();
        prop_assert!((fresh - plan.imbalance_after).abs() < 1e-6, "fresh {fresh} vs plan {}", plan.imbalance_after);
        for m in plan.moves.iter().filter(|m| m.kind == MoveKind::Balance) {
            prop_assert!(m.imbalance_after < m.imbalance_before, "{m:?}");
        }
    }

    #[test]
    fn balance_never_raises_imbalance(sh in shapes(false), threshold in 1u8..=5) {
        let c = Cluster::new(snapshot(sh)).expect("valid");
        let plan = balance(&c, &Config::with_threshold(threshold)).expect("plan");
        prop_assert!(plan.imbalance_after <= plan.imbalance_before + 1e-12,
            "{} -> {}", plan.imbalance_before, plan.imbalance_after);
        for m in &plan.moves {
            prop_assert_eq!(m.kind, MoveKind::Balance);
            prop_assert!(m.imbalance_after < m.imbalance_before);
        }
    }

    #[test]
    fn planning_again_after_applying_proposes_nothing(sh in shapes(true), threshold in 1u8..=5) {
        let c = Cluster::new(snapshot(sh)).expect("valid");
        let cfg = unlimited(threshold);
        let plan = balance(&c, &cfg).expect("plan");
        let mut after = c.snapshot().clone();
        after.apply(&plan.moves).expect("apply");
        // Even with the cooldown off, the pass's end state is a fixed point.
        let again_cfg = Config { cooldown_s: 0.0, ..cfg };
        let again = balance(&Cluster::new(after).expect("valid"), &again_cfg).expect("plan");
        prop_assert!(again.moves.is_empty(), "second pass moved {:?}", again.moves);
    }

    #[test]
    fn evacuation_empties_the_host_or_explains(sh in shapes(true), pick in any::<usize>()) {
        let c = Cluster::new(snapshot(sh)).expect("valid");
        let host = c.snapshot().hosts[pick % sh.hosts].id.clone();
        let ev = evacuate(&c, &host, &Config::default()).expect("evacuate");
        check_hard_constraints(&c, &ev.moves).map_err(TestCaseError::fail)?;
        let on: BTreeSet<&str> = c.snapshot().vms.iter().filter(|v| v.host == host).map(|v| v.id.as_str()).collect();
        let mut seen: Vec<&str> = ev.moves.iter().map(|m| m.vm.as_str()).chain(ev.stuck.iter().map(|u| u.vm.as_str())).collect();
        seen.sort();
        let before = seen.len();
        seen.dedup();
        prop_assert_eq!(before, seen.len(), "a VM is listed twice");
        prop_assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), on);
        prop_assert!(ev.stuck.iter().all(|u| !u.reason.is_empty()));
        prop_assert!(ev.moves.iter().all(|m| m.to != host && m.priority == 1));
    }

    #[test]
    fn ranking_covers_every_host(sh in shapes(true), pick in any::<usize>()) {
        let snap = snapshot(sh);
        prop_assume!(!snap.vms.is_empty());
        let vm = snap.vms[pick % snap.vms.len()].id.clone();
        let c = Cluster::new(snap).expect("valid");
        let r = rank_destinations(&c, &vm, &Config::default()).expect("rank");
        prop_assert_eq!(r.candidates.len() + r.excluded.len(), sh.hosts);
        prop_assert!(r.excluded.iter().all(|e| !e.reasons.is_empty()));
        prop_assert!(r.candidates.windows(2).all(|w| w[0].score >= w[1].score));
        // A candidate is a legal single move.
        if let Some(best) = r.candidates.first() {
            let m = Move {
                vm: vm.clone(), from: r.from.clone().unwrap_or_default(), to: best.host.clone(), priority: 5,
                kind: MoveKind::Balance, reason: String::new(), imbalance_before: 0.0, imbalance_after: 0.0,
                est_migration_s: None,
            };
            if r.blocked.is_none() {
                check_hard_constraints(&c, &[m]).map_err(TestCaseError::fail)?;
            }
        }
    }

    #[test]
    fn queue_respects_slots_and_priority(
        limits in (1usize..4, 1usize..4, 1usize..6),
        ops in prop::collection::vec((0u8..4, 0usize..4, 0usize..4, 0u8..3, any::<usize>()), 1..80),
    ) {
        let limits = SlotLimits { per_source: limits.0, per_destination: limits.1, per_cluster: limits.2 };
        let mut q = MigrationQueue::new(limits).expect("limits");
        let prio = [QueuePriority::High, QueuePriority::Normal, QueuePriority::Low];
        for (id, (op, from, to, p, pick)) in ops.into_iter().enumerate() {
            if op < 3 {
                if from == to { continue; }
                let r = Request { id: id as u64, vm: format!("v{id}"), from: format!("h{from}"), to: format!("h{to}"), priority: prio[p as usize] };
                match q.submit(r) {
                    Ok(Admission::Queued) => prop_assert!(p != 0, "high priority never waits"),
                    Ok(Admission::Started) => {}
                    Err(QueueError::Refused { reason, .. }) => {
                        prop_assert_eq!(p, 0);
                        prop_assert!(!reason.is_empty());
                    }
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            } else if !q.running().is_empty() {
                let id = q.running()[pick % q.running().len()].id;
                let started = q.finish(id).expect("running");
                prop_assert!(started.windows(2).all(|w| w[0].priority <= w[1].priority));
            }
            prop_assert!(q.running().len() <= limits.per_cluster);
            for h in 0..4 {
                let h = format!("h{h}");
                prop_assert!(q.outbound(&h) <= q.source_cap());
                prop_assert!(q.inbound(&h) <= limits.per_destination);
            }
            if limits.per_cluster > 1 {
                prop_assert!(q.running().iter().all(|r| q.outbound(&r.from) < limits.per_cluster));
            }
            // Nothing waits that could run: lower priorities never go ahead of a startable
            // higher one, and free slots are used.
            for w in q.waiting() {
                prop_assert!(q.running().len() >= limits.per_cluster
                    || q.outbound(&w.from) >= q.source_cap()
                    || q.inbound(&w.to) >= limits.per_destination, "{w:?} could start");
            }
        }
    }
}

#[test]
fn high_priority_is_refused_with_the_reason_and_normal_waits() {
    let mut q = MigrationQueue::new(SlotLimits {
        per_source: 1,
        per_destination: 4,
        per_cluster: 4,
    })
    .expect("limits");
    let req = |id: u64, p| Request {
        id,
        vm: format!("v{id}"),
        from: "a".into(),
        to: "b".into(),
        priority: p,
    };
    assert_eq!(
        q.submit(req(1, QueuePriority::Normal)),
        Ok(Admission::Started)
    );
    match q.submit(req(2, QueuePriority::High)) {
        Err(QueueError::Refused { reason, .. }) => assert!(reason.contains("source a"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(q.submit(req(3, QueuePriority::Low)), Ok(Admission::Queued));
    assert_eq!(
        q.submit(req(4, QueuePriority::Normal)),
        Ok(Admission::Queued)
    );
    // The normal request goes before the earlier low one.
    let started = q.finish(1).expect("running");
    assert_eq!(started.iter().map(|r| r.id).collect::<Vec<_>>(), vec![4]);
    assert_eq!(q.finish(4).expect("running")[0].id, 3);
}

#[test]
fn one_evacuation_cannot_hold_every_cluster_slot() {
    let mut q = MigrationQueue::new(SlotLimits {
        per_source: 8,
        per_destination: 8,
        per_cluster: 4,
    })
    .expect("limits");
    for id in 0..6 {
        let r = Request {
            id,
            vm: format!("v{id}"),
            from: "maint".into(),
            to: format!("d{id}"),
            priority: QueuePriority::Normal,
        };
        q.submit(r).expect("submit");
    }
    assert_eq!(q.outbound("maint"), 3);
    let other = Request {
        id: 99,
        vm: "x".into(),
        from: "other".into(),
        to: "d9".into(),
        priority: QueuePriority::High,
    };
    assert_eq!(q.submit(other), Ok(Admission::Started));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Corrupted snapshot text is rejected or, if still valid, planned on: never a panic.
    #[test]
    fn corrupted_snapshots_never_panic(
        seed in any::<u64>(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let sh = Shape { hosts: 3, vms: 8, seed, messy: true };
        let mut bytes = serde_json::to_vec(&snapshot(sh)).expect("serialise");
        for (pos, b) in edits {
            let i = pos % bytes.len();
            bytes[i] = b"0123456789-.e,:{}[]\"ax "[b as usize % 23];
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(c) = Cluster::from_json(&text) {
            let plan = balance(&c, &Config::default()).expect("valid config");
            prop_assert!(plan.imbalance_after.is_finite() || plan.imbalance_before.is_nan() || !plan.imbalance_before.is_finite());
            if let Some(h) = c.snapshot().hosts.first() {
                evacuate(&c, &h.id, &Config::default()).expect("known host");
            }
        }
    }
}
