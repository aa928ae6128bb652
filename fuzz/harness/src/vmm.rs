//! The per-VM VMM's control protocol (hypervisor/src/vmm/protocol.rs): length-prefixed JSON
//! frames carrying requests (to the VMM) and replies (to its client).
use crate::{refuse, Outcome};
use tern_hypervisor::vmm::protocol::{decode_reply, decode_request, encode_request, read_frame};

/// A byte stream as the VMM's socket or its client reads it: frames until a clean end. Each
/// body is decoded as a request (what the VMM does) and as a reply (what the client does);
/// it is accepted when either decoder takes it. An accepted request must survive its own
/// encoding.
pub fn protocol(data: &[u8]) -> Outcome {
    let mut cursor = data;
    while let Some(body) = read_frame(&mut cursor).map_err(refuse)? {
        let request = decode_request(&body);
        let reply = decode_reply(&body);
        if let Ok(req) = &request {
            let again = decode_request(&encode_request(req));
            assert_eq!(
                again.as_ref().ok(),
                Some(req),
                "a decoded {} request changed on re-encoding",
                req.name()
            );
        }
        match (request, reply) {
            (Ok(_), _) | (_, Ok(_)) => {}
            (Err(e), Err(_)) => return Err(refuse(e)),
        }
    }
    Ok(())
}
