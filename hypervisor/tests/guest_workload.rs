//! Real-KVM tests with the built-in test guest: progress, pause, save/restore with identical
//! memory, two vCPUs, duty cycle, and a planted corruption the guest must catch.
mod common;
use common::*;
use std::time::{Duration, Instant};
use tern_hypervisor::{guest_image, GuestStatus, Vm, VmConfig, VmState, Workload, PAGE_SIZE};

const T: Duration = Duration::from_secs(30);
const WSS_BASE: u64 = 0x0100_0000;

fn boot(vcpus: usize, workload: &str) -> (Vm, Workload) {
    let w: Workload = workload.parse().unwrap();
    let mut vm = Vm::new(VmConfig {
        memory: 64 << 20,
        vcpus,
        serial_log: None,
    })
    .unwrap();
    vm.boot(guest_image::IMAGE, &w.cmdline()).unwrap();
    (vm, w)
}

fn status(vm: &Vm) -> GuestStatus {
    assert_eq!(vm.error(), None);
    let s = vm.guest_status().unwrap();
    assert_eq!(s.error, None, "guest error");
    s
}

fn wait_written(vm: &Vm, n: u64) -> GuestStatus {
    wait_for("guest progress", T, || {
        vm.guest_status().is_ok_and(|s| s.pages_written >= n)
    });
    status(vm)
}

#[test]
fn two_vcpus_make_verified_progress_and_pause_stops_them() {
    if !kvm_or_skip() {
        return;
    }
    let (mut vm, _) = boot(2, "wss=8M,rate=20000,pattern=random");
    let s = wait_written(&vm, 2000);
    assert_eq!(s.vcpus_running, 2, "both vCPUs run the workload");
    assert!(s.pages_verified > 0);
    assert_eq!(s.mismatches, 0);
    assert!(String::from_utf8_lossy(&vm.serial_output()).contains("tern-guest: running"));
    vm.pause().unwrap();
    let a = status(&vm);
    std::thread::sleep(Duration::from_millis(300));
    let b = status(&vm);
    assert_eq!(a.pages_written, b.pages_written, "progress while paused");
    assert_eq!(a.heartbeat, b.heartbeat);
    vm.resume().unwrap();
    wait_written(&vm, a.pages_written + 2000);
    // The pause is visible to the guest as a stall (its TSC kept running).
    assert!(status(&vm).max_stall_us().unwrap_or(0) >= 250_000);
}

#[test]
fn save_restore_continues_with_identical_memory() {
    if !kvm_or_skip() {
        return;
    }
    let (mut src, _) = boot(2, "wss=16M,rate=20000,pattern=random");
    wait_written(&src, 3000);
    src.pause().unwrap();
    let before = status(&src);
    let blob = src.save_state().unwrap().to_bytes().unwrap();

    let mut dst = Vm::new(VmConfig {
        memory: 64 << 20,
        vcpus: 2,
        serial_log: None,
    })
    .unwrap();
    // Copy only the pages the source ever touched, as a first migration pass would.
    let touched = src.memory().touched_bitmap().unwrap();
    let mut page = [0u8; PAGE_SIZE as usize];
    for p in 0..src.memory().page_count() {
        if touched[(p / 64) as usize] & (1 << (p % 64)) != 0 {
            src.memory().read_page(p, &mut page).unwrap();
            dst.memory().write_page(p, &page).unwrap();
        }
    }
    let state = VmState::from_bytes(&blob).unwrap();
    let pause = Duration::from_millis(300);
    std::thread::sleep(pause);
    dst.restore_state(&state).unwrap();
    let mut other = [0u8; PAGE_SIZE as usize];
    for p in 0..src.memory().page_count() {
        src.memory().read_page(p, &mut page).unwrap();
        dst.memory().read_page(p, &mut other).unwrap();
        assert!(page == other, "page {p} differs after restore");
    }
    src.shutdown();
    dst.resume().unwrap();
    let after = wait_written(&dst, before.pages_written + 3000);
    assert_eq!(after.mismatches, 0);
    assert!(after.pages_verified > before.pages_verified);
    assert_eq!(after.vcpus_running, 2);
    // The time spent saved shows up as a stall: the restored TSC = saved + elapsed.
    let stall = after.max_stall_us().unwrap();
    assert!(
        stall >= pause.as_micros() as u64 * 8 / 10,
        "stall {stall} us after a {pause:?} gap"
    );
}

#[test]
fn planted_corruption_is_detected() {
    if !kvm_or_skip() {
        return;
    }
    let (vm, w) = boot(1, "wss=4M,rate=1000,pattern=seq");
    wait_written(&vm, 200);
    let pages = w.wss / PAGE_SIZE;
    let gen_table = WSS_BASE + w.wss;
    let victim = (0..pages)
        .find(|&i| vm.memory().read_u32(gen_table + 4 * i).unwrap() != 0)
        .expect("a written page");
    let addr = WSS_BASE + victim * PAGE_SIZE + 8 * 17;
    let word = vm.memory().read_u64(addr).unwrap();
    vm.memory().write_u64(addr, !word).unwrap();
    wait_for("mismatch", T, || {
        vm.guest_status().is_ok_and(|s| s.mismatches > 0)
    });
    let s = vm.guest_status().unwrap();
    assert_eq!(s.first_mismatch, Some(victim));
}

#[test]
fn duty_cycle_is_honoured() {
    if !kvm_or_skip() {
        return;
    }
    let (vm, _) = boot(1, "wss=8M,rate=0,duty=30");
    wait_written(&vm, 1000);
    let (r0, w0) = vm.vcpu_sched_times()[0];
    let cpu0 = vm.vcpu_cpu_times()[0];
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let (r1, w1) = vm.vcpu_sched_times()[0];
    let cpu1 = vm.vcpu_cpu_times()[0];
    let wall = t0.elapsed().as_secs_f64();
    // On a shared host the thread may wait for a CPU; what it asked for is on-CPU + waiting.
    let demand = ((r1 - r0) + (w1 - w0)).as_secs_f64() / wall * 100.0;
    let got = (cpu1 - cpu0).as_secs_f64() / wall * 100.0;
    eprintln!("duty=30: vCPU thread on CPU {got:.1}%, runnable {demand:.1}%");
    // On CPU can never exceed the duty (+10 points). Runnable time also counts the wake-up
    // latency after each timer tick, which grows with host load (measured 46% at load 10
    // on 2 cores), so the "within 10 points" bound holds only while the thread barely
    // waited for a CPU (measured 30.8% on a quiet machine); an ignored duty gives 100.
    let waited = (w1 - w0).as_secs_f64() / wall * 100.0;
    assert!(got <= 40.0, "vCPU used {got:.1}% CPU for duty=30");
    let allowed = if waited < 5.0 {
        20.0..=40.0
    } else {
        20.0..=65.0
    };
    assert!(
        allowed.contains(&demand),
        "vCPU runnable {demand:.1}% (waited {waited:.1}%) for duty=30"
    );
    assert_eq!(status(&vm).mismatches, 0);
}
