//! The sending side: handshake, first pass, dirty rounds, stop-and-copy, switchover gate.
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};

use super::link::Link;
use std::time::{Duration, Instant};

use super::bitmap::PageBitmap;
use super::compress::{BatchEncoder, Compression, Encoded, FEATURE_ZSTD_PAGES};
use super::frame::write_frame;
use super::messages::{
    recv, send, Hello, Message, VmSpec, MIN_PROTOCOL_VERSION, PAGE_SIZE, PROTOCOL_VERSION,
};
use super::policy::{decide, expected_downtime, Decision, MigrationConfig, RoundObservation};
use super::stats::{MemoryHasher, MigrationStats, Phase, Progress};
use super::transport::{
    limit_socket_buffers, CancelToken, PageBatch, RateLimiter, ZeroRuns, DATA_STREAM_BUFFER,
};
use super::vm::MigratableVm;
use super::MigrationError;

/// Pages are striped over streams in chunks of this many pages, so a page always travels on
/// the same stream and a newer copy can never overtake an older one.
const STRIPE_PAGES: u64 = 256;
/// Sets up to this many pages are sent from the calling thread, stream after stream.
const INLINE_PAGES: u64 = 256;
/// Below this many bytes measured, bandwidth is assumed rather than trusted.
const MIN_MEASURED_BYTES: u64 = 4 << 20;
const ASSUMED_BANDWIDTH: f64 = 100e6;

/// Called after the destination holds a complete image and before it is told to resume.
/// Returning an error aborts the migration and the VM resumes on the source.
pub type SwitchoverGate<'a> = Box<dyn FnOnce() -> Result<(), String> + Send + 'a>;

/// Migrate `vm` to the destination listening on `addr`.
///
/// On success the VM runs on the destination and this (paused) copy must be torn down by
/// the caller. On any error before the gate, the VM is running again on the source.
pub fn migrate<V: MigratableVm>(
    vm: &V,
    addr: SocketAddr,
    cfg: &MigrationConfig,
    gate: SwitchoverGate<'_>,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationStats, MigrationError> {
    let mut run = Run::new(vm, cfg, cancel);
    let mut paused = false;
    let result = run.execute(addr, gate, progress, &mut paused);
    match &result {
        Err(MigrationError::OutcomeUnknown(_)) => {
            // After the gate the destination may be running: never resume here.
        }
        Err(e) => {
            tracing::warn!(error = %e, "migration failed; VM stays on the source");
            if let Some(c) = run.control.as_mut() {
                let _ = send(
                    c,
                    &Message::Abort {
                        reason: e.to_string(),
                    },
                );
            }
            let _ = vm.set_throttle(0);
            let _ = vm.stop_dirty_log();
            if paused {
                vm.resume().map_err(|r| {
                    MigrationError::Vm(format!("resume on the source after failure: {r}"))
                })?;
            }
        }
        Ok(_) => {}
    }
    for s in run.streams.iter().chain(run.control.iter()) {
        let _ = s.tcp().shutdown(Shutdown::Both);
    }
    result
}

struct Run<'a, V> {
    vm: &'a V,
    cfg: &'a MigrationConfig,
    cancel: &'a CancelToken,
    limiter: RateLimiter,
    control: Option<Link>,
    streams: Vec<Link>,
    /// One per data stream, with the compression the destination accepted.
    encoders: Vec<BatchEncoder>,
    stats: MigrationStats,
    pages: u64,
    epoch: u64,
    send_time: Duration,
    measured_bytes: u64,
}

impl<'a, V: MigratableVm> Run<'a, V> {
    fn new(vm: &'a V, cfg: &'a MigrationConfig, cancel: &'a CancelToken) -> Self {
        Run {
            vm,
            cfg,
            cancel,
            limiter: RateLimiter::new(cfg.bandwidth_limit),
            control: None,
            streams: Vec::new(),
            encoders: Vec::new(),
            stats: MigrationStats::default(),
            pages: vm.memory_bytes() / PAGE_SIZE as u64,
            epoch: 0,
            send_time: Duration::ZERO,
            measured_bytes: 0,
        }
    }

