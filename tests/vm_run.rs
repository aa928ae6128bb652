//! End-to-end: the real `tern vm run` binary on this host's /dev/kvm.
mod support;
use support::kvm_or_skip;

use std::process::Command;

fn tern(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .expect("run tern")
}

#[test]
fn vm_run_json_shows_progress_and_no_mismatches() {
    if !kvm_or_skip() {
        return;
    }
    let out = tern(&[
        "vm",
        "run",
        "--memory",
        "256M",
        "--vcpus",
        "2",
        "--workload",
        "wss=32M,rate=20000,pattern=random,duty=50",
        "--for",
        "3s",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert!(lines.len() >= 3, "{stdout}");
    let progress = &lines[lines.len() - 2];
    assert!(progress["pages_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(progress["status"]["vcpus_running"], 2);
    let summary = &lines[lines.len() - 1]["summary"];
    assert!(summary["pages_written"].as_u64().unwrap() > 0);
    assert!(summary["pages_verified"].as_u64().unwrap() > 0);
    assert_eq!(summary["mismatches"], 0);
    assert!(summary["boot_to_progress_ms"].as_f64().is_some());
}

#[test]
fn vm_run_defaults_work_and_sigterm_ends_with_a_summary() {
    if !kvm_or_skip() {
        return;
    }
    let child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["vm", "run"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tern");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    // SIGTERM by PID, like Ctrl-C: the run ends early with its summary.
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("pages/s"), "{stdout}");
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("summary:") && summary.contains(" 0 mismatches"),
        "{stdout}"
    );
}

#[test]
fn vm_run_rejects_bad_input_clearly() {
    let dir = std::env::temp_dir().join(format!("tern-vm-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.img");
    std::fs::write(&junk, b"this is not a multiboot image").unwrap();
    let junk = junk.to_string_lossy().into_owned();
    let cases: &[(&[&str], &str)] = &[
        (&["--workload", "wss=64M,speed=3"], "unknown key"),
        (&["--workload", "duty=0"], "duty"),
        (&["--workload", "wss=1G"], "needs at least"),
        (&["--memory", "64T"], "--memory"),
        (&["--memory", "16G"], "outside the supported"),
        (&["--vcpus", "0"], "vCPUs"),
        (&["--for", "soon"], "--for"),
        (&["--image", "/nonexistent/image"], "cannot read"),
        (&["--image", &junk], "multiboot"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["vm", "run", "--for", "1s"];
        all.extend_from_slice(args);
        let out = tern(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        if stderr.contains("/dev/kvm") {
            continue; // no KVM here: the checks that need a VM cannot run
        }
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
