//! Trust: only cluster members take part in Raft and only authorized operators change state.
//! Each attack of issue 13 against real `tern node` processes on loopback, now failing to do
//! harm: unauthenticated and under-privileged API calls, forged Raft RPCs, joins without a
//! token, a forged audit "who" and "when", and slow connections.
#[allow(unused_imports)]
mod cluster_e2e_harness;
mod support;

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cluster_e2e_harness::*;
use serde_json::{json, Value};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// (status, body) of `method path` with `token` (None: no Authorization header).
fn call(addr: &str, token: Option<&str>, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let client = api::client_with_token(addr, token, Duration::from_secs(8));
    let url = api::url(addr, path);
    let req = match method {
        "GET" => client.get(url),
        _ => client.post(url).json(body),
    };
    let resp = req.send().expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Every route of the API with a body that would change something.
fn writes() -> Vec<(&'static str, Value)> {
    vec![
        (
            "/v1/write",
            json!({"command": {"op": "delete_vm", "vm": "web"}}),
        ),
        (
            "/v1/vms",
            json!({"name": "x", "memory_mib": 64, "vcpus": 1, "workload": "idle"}),
        ),
        ("/v1/vms/web/destroy", json!({})),
        ("/v1/vms/web/stop", json!({})),
        ("/v1/migrations", json!({"vm": "web", "to": 1})),
        ("/v1/tasks/1/cancel", json!({})),
        ("/v1/hosts/1/maintenance", json!({"enter": true})),
        ("/v1/drs/apply", json!({})),
        ("/v1/members/remove", json!({"id": 1})),
        ("/v1/tokens", json!({"name": "evil", "role": "admin"})),
        ("/v1/tokens/admin/revoke", json!({})),
        ("/v1/cluster/join-token", json!({})),
        ("/v1/load", json!({"host": 1, "vms": []})),
        ("/v1/migrations/prepare", json!({"task": 1})),
        ("/raft/vote", json!({})),
        ("/raft/append", json!({})),
        ("/raft/snapshot", json!({})),
    ]
}

#[test]
fn trust_api_needs_a_token_and_roles_limit_what_it_may_do() {
    let c = Cluster::start(1, &[]);
    let addr = c.addr(1);
    let before = c.state();

    // No token, or a made-up one: 401 on every route, reads included.
    for token in [None, Some("tern_guessed")] {
        for (path, body) in writes() {
            let (status, reply) = call(&addr, token, "POST", path, &body);
            assert_eq!(status, 401, "POST {path} with {token:?}: {reply}");
        }
        for path in [
            "/v1/state",
            "/v1/status",
            "/v1/hosts",
            "/metrics",
            "/v1/tokens",
        ] {
            let (status, _) = call(&addr, token, "GET", path, &json!(null));
            assert_eq!(status, 401, "GET {path} with {token:?}");
        }
    }

    // An auditor reads everything and writes nothing.
    let auditor = c.token("audrey", "auditor");
    for path in [
        "/v1/state",
        "/v1/status",
        "/v1/hosts",
        "/metrics",
        "/v1/tokens",
    ] {
        let (status, reply) = call(&addr, Some(&auditor), "GET", path, &json!(null));
        assert_eq!(status, 200, "GET {path}: {reply}");
    }
    for (path, body) in writes() {
        let (status, reply) = call(&addr, Some(&auditor), "POST", path, &body);
        assert_eq!(status, 403, "auditor POST {path}: {reply}");
    }

    // An operator runs workloads, not the cluster.
    let operator = c.token("olga", "operator");
    for command in [
        json!({"op": "set_drs", "settings": {"automation": "fully-automated", "migration_threshold": 5, "interval_s": 1}}),
        json!({"op": "remove_host", "id": 1}),
        json!({"op": "create_token", "name": "olga2", "role": "admin", "hash": "0".repeat(64)}),
    ] {
        let (status, reply) = call(
            &addr,
            Some(&operator),
            "POST",
            "/v1/write",
            &json!({"command": command}),
        );
        assert_eq!(status, 403, "operator {command}: {reply}");
    }

    // The audit's who and when are the token's principal and the leader's clock, whatever the
    // body claims.
    let t0 = now_ms();
    let (status, reply) = call(
        &addr,
        Some(&operator),
        "POST",
        "/v1/write",
        &json!({"actor": "boss@corp", "at_ms": 0, "command":
            {"op": "put_schedule", "schedule": {"name": "nightly", "cron": "0 2 * * *", "action": "noop", "enabled": true}}}),
    );
    assert_eq!(status, 200, "{reply}");
    let state = c.state();
    let entry = state["audit"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|e| e["action"].as_str().is_some_and(|a| a.contains("nightly")))
        .expect("audit entry")
        .clone();
    assert_eq!(entry["actor"], json!("olga"), "{entry}");
    let at = entry["at_ms"].as_u64().unwrap();
    assert!(
        at >= t0 - 1000 && at <= now_ms() + 1000,
        "audit time {at} is not now ({t0})"
    );

    // Secrets never leave the cluster: no token hash in the state an admin reads.
    let text = state.to_string();
    assert!(!text.contains(&tern_node::pki::sha256_hex(operator.as_bytes())));

    // A revoked token is refused from then on.
    c.tern_ok(&["token", "revoke", "olga"]);
    let (status, _) = call(&addr, Some(&operator), "GET", "/v1/state", &json!(null));
    assert_eq!(status, 401);

    // Plain HTTP gets no API at all.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /v1/state HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("hosts"));

    // None of the refused calls changed anything but the audit and tokens.
    let after = c.state();
    assert_eq!(after["hosts"], before["hosts"]);
    assert_eq!(after["vms"], before["vms"]);
    assert_eq!(after["drs"], before["drs"]);
}

/// A forged append like the one that killed a VM and panicked openraft in issue 13: a higher
/// term and a `delete_vm` entry.
fn forged_append(term: u64, from: u64) -> Value {
    json!({
        "vote": {"leader_id": {"term": term, "node_id": from}, "committed": true},
        "prev_log_id": null,
        "leader_commit": {"leader_id": {"term": term, "node_id": from}, "index": 50},
        "entries": [{"log_id": {"leader_id": {"term": term, "node_id": from}, "index": 0},
                     "payload": {"Normal": {"actor": "x", "at_ms": 0, "command": {"op": "delete_vm", "vm": "web"}}}}],
    })
}

#[test]
fn trust_forged_raft_rpcs_and_tokenless_joins_change_nothing() {
    let c = Cluster::start(3, &[]);
    let seed = c.addr(1);
    let status = |addr: &str| get(addr, "/v1/status").expect("status");
    let before = status(&seed);
    let term = before["term"].as_u64().unwrap();

    // From an operator connection (no node certificate), with and without a token.
    let admin = api::admin(&seed).unwrap().token.unwrap();
    for id in 1..=3 {
        let addr = c.addr(id);
        for (path, body) in [
            ("/raft/append", forged_append(term + 10, 2)),
            (
                "/raft/vote",
                json!({"vote": {"leader_id": {"term": term + 10, "node_id": 2}, "committed": false}, "last_log_id": null}),
            ),
            (
                "/raft/snapshot",
                json!({"vote": {"leader_id": {"term": term + 10, "node_id": 2}, "committed": true}, "meta": {}, "offset": 0, "data": [], "done": true}),
            ),
        ] {
            let (s, r) = call(&addr, None, "POST", path, &body);
            assert_eq!(s, 401, "{path} to {id}: {r}");
            let (s, r) = call(&addr, Some(&admin), "POST", path, &body);
            assert_eq!(s, 403, "{path} to {id} with a token: {r}");
            // Claiming to be a node without its certificate.
            let client = api::client_with_token(&addr, None, Duration::from_secs(5));
            let resp = client
                .post(api::url(&addr, path))
                .header("x-tern-node", "2")
                .json(&body)
                .send()
                .unwrap();
            assert_eq!(
                resp.status().as_u16(),
                401,
                "{path} to {id} claiming node 2"
            );
        }
    }

    // A node certificate from another CA does not even complete the TLS handshake.
    let foreign = tern_node::pki::NodeTls::bootstrap(2, &["127.0.0.1:1".into()]).unwrap();
    let tls = std::sync::Arc::new(foreign.peer_client_config().unwrap());
    let peers = tern_consensus::network::PeerTls {
        config: tls,
        self_id: 2,
        source_ip: None,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (client, base) = peers
        .client(1, &seed, Some(Duration::from_secs(5)))
        .unwrap();
    let sent = rt.block_on(async {
        client
            .post(format!("{base}/raft/append"))
            .json(&forged_append(term + 10, 2))
            .send()
            .await
    });
    assert!(
        sent.is_err(),
        "a foreign certificate was accepted: {sent:?}"
    );

    // Joins without a valid join token are refused, and admit nobody.
    for token in [
        None,
        Some("garbage"),
        Some(&*format!("{}.{}", "a".repeat(64), "b".repeat(64))),
    ] {
        let (s, r) = call(
            &seed,
            None,
            "POST",
            "/v1/members/join",
            &json!({"id": 9, "addr": "127.0.0.1:9", "join_token": token}),
        );
        assert_eq!(s, 401, "join with {token:?}: {r}");
        let csr = tern_node::pki::node_key_and_csr(9).unwrap().1;
        let (s, r) = call(
            &seed,
            None,
            "POST",
            "/v1/members/certify",
            &json!({"id": 9, "addrs": ["127.0.0.1:9"], "csr": csr, "join_token": token.unwrap_or("")}),
        );
        assert_eq!(s, 401, "certify with {token:?}: {r}");
    }
    // A valid join token cannot get a certificate for an existing member's id.
    let token = api::join_token(&seed);
    let csr = tern_node::pki::node_key_and_csr(2).unwrap().1;
    let (s, r) = call(
        &seed,
        None,
        "POST",
        "/v1/members/certify",
        &json!({"id": 2, "addrs": ["127.0.0.1:9"], "csr": csr, "join_token": token}),
    );
    assert_eq!(s, 409, "{r}");

    // Nothing changed: same leader and term, three voters, every node alive, and it commits.
    for id in 1..=3 {
        let s = status(&c.addr(id));
        assert_eq!(s["term"].as_u64(), Some(term), "node {id}: {s}");
        assert_eq!(s["leader"], before["leader"], "node {id}");
        assert_eq!(s["members"].as_array().unwrap().len(), 3, "node {id}: {s}");
    }
    c.write(json!({"op": "noop"}));
}

#[test]
fn trust_seven_hosts_make_five_voters_and_two_learners() {
    let c = Cluster::start(7, &[]);
    let voters = |s: &Value| {
        s["members"].as_array().map_or(0, |m| {
            m.iter().filter(|m| m["voter"] == json!(true)).count()
        })
    };
    wait_for(
        "7 members, 5 of them voters",
        Duration::from_secs(30),
        || {
            let s = get(&c.addr(1), "/v1/status")?;
            (s["members"].as_array()?.len() == 7 && voters(&s) == 5).then_some(())
        },
    );
    // Every join has finished (every host registered); the rule still holds, and it commits.
    std::thread::sleep(Duration::from_secs(1));
    for id in 1..=7 {
        let s = get(&c.addr(id), "/v1/status").expect("status");
        assert_eq!(voters(&s), 5, "node {id}: {s}");
    }
    c.write(json!({"op": "noop"}));
}

/// A node process's resident memory (KiB) and open descriptors.
fn rss_kib_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss, fds)
}