    fn bandwidth(&self) -> f64 {
        if self.measured_bytes < MIN_MEASURED_BYTES || self.send_time.is_zero() {
            ASSUMED_BANDWIDTH
        } else {
            self.measured_bytes as f64 / self.send_time.as_secs_f64()
        }
    }

    /// A new stream to the destination, its TLS handshake done when the config asks for TLS.
    fn connect(&self, addr: SocketAddr, buffer: Option<usize>) -> Result<Link, MigrationError> {
        let s = TcpStream::connect_timeout(&addr, self.cfg.io_timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(self.cfg.io_timeout))?;
        s.set_write_timeout(Some(self.cfg.io_timeout))?;
        if let Some(bytes) = buffer {
            limit_socket_buffers(&s, bytes);
        }
        Link::connect(s, self.cfg.tls.as_ref())
    }

    /// Hello at `version` on a new control stream; the Welcome's session and features.
    fn handshake(
        &self,
        addr: SocketAddr,
        version: u32,
        streams: u16,
    ) -> Result<(Link, u64, u32), MigrationError> {
        let vm = self.vm;
        let mut control = self.connect(addr, None)?;
        let hello = Hello {
            version,
            token: self.cfg.token.clone(),
            streams,
            spec: VmSpec {
                memory_bytes: vm.memory_bytes(),
                vcpus: vm.vcpus(),
                page_size: PAGE_SIZE as u32,
                config: vm.config(),
            },
            cpu_features: vm.cpu_features(),
            features: if self.cfg.compression == Compression::Off {
                0
            } else {
                FEATURE_ZSTD_PAGES
            },
        };
        send(&mut control, &Message::Hello(hello))?;
        match recv(&mut control)? {
            Message::Welcome { session, features } => Ok((control, session, features)),
            Message::Refuse { reason } => Err(MigrationError::Refused(reason)),
            other => Err(unexpected("Welcome", &other)),
        }
    }

