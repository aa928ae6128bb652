//! Protocol tests over real loopback TCP with an in-memory stand-in VM (`InMemoryTestVm`,
//! clearly not a VMM: it exists only to exercise the protocol deterministically). The
//! end-to-end tests with real KVM guests in two `tern` processes live in tests/migration_*.rs.
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::frame::header;
use super::messages::{recv, send, Message};
use super::*;

/// Guest memory as atomics so a "guest" thread can write while the migration reads.
struct InMemoryTestVm {
    words: Vec<AtomicU64>,
    dirty: Mutex<PageBitmap>,
    touched: Mutex<PageBitmap>,
    paused: AtomicBool,
    throttle: AtomicU8,
    state: Mutex<Vec<u8>>,
    features: Vec<u32>,
    /// Held by the guest thread while it writes a batch, so `pause` returns only once the
    /// guest has stopped writing, as a KVM pause returns only once the vCPUs are out.
    running: Mutex<()>,
}

const WORDS: usize = PAGE_SIZE / 8;

impl std::fmt::Debug for InMemoryTestVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InMemoryTestVm({} pages)", self.pages())
    }
}

impl InMemoryTestVm {
    fn new(pages: u64) -> Arc<Self> {
        Arc::new(InMemoryTestVm {
            words: (0..pages as usize * WORDS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            dirty: Mutex::new(PageBitmap::empty(pages)),
            touched: Mutex::new(PageBitmap::empty(pages)),
            paused: AtomicBool::new(false),
            throttle: AtomicU8::new(0),
            state: Mutex::new(b"vcpu-state".to_vec()),
            features: vec![0b1011],
            running: Mutex::new(()),
        })
    }
    fn pages(&self) -> u64 {
        (self.words.len() / WORDS) as u64
    }
    fn guest_write(&self, pfn: u64, value: u64) {
        for w in 0..WORDS {
            self.words[pfn as usize * WORDS + w].store(value ^ w as u64, Ordering::Relaxed);
        }
        self.dirty.lock().unwrap().set(pfn);
        self.touched.lock().unwrap().set(pfn);
    }
    /// A guest thread dirtying `per_ms` pages each millisecond (scaled down by the throttle)
    /// until `stop`.
    fn run_guest(
        self: &Arc<Self>,
        per_ms: u64,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        let vm = self.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                {
                    let _running = vm.running.lock().unwrap();
                    if !vm.paused.load(Ordering::SeqCst) {
                        let n = per_ms * (100 - vm.throttle.load(Ordering::SeqCst) as u64) / 100;
                        for _ in 0..n {
                            vm.guest_write((i * 7919) % vm.pages(), i + 1);
                            i += 1;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    }
}

impl MigratableVm for Arc<InMemoryTestVm> {
    fn memory_bytes(&self) -> u64 {
        self.pages() * PAGE_SIZE as u64
    }
    fn vcpus(&self) -> u32 {
        1
    }
    fn config(&self) -> String {
        "test".into()
    }
    fn cpu_features(&self) -> Vec<u32> {
        self.features.clone()
    }
    fn read_page(&self, pfn: u64, out: &mut [u8]) -> VmResult<()> {
        for (w, chunk) in out.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(
                &self.words[pfn as usize * WORDS + w]
                    .load(Ordering::Relaxed)
                    .to_le_bytes(),
            );
        }
        Ok(())
    }
    fn write_page(&self, pfn: u64, data: &[u8]) -> VmResult<()> {
        for (w, chunk) in data.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(chunk);
            self.words[pfn as usize * WORDS + w].store(u64::from_le_bytes(a), Ordering::Relaxed);
        }
        Ok(())
    }
    fn touched_pages(&self) -> VmResult<PageBitmap> {
        Ok(self.touched.lock().unwrap().clone())
    }
    fn start_dirty_log(&self) -> VmResult<()> {
        *self.dirty.lock().unwrap() = PageBitmap::empty(self.pages());
        Ok(())
    }
    fn take_dirty_bitmap(&self) -> VmResult<PageBitmap> {
        Ok(std::mem::replace(
            &mut *self.dirty.lock().unwrap(),
            PageBitmap::empty(self.pages()),
        ))
    }
    fn stop_dirty_log(&self) -> VmResult<()> {
        Ok(())
    }
    fn set_throttle(&self, percent: u8) -> VmResult<()> {
        self.throttle.store(percent, Ordering::SeqCst);
        Ok(())
    }
    fn pause(&self) -> VmResult<()> {
        self.paused.store(true, Ordering::SeqCst);
        drop(self.running.lock().unwrap());
        Ok(())
    }
    fn resume(&self) -> VmResult<()> {
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn save_state(&self) -> VmResult<Vec<u8>> {
        Ok(self.state.lock().unwrap().clone())
    }
    fn restore_state(&self, state: &[u8]) -> VmResult<()> {
        *self.state.lock().unwrap() = state.to_vec();
        Ok(())
    }
}

type Received = Result<(Arc<InMemoryTestVm>, ReceiveStats), MigrationError>;

fn destination(cfg: ReceiveConfig) -> (SocketAddr, std::thread::JoinHandle<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        receive(&listener, &cfg, |h: &Hello| {
            Ok(InMemoryTestVm::new(h.spec.memory_bytes / PAGE_SIZE as u64))
        })
    });
    (addr, h)
}

fn dest_cfg() -> ReceiveConfig {
    ReceiveConfig {
        cpu_features: vec![0b1111],
        io_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

fn src_cfg() -> MigrationConfig {
    MigrationConfig {
        verify_hash: true,
        io_timeout: Duration::from_secs(5),
        streams: 3,
        ..Default::default()
    }
}

fn go(
    vm: &Arc<InMemoryTestVm>,
    addr: SocketAddr,
    cfg: &MigrationConfig,
) -> Result<MigrationStats, MigrationError> {
    migrate(
        vm,
        addr,
        cfg,
        Box::new(|| Ok(())),
        &CancelToken::new(),
        &mut |_| {},
    )
}

#[test]
fn migrates_a_busy_vm_with_identical_memory() {
    let vm = InMemoryTestVm::new(4096);
    for p in 0..1000 {
        vm.guest_write(p, p * 3 + 1);
    }
    vm.write_page(1500, &[0u8; PAGE_SIZE]).unwrap();
    vm.touched.lock().unwrap().set(1500); // touched but zero: sent as a marker
    let stop = Arc::new(AtomicBool::new(false));
    let guest = vm.run_guest(20, stop.clone());
    let (addr, dest) = destination(dest_cfg());
    let stats = go(&vm, addr, &src_cfg()).unwrap();
    stop.store(true, Ordering::SeqCst);
    guest.join().unwrap();
    let (dvm, _) = dest.join().unwrap().unwrap();
    assert!(
        vm.paused.load(Ordering::SeqCst),
        "source stays paused after handing over"
    );
    assert!(!dvm.paused.load(Ordering::SeqCst), "destination runs");
    assert_eq!(
        source::hash_memory(&vm).unwrap(),
        source::hash_memory(&dvm).unwrap()
    );
    assert_eq!(stats.memory_hash, Some(source::hash_memory(&dvm).unwrap()));
    assert!(stats.untouched_pages > 2000, "{stats:?}");
    assert!(stats.zero_pages >= 1, "{stats:?}");
    assert_eq!(*dvm.state.lock().unwrap(), b"vcpu-state");
}

#[test]
fn fast_dirtier_converges_by_throttling() {
    let vm = InMemoryTestVm::new(2048);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = vm.run_guest(100, stop.clone());
    std::thread::sleep(Duration::from_millis(50));
    let (addr, dest) = destination(dest_cfg());
    // A 16 MiB/s link against a guest dirtying ~400 MB/s worth of pages (uncompressed:
    // this test's pages compress 6x, which would make the link fast enough).
    let cfg = MigrationConfig {
        compression: Compression::Off,
        bandwidth_limit: 16 << 20,
        downtime_target: Duration::from_millis(100),
        max_rounds: 30,
        ..src_cfg()
    };
    let stats = go(&vm, addr, &cfg).unwrap();
    stop.store(true, Ordering::SeqCst);
    guest.join().unwrap();
    dest.join().unwrap().unwrap();
    assert!(stats.max_throttle >= 50, "{stats:?}");
}

#[test]
fn round_bound_fails_cleanly_and_vm_keeps_running() {
    let vm = InMemoryTestVm::new(4096);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = vm.run_guest(200, stop.clone());
    // On a loaded host the guest thread may not have run yet: then there is nothing to
    // converge on.
    while vm.touched.lock().unwrap().count() < 1000 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (addr, dest) = destination(dest_cfg());
    let cfg = MigrationConfig {
        bandwidth_limit: 2 << 20,
        max_rounds: 2,
        throttle_max: 0,
        ..src_cfg()
    };
    let err = go(&vm, addr, &cfg).unwrap_err();
    stop.store(true, Ordering::SeqCst);
    guest.join().unwrap();
    assert!(matches!(err, MigrationError::NotConverging(_)), "{err}");
    assert!(!vm.paused.load(Ordering::SeqCst));
    assert_eq!(vm.throttle.load(Ordering::SeqCst), 0);
    assert!(dest.join().unwrap().is_err());
}

#[test]
fn cancel_leaves_the_source_running() {
    let vm = InMemoryTestVm::new(4096);
    for p in 0..4096 {
        vm.guest_write(p, p + 1);
    }
    let (addr, dest) = destination(dest_cfg());
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        c2.cancel();
    });
    let cfg = MigrationConfig {
        bandwidth_limit: 1 << 20,
        ..src_cfg()
    };
    let err = migrate(&vm, addr, &cfg, Box::new(|| Ok(())), &cancel, &mut |_| {}).unwrap_err();
    assert!(matches!(err, MigrationError::Cancelled), "{err}");
    assert!(!vm.paused.load(Ordering::SeqCst));
    let derr = dest.join().unwrap().unwrap_err();
    assert!(
        derr.to_string().contains("cancelled") || derr.to_string().contains("closed"),
        "{derr}"
    );
}

#[test]
fn gate_refusal_resumes_the_source() {
    let vm = InMemoryTestVm::new(256);
    vm.guest_write(1, 5);
    let (addr, dest) = destination(dest_cfg());
    let err = migrate(
        &vm,
        addr,
        &src_cfg(),
        Box::new(|| Err("raft said no".into())),
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, MigrationError::GateRefused(_)), "{err}");
    assert!(!vm.paused.load(Ordering::SeqCst));
    let dvm_err = dest.join().unwrap().unwrap_err();
    assert!(dvm_err.to_string().contains("raft said no"), "{dvm_err}");
}

