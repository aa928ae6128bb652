//! Guest RAM: one anonymous mapping registered with KVM as slot 0 at guest-physical 0.
//!
//! Access from the host goes through raw-pointer copies so that it is safe to use while
//! vCPUs run (the guest may change bytes underneath, exactly as on real hardware); the API
//! outside is safe and bounds-checked. Pages written by the VMM itself are recorded in a
//! bitmap of their own, merged into the KVM dirty log by the VM. Devices see the same
//! mapping as a `vm-memory` [`DeviceMemory`], whose own dirty bitmap is merged the same way.
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Guest memory as the rust-vmm device crates (`virtio-queue`) see it: the same mapping,
/// with every device write recorded in an [`AtomicBitmap`] for migration.
pub type DeviceMemory = GuestMemoryMmap<AtomicBitmap>;

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;

/// Largest supported guest RAM: one flat slot below the 32-bit MMIO hole (LAPIC/IOAPIC).
pub const MAX_MEMORY: u64 = 3 << 30;
/// Smallest guest RAM that holds the multiboot image, status page and some working set.
pub const MIN_MEMORY: u64 = 32 << 20;

/// Guest RAM. Owns the mapping; unmapped on drop.
pub struct GuestMemory {
    ptr: *mut u8,
    size: u64,
    vmm_dirty: Vec<AtomicU64>,
    /// A view of the same mapping for devices; it does not own (or unmap) it.
    device_view: DeviceMemory,
}

