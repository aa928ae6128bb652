//! Devices on the MMIO bus: the bus (dispatch of KVM_EXIT_MMIO by address range), the
//! interrupt lines devices drive, the guest-visible MMIO map, and each device's versioned
//! state section of the VM state blob.
//!
//! A device is anything implementing [`MmioDevice`]; the bus knows nothing about virtio, so
//! a new device type (virtio-net next) plugs in by implementing the trait (or
//! [`virtio::VirtioDevice`] behind the [`virtio::VirtioMmio`] transport) and calling
//! [`MmioBus::insert`].
pub mod virtio;

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::sync::{Mutex, MutexGuard, RwLock};

/// First MMIO region: virtio-mmio devices sit in the uncached, user-accessible top 64 MiB
/// below 4 GiB (guest/ABI.md), one 4 KiB region each.
pub const MMIO_BASE: u64 = 0xfd00_0000;
/// Size of one device's region.
pub const MMIO_SIZE: u64 = 0x1000;
/// Interrupt line (IOAPIC pin / GSI) of the first device; the next get the following ones.
pub const IRQ_BASE: u32 = 5;
/// Most devices the map has room for (IRQs 5..=15 stay below the IOAPIC's PCI pins).
pub const MAX_DEVICES: usize = 11;

/// Where device number `index` lives: (guest-physical base, interrupt line).
pub fn slot(index: usize) -> (u64, u32) {
    (
        MMIO_BASE + index as u64 * MMIO_SIZE,
        IRQ_BASE + index as u32,
    )
}

/// The kernel command-line word Linux's virtio-mmio driver reads to find a device (and the
/// test guest too): `virtio_mmio.device=4K@0xfd000000:5`.
pub fn cmdline_word(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device={}K@{base:#x}:{irq}", MMIO_SIZE >> 10)
}

/// Something that drives an interrupt line of the in-kernel irqchip (KVM_IRQ_LINE).
pub trait IrqLine {
    fn set_irq(&self, irq: u32, level: bool) -> Result<()>;
}

impl IrqLine for kvm_ioctls::VmFd {
    fn set_irq(&self, irq: u32, level: bool) -> Result<()> {
        self.set_irq_line(irq, level)
            .map_err(crate::error::kvm("KVM_IRQ_LINE"))
    }
}

/// A device in an MMIO region. `offset` is relative to the region's base.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
    /// The level this device wants on its interrupt line now (level-triggered).
    fn irq_level(&self) -> bool;
    /// Its state section, taken while the VM is paused.
    fn save(&self) -> Result<DeviceState>;
    /// Loads a section written by `save` of the same kind of device.
    fn restore(&mut self, state: &DeviceState) -> Result<()>;
    /// A short name for logs and state sections, e.g. `virtio-blk`.
    fn kind(&self) -> &'static str;
}

/// One device's section of the VM state blob: which device, its own format version, and its
/// data (the device's business).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// `<kind>@<base>`, e.g. `virtio-blk@0xfd000000`: a destination restores a section only
    /// into a device of the same kind at the same place.
    pub id: String,
    pub version: u32,
    pub data: serde_json::Value,
}

struct Slot {
    base: u64,
    irq: u32,
    dev: Mutex<Box<dyn MmioDevice>>,
    /// Level last driven on the line, to raise and lower it only on changes.
    level: Mutex<Option<bool>>,
}

impl Slot {
    fn id(&self, dev: &dyn MmioDevice) -> String {
        format!("{}@{:#x}", dev.kind(), self.base)
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The MMIO bus of one VM: address ranges to devices. Accesses from several vCPUs are
/// serialized per device.
#[derive(Default)]
pub struct MmioBus {
    slots: RwLock<Vec<Slot>>,
}

impl MmioBus {
    /// Adds `dev` in the next free slot of the map; returns its (base, irq).
    pub fn insert(&self, dev: Box<dyn MmioDevice>) -> Result<(u64, u32)> {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        if slots.len() >= MAX_DEVICES {
            return Err(Error::Config(format!(
                "at most {MAX_DEVICES} MMIO devices fit the map"
            )));
        }
        let (base, irq) = slot(slots.len());
        slots.push(Slot {
            base,
            irq,
            dev: Mutex::new(dev),
            level: Mutex::new(None),
        });
        Ok((base, irq))
    }

    /// The kernel command-line words announcing every device (empty without devices).
    pub fn cmdline(&self) -> Vec<String> {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|s| cmdline_word(s.base, s.irq))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Handles a guest read at `addr`; false if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8], irq: &dyn IrqLine) -> Result<bool> {
        self.access(addr, irq, |dev, off| dev.read(off, data))
    }

    /// Handles a guest write at `addr`; false if no device is there.
    pub fn write(&self, addr: u64, data: &[u8], irq: &dyn IrqLine) -> Result<bool> {
        self.access(addr, irq, |dev, off| dev.write(off, data))
    }

