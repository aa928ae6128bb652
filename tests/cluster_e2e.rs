//! End-to-end cluster tests: real `tern node` processes with a shared datastore, real VMs on
//! KVM, real live migrations gated by Raft commits.
mod cluster_e2e_harness;
mod support;

use std::time::Duration;

use cluster_e2e_harness::*;
use serde_json::{json, Value};

#[test]
fn cluster_vm_migrates_live_with_raft_gated_switchover() {
    if !kvm_or_skip() {
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
    ]);
    c.wait_guest_progress("web", 1);
    // Let the guest touch a few MiB first, so the migration has real memory to move.
    wait_for("web to write 4 MiB", Duration::from_secs(30), || {
        c.guest("web", 1)
            .filter(|g| g["status"]["pages_written"].as_u64() >= Some(1024))
    });
    // Only its owner runs it.
    assert!(c.guest("web", 2).is_none() && c.guest("web", 3).is_none());

    // Alice's operator token; the audit names her whatever `--user` claims.
    let alice = c.token("alice", "operator");
    let out = c.tern_as(
        &alice,
        &["migrate", "web", "--to", "2", "--wait", "--user", "mallory"],
    );
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
    // Human output: times in UTC RFC 3339 (JSON keeps unix ms); --since takes either form.
    let human = c.tern_ok(&["audit", "--vm", "web", "--since", "10m"]);
    let row = human
        .lines()
        .find(|l| l.contains(" web "))
        .unwrap_or_else(|| panic!("no row for web: {human}"));
    let times: Vec<&str> = row
        .split_whitespace()
        .filter(|w| w.len() == 24 && w.ends_with('Z') && w.as_bytes()[10] == b'T')
        .collect();
    assert_eq!(times.len(), 3, "created, started, finished: {row}");
    assert!(!row.contains(&t["created_at_ms"].to_string()), "{row}");
    let at_created = c.tern_ok(&["audit", "--vm", "web", "--since", times[0]]);
    assert!(
        at_created.contains(" web "),
        "--since its own time: {at_created}"
    );
    let future = c.tern_ok(&["audit", "--vm", "web", "--since", "2099-01-01T00:00:00Z"]);
    assert!(!future.contains(" web "), "{future}");

    // Prometheus metrics on the source: migrations by result, downtime, bytes, Raft position.
    let metrics = client(&c.addr(1))
        .expect("admin client")
        .get(api::url(&c.addr(1), "/metrics"))
        .send()
        .and_then(|r| r.text())
        .expect("metrics");
    for needle in [
        "tern_migrations_total{result=\"succeeded\"} 1",
        "tern_migration_downtime_seconds_count 1",
        "tern_migration_bytes_total",
        "tern_raft_term",
        "tern_raft_leader 1",
        "tern_raft_commit_index",
    ] {
        assert!(metrics.contains(needle), "no {needle} in\n{metrics}");
    }

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
    if !kvm_or_skip() {
        return;
    }
    let c = Cluster::start(3, &[]);
    // Only member nodes may ask a destination to prepare: an operator's token is not enough.
    let r = post(&c.addr(2), "/v1/migrations/prepare", &json!({"task": 4242}));
    assert_eq!(r.0, 403, "{:?}", r.1);
    // A member (node 1's certificate) asking with no committed task: no listener is opened.
    let prepare = |to: u64, body: Value| {
        api::post_as_node(
            &c.nodes[0].data,
            1,
            to,
            &c.addr(to),
            "/v1/migrations/prepare",
            &body,
        )
    };
    let r = prepare(2, json!({"task": 4242}));
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
    let r = prepare(2, json!({"task": 0}));
    assert_eq!(r.0, 409, "{:?}", r.1);
    let r = prepare(3, json!({"task": 0}));
    assert_eq!(r.0, 409, "{:?}", r.1);
    // Garbage bodies get a 4xx, and nothing changed.
    let r = prepare(2, json!({"task": "x"}));
    assert!((400..500).contains(&r.0), "{:?}", r);
    let g = c.guest("db", 2).expect("db still runs on host 2");
    assert_eq!(g["status"]["mismatches"], json!(0));
    assert_eq!(c.state()["vms"]["db"]["owner"], json!(2));
}

