//! The built-in test guest (guest_image::IMAGE) under Tern's own VMM on real KVM: it boots
//! to CPL3 on every vCPU, writes and verifies its pages, catches a page corrupted behind its
//! back and keeps counting it, and reports bad command lines. (Duty cycle, pause and
//! save/restore with this guest are covered by guest_workload.rs.)
mod common;
use common::{kvm_or_skip, wait_for};
use std::time::Duration;
use tern_hypervisor::guest_image::IMAGE;
use tern_hypervisor::{GuestState, GuestStatus, Vm, VmConfig};

const BOOT: Duration = Duration::from_secs(60);
const WSS_BASE: u64 = 0x0100_0000;

fn guest_vm(memory: u64, vcpus: usize) -> Vm {
    Vm::new(VmConfig {
        memory,
        vcpus,
        serial_log: None,
    })
    .expect("create VM")
}

fn status(vm: &Vm) -> Option<GuestStatus> {
    vm.guest_status().ok()
}

fn serial(vm: &Vm) -> String {
    String::from_utf8_lossy(&vm.serial_output()).into_owned()
}

fn wait_running(vm: &Vm, vcpus: u32) -> GuestStatus {
    wait_for("guest running on all vCPUs", BOOT, || {
        let st = status(vm);
        if let Some(st) = &st {
            assert_ne!(
                st.state,
                GuestState::Error,
                "guest error: {:?} serial: {}",
                st.error,
                serial(vm)
            );
        }
        assert_eq!(vm.error(), None, "VMM error; serial: {}", serial(vm));
        st.is_some_and(|s| s.state == GuestState::Running && s.vcpus_running == vcpus)
    });
    status(vm).unwrap()
}

#[test]
fn boots_on_two_vcpus_and_verifies_its_pages() {
    if !kvm_or_skip() {
        return;
    }
    let mut vm = guest_vm(128 << 20, 2);
    vm.boot(IMAGE, "wss=16M rate=0 pattern=random seed=7")
        .unwrap();
    let st = wait_running(&vm, 2);
    assert_eq!(st.wss_pages, 4096);
    assert!(st.tsc_khz > 100_000, "TSC calibrated: {}", st.tsc_khz);
    let out = serial(&vm);
    assert!(out.contains("tern-guest: long mode"), "{out}");
    assert!(out.contains("cpus=2"), "{out}");
    assert!(out.contains("tern-guest: running"), "{out}");
    wait_for("pages written and verified", BOOT, || {
        status(&vm).is_some_and(|s| s.pages_written > 20_000 && s.pages_verified > 20_000)
    });
    let st = status(&vm).unwrap();
    assert_eq!(st.mismatches, 0);
    assert_eq!(st.first_mismatch, None);
    assert!(st.heartbeat > 0 && st.heartbeat_tsc > 0);
    // Pages are checkable from outside with the formula of ABI.md.
    let mut checked = 0;
    for i in 0..st.wss_pages {
        let gen = vm
            .memory()
            .read_u32(WSS_BASE + st.wss_pages * 4096 + 4 * i)
            .unwrap();
        if gen == 0 {
            continue;
        }
        vm.pause().unwrap();
        let gen = vm
            .memory()
            .read_u32(WSS_BASE + st.wss_pages * 4096 + 4 * i)
            .unwrap();
        for w in [0u64, 1, 511] {
            let got = vm.memory().read_u64(WSS_BASE + i * 4096 + 8 * w).unwrap();
            assert_eq!(
                got,
                page_word(i, u64::from(gen), w),
                "page {i} word {w} gen {gen}"
            );
        }
        vm.resume().unwrap();
        checked += 1;
        if checked == 8 {
            break;
        }
    }
    assert_eq!(checked, 8);
}

/// Guest pages that have been written (generation != 0), read while the VM is paused:
/// (index, generation, bytes), at most `max` of them.
fn written_pages(vm: &mut Vm, wss_pages: u64, max: usize) -> Vec<(u64, u32, Vec<u8>)> {
    vm.pause().unwrap();
    let mut out = Vec::new();
    for i in 0..wss_pages {
        let gen = vm
            .memory()
            .read_u32(WSS_BASE + wss_pages * 4096 + 4 * i)
            .unwrap();
        if gen == 0 {
            continue;
        }
        let mut page = vec![0u8; 4096];
        vm.memory().read(WSS_BASE + i * 4096, &mut page).unwrap();
        out.push((i, gen, page));
        if out.len() == max {
            break;
        }
    }
    vm.resume().unwrap();
    out
}

