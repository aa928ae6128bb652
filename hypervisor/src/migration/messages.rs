//! Typed protocol messages and their payload encodings (on top of [`super::frame`]).
use std::io::{Read, Write};

use super::frame::{read_frame, write_frame};
use super::MigrationError;

/// Newest protocol version spoken by this build. Version 2 adds the feature words of Hello
/// and Welcome (compressed page batches); a destination accepts versions
/// [`MIN_PROTOCOL_VERSION`]..=this, and a version-1 source gets a version-1 session.
pub const PROTOCOL_VERSION: u32 = 2;
/// Oldest protocol version this build still accepts (and falls back to as a source).
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// Guest page size moved by the protocol.
pub const PAGE_SIZE: usize = 4096;
/// Most pages in one `Pages` frame (1 MiB of data): large writes keep the link busy.
pub const MAX_PAGES_PER_FRAME: usize = 256;
/// Bound on strings and opaque blobs inside messages.
const MAX_BLOB: usize = 1024 * 1024;

/// What the source tells the destination about the VM before anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    /// Authentication token (empty when the destination requires none).
    pub token: String,
    /// Number of data streams the source will open after this control stream.
    pub streams: u16,
    pub spec: VmSpec,
    /// CPU feature words the guest saw (bit masks); the destination must offer all of them.
    pub cpu_features: Vec<u32>,
    /// Protocol features the source can use (`compress::FEATURE_*`); version 2 and later.
    pub features: u32,
}

/// The VM shape a destination must reproduce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub page_size: u32,
    /// Opaque description the destination's VM factory understands (e.g. the workload string).
    pub config: String,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Source -> destination, first frame on the control stream.
    Hello(Hello),
    /// Source -> destination, first frame on each data stream.
    Join {
        session: u64,
        stream: u16,
        token: String,
    },
    /// Destination accepts the control stream, with the protocol features it accepts of
    /// those the source offered (encoded only when non-zero, so version 1 sources decode it).
    Welcome { session: u64, features: u32 },
    /// Destination refuses (version, token, CPU, busy, spec); the reason is for humans.
    Refuse { reason: String },
    /// Page contents: (page frame number, data), data is `PAGE_SIZE` bytes each.
    Pages(Vec<(u64, Vec<u8>)>),
    /// Runs of pages that are all zeroes: (first pfn, count).
    Zeros(Vec<(u64, u32)>),
    /// A `Pages` payload compressed with zstd: its length, then the zstd frame. Sent only
    /// when the Welcome accepted `FEATURE_ZSTD_PAGES`; decoded by `compress::BatchDecoder`.
    ZPages { raw_len: u32, data: Vec<u8> },
    /// Data stream marker: every page sent before it on this stream belongs to `epoch`.
    Flush { epoch: u64 },
    /// vCPU and device state, sent while the source is paused.
    DeviceState(Vec<u8>),
    /// Source: everything up to `epoch` is sent; acknowledge when it is all applied.
    Complete { epoch: u64, want_hash: bool },
    /// Destination holds a complete image; `hash` of guest memory if asked for (else 0).
    ImageReady { hash: u64 },
    /// Source: the switchover gate passed, run the VM.
    Resume,
    /// Destination: the VM runs.
    Resumed,
    /// Either side gives up; the VM stays (or goes back) on the source.
    Abort { reason: String },
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const JOIN: u8 = 2;
    pub const WELCOME: u8 = 3;
    pub const REFUSE: u8 = 4;
    pub const PAGES: u8 = 5;
    pub const ZEROS: u8 = 6;
    pub const FLUSH: u8 = 7;
    pub const DEVICE_STATE: u8 = 8;
    pub const COMPLETE: u8 = 9;
    pub const IMAGE_READY: u8 = 10;
    pub const RESUME: u8 = 11;
    pub const RESUMED: u8 = 12;
    pub const ABORT: u8 = 13;
    pub const ZPAGES: u8 = 14;
}

