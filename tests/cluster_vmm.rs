//! A VM is its own process: real `tern node` processes on loopback, each VM a `tern vmm`
//! process with its disk on the shared datastore (real KVM). The node can be killed and
//! restarted under its VMs, a dying VMM is restarted per its policy, and live migration with
//! continuous disk I/O loses nothing.
mod cluster_e2e_harness;
mod support;

use std::time::{Duration, Instant};

use cluster_e2e_harness::*;
use serde_json::{json, Value};

/// Memory stress plus a disk that is written, flushed every 4 blocks and re-verified.
const DISK_WORKLOAD: &str = "wss=16M,rate=2000,pattern=random,disk=8M,iops=400,dflush=4";

fn create(c: &Cluster, name: &str, host: u64, workload: &str, extra: &[&str]) {
    let mut args = vec![
        "vm",
        "create",
        name,
        "--memory",
        "64M",
        "--disk",
        "16M",
        "--workload",
        workload,
        "--host",
    ];
    let h = host.to_string();
    args.push(&h);
    args.extend_from_slice(extra);
    c.tern_ok(&args);
    c.wait_guest_progress(name, host);
}

/// The pid of `vm`'s VMM on node `id`, from its run directory.
fn vmm_pid(c: &Cluster, id: u64, vm: &str) -> Option<u32> {
    support::vmm_pids(&c.nodes[(id - 1) as usize].data)
        .into_iter()
        .find(|(n, _)| n == vm)
        .map(|(_, p)| p)
}

fn disk(g: &Value) -> &Value {
    &g["status"]["disk"]
}

fn stall_us(g: &Value) -> u64 {
    let s = &g["status"];
    let khz = s["tsc_khz"].as_u64().unwrap_or(0).max(1);
    s["max_stall_ticks"].as_u64().unwrap_or(0) * 1000 / khz
}

