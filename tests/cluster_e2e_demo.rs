//! `tern demo --json` end to end: three real nodes, nine real guests, DRS, an operator's
//! migration, a scheduled one and a maintenance evacuation; the summary must show every kind of
//! task, no failures, no guest mismatches and no VM running on two hosts.
use std::process::Command;

use serde_json::Value;

#[test]
fn demo_json_summary_shows_a_balanced_verified_cluster() {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("SKIP: no /dev/kvm");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["demo", "--json"])
        .output()
        .expect("running tern demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_str(&stdout).expect("demo --json prints one JSON summary");
    assert_eq!(s["ok"], Value::Bool(true), "{s}");
    assert_eq!(s["vms"], 9);
    assert_eq!(s["failed"], 0, "{s}");
    assert_eq!(s["guest_mismatches"], 0, "{s}");
    assert_eq!(s["double_runs"], 0, "{s}");
    assert!(
        s["problems"].as_array().is_some_and(|p| p.is_empty()),
        "{s}"
    );
    for reason in ["drs", "manual", "scheduled", "maintenance"] {
        assert!(
            s["by_reason"][reason].as_u64().unwrap_or(0) >= 1,
            "no {reason} migration: {s}"
        );
    }
    let migrations = s["migrations"].as_u64().unwrap_or(0);
    assert!(migrations >= 4, "{s}");
    assert!(
        s["imbalance_after"].as_f64() < s["imbalance_before"].as_f64(),
        "DRS did not reduce imbalance: {s}"
    );
    assert!(s["guests_verified_pages"].as_u64().unwrap_or(0) > 0, "{s}");
    // Live migration: each switchover is short, far below a reboot.
    assert!(
        s["max_downtime_ms"].as_f64().unwrap_or(f64::MAX) < 2000.0,
        "{s}"
    );
}
