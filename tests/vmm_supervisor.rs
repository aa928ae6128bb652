//! End-to-end: the node's VMM supervisor with real `tern vmm` processes on real KVM.
mod support;
use support::{kvm_or_skip, wait_for};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tern_hypervisor::vmm::lease::{self, Lease};
use tern_hypervisor::vmm::rundir;
use tern_hypervisor::vmm::{VmSpec, VmmState};
use tern_node::supervisor::{Launch, Supervisor, WATCH_EVERY};

fn spec(name: &str) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_mib: 128,
        vcpus: 1,
        workload: "wss=16M,rate=5000,pattern=random,duty=50".into(),
        disk: None,
    }
}

fn launch(name: &str, epoch: u64, lease: &Path) -> Launch {
    Launch {
        spec: spec(name),
        epoch,
        lease: Some(lease.to_path_buf()),
        receive: false,
    }
}

/// Kills every VMM a test started, whatever happens to the test.
struct Reaper(Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if rundir::alive(pid) {
                let _ = rundir::signal(pid, true);
            }
        }
    }
}

fn pages(sup: &Supervisor, name: &str) -> u64 {
    sup.client(name)
        .unwrap()
        .status()
        .unwrap()
        .guest
        .map_or(0, |g| g.pages_written)
}

#[test]
fn supervisor_starts_readopts_and_notices_a_dead_vmm() {
    if !kvm_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let leases: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|n| tmp.path().join(format!("{n}.lease")))
        .collect();
    for l in &leases {
        lease::write(l, Lease { owner: 1, epoch: 2 }).unwrap();
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tern"));
    let first = Supervisor::new(&data, bin.clone(), 1);
    let pa = first.start(&launch("a", 2, &leases[0])).unwrap();
    let _reap_a = Reaper(vec![pa]);
    let pb = first.start(&launch("b", 2, &leases[1])).unwrap();
    let _reap_b = Reaper(vec![pb]);
    assert!(first.start(&launch("a", 2, &leases[0])).is_err());

    // A VMM under a stale epoch refuses to start, and says why.
    let e = first.start(&launch("c", 1, &leases[0])).unwrap_err();
    assert!(format!("{e:#}").contains("stale epoch"), "{e:#}");

    // The node "restarts": a new supervisor finds both VMMs running, untouched.
    drop(first);
    let sup = Supervisor::new(&data, bin, 1);
    let mut found = sup.adopt_all();
    found.sort_by(|x, y| x.name.cmp(&y.name));
    let seen: Vec<(&str, u32, VmmState, u64)> = found
        .iter()
        .map(|s| (s.name.as_str(), s.pid, s.state, s.epoch))
        .collect();
    assert_eq!(
        seen,
        [
            ("a", pa, VmmState::Running, 2),
            ("b", pb, VmmState::Running, 2)
        ]
    );
    let before_b = wait_for("b's guest to run", Duration::from_secs(20), || {
        Some(pages(&sup, "b")).filter(|&n| n > 0)
    });

    // kill -9 of one VMM: the watcher reports it as a crash (no exit record); b runs on.
    rundir::signal(pa, true).unwrap();
    let killed = Instant::now();
    let death = wait_for("the death to be noticed", Duration::from_secs(10), || {
        std::thread::sleep(WATCH_EVERY);
        sup.reap().into_iter().next()
    });
    let noticed = killed.elapsed();
    assert_eq!(
        (death.name.as_str(), death.pid, death.exit),
        ("a", pa, None)
    );
    assert!(
        noticed < Duration::from_secs(2),
        "noticed after {noticed:?}"
    );
    assert_eq!(sup.names(), ["b"]);
    wait_for("b to keep running", Duration::from_secs(20), || {
        Some(()).filter(|_| pages(&sup, "b") > before_b)
    });

    // A clean stop leaves an exit record and no socket.
    sup.stop("b").unwrap();
    let dir = sup.run_dir("b").unwrap();
    let exit = rundir::read_exit(&dir).unwrap();
    assert_eq!((exit.pid, exit.state), (pb, VmmState::Stopped));
    assert!(!dir.join(rundir::SOCKET).exists());
    assert!(sup.names().is_empty());
}
