//! Frame layer: every message on a migration stream is one length-bounded, checksummed frame.
//!
//! Layout (little-endian): magic `u32` | kind `u8` | 3 reserved zero bytes | payload length
//! `u32` | CRC-32 of (kind, length, payload) `u32` | payload. The length is checked against
//! [`MAX_PAYLOAD`] before anything is allocated, so a hostile length cannot exhaust memory.
use std::io::{self, Read, Write};

use super::MigrationError;

/// `TRNM` in little-endian byte order.
pub const MAGIC: u32 = 0x4D4E_5254;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 16;
/// Largest payload a peer may send: a full page batch plus its index, with headroom.
pub const MAX_PAYLOAD: usize = 2 * 1024 * 1024;

/// A decoded frame: its kind byte and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub payload: Vec<u8>,
}

fn checksum(kind: u8, len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Build the 16-byte header for a payload.
pub fn header(kind: u8, payload: &[u8]) -> [u8; HEADER_LEN] {
    let len = payload.len() as u32;
    let mut out = [0u8; HEADER_LEN];
    out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[4] = kind;
    out[8..12].copy_from_slice(&len.to_le_bytes());
    out[12..16].copy_from_slice(&checksum(kind, len, payload).to_le_bytes());
    out
}

/// Write one frame (header and payload) to `w`.
pub fn write_frame<W: Write>(w: &mut W, kind: u8, payload: &[u8]) -> Result<(), MigrationError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(MigrationError::Protocol(format!(
            "refusing to send a {} byte payload (limit {MAX_PAYLOAD})",
            payload.len()
        )));
    }
    w.write_all(&header(kind, payload))?;
    w.write_all(payload)?;
    Ok(())
}

/// Read one frame; `Ok(None)` on a clean end of stream before any header byte.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Frame>, MigrationError> {
    let mut payload = Vec::new();
    Ok(read_frame_into(r, &mut payload)?.map(|kind| Frame { kind, payload }))
}

/// [`read_frame`] into a buffer the caller reuses (no allocation per frame on the hot path);
/// returns the kind, the payload is `buf`.
pub fn read_frame_into<R: Read>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<u8>, MigrationError> {
    read_frame_limited(r, buf, MAX_PAYLOAD)
}

/// [`read_frame_into`] refusing payloads over `max` bytes before allocating for them (the
/// first message of a connection not yet authenticated is small).
pub fn read_frame_limited<R: Read>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<Option<u8>, MigrationError> {
    let mut hdr = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut hdr[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(MigrationError::Protocol(format!(
                    "stream truncated inside a frame header ({got} of {HEADER_LEN} bytes)"
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    decode_header(&hdr).and_then(|(kind, len, crc)| {
        if len > max {
            return Err(MigrationError::Protocol(format!(
                "frame length {len} exceeds the limit of {max} here"
            )));
        }
        buf.resize(len, 0);
        let payload = &mut buf[..];
        r.read_exact(payload).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                MigrationError::Protocol(format!("stream truncated inside a {len} byte payload"))
            } else {
                e.into()
            }
        })?;
        if checksum(kind, len as u32, payload) != crc {
            return Err(MigrationError::Protocol(format!(
                "checksum mismatch on a frame of kind {kind} ({len} bytes)"
            )));
        }
        Ok(Some(kind))
    })
}

fn decode_header(hdr: &[u8; HEADER_LEN]) -> Result<(u8, usize, u32), MigrationError> {
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    if word(0) != MAGIC {
        return Err(MigrationError::Protocol(format!(
            "bad frame magic {:#010x} (not a Tern migration stream?)",
            word(0)
        )));
    }
    if hdr[5..8] != [0, 0, 0] {
        return Err(MigrationError::Protocol(
            "reserved header bytes are not zero".into(),
        ));
    }
    let len = word(8) as usize;
    if len > MAX_PAYLOAD {
        return Err(MigrationError::Protocol(format!(
            "frame length {len} exceeds the limit of {MAX_PAYLOAD}"
        )));
    }
    Ok((hdr[4], len, word(12)))
}

/// Decode a frame from a complete byte buffer (used by fuzzing and tests).
pub fn decode_frame(bytes: &[u8]) -> Result<Option<Frame>, MigrationError> {
    let mut cursor = bytes;
    read_frame(&mut cursor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame(&mut v, kind, payload).unwrap();
        v
    }

    #[test]
    fn round_trip() {
        let bytes = encode(7, b"hello");
        let f = decode_frame(&bytes).unwrap().unwrap();
        assert_eq!(
            f,
            Frame {
                kind: 7,
                payload: b"hello".to_vec()
            }
        );
    }

    #[test]
    fn empty_stream_is_clean_end() {
        assert!(decode_frame(&[]).unwrap().is_none());
    }

    #[test]
    fn truncation_is_an_error() {
        let bytes = encode(3, &[9u8; 100]);
        for cut in 1..bytes.len() {
            let err = decode_frame(&bytes[..cut]).unwrap_err();
            assert!(err.to_string().contains("truncated"), "{cut}: {err}");
        }
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let bytes = encode(3, &[0xA5u8; 64]);
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_frame(&b).is_err(),
                "flip of bit {bit} went unnoticed"
            );
        }
    }

    #[test]
    fn a_frame_over_the_callers_limit_is_refused_from_its_header() {
        let bytes = encode(3, &[1u8; 100]);
        let mut buf = Vec::new();
        // The header alone decides: the payload is never read (nor allocated).
        let err = read_frame_limited(&mut &bytes[..HEADER_LEN], &mut buf, 99).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        assert_eq!(buf.capacity(), 0);
        assert_eq!(
            read_frame_limited(&mut &bytes[..], &mut buf, 100).unwrap(),
            Some(3)
        );
    }

    #[test]
    fn hostile_length_is_refused_before_allocation() {
        let mut hdr = header(1, &[]);
        hdr[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = decode_frame(&hdr).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
    }
}
