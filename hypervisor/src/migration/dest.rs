//! The receiving side: one migration at a time, strangers and second sources refused.
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::compress::{BatchDecoder, FEATURE_ZSTD_PAGES};
use super::frame::read_frame_into;
use super::link::{self, Link};
use super::messages::{
    recv, send, Hello, Message, MAX_PAGES_PER_FRAME, MIN_PROTOCOL_VERSION, PAGE_SIZE,
    PROTOCOL_VERSION,
};
use super::source::hash_memory;
use super::transport::{limit_socket_buffers, DATA_STREAM_BUFFER};
use super::vm::MigratableVm;
use super::MigrationError;

/// How the destination accepts migrations.
#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    /// Token a source must present (empty = none required).
    pub token: String,
    /// CPU feature words this host offers; the guest's words must be a subset.
    pub cpu_features: Vec<u32>,
    /// Give up waiting for a source after this long (None = wait forever).
    pub accept_timeout: Option<Duration>,
    /// Timeout for each step once a migration runs.
    pub io_timeout: Duration,
    /// TLS every stream must use (the server's certificate and the verifier of sources'
    /// certificates, from the caller); `None`: plain TCP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ReceiveConfig {
    fn default() -> Self {
        ReceiveConfig {
            token: String::new(),
            cpu_features: Vec::new(),
            accept_timeout: None,
            io_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// What the destination learned while receiving.
#[derive(Debug, Clone, Default)]
pub struct ReceiveStats {
    pub pages_received: u64,
    pub zero_pages: u64,
    pub bytes_received: u64,
    /// From Complete to ImageReady (applying the last pages, hashing if asked).
    pub image_ready_after: Duration,
    /// From Resume to Resumed.
    pub resume_took: Duration,
    /// Of `resume_took`: loading the staged vCPU/device state.
    pub restore_took: Duration,
    /// Decoding and checking the state when it arrived (off the resume path).
    pub stage_took: Duration,
}

enum Incoming {
    Control(Link, Hello),
    Join {
        stream: Link,
        session: u64,
        index: u16,
        token: String,
    },
}

/// Wait for one migration on `listener` and receive it. `make_vm` builds (and pre-faults) a
/// paused VM for the source's spec, or explains why it cannot. Sources that fail the
/// handshake are refused and waiting continues; a failure after acceptance returns the error.
pub fn receive<V, F>(
    listener: &TcpListener,
    cfg: &ReceiveConfig,
    mut make_vm: F,
) -> Result<(V, ReceiveStats), MigrationError>
where
    V: MigratableVm,
    F: FnMut(&Hello) -> Result<V, String>,
{
    let busy = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let acceptor = {
        let listener = listener.try_clone()?;
        let (busy, stop, tls) = (busy.clone(), stop.clone(), cfg.tls.clone());
        std::thread::spawn(move || accept_loop(listener, tls, tx, busy, stop))
    };
    let result = receive_inner(cfg, &rx, &busy, &mut make_vm);
    stop.store(true, Ordering::SeqCst);
    // Wake the acceptor out of accept().
    if let Ok(addr) = listener.local_addr() {
        let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
    }
    let _ = acceptor.join();
    result
}

/// Connections that have not yet said who they are (Hello or Join), at once; when another
/// arrives the oldest is dropped. Bounds the threads and memory strangers can hold.
pub const MAX_PENDING: usize = 16;
/// A connection must deliver its first message within this, in total however it trickles.
pub const FIRST_MESSAGE_WITHIN: Duration = Duration::from_secs(10);
/// Largest first message (a Hello: token, VM spec, CPU features); refused from its header.
pub const MAX_FIRST_MESSAGE: usize = 256 << 10;

/// Connections waiting for their first message, oldest first (a clone of each, to drop it).
#[derive(Default)]
struct Pending(Mutex<std::collections::VecDeque<(u64, TcpStream)>>);

impl Pending {
    fn enter(&self, id: u64, stream: &TcpStream) -> std::io::Result<()> {
        let clone = stream.try_clone()?;
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        while q.len() >= MAX_PENDING {
            if let Some((_, oldest)) = q.pop_front() {
                let _ = oldest.shutdown(Shutdown::Both);
            }
        }
        q.push_back((id, clone));
        Ok(())
    }

    fn leave(&self, id: u64) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = q.iter().position(|(c, _)| *c == id) {
            q.remove(i);
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    tx: Sender<Incoming>,
    busy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let pending = Arc::new(Pending::default());
    for (id, conn) in (0u64..).zip(listener.incoming()) {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = conn else {
            // Out of descriptors and the like: do not spin.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        if pending.enter(id, &stream).is_err() {
            continue;
        }
        let (tx, busy, pending, tls) = (tx.clone(), busy.clone(), pending.clone(), tls.clone());
        std::thread::spawn(move || {
            let _ = stream.set_nodelay(true);
            // TLS first (the source's certificate checked), then its first message: both
            // within one deadline, into bounded buffers.
            let until = Instant::now() + FIRST_MESSAGE_WITHIN;
            let first = link::accept_first(stream, tls.as_ref(), until, MAX_FIRST_MESSAGE);
            pending.leave(id);
            let (mut stream, first) = match first {
                Ok((link, first)) => (link, Ok::<Message, MigrationError>(first)),
                Err(e) => {
                    tracing::debug!(error = %e, "dropping a connection before its first message");
                    return;
                }
            };
            let _ = stream.tcp().set_read_timeout(Some(Duration::from_secs(10)));
            let _ = stream
                .tcp()
                .set_write_timeout(Some(Duration::from_secs(10)));
            match first {
                Ok(Message::Hello(h)) => {
                    if busy.swap(true, Ordering::SeqCst) {
                        let reason =
                            "another migration is in progress on this destination".to_string();
                        let _ = send(&mut stream, &Message::Refuse { reason });
                    } else {
                        let _ = tx.send(Incoming::Control(stream, h));
                    }
                }
                Ok(Message::Join {
                    session,
                    stream: index,
                    token,
                }) => {
                    let _ = tx.send(Incoming::Join {
                        stream,
                        session,
                        index,
                        token,
                    });
                }
                Ok(other) => {
                    let reason = format!("expected Hello or Join, got {}", other.name());
                    let _ = send(&mut stream, &Message::Refuse { reason });
                }
                Err(e) => tracing::debug!(error = %e, "dropping a bad connection"),
            }
        });
    }
}

fn receive_inner<V, F>(
    cfg: &ReceiveConfig,
    rx: &Receiver<Incoming>,
    busy: &AtomicBool,
    make_vm: &mut F,
) -> Result<(V, ReceiveStats), MigrationError>
where
    V: MigratableVm,
    F: FnMut(&Hello) -> Result<V, String>,
{
    let deadline = cfg.accept_timeout.map(|t| Instant::now() + t);
    loop {
        let wait = deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        let (mut control, hello) = match rx.recv_timeout(wait) {
            Ok(Incoming::Control(s, h)) => (s, h),
            Ok(Incoming::Join { mut stream, .. }) => {
                let _ = send(
                    &mut stream,
                    &Message::Refuse {
                        reason: "no migration in progress".into(),
                    },
                );
                continue;
            }
            Err(RecvTimeoutError::Timeout) if deadline.is_some() => {
                return Err(MigrationError::Timeout("no migration arrived".into()))
            }
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return Err(MigrationError::PeerClosed),
        };
        let vm = match check_hello(cfg, &hello).and_then(|()| make_vm(&hello)) {
            Ok(vm) => vm,
            Err(reason) => {
                tracing::warn!(%reason, "refusing a migration");
                let _ = send(&mut control, &Message::Refuse { reason });
                busy.store(false, Ordering::SeqCst);
                continue;
            }
        };
        let session = session_id();
        control.tcp().set_read_timeout(Some(cfg.io_timeout))?;
        // Accept every protocol feature this build knows of those the source offers.
        let features = hello.features & FEATURE_ZSTD_PAGES;
        send(&mut control, &Message::Welcome { session, features })?;
        let result = run_session(cfg, rx, &vm, control, &hello, session);
        return result.map(|stats| (vm, stats));
    }
}

/// The destination's checks of a `Hello` (version, token, memory layout, streams, CPU), before
/// it builds a VM; the reason is sent back in a `Refuse`. Public for fuzzing.
pub fn check_hello(cfg: &ReceiveConfig, h: &Hello) -> Result<(), String> {
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&h.version) {
        return Err(format!(
            "protocol version {} not supported (this destination speaks \
             {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION})",
            h.version
        ));
    }
    if h.token != cfg.token {
        return Err("authentication token rejected".into());
    }
    if h.spec.page_size as usize != PAGE_SIZE
        || !h.spec.memory_bytes.is_multiple_of(PAGE_SIZE as u64)
        || h.spec.memory_bytes == 0
    {
        return Err(format!(
            "unsupported memory layout: {} bytes in {} byte pages",
            h.spec.memory_bytes, h.spec.page_size
        ));
    }
    if h.streams == 0 || h.streams > 64 {
        return Err(format!("{} streams requested (1..=64 allowed)", h.streams));
    }
    let missing: Vec<String> = h
        .cpu_features
        .iter()
        .enumerate()
        .filter_map(|(i, want)| {
            let have = cfg.cpu_features.get(i).copied().unwrap_or(0);
            (want & !have != 0).then(|| format!("word {i}: {:#010x}", want & !have))
        })
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "destination CPU lacks features the guest uses ({})",
            missing.join(", ")
        ));
    }
    Ok(())
}

