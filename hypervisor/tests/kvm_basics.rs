//! Real-KVM tests of the VMM with its own tiny payload: boot, serial, pause/resume,
//! save/restore into a fresh VM, dirty logging, throttling, error reporting.
mod common;
use common::*;
use std::time::Duration;
use tern_hypervisor::{RunState, Vm, VmConfig, VmState};

const T: Duration = Duration::from_secs(20);

#[test]
fn boots_and_makes_progress() {
    if !kvm_or_skip() {
        return;
    }
    let mut vm = small_vm(1);
    vm.boot(&tiny_payload(), "hello").unwrap();
    wait_for("heartbeat", T, || heartbeat(&vm) > 1000);
    wait_for("serial", T, || vm.serial_output() == b"T");
    assert_eq!(vm.error(), None);
    let st = vm.guest_status().unwrap();
    assert!(st.heartbeat > 0);
    // The MBI carries the command line.
    let mut c = [0u8; 6];
    let cmdline = vm
        .memory()
        .read_u32(tern_hypervisor::multiboot::MBI_ADDR + 16)
        .unwrap();
    vm.memory().read(u64::from(cmdline), &mut c).unwrap();
    assert_eq!(&c, b"hello\0");
}

#[test]
fn pause_stops_progress_and_resume_continues() {
    if !kvm_or_skip() {
        return;
    }
    let mut vm = small_vm(2);
    vm.boot(&tiny_payload(), "").unwrap();
    wait_for("heartbeat", T, || heartbeat(&vm) > 1000);
    let latency = vm.pause().unwrap();
    assert!(latency < Duration::from_secs(1), "pause took {latency:?}");
    assert_eq!(vm.run_state(), RunState::Paused);
    let a = heartbeat(&vm);
    let cpu_a: Duration = vm.vcpu_cpu_times().iter().sum();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(heartbeat(&vm), a, "guest ran while paused");
    let cpu_b: Duration = vm.vcpu_cpu_times().iter().sum();
    assert!(
        cpu_b - cpu_a < Duration::from_millis(30),
        "parked vCPUs burned {:?}",
        cpu_b - cpu_a
    );
    vm.resume().unwrap();
    wait_for("progress after resume", T, || heartbeat(&vm) > a + 1000);
}

#[test]
fn save_restore_into_fresh_vm_continues() {
    if !kvm_or_skip() {
        return;
    }
    let mut src = small_vm(1);
    src.boot(&tiny_payload(), "").unwrap();
    wait_for("heartbeat", T, || heartbeat(&src) > 1000);
    src.pause().unwrap();
    let saved = src.save_state().unwrap();
    let blob = saved.to_bytes().unwrap();
    let at_save = heartbeat(&src);

    let mut dst = small_vm(1);
    let mut page = [0u8; 4096];
    for p in 0..src.memory().page_count() {
        src.memory().read_page(p, &mut page).unwrap();
        if page.iter().any(|&b| b != 0) {
            dst.memory().write_page(p, &page).unwrap();
        }
    }
    let state = VmState::from_bytes(&blob).unwrap();
    dst.restore_state(&state).unwrap();
    src.shutdown();
    assert_eq!(heartbeat(&dst), at_save);
    // A restored VM cannot be restored or booted again.
    assert!(dst.restore_state(&state).is_err());
    assert!(dst.boot(&tiny_payload(), "").is_err());
    dst.resume().unwrap();
    wait_for("progress after restore", T, || {
        heartbeat(&dst) > at_save + 1000
    });
    assert_eq!(dst.error(), None);
    assert_eq!(dst.serial_output(), b"", "restored VM printed nothing new");
}

#[test]
fn restore_refuses_mismatched_shape() {
    if !kvm_or_skip() {
        return;
    }
    let mut src = small_vm(1);
    src.boot(&tiny_payload(), "").unwrap();
    assert!(src.save_state().is_err(), "save needs a paused VM");
    src.pause().unwrap();
    let saved = src.save_state().unwrap();
    let mut two = small_vm(2);
    let err = two.restore_state(&saved).unwrap_err().to_string();
    assert!(err.contains("vCPUs"), "{err}");
}

