//! Pools enforced by the host's cgroups, on real VMs (`tern vm run` processes on /dev/kvm):
//! CPU shares 1:3 between two pools split one core 25 % / 75 %, and a pool CPU limit of 20 %
//! holds, measured as vCPU-thread time from /proc/PID/task/TID/schedstat.
mod support;
use support::kvm_or_skip;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_node::cgroup::{Cgroups, NodeWeight, PoolLimits, VmCgroup};

/// How long vCPU time is measured.
const WINDOW: Duration = Duration::from_secs(10);

/// Test VMs and their cgroups: on drop (also when the test fails) the VMs are killed and
/// reaped, then their cgroups removed.
struct Vms(Vec<(Child, Option<VmCgroup>)>);

impl Drop for Vms {
    fn drop(&mut self) {
        for (child, cg) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
            if let Some(cg) = cg.take() {
                if let Err(e) = cg.release() {
                    eprintln!("releasing a test cgroup: {e}");
                }
            }
        }
    }
}

/// A CPU-busy guest pinned to host CPU `cpu`.
fn spawn_busy_vm(cpu: usize) -> Child {
    Command::new("taskset")
        .args(["-c", &cpu.to_string(), env!("CARGO_BIN_EXE_tern")])
        .args(["vm", "run", "--memory", "64M", "--vcpus", "1"])
        .args(["--workload", "wss=4M,rate=0,duty=100", "--for", "120s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn taskset tern vm run")
}

/// The thread id of the VM process's vCPU 0, once it exists.
fn vcpu_tid(pid: u32) -> Option<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "vcpu0"))
        .and_then(|t| t.file_name().to_str()?.parse().ok())
}

/// Time the thread has spent on a CPU so far.
fn on_cpu(pid: u32, tid: u32) -> Duration {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
        .expect("read schedstat");
    let ns = text
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .expect("schedstat run time");
    Duration::from_nanos(ns)
}

fn limits(pool: &str, shares: u32, cpu_limit_percent: Option<f64>) -> PoolLimits {
    PoolLimits {
        pool: pool.into(),
        shares,
        cpu_limit_percent,
        memory_limit_mib: Some(512),
    }
}

#[test]
fn pool_shares_split_a_core_and_a_cpu_limit_holds() {
    if !kvm_or_skip() {
        return;
    }
    // Other work on this machine must not decide the outcome: tern's VMs get a high weight
    // against everything else (the shares and the limit are then what the pools get).
    let node = format!("test-{}", std::process::id());
    let cgroups = Cgroups::open(&node, NodeWeight::Fixed(1_000_000)).expect("open tern's cgroups");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let limit_cpu = cpus - 1;
    let mut vms = Vms(Vec::new());
    let plan = [
        ("low", limits("low", 4000, None), 0),
        ("high", limits("high", 12_000, None), 0),
        ("capped", limits("capped", 4000, Some(20.0)), limit_cpu),
    ];
    for (vm, l, cpu) in &plan {
        let child = spawn_busy_vm(*cpu);
        let pid = child.id();
        vms.0.push((child, None));
        let cg = cgroups.place(vm, pid, 1, l).expect("place the VM process");
        vms.0.last_mut().expect("just pushed").1 = Some(cg);
    }
    let pids: Vec<u32> = vms.0.iter().map(|(c, _)| c.id()).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let tids: Vec<u32> = pids
        .iter()
        .map(|&pid| loop {
            if let Some(t) = vcpu_tid(pid) {
                break t;
            }
            assert!(Instant::now() < deadline, "VM {pid} started no vCPU");
            std::thread::sleep(Duration::from_millis(50));
        })
        .collect();
    // Let the guests reach their busy loop.
    std::thread::sleep(Duration::from_secs(1));
    let before: Vec<Duration> = pids
        .iter()
        .zip(&tids)
        .map(|(p, t)| on_cpu(*p, *t))
        .collect();
    let started = Instant::now();
    std::thread::sleep(WINDOW);
    let after: Vec<Duration> = pids
        .iter()
        .zip(&tids)
        .map(|(p, t)| on_cpu(*p, *t))
        .collect();
    let wall = started.elapsed().as_secs_f64();
    let used: Vec<f64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| (*a - *b).as_secs_f64())
        .collect();
    for (i, (child, _)) in vms.0.iter_mut().enumerate() {
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "VM {} exited early",
            plan[i].0
        );
    }
    let low_share = used[0] / (used[0] + used[1]) * 100.0;
    let capped = used[2] / wall * 100.0;
    println!(
        "low {:.2}s high {:.2}s: low gets {low_share:.1} % of the core; capped at 20 %: {capped:.1} %",
        used[0], used[1]
    );
    assert!(
        (15.0..=35.0).contains(&low_share),
        "shares 1:3 should give 25 % / 75 % (within 10 points), low got {low_share:.1} %"
    );
    assert!(
        (15.0..=25.0).contains(&capped),
        "a 20 % CPU limit should hold within 5 points, got {capped:.1} %"
    );
}