fn session_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// Events from the data stream readers to the control loop.
enum StreamEvent {
    Flushed { index: u16, epoch: u64 },
    Failed(MigrationError),
}

fn run_session<V: MigratableVm>(
    cfg: &ReceiveConfig,
    rx: &Receiver<Incoming>,
    vm: &V,
    mut control: Link,
    hello: &Hello,
    session: u64,
) -> Result<ReceiveStats, MigrationError> {
    // Collect the data streams.
    let mut streams: Vec<Option<Link>> = (0..hello.streams).map(|_| None).collect();
    let join_deadline = Instant::now() + cfg.io_timeout;
    while streams.iter().any(Option::is_none) {
        match rx.recv_timeout(join_deadline.saturating_duration_since(Instant::now())) {
            Ok(Incoming::Join {
                mut stream,
                session: s,
                index,
                token,
            }) => {
                let slot = streams.get_mut(index as usize);
                match slot {
                    Some(slot @ None) if s == session && token == cfg.token => {
                        stream.tcp().set_read_timeout(Some(cfg.io_timeout))?;
                        limit_socket_buffers(stream.tcp(), DATA_STREAM_BUFFER);
                        *slot = Some(stream);
                    }
                    _ => {
                        let _ = send(
                            &mut stream,
                            &Message::Refuse {
                                reason: "unknown session or stream".into(),
                            },
                        );
                    }
                }
            }
            Ok(Incoming::Control(..)) => {} // cannot happen: the acceptor refuses while busy
            Err(_) => {
                return Err(MigrationError::Timeout(
                    "data streams did not all join".into(),
                ))
            }
        }
    }
    let mut streams: Vec<Link> = streams.into_iter().flatten().collect();
    // The sockets underneath, to end every stream from any thread.
    let sockets = streams
        .iter()
        .map(|s| s.tcp().try_clone())
        .collect::<Result<Vec<TcpStream>, _>>()?;
    let counters = Mutex::new(ReceiveStats::default());
    let written = WrittenPages::new(vm.memory_bytes() / PAGE_SIZE as u64);
    let compressed_ok = hello.features & FEATURE_ZSTD_PAGES != 0;
    let (etx, erx) = mpsc::channel();
    std::thread::scope(|scope| {
        let nstreams = streams.len();
        for (index, stream) in streams.iter_mut().enumerate() {
            let (etx, counters, control) = (etx.clone(), &counters, control.tcp().try_clone());
            let written = &written;
            scope.spawn(move || {
                let r = read_stream(
                    vm,
                    stream,
                    index as u16,
                    &etx,
                    counters,
                    written,
                    compressed_ok,
                );
                if let Err(e) = r {
                    let _ = etx.send(StreamEvent::Failed(e));
                    // Wake the control loop, which may be blocked reading.
                    if let Ok(c) = control {
                        let _ = c.shutdown(Shutdown::Both);
                    }
                }
            });
        }
        drop(etx);
        let result = control_loop(vm, &mut control, &erx, nstreams, &counters);
        if let Err(e) = &result {
            let _ = send(
                &mut control,
                &Message::Abort {
                    reason: e.to_string(),
                },
            );
        }
        // Release the readers in every case.
        for s in &sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
        // A stream failure that woke us explains the control error better.
        result.map_err(|e| match erx.try_recv() {
            Ok(StreamEvent::Failed(first)) => first,
            _ => e,
        })
    })?;
    Ok(counters.into_inner().unwrap_or_else(|p| p.into_inner()))
}

