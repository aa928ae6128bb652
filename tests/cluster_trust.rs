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
