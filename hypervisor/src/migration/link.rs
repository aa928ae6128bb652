//! The byte stream a migration runs over: plain TCP, or TLS over TCP with certificates the
//! caller supplies (the node uses its cluster certificates: mutual TLS, the destination's
//! name checked). `tcp()` reaches the socket underneath for timeouts, buffer sizes and a
//! shutdown from another thread (which ends a TLS stream as well as a plain one).
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned};

use super::MigrationError;

/// How a source reaches its destination over TLS: the client configuration (trust roots and
/// the source's own certificate) and the name the destination's certificate must carry.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// One migration stream.
pub enum Link {
    Plain(TcpStream),
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Link::Plain(_) => "plain",
            Link::Client(_) | Link::Server(_) => "tls",
        };
        write!(f, "Link({kind}, {:?})", self.tcp().peer_addr().ok())
    }
}

impl Link {
    /// The socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Link::Plain(s) => s,
            Link::Client(s) => &s.sock,
            Link::Server(s) => &s.sock,
        }
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, Link::Plain(_))
    }

    /// The source's side of a new connection: TLS when `tls` is given, the handshake done
    /// (and the destination's certificate checked) before this returns.
    pub fn connect(tcp: TcpStream, tls: Option<&ClientTls>) -> Result<Link, MigrationError> {
        let Some(tls) = tls else {
            return Ok(Link::Plain(tcp));
        };
        let mut conn = ClientConnection::new(tls.config.clone(), tls.server_name.clone())
            .map_err(|e| MigrationError::Refused(format!("TLS: {e}")))?;
        let mut io = &tcp;
        while conn.is_handshaking() {
            conn.complete_io(&mut io).map_err(tls_error)?;
        }
        Ok(Link::Client(Box::new(StreamOwned::new(conn, tcp))))
    }
}

/// A failed TLS handshake reads as a refusal (wrong or missing certificate) where rustls says
/// so, else as the I/O error it was.
fn tls_error(e: io::Error) -> MigrationError {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(t) => MigrationError::Refused(format!("TLS: {t}")),
        None => e.into(),
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Client(s) => s.read(buf),
            Link::Server(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.write(buf),
            Link::Client(s) => s.write(buf),
            Link::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Link::Plain(s) => s.flush(),
            Link::Client(s) => s.flush(),
            Link::Server(s) => s.flush(),
        }
    }
}

/// Socket I/O that fails once `until` has passed, however slowly the peer trickles bytes: the
/// first message of a connection not yet authenticated gets a total deadline, not a per-read one.
pub struct Deadline<'a> {
    pub stream: &'a TcpStream,
    pub until: Instant,
}

impl Deadline<'_> {
    fn left(&self) -> io::Result<std::time::Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::ErrorKind::TimedOut.into())
        } else {
            Ok(left)
        }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        (&mut &*self.stream).read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        (&mut &*self.stream).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The destination's side: the TLS handshake (when `tls` is given) within `io`'s deadline,
/// then the first message, at most `max` bytes, also within it. The connection is
/// authenticated by its certificate (`tls`' verifier decides) before any of its frames is
/// read.
pub fn accept_first(
    tcp: TcpStream,
    tls: Option<&Arc<ServerConfig>>,
    until: Instant,
    max: usize,
) -> Result<(Link, super::messages::Message), MigrationError> {
    let mut io = Deadline {
        stream: &tcp,
        until,
    };
    match tls {
        None => {
            let first = super::messages::recv_limited(&mut io, max)?;
            Ok((Link::Plain(tcp), first))
        }
        Some(cfg) => {
            let mut conn = ServerConnection::new(cfg.clone())
                .map_err(|e| MigrationError::Refused(format!("TLS: {e}")))?;
            while conn.is_handshaking() {
                conn.complete_io(&mut io).map_err(tls_error)?;
            }
            let first =
                super::messages::recv_limited(&mut rustls::Stream::new(&mut conn, &mut io), max)?;
            Ok((Link::Server(Box::new(StreamOwned::new(conn, tcp))), first))
        }
    }
}

impl Link {
    /// Whether a message's bytes already wait in this stream's TLS buffers (a plain stream
    /// keeps none: its bytes wait in the socket).
    pub fn has_buffered(&mut self) -> Result<bool, MigrationError> {
        let state = match self {
            Link::Plain(_) => return Ok(false),
            Link::Client(s) => s.conn.process_new_packets(),
            Link::Server(s) => s.conn.process_new_packets(),
        };
        state
            .map(|st| st.plaintext_bytes_to_read() > 0)
            .map_err(|e| MigrationError::Protocol(format!("TLS: {e}")))
    }
}
