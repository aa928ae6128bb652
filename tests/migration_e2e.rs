//! Live migration between two real `tern` processes on loopback, with the real test guest.
mod support;
use support::kvm_or_skip;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// Kills the child by PID when dropped.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tern(args: &[&str]) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tern"),
    )
}

/// Start `tern vm receive` on a free port; returns the process, its address and its stdout.
fn receiver(extra: &[&str]) -> (Proc, String, BufReader<ChildStdout>) {
    let mut args = vec![
        "vm",
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--json",
        "--accept-timeout",
        "60s",
    ];
    args.extend_from_slice(extra);
    let mut p = tern(&args);
    let mut out = BufReader::new(p.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert_eq!(v["event"], "listening", "{line}");
    let addr = v["addr"].as_str().unwrap().to_string();
    (p, addr, out)
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn find<'a>(lines: &'a [Value], key: &str) -> Option<&'a Value> {
    lines
        .iter()
        .find(|v| v.get("event").and_then(Value::as_str) == Some(key) || v.get(key).is_some())
}

fn finish(mut p: Proc, mut rest: Option<BufReader<ChildStdout>>) -> (bool, String, String) {
    let mut out = String::new();
    if let Some(r) = rest.as_mut() {
        std::io::Read::read_to_string(r, &mut out).unwrap();
    }
    let o = std::mem::replace(&mut p.0, Command::new("true").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    out.push_str(&String::from_utf8_lossy(&o.stdout));
    (
        o.status.success(),
        out,
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn guest_migrates_between_processes_and_keeps_verifying() {
    if !kvm_or_skip() {
        return;
    }
    let (dest, addr, dest_out) = receiver(&["--for", "2s"]);
    let src = tern(&[
        "vm",
        "run",
        "--memory",
        "256M",
        "--workload",
        "wss=64M,rate=20000,pattern=random",
        "--for",
        "30s",
        "--migrate-to",
        &addr,
        "--migrate-after",
        "1s",
        "--verify-memory",
        "--json",
    ]);
    let (ok, out, err) = finish(src, None);
    assert!(ok, "source failed: {err}\n{out}");
    let lines = json_lines(&out);
    let m = find(&lines, "migrated").unwrap_or_else(|| panic!("no stats: {out}"));
    // The source only reports success after the destination's hash matched its own.
    assert!(m["memory_hash"].is_string(), "{m}");
    assert!(m["untouched_pages"].as_u64().unwrap() > 0, "{m}");
    let at_switch = lines
        .iter()
        .filter_map(|v| v["status"]["pages_written"].as_u64())
        .max()
        .unwrap_or(0);

    let (ok, out, err) = finish(dest, Some(dest_out));
    assert!(ok, "destination failed: {err}\n{out}");
    let lines = json_lines(&out);
    let s = &find(&lines, "summary").unwrap_or_else(|| panic!("no summary: {out}"))["summary"];
    assert_eq!(s["mismatches"], 0, "{s}");
    assert!(
        s["pages_written"].as_u64().unwrap() > at_switch,
        "counter must continue: {s} vs {at_switch}"
    );
    assert!(s["pages_verified"].as_u64().unwrap() > 0, "{s}");
}

#[test]
fn destination_killed_mid_copy_leaves_source_running() {
    if !kvm_or_skip() {
        return;
    }
    let (mut dest, addr, _out) = receiver(&[]);
    let src = tern(&[
        "vm",
        "run",
        "--memory",
        "512M",
        "--workload",
        "wss=256M,rate=0,pattern=seq",
        "--for",
        "8s",
        "--migrate-to",
        &addr,
        "--migrate-after",
        "3s",
        "--bandwidth",
        "2",
        "--json",
    ]);
    std::thread::sleep(Duration::from_millis(4500));
    dest.0.kill().unwrap();
    let (ok, out, err) = finish(src, None);
    assert!(!ok, "the migration cannot have succeeded: {out}");
    assert!(err.contains("keeps running here"), "{err}");
    let lines = json_lines(&out);
    let failed = find(&lines, "migration_failed").unwrap_or_else(|| panic!("{out}"));
    assert!(
        failed["error"].as_str().unwrap().contains("failed"),
        "{failed}"
    );
    let s = &find(&lines, "summary").unwrap_or_else(|| panic!("{out}"))["summary"];
    assert_eq!(s["mismatches"], 0, "{s}");
    assert!(
        s["elapsed_s"].as_f64().unwrap() > 7.0,
        "the source kept running to the end: {s}"
    );
    assert!(s["vm_error"].is_null(), "{s}");
}

#[test]
fn hostile_connections_are_refused_and_migration_still_works() {
    if !kvm_or_skip() {
        return;
    }
    let (dest, addr, dest_out) = receiver(&["--for", "1s"]);
    // A hostile length, a wrong magic, and a truncated frame: each connection is dropped.
    let mut hostile = vec![0x54, 0x52, 0x4E, 0x4D, 1, 0, 0, 0];
    hostile.extend_from_slice(&u32::MAX.to_le_bytes());
    hostile.extend_from_slice(&[0; 4]);
    for bytes in [
        hostile,
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        vec![0x54, 0x52, 0x4E],
    ] {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&bytes).unwrap();
    }
    let src = tern(&[
        "vm",
        "run",
        "--memory",
        "128M",
        "--workload",
        "wss=32M,rate=10000",
        "--for",
        "20s",
        "--migrate-to",
        &addr,
        "--migrate-after",
        "500ms",
        "--json",
    ]);
    let (ok, out, err) = finish(src, None);
    assert!(ok, "{err}\n{out}");
    let (ok, out, err) = finish(dest, Some(dest_out));
    assert!(ok, "{err}\n{out}");
    assert!(find(&json_lines(&out), "received").is_some(), "{out}");
}

#[test]
fn fast_dirtier_converges_through_throttling() {
    if !kvm_or_skip() {
        return;
    }
    let (dest, addr, dest_out) = receiver(&["--for", "1s"]);
    // The guest dirties 64 MiB as fast as it can; the link is capped at 64 MiB/s.
    let src = tern(&[
        "vm",
        "run",
        "--memory",
        "256M",
        "--workload",
        "wss=64M,rate=0,pattern=random",
        "--for",
        "60s",
        "--migrate-to",
        &addr,
        "--migrate-after",
        "1s",
        "--bandwidth",
        "64",
        "--downtime-target",
        "20",
        "--json",
    ]);
    let (ok, out, err) = finish(src, None);
    assert!(ok, "{err}\n{out}");
    let lines = json_lines(&out);
    let m = find(&lines, "migrated").unwrap_or_else(|| panic!("{out}"));
    assert!(m["max_throttle"].as_u64().unwrap() > 0, "{m}");
    let (ok, out, err) = finish(dest, Some(dest_out));
    assert!(ok, "{err}\n{out}");
    let lines = json_lines(&out);
    let s = &find(&lines, "summary").unwrap()["summary"];
    assert_eq!(s["mismatches"], 0, "{s}");
}

#[test]
fn cancelled_migration_leaves_source_running_and_destination_gives_up() {
    if !kvm_or_skip() {
        return;
    }
    let (dest, addr, dest_out) = receiver(&["--for", "1s"]);
    // 128 MiB at 4 MiB/s cannot finish before the deadline cancels it.
    let src = tern(&[
        "vm",
        "run",
        "--memory",
        "256M",
        "--workload",
        "wss=128M,rate=5000,pattern=seq",
        "--for",
        "5s",
        "--migrate-to",
        &addr,
        "--migrate-after",
        "1s",
        "--bandwidth",
        "4",
        "--migrate-deadline",
        "1500ms",
        "--json",
    ]);
    let (ok, out, err) = finish(src, None);
    assert!(!ok, "a cancelled migration must fail: {out}");
    assert!(err.contains("keeps running here"), "{err}");
    let lines = json_lines(&out);
    let failed_at = lines
        .iter()
        .position(|v| v["event"] == "migration_failed")
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        lines[failed_at]["error"]
            .as_str()
            .unwrap()
            .contains("cancelled"),
        "{}",
        lines[failed_at]
    );
    assert!(find(&lines, "migrated").is_none(), "{out}");
    // The guest kept running (and writing) on the source after the cancel.
    let written = |v: &Value| v["status"]["pages_written"].as_u64();
    let before = lines[..failed_at]
        .iter()
        .filter_map(written)
        .max()
        .unwrap_or(0);
    let after = lines[failed_at..]
        .iter()
        .filter_map(written)
        .max()
        .unwrap_or(0);
    assert!(
        after > before,
        "no progress after the cancel: {before} -> {after}"
    );
    let s = &find(&lines, "summary").unwrap_or_else(|| panic!("{out}"))["summary"];
    assert_eq!(s["mismatches"], 0, "{s}");
    assert!(s["vm_error"].is_null(), "{s}");
    assert!(s["elapsed_s"].as_f64().unwrap() > 4.5, "{s}");
    // The destination learned of the abort, dropped its VM and failed.
    let (ok, out, err) = finish(dest, Some(dest_out));
    assert!(!ok, "the destination cannot have a VM: {out}");
    assert!(err.contains("cancelled"), "{err}");
    assert!(find(&json_lines(&out), "received").is_none(), "{out}");
}
