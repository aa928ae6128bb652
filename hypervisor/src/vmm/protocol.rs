//! The VMM control protocol: one request or reply per frame on a unix socket.
//!
//! A frame is a big-endian `u32` length followed by that many bytes of JSON. The length is
//! checked against [`MAX_FRAME`] before anything is allocated. Every frame carries `version`
//! ([`CONTROL_VERSION`]); a frame of another version, or one that does not parse, is answered
//! with an error reply and changes nothing.
use std::io::{self, Read, Write};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::status::GuestStatus;

/// Version of the control protocol spoken here.
pub const CONTROL_VERSION: u32 = 1;
/// Largest frame either side accepts (requests and replies are small).
pub const MAX_FRAME: usize = 64 * 1024;
/// Longest a `WaitGate` long-poll may block.
pub const MAX_WAIT_MS: u64 = 60_000;

/// What a VM is: enough to boot it, or to check that an incoming stream carries it. Field
/// names match the datastore's VM config so the two serialize alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub workload: String,
    /// Raw disk image attached as virtio-blk (the VM's `disk.img` on the shared datastore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<std::path::PathBuf>,
}

/// Tuning of an outbound migration (everything else is the migration module's default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Tuning {
    /// Pause target at the switchover in milliseconds (0 = default).
    pub downtime_ms: u64,
    /// Bandwidth cap in bytes/s (0 = none).
    pub bandwidth: u64,
    /// Parallel data streams (0 = default).
    pub streams: u16,
    /// Per-step I/O timeout in milliseconds (0 = default).
    pub io_timeout_ms: u64,
}

/// The supervisor's answer at the switchover gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum GateDecision {
    /// Ownership moved to the destination: tell it to resume.
    Committed,
    /// Ownership did not move: resume here, under `epoch` if the supervisor fenced the VM to a
    /// newer one.
    Refused {
        reason: String,
        #[serde(default)]
        epoch: Option<u64>,
    },
    /// Not known yet: stay paused and wait for a later decision.
    Unknown,
}

/// A request from a client (the node, an operator tool, a test).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Pause,
    Resume,
    /// Shut the VM down and end the VMM process.
    Stop,
    /// Live-migrate the running VM to the receiving VMM at `dest`.
    MigrateOut {
        dest: SocketAddr,
        token: String,
        #[serde(default)]
        tuning: Tuning,
    },
    /// (VMM started in receive mode) wait on `listen` for one migration of `expected`, under
    /// `epoch`; answered with the bound address.
    Receive {
        listen: SocketAddr,
        token: String,
        expected: Box<VmSpec>,
        epoch: u64,
        #[serde(default)]
        accept_timeout_ms: Option<u64>,
    },
    /// Cancel the outbound migration (refused once the switchover gate is waiting).
    Cancel,
    Progress,
    /// Long-poll: answer once the switchover gate waits for a decision, the migration has
    /// ended, or `timeout_ms` passed.
    WaitGate {
        timeout_ms: u64,
    },
    /// Answer the switchover gate.
    Gate {
        decision: GateDecision,
    },
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Stop => "stop",
            Request::MigrateOut { .. } => "migrate_out",
            Request::Receive { .. } => "receive",
            Request::Cancel => "cancel",
            Request::Progress => "progress",
            Request::WaitGate { .. } => "wait_gate",
            Request::Gate { .. } => "gate",
        }
    }
}

/// Where the VMM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmmState {
    /// Receive mode: no VM yet (waiting for a `Receive` request or a stream).
    Receiving,
    Running,
    Paused,
    /// Running, with an outbound migration in progress.
    Migrating,
    /// Paused at the switchover, waiting for the gate's decision.
    AtGate,
    /// The VM now runs elsewhere; this process holds no VM.
    MigratedAway,
    /// Paused for good: ownership may have moved, so this copy never runs again.
    Handover,
    /// No VM: stopped, or failed (see `error`).
    Stopped,
    Failed,
}

/// Load figures sampled once a second (for the node's load reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// vCPU-thread CPU time over the last second, percent of one host CPU (summed over vCPUs).
    pub cpu_percent: f64,
    /// Guest pages written per second over the last second, in bytes/s.
    pub dirty_bytes_per_s: f64,
    /// Guest memory ever touched, bytes.
    pub touched_bytes: u64,
    /// Total vCPU-thread CPU time, nanoseconds (read live at each `status`).
    pub vcpu_cpu_ns: u64,
}

/// Answer to `Status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmmStatus {
    pub name: String,
    pub pid: u32,
    pub state: VmmState,
    pub epoch: u64,
    pub owner: u64,
    pub spec: Option<VmSpec>,
    pub guest: Option<GuestStatus>,
    pub load: Load,
    /// Why the VM failed, or the last refused operation's reason.
    pub error: Option<String>,
}