#[test]
fn cluster_maintenance_evacuates_a_host_while_guests_keep_verifying() {
    if !kvm_or_skip() {
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
    // The migration wizard ranks the other host and says why host 1 is out.
    let rec = c.tern_ok(&["migrate", "m0", "--recommend"]);
    assert!(rec.contains(" 1. host "), "{rec}");
    assert!(
        rec.lines()
            .any(|l| l.trim_start().starts_with("host 1 ") && l.contains("excluded")),
        "{rec}"
    );
    let (ok, _, err) = c.tern_at(&c.live(), &["migrate", "m0", "--to", "1"]);
    assert!(!ok && err.contains("InMaintenance"), "{err}");
    c.tern_ok(&["host", "maintenance", "exit", "1"]);
    assert_eq!(c.state()["hosts"]["1"]["state"], json!("connected"));
    c.tern_ok(&["migrate", "m0", "--to", "1", "--wait"]);
    c.assert_single_owners();
}

#[test]
fn cluster_concurrent_migrations_respect_slots_and_priority() {
    if !kvm_or_skip() {
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
    if !kvm_or_skip() {
        return;
    }
    // Small declared capacities, so the load the guests put on host 1 stands out even when
    // this machine is busy with other work.
    let c = Cluster::start(
        3,
        &[
            "--load-interval-ms",
            "300",
            "--capacity-memory-mib",
            "1024",
            "--capacity-cpus",
            "1",
        ],
    );
    for i in 0..6 {
        c.create_vm(
            &format!("d{i}"),
            1,
            "wss=40M,rate=4000,pattern=random,duty=40",
        );
    }
    // Manual mode: recommendations only, nothing moves.
    c.tern_ok(&[
        "drs",
        "set",
        "--automation",
        "manual",
        "--threshold",
        "3",
        "--interval",
        "1",
    ]);
    assert_eq!(
        c.state()["drs"],
        json!({"automation": "manual", "migration_threshold": 3, "interval_s": 1})
    );
    let before = wait_for(
        "load-driven recommendations",
        Duration::from_secs(20),
        || {
            let r = get(&c.live(), "/v1/drs")?;
            (!r["recommendations"].as_array()?.is_empty()).then_some(r)
        },
    );
    assert!(c.tasks().is_empty());
    // The leader exports what DRS sees.
    let metrics = client(&c.addr(1))
        .expect("admin client")
        .get(api::url(&c.addr(1), "/metrics"))
        .send()
        .and_then(|r| r.text())
        .expect("metrics");
    for needle in ["tern_drs_imbalance", "tern_host_cpu_load{host=\"1\"}"] {
        assert!(metrics.contains(needle), "no {needle} in\n{metrics}");
    }
    let imbalance_before = before["imbalance"].as_f64().unwrap();
    let status = c.tern_ok(&["drs", "status"]);
    assert!(
        status.contains("imbalance") && status.contains("host"),
        "{status}"
    );
    let recs: Value =
        serde_json::from_str(&c.tern_ok(&["drs", "recommendations", "--json"])).expect("json");
    // Moves off the overloaded host (the load is sampled again, so the list may change).
    let recs = recs.as_array().expect("a list of moves");
    assert!(recs.iter().all(|m| m["from"] == json!("1")), "{recs:?}");
    c.tern_ok(&["drs", "set", "--automation", "full"]);
    assert_eq!(c.state()["drs"]["automation"], json!("fully-automated"));
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
    if !kvm_or_skip() {
        return;
    }
    let mut c = Cluster::start(3, &["--migrate-bandwidth-mib", "10"]);
    c.create_vm("k", 1, "wss=32M,rate=4000,pattern=random");
    // Let the guest touch its working set so that pre-copy takes a few seconds.
    std::thread::sleep(Duration::from_secs(3));
    c.tern_ok(&["migrate", "k", "--to", "2"]);
    wait_for("migration running", Duration::from_secs(10), || {
        get(&c.addr(1), "/v1/tasks/0/progress").filter(|p| p["bytes_sent"].as_u64() > Some(1 << 20))
    });
    // The destination host fails: its node and its VMMs.
    c.node(2).crash();
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
    if !kvm_or_skip() {
        return;
    }
    let mut c = Cluster::start(3, &["--migrate-bandwidth-mib", "10"]);
    // Host 1 leads; the migration is between the other two.
    c.create_vm("l", 2, "wss=32M,rate=1000,pattern=random");
    // Let the guest touch its working set so that pre-copy takes a few seconds.
    std::thread::sleep(Duration::from_secs(3));
    c.tern_ok_at(&c.addr(2), &["migrate", "l", "--to", "3"]);
    wait_for("migration running", Duration::from_secs(20), || {
        get(&c.addr(2), "/v1/tasks/0/progress").filter(|p| {
            p["bytes_sent"].as_u64() > Some(256 << 10)
                && matches!(p["phase"].as_str(), Some("first-pass" | "dirty-rounds"))
        })
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
    if !kvm_or_skip() {
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
        "--disk",
        "256M",
    ]);
    c.create_vm("b", 1, "wss=8M,rate=500");
    // The disk: sized by the spec, sparse on the datastore, root-only, shown by `vm show`.
    let disk = std::fs::metadata(c.datastore.join("vms/a/disk.img")).expect("disk.img");
    assert_eq!(disk.len(), 256 << 20);
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&disk.permissions()) & 0o777,
        0o600
    );
    let shown = c.tern_ok(&["vm", "show", "a"]);
    assert!(shown.contains("disk:    256 MiB"), "{shown}");
    let (ok, _, err) = c.tern_at(
        &c.live(),
        &["vm", "create", "odd", "--host", "1", "--disk", "1536K"],
    );
    assert!(!ok && err.contains("whole number of MiB"), "{err}");
    // A pool reservation host 1 cannot honour: refused with the reason, nothing created.
    c.tern_ok(&["pool", "set", "huge", "--cpu-reservation", "999999"]);
    let (ok, _, err) = c.tern_at(
        &c.live(),
        &["vm", "create", "big", "--host", "1", "--pool", "huge"],
    );
    assert!(
        !ok && err.contains("cannot honour the pool reservations"),
        "{err}"
    );
    assert!(!c.datastore.join("vms/big").exists());
    c.tern_ok(&["pool", "delete", "huge"]);
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

    // Manual automation: initial placement is only recommended; the refusal ranks the hosts.
    c.tern_ok(&["drs", "set", "--automation", "manual"]);
    let create_c = [
        "vm",
        "create",
        "c",
        "--memory",
        "64M",
        "--workload",
        "wss=8M,rate=500",
    ];
    let (ok, _, err) = c.tern_at(&c.live(), &create_c);
    assert!(!ok, "manual DRS placed a vm by itself");
    assert!(err.contains("manual") && err.contains("--host"), "{err}");
    for h in 1..=3 {
        assert!(err.contains(&format!("host {h} (score")), "{err}");
    }
    assert!(err.contains("1. host "), "{err}");
    assert!(
        c.state()["vms"].get("c").is_none(),
        "a refused create left a vm"
    );
    // Partial automation: placed automatically (DRS still only recommends migrations).
    c.tern_ok(&["drs", "set", "--automation", "partial"]);
    assert_eq!(c.state()["drs"]["automation"], json!("partially-automated"));
    c.tern_ok(&create_c);
    let owner = c.state()["vms"]["c"]["owner"].as_u64();
    assert!(matches!(owner, Some(1..=3)), "{owner:?}");

    // A VM-VM should rule is stored as asked, but the operator is told it acts as a must rule.
    let (ok, _, err) = c.tern_at(
        &c.live(),
        &[
            "rule", "set", "ac", "--kind", "apart", "--vms", "a,c", "--should",
        ],
    );
    assert!(ok && err.contains("enforced as must"), "{err}");
    assert_eq!(c.state()["rules"]["ac"]["mandatory"], json!(false));
    assert!(c.tern_ok(&["rule", "list"]).contains("known limitation"));
}

/// Whether node `addr` holds `vm` with running vCPUs (None: the node did not answer).
fn runs(addr: &str, vm: &str) -> Option<bool> {
    let l = get(addr, "/v1/local")?;
    Some(
        l.as_array()?
            .iter()
            .any(|x| x["name"] == json!(vm) && x["running"] == json!(true)),
    )
}

#[test]
fn cluster_source_cut_off_at_switchover_never_runs_the_vm_twice() {
    if !kvm_or_skip() {
        return;
    }
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    // Host 1 leads; the VM moves from host 2 to host 3.
    let c = Cluster::start_partitionable(3, &["--migrate-bandwidth-mib", "10"]);
    c.create_vm("p", 2, "wss=32M,rate=1000,pattern=random");
    // Let the guest touch its working set so that pre-copy takes a few seconds.
    std::thread::sleep(Duration::from_secs(3));
    // Watch both hosts all along: never both running the VM in one sampling round.
    let stop = Arc::new(AtomicBool::new(false));
    let doubles = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (stop, doubles) = (stop.clone(), doubles.clone());
        let (a2, a3) = (c.addr(2), c.addr(3));
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if runs(&a2, "p") == Some(true) && runs(&a3, "p") == Some(true) {
                    doubles.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    c.tern_ok_at(&c.addr(2), &["migrate", "p", "--to", "3"]);
    let progress = |phase: Option<&str>| {
        get(&c.addr(2), "/v1/tasks/0/progress").filter(|p| match phase {
            Some(ph) => p["phase"] == json!(ph),
            None => {
                p["bytes_sent"].as_u64() > Some(256 << 10)
                    && matches!(p["phase"].as_str(), Some("first-pass" | "dirty-rounds"))
            }
        })
    };
    wait_for("pre-copy running", Duration::from_secs(20), || {
        progress(None)
    });
    // Cut the source off from the Raft majority (the migration stream is direct and goes on).
    c.proxies().isolate(2);
    let t0 = std::time::Instant::now();
    while progress(Some("switchover")).is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no switchover: {:?}\n{}",
            get(&c.addr(2), "/v1/tasks/0/progress"),
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The commit's outcome is unknown to the source: the VM stays paused there, and the
    // destination, with no commit naming it, does not run it either.
    let until = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < until {
        assert_eq!(
            runs(&c.addr(2), "p"),
            Some(false),
            "source resumed while cut off"
        );
        assert_eq!(
            runs(&c.addr(3), "p"),
            Some(false),
            "destination runs without a commit"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.proxies().heal_all();
    let task = wait_for("task final", Duration::from_secs(60), || {
        let s = get(&c.addr(1), "/v1/state")?;
        let t = s["tasks"]["0"].clone();
        matches!(t["state"].as_str(), Some("succeeded" | "failed")).then_some(t)
    });
    // The source fenced the VM (owner kept, epoch bumped), so the transfer can never apply,
    // and resumed it.
    assert_eq!(task["state"], json!("failed"), "{task}");
    assert!(
        task["error"].as_str().is_some_and(|e| e.contains("fenced")),
        "{task}"
    );
    let s = c.state();
    assert_eq!(s["vms"]["p"]["owner"], json!(2));
    assert_eq!(s["vms"]["p"]["epoch"], json!(1));
    let g = c.wait_guest_progress("p", 2);
    assert_eq!(g["status"]["mismatches"], json!(0));
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    assert_eq!(doubles.load(Ordering::SeqCst), 0, "the VM ran on two hosts");
    c.assert_single_owners();
    // And the cluster still migrates it afterwards.
    c.tern_ok_at(&c.addr(1), &["migrate", "p", "--to", "3", "--wait"]);
    c.assert_single_owners();
}

#[test]
fn cluster_scheduled_migration_fires_after_a_leader_change_and_tasks_cancel() {
    if !kvm_or_skip() {
        return;
    }
    let mut c = Cluster::start(3, &["--migrate-bandwidth-mib", "10"]);
    c.create_vm("s", 2, "wss=8M,rate=500");
    c.create_vm("c1", 3, "wss=32M,rate=2000,pattern=random");
    c.create_vm("c2", 3, "wss=8M,rate=500");
    let bob = c.token("bob", "operator");
    let out = c.tern_as_at(
        &c.addr(2),
        &bob,
        &["migrate", "s", "--to", "3", "--at", "+6s"],
    );
    assert!(out.contains("schedule"), "{out}");
    // The leader that would have fired it dies; the schedule is in the Raft log.
    c.node(1).kill();
    wait_for("a new leader", Duration::from_secs(20), || {
        let s = get(&c.addr(2), "/v1/status")?;
        matches!(s["leader"].as_u64(), Some(2 | 3)).then_some(())
    });
    c.write(json!({"op": "set_slots", "slots":
        {"per_source": 1, "per_destination": 2, "per_cluster": 4}}));
    c.tern_ok(&["migrate", "c1", "--to", "2"]);
    c.tern_ok(&["migrate", "c2", "--to", "2"]);
    let id_of = |vm: &str| {
        c.tasks()
            .into_iter()
            .find(|t| t["vm"] == json!(vm))
            .and_then(|t| t["id"].as_u64())
            .expect("task")
            .to_string()
    };
    // c2 waits behind c1 (one outbound slot); cancel it while queued, then cancel c1 running.
    let (c1, c2) = (id_of("c1"), id_of("c2"));
    c.tern_ok(&["task", "cancel", &c2]);
    wait_for("c1 running", Duration::from_secs(20), || {
        get(&c.addr(3), &format!("/v1/tasks/{c1}/progress"))
            .filter(|p| p["bytes_sent"].as_u64() > Some(1 << 20))
    });
    let carol = c.token("carol", "operator");
    c.tern_as(&carol, &["task", "cancel", &c1]);
    let tasks = wait_for("scheduled task done", Duration::from_secs(60), || {
        let t = c.tasks();
        t.iter()
            .any(|t| t["reason"] == json!("scheduled") && t["state"] == json!("succeeded"))
            .then_some(t)
    });
    let by_vm = |vm: &str| tasks.iter().find(|t| t["vm"] == json!(vm)).unwrap().clone();
    assert_eq!(by_vm("s")["requested_by"], json!("bob"));
    assert_eq!(by_vm("c2")["state"], json!("cancelled"));
    assert!(by_vm("c2")["started_at_ms"].is_null(), "c2 never started");
    let c1t = wait_for("c1 final", Duration::from_secs(30), || {
        let t = c.tasks().into_iter().find(|t| t["vm"] == json!("c1"))?;
        matches!(
            t["state"].as_str(),
            Some("cancelled" | "failed" | "succeeded")
        )
        .then_some(t)
    });
    assert_eq!(c1t["state"], json!("cancelled"), "{c1t}");
    assert!(
        c1t["error"].as_str().is_some_and(|e| e.contains("carol")),
        "{c1t}"
    );
    let s = c.state();
    assert_eq!(s["vms"]["s"]["owner"], json!(3));
    // Cancelled migrations leave their VMs where they were, running and verifying.
    assert_eq!(s["vms"]["c1"]["owner"], json!(3));
    assert_eq!(s["vms"]["c2"]["owner"], json!(3));
    c.wait_guest_progress("c1", 3);
    c.assert_single_owners();
}
