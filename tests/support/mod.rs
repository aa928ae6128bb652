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