/// Progress and outcome of the current (or last) migration, either direction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationView {
    /// `handshake`, `first_pass`, `dirty_rounds`, `stop_and_copy`, `switchover`, `done`, or
    /// `receiving` on a destination; empty when no migration ever ran.
    pub phase: String,
    pub round: u32,
    pub bytes_sent: u64,
    pub bytes_remaining: u64,
    /// The switchover gate waits for a decision.
    pub gate_pending: bool,
    /// The migration has ended (see `error` / `stats`).
    pub finished: bool,
    pub error: Option<String>,
    pub stats: Option<MigrationSummary>,
}

/// Figures of a finished migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationSummary {
    pub downtime_us: u64,
    pub total_ms: u64,
    pub bytes: u64,
    pub rounds: u32,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    Done,
    Status(Box<VmmStatus>),
    Migration(MigrationView),
    Listening { addr: SocketAddr },
}

#[derive(Serialize, Deserialize)]
struct RequestFrame {
    version: u32,
    request: Request,
}

/// What travels back: `{"version":1,"ok":{...}}` or `{"version":1,"error":"..."}`.
#[derive(Debug, Serialize, Deserialize)]
struct ReplyFrame {
    version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ok: Option<Response>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Why a frame could not be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The peer announced more than [`MAX_FRAME`] bytes; the stream cannot be resynchronized.
    #[error("frame of {0} bytes exceeds the {MAX_FRAME} byte limit")]
    TooLarge(u64),
    #[error("control protocol version {0} is not supported (this VMM speaks {CONTROL_VERSION})")]
    Version(u64),
    #[error("malformed message: {0}")]
    Malformed(String),
}

impl FrameError {
    /// Whether the connection can carry on after answering this error.
    pub fn recoverable(&self) -> bool {
        matches!(self, FrameError::Version(_) | FrameError::Malformed(_))
    }
}

/// Read one frame's body; `Ok(None)` on a clean end of stream before the length.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(len) as u64;
    if len > MAX_FRAME as u64 {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

/// Write one frame.
pub fn write_frame<W: Write>(w: &mut W, body: &[u8]) -> Result<(), FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len() as u64));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    w.write_all(&out)?;
    w.flush()?;
    Ok(())
}

/// Check the version field first, so that a newer client gets "unsupported version" rather
/// than a parse error about fields it added.
fn check_version(body: &[u8]) -> Result<(), FrameError> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u64,
    }
    let v: Versioned =
        serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if v.version != CONTROL_VERSION as u64 {
        return Err(FrameError::Version(v.version));
    }
    Ok(())
}

pub fn encode_request(req: &Request) -> Vec<u8> {
    let frame = RequestFrame {
        version: CONTROL_VERSION,
        request: req.clone(),
    };
    serde_json::to_vec(&frame).unwrap_or_default()
}

/// Decode and validate a request body.
pub fn decode_request(body: &[u8]) -> Result<Request, FrameError> {
    check_version(body)?;
    let frame: RequestFrame =
        serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    validate(&frame.request)?;
    Ok(frame.request)
}

fn validate(req: &Request) -> Result<(), FrameError> {
    let bad = |m: String| Err(FrameError::Malformed(m));
    match req {
        Request::WaitGate { timeout_ms } if *timeout_ms > MAX_WAIT_MS => bad(format!(
            "wait_gate timeout {timeout_ms} ms exceeds {MAX_WAIT_MS} ms"
        )),
        Request::MigrateOut { tuning, .. } if tuning.streams > 64 => bad(format!(
            "{} streams requested (1..=64 allowed)",
            tuning.streams
        )),
        Request::Receive { expected, .. } => validate_spec(expected),
        _ => Ok(()),
    }
}

/// A VM name is 1-64 of `[A-Za-z0-9._-]`, not starting with a dot (it names directories).
pub fn validate_name(name: &str) -> Result<(), FrameError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(FrameError::Malformed(format!(
            "vm name {name:?} must be 1-64 of [A-Za-z0-9._-], not starting with a dot"
        )));
    }
    Ok(())
}

/// A spec names a VM with a sane name and size (the VM itself checks the rest).
pub fn validate_spec(spec: &VmSpec) -> Result<(), FrameError> {
    validate_name(&spec.name)?;
    if spec.memory_mib == 0 || spec.memory_mib > 1 << 20 || spec.vcpus == 0 || spec.vcpus > 256 {
        return Err(FrameError::Malformed(format!(
            "{} MiB and {} vCPUs is not a VM this VMM can run",
            spec.memory_mib, spec.vcpus
        )));
    }
    Ok(())
}