// SAFETY: the mapping is owned by this value and only accessed by byte copies through
// raw pointers; concurrent access from several threads (and the guest) is the point.
unsafe impl Send for GuestMemory {}
// SAFETY: see above; no references into the mapping are ever handed out.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Maps `size` bytes of zeroed anonymous memory. `size` must be page aligned and within
    /// [`MIN_MEMORY`]..=[`MAX_MEMORY`].
    pub fn new(size: u64) -> Result<Self> {
        if size & (PAGE_SIZE - 1) != 0 {
            return Err(Error::Config(format!(
                "memory size {size} is not a multiple of 4 KiB"
            )));
        }
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) {
            return Err(Error::Config(format!(
                "memory size {} MiB is outside the supported {}..={} MiB",
                size >> 20,
                MIN_MEMORY >> 20,
                MAX_MEMORY >> 20
            )));
        }
        // SAFETY: anonymous private mapping, no fd, checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Memory(format!(
                "mmap of {} MiB failed: {}",
                size >> 20,
                std::io::Error::last_os_error()
            )));
        }
        let pages = size / PAGE_SIZE;
        let words = pages.div_ceil(64) as usize;
        let device_view = match device_view(ptr.cast(), size) {
            Ok(v) => v,
            Err(e) => {
                // SAFETY: we mapped it above and nothing else refers to it yet.
                unsafe { libc::munmap(ptr, size as usize) };
                return Err(e);
            }
        };
        Ok(Self {
            ptr: ptr.cast(),
            size,
            vmm_dirty: (0..words).map(|_| AtomicU64::new(0)).collect(),
            device_view,
        })
    }

    /// The device view of this memory (`vm-memory`), for descriptor chains and device I/O.
    pub fn device_view(&self) -> &DeviceMemory {
        &self.device_view
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of 4 KiB pages.
    pub fn page_count(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Host address of guest-physical 0, for KVM_SET_USER_MEMORY_REGION.
    pub(crate) fn host_addr(&self) -> u64 {
        self.ptr as u64
    }

    fn check(&self, addr: u64, len: u64) -> Result<()> {
        match addr.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange {
                addr,
                len,
                size: self.size,
            }),
        }
    }

    /// Copies guest memory at `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.check(addr, buf.len() as u64)?;
        // SAFETY: range checked to lie inside the mapping; `buf` is a distinct host buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.add(addr as usize), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copies `data` into guest memory at `addr` and marks the pages dirty.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.check(addr, data.len() as u64)?;
        // SAFETY: range checked to lie inside the mapping; `data` is a distinct host buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(addr as usize), data.len())
        };
        if !data.is_empty() {
            let first = addr / PAGE_SIZE;
            let last = (addr + data.len() as u64 - 1) / PAGE_SIZE;
            for page in first..=last {
                self.vmm_dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Reads page number `page` (4 KiB).
    pub fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE as usize]) -> Result<()> {
        self.read(page.saturating_mul(PAGE_SIZE), buf)
    }

    /// Writes page number `page` (4 KiB).
    pub fn write_page(&self, page: u64, data: &[u8; PAGE_SIZE as usize]) -> Result<()> {
        self.write(page.saturating_mul(PAGE_SIZE), data)
    }

    pub fn read_u32(&self, addr: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn write_u32(&self, addr: u64, v: u32) -> Result<()> {
        self.write(addr, &v.to_le_bytes())
    }

    pub fn write_u64(&self, addr: u64, v: u64) -> Result<()> {
        self.write(addr, &v.to_le_bytes())
    }

    /// Takes (and clears) the bitmap of pages the VMM wrote, one bit per page, LSB first.
    /// Includes the pages devices wrote through [`Self::device_view`].
    pub(crate) fn take_vmm_dirty(&self) -> Vec<u64> {
        let mut bits: Vec<u64> = self
            .vmm_dirty
            .iter()
            .map(|w| w.swap(0, Ordering::Relaxed))
            .collect();
        for region in self.device_view.iter() {
            // One region at guest-physical 0, one bit per 4 KiB page, LSB first: same layout.
            for (b, d) in bits
                .iter_mut()
                .zip(MmapRegion::bitmap(region).get_and_reset())
            {
                *b |= d;
            }
        }
        bits
    }

    /// Bitmap (one bit per page, LSB first in each u64) of pages that were ever touched,
    /// i.e. are backed by host memory. Untouched pages read as zero and need not be copied.
    pub fn touched_bitmap(&self) -> Result<Vec<u64>> {
        let pages = self.page_count() as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: the mapping is `size` bytes long and page aligned; `vec` has one byte per page.
        let rc = unsafe { libc::mincore(self.ptr.cast(), self.size as usize, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(Error::Memory(format!(
                "mincore failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        let mut bits = vec![0u64; pages.div_ceil(64)];
        for (i, v) in vec.iter().enumerate() {
            if v & 1 != 0 {
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        Ok(bits)
    }

    /// Back pages `first..first + count` with host memory now (write-fault them in without
    /// changing their contents), so later copies into them do not fault. Safe alongside
    /// concurrent reads and writes of the same pages.
    pub fn populate(&self, first: u64, count: u64) -> Result<()> {
        let (addr, len) = (
            first.saturating_mul(PAGE_SIZE),
            count.saturating_mul(PAGE_SIZE),
        );
        self.check(addr, len)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: range checked to lie inside our mapping; MADV_POPULATE_WRITE only faults
        // pages in (present pages are left as they are).
        let rc = unsafe {
            libc::madvise(
                self.ptr.add(addr as usize).cast(),
                len as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            return Err(Error::Memory(format!(
                "populating {} pages at page {first}: {}",
                count,
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Number of pages ever touched.
    pub fn touched_pages(&self) -> Result<u64> {
        Ok(self
            .touched_bitmap()?
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum())
    }
}

/// Wraps the mapping at `ptr` (`size` bytes, owned by the caller) as a one-region
/// [`DeviceMemory`] at guest-physical 0.
fn device_view(ptr: *mut u8, size: u64) -> Result<DeviceMemory> {
    let err = |e: String| Error::Memory(format!("device view of guest memory: {e}"));
    // SAFETY: `ptr..ptr + size` is a live private anonymous read/write mapping owned by the
    // `GuestMemory` that also owns the returned view, so it outlives the view; a raw region
    // is never unmapped by vm-memory.
    let region = unsafe {
        MmapRegion::<AtomicBitmap>::build_raw(
            ptr,
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )
    }
    .map_err(|e| err(e.to_string()))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| err("region overflows".into()))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| err(e.to_string()))
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; nothing refers to it once the VM (and KVM slot) is gone.
        unsafe { libc::munmap(self.ptr.cast(), self.size as usize) };
    }
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory")
            .field("size", &self.size)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_and_bounds() {
        let m = GuestMemory::new(MIN_MEMORY).unwrap();
        m.write_u64(0x1000, 0xdead_beef).unwrap();
        assert_eq!(m.read_u64(0x1000).unwrap(), 0xdead_beef);
        assert!(m.read_u64(MIN_MEMORY - 4).is_err());
        assert!(m.write(u64::MAX, &[1]).is_err());
        let dirty = m.take_vmm_dirty();
        assert_eq!(dirty[0], 0b10);
        assert_eq!(m.take_vmm_dirty()[0], 0);
        assert!(m.touched_pages().unwrap() >= 1);
    }

    #[test]
    fn device_writes_are_dirty_and_visible() {
        use vm_memory::Bytes;
        let m = GuestMemory::new(MIN_MEMORY).unwrap();
        let _ = m.take_vmm_dirty();
        m.device_view()
            .write_obj(0x1234_5678_u64, GuestAddress(0x5008))
            .unwrap();
        assert_eq!(m.read_u64(0x5008).unwrap(), 0x1234_5678);
        let dirty = m.take_vmm_dirty();
        assert_eq!(dirty[0], 1 << 5);
        assert_eq!(m.take_vmm_dirty()[0], 0);
        assert!(m
            .device_view()
            .write_obj(1u64, GuestAddress(MIN_MEMORY))
            .is_err());
    }

    #[test]
    fn populate_keeps_contents_and_marks_touched() {
        let m = GuestMemory::new(MIN_MEMORY).unwrap();
        m.write_u64(0x3000, 42).unwrap();
        m.populate(0, 16).unwrap();
        assert_eq!(m.read_u64(0x3000).unwrap(), 42);
        let bits = m.touched_bitmap().unwrap();
        assert_eq!(bits[0] & 0xffff, 0xffff);
        assert!(m.populate(m.page_count() - 1, 2).is_err());
    }

    #[test]
    fn impossible_sizes_are_refused() {
        assert!(GuestMemory::new(0).is_err());
        assert!(GuestMemory::new(MIN_MEMORY + 1).is_err());
        assert!(GuestMemory::new(MAX_MEMORY * 2).is_err());
    }
}
