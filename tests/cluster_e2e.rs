//! End-to-end cluster tests: real `tern node` processes with a shared datastore, real VMs on
//! KVM, real live migrations gated by Raft commits.
mod cluster_e2e_harness;

use std::time::Duration;

use cluster_e2e_harness::*;
use serde_json::{json, Value};

#[test]
fn cluster_vm_migrates_live_with_raft_gated_switchover() {
    if !have_kvm() {
        return;
    }
    let c = Cluster::start(3, &[]);
    let a1 = c.addr(1);
    c.tern_ok(&[
        "vm",
        "create",
        "web",
        "--memory",
        "64M",
        "--workload",
        "wss=8M,rate=3000,pattern=random",
        "--host",
        "1",
        "--user",
        "alice",
    ]);
    c.wait_guest_progress("web", 1);
    // Only its owner runs it.
    assert!(c.guest("web", 2).is_none() && c.guest("web", 3).is_none());

    let out = c.tern_ok(&["migrate", "web", "--to", "2", "--wait", "--user", "alice"]);
    assert!(out.contains("Succeeded"), "{out}");
    let state = c.state();
    assert_eq!(state["vms"]["web"]["owner"], json!(2));
    assert_eq!(state["vms"]["web"]["epoch"], json!(1));
    // Tokens never leave the nodes.
    assert_eq!(state["tasks"]["0"]["token"], json!(""));
    let before = c.wait_guest_progress("web", 2);
    assert_eq!(before["status"]["mismatches"], json!(0));
    assert_eq!(before["epoch"], json!(1));
    assert!(c.guest("web", 1).is_none(), "the source still runs web");
    assert!(c.guest("web", 3).is_none());
    // The guest keeps verifying its memory on the destination.
    std::thread::sleep(Duration::from_millis(500));
    let after = c.guest("web", 2).expect("web runs on host 2");
    assert_eq!(after["status"]["mismatches"], json!(0));
    assert!(
        after["status"]["pages_verified"].as_u64() > before["status"]["pages_verified"].as_u64()
    );

    // The audit trail has the task with who, why, times and figures.
    let audit: Value =
        serde_json::from_str(&c.tern_ok(&["audit", "--vm", "web", "--json"])).unwrap();
    let t = &audit[0];
    assert_eq!(t["state"], json!("succeeded"));
    assert_eq!(t["requested_by"], json!("alice"));
    assert_eq!(t["reason"], json!("manual"));
    assert_eq!((t["from"].clone(), t["to"].clone()), (json!(1), json!(2)));
    assert!(t["stats"]["downtime_us"].as_u64().unwrap() > 0);
    assert!(t["stats"]["bytes"].as_u64().unwrap() > 1 << 20);
    assert!(t["finished_at_ms"].as_u64() >= t["started_at_ms"].as_u64());

    // And back, through a follower's API.
    c.tern_ok_at(&c.addr(3), &["migrate", "web", "--to", "1", "--wait"]);
    let g = c.wait_guest_progress("web", 1);
    assert_eq!(g["status"]["mismatches"], json!(0));
    assert_eq!(g["epoch"], json!(2));
    assert!(c.guest("web", 2).is_none());

    // Stop, start and destroy through the API.
    c.tern_ok(&["vm", "stop", "web"]);
    wait_for("web stopped", Duration::from_secs(10), || {
        c.guest("web", 1).is_none().then_some(())
    });
    c.tern_ok(&["vm", "start", "web"]);
    c.wait_guest_progress("web", 1);
    c.tern_ok(&["vm", "destroy", "web"]);
    wait_for("web gone", Duration::from_secs(10), || {
        c.guest("web", 1).is_none().then_some(())
    });
    assert!(c.state()["vms"].get("web").is_none());
    let _ = a1;
}