fn control_loop<V: MigratableVm>(
    vm: &V,
    control: &mut Link,
    erx: &Receiver<StreamEvent>,
    nstreams: usize,
    counters: &Mutex<ReceiveStats>,
) -> Result<(), MigrationError> {
    let mut state = None;
    let mut flushed = vec![0u64; nstreams];
    loop {
        wait_for_control(control, counters)?;
        match recv(control)? {
            Message::DeviceState(s) => {
                let t = Instant::now();
                vm.stage_state(&s).map_err(|e| MigrationError::Vm(e.0))?;
                lock(counters).stage_took = t.elapsed();
                state = Some(s);
            }
            Message::Complete { epoch, want_hash } => {
                let t = Instant::now();
                while flushed.iter().any(|e| *e < epoch) {
                    match erx.recv_timeout(Duration::from_secs(30)) {
                        Ok(StreamEvent::Flushed { index, epoch }) => {
                            flushed[index as usize] = epoch
                        }
                        Ok(StreamEvent::Failed(e)) => return Err(e),
                        Err(_) => {
                            return Err(MigrationError::Timeout(
                                "data streams did not deliver the final pages".into(),
                            ))
                        }
                    }
                }
                if state.is_none() {
                    return Err(MigrationError::Protocol(
                        "Complete before DeviceState".into(),
                    ));
                }
                let hash = if want_hash { hash_memory(vm)? } else { 0 };
                lock(counters).image_ready_after = t.elapsed();
                send(control, &Message::ImageReady { hash })?;
            }
            Message::Resume => {
                let t = Instant::now();
                let s = state
                    .as_deref()
                    .ok_or_else(|| MigrationError::Protocol("Resume before DeviceState".into()))?;
                vm.restore_state(s).map_err(|e| MigrationError::Vm(e.0))?;
                let restored = t.elapsed();
                vm.resume().map_err(|e| MigrationError::Vm(e.0))?;
                let mut c = lock(counters);
                c.restore_took = restored;
                c.resume_took = t.elapsed();
                drop(c);
                send(control, &Message::Resumed)?;
                return Ok(());
            }
            Message::Abort { reason } => {
                return Err(MigrationError::Refused(format!("source aborted: {reason}")))
            }
            other => {
                return Err(MigrationError::Protocol(format!(
                    "unexpected {} on the control stream",
                    other.name()
                )))
            }
        }
        // Keep flush bookkeeping current without blocking.
        while let Ok(ev) = erx.try_recv() {
            match ev {
                StreamEvent::Flushed { index, epoch } => flushed[index as usize] = epoch,
                StreamEvent::Failed(e) => return Err(e),
            }
        }
    }
}

