//! `tern drs` end to end: the real binary on a generated snapshot.
use std::path::PathBuf;
use std::process::{Command, Output};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("tern-drs-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tern(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .expect("run tern")
}

fn stdout_json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

#[test]
fn example_plan_evacuate_rank() {
    let dir = TempDir::new("main");
    let snap = dir.0.join("snap.json");
    let s = snap.to_str().expect("utf-8 path");
    let out = tern(&[
        "drs", "example", "--hosts", "16", "--vms", "1200", "--seed", "7", "--out", s,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&snap).expect("written")).expect("json");
    assert_eq!(doc["hosts"].as_array().expect("hosts").len(), 16);
    assert_eq!(doc["vms"].as_array().expect("vms").len(), 1200);

    let plan = stdout_json(&tern(&["drs", "plan", s, "--threshold", "5", "--json"]));
    let before = plan["imbalance_before"].as_f64().expect("before");
    let after = plan["imbalance_after"].as_f64().expect("after");
    let moves = plan["moves"].as_array().expect("moves");
    assert!(!moves.is_empty(), "the example is imbalanced: {plan}");
    assert!(after < before, "{before} -> {after}");
    for m in moves {
        for key in ["vm", "from", "to", "reason"] {
            assert!(
                m[key].as_str().is_some_and(|v| !v.is_empty()),
                "{key} in {m}"
            );
        }
        let p = m["priority"].as_u64().expect("priority");
        assert!((1..=5).contains(&p));
    }

    // Threshold 1: mandatory moves only, so no balancing moves.
    let strict = stdout_json(&tern(&["drs", "plan", s, "--threshold", "1", "--json"]));
    assert!(strict["moves"]
        .as_array()
        .expect("moves")
        .iter()
        .all(|m| m["priority"] == 1));

    let human = tern(&["drs", "plan", s]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(human.status.success());
    assert!(
        text.contains("imbalance")
            && text
                .lines()
                .any(|l| l.starts_with("VM ") && l.contains("REASON")),
        "{text}"
    );

    let host = doc["hosts"][0]["id"].as_str().expect("id").to_string();
    let on_host = doc["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .filter(|v| v["host"] == host.as_str())
        .count();
    let ev = stdout_json(&tern(&["drs", "evacuate", s, "--host", &host, "--json"]));
    let moved = ev["moves"].as_array().expect("moves").len();
    let stuck = ev["stuck"].as_array().expect("stuck").len();
    assert_eq!(moved + stuck, on_host);
    assert!(moved > 0);

    let vm = doc["vms"][3]["id"].as_str().expect("id").to_string();
    let rank = stdout_json(&tern(&["drs", "rank", s, "--vm", &vm, "--json"]));
    let n = rank["candidates"].as_array().expect("c").len()
        + rank["excluded"].as_array().expect("e").len();
    assert_eq!(n, 16);
    let human = tern(&["drs", "rank", s, "--vm", &vm]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("SCORE"));
}

#[test]
fn bad_snapshots_and_requests_fail_clearly() {
    let dir = TempDir::new("bad");
    let dup = dir.0.join("dup.json");
    std::fs::write(
        &dup,
        r#"{"hosts":[{"id":"a","cpu_mhz":1,"memory_mib":1},{"id":"a","cpu_mhz":1,"memory_mib":1}],"vms":[]}"#,
    )
    .expect("write");
    let out = tern(&["drs", "plan", dup.to_str().expect("path")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("duplicate host id \"a\""), "{err}");

    let broken = dir.0.join("broken.json");
    std::fs::write(&broken, "{\"hosts\": [\n  {\"id\": \"a\",,}\n]}").expect("write");
    let out = tern(&["drs", "plan", broken.to_str().expect("path"), "--json"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2"), "{err}");

    let ok = dir.0.join("ok.json");
    std::fs::write(
        &ok,
        r#"{"hosts":[{"id":"a","cpu_mhz":1000,"memory_mib":1000}],"vms":[]}"#,
    )
    .expect("write");
    let out = tern(&[
        "drs",
        "evacuate",
        ok.to_str().expect("path"),
        "--host",
        "nope",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown host id \"nope\""));
    let out = tern(&["drs", "rank", ok.to_str().expect("path"), "--vm", "ghost"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown vm id \"ghost\""));
    let out = tern(&[
        "drs",
        "plan",
        ok.to_str().expect("path"),
        "--threshold",
        "9",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("threshold must be 1..5"));
}
