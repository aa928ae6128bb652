//! The test guest's status page (ABI.md "Status page"), read straight from guest memory.
use crate::error::{Error, Result};
use crate::memory::GuestMemory;
use serde::{Deserialize, Serialize};

/// Guest-physical address of the status page.
pub const STATUS_ADDR: u64 = 0x0020_0000;
/// `TERNSTAT` as a little-endian u64.
pub const STATUS_MAGIC: u64 = 0x5441_5453_4E52_4554;
pub const STATUS_VERSION: u32 = 1;

/// What the guest says it is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestState {
    Booting,
    Running,
    Error,
}

/// A snapshot of the status page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatus {
    pub state: GuestState,
    pub pages_written: u64,
    pub pages_verified: u64,
    pub mismatches: u64,
    /// Largest stall between two loop iterations, in TSC ticks.
    pub max_stall_ticks: u64,
    pub heartbeat: u64,
    pub heartbeat_tsc: u64,
    pub tsc_khz: u64,
    pub wss_pages: u64,
    /// First mismatching page index, if any.
    pub first_mismatch: Option<u64>,
    pub vcpus_running: u32,
    /// The guest's error message when `state` is `Error`.
    pub error: Option<String>,
    /// The disk workload's counters (all zero without one).
    pub disk: DiskStatus,
}

/// The disk workload's part of the status page (ABI.md "Status page", 0x60..0xa0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// Data blocks the workload uses; 0 = no disk workload.
    pub blocks: u64,
    /// 4 KiB blocks written.
    pub written: u64,
    /// Blocks read back and verified (at boot and after each flush).
    pub verified: u64,
    pub mismatches: u64,
    /// Requests the device failed.
    pub io_errors: u64,
    /// Last generation whose blocks and table are flushed.
    pub flushed_gen: u64,
    /// Blocks a previous boot flushed, verified at this boot.
    pub boot_verified: u64,
    /// First mismatching data block (`u64::MAX - 1`: the superblock).
    pub first_mismatch: Option<u64>,
}

impl GuestStatus {
    /// Largest stall in microseconds, if the guest knows its TSC frequency.
    pub fn max_stall_us(&self) -> Option<u64> {
        (self.tsc_khz != 0).then(|| self.max_stall_ticks.saturating_mul(1000) / self.tsc_khz)
    }

    /// Reads and validates the status page. Before the guest has written its magic this is
    /// an error (the guest is still booting or is not the test guest).
    pub fn read(mem: &GuestMemory) -> Result<Self> {
        let mut page = [0u8; 0x200];
        mem.read(STATUS_ADDR, &mut page)?;
        Self::parse(&page)
    }

    /// Parses the first 0x200 bytes of the status page.
    pub fn parse(page: &[u8; 0x200]) -> Result<Self> {
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&page[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |o: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&page[o..o + 4]);
            u32::from_le_bytes(b)
        };
        let magic = u64_at(0);
        if magic != STATUS_MAGIC {
            return Err(Error::Status(format!(
                "bad magic {magic:#018x} (guest not booted yet, or not the Tern test guest)"
            )));
        }
        let version = u32_at(8);
        if version != STATUS_VERSION {
            return Err(Error::Status(format!(
                "ABI version {version}, this host speaks {STATUS_VERSION}"
            )));
        }
        let state = match u32_at(0x0c) {
            0 => GuestState::Booting,
            1 => GuestState::Running,
            2 => GuestState::Error,
            s => return Err(Error::Status(format!("unknown guest state {s}"))),
        };
        let error = (state == GuestState::Error).then(|| {
            let msg = &page[0x100..0x200];
            let end = msg.iter().position(|&b| b == 0).unwrap_or(msg.len());
            String::from_utf8_lossy(&msg[..end]).into_owned()
        });
        let first = u64_at(0x50);
        Ok(Self {
            state,
            pages_written: u64_at(0x10),
            pages_verified: u64_at(0x18),
            mismatches: u64_at(0x20),
            max_stall_ticks: u64_at(0x28),
            heartbeat: u64_at(0x30),
            heartbeat_tsc: u64_at(0x38),
            tsc_khz: u64_at(0x40),
            wss_pages: u64_at(0x48),
            first_mismatch: (first != u64::MAX).then_some(first),
            vcpus_running: u32_at(0x58),
            error,
            disk: DiskStatus {
                written: u64_at(0x60),
                verified: u64_at(0x68),
                mismatches: u64_at(0x70),
                io_errors: u64_at(0x78),
                flushed_gen: u64_at(0x80),
                boot_verified: u64_at(0x88),
                first_mismatch: {
                    let f = u64_at(0x90);
                    // 0 before the guest initialised the field (older guests: no disk).
                    (f != u64::MAX && u64_at(0x98) != 0).then_some(f)
                },
                blocks: u64_at(0x98),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page() -> [u8; 0x200] {
        let mut p = [0u8; 0x200];
        p[0..8].copy_from_slice(&STATUS_MAGIC.to_le_bytes());
        p[8..12].copy_from_slice(&1u32.to_le_bytes());
        p[0x50..0x58].copy_from_slice(&u64::MAX.to_le_bytes());
        p
    }

    #[test]
    fn parses_and_rejects() {
        let mut p = page();
        p[0x0c] = 2;
        p[0x100..0x104].copy_from_slice(b"oops");
        let s = GuestStatus::parse(&p).unwrap();
        assert_eq!(s.state, GuestState::Error);
        assert_eq!(s.error.as_deref(), Some("oops"));
        assert_eq!(s.first_mismatch, None);
        let mut bad = page();
        bad[8] = 7;
        assert!(GuestStatus::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("version"));
        bad[0] = 0;
        assert!(GuestStatus::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("magic"));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0x200)) {
            let mut p = [0u8; 0x200];
            p.copy_from_slice(&bytes);
            let _ = GuestStatus::parse(&p);
        }
    }
}