#[test]
fn handshake_refusals_are_clear_and_harmless() {
    let vm = InMemoryTestVm::new(64);
    // CPU features the destination lacks.
    let (addr, _dest) = destination(ReceiveConfig {
        cpu_features: vec![0b0001],
        ..dest_cfg()
    });
    let err = go(&vm, addr, &src_cfg()).unwrap_err();
    assert!(err.to_string().contains("lacks features"), "{err}");
    assert!(!vm.paused.load(Ordering::SeqCst));
    // Wrong token: same destination keeps waiting and refuses.
    let (addr, _dest2) = destination(ReceiveConfig {
        token: "secret".into(),
        ..dest_cfg()
    });
    let err = go(&vm, addr, &src_cfg()).unwrap_err();
    assert!(err.to_string().contains("token"), "{err}");
    // The right token is accepted by the same destination afterwards.
    let ok = go(
        &vm,
        addr,
        &MigrationConfig {
            token: "secret".into(),
            ..src_cfg()
        },
    );
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn wrong_version_is_refused() {
    let (addr, _dest) = destination(dest_cfg());
    let mut s = TcpStream::connect(addr).unwrap();
    let hello = Hello {
        version: 99,
        token: String::new(),
        streams: 1,
        spec: VmSpec {
            memory_bytes: 4096,
            vcpus: 1,
            page_size: 4096,
            config: String::new(),
        },
        cpu_features: vec![],
        features: 0,
    };
    send(&mut s, &Message::Hello(hello)).unwrap();
    match recv(&mut s).unwrap() {
        Message::Refuse { reason } => assert!(reason.contains("version 99"), "{reason}"),
        m => panic!("{m:?}"),
    }
}

#[test]
fn second_source_is_refused_while_busy_and_garbage_is_dropped() {
    let vm = InMemoryTestVm::new(4096);
    for p in 0..4096 {
        vm.guest_write(p, p + 1);
    }
    let (addr, dest) = destination(dest_cfg());
    // Garbage and a hostile length first: dropped without affecting the destination.
    let mut g = TcpStream::connect(addr).unwrap();
    let mut hdr = header(1, &[]);
    hdr[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    std::io::Write::write_all(&mut g, &hdr).unwrap();
    let slow = MigrationConfig {
        bandwidth_limit: 4 << 20,
        ..src_cfg()
    };
    let vm2 = vm.clone();
    let first = std::thread::spawn(move || go(&vm2, addr, &slow));
    std::thread::sleep(Duration::from_millis(300));
    let other = InMemoryTestVm::new(16);
    let err = go(&other, addr, &src_cfg()).unwrap_err();
    assert!(err.to_string().contains("in progress"), "{err}");
    first.join().unwrap().unwrap();
    dest.join().unwrap().unwrap();
}

#[test]
fn corrupted_data_stream_fails_the_migration_on_both_sides() {
    // A fake source that joins properly and then sends a bit-flipped page frame.
    let (addr, dest) = destination(dest_cfg());
    let mut c = TcpStream::connect(addr).unwrap();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        token: String::new(),
        streams: 1,
        spec: VmSpec {
            memory_bytes: 1 << 20,
            vcpus: 1,
            page_size: 4096,
            config: String::new(),
        },
        cpu_features: vec![],
        features: 0,
    };
    send(&mut c, &Message::Hello(hello)).unwrap();
    let Message::Welcome { session, .. } = recv(&mut c).unwrap() else {
        panic!()
    };
    let mut d = TcpStream::connect(addr).unwrap();
    send(
        &mut d,
        &Message::Join {
            session,
            stream: 0,
            token: String::new(),
        },
    )
    .unwrap();
    let mut frame = Vec::new();
    send(&mut frame, &Message::Pages(vec![(3, vec![9u8; PAGE_SIZE])])).unwrap();
    frame[100] ^= 0x10;
    std::io::Write::write_all(&mut d, &frame).unwrap();
    let err = dest.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    // The control stream is told why.
    match recv(&mut c) {
        Ok(Message::Abort { reason }) => assert!(
            reason.contains("checksum") || reason.contains("closed"),
            "{reason}"
        ),
        Ok(m) => panic!("{m:?}"),
        Err(_) => {}
    }
}

#[test]
fn destination_dying_mid_copy_leaves_source_running() {
    let vm = InMemoryTestVm::new(4096);
    for p in 0..4096 {
        vm.guest_write(p, p + 1);
    }
    // A destination that accepts and then vanishes.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let _ = recv(&mut c);
        send(
            &mut c,
            &Message::Welcome {
                session: 1,
                features: 0,
            },
        )
        .unwrap();
        let mut joined = Vec::new();
        for _ in 0..3 {
            joined.push(listener.accept().unwrap().0);
        }
        std::thread::sleep(Duration::from_millis(200));
        drop(joined);
        drop(c);
    });
    let cfg = MigrationConfig {
        bandwidth_limit: 2 << 20,
        ..src_cfg()
    };
    let err = go(&vm, addr, &cfg).unwrap_err();
    assert!(
        matches!(err, MigrationError::Io(_) | MigrationError::PeerClosed),
        "{err}"
    );
    assert!(!vm.paused.load(Ordering::SeqCst));
}