impl Message {
    /// Short name for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Join { .. } => "Join",
            Message::Welcome { .. } => "Welcome",
            Message::Refuse { .. } => "Refuse",
            Message::Pages(_) => "Pages",
            Message::Zeros(_) => "Zeros",
            Message::ZPages { .. } => "ZPages",
            Message::Flush { .. } => "Flush",
            Message::DeviceState(_) => "DeviceState",
            Message::Complete { .. } => "Complete",
            Message::ImageReady { .. } => "ImageReady",
            Message::Resume => "Resume",
            Message::Resumed => "Resumed",
            Message::Abort { .. } => "Abort",
        }
    }

    /// Encode into (kind, payload).
    pub fn encode(&self) -> (u8, Vec<u8>) {
        let mut e = Enc(Vec::new());
        let k = match self {
            Message::Hello(h) => {
                e.u32(h.version);
                e.str(&h.token);
                e.u16(h.streams);
                e.u64(h.spec.memory_bytes);
                e.u32(h.spec.vcpus);
                e.u32(h.spec.page_size);
                e.str(&h.spec.config);
                e.u32(h.cpu_features.len() as u32);
                h.cpu_features.iter().for_each(|w| e.u32(*w));
                if h.version >= 2 {
                    e.u32(h.features);
                }
                kind::HELLO
            }
            Message::Join {
                session,
                stream,
                token,
            } => {
                e.u64(*session);
                e.u16(*stream);
                e.str(token);
                kind::JOIN
            }
            Message::Welcome { session, features } => {
                e.u64(*session);
                if *features != 0 {
                    e.u32(*features);
                }
                kind::WELCOME
            }
            Message::Refuse { reason } => {
                e.str(reason);
                kind::REFUSE
            }
            Message::Pages(pages) => {
                e.u32(pages.len() as u32);
                for (pfn, data) in pages {
                    e.u64(*pfn);
                    e.0.extend_from_slice(data);
                }
                kind::PAGES
            }
            Message::Zeros(runs) => {
                e.u32(runs.len() as u32);
                for (pfn, n) in runs {
                    e.u64(*pfn);
                    e.u32(*n);
                }
                kind::ZEROS
            }
            Message::ZPages { raw_len, data } => {
                e.u32(*raw_len);
                e.0.extend_from_slice(data);
                kind::ZPAGES
            }
            Message::Flush { epoch } => {
                e.u64(*epoch);
                kind::FLUSH
            }
            Message::DeviceState(b) => {
                e.bytes(b);
                kind::DEVICE_STATE
            }
            Message::Complete { epoch, want_hash } => {
                e.u64(*epoch);
                e.0.push(u8::from(*want_hash));
                kind::COMPLETE
            }
            Message::ImageReady { hash } => {
                e.u64(*hash);
                kind::IMAGE_READY
            }
            Message::Resume => kind::RESUME,
            Message::Resumed => kind::RESUMED,
            Message::Abort { reason } => {
                e.str(reason);
                kind::ABORT
            }
        };
        (k, e.0)
    }

    /// Decode a payload of the given kind; every length is checked before use.
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Message, MigrationError> {
        let mut d = Dec(payload);
        let msg = match kind {
            kind::HELLO => {
                let version = d.u32()?;
                let token = d.str()?;
                let streams = d.u16()?;
                let spec = VmSpec {
                    memory_bytes: d.u64()?,
                    vcpus: d.u32()?,
                    page_size: d.u32()?,
                    config: d.str()?,
                };
                let n = d.u32()? as usize;
                if n > d.0.len() / 4 {
                    return Err(bad("CPU feature list longer than its frame"));
                }
                let cpu_features = (0..n).map(|_| d.u32()).collect::<Result<_, _>>()?;
                let features = if version >= 2 { d.u32()? } else { 0 };
                Message::Hello(Hello {
                    version,
                    token,
                    streams,
                    spec,
                    cpu_features,
                    features,
                })
            }
            kind::JOIN => Message::Join {
                session: d.u64()?,
                stream: d.u16()?,
                token: d.str()?,
            },
            kind::WELCOME => Message::Welcome {
                session: d.u64()?,
                features: if d.0.is_empty() { 0 } else { d.u32()? },
            },
            kind::REFUSE => Message::Refuse { reason: d.str()? },
            kind::PAGES => {
                let n = d.u32()? as usize;
                if n > MAX_PAGES_PER_FRAME || n * (8 + PAGE_SIZE) != d.0.len() {
                    return Err(bad("page batch count does not match its frame"));
                }
                let mut pages = Vec::with_capacity(n);
                for _ in 0..n {
                    let pfn = d.u64()?;
                    pages.push((pfn, d.take(PAGE_SIZE)?.to_vec()));
                }
                Message::Pages(pages)
            }
            kind::ZEROS => {
                let n = d.u32()? as usize;
                if n * 12 != d.0.len() {
                    return Err(bad("zero-run count does not match its frame"));
                }
                let runs = (0..n)
                    .map(|_| Ok::<_, MigrationError>((d.u64()?, d.u32()?)))
                    .collect::<Result<_, _>>()?;
                Message::Zeros(runs)
            }
            kind::ZPAGES => {
                let raw_len = d.u32()?;
                if raw_len as usize > super::compress::MAX_RAW_BATCH {
                    return Err(bad("compressed batch declares more than a page batch"));
                }
                let data = d.take(d.0.len())?.to_vec();
                Message::ZPages { raw_len, data }
            }
            kind::FLUSH => Message::Flush { epoch: d.u64()? },
            kind::DEVICE_STATE => Message::DeviceState(d.bytes()?.to_vec()),
            kind::COMPLETE => {
                let epoch = d.u64()?;
                let want_hash = match d.take(1)?[0] {
                    0 => false,
                    1 => true,
                    _ => return Err(bad("Complete.want_hash is not a boolean")),
                };
                Message::Complete { epoch, want_hash }
            }
            kind::IMAGE_READY => Message::ImageReady { hash: d.u64()? },
            kind::RESUME => Message::Resume,
            kind::RESUMED => Message::Resumed,
            kind::ABORT => Message::Abort { reason: d.str()? },
            other => return Err(bad(&format!("unknown message kind {other}"))),
        };
        if !d.0.is_empty() {
            return Err(bad(&format!(
                "{} trailing bytes after {}",
                d.0.len(),
                msg.name()
            )));
        }
        Ok(msg)
    }
}