/// Slowloris against `addr`: `raw` connections that send the first bytes of a TLS record and
/// stall, and `tls` connections that finish the handshake and trickle a request's headers;
/// every connection the node drops is opened again, until `stop`.
fn slowloris(
    addr: String,
    ca: String,
    raw: usize,
    tls: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    use std::net::TcpStream;
    use std::sync::atomic::Ordering;
    std::thread::spawn(move || {
        let config = std::sync::Arc::new(tern_node::pki::operator_client_config(&ca).unwrap());
        let ip: std::net::IpAddr = tern_node::pki::host_of(&addr).parse().unwrap();
        let open_raw = || {
            let mut s = TcpStream::connect(&addr).ok()?;
            s.write_all(&[0x16, 0x03, 0x01]).ok()?;
            Some(s)
        };
        let open_tls = || {
            let s = TcpStream::connect(&addr).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            let conn = rustls::ClientConnection::new(
                config.clone(),
                rustls::pki_types::ServerName::from(ip),
            )
            .ok()?;
            let mut t = rustls::StreamOwned::new(conn, s);
            t.write_all(b"GET /v1/state HTTP/1.1\r\nHost: x\r\n").ok()?;
            t.flush().ok()?;
            Some(t.sock)
        };
        let mut opened = 0u64;
        let mut conns: Vec<TcpStream> = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            // Drop what the node closed, then top up each kind.
            conns.retain(|s| {
                s.set_nonblocking(true).unwrap();
                let mut b = [0u8; 64];
                let alive = matches!(
                    std::io::Read::read(&mut &*s, &mut b),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                );
                s.set_nonblocking(false).unwrap();
                alive
            });
            let mut round = 0;
            while conns.len() < raw + tls && round < 500 && !stop.load(Ordering::SeqCst) {
                round += 1;
                let s = if (opened as usize) % (raw + tls) < tls {
                    open_tls()
                } else {
                    open_raw()
                };
                opened += 1;
                conns.extend(s);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        opened
    })
}

#[test]
fn trust_slow_connections_do_not_stop_commits_and_memory_stays_bounded() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut c = Cluster::start(3, &[]);
    let ca = api::admin(&c.addr(1)).unwrap().ca.unwrap();
    let pid = c.nodes[0].child.as_ref().unwrap().id();
    c.write(json!({"op": "noop"}));
    let (rss0, fds0) = rss_kib_and_fds(pid);

    // 1,000 slow connections to each of nodes 1 and 2 (a quorum), 200 of them past TLS.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let attackers: Vec<_> = [1, 2]
        .iter()
        .map(|&id| slowloris(c.addr(id), ca.clone(), 800, 200, stop.clone()))
        .collect();

    // The cluster keeps committing, and a restarted node 3 gets back in through the choked
    // listeners (its peers must accept its new connections and it theirs).
    let (mut max_rss, mut max_fds) = (rss0, fds0);
    let t0 = std::time::Instant::now();
    let mut commits = 0;
    let mut restarted = false;
    let addr1 = c.addr(1);
    // An operator's new connection can lose its handshake slot in the flood (the oldest
    // handshake gives way): like the CLI, it tries again.
    let write = || {
        wait_for("a write through node 1", Duration::from_secs(30), || {
            let r = client(&addr1)?
                .post(api::url(&addr1, "/v1/write"))
                .json(&json!({"command": {"op": "noop"}}))
                .send()
                .ok()?;
            r.status().is_success().then_some(())
        })
    };
    while t0.elapsed() < Duration::from_secs(25) {
        write();
        commits += 1;
        if !restarted && t0.elapsed() > Duration::from_secs(8) {
            c.node(3).kill();
            let seed = c.addr(1);
            c.start_node(3, Some(&seed));
            restarted = true;
        }
        let (rss, fds) = rss_kib_and_fds(pid);
        max_rss = max_rss.max(rss);
        max_fds = max_fds.max(fds);
        std::thread::sleep(Duration::from_millis(500));
    }
    let leader = get(&c.addr(1), "/v1/status").expect("status")["last_applied"].clone();
    wait_for("node 3 caught up", Duration::from_secs(30), || {
        let s = get(&c.addr(3), "/v1/status")?;
        (s["last_applied"].as_u64()? >= leader.as_u64()?).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    let opened: u64 = attackers.into_iter().map(|a| a.join().unwrap()).sum();
    assert!(
        opened >= 2000,
        "the attack opened only {opened} connections"
    );
    assert!(commits >= 10, "{commits} commits in 25 s");

    // The bound: at most 128 handshaking + 256 peer + 512 other connections (listener::Limits),
    // each with at most a 64 KiB request buffer and its TLS state: under 128 MiB of growth.
    let limits = tern_node::listener::Limits::default();
    assert!(
        max_fds <= fds0 + limits.max_open(),
        "{max_fds} descriptors open (was {fds0})"
    );
    assert!(
        max_rss - rss0 < 128 << 10,
        "resident memory grew from {rss0} KiB to {max_rss} KiB"
    );
    eprintln!(
        "slow connections: {opened} opened; node 1 at most {max_fds} fds (from {fds0}), \
         {max_rss} KiB resident (from {rss0}); {commits} commits"
    );
}

#[test]
fn trust_a_5mb_snapshot_installs_on_a_new_node_which_then_serves_reads_and_votes() {
    let mut c = Cluster::start(3, &["--snapshot-every", "20", "--keep-after-snapshot", "2"]);
    // 5 MB of state: 50 schedules carrying 100 KiB each.
    let pad = "x".repeat(100 << 10);
    for i in 0..50 {
        c.write(
            json!({"op": "put_schedule", "schedule": {"name": format!("pad-{i}"),
            "cron": "0 2 * * *", "action": "noop", "enabled": false, "last_error": pad}}),
        );
    }
    let seed = c.addr(1);
    let state_len = get(&seed, "/v1/state").expect("state").to_string().len();
    assert!(state_len >= 5_000_000, "state is only {state_len} bytes");
    let leader_applied = get(&seed, "/v1/status").unwrap()["last_applied"]
        .as_u64()
        .unwrap();
    wait_for(
        "a snapshot past the padding",
        Duration::from_secs(30),
        || {
            let s = get(&seed, "/v1/status")?;
            (s["snapshot_index"].as_u64()? + 30 >= leader_applied).then_some(())
        },
    );

    // Node 4 joins: the log behind the snapshot is gone, so it gets the snapshot, in chunks.
    let addr4 = format!("{}.4:7400", seed.rsplit_once('.').unwrap().0);
    api::register(&c.nodes[0].data, std::slice::from_ref(&addr4));
    let data = c.dir.path().join("n4");
    c.nodes.push(Node {
        id: 4,
        addr: addr4.clone(),
        data,
        child: None,
        advertise: None,
    });
    c.start_node(4, Some(&seed));
    wait_for(
        "node 4 a voter, installed from the snapshot",
        Duration::from_secs(90),
        || {
            let s = get(&addr4, "/v1/status")?;
            let voter = s["members"]
                .as_array()?
                .iter()
                .any(|m| m["id"] == json!(4) && m["voter"] == json!(true));
            (voter
                && s["snapshot_index"].as_u64().is_some()
                && s["last_applied"].as_u64()? >= leader_applied)
                .then_some(())
        },
    );
    // It serves reads of the state it installed...
    let state = get(&addr4, "/v1/state").expect("read on node 4");
    assert_eq!(
        state["schedules"]["pad-49"]["last_error"]
            .as_str()
            .map(str::len),
        Some(100 << 10),
        "{}",
        &state.to_string()[..300]
    );
    // ...and votes: with the leader gone, nodes 2, 3 and 4 are exactly the quorum of four.
    c.node(1).kill();
    wait_for("a commit without node 1", Duration::from_secs(30), || {
        let (status, _) = post(&c.addr(2), "/v1/write", &json!({"command": {"op": "noop"}}));
        (status == 200).then_some(())
    });
    let s = get(&addr4, "/v1/status").expect("status");
    assert_ne!(s["leader"], json!(1), "{s}");
}
