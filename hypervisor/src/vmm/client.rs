//! A control-socket client (for the node, tools and tests).
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::protocol::{
    decode_reply, encode_request, read_frame, write_frame, FrameError, GateDecision, MigrationView,
    Request, Response, VmmStatus,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control socket: {0}")]
    Frame(#[from] FrameError),
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the VMM closed the connection")]
    Closed,
    /// The VMM answered with an error.
    #[error("{0}")]
    Refused(String),
    #[error("unexpected reply to {op}: {reply}")]
    Unexpected { op: &'static str, reply: String },
}

fn unexpected(op: &'static str, reply: Response) -> ClientError {
    ClientError::Unexpected {
        op,
        reply: format!("{reply:?}"),
    }
}

pub struct Client {
    stream: UnixStream,
}

impl Client {
    /// Connect to the control socket at `path`; each call waits at most `timeout` beyond what
    /// the request itself asks for (`WaitGate`).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Client { stream })
    }

    /// One request, one reply.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        if let Request::WaitGate { timeout_ms } = req {
            let base = self
                .stream
                .read_timeout()?
                .unwrap_or(Duration::from_secs(10));
            self.stream
                .set_read_timeout(Some(base + Duration::from_millis(*timeout_ms)))?;
        }
        write_frame(&mut self.stream, &encode_request(req))?;
        let body = read_frame(&mut self.stream)?.ok_or(ClientError::Closed)?;
        decode_reply(&body)?.map_err(ClientError::Refused)
    }

    fn done(&mut self, req: Request) -> Result<(), ClientError> {
        let op = req.name();
        match self.call(&req)? {
            Response::Done => Ok(()),
            reply => Err(unexpected(op, reply)),
        }
    }

    pub fn status(&mut self) -> Result<VmmStatus, ClientError> {
        match self.call(&Request::Status)? {
            Response::Status(s) => Ok(*s),
            reply => Err(unexpected("status", reply)),
        }
    }

    pub fn pause(&mut self) -> Result<(), ClientError> {
        self.done(Request::Pause)
    }

    pub fn resume(&mut self) -> Result<(), ClientError> {
        self.done(Request::Resume)
    }

    pub fn stop(&mut self) -> Result<(), ClientError> {
        self.done(Request::Stop)
    }

    pub fn cancel(&mut self) -> Result<(), ClientError> {
        self.done(Request::Cancel)
    }

    pub fn gate(&mut self, decision: GateDecision) -> Result<(), ClientError> {
        self.done(Request::Gate { decision })
    }

    fn migration(&mut self, req: Request) -> Result<MigrationView, ClientError> {
        let op = req.name();
        match self.call(&req)? {
            Response::Migration(m) => Ok(m),
            reply => Err(unexpected(op, reply)),
        }
    }

    pub fn progress(&mut self) -> Result<MigrationView, ClientError> {
        self.migration(Request::Progress)
    }

    pub fn wait_gate(&mut self, timeout: Duration) -> Result<MigrationView, ClientError> {
        self.migration(Request::WaitGate {
            timeout_ms: timeout.as_millis() as u64,
        })
    }
}