/// Wait until the control stream has data. Pre-copy can keep it quiet for long; that is fine
/// while the data streams make progress, and a timeout once they stall too.
fn wait_for_control(
    control: &mut Link,
    counters: &Mutex<ReceiveStats>,
) -> Result<(), MigrationError> {
    // TLS may hold a message it already decrypted: then there is no need to wait.
    if control.has_buffered()? {
        return Ok(());
    }
    let control = control.tcp();
    let timeout = control.read_timeout()?.unwrap_or(Duration::from_secs(30));
    let mut last = lock(counters).bytes_received;
    let mut idle_since = Instant::now();
    control.set_read_timeout(Some(Duration::from_millis(500)))?;
    let result = loop {
        match control.peek(&mut [0u8; 1]) {
            Ok(_) => break Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                let now = lock(counters).bytes_received;
                if now != last {
                    last = now;
                    idle_since = Instant::now();
                } else if idle_since.elapsed() > timeout {
                    break Err(MigrationError::Timeout("the source went quiet".into()));
                }
            }
            Err(e) => break Err(e.into()),
        }
    };
    control.set_read_timeout(Some(timeout))?;
    result
}

/// Pages this session has written with data. A page always arrives on the same stream, so
/// each bit is only ever touched by one reader thread.
struct WrittenPages(Vec<AtomicU64>);

