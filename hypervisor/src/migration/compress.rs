//! zstd compression of page batches: the per-stream choice between plain and compressed
//! batches (from measured costs, as pure logic), the sender's encoder and the receiver's
//! bounded decoder.
//!
//! A compressed batch (`ZPages`) is a `Pages` payload run through zstd: `raw length u32 |
//! zstd frame`. The raw length is bounded by a full page batch before anything is allocated
//! and the decompressed size must equal it.
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::messages::{MAX_PAGES_PER_FRAME, PAGE_SIZE};
use super::MigrationError;

/// Feature bit in Hello/Welcome: the peer sends/accepts `ZPages` frames.
pub const FEATURE_ZSTD_PAGES: u32 = 1;
/// Largest decompressed `ZPages` payload: one full `Pages` payload.
pub const MAX_RAW_BATCH: usize = 4 + MAX_PAGES_PER_FRAME * (8 + PAGE_SIZE);
/// zstd level: the fastest standard level; higher levels cost more CPU than they save on a
/// link slow enough for compression to pay at all.
const LEVEL: i32 = 1;
/// A compressed batch travels compressed only below this share of its plain size; anything
/// else goes as plain pages (incompressible data costs no wire bytes).
const SHRINK_RATIO: f64 = 0.95;
/// While sending plain, re-probe compression every this many batches (1 MiB each), so a
/// change of content or link is noticed at a cost of 1/64 of the batches' CPU.
const PROBE_EVERY: u32 = 64;
/// Compression must make a batch at least this much faster to be chosen in `auto`.
const MARGIN: f64 = 1.1;
/// Weight of the newest sample in the running cost estimates.
const EWMA: f64 = 0.25;

/// Whether page data is compressed (`tern vm run --compress`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    /// Never (and the handshake does not offer it: any destination version works).
    Off,
    /// Every batch that zstd shrinks below 95 % of its size.
    On,
    /// Only when it makes sending faster, from the measured ratio, compression speed and link
    /// speed of each stream.
    #[default]
    Auto,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Off => "off",
            Compression::On => "on",
            Compression::Auto => "auto",
        })
    }
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Compression::Off),
            "on" => Ok(Compression::On),
            "auto" => Ok(Compression::Auto),
            _ => Err(format!("compression {s:?} is not one of auto, on, off")),
        }
    }
}

/// Running per-stream costs, in seconds per byte, and the decision they lead to.
#[derive(Debug, Clone, Default)]
pub struct CostEstimate {
    /// Compressed size over plain size of the last probes.
    pub ratio: Option<f64>,
    /// Compressing, per plain byte.
    pub compress: f64,
    /// Writing to the stream (bandwidth cap and link), per wire byte.
    pub write: Option<f64>,
    /// The least a wire byte can cost on this stream: its share of the bandwidth cap (0 when
    /// uncapped). Keeps a first write that fit in the cap's burst from looking free.
    pub write_floor: f64,
    /// Plain batches since compression was last tried.
    plain_streak: u32,
}

fn ewma(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| o + EWMA * (new - o))
}

impl CostEstimate {
    /// Whether the next batch should be compressed (or probed).
    pub fn compress_next(&self, mode: Compression) -> bool {
        match mode {
            Compression::Off => false,
            _ if self.ratio.is_none() || self.plain_streak >= PROBE_EVERY => true,
            _ => compression_pays(mode, self),
        }
    }

    pub fn record_compression(&mut self, plain: usize, compressed: usize, took: Duration) {
        if plain == 0 {
            return;
        }
        self.ratio = Some(ewma(self.ratio, compressed as f64 / plain as f64));
        let per_byte = took.as_secs_f64() / plain as f64;
        self.compress = if self.compress == 0.0 {
            per_byte
        } else {
            self.compress + EWMA * (per_byte - self.compress)
        };
        self.plain_streak = 0;
    }

    /// A new round: probe compression again on its first batch.
    pub fn new_round(&mut self) {
        self.plain_streak = PROBE_EVERY;
    }