#[test]
fn cluster_forged_migration_streams_are_refused() {
    if !have_kvm() {
        return;
    }
    let c = Cluster::start(3, &[]);
    // No committed task: no listener is opened.
    let r = post(&c.addr(2), "/v1/migrations/prepare", &json!({"task": 4242}));
    assert_eq!(r.0, 404, "{:?}", r.1);
    c.tern_ok(&[
        "vm",
        "create",
        "db",
        "--memory",
        "64M",
        "--workload",
        "wss=8M,rate=1000",
        "--host",
        "1",
    ]);
    c.wait_guest_progress("db", 1);
    c.tern_ok(&["migrate", "db", "--to", "2", "--wait"]);
    // A finished task opens nothing either, nor does a task naming another host.
    let r = post(&c.addr(2), "/v1/migrations/prepare", &json!({"task": 0}));
    assert_eq!(r.0, 409, "{:?}", r.1);
    let r = post(&c.addr(3), "/v1/migrations/prepare", &json!({"task": 0}));
    assert_eq!(r.0, 409, "{:?}", r.1);
    // Garbage bodies get a 4xx, and nothing changed.
    let r = post(&c.addr(2), "/v1/migrations/prepare", &json!({"task": "x"}));
    assert!((400..500).contains(&r.0), "{:?}", r);
    let g = c.guest("db", 2).expect("db still runs on host 2");
    assert_eq!(g["status"]["mismatches"], json!(0));
    assert_eq!(c.state()["vms"]["db"]["owner"], json!(2));
}

#[test]
fn cluster_maintenance_evacuates_a_host_while_guests_keep_verifying() {
    if !have_kvm() {
        return;
    }
    let c = Cluster::start(3, &[]);
    for i in 0..4 {
        c.create_vm(&format!("m{i}"), 1, "wss=8M,rate=2000,pattern=random");
    }
    let out = c.tern_ok(&["host", "maintenance", "enter", "1", "--wait"]);
    assert!(out.contains("in maintenance"), "{out}");
    let state = c.state();
    assert_eq!(state["hosts"]["1"]["state"], json!("in-maintenance"));
    for (name, vm) in state["vms"].as_object().unwrap() {
        assert_ne!(vm["owner"], json!(1), "{name} still on host 1");
    }
    let tasks = c.wait_tasks_idle(Duration::from_secs(30));
    assert_eq!(tasks.len(), 4);
    for t in &tasks {
        assert_eq!(t["state"], json!("succeeded"), "{t}");
        assert_eq!(t["reason"], json!("maintenance"));
    }
    c.assert_single_owners();
    // Nothing lands on a host in maintenance, by placement or by migration.
    c.tern_ok(&[
        "vm",
        "create",
        "late",
        "--memory",
        "64M",
        "--workload",
        "wss=8M,rate=500",
    ]);
    assert_ne!(c.state()["vms"]["late"]["owner"], json!(1));
    let (ok, _, err) = c.tern_at(&c.live(), &["migrate", "m0", "--to", "1"]);
    assert!(!ok && err.contains("InMaintenance"), "{err}");
    c.tern_ok(&["host", "maintenance", "exit", "1"]);
    assert_eq!(c.state()["hosts"]["1"]["state"], json!("connected"));
    c.tern_ok(&["migrate", "m0", "--to", "1", "--wait"]);
    c.assert_single_owners();
}