    fn execute(
        &mut self,
        addr: SocketAddr,
        gate: SwitchoverGate<'_>,
        progress: &mut dyn FnMut(&Progress),
        paused: &mut bool,
    ) -> Result<MigrationStats, MigrationError> {
        let start = Instant::now();
        let vm = self.vm;
        let streams = self.cfg.streams.clamp(1, 64);
        progress(&Progress::default());

        let (control, session, features) = match self.cfg.compression {
            // Nothing to negotiate: the oldest protocol, which every destination speaks.
            Compression::Off => self.handshake(addr, MIN_PROTOCOL_VERSION, streams)?,
            mode => match self.handshake(addr, PROTOCOL_VERSION, streams) {
                Err(MigrationError::Refused(r))
                    if mode == Compression::Auto && r.starts_with("protocol version") =>
                {
                    tracing::info!(reason = %r, "older destination: migrating uncompressed");
                    self.handshake(addr, MIN_PROTOCOL_VERSION, streams)?
                }
                other => other?,
            },
        };
        let mode = if features & FEATURE_ZSTD_PAGES != 0 {
            self.cfg.compression
        } else if self.cfg.compression == Compression::On {
            return Err(MigrationError::Refused(
                "the destination does not accept compressed pages (--compress on)".into(),
            ));
        } else {
            Compression::Off
        };
        let cap_share = self.cfg.bandwidth_limit as f64 / f64::from(streams);
        self.encoders = (0..streams)
            .map(|_| BatchEncoder::new(mode, cap_share))
            .collect();
        self.control = Some(control);
        self.stats.handshake = start.elapsed();
        for i in 0..streams {
            let mut s = self.connect(addr, Some(DATA_STREAM_BUFFER))?;
            send(
                &mut s,
                &Message::Join {
                    session,
                    stream: i,
                    token: self.cfg.token.clone(),
                },
            )?;
            self.streams.push(s);
        }

        // First pass: only pages the guest ever touched; writes from now on are logged.
        vm.start_dirty_log().map_err(vm_err)?;
        let touched = vm.touched_pages().map_err(vm_err)?;
        self.stats.untouched_pages = self.pages - touched.count();
        let mut p = Progress {
            phase: Phase::FirstPass,
            bytes_remaining: touched.count() * PAGE_SIZE as u64,
            ..Default::default()
        };
        progress(&p);
        let mut round_start = Instant::now();
        self.send_pages(&touched)?;
        self.stats.first_pass = round_start.elapsed();
        let mut previous_dirty = None;
        let mut throttle = 0u8;
        let mut dirty = loop {
            self.cancel.check()?;
            let dirty = vm.take_dirty_bitmap().map_err(vm_err)?;
            let round_time = round_start.elapsed().as_secs_f64().max(1e-6);
            let obs = RoundObservation {
                round: self.stats.rounds,
                dirty_pages: dirty.count(),
                bandwidth: self.bandwidth(),
                dirty_rate: dirty.count() as f64 * PAGE_SIZE as f64 / round_time,
                bytes_sent: self.stats.bytes_sent,
                throttle,
                previous_dirty_pages: previous_dirty,
            };
            p = Progress {
                phase: Phase::DirtyRounds,
                round: obs.round,
                bytes_sent: obs.bytes_sent,
                bytes_remaining: obs.dirty_pages * PAGE_SIZE as u64,
                dirty_rate: obs.dirty_rate,
                bandwidth: obs.bandwidth,
                expected_downtime: expected_downtime(obs.dirty_pages, obs.bandwidth),
                throttle,
            };
            progress(&p);
            match decide(self.cfg, vm.memory_bytes(), &obs) {
                Decision::SwitchOver => break dirty,
                Decision::Fail(why) => {
                    return Err(MigrationError::NotConverging(format!(
                        "{why:?} after {} rounds, {} bytes, {} pages still dirty",
                        obs.round, obs.bytes_sent, obs.dirty_pages
                    )))
                }
                Decision::Continue { throttle: t } => {
                    if t != throttle {
                        vm.set_throttle(t).map_err(vm_err)?;
                        throttle = t;
                        self.stats.max_throttle = self.stats.max_throttle.max(t);
                        tracing::info!(throttle = t, "auto-converge: throttling vCPUs");
                    }
                }
            }
            previous_dirty = Some(obs.dirty_pages);
            round_start = Instant::now();
            // Each round re-probes compression; the final set (inside the pause) does not.
            self.encoders
                .iter_mut()
                .for_each(|e| e.estimate.new_round());
            self.send_pages(&dirty)?;
            self.stats.rounds += 1;
        };

        // Stop-and-copy: the final dirty set and the vCPU/device state.
        self.cancel.check()?;
        p.phase = Phase::StopAndCopy;
        progress(&p);
        let pause_at = Instant::now();
        let mut lap = Lap(pause_at);
        vm.pause().map_err(vm_err)?;
        *paused = true;
        self.stats.switchover.pause = lap.next();
        dirty.union_with(&vm.take_dirty_bitmap().map_err(vm_err)?);
        self.stats.switchover.final_bitmap = lap.next();
        self.stats.switchover.final_pages = dirty.count();
        // The state goes first, on the control stream, so the destination decodes it while
        // the last pages travel on the data streams.
        let state = vm.save_state().map_err(vm_err)?;
        self.stats.switchover.state_bytes = state.len() as u64;
        let control = self.control.as_mut().ok_or(MigrationError::PeerClosed)?;
        send(control, &Message::DeviceState(state))?;
        self.stats.switchover.state_save = lap.next();
        self.send_pages(&dirty)?;
        self.stats.switchover.final_send = lap.next();
        let control = self.control.as_mut().ok_or(MigrationError::PeerClosed)?;
        send(
            control,
            &Message::Complete {
                epoch: self.epoch,
                want_hash: self.cfg.verify_hash,
            },
        )?;
        let local_hash = self.cfg.verify_hash.then(|| hash_memory(vm)).transpose()?;
        let control = self.control.as_mut().ok_or(MigrationError::PeerClosed)?;
        let remote_hash = match recv(control)? {
            Message::ImageReady { hash } => hash,
            Message::Abort { reason } => return Err(MigrationError::Refused(reason)),
            other => return Err(unexpected("ImageReady", &other)),
        };
        self.stats.switchover.state_transfer = lap.next();
        if let Some(h) = local_hash {
            if h != remote_hash {
                return Err(MigrationError::Protocol(format!(
                    "destination memory hash {remote_hash:#x} differs from the source's {h:#x}"
                )));
            }
            self.stats.memory_hash = Some(h);
        }

        // The switchover gate: past this point the destination owns the VM.
        self.cancel.check()?;
        p.phase = Phase::Switchover;
        progress(&p);
        lap.next();
        gate().map_err(MigrationError::GateRefused)?;
        self.stats.switchover.gate = lap.next();
        let after_gate = |e: MigrationError| MigrationError::OutcomeUnknown(e.to_string());
        send(control, &Message::Resume).map_err(after_gate)?;
        match recv(control).map_err(after_gate)? {
            Message::Resumed => {}
            other => return Err(after_gate(unexpected("Resumed", &other))),
        }
        self.stats.switchover.resume_ack = lap.next();
        self.stats.downtime = pause_at.elapsed();
        self.stats.total = start.elapsed();
        self.stats.final_throttle = throttle;
        self.stats.bandwidth = self.bandwidth();
        p.phase = Phase::Done;
        p.bytes_sent = self.stats.bytes_sent;
        p.bytes_remaining = 0;
        progress(&p);
        Ok(self.stats.clone())
    }

