//! Progress events and final statistics of a migration.
use std::time::Duration;

/// Emitted during a migration (from the source's driving thread).
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub phase: Phase,
    pub round: u32,
    pub bytes_sent: u64,
    /// Bytes still to send as far as known (dirty pages * page size).
    pub bytes_remaining: u64,
    /// Guest dirty rate, bytes/s, measured over the last round.
    pub dirty_rate: f64,
    /// Link bandwidth, bytes/s, measured so far.
    pub bandwidth: f64,
    pub expected_downtime: Duration,
    pub throttle: u8,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Phase {
    #[default]
    Handshake,
    FirstPass,
    DirtyRounds,
    StopAndCopy,
    Switchover,
    Done,
}

/// Final figures of a completed migration.
#[derive(Debug, Clone, Default)]
pub struct MigrationStats {
    pub total: Duration,
    /// Source pause to destination's resume acknowledgement.
    pub downtime: Duration,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub untouched_pages: u64,
    /// Dirty rounds after the first pass.
    pub rounds: u32,
    pub final_throttle: u8,
    pub max_throttle: u8,
    pub bandwidth: f64,
    /// Memory hash both sides agreed on (when verification was asked for).
    pub memory_hash: Option<u64>,
}

/// FNV-1a over guest pages in order; both sides compute it the same way to prove identity.
pub struct MemoryHasher(u64);

impl Default for MemoryHasher {
    fn default() -> Self {
        MemoryHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl MemoryHasher {
    pub fn page(&mut self, data: &[u8]) {
        // Word-wise FNV keeps this fast enough for a GiB while still order-sensitive.
        for chunk in data.chunks_exact(8) {
            let mut a = [0u8; 8];
            a.copy_from_slice(chunk);
            self.0 = (self.0 ^ u64::from_le_bytes(a)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub fn finish(&self) -> u64 {
        self.0
    }
}