    /// Cost of a wire byte: as measured, but never below the cap's share.
    pub fn write_cost(&self) -> Option<f64> {
        match self.write {
            Some(w) => Some(w.max(self.write_floor)),
            None => (self.write_floor > 0.0).then_some(self.write_floor),
        }
    }

    pub fn record_write(&mut self, wire: usize, took: Duration, was_compressed: bool) {
        if wire > 0 {
            self.write = Some(ewma(self.write, took.as_secs_f64() / wire as f64));
        }
        if !was_compressed {
            self.plain_streak = self.plain_streak.saturating_add(1);
        }
    }
}

/// The decision itself: `on` compresses whatever shrinks; `auto` only when compressing
/// and writing the smaller batch beats writing the plain one by [`MARGIN`]. Without a
/// measured write cost or a cap yet, `auto` assumes an unknown (fast) link and stays plain.
pub fn compression_pays(mode: Compression, est: &CostEstimate) -> bool {
    let Some(ratio) = est.ratio else {
        return false;
    };
    if ratio >= SHRINK_RATIO {
        return false;
    }
    match mode {
        Compression::Off => false,
        Compression::On => true,
        Compression::Auto => est
            .write_cost()
            .is_some_and(|w| (est.compress + ratio * w) * MARGIN < w),
    }
}

/// The sending side of one stream: reused zstd context and output buffer.
pub struct BatchEncoder {
    mode: Compression,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    out: Vec<u8>,
    pub estimate: CostEstimate,
}