impl InMemoryTestVm {
    /// Page `pfn` filled with splitmix64 words: what no compressor can shrink.
    fn guest_write_random(&self, pfn: u64, seed: u64) {
        for w in 0..WORDS {
            let mut z = (pfn << 32 ^ seed << 12 ^ w as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            self.words[pfn as usize * WORDS + w].store(z ^ (z >> 31), Ordering::Relaxed);
        }
        self.dirty.lock().unwrap().set(pfn);
        self.touched.lock().unwrap().set(pfn);
    }
}

/// Migrate `vm` with `cfg` and check both copies are identical; the source's stats.
fn migrate_identical(vm: &Arc<InMemoryTestVm>, cfg: &MigrationConfig) -> MigrationStats {
    let (addr, dest) = destination(dest_cfg());
    let stats = go(vm, addr, cfg).unwrap();
    let (dvm, received) = dest.join().unwrap().unwrap();
    assert_eq!(
        source::hash_memory(vm).unwrap(),
        source::hash_memory(&dvm).unwrap()
    );
    assert_eq!(received.pages_received, stats.pages_sent);
    stats
}

#[test]
fn compressed_migration_of_a_busy_vm_is_identical() {
    let vm = InMemoryTestVm::new(4096);
    for p in 0..2000 {
        vm.guest_write(p, p * 3 + 1);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let guest = vm.run_guest(20, stop.clone());
    let cfg = MigrationConfig {
        compression: Compression::On,
        ..src_cfg()
    };
    let stats = migrate_identical(&vm, &cfg);
    stop.store(true, Ordering::SeqCst);
    guest.join().unwrap();
    assert!(stats.compressed_pages >= 2000, "{stats:?}");
    assert!(
        stats.compression_saved_bytes > 2000 * PAGE_SIZE as u64 / 2,
        "{stats:?}"
    );
}

#[test]
fn auto_compresses_compressible_pages_on_a_slow_link() {
    let vm = InMemoryTestVm::new(4096);
    for p in 0..2048 {
        vm.guest_write(p, p + 1);
    }
    // 8 MiB/s over 3 streams: a byte costs ~360 ns to write, ~100x what compressing it
    // costs, so even a compression slowed down by a loaded host pays.
    let cfg = MigrationConfig {
        bandwidth_limit: 8 << 20,
        ..src_cfg()
    };
    assert_eq!(cfg.compression, Compression::Auto);
    let stats = migrate_identical(&vm, &cfg);
    assert!(stats.compressed_pages > 1024, "{stats:?}");
}

#[test]
fn incompressible_pages_fall_back_to_plain_batches() {
    let vm = InMemoryTestVm::new(4096);
    for p in 0..2048 {
        vm.guest_write_random(p, 7);
    }
    for compression in [Compression::On, Compression::Auto] {
        let cfg = MigrationConfig {
            compression,
            bandwidth_limit: 32 << 20,
            ..src_cfg()
        };
        let stats = migrate_identical(&vm, &cfg);
        assert_eq!(stats.compressed_pages, 0, "{compression}: {stats:?}");
        assert_eq!(stats.compression_saved_bytes, 0, "{compression}");
        assert!(stats.pages_sent >= 2048, "{compression}: {stats:?}");
    }
}

#[test]
fn version_1_source_without_compression_still_migrates() {
    let vm = InMemoryTestVm::new(1024);
    for p in 0..512 {
        vm.guest_write(p, p + 1);
    }
    // `off` speaks protocol version 1, byte for byte what older sources send.
    let cfg = MigrationConfig {
        compression: Compression::Off,
        ..src_cfg()
    };
    let stats = migrate_identical(&vm, &cfg);
    assert_eq!(stats.compressed_pages, 0);
}

#[test]
fn compressed_pages_without_negotiation_fail_the_migration() {
    let (addr, dest) = destination(dest_cfg());
    let mut c = TcpStream::connect(addr).unwrap();
    let hello = Hello {
        version: 1,
        token: String::new(),
        streams: 1,
        spec: VmSpec {
            memory_bytes: 1 << 20,
            vcpus: 1,
            page_size: 4096,
            config: String::new(),
        },
        cpu_features: vec![],
        features: 0,
    };
    send(&mut c, &Message::Hello(hello)).unwrap();
    let Message::Welcome { session, features } = recv(&mut c).unwrap() else {
        panic!()
    };
    assert_eq!(features, 0, "a version 1 source is offered nothing");
    let mut d = TcpStream::connect(addr).unwrap();
    send(
        &mut d,
        &Message::Join {
            session,
            stream: 0,
            token: String::new(),
        },
    )
    .unwrap();
    let plain = [
        &1u32.to_le_bytes()[..],
        &0u64.to_le_bytes(),
        &[5u8; PAGE_SIZE],
    ]
    .concat();
    let z = zstd::bulk::compress(&plain, 1).unwrap();
    send(
        &mut d,
        &Message::ZPages {
            raw_len: plain.len() as u32,
            data: z,
        },
    )
    .unwrap();
    let err = dest.join().unwrap().unwrap_err().to_string();
    assert!(err.contains("did not negotiate"), "{err}");
}

/// A destination of protocol version 1: refuses any other Hello version the way version-1
/// builds do, and passes version-1 connections through to a real destination.
fn old_destination() -> (SocketAddr, std::thread::JoinHandle<Received>) {
    let (real, dest) = destination(dest_cfg());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let Ok(Some(f)) = super::frame::read_frame(&mut c) else {
                continue;
            };
            if let Ok(Message::Hello(h)) = Message::decode(f.kind, &f.payload) {
                if h.version != 1 {
                    let reason = format!(
                        "protocol version {} not supported (this destination speaks 1)",
                        h.version
                    );
                    let _ = send(&mut c, &Message::Refuse { reason });
                    continue;
                }
            }
            let Ok(mut up) = TcpStream::connect(real) else {
                return;
            };
            let _ = super::frame::write_frame(&mut up, f.kind, &f.payload);
            let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut up2, &mut c2));
            std::thread::spawn(move || std::io::copy(&mut c, &mut up));
        }
    });
    (addr, dest)
}

