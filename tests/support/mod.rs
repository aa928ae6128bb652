//! Shared helpers for end-to-end tests (each test crate uses only some of them).
#![allow(dead_code)]

pub mod api;
pub mod proxy;
pub mod store;

use std::time::{Duration, Instant};

/// Whether this machine has a usable /dev/kvm; prints the SKIP line tests promise when not.
pub fn kvm_or_skip() -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        true
    } else {
        println!("SKIP: no /dev/kvm");
        false
    }
}

/// Poll `f` every 50 ms until it gives a value; fail the test after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The VMM processes a `tern node` with data directory `data` started (from their run
/// directories), each checked against its command line so that a reused pid is never touched.
pub fn vmm_pids(data: &std::path::Path) -> Vec<(String, u32)> {
    let Ok(dirs) = std::fs::read_dir(data.join("run").join("vms")) else {
        return Vec::new();
    };
    dirs.flatten()
        .filter_map(|d| {
            let pid: u32 = std::fs::read_to_string(d.path().join("pid"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let dir = d.path().to_string_lossy().to_string();
            let ours = String::from_utf8_lossy(&cmdline)
                .split('\0')
                .any(|a| a == dir);
            ours.then(|| (d.file_name().to_string_lossy().to_string(), pid))
        })
        .collect()
}

/// kill -9 every VMM a node with data directory `data` started.
pub fn kill_vmms(data: &std::path::Path) {
    for (_, pid) in vmm_pids(data) {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
}
