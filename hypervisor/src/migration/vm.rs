//! What migration needs from a VM. The real KVM `Vm` implements this; keeping it a trait keeps
//! the protocol independent of the VMM and testable on its own.
use super::bitmap::PageBitmap;

/// A failure reported by the VM backend.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct VmOpError(pub String);

pub type VmResult<T> = Result<T, VmOpError>;

/// A VM that can be sent (source) or received into (destination).
///
/// Page access must be safe from several threads at once and while the guest runs: the source
/// reads pages concurrently with the guest writing them (dirty logging catches those writes).
pub trait MigratableVm: Send + Sync {
    /// Guest memory size in bytes (a multiple of the page size).
    fn memory_bytes(&self) -> u64;
    fn vcpus(&self) -> u32;
    /// Opaque configuration a destination factory can rebuild the VM from.
    fn config(&self) -> String;
    /// CPU feature words the guest saw (bit masks).
    fn cpu_features(&self) -> Vec<u32>;

    /// Copy guest page `pfn` into `out` (`PAGE_SIZE` bytes).
    fn read_page(&self, pfn: u64, out: &mut [u8]) -> VmResult<()>;
    /// Overwrite guest page `pfn` with `data` (`PAGE_SIZE` bytes).
    fn write_page(&self, pfn: u64, data: &[u8]) -> VmResult<()>;
    /// Pages the guest has ever touched (others are known to be zero and are not even read).
    fn touched_pages(&self) -> VmResult<PageBitmap>;
    /// Start dirty logging; the next `take_dirty_bitmap` covers writes from now on.
    fn start_dirty_log(&self) -> VmResult<()>;
    /// Pages written since the last call (or since `start_dirty_log`), clearing the log.
    fn take_dirty_bitmap(&self) -> VmResult<PageBitmap>;
    /// Stop dirty logging (after a failed migration the source goes back to normal).
    fn stop_dirty_log(&self) -> VmResult<()>;
    /// Throttle the vCPUs to run at most `100 - percent` of the time (auto-converge).
    fn set_throttle(&self, percent: u8) -> VmResult<()>;

    fn pause(&self) -> VmResult<()>;
    fn resume(&self) -> VmResult<()>;
    /// vCPU and device state of a paused VM.
    fn save_state(&self) -> VmResult<Vec<u8>>;
    /// Load state saved by `save_state` into a paused VM.
    fn restore_state(&self, state: &[u8]) -> VmResult<()>;
    /// Destination: the state has arrived; decode and check it now, off the resume path, so
    /// that `restore_state` of the same bytes only loads it. Errors refuse the image.
    fn stage_state(&self, _state: &[u8]) -> VmResult<()> {
        Ok(())
    }

    /// The guest's own largest stall in microseconds, if it reports one.
    fn guest_max_stall_us(&self) -> Option<u64> {
        None
    }
}