/// What [`BatchEncoder::encode`] chose for a batch.
pub enum Encoded<'a> {
    Plain(&'a [u8]),
    /// A `ZPages` payload.
    Compressed(&'a [u8]),
}

impl BatchEncoder {
    /// `mode` as negotiated: `Off` when the destination did not accept compression.
    /// `cap_share`: this stream's share of the bandwidth cap in bytes/s (0 = uncapped).
    pub fn new(mode: Compression, cap_share: f64) -> Self {
        let compressor = (mode != Compression::Off)
            .then(|| zstd::bulk::Compressor::new(LEVEL).ok())
            .flatten();
        BatchEncoder {
            mode: if compressor.is_some() {
                mode
            } else {
                Compression::Off
            },
            compressor,
            out: Vec::new(),
            estimate: CostEstimate {
                write_floor: if cap_share > 0.0 {
                    1.0 / cap_share
                } else {
                    0.0
                },
                ..Default::default()
            },
        }
    }

    /// Encode one `Pages` payload as itself or compressed, whichever the estimate picks
    /// (a compressed batch that did not shrink enough goes plain: the fallback).
    pub fn encode<'a>(&'a mut self, plain: &'a [u8]) -> Encoded<'a> {
        if !self.estimate.compress_next(self.mode) {
            return Encoded::Plain(plain);
        }
        let Some(c) = self.compressor.as_mut() else {
            return Encoded::Plain(plain);
        };
        let t = std::time::Instant::now();
        self.out.clear();
        self.out
            .extend_from_slice(&(plain.len() as u32).to_le_bytes());
        self.out
            .resize(4 + zstd::zstd_safe::compress_bound(plain.len()), 0);
        let Ok(n) = c.compress_to_buffer(plain, &mut self.out[4..]) else {
            return Encoded::Plain(plain);
        };
        self.out.truncate(4 + n);
        self.estimate
            .record_compression(plain.len(), n, t.elapsed());
        if (n as f64) < plain.len() as f64 * SHRINK_RATIO {
            Encoded::Compressed(&self.out)
        } else {
            Encoded::Plain(plain)
        }
    }
}

/// The receiving side of one stream: decompresses `ZPages` payloads into a reused buffer
/// of at most one page batch.
#[derive(Default)]
pub struct BatchDecoder {
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    out: Vec<u8>,
}

impl BatchDecoder {
    /// The `Pages` payload inside a `ZPages` payload.
    pub fn decode(&mut self, payload: &[u8]) -> Result<&[u8], MigrationError> {
        let bad = |what: String| MigrationError::Protocol(format!("compressed batch: {what}"));
        let raw_len = payload
            .get(0..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| bad("shorter than its length field".into()))?;
        if raw_len > MAX_RAW_BATCH {
            return Err(bad(format!(
                "declares {raw_len} bytes, more than a page batch ({MAX_RAW_BATCH})"
            )));
        }
        if self.decompressor.is_none() {
            self.decompressor = Some(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| bad(format!("cannot create a zstd context: {e}")))?,
            );
        }
        let d = self
            .decompressor
            .as_mut()
            .ok_or_else(|| bad("no zstd context".into()))?;
        self.out.resize(raw_len, 0);
        let n = d
            .decompress_to_buffer(&payload[4..], &mut self.out[..])
            .map_err(|e| bad(format!("zstd: {e}")))?;
        if n != raw_len {
            return Err(bad(format!(
                "decompressed to {n} bytes, declared {raw_len}"
            )));
        }
        Ok(&self.out[..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pages_payload(pages: usize, fill: impl Fn(usize) -> u8) -> Vec<u8> {
        let mut p = (pages as u32).to_le_bytes().to_vec();
        for i in 0..pages {
            p.extend_from_slice(&(i as u64).to_le_bytes());
            p.extend((0..PAGE_SIZE).map(|b| fill(i * PAGE_SIZE + b)));
        }
        p
    }

    /// Bytes no compressor can shrink (splitmix64, as the guest's default content).
    fn random_bytes(i: usize) -> u8 {
        let mut z = (i as u64 / 8).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> ((i % 8) * 8)) as u8
    }

    #[test]
    fn compressible_batch_round_trips_compressed() {
        let plain = pages_payload(256, |i| (i / 64) as u8);
        let mut enc = BatchEncoder::new(Compression::On, 0.0);
        let z = match enc.encode(&plain) {
            Encoded::Compressed(z) => z.to_vec(),
            Encoded::Plain(_) => panic!("a compressible batch went plain"),
        };
        assert!(z.len() < plain.len() / 10, "{} bytes", z.len());
        assert_eq!(BatchDecoder::default().decode(&z).unwrap(), &plain[..]);
    }

    #[test]
    fn incompressible_batch_falls_back_to_plain_pages() {
        let plain = pages_payload(256, random_bytes);
        for mode in [Compression::On, Compression::Auto] {
            let mut enc = BatchEncoder::new(mode, 0.0);
            assert!(
                matches!(enc.encode(&plain), Encoded::Plain(p) if p == &plain[..]),
                "{mode}"
            );
            let ratio = enc.estimate.ratio.unwrap();
            assert!(ratio > 0.99, "{mode}: ratio {ratio}");
            // Further batches go plain without compressing until the next probe.
            enc.estimate
                .record_write(plain.len(), Duration::from_millis(1), false);
            assert!(!enc.estimate.compress_next(mode), "{mode}");
        }
    }

    #[test]
    fn plain_streams_reprobe_compression() {
        let mut est = CostEstimate::default();
        assert!(est.compress_next(Compression::Auto), "first batch probes");
        est.record_compression(1000, 1000, Duration::from_micros(10));
        for _ in 0..PROBE_EVERY - 1 {
            est.record_write(1000, Duration::from_micros(10), false);
            assert!(!est.compress_next(Compression::Auto));
        }
        est.record_write(1000, Duration::from_micros(10), false);
        assert!(est.compress_next(Compression::Auto), "probe after a streak");
        assert!(!est.compress_next(Compression::Off));
    }

    fn estimate(ratio: f64, compress_mb_s: f64, link_mb_s: f64) -> CostEstimate {
        CostEstimate {
            ratio: Some(ratio),
            compress: 1.0 / (compress_mb_s * 1e6),
            write: Some(1.0 / (link_mb_s * 1e6)),
            write_floor: 0.0,
            plain_streak: 0,
        }
    }

    #[test]
    fn auto_compresses_only_when_it_pays() {
        // Gigabit link, compressible data, zstd at 400 MB/s: 3x faster compressed.
        assert!(compression_pays(
            Compression::Auto,
            &estimate(0.27, 400.0, 60.0)
        ));
        // Loopback at 2 GB/s per stream: compressing costs more than the wire saves.
        assert!(!compression_pays(
            Compression::Auto,
            &estimate(0.27, 400.0, 2000.0)
        ));
        // Incompressible data never pays, on any link; `on` also sends it plain.
        for mode in [Compression::Auto, Compression::On] {
            assert!(!compression_pays(mode, &estimate(1.0, 400.0, 10.0)));
        }
        // `on` compresses what shrinks even where it is slower.
        assert!(compression_pays(
            Compression::On,
            &estimate(0.27, 400.0, 2000.0)
        ));
        // No link measurement yet: auto stays plain, unless a cap says the link is slow.
        let mut e = estimate(0.27, 400.0, 60.0);
        e.write = None;
        assert!(!compression_pays(Compression::Auto, &e));
        e.write_floor = 1.0 / 60e6;
        assert!(compression_pays(Compression::Auto, &e));
        // A write that fit in the cap's burst does not make the link look fast.
        e.write = Some(1e-12);
        assert!(compression_pays(Compression::Auto, &e));
    }

    #[test]
    fn hostile_compressed_batches_are_refused() {
        let mut dec = BatchDecoder::default();
        for (payload, needle) in [
            (vec![], "shorter"),
            (vec![1, 2], "shorter"),
            (u32::MAX.to_le_bytes().to_vec(), "more than a page batch"),
            ([&100u32.to_le_bytes()[..], b"not zstd"].concat(), "zstd"),
        ] {
            let err = dec.decode(&payload).unwrap_err().to_string();
            assert!(err.contains(needle), "{payload:?}: {err}");
        }
        // A valid frame whose declared size is a lie, either way.
        let plain = pages_payload(4, |i| i as u8);
        let z = zstd::bulk::compress(&plain, 1).unwrap();
        for declared in [plain.len() - 1, plain.len() + 1] {
            let payload = [&(declared as u32).to_le_bytes()[..], &z].concat();
            assert!(dec.decode(&payload).is_err(), "declared {declared}");
        }
        // A bomb: decompresses past a page batch.
        let huge = vec![0u8; MAX_RAW_BATCH + 4096];
        let z = zstd::bulk::compress(&huge, 1).unwrap();
        let payload = [&(MAX_RAW_BATCH as u32).to_le_bytes()[..], &z].concat();
        assert!(dec.decode(&payload).is_err());
    }

    #[test]
    fn every_bit_flip_of_a_compressed_batch_is_an_error_or_a_bounded_batch() {
        let plain = pages_payload(2, |i| (i % 7) as u8);
        let mut enc = BatchEncoder::new(Compression::On, 0.0);
        let Encoded::Compressed(z) = enc.encode(&plain) else {
            panic!("expected a compressed batch");
        };
        let z = z.to_vec();
        let mut dec = BatchDecoder::default();
        for bit in 0..z.len() * 8 {
            let mut b = z.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            // zstd's own checksum is off, so a flip may decode; it can never exceed a
            // batch, and the frame CRC around it catches it on the wire.
            if let Ok(out) = dec.decode(&b) {
                assert!(out.len() <= MAX_RAW_BATCH);
            }
        }
    }

    proptest! {
        #[test]
        fn decoder_survives_arbitrary_payloads(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut dec = BatchDecoder::default();
            if let Ok(out) = dec.decode(&bytes) {
                prop_assert!(out.len() <= MAX_RAW_BATCH);
            }
        }

        #[test]
        fn encoder_output_always_decodes_to_its_input(pages in 1usize..8, period in 1usize..5000) {
            let plain = pages_payload(pages, |i| (i % period) as u8);
            let mut enc = BatchEncoder::new(Compression::On, 0.0);
            match enc.encode(&plain) {
                Encoded::Compressed(z) => {
                    let z = z.to_vec();
                    let mut dec = BatchDecoder::default();
                    prop_assert_eq!(dec.decode(&z).unwrap(), &plain[..]);
                }
                Encoded::Plain(p) => prop_assert_eq!(p, &plain[..]),
            }
        }
    }
}