pub fn encode_reply(reply: &Result<Response, String>) -> Vec<u8> {
    let frame = match reply {
        Ok(r) => ReplyFrame {
            version: CONTROL_VERSION,
            ok: Some(r.clone()),
            error: None,
        },
        Err(e) => ReplyFrame {
            version: CONTROL_VERSION,
            ok: None,
            error: Some(e.clone()),
        },
    };
    serde_json::to_vec(&frame).unwrap_or_default()
}

/// Decode a reply: `Ok(Ok(response))`, `Ok(Err(message))` for an error reply from the VMM.
pub fn decode_reply(body: &[u8]) -> Result<Result<Response, String>, FrameError> {
    check_version(body)?;
    let frame: ReplyFrame =
        serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    match (frame.ok, frame.error) {
        (Some(r), None) => Ok(Ok(r)),
        (None, Some(e)) => Ok(Err(e)),
        _ => Err(FrameError::Malformed(
            "a reply carries exactly one of ok and error".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: "vm-1".into(),
            memory_mib: 256,
            vcpus: 2,
            workload: "wss=32M".into(),
            disk: None,
        }
    }

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Status,
            Request::Stop,
            Request::MigrateOut {
                dest: "127.0.0.1:4000".parse().unwrap(),
                token: "t".into(),
                tuning: Tuning {
                    streams: 4,
                    ..Default::default()
                },
            },
            Request::Receive {
                listen: "127.0.0.1:0".parse().unwrap(),
                token: "t".into(),
                expected: Box::new(spec()),
                epoch: 3,
                accept_timeout_ms: Some(500),
            },
            Request::Gate {
                decision: GateDecision::Refused {
                    reason: "no".into(),
                    epoch: Some(4),
                },
            },
            Request::WaitGate { timeout_ms: 100 },
        ];
        for r in reqs {
            assert_eq!(decode_request(&encode_request(&r)).unwrap(), r);
        }
    }

    #[test]
    fn replies_round_trip() {
        let ok = Ok(Response::Listening {
            addr: "127.0.0.1:9".parse().unwrap(),
        });
        assert_eq!(decode_reply(&encode_reply(&ok)).unwrap(), ok);
        let err: Result<Response, String> = Err("nope".into());
        assert_eq!(decode_reply(&encode_reply(&err)).unwrap(), err);
        assert!(decode_reply(br#"{"version":1}"#).is_err());
    }

    #[test]
    fn bad_requests_are_named() {
        let e = decode_request(br#"{"version":2,"request":{"op":"status"}}"#).unwrap_err();
        assert!(matches!(e, FrameError::Version(2)), "{e}");
        assert!(e.recoverable());
        let e = decode_request(br#"{"version":1,"request":{"op":"reboot"}}"#).unwrap_err();
        assert!(matches!(e, FrameError::Malformed(_)), "{e}");
        let e =
            decode_request(br#"{"version":1,"request":{"op":"wait_gate","timeout_ms":99999999}}"#)
                .unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
        let mut bad = spec();
        bad.name = "../etc".into();
        let r = Request::Receive {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: String::new(),
            expected: Box::new(bad),
            epoch: 1,
            accept_timeout_ms: None,
        };
        assert!(decode_request(&encode_request(&r)).is_err());
    }

    #[test]
    fn frames_are_length_checked() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"{}").unwrap();
        assert_eq!(read_frame(&mut &buf[..]).unwrap().unwrap(), b"{}");
        assert!(read_frame(&mut &b""[..]).unwrap().is_none());
        let huge = (u32::MAX).to_be_bytes();
        let e = read_frame(&mut &huge[..]).unwrap_err();
        assert!(matches!(e, FrameError::TooLarge(_)) && !e.recoverable());
        let truncated = [0u8, 0, 0, 10, b'{'];
        assert!(matches!(
            read_frame(&mut &truncated[..]).unwrap_err(),
            FrameError::Io(_)
        ));
        assert!(write_frame(&mut Vec::new(), &vec![b' '; MAX_FRAME + 1]).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_request(&bytes);
            let _ = decode_reply(&bytes);
            let _ = read_frame(&mut &bytes[..]);
        }

        #[test]
        fn json_shaped_garbage_is_refused_cleanly(
            version in 0u64..4,
            op in "[a-z_]{0,12}",
            timeout in any::<u64>(),
        ) {
            let body = format!(
                r#"{{"version":{version},"request":{{"op":"{op}","timeout_ms":{timeout}}}}}"#
            );
            if let Ok(r) = decode_request(body.as_bytes()) {
                prop_assert_eq!(version, 1);
                prop_assert!(validate(&r).is_ok());
            }
        }
    }
}
