//! The virtio-mmio transport and virtio-blk driven through their registers the way a guest
//! driver does, with well-formed and hostile descriptor chains.
use super::blk::{create_image, QUEUE_SIZE};
use super::*;
use crate::devices::MmioDevice;
use crate::memory::{GuestMemory, MIN_MEMORY};
use proptest::prelude::*;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;

const DESC: u64 = 0x10_0000;
const AVAIL: u64 = 0x11_0000;
const USED: u64 = 0x12_0000;
const HDR: u64 = 0x20_0000;
const STATUS: u64 = 0x20_0100;
const BUF: u64 = 0x20_1000;
const QSIZE: u16 = 16;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const DISK: u64 = 1 << 20;

struct Driver {
    dev: VirtioMmio,
    mem: Arc<GuestMemory>,
    avail: u16,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

fn reg_read(dev: &mut VirtioMmio, reg: u32) -> u32 {
    let mut b = [0u8; 4];
    dev.read(u64::from(reg), &mut b);
    u32::from_le_bytes(b)
}

fn reg_write(dev: &mut VirtioMmio, reg: u32, v: u32) {
    dev.write(u64::from(reg), &v.to_le_bytes());
}

fn device(
    read_only: bool,
) -> (
    VirtioMmio,
    Arc<GuestMemory>,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    create_image(&path, DISK).unwrap();
    let mem = Arc::new(GuestMemory::new(MIN_MEMORY).unwrap());
    let blk = Blk::open(&DiskConfig {
        path: path.clone(),
        read_only,
    })
    .unwrap();
    (
        VirtioMmio::new(Box::new(blk), mem.clone()).unwrap(),
        mem,
        dir,
        path,
    )
}

impl Driver {
    fn new(read_only: bool) -> Self {
        let (mut dev, mem, dir, path) = device(read_only);
        let d = &mut dev;
        reg_write(d, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        reg_write(
            d,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        reg_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        reg_write(d, VIRTIO_MMIO_DRIVER_FEATURES, 1 << VIRTIO_BLK_F_FLUSH);
        reg_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        reg_write(d, VIRTIO_MMIO_DRIVER_FEATURES, 1); // VERSION_1
        reg_write(d, VIRTIO_MMIO_STATUS, 0xb);
        assert_eq!(reg_read(d, VIRTIO_MMIO_STATUS), 0xb, "FEATURES_OK accepted");
        reg_write(d, VIRTIO_MMIO_QUEUE_SEL, 0);
        reg_write(d, VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
        reg_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, DESC as u32);
        reg_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        reg_write(d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
        reg_write(d, VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
        reg_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(reg_read(d, VIRTIO_MMIO_QUEUE_READY), 1);
        reg_write(d, VIRTIO_MMIO_STATUS, 0xf);
        Self {
            dev,
            mem,
            avail: 0,
            _dir: dir,
            path,
        }
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = DESC + 16 * u64::from(i);
        self.mem.write_u64(a, addr).unwrap();
        self.mem.write_u32(a + 8, len).unwrap();
        self.mem.write(a + 12, &flags.to_le_bytes()).unwrap();
        self.mem.write(a + 14, &next.to_le_bytes()).unwrap();
    }

    fn header(&self, kind: u32, sector: u64) {
        self.mem.write_u32(HDR, kind).unwrap();
        self.mem.write_u32(HDR + 4, 0).unwrap();
        self.mem.write_u64(HDR + 8, sector).unwrap();
        self.mem.write(STATUS, &[0xee]).unwrap();
    }

    /// Offers the chain at `head`, notifies, returns (used id, used len, status byte).
    fn submit(&mut self, head: u16) -> (u32, u32, u8) {
        let slot = self.avail % QSIZE;
        self.mem
            .write(AVAIL + 4 + 2 * u64::from(slot), &head.to_le_bytes())
            .unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.mem
            .write(AVAIL + 2, &self.avail.to_le_bytes())
            .unwrap();
        reg_write(&mut self.dev, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        let mut idx = [0u8; 2];
        self.mem.read(USED + 2, &mut idx).unwrap();
        assert_eq!(
            u16::from_le_bytes(idx),
            self.avail,
            "request completed at notify"
        );
        let e = USED + 4 + 8 * u64::from(slot);
        let mut st = [0u8];
        self.mem.read(STATUS, &mut st).unwrap();
        (
            self.mem.read_u32(e).unwrap(),
            self.mem.read_u32(e + 4).unwrap(),
            st[0],
        )
    }

    /// header -> data (len, data flags) -> status.
    fn request(&mut self, kind: u32, sector: u64, len: u32, data_flags: u16) -> (u32, u8) {
        self.header(kind, sector);
        self.desc(0, HDR, 16, NEXT, 1);
        self.desc(1, BUF, len, data_flags | NEXT, 2);
        self.desc(2, STATUS, 1, WRITE, 0);
        let (id, used, st) = self.submit(0);
        assert_eq!(id, 0);
        (used, st)
    }

    fn file_bytes(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        std::fs::File::open(&self.path)
            .unwrap()
            .read_exact_at(&mut v, off)
            .unwrap();
        v
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

#[test]
fn identity_features_and_config() {
    let (mut d, _mem, _dir, _) = device(false);
    assert_eq!(reg_read(&mut d, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(reg_read(&mut d, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(reg_read(&mut d, VIRTIO_MMIO_DEVICE_ID), 2);
    reg_write(&mut d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        reg_read(&mut d, VIRTIO_MMIO_DEVICE_FEATURES) & 1,
        1,
        "VERSION_1"
    );
    reg_write(&mut d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let f = reg_read(&mut d, VIRTIO_MMIO_DEVICE_FEATURES);
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        reg_read(&mut d, VIRTIO_MMIO_QUEUE_NUM_MAX),
        u32::from(QUEUE_SIZE)
    );
    let mut cap = [0u8; 8];
    d.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK / 512);
    let mut past = [0xffu8; 4];
    d.read(0x100 + 4096 - 0x100 - 2, &mut past);
    assert_eq!(past, [0; 4], "past the config space reads zero");
}

#[test]
fn feature_negotiation_refuses_unknown_bits_and_legacy_drivers() {
    for (lo, hi) in [(1u32 << 30, 1u32), (1 << VIRTIO_BLK_F_FLUSH, 0)] {
        let (mut d, _mem, _dir, _) = device(false);
        reg_write(&mut d, VIRTIO_MMIO_STATUS, 3);
        reg_write(&mut d, VIRTIO_MMIO_DRIVER_FEATURES, lo);
        reg_write(&mut d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        reg_write(&mut d, VIRTIO_MMIO_DRIVER_FEATURES, hi);
        reg_write(&mut d, VIRTIO_MMIO_STATUS, 0xb);
        assert_eq!(
            reg_read(&mut d, VIRTIO_MMIO_STATUS),
            3,
            "FEATURES_OK not kept"
        );
        // Without FEATURES_OK the queue cannot be set up.
        reg_write(&mut d, VIRTIO_MMIO_QUEUE_NUM, 16);
        reg_write(&mut d, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(reg_read(&mut d, VIRTIO_MMIO_QUEUE_READY), 0);
    }
}

#[test]
fn write_flush_read_round_trip_and_interrupts() {
    let mut drv = Driver::new(false);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    drv.mem.write(BUF, &data).unwrap();
    assert_eq!(drv.request(VIRTIO_BLK_T_OUT, 8, 4096, 0), (1, OK));
    assert_eq!(drv.file_bytes(8 * 512, 4096), data);
    assert!(drv.dev.irq_level());
    assert_eq!(reg_read(&mut drv.dev, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    reg_write(&mut drv.dev, VIRTIO_MMIO_INTERRUPT_ACK, 1);
    assert!(!drv.dev.irq_level());

    drv.header(VIRTIO_BLK_T_FLUSH, 0);
    drv.desc(0, HDR, 16, NEXT, 2);
    drv.desc(2, STATUS, 1, WRITE, 0);
    assert_eq!(drv.submit(0).2, OK);

    drv.mem.write(BUF, &[0u8; 4096]).unwrap();
    let _ = drv.mem.take_vmm_dirty();
    assert_eq!(drv.request(VIRTIO_BLK_T_IN, 8, 4096, WRITE), (4097, OK));
    let mut back = vec![0u8; 4096];
    drv.mem.read(BUF, &mut back).unwrap();
    assert_eq!(back, data);
    // The device's writes (data, status, used ring) are in the dirty log for migration.
    let dirty = drv.mem.take_vmm_dirty();
    for page in [BUF / 4096, STATUS / 4096, USED / 4096] {
        assert_ne!(
            dirty[(page / 64) as usize] & (1 << (page % 64)),
            0,
            "page {page:#x}"
        );
    }

    drv.header(VIRTIO_BLK_T_GET_ID, 0);
    drv.desc(0, HDR, 16, NEXT, 1);
    drv.desc(1, BUF, 20, WRITE | NEXT, 2);
    drv.desc(2, STATUS, 1, WRITE, 0);
    assert_eq!(drv.submit(0).1, 21);
    let mut id = [0u8; 4];
    drv.mem.read(BUF, &mut id).unwrap();
    assert_eq!(&id, b"disk");
}

#[test]
fn hostile_requests_get_ioerr_and_change_nothing() {
    let mut drv = Driver::new(false);
    drv.mem.write(BUF, &[0x5a; 8192]).unwrap();
    let last = DISK / 512;
    // Past the end, straddling the end, sector overflow, partial sector.
    assert_eq!(drv.request(VIRTIO_BLK_T_OUT, last, 512, 0).1, IOERR);
    assert_eq!(drv.request(VIRTIO_BLK_T_OUT, last - 1, 1024, 0).1, IOERR);
    assert_eq!(drv.request(VIRTIO_BLK_T_OUT, u64::MAX, 512, 0).1, IOERR);
    assert_eq!(drv.request(VIRTIO_BLK_T_OUT, 0, 100, 0).1, IOERR);
    // Wrong data direction for the request type.
    assert_eq!(drv.request(VIRTIO_BLK_T_OUT, 0, 512, WRITE).1, IOERR);
    assert_eq!(drv.request(VIRTIO_BLK_T_IN, 0, 512, 0).1, IOERR);
    // Data outside guest memory, or wrapping the address space.
    drv.header(VIRTIO_BLK_T_IN, 0);
    for addr in [MIN_MEMORY - 256, u64::MAX - 100] {
        drv.desc(0, HDR, 16, NEXT, 1);
        drv.desc(1, addr, 512, WRITE | NEXT, 2);
        drv.desc(2, STATUS, 1, WRITE, 0);
        assert_eq!(drv.submit(0).2, IOERR);
    }
    // A write-only header, a short header, a header outside memory.
    for (addr, len, flags) in [(HDR, 16, WRITE), (HDR, 8, 0), (MIN_MEMORY, 16, 0)] {
        drv.header(VIRTIO_BLK_T_OUT, 0);
        drv.desc(0, addr, len, flags | NEXT, 1);
        drv.desc(1, BUF, 512, NEXT, 2);
        drv.desc(2, STATUS, 1, WRITE, 0);
        assert_eq!(drv.submit(0).2, IOERR);
    }
    // A loop: 0 -> 1 -> 0 ... never reaches a status descriptor.
    drv.header(VIRTIO_BLK_T_OUT, 0);
    drv.desc(0, HDR, 16, NEXT, 1);
    drv.desc(1, STATUS, 1, WRITE | NEXT, 0);
    assert_eq!(drv.submit(0).2, IOERR);
    // Next index past the table.
    drv.header(VIRTIO_BLK_T_OUT, 0);
    drv.desc(0, HDR, 16, NEXT, 1000);
    assert_eq!(drv.submit(0).1, 0);
    // A read-only status descriptor: nothing can be reported, nothing is written.
    drv.header(VIRTIO_BLK_T_OUT, 0);
    drv.desc(0, HDR, 16, NEXT, 1);
    drv.desc(1, BUF, 512, NEXT, 2);
    drv.desc(2, STATUS, 1, 0, 0);
    assert_eq!(drv.submit(0), (0, 0, 0xee));
    // Header only (no status), and an unknown request type.
    drv.desc(0, HDR, 16, 0, 0);
    assert_eq!(drv.submit(0).1, 0);
    drv.header(99, 0);
    drv.desc(0, HDR, 16, NEXT, 2);
    drv.desc(2, STATUS, 1, WRITE, 0);
    assert_eq!(drv.submit(0).2, VIRTIO_BLK_S_UNSUPP as u8);
    // FLUSH with data attached, GET_ID with a readable buffer.
    assert_eq!(drv.request(VIRTIO_BLK_T_FLUSH, 0, 512, 0).1, IOERR);
    assert_eq!(drv.request(VIRTIO_BLK_T_GET_ID, 0, 20, 0).1, IOERR);
    assert!(
        drv.file_bytes(0, DISK as usize).iter().all(|&b| b == 0),
        "disk untouched"
    );
    // The queue still works after all that.
    assert_eq!(drv.request(VIRTIO_BLK_T_OUT, 0, 512, 0), (1, OK));
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut drv = Driver::new(true);
    drv.mem.write(BUF, &[1; 512]).unwrap();
    assert_eq!(drv.request(VIRTIO_BLK_T_OUT, 0, 512, 0).1, IOERR);
    assert_eq!(drv.request(VIRTIO_BLK_T_IN, 0, 512, WRITE).1, OK);
    assert!(drv.file_bytes(0, 512).iter().all(|&b| b == 0));
}

#[test]
fn queue_outside_memory_is_refused_and_reset_clears() {
    let (mut d, _mem, _dir, _) = device(false);
    reg_write(&mut d, VIRTIO_MMIO_STATUS, 3);
    reg_write(&mut d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    reg_write(&mut d, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    reg_write(&mut d, VIRTIO_MMIO_STATUS, 0xb);
    reg_write(&mut d, VIRTIO_MMIO_QUEUE_NUM, 16);
    reg_write(&mut d, VIRTIO_MMIO_QUEUE_DESC_LOW, (MIN_MEMORY - 16) as u32);
    reg_write(&mut d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
    reg_write(&mut d, VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
    reg_write(&mut d, VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(reg_read(&mut d, VIRTIO_MMIO_QUEUE_READY), 0);
    reg_write(&mut d, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(reg_read(&mut d, VIRTIO_MMIO_STATUS), 0);
}

#[test]
fn state_section_restores_a_working_queue() {
    let mut drv = Driver::new(false);
    drv.mem.write(BUF, &[7; 512]).unwrap();
    assert_eq!(drv.request(VIRTIO_BLK_T_OUT, 1, 512, 0).1, OK);
    let section = drv.dev.save().unwrap();
    // A fresh device on the same file and memory (as a migration destination has).
    let blk = Blk::open(&DiskConfig {
        path: drv.path.clone(),
        read_only: false,
    })
    .unwrap();
    let mut fresh = VirtioMmio::new(Box::new(blk), drv.mem.clone()).unwrap();
    fresh.restore(&section).unwrap();
    assert_eq!(fresh.save().unwrap(), section);
    assert_eq!(reg_read(&mut fresh, VIRTIO_MMIO_STATUS), 0xf);
    drv.dev = fresh;
    drv.mem.write(BUF, &[0; 512]).unwrap();
    assert_eq!(drv.request(VIRTIO_BLK_T_IN, 1, 512, WRITE), (513, OK));
    let mut b = [0u8; 512];
    drv.mem.read(BUF, &mut b).unwrap();
    assert_eq!(b, [7; 512]);
    // Another version, a read-only disk (other features), garbage: refused.
    let mut bad = section.clone();
    bad.version = 9;
    assert!(drv.dev.restore(&bad).is_err());
    let (mut ro, _m, _d, _) = device(true);
    assert!(ro.restore(&section).is_err());
    bad = section.clone();
    bad.data = serde_json::json!({"status": "x"});
    assert!(drv.dev.restore(&bad).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Arbitrary descriptor tables and avail rings: the device answers or drops, never panics,
    /// and never writes outside the requested sectors of a 1 MiB disk.
    #[test]
    fn random_chains_never_panic(
        table in proptest::collection::vec(any::<(u64, u32, u16, u16)>(), 16),
        heads in proptest::collection::vec(0u16..20, 1..8),
        kinds in proptest::collection::vec(0u32..10, 1..8),
    ) {
        let mut drv = Driver::new(false);
        for (i, &(addr, len, flags, next)) in table.iter().enumerate() {
            // Mix plausible addresses in, so that some chains get deep.
            let addr = if addr % 2 == 0 { BUF + addr % 0x10000 } else { addr };
            drv.desc(i as u16, addr, len % 0x3000, flags & 7, next % 20);
        }
        for (h, k) in heads.iter().zip(kinds.iter().cycle()) {
            drv.mem.write_u32(HDR, *k).unwrap();
            let slot = drv.avail % QSIZE;
            drv.mem.write(AVAIL + 4 + 2 * u64::from(slot), &h.to_le_bytes()).unwrap();
            drv.avail = drv.avail.wrapping_add(1);
            drv.mem.write(AVAIL + 2, &drv.avail.to_le_bytes()).unwrap();
            reg_write(&mut drv.dev, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        }
    }
}