    /// Send every page in `set` over the streams (striped), then a flush marker on each.
    fn send_pages(&mut self, set: &PageBitmap) -> Result<(), MigrationError> {
        self.epoch += 1;
        let epoch = self.epoch;
        let n = self.streams.len() as u64;
        let t = Instant::now();
        let (vm, cancel, limiter) = (self.vm, self.cancel, &self.limiter);
        let stripe = |i: usize| {
            set.iter()
                .filter(move |pfn| (pfn / STRIPE_PAGES) % n == i as u64)
        };
        let results: Vec<Result<StreamCounts, MigrationError>> = if set.count() <= INLINE_PAGES {
            // A handful of pages (typically the final set): threads would cost more than
            // they save.
            self.streams
                .iter_mut()
                .zip(self.encoders.iter_mut())
                .enumerate()
                .map(|(i, (stream, enc))| {
                    send_stream(vm, stream, enc, stripe(i), epoch, cancel, limiter)
                })
                .collect()
        } else {
            // Each stream's thread also compresses its batches (the worker threads).
            std::thread::scope(|scope| {
                let handles: Vec<_> = self
                    .streams
                    .iter_mut()
                    .zip(self.encoders.iter_mut())
                    .enumerate()
                    .map(|(i, (stream, enc))| {
                        scope.spawn(move || {
                            send_stream(vm, stream, enc, stripe(i), epoch, cancel, limiter)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(MigrationError::Protocol("sender thread panicked".into()))
                        })
                    })
                    .collect()
            })
        };
        let (mut bytes, mut plain_bytes) = (0, 0);
        for r in results {
            let c = r?;
            bytes += c.bytes;
            plain_bytes += c.plain_bytes;
            self.stats.pages_sent += c.pages;
            self.stats.zero_pages += c.zeros;
            self.stats.compressed_pages += c.compressed_pages;
        }
        self.stats.bytes_sent += bytes;
        self.stats.compression_saved_bytes += plain_bytes - bytes;
        self.send_time += t.elapsed();
        // Convergence is planned in pages, so the bandwidth counts what the bytes carried.
        self.measured_bytes += plain_bytes;
        Ok(())
    }
}

