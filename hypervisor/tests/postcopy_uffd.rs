//! Post-copy's foundation on real KVM: a guest paused on one VM resumes on a second VM
//! whose memory is entirely missing, registered with userfaultfd; every page the guest
//! (through KVM) or the VMM touches first is pulled from the paused VM by a fault handler
//! with UFFDIO_COPY. The guest must keep verifying its pages with zero mismatches.
mod common;
use common::{kvm_or_skip, wait_for};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tern_hypervisor::guest_image::IMAGE;
use tern_hypervisor::uffd::MissingPages;
use tern_hypervisor::{GuestState, Vm, VmConfig};

const BOOT: Duration = Duration::from_secs(60);

fn new_vm() -> Vm {
    Vm::new(VmConfig {
        memory: 64 << 20,
        vcpus: 1,
        ..Default::default()
    })
    .expect("create VM")
}

#[test]
fn guest_resumes_on_missing_memory_pulled_page_by_page_through_userfaultfd() {
    if !kvm_or_skip() {
        return;
    }
    let mut src = new_vm();
    src.boot(IMAGE, "wss=8M rate=0 pattern=random").unwrap();
    wait_for("source guest wrote every page twice", BOOT, || {
        src.guest_status()
            .is_ok_and(|s| s.state == GuestState::Running && s.pages_written > 4096)
    });
    src.pause().unwrap();
    let before = src.guest_status().unwrap();
    let state = src.save_state().unwrap();

    let mut dst = new_vm();
    let missing = Arc::new(MissingPages::register(dst.memory()).unwrap());
    let (stop, faults) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let handler = {
        let (missing, stop, faults) = (missing.clone(), stop.clone(), faults.clone());
        let from = src.memory().clone();
        std::thread::spawn(move || {
            let mut page = vec![0u8; 4096];
            while !stop.load(Ordering::SeqCst) {
                if let Some(gpa) = missing.next_fault(Duration::from_millis(50)).unwrap() {
                    from.read(gpa, &mut page).unwrap();
                    missing.fill(gpa, &page).unwrap();
                    faults.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    dst.restore_state(&state).unwrap();
    dst.resume().unwrap();
    wait_for("guest runs on and rewrites its pages", BOOT, || {
        dst.guest_status()
            .is_ok_and(|s| s.pages_written > before.pages_written + 4096)
    });
    // Pause while the handler still serves faults (a vCPU may wait on a missing page).
    dst.pause().unwrap();
    let after = dst.guest_status().unwrap();
    stop.store(true, Ordering::SeqCst);
    handler.join().unwrap();
    assert_eq!(after.mismatches, 0, "{after:?}");
    assert_eq!(after.state, GuestState::Running, "{after:?}");
    assert!(after.pages_verified > before.pages_verified, "{after:?}");
    // Everything was missing on the second VM: the image, the status page and each
    // working-set page the guest touched arrived through a fault.
    let n = faults.load(Ordering::SeqCst);
    assert!(n > 1000, "only {n} faults");
    // A page filled twice is refused the second time and left as it is.
    let mut page = vec![0u8; 4096];
    dst.memory().read(0x0100_0000, &mut page).unwrap();
    assert!(!missing.fill(0x0100_0000, &[0xAB; 4096]).unwrap());
    let mut again = vec![0u8; 4096];
    dst.memory().read(0x0100_0000, &mut again).unwrap();
    assert_eq!(page, again);
    dst.shutdown();
    src.shutdown();
}