#[test]
fn dirty_log_reports_guest_and_vmm_writes() {
    if !kvm_or_skip() {
        return;
    }
    let mut vm = small_vm(1);
    assert!(vm.take_dirty_bitmap().is_err(), "logging is off");
    vm.set_dirty_logging(true).unwrap();
    vm.boot(&tiny_payload(), "").unwrap();
    wait_for("heartbeat", T, || heartbeat(&vm) > 1000);
    vm.memory().write_u64(0x0300_0000, 7).unwrap();
    let bits = vm.take_dirty_bitmap().unwrap();
    let set = |bits: &[u64], page: u64| bits[(page / 64) as usize] & (1 << (page % 64)) != 0;
    assert!(set(&bits, HEARTBEAT / 4096), "guest write missing");
    assert!(set(&bits, 0x0300_0000 / 4096), "VMM write missing");
    assert!(!set(&bits, 0x0310_0000 / 4096), "untouched page reported");
    vm.pause().unwrap();
    let _ = vm.take_dirty_bitmap().unwrap();
    let bits = vm.take_dirty_bitmap().unwrap();
    assert!(bits.iter().all(|&w| w == 0), "paused guest dirtied pages");
    let touched = vm.memory().touched_pages().unwrap();
    assert!((3..1000).contains(&touched), "touched {touched}");
    vm.set_dirty_logging(false).unwrap();
    assert!(vm.take_dirty_bitmap().is_err());
}

#[test]
fn throttle_limits_vcpu_time() {
    if !kvm_or_skip() {
        return;
    }
    let mut vm = small_vm(1);
    vm.boot(&tiny_payload(), "").unwrap();
    wait_for("heartbeat", T, || heartbeat(&vm) > 1000);
    vm.set_throttle(75).unwrap();
    let t0 = std::time::Instant::now();
    let c0 = vm.vcpu_cpu_times()[0];
    std::thread::sleep(Duration::from_millis(1000));
    let share = (vm.vcpu_cpu_times()[0] - c0).as_secs_f64() / t0.elapsed().as_secs_f64();
    assert!(
        share < 0.45,
        "throttled vCPU used {:.0}% CPU",
        share * 100.0
    );
    vm.set_throttle(0).unwrap();
    let h = heartbeat(&vm);
    wait_for("progress unthrottled", T, || heartbeat(&vm) > h + 1000);
    assert!(vm.set_throttle(100).is_err());
}

#[test]
fn bad_config_and_images_get_errors() {
    if !kvm_or_skip() {
        return;
    }
    for (memory, vcpus) in [(1 << 40, 1), (64 << 20, 0), (64 << 20, 1000), (12345, 1)] {
        let err = Vm::new(VmConfig {
            memory,
            vcpus,
            serial_log: None,
        })
        .err();
        assert!(err.is_some(), "{memory} {vcpus} accepted");
    }
    let mut vm = small_vm(1);
    let err = vm.boot(b"garbage", "").unwrap_err().to_string();
    assert!(err.contains("multiboot"), "{err}");
    // The failed boot changed nothing: the VM can still boot a good image.
    vm.boot(&tiny_payload(), "").unwrap();
    wait_for("heartbeat", T, || heartbeat(&vm) > 100);
}

#[test]
fn triple_fault_is_reported() {
    if !kvm_or_skip() {
        return;
    }
    // An image whose entry does `lidt [zero limit]; int3`: no IDT, so a triple fault.
    let mut img = tiny_payload();
    img.truncate(0x20);
    img.extend_from_slice(&[0x0F, 0x01, 0x1D]); // lidt [0x100040]
    img.extend_from_slice(&0x0010_0040u32.to_le_bytes());
    img.push(0xCC); // int3
    img.resize(0x46, 0); // zero IDTR at 0x100040
    let mut vm = small_vm(1);
    vm.boot(&img, "").unwrap();
    wait_for("error", T, || vm.error().is_some());
    // Hardware KVM reports the triple fault as a shutdown exit; PVM as an internal error.
    let err = vm.error().unwrap();
    assert!(
        err.contains("triple fault") || err.contains("internal error"),
        "{err}"
    );
    assert_eq!(vm.run_state(), RunState::Stopped);
}
