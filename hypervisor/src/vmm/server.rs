//! The control socket: accept clients, read one framed request at a time, answer each.
//! A malformed frame gets an error reply (and, when its length cannot be trusted, the
//! connection is closed); the VMM carries on either way.
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::core::Vmm;
use super::protocol::{decode_request, encode_reply, read_frame, write_frame, Request};

/// Clients served at once; more are answered with an error and closed.
const MAX_CLIENTS: usize = 32;
/// A client that stalls in the middle of a frame is dropped after this long.
const FRAME_TIMEOUT: Duration = Duration::from_secs(120);

/// Accept clients on `listener` for as long as the process lives.
pub fn serve(listener: UnixListener, vmm: Vmm) {
    let clients = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(mut stream) = conn else { continue };
        if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::SeqCst);
            let reply = encode_reply(&Err(format!("more than {MAX_CLIENTS} clients")));
            let _ = write_frame(&mut stream, &reply);
            continue;
        }
        let (vmm, clients) = (vmm.clone(), clients.clone());
        let spawned = std::thread::Builder::new()
            .name("vmm-client".into())
            .spawn(move || {
                serve_client(stream, &vmm);
                clients.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            tracing::warn!("cannot start a thread for a control client");
        }
    }
}

fn serve_client(mut stream: UnixStream, vmm: &Vmm) {
    let _ = stream.set_read_timeout(Some(FRAME_TIMEOUT));
    loop {
        let body = match read_frame(&mut stream) {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                // Too large or truncated: answer if we still can, then drop the connection.
                let _ = write_frame(&mut stream, &encode_reply(&Err(e.to_string())));
                return;
            }
        };
        let (reply, stop) = match decode_request(&body) {
            Ok(req) => {
                tracing::debug!(op = req.name(), "control request");
                let stop = req == Request::Stop;
                (vmm.handle(req), stop)
            }
            Err(e) => {
                tracing::warn!("malformed control request: {e}");
                (Err(e.to_string()), false)
            }
        };
        let ok = reply.is_ok();
        let written = write_frame(&mut stream, &encode_reply(&reply));
        if stop && ok {
            // The reply is out: now the process may end.
            super::request_exit();
            return;
        }
        if written.is_err() {
            return;
        }
    }
}