#[derive(Default)]
struct StreamCounts {
    /// On the wire.
    bytes: u64,
    /// What the same messages would have taken uncompressed.
    plain_bytes: u64,
    pages: u64,
    compressed_pages: u64,
    zeros: u64,
}

fn send_stream<V: MigratableVm>(
    vm: &V,
    stream: &mut Link,
    encoder: &mut BatchEncoder,
    pfns: impl Iterator<Item = u64>,
    epoch: u64,
    cancel: &CancelToken,
    limiter: &RateLimiter,
) -> Result<StreamCounts, MigrationError> {
    let mut counts = StreamCounts::default();
    let mut batch = PageBatch::default();
    let mut zeros = ZeroRuns::default();
    let pages_kind = kind_of(&Message::Pages(Vec::new()));
    let zpages_kind = kind_of(&Message::ZPages {
        raw_len: 0,
        data: Vec::new(),
    });
    let mut flush_batch = |batch: &mut PageBatch, stream: &mut Link, counts: &mut StreamCounts| {
        cancel.check()?;
        let n = batch.len() as u64;
        counts.pages += n;
        let plain = batch.take_payload();
        counts.plain_bytes += plain.len() as u64 + 16;
        let (kind, payload) = match encoder.encode(plain) {
            Encoded::Plain(p) => (pages_kind, p),
            Encoded::Compressed(z) => {
                counts.compressed_pages += n;
                (zpages_kind, z)
            }
        };
        let t = Instant::now();
        limiter.acquire(payload.len(), cancel)?;
        write_frame(stream, kind, payload)?;
        let wire = payload.len();
        encoder
            .estimate
            .record_write(wire, t.elapsed(), kind == zpages_kind);
        counts.bytes += wire as u64 + 16;
        batch.clear();
        Ok::<_, MigrationError>(())
    };
    for pfn in pfns {
        if batch
            .push(pfn, |buf| vm.read_page(pfn, buf))
            .map_err(vm_err)?
        {
            zeros.push(pfn);
        } else if batch.is_full() {
            flush_batch(&mut batch, stream, &mut counts)?;
        }
    }
    if !batch.is_empty() {
        flush_batch(&mut batch, stream, &mut counts)?;
    }
    for chunk in zeros.0.chunks(4096) {
        counts.zeros += chunk.iter().map(|(_, n)| *n as u64).sum::<u64>();
        send(stream, &Message::Zeros(chunk.to_vec()))?;
        let bytes = 16 + 4 + 12 * chunk.len() as u64;
        counts.bytes += bytes;
        counts.plain_bytes += bytes;
    }
    send(stream, &Message::Flush { epoch })?;
    stream.flush()?;
    Ok(counts)
}

/// Successive intervals of the switchover.
struct Lap(Instant);

impl Lap {
    fn next(&mut self) -> Duration {
        let now = Instant::now();
        now.duration_since(std::mem::replace(&mut self.0, now))
    }
}

fn kind_of(m: &Message) -> u8 {
    m.encode().0
}

/// Hash of all guest memory, page by page (the VM must be paused for a stable answer).
pub fn hash_memory<V: MigratableVm>(vm: &V) -> Result<u64, MigrationError> {
    let mut h = MemoryHasher::default();
    let mut page = vec![0u8; PAGE_SIZE];
    for pfn in 0..vm.memory_bytes() / PAGE_SIZE as u64 {
        vm.read_page(pfn, &mut page).map_err(vm_err)?;
        h.page(&page);
    }
    Ok(h.finish())
}

fn vm_err(e: super::vm::VmOpError) -> MigrationError {
    MigrationError::Vm(e.0)
}

fn unexpected(wanted: &str, got: &Message) -> MigrationError {
    match got {
        Message::Abort { reason } => MigrationError::Refused(format!("peer aborted: {reason}")),
        _ => MigrationError::Protocol(format!("expected {wanted}, got {}", got.name())),
    }
}
