//! virtio-blk backed by a raw (sparse) image file: IN, OUT, FLUSH (fdatasync) and GET_ID.
//! Requests are served on the notifying vCPU's thread, so none is in flight once the vCPUs
//! are paused. Every request is validated (descriptor directions and lengths, chain shape,
//! addresses inside guest memory, sector range) and a bad one is answered IOERR or UNSUPP,
//! never a panic.
use super::{read_config_bytes, VirtioDevice};
use crate::error::{Error, Result};
use crate::memory::DeviceMemory;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Descriptors in the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments a request may have (the header and the status take two descriptors).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// `virtio_blk_outhdr`: type, reserved, sector.
const HEADER_LEN: u32 = 16;

/// A disk to attach: a raw image file (on the shared datastore), opened read-write unless
/// `read_only`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Creates (or extends) a sparse raw image of `size` bytes at `path`; an existing image
/// keeps its contents. `size` must be a non-zero multiple of 512.
pub fn create_image(path: &Path, size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
        return Err(Error::Config(format!(
            "disk size {size} is not a non-zero multiple of {SECTOR_SIZE} bytes"
        )));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::Config(format!("disk image {}: {e}", path.display())))?;
    if f.metadata()?.len() < size {
        f.set_len(size)?;
    }
    Ok(())
}

/// The virtio-blk device.
pub struct Blk {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    config: Vec<u8>,
}

/// What the device answers in the status byte.
type Status = u32;

impl Blk {
    /// Opens the image (O_RDWR, or read-only); its size, a multiple of 512, is the capacity.
    pub fn open(cfg: &DiskConfig) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .open(&cfg.path)
            .map_err(|e| Error::Config(format!("disk image {}: {e}", cfg.path.display())))?;
        let len = file.metadata()?.len();
        if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
            return Err(Error::Config(format!(
                "disk image {} is {len} bytes, not a non-zero multiple of {SECTOR_SIZE}",
                cfg.path.display()
            )));
        }
        let capacity_sectors = len / SECTOR_SIZE;
        // struct virtio_blk_config up to blk_size: capacity, size_max, seg_max, geometry.
        let mut config = Vec::with_capacity(24);
        config.extend_from_slice(&capacity_sectors.to_le_bytes());
        config.extend_from_slice(&0u32.to_le_bytes());
        config.extend_from_slice(&SEG_MAX.to_le_bytes());
        config.extend_from_slice(&[0u8; 4]);
        config.extend_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = cfg
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (d, s) in id.iter_mut().zip(name.bytes()) {
            *d = s;
        }
        Ok(Self {
            file,
            read_only: cfg.read_only,
            capacity_sectors,
            id,
            config,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Serves one chain; returns the bytes written into the driver's buffers (used length).
    fn serve(&mut self, descs: &[Descriptor], chain_complete: bool, mem: &DeviceMemory) -> u32 {
        // The status byte is the last byte of the last descriptor, which must be writable and
        // inside guest memory; without it nothing can be reported.
        let Some(last) = descs.last() else {
            return 0;
        };
        if !last.is_write_only() || last.len() == 0 || !in_memory(mem, last) {
            tracing::debug!("virtio-blk: request without a usable status byte dropped");
            return 0;
        }
        let status_addr = GuestAddress(last.addr().0 + u64::from(last.len()) - 1);
        let (status, written) = if chain_complete {
            self.execute(descs, mem)
        } else {
            (VIRTIO_BLK_S_IOERR, 0)
        };
        if mem.write_obj(status as u8, status_addr).is_err() {
            return 0;
        }
        written + 1
    }

    /// Checks the chain's shape and runs the request: (status, data bytes written).
    fn execute(&mut self, descs: &[Descriptor], mem: &DeviceMemory) -> (Status, u32) {
        let ioerr = (VIRTIO_BLK_S_IOERR, 0);
        let (header, rest) = match descs.split_first() {
            Some(x) => x,
            None => return ioerr,
        };
        let (status_desc, data) = match rest.split_last() {
            Some(x) => x,
            None => return ioerr,
        };
        if header.is_write_only() || header.len() < HEADER_LEN || !in_memory(mem, header) {
            return ioerr;
        }
        if data.len() > SEG_MAX as usize || descs.iter().any(|d| !in_memory(mem, d)) {
            return ioerr;
        }
        // The status descriptor carries only the status byte (Linux's layout); a longer one
        // would put data in it, which this device does not accept.
        if status_desc.len() != 1 {
            return ioerr;
        }
        let (Ok(kind), Ok(sector)) = (
            mem.read_obj::<u32>(header.addr()),
            mem.read_obj::<u64>(GuestAddress(header.addr().0 + 8)),
        ) else {
            return ioerr;
        };
        match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let out = kind == VIRTIO_BLK_T_OUT;
                // OUT data is read by the device, IN data written by it.
                if data.iter().any(|d| d.is_write_only() == out) {
                    return ioerr;
                }
                if out && self.read_only {
                    return ioerr;
                }
                let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
                if !total.is_multiple_of(SECTOR_SIZE) {
                    return ioerr;
                }
                let end = sector.checked_add(total / SECTOR_SIZE);
                if end.is_none_or(|e| e > self.capacity_sectors) {
                    return ioerr;
                }
                match self.transfer(out, sector * SECTOR_SIZE, data, mem) {
                    Ok(()) if out => (VIRTIO_BLK_S_OK, 0),
                    Ok(()) => (VIRTIO_BLK_S_OK, total as u32),
                    Err(e) => {
                        tracing::warn!(error = %e, sector, "virtio-blk I/O failed");
                        ioerr
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if !data.is_empty() {
                    return ioerr;
                }
                match self.file.sync_data() {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        tracing::warn!(error = %e, "virtio-blk flush failed");
                        ioerr
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let [d] = data else { return ioerr };
                if !d.is_write_only() {
                    return ioerr;
                }
                let n = (d.len() as usize).min(self.id.len());
                match mem.write_slice(&self.id[..n], d.addr()) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n as u32),
                    Err(_) => ioerr,
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// Moves the data of a validated request between guest memory and the image.
    fn transfer(
        &mut self,
        out: bool,
        offset: u64,
        data: &[Descriptor],
        mem: &DeviceMemory,
    ) -> std::result::Result<(), String> {
        let mut f = &self.file;
        f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
        for d in data {
            let len = d.len() as usize;
            if out {
                mem.write_all_volatile_to(d.addr(), &mut f, len)
            } else {
                mem.read_exact_volatile_from(d.addr(), &mut f, len)
            }
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn in_memory(mem: &DeviceMemory, d: &Descriptor) -> bool {
    mem.check_range(d.addr(), d.len() as usize)
}

impl VirtioDevice for Blk {
    fn kind(&self) -> &'static str {
        "virtio-blk"
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_SEG_MAX;
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &DeviceMemory) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            // The chain iterator stops after queue-size descriptors (loops) and at
            // descriptors it cannot read; a chain cut short still wants "next".
            let descs: Vec<Descriptor> = chain.collect();
            let complete = descs.last().is_some_and(|d| !d.has_next());
            let len = self.serve(&descs, complete, mem);
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!(error = %e, "virtio-blk: cannot complete request");
                break;
            }
            used = true;
        }
        used
    }
}
