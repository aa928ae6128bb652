//! Real KVM: boot the test guest, migrate it over loopback TCP into a second real VM in this
//! process, and check memory, the guest's own verification and that it keeps running.
//! (The two-process CLI tests are in tests/migration_*.rs.)
use std::net::TcpListener;
use std::time::Duration;

use super::*;
use crate::vm::{Vm, VmConfig};

fn kvm_or_skip() -> bool {
    if std::path::Path::new("/dev/kvm").exists() && Vm::available() {
        true
    } else {
        println!("SKIP: no /dev/kvm");
        false
    }
}

/// A tiny multiboot image of our own: counts a heartbeat at 0x200030 forever and writes the
/// counter into one of 1024 pages at 16 MiB on each iteration (a fast, cyclic dirtier).
fn dirtier_payload() -> Vec<u8> {
    let mut img = Vec::new();
    let (magic, flags) = (0x1BAD_B002u32, 0x0001_0003u32);
    let header = [
        magic,
        flags,
        0u32.wrapping_sub(magic).wrapping_sub(flags),
        0x10_0000,
        0x10_0000,
        0,
        0,
        0x10_0020,
    ];
    header
        .iter()
        .for_each(|w| img.extend_from_slice(&w.to_le_bytes()));
    let hb = 0x0020_0030u32.to_le_bytes();
    let top = img.len();
    img.extend_from_slice(&[0x83, 0x05]); // add dword [hb], 1
    img.extend_from_slice(&hb);
    img.push(1);
    img.extend_from_slice(&[0x83, 0x15]); // adc dword [hb+4], 0
    img.extend_from_slice(&0x0020_0034u32.to_le_bytes());
    img.push(0);
    img.push(0xA1); // mov eax, [hb]
    img.extend_from_slice(&hb);
    img.extend_from_slice(&[0x25, 0xFF, 0x03, 0, 0]); // and eax, 0x3ff
    img.extend_from_slice(&[0xC1, 0xE0, 0x0C]); // shl eax, 12
    img.extend_from_slice(&[0x8B, 0x0D]); // mov ecx, [hb]
    img.extend_from_slice(&hb);
    img.extend_from_slice(&[0x89, 0x88]); // mov [eax + 16 MiB], ecx
    img.extend_from_slice(&0x0100_0000u32.to_le_bytes());
    let rel = top as i64 - (img.len() as i64 + 2);
    img.extend_from_slice(&[0xEB, rel as i8 as u8]); // jmp top
    img
}

fn heartbeat(vm: &KvmMigratable) -> u64 {
    vm.lock().memory().read_u64(0x0020_0030).unwrap()
}

fn receive_kvm(
    listener: TcpListener,
    features: Vec<u32>,
) -> std::thread::JoinHandle<Result<(KvmMigratable, ReceiveStats), MigrationError>> {
    std::thread::spawn(move || {
        let cfg = ReceiveConfig {
            cpu_features: features,
            ..Default::default()
        };
        receive(&listener, &cfg, |h: &Hello| {
            Vm::new(VmConfig {
                memory: h.spec.memory_bytes,
                vcpus: h.spec.vcpus as usize,
                serial_log: None,
            })
            .map(|vm| KvmMigratable::new(vm, h.spec.config.clone()))
            .map_err(|e| e.to_string())
        })
    })
}

#[test]
fn kvm_vm_migrates_with_identical_memory_and_continues() {
    if !kvm_or_skip() {
        return;
    }
    let mut vm = Vm::new(VmConfig {
        memory: 64 << 20,
        vcpus: 1,
        serial_log: None,
    })
    .unwrap();
    vm.boot(&dirtier_payload(), "").unwrap();
    let src = KvmMigratable::new(vm, String::new());
    std::thread::sleep(Duration::from_millis(300));
    let hb0 = heartbeat(&src);
    assert!(
        hb0 > 1000,
        "payload does not run: hb {hb0}, {:?} {:?}",
        src.lock().run_state(),
        src.lock().error()
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = receive_kvm(listener, src.cpu_features());
    let cfg = MigrationConfig {
        verify_hash: true,
        ..Default::default()
    };
    let stats = migrate(
        &src,
        addr,
        &cfg,
        Box::new(|| Ok(())),
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap();
    let (dvm, _) = dest.join().unwrap().unwrap();
    // Hashes matched at switchover (else migrate fails); the guest continues from there.
    assert!(stats.memory_hash.is_some());
    assert!(stats.untouched_pages > 8000, "{stats:?}");
    let at_pause = heartbeat(&src);
    std::thread::sleep(Duration::from_millis(500));
    let d = heartbeat(&dvm);
    assert!(
        d > at_pause + 1000,
        "destination: hb {d} vs {at_pause} at pause (src hb0 {hb0}), {:?} {:?}",
        dvm.lock().run_state(),
        dvm.lock().error()
    );
    assert_eq!(heartbeat(&src), at_pause, "the source must stay paused");
    eprintln!("tiny dirtier: {stats:?}");
    src.into_inner().shutdown();
    dvm.into_inner().shutdown();
}

#[test]
fn written_once_guest_migrates_and_keeps_verifying_without_writing() {
    if !kvm_or_skip() {
        return;
    }
    let w: crate::Workload = "wss=8M,rate=0,pattern=once".parse().unwrap();
    let mut vm = Vm::new(VmConfig {
        memory: 64 << 20,
        vcpus: 1,
        serial_log: None,
    })
    .unwrap();
    vm.boot(crate::guest_image::IMAGE, &w.cmdline()).unwrap();
    let src = KvmMigratable::new(vm, String::new());
    let pages = w.wss / 4096;
    let status = |vm: &KvmMigratable| vm.lock().guest_status().unwrap();
    // The status page has no magic until the guest has booted.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match src.lock().guest_status() {
            Ok(st) if st.pages_written >= pages => break,
            st => assert!(std::time::Instant::now() < deadline, "{st:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(status(&src).pages_written, pages, "written exactly once");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = receive_kvm(listener, src.cpu_features());
    let stats = migrate(
        &src,
        addr,
        &MigrationConfig::default(),
        Box::new(|| Ok(())),
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap();
    let (dvm, rstats) = dest.join().unwrap().unwrap();
    // Nothing is dirtied after the write pass: the first pass is (about) everything.
    assert!(stats.pages_sent >= pages, "{stats:?}");
    let sw = &stats.switchover;
    assert!(
        sw.pause > Duration::ZERO && sw.resume_ack > Duration::ZERO,
        "{sw:?}"
    );
    assert!(sw.state_bytes > 0, "{sw:?}");
    let steps = sw.pause
        + sw.final_bitmap
        + sw.final_send
        + sw.state_save
        + sw.state_transfer
        + sw.gate
        + sw.resume_ack;
    assert!(steps <= stats.downtime, "{steps:?} > {:?}", stats.downtime);
    assert!(rstats.restore_took <= rstats.resume_took, "{rstats:?}");
    let v0 = status(&dvm).pages_verified;
    std::thread::sleep(Duration::from_millis(300));
    let st = status(&dvm);
    assert_eq!(st.mismatches, 0, "{st:?}");
    assert_eq!(st.pages_written, pages, "no writes after the pass: {st:?}");
    assert!(st.pages_verified > v0, "the guest keeps checking: {st:?}");
    src.into_inner().shutdown();
    dvm.into_inner().shutdown();
}
