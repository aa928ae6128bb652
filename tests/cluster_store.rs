//! The control plane never loses or corrupts the truth: real `tern node` processes.
mod cluster_e2e_harness;
mod support;

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