#[test]
fn auto_compression_falls_back_to_version_1_for_an_old_destination() {
    let vm = InMemoryTestVm::new(1024);
    for p in 0..512 {
        vm.guest_write(p, p + 1);
    }
    let (addr, dest) = old_destination();
    let stats = go(&vm, addr, &src_cfg()).unwrap();
    let (dvm, _) = dest.join().unwrap().unwrap();
    assert_eq!(
        source::hash_memory(&vm).unwrap(),
        source::hash_memory(&dvm).unwrap()
    );
    assert_eq!(stats.compressed_pages, 0);
    // `on` insists on compression: refused with the destination's reason.
    let (addr, _dest) = old_destination();
    let cfg = MigrationConfig {
        compression: Compression::On,
        ..src_cfg()
    };
    let err = go(&vm, addr, &cfg).unwrap_err().to_string();
    assert!(err.contains("protocol version 2 not supported"), "{err}");
}

/// Whether the other end has closed `s` (EOF or reset), without blocking.
fn closed_by_peer(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let closed = match std::io::Read::read(&mut &*s, &mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).unwrap();
    closed
}

#[test]
fn a_thousand_slow_connections_hold_nothing_and_a_migration_still_gets_through() {
    let (addr, dest) = destination(dest_cfg());
    // Each stranger promises a 200 KiB Hello (under the first-message limit) and sends one
    // byte of it: before the bound, each held a thread and its claimed payload's buffer.
    let mut hdr = header(1, &[]);
    hdr[8..12].copy_from_slice(&(200u32 << 10).to_le_bytes());
    let slow: Vec<TcpStream> = (0..1000)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            std::io::Write::write_all(&mut s, &hdr).unwrap();
            std::io::Write::write_all(&mut s, &[0]).unwrap();
            s
        })
        .collect();
    // All but the newest MAX_PENDING were dropped by the destination (it needs a moment to
    // accept the last of them).
    wait_until(Duration::from_secs(30), || {
        slow.iter().filter(|s| !closed_by_peer(s)).count() <= dest::MAX_PENDING
    });
    // A real source still gets through while strangers keep arriving.
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                if let Ok(mut s) = TcpStream::connect(addr) {
                    let _ = std::io::Write::write_all(&mut s, &hdr[..3]);
                    held.push(s);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            held.len()
        })
    };
    let vm = InMemoryTestVm::new(512);
    for p in 0..100 {
        vm.guest_write(p, p + 7);
    }
    go(&vm, addr, &src_cfg()).unwrap();
    let (dvm, _) = dest.join().unwrap().unwrap();
    stop.store(true, Ordering::SeqCst);
    attacker.join().unwrap();
    assert_eq!(
        source::hash_memory(&vm).unwrap(),
        source::hash_memory(&dvm).unwrap()
    );
}

