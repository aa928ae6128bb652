//! [`MigratableVm`] for the real KVM [`Vm`]: page access goes straight to guest memory (safe
//! while vCPUs run), control operations take the VM's lock.
use std::sync::{Arc, Mutex, MutexGuard};

use super::bitmap::PageBitmap;
use super::messages::PAGE_SIZE;
use super::vm::{MigratableVm, VmOpError, VmResult};
use crate::cpu::CpuFeatures;
use crate::memory::GuestMemory;
use crate::state::VmState;
use crate::vm::Vm;

/// CPUID leaves, in the order their (ebx, ecx, edx) words travel in `Hello.cpu_features`.
const FEATURE_LEAVES: [(u32, u32); 4] = [(1, 0), (7, 0), (0xd, 1), (0x8000_0001, 0)];

/// Flatten CPU features into the protocol's bit-mask words (vendor is compared separately,
/// through the VM config string).
pub fn feature_words(f: &CpuFeatures) -> Vec<u32> {
    FEATURE_LEAVES
        .iter()
        .flat_map(|&(leaf, sub)| {
            let l = f.leaves.iter().find(|l| l.0 == leaf && l.1 == sub);
            l.map_or([0; 3], |l| [l.3, l.4, l.5])
        })
        .collect()
}

/// A KVM VM being migrated (or received into).
pub struct KvmMigratable {
    vm: Mutex<Vm>,
    mem: Arc<GuestMemory>,
    config: String,
    /// State decoded when it arrived (destination), with the bytes it came from.
    staged: Mutex<Option<(Vec<u8>, VmState)>>,
}

impl KvmMigratable {
    /// `config` is what a destination needs to rebuild the VM (e.g. memory, vCPUs, workload).
    pub fn new(vm: Vm, config: String) -> Self {
        let mem = vm.memory().clone();
        KvmMigratable {
            vm: Mutex::new(vm),
            mem,
            config,
            staged: Mutex::new(None),
        }
    }

    /// The VM, e.g. to read its guest status.
    pub fn lock(&self) -> MutexGuard<'_, Vm> {
        self.vm.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn into_inner(self) -> Vm {
        self.vm.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

fn err(e: crate::error::Error) -> VmOpError {
    VmOpError(e.to_string())
}

fn page(buf: &[u8]) -> VmResult<&[u8; PAGE_SIZE]> {
    buf.try_into()
        .map_err(|_| VmOpError(format!("page buffer of {} bytes", buf.len())))
}

impl MigratableVm for KvmMigratable {
    fn memory_bytes(&self) -> u64 {
        self.mem.size()
    }
    fn vcpus(&self) -> u32 {
        self.lock().config().vcpus as u32
    }
    fn config(&self) -> String {
        self.config.clone()
    }
    fn cpu_features(&self) -> Vec<u32> {
        feature_words(&self.lock().cpu_features())
    }
    fn read_page(&self, pfn: u64, out: &mut [u8]) -> VmResult<()> {
        let out: &mut [u8; PAGE_SIZE] = out
            .try_into()
            .map_err(|_| VmOpError("page buffer is not one page".into()))?;
        self.mem.read_page(pfn, out).map_err(err)
    }
    fn write_page(&self, pfn: u64, data: &[u8]) -> VmResult<()> {
        self.mem.write_page(pfn, page(data)?).map_err(err)
    }
    fn touched_pages(&self) -> VmResult<PageBitmap> {
        let pages = self.mem.page_count();
        Ok(PageBitmap::from_words(
            self.mem.touched_bitmap().map_err(err)?,
            pages,
        ))
    }
    fn start_dirty_log(&self) -> VmResult<()> {
        self.lock().set_dirty_logging(true).map_err(err)
    }
    fn take_dirty_bitmap(&self) -> VmResult<PageBitmap> {
        let bits = self.lock().take_dirty_bitmap().map_err(err)?;
        Ok(PageBitmap::from_words(bits, self.mem.page_count()))
    }
    fn stop_dirty_log(&self) -> VmResult<()> {
        self.lock().set_dirty_logging(false).map_err(err)
    }
    fn set_throttle(&self, percent: u8) -> VmResult<()> {
        self.lock().set_throttle(percent).map_err(err)
    }
    fn pause(&self) -> VmResult<()> {
        self.lock().pause().map(|_| ()).map_err(err)
    }
    fn resume(&self) -> VmResult<()> {
        self.lock().resume().map(|_| ()).map_err(err)
    }
    fn save_state(&self) -> VmResult<Vec<u8>> {
        self.lock()
            .save_state()
            .and_then(|s| s.to_bytes())
            .map_err(err)
    }
    fn restore_state(&self, state: &[u8]) -> VmResult<()> {
        let staged = self
            .staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|(bytes, _)| bytes == state);
        let s = match staged {
            Some((_, s)) => s,
            None => VmState::from_bytes(state).map_err(err)?,
        };
        self.lock().restore_state(&s).map_err(err)
    }
    fn stage_state(&self, state: &[u8]) -> VmResult<()> {
        let s = VmState::from_bytes(state).map_err(err)?;
        *self.staged.lock().unwrap_or_else(|p| p.into_inner()) = Some((state.to_vec(), s));
        Ok(())
    }
    fn guest_max_stall_us(&self) -> Option<u64> {
        self.lock()
            .guest_status()
            .ok()
            .and_then(|s| s.max_stall_us())
    }
}