impl WrittenPages {
    fn new(pages: u64) -> Self {
        WrittenPages((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    fn set(&self, pfn: u64) {
        if let Some(w) = self.0.get((pfn / 64) as usize) {
            w.fetch_or(1 << (pfn % 64), Ordering::Relaxed);
        }
    }
    fn get(&self, pfn: u64) -> bool {
        self.0
            .get((pfn / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (pfn % 64)) != 0)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Write the pages of one `Pages` payload into guest memory; returns how many.
fn apply_pages<V: MigratableVm>(
    vm: &V,
    p: &[u8],
    pages: u64,
    written: &WrittenPages,
) -> Result<u64, MigrationError> {
    let n = p
        .get(0..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .unwrap_or(usize::MAX);
    if n > MAX_PAGES_PER_FRAME || p.len() != 4 + n * (8 + PAGE_SIZE) {
        return Err(MigrationError::Protocol(
            "page batch count does not match its frame".into(),
        ));
    }
    for entry in p[4..].chunks_exact(8 + PAGE_SIZE) {
        let mut a = [0u8; 8];
        a.copy_from_slice(&entry[..8]);
        let pfn = u64::from_le_bytes(a);
        if pfn >= pages {
            return Err(MigrationError::Protocol(format!(
                "page {pfn} is outside guest memory ({pages} pages)"
            )));
        }
        vm.write_page(pfn, &entry[8..])
            .map_err(|e| MigrationError::Vm(e.0))?;
        written.set(pfn);
    }
    Ok(n as u64)
}

/// Apply one data stream to guest memory until it ends.
fn read_stream<V: MigratableVm>(
    vm: &V,
    stream: &mut Link,
    index: u16,
    events: &Sender<StreamEvent>,
    counters: &Mutex<ReceiveStats>,
    written: &WrittenPages,
    compressed_ok: bool,
) -> Result<(), MigrationError> {
    let zero = vec![0u8; PAGE_SIZE];
    let pages = vm.memory_bytes() / PAGE_SIZE as u64;
    let pages_kind = Message::Pages(Vec::new()).encode().0;
    let zpages_kind = Message::ZPages {
        raw_len: 0,
        data: Vec::new(),
    }
    .encode()
    .0;
    let mut decoder = BatchDecoder::default();
    let mut payload = Vec::with_capacity(4 + MAX_PAGES_PER_FRAME * (8 + PAGE_SIZE));
    while let Some(kind) = read_frame_into(stream, &mut payload)? {
        let bytes = payload.len() as u64 + 16;
        if kind == zpages_kind && !compressed_ok {
            return Err(MigrationError::Protocol(
                "compressed pages on a session that did not negotiate them".into(),
            ));
        }
        if kind == pages_kind || kind == zpages_kind {
            // Apply straight from the payload, without building a message.
            let p = if kind == zpages_kind {
                decoder.decode(&payload)?
            } else {
                &payload[..]
            };
            let n = apply_pages(vm, p, pages, written)?;
            let mut c = lock(counters);
            c.pages_received += n;
            c.bytes_received += bytes;
            continue;
        }
        match Message::decode(kind, &payload)? {
            Message::Zeros(runs) => {
                let mut count = 0u64;
                for (start, n) in runs {
                    let end = start
                        .checked_add(n as u64)
                        .ok_or_else(|| MigrationError::Protocol("zero run overflows".into()))?;
                    if end > pages {
                        return Err(MigrationError::Protocol(format!(
                            "zero run {start}+{n} is outside guest memory"
                        )));
                    }
                    // Fresh destination memory is zero: only pages this session wrote need
                    // zeroing again (faulting in the others would cost for nothing).
                    for pfn in (start..end).filter(|&p| written.get(p)) {
                        vm.write_page(pfn, &zero)
                            .map_err(|e| MigrationError::Vm(e.0))?;
                    }
                    count += n as u64;
                }
                let mut c = lock(counters);
                c.zero_pages += count;
                c.bytes_received += bytes;
            }
            Message::Flush { epoch } => {
                let _ = events.send(StreamEvent::Flushed { index, epoch });
            }
            other => {
                return Err(MigrationError::Protocol(format!(
                    "unexpected {} on a data stream",
                    other.name()
                )))
            }
        }
    }
    Ok(())
}