fn wait_until(timeout: Duration, mut ok: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + timeout;
    while !ok() {
        assert!(
            std::time::Instant::now() < end,
            "condition not met in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A CA, and rustls configurations for a destination named `node-2.tern` and a source named
/// `node-1.tern` signed by it; plus a source with a certificate from another CA.
struct TestPki {
    server: Arc<rustls::ServerConfig>,
    client: ClientTls,
    foreign: ClientTls,
}

fn test_pki() -> TestPki {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca = |_: ()| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (p.self_signed(&key).unwrap(), key)
    };
    let leaf = |ca: &(rcgen::Certificate, rcgen::KeyPair), name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        let cert = p.signed_by(&key, &ca.0, &ca.1).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    };
    let roots = |ca: &(rcgen::Certificate, rcgen::KeyPair)| {
        let mut r = rustls::RootCertStore::empty();
        r.add(CertificateDer::from(ca.0.der().to_vec())).unwrap();
        Arc::new(r)
    };
    let (cluster, other) = (ca(()), ca(()));
    let (chain, key) = leaf(&cluster, "node-2.tern");
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(&cluster),
        provider.clone(),
    )
    .build()
    .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    let client = |signer: &(rcgen::Certificate, rcgen::KeyPair)| {
        let (chain, key) = leaf(signer, "node-1.tern");
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(&cluster))
            .with_client_auth_cert(chain, key)
            .unwrap();
        ClientTls {
            config: Arc::new(cfg),
            server_name: ServerName::try_from("node-2.tern".to_string()).unwrap(),
        }
    };
    TestPki {
        server: Arc::new(server),
        client: client(&cluster),
        foreign: client(&other),
    }
}

