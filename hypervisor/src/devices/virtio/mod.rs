//! virtio devices over MMIO: the [`VirtioDevice`] trait a device type implements, the
//! virtio-mmio transport ([`VirtioMmio`], virtio 1.x "modern" registers, version 2) that
//! puts one on the [`super::MmioBus`], and the devices (virtio-blk).
pub mod blk;
mod mmio;

pub use blk::{Blk, DiskConfig};
pub use mmio::VirtioMmio;

use crate::memory::DeviceMemory;
use virtio_queue::Queue;

/// What a device type provides behind the virtio-mmio transport. The transport owns the
/// queues, feature negotiation, status and interrupts; a device only serves its queues and
/// its configuration space.
pub trait VirtioDevice: Send {
    /// Short name for logs and state sections, e.g. `virtio-blk`.
    fn kind(&self) -> &'static str;
    /// virtio device ID (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Feature bits offered (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Largest size of each queue; the number of queues is its length.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device configuration space (`offset` from its start); bytes past its end
    /// read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver wrote the configuration space; read-only by default.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver accepted `features` (a subset of [`Self::features`]).
    fn set_driver_features(&mut self, _features: u64) {}
    /// The driver notified queue `index`: process every available chain now, completing
    /// each (so that nothing is in flight when the vCPU returns). True if any buffer was used.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &DeviceMemory) -> bool;
}

/// Reads `data.len()` bytes at `offset` out of `config` (a device's configuration space),
/// zero past its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests;
