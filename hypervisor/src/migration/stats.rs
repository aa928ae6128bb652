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
    /// Connecting until the destination's Welcome (it builds its VM meanwhile).
    pub handshake: Duration,
    /// Sending every touched page once.
    pub first_pass: Duration,
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
    /// Pages that travelled in zstd-compressed batches.
    pub compressed_pages: u64,
    /// Wire bytes compression saved (plain size minus sent size).
    pub compression_saved_bytes: u64,
    /// Where the downtime went, step by step.
    pub switchover: SwitchoverProfile,
}

/// The stop-and-copy steps as the source saw them; their sum is (about) the downtime.
#[derive(Debug, Clone, Default)]
pub struct SwitchoverProfile {
    /// Asking the vCPUs to stop until all are parked.
    pub pause: Duration,
    /// The last KVM_GET_DIRTY_LOG.
    pub final_bitmap: Duration,
    /// Sending the last dirty pages over all streams.
    pub final_send: Duration,
    pub final_pages: u64,
    /// Reading the vCPU and device state and sending it (before the last pages).
    pub state_save: Duration,
    pub state_bytes: u64,
    /// Complete sent until ImageReady came back (the destination applying the last pages).
    pub state_transfer: Duration,
    /// The caller's switchover gate.
    pub gate: Duration,
    /// Resume sent until Resumed came back (the destination restoring state and resuming).
    pub resume_ack: Duration,
}

/// CRC-32 over guest pages in order (SIMD-fast); both sides compute it the same way to
/// prove their memory is identical.
#[derive(Default)]
pub struct MemoryHasher(crc32fast::Hasher);

impl MemoryHasher {
    pub fn page(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    pub fn finish(&self) -> u64 {
        u64::from(self.0.clone().finalize())
    }
}