#[test]
fn migrates_over_mutual_tls_and_refuses_sources_without_a_cluster_certificate() {
    let pki = test_pki();
    let vm = InMemoryTestVm::new(2048);
    for p in 0..800 {
        vm.guest_write(p, p * 5 + 3);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let guest = vm.run_guest(10, stop.clone());
    let (addr, dest) = destination(ReceiveConfig {
        tls: Some(pki.server.clone()),
        ..dest_cfg()
    });
    // Plain TCP, a certificate from another CA, and a source expecting another destination
    // name: each refused, and the destination goes on waiting.
    let plain = go(&InMemoryTestVm::new(16), addr, &src_cfg());
    assert!(plain.is_err(), "{plain:?}");
    let foreign = go(
        &InMemoryTestVm::new(16),
        addr,
        &MigrationConfig {
            tls: Some(pki.foreign.clone()),
            ..src_cfg()
        },
    );
    assert!(foreign.is_err(), "{foreign:?}");
    let mut wrong_name = pki.client.clone();
    wrong_name.server_name =
        rustls::pki_types::ServerName::try_from("node-3.tern".to_string()).unwrap();
    let err = go(
        &InMemoryTestVm::new(16),
        addr,
        &MigrationConfig {
            tls: Some(wrong_name),
            ..src_cfg()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
    // The real source gets through, encrypted, with identical memory.
    let stats = go(
        &vm,
        addr,
        &MigrationConfig {
            tls: Some(pki.client.clone()),
            ..src_cfg()
        },
    )
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    guest.join().unwrap();
    let (dvm, _) = dest.join().unwrap().unwrap();
    assert_eq!(
        source::hash_memory(&vm).unwrap(),
        source::hash_memory(&dvm).unwrap()
    );
    assert_eq!(stats.memory_hash, Some(source::hash_memory(&dvm).unwrap()));
}