    fn access(
        &self,
        addr: u64,
        irq: &dyn IrqLine,
        f: impl FnOnce(&mut dyn MmioDevice, u64),
    ) -> Result<bool> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let Some(s) = slots
            .iter()
            .find(|s| addr >= s.base && addr - s.base < MMIO_SIZE)
        else {
            return Ok(false);
        };
        let mut dev = lock(&s.dev);
        f(dev.as_mut(), addr - s.base);
        let level = dev.irq_level();
        drop(dev);
        sync_irq(s, level, irq)?;
        Ok(true)
    }

    /// Every device's state section, in bus order (the VM is paused).
    pub fn save(&self) -> Result<Vec<DeviceState>> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .map(|s| {
                let dev = lock(&s.dev);
                let mut st = dev.save()?;
                st.id = s.id(dev.as_ref());
                Ok(st)
            })
            .collect()
    }

    /// Loads `sections` into this bus's devices: exactly one section per device, same ids;
    /// then drives every interrupt line to its restored level.
    pub fn restore(&self, sections: &[DeviceState], irq: &dyn IrqLine) -> Result<()> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let ours: Vec<String> = slots.iter().map(|s| s.id(lock(&s.dev).as_ref())).collect();
        let theirs: Vec<&str> = sections.iter().map(|s| s.id.as_str()).collect();
        if ours.iter().map(String::as_str).ne(theirs.iter().copied()) {
            return Err(Error::State(format!(
                "device sections {theirs:?} do not match this VM's devices {ours:?}"
            )));
        }
        for (s, section) in slots.iter().zip(sections) {
            lock(&s.dev).restore(section)?;
        }
        for s in slots.iter() {
            *lock(&s.level) = None;
            let level = lock(&s.dev).irq_level();
            sync_irq(s, level, irq)?;
        }
        Ok(())
    }
}

fn sync_irq(s: &Slot, level: bool, irq: &dyn IrqLine) -> Result<()> {
    let mut last = lock(&s.level);
    if *last != Some(level) {
        irq.set_irq(s.irq, level)?;
        *last = Some(level);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use std::cell::RefCell;

    /// Records the interrupt line changes a test provokes.
    #[derive(Default)]
    pub struct RecordingIrq(pub RefCell<Vec<(u32, bool)>>);

    impl IrqLine for RecordingIrq {
        fn set_irq(&self, irq: u32, level: bool) -> Result<()> {
            self.0.borrow_mut().push((irq, level));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::RecordingIrq;
    use super::*;

    /// A register file with one interrupt bit: the smallest device that exercises the bus.
    struct Latch {
        value: u32,
    }

    impl MmioDevice for Latch {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            let b = self.value.to_le_bytes();
            let n = data.len().min(4);
            data[..n].copy_from_slice(&b[..n]);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.value = u32::from(data.first().copied().unwrap_or(0));
        }
        fn irq_level(&self) -> bool {
            self.value != 0
        }
        fn save(&self) -> Result<DeviceState> {
            Ok(DeviceState {
                id: String::new(),
                version: 1,
                data: serde_json::json!(self.value),
            })
        }
        fn restore(&mut self, s: &DeviceState) -> Result<()> {
            self.value =
                serde_json::from_value(s.data.clone()).map_err(|e| Error::State(e.to_string()))?;
            Ok(())
        }
        fn kind(&self) -> &'static str {
            "latch"
        }
    }

    #[test]
    fn dispatches_by_range_and_drives_irq_on_changes() {
        let bus = MmioBus::default();
        let irq = RecordingIrq::default();
        assert_eq!(
            bus.insert(Box::new(Latch { value: 0 })).unwrap(),
            (MMIO_BASE, 5)
        );
        assert_eq!(
            bus.insert(Box::new(Latch { value: 0 })).unwrap(),
            (MMIO_BASE + 0x1000, 6)
        );
        assert_eq!(
            bus.cmdline(),
            [
                "virtio_mmio.device=4K@0xfd000000:5",
                "virtio_mmio.device=4K@0xfd001000:6"
            ]
        );
        assert!(bus.write(MMIO_BASE + 0x1010, &[7], &irq).unwrap());
        assert!(!bus.write(MMIO_BASE + 0x2000, &[7], &irq).unwrap());
        assert!(!bus.write(MMIO_BASE - 1, &[7], &irq).unwrap());
        let mut b = [0u8; 4];
        assert!(bus.read(MMIO_BASE + 0x1000, &mut b, &irq).unwrap());
        assert_eq!(b, [7, 0, 0, 0]);
        assert!(bus.read(MMIO_BASE, &mut b, &irq).unwrap());
        assert_eq!(b, [0; 4]);
        // Raised once for device 1, driven low once for device 0, not again on repeats.
        bus.write(MMIO_BASE + 0x1000, &[9], &irq).unwrap();
        assert_eq!(*irq.0.borrow(), [(6, true), (5, false)]);
    }

    #[test]
    fn state_sections_round_trip_and_must_match() {
        let bus = MmioBus::default();
        let irq = RecordingIrq::default();
        bus.insert(Box::new(Latch { value: 3 })).unwrap();
        let saved = bus.save().unwrap();
        assert_eq!(saved[0].id, "latch@0xfd000000");
        let dst = MmioBus::default();
        dst.insert(Box::new(Latch { value: 0 })).unwrap();
        dst.restore(&saved, &irq).unwrap();
        assert_eq!(*irq.0.borrow(), [(5, true)]);
        let mut b = [0u8; 4];
        dst.read(MMIO_BASE, &mut b, &irq).unwrap();
        assert_eq!(b[0], 3);
        // Missing, extra or misplaced sections are refused.
        assert!(dst.restore(&[], &irq).is_err());
        let mut moved = saved.clone();
        moved[0].id = "latch@0xfd001000".into();
        assert!(dst.restore(&moved, &irq).is_err());
        assert!(MmioBus::default().restore(&saved, &irq).is_err());
    }
}
