//! The control plane never loses or corrupts the truth: real `tern node` processes.
mod cluster_e2e_harness;
mod support;

use std::time::{Duration, Instant};

use cluster_e2e_harness::*;
use serde_json::json;

/// Racing creates of one VM name through different nodes: exactly one wins, and the losers'
/// clean-up never removes the winner's datastore files (it used to, 2 tries in 5).
#[test]
fn cluster_racing_creates_of_one_name_leave_one_vm_with_its_files() {
    let c = Cluster::start(3, &[]);
    for round in 0..5 {
        let name = format!("race{round}");
        let racers: Vec<_> = (0..6u64)
            .map(|i| {
                let addr = c.addr(1 + i % 3);
                let name = name.clone();
                std::thread::spawn(move || {
                    let body = json!({
                        "name": name,
                        "memory_mib": 64 + 2 * i,
                        "vcpus": 1,
                        "workload": "wss=4M",
                        "host": 1 + i % 3,
                        "disk_mib": 64,
                    });
                    (i, post(&addr, "/v1/vms", &body))
                })
            })
            .collect();
        let results: Vec<(u64, (u16, serde_json::Value))> =
            racers.into_iter().map(|t| t.join().unwrap()).collect();
        let winners: Vec<u64> = results
            .iter()
            .filter(|(_, (status, _))| *status == 200)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        for (i, (status, body)) in &results {
            if *i != winners[0] {
                assert_eq!(*status, 409, "round {round} racer {i}: {body}");
            }
        }
        let winner = winners[0];
        let state = c.state();
        let vm = &state["vms"][&name];
        assert_eq!(vm["spec"]["memory_mib"], json!(64 + 2 * winner), "{vm}");
        assert_eq!(vm["owner"], json!(1 + winner % 3));
        // The winner's files are intact: its config, and its whole disk file.
        let dir = c.datastore.join("vms").join(&name);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["memory_mib"], json!(64 + 2 * winner));
        let disk = std::fs::metadata(dir.join("disk.img")).expect("disk.img");
        assert_eq!(disk.len(), 64 << 20);
    }
    let vms = c.state()["vms"].as_object().unwrap().len();
    assert_eq!(vms, 5);
    for round in 0..5 {
        let (status, body) = post(
            &c.live(),
            &format!("/v1/vms/race{round}/destroy"),
            &json!({}),
        );
        assert_eq!(status, 200, "{body}");
    }
}

fn host_state(c: &Cluster, id: u64) -> Option<String> {
    let s = get(&c.live(), "/v1/state")?;
    s["hosts"][id.to_string()]["state"]
        .as_str()
        .map(str::to_string)
}

/// kill -9 of a node: the leader marks its host not-responding after three missed load reports,
/// then down after `--host-down-after-ms`; no VM is placed on it; restarted, it is connected.
#[test]
fn cluster_killed_host_goes_not_responding_then_down_and_returns() {
    let c = &mut Cluster::start(
        3,
        &["--load-interval-ms", "300", "--host-down-after-ms", "3000"],
    );
    wait_for("host 3 connected", Duration::from_secs(10), || {
        (host_state(c, 3)? == "connected").then_some(())
    });
    let killed = Instant::now();
    c.node(3).kill();
    wait_for("host 3 not-responding", Duration::from_secs(10), || {
        (host_state(c, 3)? == "not-responding").then_some(())
    });
    let not_responding = killed.elapsed();
    wait_for("host 3 down", Duration::from_secs(15), || {
        (host_state(c, 3)? == "down").then_some(())
    });
    let down = killed.elapsed();
    // The last report may have left up to one interval (300 ms) before the kill.
    assert!(
        not_responding >= Duration::from_millis(600) && not_responding < down,
        "{not_responding:?}"
    );
    assert!(
        down >= Duration::from_millis(2700) && down < Duration::from_secs(10),
        "{down:?}"
    );
    // A down host takes no new VM.
    let body = json!({"name": "late", "memory_mib": 64, "vcpus": 1, "workload": "wss=4M",
                      "host": 3});
    let (status, reply) = post(&c.live(), "/v1/vms", &body);
    assert_eq!(status, 409, "{reply}");
    assert!(reply.to_string().contains("down"), "{reply}");
    // The audit trail names the changes.
    let audit = c.state()["audit"].to_string();
    assert!(audit.contains("set host 3 state Down"), "{audit}");
    // Back: connected again.
    c.start_node(3, None);
    wait_for("host 3 connected again", Duration::from_secs(15), || {
        (host_state(c, 3)? == "connected").then_some(())
    });
}