fn bad(what: &str) -> MigrationError {
    MigrationError::Protocol(what.to_string())
}

/// Send one message as a frame.
pub fn send<W: Write>(w: &mut W, msg: &Message) -> Result<(), MigrationError> {
    let (k, payload) = msg.encode();
    write_frame(w, k, &payload)
}

/// Receive one message; a clean end of stream is an error here (the peer went away).
pub fn recv<R: Read>(r: &mut R) -> Result<Message, MigrationError> {
    match read_frame(r)? {
        Some(f) => Message::decode(f.kind, &f.payload),
        None => Err(MigrationError::PeerClosed),
    }
}

/// Receive one message of at most `max` payload bytes (refused from its header when larger).
pub fn recv_limited<R: Read>(r: &mut R, max: usize) -> Result<Message, MigrationError> {
    let mut payload = Vec::new();
    match super::frame::read_frame_limited(r, &mut payload, max)? {
        Some(kind) => Message::decode(kind, &payload),
        None => Err(MigrationError::PeerClosed),
    }
}

/// Receive, or `None` on a clean end of stream.
pub fn recv_opt<R: Read>(r: &mut R) -> Result<Option<Message>, MigrationError> {
    read_frame(r)?
        .map(|f| Message::decode(f.kind, &f.payload))
        .transpose()
}

struct Enc(Vec<u8>);
impl Enc {
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
}

