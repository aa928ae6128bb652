//! Stream plumbing shared by both sides: cancellation, a bandwidth cap shared by all streams,
//! and page batches encoded straight into a frame buffer (no intermediate copies).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::messages::{MAX_PAGES_PER_FRAME, PAGE_SIZE};
use super::MigrationError;

/// Cancels a migration from any thread; checked between every batch.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    pub fn check(&self) -> Result<(), MigrationError> {
        if self.is_cancelled() {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Kernel buffer (each direction) for a data stream. Small enough that little data sits in
/// flight when the source pauses (the destination must drain it inside the downtime), large
/// enough for full speed on a fast link.
pub const DATA_STREAM_BUFFER: usize = 256 << 10;

/// Cap the kernel's send and receive buffers of a data stream at `bytes` (best effort).
pub fn limit_socket_buffers(s: &std::net::TcpStream, bytes: usize) {
    use std::os::fd::AsRawFd;
    let v = bytes as libc::c_int;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: a valid socket fd owned by `s`, a c_int option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "setsockopt buffer size");
        }
    }
}

/// Token bucket shared by all streams of one migration; `rate` 0 means unlimited.
pub struct RateLimiter {
    rate: f64,
    state: Mutex<(Instant, f64)>,
}

impl RateLimiter {
    pub fn new(bytes_per_sec: u64) -> Self {
        RateLimiter {
            rate: bytes_per_sec as f64,
            state: Mutex::new((Instant::now(), 0.0)),
        }
    }

    /// Block until `bytes` may be sent (or the migration is cancelled).
    pub fn acquire(&self, bytes: usize, cancel: &CancelToken) -> Result<(), MigrationError> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // Refill, allowing at most 50 ms of burst.
            let refill = now.duration_since(s.0).as_secs_f64() * self.rate;
            s.1 = (s.1 + refill).min(self.rate * 0.05);
            s.0 = now;
            s.1 -= bytes as f64;
            if s.1 < 0.0 {
                Duration::from_secs_f64(-s.1 / self.rate)
            } else {
                Duration::ZERO
            }
        };
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            cancel.check()?;
            std::thread::sleep((deadline - Instant::now()).min(Duration::from_millis(20)));
        }
        Ok(())
    }
}

/// A `Pages` payload under construction: count, then (pfn, page) entries. The buffer keeps
/// its full size and `end` marks the payload, so pages are read straight into it (no zeroing
/// before each read).
pub struct PageBatch {
    buf: Vec<u8>,
    end: usize,
    count: usize,
}

const ENTRY: usize = 8 + PAGE_SIZE;

impl Default for PageBatch {
    fn default() -> Self {
        PageBatch {
            buf: vec![0; 4 + MAX_PAGES_PER_FRAME * ENTRY],
            end: 4,
            count: 0,
        }
    }
}

impl PageBatch {
    /// Add page `pfn`, filled by `fill`; returns whether the page turned out all zero (in
    /// which case it is taken back out, for a zero marker instead). Must not be full.
    pub fn push<E>(
        &mut self,
        pfn: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<bool, E> {
        let entry = &mut self.buf[self.end..self.end + ENTRY];
        entry[..8].copy_from_slice(&pfn.to_le_bytes());
        fill(&mut entry[8..])?;
        if is_zero(&entry[8..]) {
            return Ok(true);
        }
        self.end += ENTRY;
        self.count += 1;
        Ok(false)
    }

    pub fn is_full(&self) -> bool {
        self.count >= MAX_PAGES_PER_FRAME
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The finished payload; call `clear` before adding more.
    pub fn take_payload(&mut self) -> &[u8] {
        self.buf[0..4].copy_from_slice(&(self.count as u32).to_le_bytes());
        &self.buf[..self.end]
    }

    pub fn clear(&mut self) {
        self.end = 4;
        self.count = 0;
    }
}

/// Zero runs under construction: consecutive pfns are merged.
#[derive(Default)]
pub struct ZeroRuns(pub Vec<(u64, u32)>);

impl ZeroRuns {
    pub fn push(&mut self, pfn: u64) {
        if let Some((start, n)) = self.0.last_mut() {
            if *start + *n as u64 == pfn && *n < u32::MAX {
                *n += 1;
                return;
            }
        }
        self.0.push((pfn, 1));
    }
}

pub fn is_zero(data: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: reinterpreting initialized bytes as u64 is valid for any bit pattern;
        // align_to places only properly aligned u64s in the middle slice.
        unsafe { data.align_to::<u64>() }
    };
    pre.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && post.iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_merge() {
        let mut z = ZeroRuns::default();
        for p in [1, 2, 3, 7, 8, 10] {
            z.push(p);
        }
        assert_eq!(z.0, vec![(1, 3), (7, 2), (10, 1)]);
    }

    #[test]
    fn batch_drops_zero_pages() {
        let mut b = PageBatch::default();
        assert!(b
            .push(1, |p: &mut [u8]| -> Result<(), ()> {
                p.fill(0);
                Ok(())
            })
            .unwrap());
        assert!(!b
            .push(2, |p: &mut [u8]| -> Result<(), ()> {
                p[5] = 1;
                Ok(())
            })
            .unwrap());
        assert_eq!(b.len(), 1);
        assert_eq!(b.take_payload().len(), 4 + 8 + PAGE_SIZE);
    }

    #[test]
    fn rate_limiter_caps_throughput() {
        let r = RateLimiter::new(10 << 20);
        let t = Instant::now();
        for _ in 0..20 {
            r.acquire(256 << 10, &CancelToken::new()).unwrap();
        }
        // 5 MiB at 10 MiB/s minus the 50 ms burst allowance.
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
    }
}
