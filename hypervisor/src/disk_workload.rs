//! The test guest's disk workload: its options (`disk=64M,iops=2000,dio=random,dflush=16`,
//! part of the [`crate::Workload`] string) and a host-side check of the image it writes
//! (guest/ABI.md "Disk"), so a test can verify the file itself after the VM is gone.
use crate::error::{Error, Result};
use crate::workload::{format_size, parse_size};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Largest `disk=` (the guest keeps the generation table in 1 MiB).
pub const MAX_BYTES: u64 = 1 << 30;
const MIN_BYTES: u64 = 64 << 10;
const BLOCK: u64 = 4096;
const SB_MAGIC: u64 = 0x4B53_4944_4E52_4554; // "TERNDISK"
const SB_VERSION: u64 = 1;
const DISK_SALT: u64 = 0x4449_534b_0000_0000;

/// How the guest writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskIo {
    /// One 4 KiB block at a random place per request.
    #[default]
    Random,
    /// 1 MiB (256 blocks) per request, in order, wrapping.
    Seq,
}

/// The disk part of the workload; `bytes == 0` is no disk workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskWorkload {
    /// Bytes of the disk the guest uses, from its start (64K..=1G in 4K units, or 0).
    pub bytes: u64,
    /// Write requests per second; 0 = as fast as the guest can.
    pub iops: u64,
    pub io: DiskIo,
    /// Write requests per flush cycle (1..=256).
    pub flush_every: u32,
}

impl Default for DiskWorkload {
    fn default() -> Self {
        Self {
            bytes: 0,
            iops: 0,
            io: DiskIo::Random,
            flush_every: 16,
        }
    }
}

impl DiskWorkload {
    /// Takes one `key=value` of the workload string if it is a disk key: `Ok(false)` if not.
    pub fn parse_key(&mut self, key: &str, value: &str) -> Result<bool> {
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| Error::Workload(format!("{key}={v:?} is not a number")))
        };
        match key {
            "disk" => self.bytes = parse_size(value)?,
            "iops" => self.iops = num(value)?,
            "dflush" => {
                let n = num(value)?;
                if !(1..=256).contains(&n) {
                    return Err(Error::Workload(format!("dflush={n} is outside 1..=256")));
                }
                self.flush_every = n as u32;
            }
            "dio" => {
                self.io = match value {
                    "random" => DiskIo::Random,
                    "seq" => DiskIo::Seq,
                    _ => {
                        return Err(Error::Workload(format!(
                            "dio={value:?} is not one of random, seq"
                        )))
                    }
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Checks the values once all keys are in.
    pub fn validate(&self) -> Result<()> {
        // Without a disk workload the other keys would be dropped silently (they are not
        // rendered), so the workload would change on its way to the guest or a destination.
        if self.bytes == 0 && *self != DiskWorkload::default() {
            return Err(Error::Workload(
                "iops, dio and dflush need a disk workload (disk=...)".into(),
            ));
        }
        if self.bytes != 0
            && (!self.bytes.is_multiple_of(BLOCK) || !(MIN_BYTES..=MAX_BYTES).contains(&self.bytes))
        {
            return Err(Error::Workload(format!(
                "disk={} must be 0 or 64K..=1G in 4K units",
                format_size(self.bytes)
            )));
        }
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.bytes != 0
    }

    /// Data blocks the guest uses for `bytes` (after the superblock and the table).
    pub fn data_blocks(&self) -> u64 {
        let (_, data) = layout(self.bytes);
        data
    }
}

/// `,disk=...` words for the workload string; empty without a disk workload, so existing
/// strings stay as they were.
impl fmt::Display for DiskWorkload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.enabled() {
            return Ok(());
        }
        let io = match self.io {
            DiskIo::Random => "random",
            DiskIo::Seq => "seq",
        };
        write!(
            f,
            ",disk={},iops={},dio={io},dflush={}",
            format_size(self.bytes),
            self.iops,
            self.flush_every
        )
    }
}

/// (table blocks, data blocks) of a `bytes`-long workload area: superblock, table, data.
fn layout(bytes: u64) -> (u64, u64) {
    let total = bytes / BLOCK;
    if total < 3 {
        return (0, 0);
    }
    let table = (total + 1023) / 1025;
    (table, total - 1 - table)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Word `w` of data block `b` at generation `g` (ABI.md "Disk").
pub fn disk_word(b: u64, g: u64, w: u64) -> u64 {
    splitmix64((b << 32) ^ (g << 8) ^ w ^ DISK_SALT)
}

/// What [`check_image`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageCheck {
    /// Generation in the superblock: every write of it and before was flushed.
    pub flushed_gen: u64,
    /// Blocks the table names (written and flushed at least once).
    pub blocks_checked: u64,
    /// Blocks older than the table says, or not what their stamp says.
    pub mismatches: u64,
    pub first_mismatch: Option<u64>,
}

