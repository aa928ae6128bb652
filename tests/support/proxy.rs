//! A TCP proxy network for partition tests: one proxy in front of each node, and a link table
//! the test can sever and heal per pair of nodes.
//!
//! Usage (see `tests/cluster_raft.rs`):
//! ```ignore
//! let net = ProxyNet::new();
//! // Node 1 listens on 127.a.b.1:7400 (each node on its own loopback IP).
//! let proxy1 = net.add(1, "127.a.b.1:7400".parse()?);
//! // start: tern node --id 1 --listen 127.a.b.1:7400 --advertise {proxy1} ...
//! net.isolate(1);      // node 1 can reach no other node and no other node can reach it
//! net.sever(1, 2);     // or cut one link, both ways
//! net.heal_all();      // or heal(1, 2)
//! ```
//!
//! Each node advertises its proxy's address (`tern node --advertise`), so every peer
//! connection to node B (Raft RPCs, forwarded writes and reads) goes through B's proxy. A
//! node's outgoing connections leave from its own listen IP, so the proxy tells the caller by
//! its source IP; nodes therefore need distinct loopback IPs. A connection over a severed link
//! is accepted and then black-holed (bytes are read and dropped, nothing answers), as on a cut
//! network: the caller times out. Severing a link also closes the connections already open
//! over it. Connections from unregistered addresses (the test itself talking to a node's
//! listen address, or to a proxy) always pass. Only traffic addressed to a node's advertised
//! address is proxied: anything a node reaches on another port is not cut.
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

type NodeId = u64;

struct Conn {
    src: Option<NodeId>,
    dst: NodeId,
    /// Both ends (the caller's and, when forwarding, the node's), to shut down on sever/heal.
    sockets: Vec<TcpStream>,
}

#[derive(Default)]
struct Shared {
    sources: Mutex<HashMap<IpAddr, NodeId>>,
    severed: Mutex<HashSet<(NodeId, NodeId)>>,
    conns: Mutex<HashMap<u64, Conn>>,
    next_conn: AtomicU64,
    stop: AtomicBool,
}

/// The proxies of one test cluster. Dropping it stops them and closes every connection.
#[derive(Default)]
pub struct ProxyNet {
    shared: Arc<Shared>,
    listeners: Mutex<Vec<SocketAddr>>,
}

fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

impl ProxyNet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Start a proxy for node `id`, which listens on `listen` (its own loopback IP): the proxy
    /// takes another port on the same IP. Returns the address the node must advertise.
    pub fn add(&self, id: NodeId, listen: SocketAddr) -> SocketAddr {
        self.add_node(id, listen.ip(), listen.ip(), listen)
    }

    /// Start a proxy for node `id` on `proxy_ip` (any free port) forwarding to `target`.
    /// `source_ip` is the IP the node's outgoing connections come from (its listen IP).
    /// Returns the proxy address, which the node must advertise.
    pub fn add_node(
        &self,
        id: NodeId,
        source_ip: IpAddr,
        proxy_ip: IpAddr,
        target: SocketAddr,
    ) -> SocketAddr {
        self.shared.sources.lock().unwrap().insert(source_ip, id);
        let listener = TcpListener::bind((proxy_ip, 0)).expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        self.listeners.lock().unwrap().push(addr);
        let shared = self.shared.clone();
        thread::spawn(move || accept_loop(listener, shared, id, target));
        addr
    }

    /// Cut the link between `a` and `b` both ways.
    pub fn sever(&self, a: NodeId, b: NodeId) {
        self.shared.severed.lock().unwrap().insert(pair(a, b));
        self.close_link(a, b);
    }

    /// Restore the link between `a` and `b` (black-holed connections are closed, so callers
    /// reconnect through the healed link).
    pub fn heal(&self, a: NodeId, b: NodeId) {
        self.shared.severed.lock().unwrap().remove(&pair(a, b));
        self.close_link(a, b);
    }

    /// Cut `id` off from every other registered node.
    pub fn isolate(&self, id: NodeId) {
        for other in self.nodes() {
            if other != id {
                self.sever(id, other);
            }
        }
    }

    /// Restore every link.
    pub fn heal_all(&self) {
        let cut: Vec<_> = self.shared.severed.lock().unwrap().drain().collect();
        for (a, b) in cut {
            self.close_link(a, b);
        }
    }

    pub fn is_severed(&self, a: NodeId, b: NodeId) -> bool {
        self.shared.severed.lock().unwrap().contains(&pair(a, b))
    }

    fn nodes(&self) -> Vec<NodeId> {
        let mut ids: Vec<_> = self
            .shared
            .sources
            .lock()
            .unwrap()
            .values()
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn close_link(&self, a: NodeId, b: NodeId) {
        let conns = self.shared.conns.lock().unwrap();
        for conn in conns.values() {
            if conn.src.is_some_and(|s| pair(s, conn.dst) == pair(a, b)) {
                for s in &conn.sockets {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

impl Drop for ProxyNet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake each accept loop so it sees `stop`.
        for addr in self.listeners.lock().unwrap().iter() {
            let _ = TcpStream::connect(addr);
        }
        for conn in self.shared.conns.lock().unwrap().values() {
            for s in &conn.sockets {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, dst: NodeId, target: SocketAddr) {
    for incoming in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = incoming else { continue };
        let src = client
            .peer_addr()
            .ok()
            .and_then(|a| shared.sources.lock().unwrap().get(&a.ip()).copied());
        let cut = src.is_some_and(|s| shared.severed.lock().unwrap().contains(&pair(s, dst)));
        let shared = shared.clone();
        thread::spawn(move || {
            if cut {
                blackhole(client, src, dst, &shared);
            } else {
                forward(client, src, dst, target, &shared);
            }
        });
    }
}

/// Register a connection's sockets; returns its key for `unregister`.
fn register(shared: &Shared, src: Option<NodeId>, dst: NodeId, sockets: Vec<TcpStream>) -> u64 {
    let key = shared.next_conn.fetch_add(1, Ordering::SeqCst);
    shared
        .conns
        .lock()
        .unwrap()
        .insert(key, Conn { src, dst, sockets });
    key
}

fn unregister(shared: &Shared, key: u64) {
    if let Some(conn) = shared.conns.lock().unwrap().remove(&key) {
        for s in conn.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn blackhole(mut client: TcpStream, src: Option<NodeId>, dst: NodeId, shared: &Shared) {
    let Ok(clone) = client.try_clone() else {
        return;
    };
    let key = register(shared, src, dst, vec![clone]);
    let mut buf = [0u8; 16 * 1024];
    while matches!(client.read(&mut buf), Ok(n) if n > 0) {}
    unregister(shared, key);
}

fn forward(
    client: TcpStream,
    src: Option<NodeId>,
    dst: NodeId,
    target: SocketAddr,
    shared: &Shared,
) {
    let Ok(server) = TcpStream::connect(target) else {
        return;
    };
    let _ = server.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
        client.try_clone(),
        server.try_clone(),
        client.try_clone(),
        server.try_clone(),
    ) else {
        return;
    };
    let key = register(shared, src, dst, vec![c3, s3]);
    let upstream = thread::spawn(move || pump(client, server));
    pump(s2, c2);
    let _ = upstream.join();
    unregister(shared, key);
}

/// Copy bytes one way until EOF or error, then close both directions.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
