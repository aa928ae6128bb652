//! The test guest's disk workload on a real virtio-blk device under KVM: blocks written,
//! flushed, read back and verified; a cold boot on the same image verifies what the previous
//! boot flushed; save/restore (as a migration does) carries the device state, and the guest
//! keeps going without an I/O error.
mod common;

use common::{kvm_or_skip, wait_for};
use std::path::Path;
use std::time::Duration;
use tern_hypervisor::devices::virtio::blk::create_image;
use tern_hypervisor::devices::virtio::DiskConfig;
use tern_hypervisor::disk_workload::check_image;
use tern_hypervisor::{guest_image, GuestState, GuestStatus, Vm, VmConfig, VmState, Workload};

const T: Duration = Duration::from_secs(60);
const DISK: u64 = 16 << 20;

fn vm_with_disk(path: &Path, vcpus: usize) -> Vm {
    let mut vm = Vm::new(VmConfig {
        memory: 64 << 20,
        vcpus,
        serial_log: None,
    })
    .unwrap();
    let (base, irq) = vm
        .attach_disk(&DiskConfig {
            path: path.to_path_buf(),
            read_only: false,
        })
        .unwrap();
    assert_eq!((base, irq), (0xfd00_0000, 5));
    vm
}

fn status(vm: &Vm) -> GuestStatus {
    let s = vm.guest_status().unwrap();
    assert_ne!(
        s.state,
        GuestState::Error,
        "guest error: {:?}; serial: {}",
        s.error,
        String::from_utf8_lossy(&vm.serial_output())
    );
    s
}

fn wait_flushed(vm: &Vm, gen: u64) -> GuestStatus {
    wait_for("disk generations", T, || {
        vm.guest_status()
            .is_ok_and(|s| s.state == GuestState::Error || s.disk.flushed_gen >= gen)
    });
    status(vm)
}

fn workload() -> Workload {
    "wss=4M,rate=2000,disk=16M,iops=0,dio=random,dflush=8"
        .parse()
        .unwrap()
}

#[test]
fn disk_workload_verifies_and_survives_a_cold_boot() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    create_image(&path, 64 << 20).unwrap();
    let w = workload();
    let mut vm = vm_with_disk(&path, 1);
    vm.boot(guest_image::IMAGE, &w.cmdline()).unwrap();
    let first = wait_flushed(&vm, 3);
    let s = wait_flushed(&vm, first.disk.flushed_gen + 5);
    assert_eq!(s.disk.blocks, w.disk.data_blocks());
    assert_eq!((s.disk.mismatches, s.disk.io_errors), (0, 0), "{s:?}");
    assert!(s.disk.written >= 8 * 5 && s.disk.verified >= 8 * 5, "{s:?}");
    assert_eq!(
        s.disk.boot_verified, 0,
        "a fresh image has nothing to verify"
    );
    // The cmdline the guest got names the device the way Linux reads it.
    let serial = String::from_utf8_lossy(&vm.serial_output()).into_owned();
    assert!(
        serial.contains("virtio_mmio.device=4K@0xfd000000:5"),
        "{serial}"
    );
    vm.pause().unwrap();
    let flushed = status(&vm).disk.flushed_gen;
    vm.shutdown();
    drop(vm);

    // The host sees every flushed block in the file.
    let c = check_image(&path, DISK).unwrap();
    assert!(c.flushed_gen >= flushed, "{c:?} vs {flushed}");
    assert!(c.blocks_checked > 0);
    assert_eq!(c.mismatches, 0, "{c:?}");

    // A cold boot on the same image first verifies what the previous boot flushed.
    let mut vm = vm_with_disk(&path, 1);
    vm.boot(guest_image::IMAGE, &w.cmdline()).unwrap();
    let s = wait_flushed(&vm, c.flushed_gen + 2);
    assert_eq!(s.disk.boot_verified, c.blocks_checked, "{s:?}");
    assert_eq!((s.disk.mismatches, s.disk.io_errors), (0, 0), "{s:?}");

    // A block the guest flushed, corrupted behind its back, is caught at the next boot.
    vm.pause().unwrap();
    vm.shutdown();
    drop(vm);
    let c = check_image(&path, DISK).unwrap();
    let table_blocks = DISK / 4096 - 1 - w.disk.data_blocks();
    let data_start = (1 + table_blocks) * 4096u64;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let victim = {
        use std::os::unix::fs::FileExt;
        let mut table = vec![0u8; 4096 * table_blocks as usize];
        f.read_exact_at(&mut table, 4096).unwrap();
        let b = (0..table.len() / 4)
            .find(|&b| table[b * 4..b * 4 + 4] != [0; 4])
            .unwrap() as u64;
        f.write_all_at(&[0xa5; 64], data_start + b * 4096 + 1024)
            .unwrap();
        b
    };
    assert_eq!(check_image(&path, DISK).unwrap().mismatches, 1);
    let mut vm = vm_with_disk(&path, 1);
    vm.boot(guest_image::IMAGE, &w.cmdline()).unwrap();
    wait_for("boot check", T, || {
        vm.guest_status().is_ok_and(|s| s.disk.blocks != 0)
    });
    let s = status(&vm);
    assert_eq!(s.disk.mismatches, 1, "{s:?}");
    assert_eq!(s.disk.first_mismatch, Some(victim));
    assert_eq!(s.disk.boot_verified, c.blocks_checked - 1);
}

#[test]
fn save_restore_carries_the_device_and_io_continues() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    create_image(&path, DISK).unwrap();
    let w = workload();
    let mut src = vm_with_disk(&path, 2);
    src.boot(guest_image::IMAGE, &w.cmdline()).unwrap();
    wait_flushed(&src, 4);
    src.pause().unwrap();
    let before = status(&src);
    let state = src.save_state().unwrap();
    assert_eq!(state.devices.len(), 1);
    assert_eq!(state.devices[0].id, "virtio-blk@0xfd000000");
    let blob = state.to_bytes().unwrap();

    // A destination without the disk refuses the state.
    let mut bare = Vm::new(VmConfig {
        memory: 64 << 20,
        vcpus: 2,
        serial_log: None,
    })
    .unwrap();
    let err = bare
        .restore_state(&VmState::from_bytes(&blob).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("device sections"), "{err}");

    // The destination reopens the same file (shared datastore) and gets every page.
    let mut dst = vm_with_disk(&path, 2);
    let mut page = [0u8; 4096];
    for p in 0..src.memory().page_count() {
        src.memory().read_page(p, &mut page).unwrap();
        dst.memory().write_page(p, &page).unwrap();
    }
    src.shutdown();
    dst.restore_state(&VmState::from_bytes(&blob).unwrap())
        .unwrap();
    dst.resume().unwrap();
    let after = wait_flushed(&dst, before.disk.flushed_gen + 5);
    assert_eq!(
        (after.disk.mismatches, after.disk.io_errors),
        (0, 0),
        "{after:?}"
    );
    assert!(after.disk.verified > before.disk.verified);
    assert_eq!(after.mismatches, 0);
    dst.pause().unwrap();
    dst.shutdown();
    assert_eq!(check_image(&path, DISK).unwrap().mismatches, 0);
}
