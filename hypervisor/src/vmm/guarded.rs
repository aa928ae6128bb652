//! The VMM's VM: the KVM VM behind the migration trait, whose every resume (an operator's, the
//! source's after a failed migration, the destination's at the switchover) first checks the
//! ownership lease.
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::MutexGuard;
use std::time::Duration;

use super::lease::{self, LeaseError};
use crate::migration::{KvmMigratable, MigratableVm, PageBitmap, VmOpError, VmResult};
use crate::vm::Vm;

/// Who this VMM runs the VM as: its host, its epoch, and where the lease lives (none: the VMM
/// runs stand-alone and no lease is checked).
#[derive(Debug)]
pub struct LeaseGuard {
    pub path: Option<PathBuf>,
    pub owner: u64,
    epoch: AtomicU64,
}

impl LeaseGuard {
    pub fn new(path: Option<PathBuf>, owner: u64, epoch: u64) -> Self {
        LeaseGuard {
            path,
            owner,
            epoch: AtomicU64::new(epoch),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Adopt a newer epoch (the supervisor fenced the VM, or a destination's task epoch).
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// Refuse when a lease newer than this VMM's epoch exists (another host took the VM on):
    /// checked before the disk is opened on a migration's destination, whose own epoch the
    /// lease reaches only at the switchover.
    pub fn check_not_stale(&self) -> Result<(), LeaseError> {
        let Some(p) = &self.path else { return Ok(()) };
        match lease::check(p, self.owner, self.epoch()) {
            Err(LeaseError::NotYet { .. }) | Ok(()) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// May this VMM run the VM now? Waits up to `wait` for a lease that has not caught up.
    pub fn check(&self, wait: Duration) -> Result<(), LeaseError> {
        match &self.path {
            None => Ok(()),
            Some(p) => lease::wait_for(p, self.owner, self.epoch(), wait),
        }
    }
}

/// A KVM VM whose resume is gated by the lease.
pub struct GuardedVm {
    inner: KvmMigratable,
    guard: std::sync::Arc<LeaseGuard>,
    /// How long a resume waits for the lease to reach this VMM's epoch.
    resume_wait: Duration,
}

impl GuardedVm {
    pub fn new(
        inner: KvmMigratable,
        guard: std::sync::Arc<LeaseGuard>,
        resume_wait: Duration,
    ) -> Self {
        GuardedVm {
            inner,
            guard,
            resume_wait,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Vm> {
        self.inner.lock()
    }
}

impl MigratableVm for GuardedVm {
    fn memory_bytes(&self) -> u64 {
        self.inner.memory_bytes()
    }
    fn vcpus(&self) -> u32 {
        self.inner.vcpus()
    }
    fn config(&self) -> String {
        self.inner.config()
    }
    fn cpu_features(&self) -> Vec<u32> {
        self.inner.cpu_features()
    }
    fn read_page(&self, pfn: u64, out: &mut [u8]) -> VmResult<()> {
        self.inner.read_page(pfn, out)
    }
    fn write_page(&self, pfn: u64, data: &[u8]) -> VmResult<()> {
        self.inner.write_page(pfn, data)
    }
    fn touched_pages(&self) -> VmResult<PageBitmap> {
        self.inner.touched_pages()
    }
    fn start_dirty_log(&self) -> VmResult<()> {
        self.inner.start_dirty_log()
    }
    fn take_dirty_bitmap(&self) -> VmResult<PageBitmap> {
        self.inner.take_dirty_bitmap()
    }
    fn stop_dirty_log(&self) -> VmResult<()> {
        self.inner.stop_dirty_log()
    }
    fn set_throttle(&self, percent: u8) -> VmResult<()> {
        self.inner.set_throttle(percent)
    }
    fn pause(&self) -> VmResult<()> {
        self.inner.pause()
    }
    /// Never run without a lease naming this host at this VMM's epoch.
    fn resume(&self) -> VmResult<()> {
        self.guard
            .check(self.resume_wait)
            .map_err(|e| VmOpError(format!("not resuming: {e}")))?;
        self.inner.resume()
    }
    fn save_state(&self) -> VmResult<Vec<u8>> {
        self.inner.save_state()
    }
    fn restore_state(&self, state: &[u8]) -> VmResult<()> {
        self.inner.restore_state(state)
    }
    fn stage_state(&self, state: &[u8]) -> VmResult<()> {
        self.inner.stage_state(state)
    }
    fn guest_max_stall_us(&self) -> Option<u64> {
        self.inner.guest_max_stall_us()
    }
}
