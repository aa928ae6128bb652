//! The VM's virtio-blk disk end to end with real `tern` processes: `kill -9` of the VM
//! process after flushes loses nothing (the host checks the file, the cold-booted guest
//! checks it again), and live migration between two processes sharing the image keeps the
//! guest's disk I/O going with zero memory and zero disk mismatches.
mod support;
use support::kvm_or_skip;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_hypervisor::disk_workload::check_image;

const DISK_WORKLOAD: u64 = 16 << 20;

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

fn finish(p: Proc) -> (bool, Vec<Value>, String) {
    let mut p = p;
    let child = std::mem::replace(&mut p.0, Command::new("true").spawn().unwrap());
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (
        o.status.success(),
        lines,
        format!("{out}\n{}", String::from_utf8_lossy(&o.stderr)),
    )
}

fn summary(lines: &[Value]) -> &Value {
    &lines
        .iter()
        .find(|v| v.get("summary").is_some())
        .expect("a summary line")["summary"]
}

const WORKLOAD: &str = "wss=16M,rate=5000,pattern=random,disk=16M,iops=0,dflush=8";

#[test]
fn kill_9_after_flushes_loses_no_flushed_block() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let img_s = img.to_str().unwrap();
    let mut vm = tern(&[
        "vm",
        "run",
        "--memory",
        "64M",
        "--workload",
        WORKLOAD,
        "--disk",
        img_s,
        "--disk-size",
        "32M",
        "--for",
        "0",
        "--json",
    ]);
    // Read progress lines until the guest reports flushed generations, then kill -9.
    let mut out = BufReader::new(vm.0.stdout.take().unwrap());
    let start = Instant::now();
    let mut flushed = 0;
    let mut line = String::new();
    while flushed < 10 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no disk progress"
        );
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "vm run ended early");
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        let d = &v["status"]["disk"];
        assert_eq!(d["mismatches"], 0, "{line}");
        assert_eq!(d["io_errors"], 0, "{line}");
        flushed = d["flushed_gen"].as_u64().unwrap_or(0);
    }
    vm.0.kill().unwrap(); // SIGKILL
    vm.0.wait().unwrap();

    // Every generation the guest saw flushed is in the file, every named block intact.
    let c = check_image(&img, DISK_WORKLOAD).unwrap();
    assert!(c.flushed_gen >= flushed, "{c:?}, guest saw {flushed}");
    assert!(c.blocks_checked > 0);
    assert_eq!(c.mismatches, 0, "{c:?}");

    // A cold boot on the same file: the guest verifies the previous boot's blocks first.
    let (ok, lines, text) = finish(tern(&[
        "vm",
        "run",
        "--memory",
        "64M",
        "--workload",
        WORKLOAD,
        "--disk",
        img_s,
        "--for",
        "3s",
        "--json",
    ]));
    assert!(ok, "cold boot failed: {text}");
    let d = &summary(&lines)["disk"];
    assert_eq!(d["boot_verified"].as_u64(), Some(c.blocks_checked), "{d}");
    assert_eq!(d["mismatches"], 0, "{d}");
    assert!(d["flushed_gen"].as_u64().unwrap() > c.flushed_gen, "{d}");
}

#[test]
fn live_migration_with_disk_io_between_processes() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let img_s = img.to_str().unwrap();
    tern_hypervisor::devices::virtio::blk::create_image(&img, 32 << 20).unwrap();
    let mut dest = tern(&[
        "vm",
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--json",
        "--accept-timeout",
        "60s",
        "--for",
        "2s",
        "--disk",
        img_s,
    ]);
    let mut dest_out = BufReader::new(dest.0.stdout.take().unwrap());
    let mut line = String::new();
    dest_out.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    let addr = v["addr"].as_str().unwrap().to_string();

    let (ok, lines, text) = finish(tern(&[
        "vm",
        "run",
        "--memory",
        "64M",
        "--workload",
        WORKLOAD,
        "--disk",
        img_s,
        "--for",
        "30s",
        "--migrate-to",
        &addr,
        "--migrate-after",
        "1500ms",
        "--verify-memory",
        "--json",
    ]));
    assert!(ok, "source failed: {text}");
    let m = lines
        .iter()
        .find(|v| v["event"] == "migrated")
        .unwrap_or_else(|| panic!("no stats: {text}"));
    assert!(
        m["memory_hash"].is_string(),
        "memory identical at switchover: {m}"
    );
    let src_disk = |k: &str| {
        lines
            .iter()
            .filter_map(|v| v["status"]["disk"][k].as_u64())
            .max()
            .unwrap_or(0)
    };
    assert!(
        src_disk("flushed_gen") > 0,
        "disk I/O ran before the migration: {text}"
    );
    assert_eq!(src_disk("io_errors"), 0);

    let mut rest = String::new();
    std::io::Read::read_to_string(&mut dest_out, &mut rest).unwrap();
    let (ok, _, dtext) = finish(dest);
    assert!(ok, "destination failed: {dtext}\n{rest}");
    let dlines: Vec<Value> = rest
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let s = summary(&dlines);
    assert_eq!(s["mismatches"], 0, "{s}");
    let d = &s["disk"];
    assert_eq!(d["mismatches"], 0, "{d}");
    assert_eq!(d["io_errors"], 0, "{d}");
    // The restored device keeps serving: generations continue past the source's.
    assert!(
        d["flushed_gen"].as_u64().unwrap() > src_disk("flushed_gen"),
        "{d} vs source {}",
        src_disk("flushed_gen")
    );
    assert_eq!(check_image(&img, DISK_WORKLOAD).unwrap().mismatches, 0);
}
