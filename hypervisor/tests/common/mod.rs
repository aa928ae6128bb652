//! Shared helpers for the hypervisor's KVM tests, including a tiny multiboot payload of our
//! own so the VMM is tested independently of the test guest.
#![allow(dead_code)]
use std::time::{Duration, Instant};
use tern_hypervisor::{Vm, VmConfig};

/// Returns false (after printing the agreed line) where /dev/kvm is missing.
pub fn kvm_or_skip() -> bool {
    if std::path::Path::new("/dev/kvm").exists() && Vm::available() {
        true
    } else {
        println!("SKIP: no /dev/kvm");
        false
    }
}

/// Heartbeat counter of the tiny payload (status page offset 0x30).
pub const HEARTBEAT: u64 = 0x0020_0030;

/// A 32-bit multiboot image (address-field header, loaded at 1 MiB) that prints "T" on
/// COM1, writes the status-page magic, version and state, then counts the heartbeat
/// forever.
pub fn tiny_payload() -> Vec<u8> {
    let mut img = Vec::new();
    let flags: u32 = 0x0001_0003;
    let magic: u32 = 0x1BAD_B002;
    for w in [
        magic,
        flags,
        0u32.wrapping_sub(magic).wrapping_sub(flags),
        0x0010_0000, // header_addr
        0x0010_0000, // load_addr
        0,           // load_end_addr: whole file
        0,           // bss_end_addr
        0x0010_0020, // entry_addr
    ] {
        img.extend_from_slice(&w.to_le_bytes());
    }
    img.extend_from_slice(&[0x66, 0xBA, 0xF8, 0x03, 0xB0, b'T', 0xEE]); // out 0x3f8, 'T'
    let mov = |img: &mut Vec<u8>, addr: u32, v: u32| {
        img.extend_from_slice(&[0xC7, 0x05]);
        img.extend_from_slice(&addr.to_le_bytes());
        img.extend_from_slice(&v.to_le_bytes());
    };
    mov(&mut img, 0x0020_0000, 0x4E52_4554); // "TERN"
    mov(&mut img, 0x0020_0004, 0x5441_5453); // "STAT"
    mov(&mut img, 0x0020_0008, 1); // ABI version
    mov(&mut img, 0x0020_000c, 1); // running
    mov(&mut img, 0x0020_0050, u32::MAX); // no mismatch
    mov(&mut img, 0x0020_0054, u32::MAX);
    let top = img.len();
    img.extend_from_slice(&[0x83, 0x05]); // add dword [HEARTBEAT], 1
    img.extend_from_slice(&(HEARTBEAT as u32).to_le_bytes());
    img.push(1);
    img.extend_from_slice(&[0x83, 0x15]); // adc dword [HEARTBEAT+4], 0
    img.extend_from_slice(&(HEARTBEAT as u32 + 4).to_le_bytes());
    img.push(0);
    let rel = top as i64 - (img.len() as i64 + 2);
    img.extend_from_slice(&[0xEB, rel as i8 as u8]); // jmp top
    img
}

pub fn small_vm(vcpus: usize) -> Vm {
    Vm::new(VmConfig {
        memory: 64 << 20,
        vcpus,
        serial_log: None,
    })
    .expect("create VM")
}

pub fn heartbeat(vm: &Vm) -> u64 {
    vm.memory().read_u64(HEARTBEAT).expect("read heartbeat")
}

/// Waits until `f` holds, failing the test after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
