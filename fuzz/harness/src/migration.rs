//! The live-migration wire: frames, typed messages, compressed page batches and the
//! destination's handshake (hypervisor/src/migration).
use crate::{refuse, Outcome};
use tern_hypervisor::migration::compress::BatchDecoder;
use tern_hypervisor::migration::dest::check_hello;
use tern_hypervisor::migration::frame::read_frame;
use tern_hypervisor::migration::messages::{Hello, Message, VmSpec};
use tern_hypervisor::migration::ReceiveConfig;
use tern_hypervisor::vmm::WireSpec;

/// The kind byte `Message::encode` gives `msg`.
fn kind_of(msg: &Message) -> u8 {
    msg.encode().0
}

fn pages_kind() -> u8 {
    kind_of(&Message::Pages(Vec::new()))
}

/// A decoded message must survive its own encoding: encode, decode, get it back.
fn check_round_trip(msg: &Message) {
    let (kind, payload) = msg.encode();
    match Message::decode(kind, &payload) {
        Ok(back) => assert_eq!(
            &back,
            msg,
            "a decoded {} changed on re-encoding",
            msg.name()
        ),
        Err(e) => panic!(
            "a decoded {} does not decode after re-encoding: {e}",
            msg.name()
        ),
    }
}

/// A `ZPages` payload: decompress with the receiver's decoder, then decode the page batch.
fn decode_zpages(payload: &[u8]) -> Outcome {
    let mut decoder = BatchDecoder::default();
    let plain = decoder.decode(payload).map_err(refuse)?;
    let msg = Message::decode(pages_kind(), plain).map_err(refuse)?;
    check_round_trip(&msg);
    Ok(())
}

/// A byte stream as a migration peer sends it: frames until a clean end, each decoded as a
/// message (compressed batches decompressed as the receiver does).
pub fn frame_stream(data: &[u8]) -> Outcome {
    let mut cursor = data;
    let zpages = kind_of(&Message::ZPages {
        raw_len: 0,
        data: Vec::new(),
    });
    while let Some(frame) = read_frame(&mut cursor).map_err(refuse)? {
        if frame.kind == zpages {
            decode_zpages(&frame.payload)?;
            continue;
        }
        let msg = Message::decode(frame.kind, &frame.payload).map_err(refuse)?;
        check_round_trip(&msg);
    }
    Ok(())
}

/// One message payload behind the frame layer: the first byte is the kind.
pub fn message(data: &[u8]) -> Outcome {
    let (&kind, payload) = data.split_first().ok_or("empty input")?;
    let msg = Message::decode(kind, payload).map_err(refuse)?;
    check_round_trip(&msg);
    if let Message::ZPages { raw_len, data } = &msg {
        let mut whole = raw_len.to_le_bytes().to_vec();
        whole.extend_from_slice(data);
        decode_zpages(&whole)?;
    }
    Ok(())
}

/// A `ZPages` payload (length, zstd frame) as a data stream receives it.
pub fn zpages(data: &[u8]) -> Outcome {
    decode_zpages(data)
}

/// The token the fuzzed destination expects (seeds carry it).
pub const TOKEN: &str = "fuzz-token";

/// The destination's configuration for handshake fuzzing: a token and a CPU with a few
/// feature words.
pub fn receive_config() -> ReceiveConfig {
    ReceiveConfig {
        token: TOKEN.into(),
        cpu_features: vec![u32::MAX, 0x0fff_ffff, 0],
        ..Default::default()
    }
}

/// The first frame on a control stream: `Hello` decoded, checked as the destination checks it,
/// and its VM config decoded as the receiving VMM decodes it. The first byte picks `Hello` (even) or
/// a data stream's `Join` (odd).
pub fn handshake(data: &[u8]) -> Outcome {
    let (&pick, payload) = data.split_first().ok_or("empty input")?;
    let template = Hello {
        version: 0,
        token: String::new(),
        streams: 0,
        spec: VmSpec {
            memory_bytes: 0,
            vcpus: 0,
            page_size: 0,
            config: String::new(),
        },
        cpu_features: Vec::new(),
        features: 0,
    };
    if pick % 2 == 1 {
        let join = kind_of(&Message::Join {
            session: 0,
            stream: 0,
            token: String::new(),
        });
        let msg = Message::decode(join, payload).map_err(refuse)?;
        check_round_trip(&msg);
        return Ok(());
    }
    let msg = Message::decode(kind_of(&Message::Hello(template)), payload).map_err(refuse)?;
    check_round_trip(&msg);
    let Message::Hello(hello) = msg else {
        panic!("a Hello payload decoded as {}", msg.name());
    };
    check_hello(&receive_config(), &hello)?;
    let wire: WireSpec = serde_json::from_str(&hello.spec.config).map_err(refuse)?;
    wire.vm
        .workload
        .parse::<tern_hypervisor::Workload>()
        .map_err(refuse)?;
    Ok(())
}