#[test]
fn cluster_concurrent_migrations_respect_slots_and_priority() {
    if !have_kvm() {
        return;
    }
    // A bandwidth cap keeps each migration long enough for the queue to matter.
    let c = Cluster::start(3, &["--migrate-bandwidth-mib", "40"]);
    c.write(json!({"op": "set_slots", "slots":
        {"per_source": 1, "per_destination": 2, "per_cluster": 4}}));
    for name in ["first", "low1", "low2", "normal", "high"] {
        c.create_vm(name, 1, "wss=16M,rate=1000,pattern=seq");
    }
    c.tern_ok(&["migrate", "first", "--to", "2"]);
    c.tern_ok(&["migrate", "low1", "--to", "3", "--priority", "low"]);
    c.tern_ok(&["migrate", "low2", "--to", "2", "--priority", "low"]);
    c.tern_ok(&["migrate", "normal", "--to", "3"]);
    // High priority reserves both ends at once or is refused with the reason (the scheduler
    // queue's semantics): host 1's only outbound slot is busy.
    let (ok, _, err) = c.tern_at(
        &c.live(),
        &["migrate", "high", "--to", "3", "--priority", "high"],
    );
    assert!(!ok && err.contains("outbound slot"), "{err}");
    let tasks = c.wait_tasks_idle(Duration::from_secs(90));
    let by_vm = |vm: &str| tasks.iter().find(|t| t["vm"] == json!(vm)).unwrap().clone();
    assert!(tasks.iter().all(|t| t["vm"] != json!("high")), "{tasks:?}");
    for t in &tasks {
        assert_eq!(t["state"], json!("succeeded"), "{t}");
    }
    // One outbound slot: no two migrations from host 1 overlapped.
    let mut spans: Vec<(u64, u64)> = tasks
        .iter()
        .map(|t| {
            (
                t["started_at_ms"].as_u64().unwrap(),
                t["finished_at_ms"].as_u64().unwrap(),
            )
        })
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "overlapping migrations {spans:?}");
    }
    // The normal task, queued last while `first` ran, went ahead of both low ones.
    let first = by_vm("first");
    let normal = by_vm("normal");
    assert!(normal["created_at_ms"].as_u64() <= first["finished_at_ms"].as_u64());
    for low in ["low1", "low2"] {
        assert!(
            normal["started_at_ms"].as_u64() < by_vm(low)["started_at_ms"].as_u64(),
            "normal started after {low}: {tasks:?}"
        );
    }
    // With the slots free, high priority is admitted and runs.
    let out = c.tern_ok(&[
        "migrate",
        "high",
        "--to",
        "3",
        "--priority",
        "high",
        "--wait",
    ]);
    assert!(out.contains("Succeeded"), "{out}");
    c.assert_single_owners();
}