/// zstd (level 1, as migration uses) compressed size over original size.
fn zstd_ratio(pages: &[(u64, u32, Vec<u8>)]) -> f64 {
    let all: Vec<u8> = pages
        .iter()
        .flat_map(|(_, _, p)| p.iter().copied())
        .collect();
    zstd::bulk::compress(&all, 1).unwrap().len() as f64 / all.len() as f64
}

#[test]
fn content_option_decides_how_compressible_pages_are() {
    if !kvm_or_skip() {
        return;
    }
    for (content, lo, hi) in [("random", 0.99, 1.01), ("compressible", 0.2, 0.35)] {
        let mut vm = guest_vm(64 << 20, 1);
        vm.boot(IMAGE, &format!("wss=4M rate=0 content={content}"))
            .unwrap();
        let st = wait_running(&vm, 1);
        wait_for("every page written", BOOT, || {
            status(&vm).is_some_and(|s| s.pages_written > 2 * st.wss_pages)
        });
        let pages = written_pages(&mut vm, st.wss_pages, 256);
        assert_eq!(pages.len(), 256, "{content}");
        // The pause can land while the one vCPU is rewriting a page, so at most one page may
        // be caught between its old and new generation; every other page must match exactly.
        let torn: Vec<String> = pages
            .iter()
            .filter_map(|(i, gen, page)| {
                (0..512u64).find_map(|w| {
                    let got = u64::from_le_bytes(page[w as usize * 8..][..8].try_into().unwrap());
                    let want = match (content, w % 4) {
                        ("compressible", 1..) => u64::from(*gen),
                        _ => page_word(*i, u64::from(*gen), w),
                    };
                    (got != want).then(|| format!("page {i} word {w} gen {gen}: {got:#x}"))
                })
            })
            .collect();
        assert!(
            torn.len() <= 1,
            "{content}: pages that don't match: {torn:?}"
        );
        let ratio = zstd_ratio(&pages);
        assert!(
            (lo..=hi).contains(&ratio),
            "{content}: zstd ratio {ratio:.3} outside {lo}..={hi}"
        );
        assert_eq!(status(&vm).unwrap().mismatches, 0, "{content}");
    }
}

fn page_word(i: u64, g: u64, w: u64) -> u64 {
    let mut z = ((i << 32) ^ (g << 8) ^ w).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn a_corrupted_page_is_counted() {
    if !kvm_or_skip() {
        return;
    }
    let mut vm = guest_vm(64 << 20, 1);
    // Slow writes: the guest re-checks its 256 pages thousands of times between two writes.
    vm.boot(IMAGE, "wss=1M rate=200").unwrap();
    let st = wait_running(&vm, 1);
    let gen_table = WSS_BASE + st.wss_pages * 4096;
    wait_for("page 3 written", BOOT, || {
        vm.memory().read_u32(gen_table + 12).unwrap() > 0
    });
    vm.pause().unwrap();
    let addr = WSS_BASE + 3 * 4096 + 8 * 100;
    let v = vm.memory().read_u64(addr).unwrap();
    vm.memory().write_u64(addr, !v).unwrap();
    vm.resume().unwrap();
    wait_for("mismatches grow", BOOT, || {
        status(&vm).is_some_and(|s| s.mismatches >= 3)
    });
    assert_eq!(status(&vm).unwrap().first_mismatch, Some(3));
}

#[test]
fn bad_command_line_is_reported() {
    if !kvm_or_skip() {
        return;
    }
    for (cmdline, expect) in [
        ("wss=1M colour=blue", "unknown key"),
        ("wss=12Q", "bad wss"),
        ("wss=1G", "does not fit"),
        ("pattern=zigzag", "bad pattern"),
        ("duty=0", "bad duty"),
    ] {
        let mut vm = guest_vm(64 << 20, 1);
        vm.boot(IMAGE, cmdline).unwrap();
        wait_for("guest error state", BOOT, || {
            status(&vm).is_some_and(|s| s.state == GuestState::Error)
        });
        let msg = status(&vm).unwrap().error.unwrap_or_default();
        assert!(msg.contains(expect), "{cmdline}: message {msg:?}");
        wait_for("serial error line", BOOT, || {
            serial(&vm).contains("tern-guest: error:")
        });
        vm.shutdown();
    }
}