fn audit_lines(c: &Cluster) -> Vec<String> {
    c.state()["audit"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["action"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn node_kill_9_leaves_guests_running_and_the_restarted_node_carries_on() {
    if !kvm_or_skip() {
        return;
    }
    let mut c = Cluster::start(2, &["--migrate-bandwidth-mib", "8"]);
    for vm in ["a", "b"] {
        create(&c, vm, 2, "wss=8M,rate=2000,pattern=random", &[]);
    }
    create(&c, "m", 2, "wss=32M,rate=4000,pattern=random", &[]);
    let pids: Vec<u32> = ["a", "b", "m"]
        .iter()
        .map(|v| vmm_pid(&c, 2, v).expect("a VMM per VM"))
        .collect();
    // Let m touch its working set so that pre-copy at 8 MiB/s takes seconds, then kill -9 the
    // node while m migrates.
    std::thread::sleep(Duration::from_secs(2));
    c.tern_ok_at(&c.addr(2), &["migrate", "m", "--to", "1"]);
    wait_for("migration running", Duration::from_secs(20), || {
        get(&c.addr(2), "/v1/tasks/0/progress").filter(|p| p["bytes_sent"].as_u64() > Some(1 << 20))
    });
    // The guests' largest stall so far (since boot; a busy 2-core machine sets it): the kill
    // and restart of the node must not add one of 50 ms or more.
    let stalls_before: Vec<u64> = ["a", "b"]
        .iter()
        .map(|v| stall_us(&c.guest(v, 2).unwrap()))
        .collect();
    let before: Vec<u64> = ["a", "b"]
        .iter()
        .map(|v| {
            c.guest(v, 2).unwrap()["status"]["pages_written"]
                .as_u64()
                .unwrap()
        })
        .collect();
    c.node(2).kill();
    std::thread::sleep(Duration::from_secs(2));
    // Every VMM outlived its node.
    for pid in &pids {
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "VMM {pid} died with its node"
        );
    }
    let restarted = Instant::now();
    c.start_node(2, Some(&c.addr(1)));
    // The restarted node reports every VM again, with guests that went on writing.
    for ((vm, was), stall0) in ["a", "b"].iter().zip(&before).zip(&stalls_before) {
        let g = wait_for(&format!("{vm} re-adopted"), Duration::from_secs(40), || {
            c.guest(vm, 2)
                .filter(|g| g["status"]["pages_written"].as_u64() > Some(*was))
        });
        assert_eq!(g["status"]["mismatches"], json!(0), "{g}");
        let stall = stall_us(&g);
        assert!(
            stall < 50_000 || stall == *stall0,
            "{vm} stalled {stall} us across the node restart (before: {stall0} us): {g}"
        );
        assert_eq!(
            vmm_pid(&c, 2, vm),
            Some(pids[if *vm == "a" { 0 } else { 1 }])
        );
    }
    eprintln!("node back with its VMs after {:?}", restarted.elapsed());
    // The interrupted migration ends, and m runs on exactly one host.
    let tasks = c.wait_tasks_idle(Duration::from_secs(90));
    assert!(
        matches!(tasks[0]["state"].as_str(), Some("succeeded" | "failed")),
        "{tasks:?}"
    );
    let owner = c.state()["vms"]["m"]["owner"].as_u64().unwrap();
    c.wait_guest_progress("m", owner);
    c.assert_single_owners();
    // The restarted node can migrate the VMs it adopted.
    c.tern_ok_at(&c.addr(1), &["migrate", "a", "--to", "1"]);
    let tasks = c.wait_tasks_idle(Duration::from_secs(60));
    let last = tasks.iter().find(|t| t["vm"] == json!("a")).unwrap();
    assert_eq!(last["state"], json!("succeeded"), "{tasks:?}\n{}", c.logs());
    c.wait_guest_progress("a", 1);
    c.assert_single_owners();
}

#[test]
fn vmm_kill_9_is_contained_recorded_and_restarted_with_its_flushed_blocks() {
    if !kvm_or_skip() {
        return;
    }
    let c = Cluster::start(1, &[]);
    create(&c, "d", 1, DISK_WORKLOAD, &[]);
    create(&c, "o", 1, "wss=8M,rate=2000,pattern=random", &[]);
    create(&c, "n", 1, "wss=8M,rate=1000", &["--restart", "never"]);
    let g = wait_for("flushed blocks", Duration::from_secs(60), || {
        c.guest("d", 1)
            .filter(|g| disk(g)["flushed_gen"].as_u64() >= Some(5))
    });
    assert_eq!(disk(&g)["mismatches"], json!(0), "{g}");
    let other = vmm_pid(&c, 1, "o").unwrap();
    let o_before = c.guest("o", 1).unwrap()["status"]["pages_written"]
        .as_u64()
        .unwrap();
    let d_pid = vmm_pid(&c, 1, "d").unwrap();
    let killed = Instant::now();
    std::process::Command::new("kill")
        .args(["-9", &d_pid.to_string()])
        .status()
        .unwrap();
    // Restarted (policy `always`): a new VMM whose guest verifies the previous boot's blocks.
    let g = wait_for("d restarted", Duration::from_secs(60), || {
        c.guest("d", 1).filter(|g| {
            disk(g)["boot_verified"].as_u64() > Some(0) && vmm_pid(&c, 1, "d") != Some(d_pid)
        })
    });
    eprintln!("d back after {:?}", killed.elapsed());
    assert_eq!(disk(&g)["mismatches"], json!(0), "{g}");
    assert_eq!(disk(&g)["io_errors"], json!(0), "{g}");
    // The other VM and the node were untouched.
    assert_eq!(vmm_pid(&c, 1, "o"), Some(other));
    let o = c.guest("o", 1).unwrap();
    assert!(o["status"]["pages_written"].as_u64().unwrap() > o_before);
    assert!(stall_us(&o) < 50_000, "{o}");
    let audit = audit_lines(&c);
    assert!(
        audit
            .iter()
            .any(|a| a.contains("vm d on host 1: VMM pid") && a.contains("always")),
        "{audit:?}"
    );
    // Policy `never`: the VM is marked stopped and stays down.
    let n_pid = vmm_pid(&c, 1, "n").unwrap();
    std::process::Command::new("kill")
        .args(["-9", &n_pid.to_string()])
        .status()
        .unwrap();
    wait_for("n stopped", Duration::from_secs(20), || {
        (c.state()["vms"]["n"]["state"] == json!("stopped")).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(vmm_pid(&c, 1, "n"), None);
    assert!(audit_lines(&c)
        .iter()
        .any(|a| a.contains("vm n on host 1: VMM pid") && a.contains("never")));
    let metrics = client(&c.addr(1))
        .expect("admin client")
        .get(api::url(&c.addr(1), "/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(metrics.contains("tern_vmm_deaths_total 2"), "{metrics}");
}

#[test]
fn live_migration_with_continuous_disk_io_loses_nothing() {
    if !kvm_or_skip() {
        return;
    }
    let c = Cluster::start(2, &[]);
    create(&c, "io", 1, DISK_WORKLOAD, &[]);
    let before = wait_for("disk I/O", Duration::from_secs(60), || {
        c.guest("io", 1)
            .filter(|g| disk(g)["flushed_gen"].as_u64() >= Some(3))
    });
    for (to, from) in [(2u64, 1u64), (1, 2)] {
        c.tern_ok(&["migrate", "io", "--to", &to.to_string()]);
        let tasks = c.wait_tasks_idle(Duration::from_secs(60));
        assert!(
            tasks.iter().all(|t| t["state"] == json!("succeeded")),
            "{tasks:?}\n{}",
            c.logs()
        );
        let was = c.state()["vms"]["io"]["owner"].as_u64();
        assert_eq!(was, Some(to), "moved from {from}");
        // The disk workload carries on on the destination: more generations flushed, all
        // verified, no I/O error seen by the guest.
        let g = wait_for(
            "disk I/O on the destination",
            Duration::from_secs(30),
            || {
                c.guest("io", to).filter(|g| {
                    disk(g)["flushed_gen"].as_u64() > disk(&before)["flushed_gen"].as_u64()
                        && disk(g)["verified"].as_u64() > disk(&before)["verified"].as_u64()
                })
            },
        );
        assert_eq!(g["status"]["mismatches"], json!(0), "{g}");
        assert_eq!(disk(&g)["mismatches"], json!(0), "{g}");
        assert_eq!(disk(&g)["io_errors"], json!(0), "{g}");
    }
    c.assert_single_owners();
    // Two moves later the lease is at epoch 2, host 1: a VMM under epoch 1 is refused before
    // it opens the disk, and so is one for another host.
    let dir = c.datastore.join("vms").join("io");
    let lease: Value = serde_json::from_slice(&std::fs::read(dir.join("lease")).unwrap()).unwrap();
    assert_eq!(lease, json!({"owner": 1, "epoch": 2}));
    for (owner, epoch, why) in [("1", "1", "stale epoch"), ("2", "2", "not this host")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["vmm", "--name", "io", "--no-detach", "--memory", "64M"])
            .args(["--workload", "wss=8M", "--owner", owner, "--epoch", epoch])
            .arg("--run-dir")
            .arg(c.dir.path().join(format!("stale-{owner}")))
            .arg("--lease")
            .arg(dir.join("lease"))
            .arg("--disk")
            .arg(dir.join("disk.img"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{err}");
    }
    // The VM itself never noticed.
    let g = c.guest("io", 1).unwrap();
    assert_eq!(disk(&g)["mismatches"], json!(0), "{g}");
}
