//! The vCPU/device state blob a migration carries (`DeviceState` message) and the device
//! sections inside it (virtio-mmio transport with virtio-blk).
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use crate::{refuse, Outcome};
use tern_hypervisor::devices::virtio::blk::create_image;
use tern_hypervisor::devices::virtio::{Blk, DiskConfig, VirtioMmio};
use tern_hypervisor::devices::{DeviceState, IrqLine, MmioBus, MmioDevice};
use tern_hypervisor::memory::MIN_MEMORY;
use tern_hypervisor::{GuestMemory, VmState};

/// A disk image and guest memory shared by every run (made once per process).
struct Fixture {
    _dir: tempfile::TempDir,
    disk: PathBuf,
    mem: Arc<GuestMemory>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let disk = dir.path().join("disk.img");
        create_image(&disk, 1 << 20).expect("disk image");
        let mem = Arc::new(GuestMemory::new(MIN_MEMORY).expect("guest memory"));
        Fixture {
            _dir: dir,
            disk,
            mem,
        }
    })
}

/// A fresh virtio-blk device over the shared disk and memory, as a VM with one disk has.
pub fn blk_device() -> VirtioMmio {
    let f = fixture();
    let blk = Blk::open(&DiskConfig {
        path: f.disk.clone(),
        read_only: false,
    })
    .expect("open the fixture disk");
    VirtioMmio::new(Box::new(blk), f.mem.clone()).expect("virtio-blk device")
}

/// Interrupt lines go nowhere.
struct NoIrq;

impl IrqLine for NoIrq {
    fn set_irq(&self, _irq: u32, _level: bool) -> tern_hypervisor::Result<()> {
        Ok(())
    }
}

/// A restored device must save to a section that restores again to the same thing.
fn check_section_round_trip(dev: &dyn MmioDevice) {
    let saved = dev.save().expect("a restored device saves");
    let mut again = blk_device();
    again
        .restore(&saved)
        .unwrap_or_else(|e| panic!("a restored device's own section is refused: {e}"));
    assert_eq!(
        again.save().expect("saves"),
        saved,
        "section changed on restore"
    );
}

/// A whole state blob as `DeviceState` carries it: decoded and version-checked, then its
/// device sections loaded into the bus of a VM with one virtio-blk disk. (The vCPU part is
/// loaded by KVM itself, which checks it; that needs /dev/kvm and is not fuzzed here.)
pub fn vm_state(data: &[u8]) -> Outcome {
    let state = VmState::from_bytes(data).map_err(refuse)?;
    let bus = MmioBus::default();
    bus.insert(Box::new(blk_device())).map_err(refuse)?;
    bus.restore(&state.devices, &NoIrq).map_err(refuse)?;
    let saved = bus.save().map_err(refuse)?;
    let again = MmioBus::default();
    again.insert(Box::new(blk_device())).map_err(refuse)?;
    again
        .restore(&saved, &NoIrq)
        .unwrap_or_else(|e| panic!("a restored bus's own sections are refused: {e}"));
    Ok(())
}

/// One device section (JSON) restored into a virtio-blk device.
pub fn device_section(data: &[u8]) -> Outcome {
    let section: DeviceState = serde_json::from_slice(data).map_err(refuse)?;
    let mut dev = blk_device();
    dev.restore(&section).map_err(refuse)?;
    check_section_round_trip(&dev);
    Ok(())
}