#[test]
fn cluster_drs_moves_vms_off_an_overloaded_host() {
    if !have_kvm() {
        return;
    }
    let c = Cluster::start(3, &["--load-interval-ms", "300"]);
    for i in 0..6 {
        c.create_vm(
            &format!("d{i}"),
            1,
            "wss=8M,rate=2000,pattern=random,duty=40",
        );
    }
    // Manual mode: recommendations only, nothing moves.
    c.write(json!({"op": "set_drs", "settings":
        {"automation": "manual", "migration_threshold": 3, "interval_s": 1}}));
    let before = wait_for(
        "load-driven recommendations",
        Duration::from_secs(20),
        || {
            let r = get(&c.live(), "/v1/drs")?;
            (!r["recommendations"].as_array()?.is_empty()).then_some(r)
        },
    );
    assert!(c.tasks().is_empty());
    let imbalance_before = before["imbalance"].as_f64().unwrap();
    c.write(json!({"op": "set_drs", "settings":
        {"automation": "fully-automated", "migration_threshold": 3, "interval_s": 1}}));
    wait_for("drs migrations", Duration::from_secs(60), || {
        let t = c.tasks();
        let done = t
            .iter()
            .filter(|t| t["reason"] == json!("drs") && t["state"] == json!("succeeded"))
            .count();
        (done >= 2).then_some(())
    });
    c.write(json!({"op": "set_drs", "settings":
        {"automation": "manual", "migration_threshold": 3, "interval_s": 1}}));
    let tasks = c.wait_tasks_idle(Duration::from_secs(30));
    for t in tasks.iter().filter(|t| t["reason"] == json!("drs")) {
        assert_eq!(t["requested_by"], json!("drs"));
        assert_eq!(t["state"], json!("succeeded"), "{t}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = get(&c.live(), "/v1/drs").unwrap();
    let imbalance_after = after["imbalance"].as_f64().unwrap();
    assert!(
        imbalance_after < imbalance_before,
        "imbalance {imbalance_before} -> {imbalance_after}"
    );
    let on_host1 = c.state()["vms"]
        .as_object()
        .unwrap()
        .values()
        .filter(|v| v["owner"] == json!(1))
        .count();
    assert!(on_host1 < 6);
    c.assert_single_owners();
}

#[test]
fn cluster_kill_destination_mid_migration_keeps_the_vm_on_the_source() {
    if !have_kvm() {
        return;
    }
    let mut c = Cluster::start(3, &["--migrate-bandwidth-mib", "10"]);
    c.create_vm("k", 1, "wss=32M,rate=4000,pattern=random");
    c.tern_ok(&["migrate", "k", "--to", "2"]);
    wait_for("migration running", Duration::from_secs(10), || {
        get(&c.addr(1), "/v1/tasks/0/progress").filter(|p| p["bytes_sent"].as_u64() > Some(1 << 20))
    });
    c.node(2).kill();
    let tasks = c.wait_tasks_idle(Duration::from_secs(40));
    assert_eq!(tasks[0]["state"], json!("failed"), "{tasks:?}");
    assert!(tasks[0]["error"].as_str().is_some_and(|e| !e.is_empty()));
    let audit: Value = serde_json::from_str(&c.tern_ok(&["audit", "--vm", "k", "--json"])).unwrap();
    assert_eq!(audit[0]["state"], json!("failed"));
    assert_eq!(c.state()["vms"]["k"]["owner"], json!(1));
    // The guest keeps running and verifying on the source.
    c.wait_guest_progress("k", 1);
    c.assert_single_owners();
}

#[test]
fn cluster_kill_leader_mid_migration_ends_with_one_owner() {
    if !have_kvm() {
        return;
    }
    let mut c = Cluster::start(3, &["--migrate-bandwidth-mib", "20"]);
    // Host 1 leads; the migration is between the other two.
    c.create_vm("l", 2, "wss=16M,rate=2000,pattern=random");
    c.tern_ok_at(&c.addr(2), &["migrate", "l", "--to", "3"]);
    wait_for("migration running", Duration::from_secs(10), || {
        get(&c.addr(2), "/v1/tasks/0/progress").filter(|p| p["bytes_sent"].as_u64() > Some(1 << 20))
    });
    c.node(1).kill();
    let tasks = wait_for("task final", Duration::from_secs(60), || {
        let s = get(&c.addr(2), "/v1/state")?;
        let t = s["tasks"]["0"].clone();
        matches!(t["state"].as_str(), Some("succeeded" | "failed")).then_some(t)
    });
    let _ = tasks;
    c.assert_single_owners();
    c.wait_guest_progress("l", c.state()["vms"]["l"]["owner"].as_u64().unwrap());
}

#[test]
fn cluster_rules_and_pools_steer_drs_and_placement() {
    if !have_kvm() {
        return;
    }
    let c = Cluster::start(3, &["--load-interval-ms", "300"]);
    c.tern_ok(&[
        "pool",
        "set",
        "gold",
        "--memory-reservation",
        "128",
        "--shares",
        "8000",
    ]);
    c.tern_ok(&[
        "vm",
        "create",
        "a",
        "--memory",
        "64M",
        "--workload",
        "wss=8M,rate=500",
        "--host",
        "1",
        "--pool",
        "gold",
    ]);
    c.create_vm("b", 1, "wss=8M,rate=500");
    let pools = c.tern_ok(&["pool", "list"]);
    assert!(pools.contains("gold") && pools.contains('a'), "{pools}");
    // A rule naming a VM that does not exist changes nothing.
    let (ok, _, err) = c.tern_at(
        &c.live(),
        &["rule", "set", "bad", "--kind", "apart", "--vms", "a,nope"],
    );
    assert!(!ok && err.contains("nope"), "{err}");
    // A hard anti-affinity rule that the current placement breaks: DRS fixes it by itself.
    c.tern_ok(&[
        "rule", "set", "ab-apart", "--kind", "apart", "--vms", "a,b", "--user", "ops",
    ]);
    assert!(c.tern_ok(&["rule", "list"]).contains("ab-apart"));
    c.write(json!({"op": "set_drs", "settings":
        {"automation": "fully-automated", "migration_threshold": 1, "interval_s": 1}}));
    let owners = wait_for("rule enforced", Duration::from_secs(40), || {
        let s = c.state();
        let (a, b) = (
            s["vms"]["a"]["owner"].clone(),
            s["vms"]["b"]["owner"].clone(),
        );
        (a != b).then_some((a, b))
    });
    let tasks = c.wait_tasks_idle(Duration::from_secs(30));
    assert!(
        tasks
            .iter()
            .any(|t| t["reason"] == json!("drs") && t["state"] == json!("succeeded")),
        "{tasks:?} {owners:?}"
    );
    c.assert_single_owners();
    c.tern_ok(&["rule", "delete", "ab-apart"]);
    assert!(c.state()["rules"].get("ab-apart").is_none());
}