/// Verifies an image the guest's disk workload of `bytes` wrote, as the guest does at boot:
/// every block the flushed table names must hold at least that generation, intact. An image
/// the guest never flushed (no superblock) is an error.
pub fn check_image(path: &Path, bytes: u64) -> Result<ImageCheck> {
    let (table_blocks, data) = layout(bytes);
    let f = File::open(path)?;
    let read = |block: u64, buf: &mut [u8]| -> Result<()> {
        f.read_exact_at(buf, block * BLOCK)
            .map_err(|e| Error::Config(format!("{}: block {block}: {e}", path.display())))
    };
    let mut sb = vec![0u8; BLOCK as usize];
    read(0, &mut sb)?;
    let w = |buf: &[u8], i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    let sum = splitmix64(w(&sb, 0) ^ (w(&sb, 1) << 8) ^ (w(&sb, 2) << 16) ^ w(&sb, 3));
    if w(&sb, 0) != SB_MAGIC || w(&sb, 1) != SB_VERSION || w(&sb, 2) != data || w(&sb, 4) != sum {
        return Err(Error::Config(format!(
            "{}: no valid superblock for a {} disk workload",
            path.display(),
            format_size(bytes)
        )));
    }
    let mut table = vec![0u8; (table_blocks * BLOCK) as usize];
    read(1, &mut table)?;
    let mut check = ImageCheck {
        flushed_gen: w(&sb, 3),
        blocks_checked: 0,
        mismatches: 0,
        first_mismatch: None,
    };
    let mut block = vec![0u8; BLOCK as usize];
    for b in 0..data {
        let i = b as usize * 4;
        let want = u64::from(u32::from_le_bytes([
            table[i],
            table[i + 1],
            table[i + 2],
            table[i + 3],
        ]));
        if want == 0 {
            continue;
        }
        check.blocks_checked += 1;
        read(1 + table_blocks + b, &mut block)?;
        let g = w(&block, 1);
        let mut x = 0u64;
        let mut ok = w(&block, 0) == b && g >= want;
        for i in 0..511 {
            let v = w(&block, i);
            x ^= v;
            ok &= i < 2 || v == disk_word(b, g, i as u64);
        }
        ok &= w(&block, 511) == splitmix64(x);
        if !ok {
            check.mismatches += 1;
            check.first_mismatch.get_or_insert(b);
        }
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_render_and_refuse() {
        let mut d = DiskWorkload::default();
        assert!(d.parse_key("disk", "64M").unwrap());
        assert!(d.parse_key("iops", "2000").unwrap());
        assert!(d.parse_key("dio", "seq").unwrap());
        assert!(d.parse_key("dflush", "4").unwrap());
        assert!(!d.parse_key("wss", "4M").unwrap());
        d.validate().unwrap();
        assert_eq!(d.to_string(), ",disk=64M,iops=2000,dio=seq,dflush=4");
        assert_eq!(DiskWorkload::default().to_string(), "");
        assert!(d.parse_key("dio", "zigzag").is_err());
        assert!(d.parse_key("dflush", "0").is_err());
        assert!(d.parse_key("dflush", "257").is_err());
        for bad in ["4K", "2G", "100000"] {
            let mut d = DiskWorkload::default();
            d.parse_key("disk", bad).unwrap();
            assert!(d.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn layout_fits_the_table() {
        for bytes in [MIN_BYTES, 64 << 20, MAX_BYTES] {
            let (t, d) = layout(bytes);
            assert!(t * 1024 >= d && 1 + t + d == bytes / BLOCK, "{bytes}");
            assert!(t <= 256);
        }
    }

    #[test]
    fn check_image_finds_stale_and_torn_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let bytes = 256 << 10;
        let (t, data) = layout(bytes);
        let block = |b: u64, g: u64| {
            let mut words: Vec<u64> = (0..512).map(|w| disk_word(b, g, w)).collect();
            words[0] = b;
            words[1] = g;
            words[511] = splitmix64(words[..511].iter().fold(0, |x, v| x ^ v));
            words
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect::<Vec<u8>>()
        };
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(bytes).unwrap();
        assert!(check_image(&path, bytes).is_err(), "no superblock yet");
        let mut sb = [0u64; 512];
        sb[..4].copy_from_slice(&[SB_MAGIC, SB_VERSION, data, 7]);
        sb[4] = splitmix64(sb[0] ^ (sb[1] << 8) ^ (sb[2] << 16) ^ sb[3]);
        let sbb: Vec<u8> = sb.iter().flat_map(|w| w.to_le_bytes()).collect();
        f.write_all_at(&sbb, 0).unwrap();
        // Table: block 0 at gen 5, block 1 at gen 7, block 2 at gen 7.
        let mut table = vec![0u8; (t * BLOCK) as usize];
        for (b, g) in [(0usize, 5u32), (1, 7), (2, 7)] {
            table[b * 4..b * 4 + 4].copy_from_slice(&g.to_le_bytes());
        }
        f.write_all_at(&table, BLOCK).unwrap();
        let at = |b: u64| (1 + t + b) * BLOCK;
        f.write_all_at(&block(0, 6), at(0)).unwrap(); // newer than flushed: fine
        f.write_all_at(&block(1, 7), at(1)).unwrap();
        f.write_all_at(&block(2, 6), at(2)).unwrap(); // lost the flushed write
        let c = check_image(&path, bytes).unwrap();
        assert_eq!((c.flushed_gen, c.blocks_checked, c.mismatches), (7, 3, 1));
        assert_eq!(c.first_mismatch, Some(2));
        let mut torn = block(1, 7);
        torn[100] ^= 1;
        f.write_all_at(&torn, at(1)).unwrap();
        assert_eq!(check_image(&path, bytes).unwrap().mismatches, 2);
    }
}