struct Dec<'a>(&'a [u8]);
impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MigrationError> {
        if n > self.0.len() {
            return Err(bad("message shorter than its fields"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, MigrationError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, MigrationError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, MigrationError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], MigrationError> {
        let n = self.u32()? as usize;
        if n > MAX_BLOB {
            return Err(bad("blob longer than the limit"));
        }
        self.take(n)
    }
    fn str(&mut self) -> Result<String, MigrationError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| bad("string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                token: "tok".into(),
                streams: 4,
                spec: VmSpec {
                    memory_bytes: 1 << 30,
                    vcpus: 2,
                    page_size: 4096,
                    config: "wss=64M".into(),
                },
                cpu_features: vec![1, 2, 0xffff_ffff],
                features: 1,
            }),
            Message::Hello(Hello {
                version: 1,
                token: "old".into(),
                streams: 1,
                spec: VmSpec {
                    memory_bytes: 1 << 20,
                    vcpus: 1,
                    page_size: 4096,
                    config: String::new(),
                },
                cpu_features: vec![],
                features: 0,
            }),
            Message::Join {
                session: 9,
                stream: 3,
                token: String::new(),
            },
            Message::Welcome {
                session: 9,
                features: 0,
            },
            Message::Welcome {
                session: 9,
                features: 1,
            },
            Message::ZPages {
                raw_len: 4 + 8 + 4096,
                data: vec![0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3],
            },
            Message::Refuse {
                reason: "busy".into(),
            },
            Message::Pages(vec![(5, vec![7u8; PAGE_SIZE]), (6, vec![0u8; PAGE_SIZE])]),
            Message::Zeros(vec![(1, 10), (100, 1)]),
            Message::Flush { epoch: 3 },
            Message::DeviceState(vec![1, 2, 3]),
            Message::Complete {
                epoch: 3,
                want_hash: true,
            },
            Message::ImageReady { hash: 42 },
            Message::Resume,
            Message::Resumed,
            Message::Abort {
                reason: "cancelled".into(),
            },
        ]
    }

    #[test]
    fn version_1_hello_and_welcome_keep_their_old_encoding() {
        // Bytes a version-1 peer sends and expects: no feature words.
        let old = &samples()[1];
        let (_, payload) = old.encode();
        // version, token "old", streams, memory, vCPUs, page size, empty config, no CPU words.
        assert_eq!(payload.len(), 4 + (4 + 3) + 2 + 8 + 4 + 4 + 4 + 4);
        let (_, welcome) = Message::Welcome {
            session: 1,
            features: 0,
        }
        .encode();
        assert_eq!(welcome.len(), 8);
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let mut buf = Vec::new();
            send(&mut buf, &m).unwrap();
            assert_eq!(recv(&mut buf.as_slice()).unwrap(), m);
        }
    }

    proptest! {
        /// The decoder never panics on arbitrary frames, and returns an error or a message.
        #[test]
        fn decoder_survives_arbitrary_payloads(kind in 0u8..20, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Message::decode(kind, &payload);
        }

        /// Arbitrary byte streams through the full frame + message path never panic.
        #[test]
        fn stream_decoder_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut r = bytes.as_slice();
            for _ in 0..4 {
                if !matches!(recv_opt(&mut r), Ok(Some(_))) { break; }
            }
        }

        /// Valid messages mutated anywhere after encoding are rejected or decode to something, never panic,
        /// and a single byte change is always caught by the checksum.
        #[test]
        fn mutated_frames_are_rejected(idx in 0usize..16, pos in any::<prop::sample::Index>(), xor in 1u8..=255) {
            let m = samples().swap_remove(idx);
            let mut buf = Vec::new();
            send(&mut buf, &m).unwrap();
            let p = pos.index(buf.len());
            buf[p] ^= xor;
            prop_assert!(recv(&mut buf.as_slice()).is_err());
        }

        #[test]
        fn pages_round_trip(pfns in proptest::collection::vec(any::<u64>(), 0..8), fill in any::<u8>()) {
            let m = Message::Pages(pfns.into_iter().map(|p| (p, vec![fill; PAGE_SIZE])).collect());
            let mut buf = Vec::new();
            send(&mut buf, &m).unwrap();
            prop_assert_eq!(recv(&mut buf.as_slice()).unwrap(), m);
        }
    }
}
