//! End-to-end Raft tests: real `tern node` processes on loopback with sled data dirs.
mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::proxy::ProxyNet;
use support::store::{assert_committed_prefix_agrees, read_log};
use support::wait_for;

struct Node {
    id: u64,
    addr: String,
    data: std::path::PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
    /// The address peers use (a proxy), when not the listen address.
    advertise: Option<String>,
    /// What a joining node presents.
    join_token: Option<String>,
}

impl Node {
    fn start(&mut self, join: Option<&str>) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern"));
        cmd.args(["node", "--id", &self.id.to_string(), "--listen", &self.addr]);
        cmd.arg("--data").arg(&self.data);
        match join {
            Some(seed) => cmd.args(["--join", seed]),
            None => cmd.arg("--bootstrap"),
        };
        if let Some(t) = &self.join_token {
            cmd.args(["--join-token", t]);
        }
        // The bootstrap node writes its admin config here, not into the user's home.
        cmd.env("TERN_CONFIG", support::api::config_path(&self.addr));
        if let Some(a) = &self.advertise {
            cmd.args(["--advertise", a]);
        }
        cmd.args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(cmd.spawn().expect("spawn tern node"));
    }

    /// kill -9: no shutdown path runs.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Cluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

/// A random 127.a.b.0/24 network per test run so concurrent runs never share ports.
fn net() -> (u8, u8) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let p = std::process::id();
    (
        ((p ^ t) % 250 + 2) as u8,
        ((t / 7 + p * 13) % 250 + 2) as u8,
    )
}

/// An admin client (TLS, token) for `addr`'s cluster; None until its bootstrap node wrote it.
fn client(addr: &str) -> Option<reqwest::blocking::Client> {
    // Longer than a node's write timeout (5 s), so a write that cannot commit is answered by
    // the node itself.
    support::api::client(addr, Duration::from_secs(8))
}

fn url(addr: &str, path: &str) -> String {
    support::api::url(addr, path)
}

fn status(addr: &str) -> Option<Value> {
    client(addr)?
        .get(url(addr, "/v1/status"))
        .send()
        .ok()?
        .json()
        .ok()
}

fn write(addr: &str, body: Value) -> Result<Value, String> {
    let resp = client(addr)
        .ok_or_else(|| "no admin config yet".to_string())?
        .post(url(addr, "/v1/write"))
        .json(&body)
        .send()
        .map_err(|e| e.to_string())?;
    let ok = resp.status().is_success();
    let v: Value = resp.json().map_err(|e| e.to_string())?;
    if ok {
        Ok(v)
    } else {
        Err(v.to_string())
    }
}

fn schedule(name: &str) -> Value {
    json!({"command": {"op": "put_schedule", "schedule": {"name": name, "cron": "* * * * *", "action": "noop", "enabled": true}}})
}

impl Cluster {
    fn start(n: u64, extra: &[&str]) -> Cluster {
        Self::start_with(n, extra, None)
    }

    /// With `proxies`, every node's peer traffic goes through its proxy in `proxies`.
    fn start_with(n: u64, extra: &[&str], proxies: Option<&ProxyNet>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = net();
        let mut nodes: Vec<Node> = (1..=n)
            .map(|id| {
                let addr: SocketAddr = format!("127.{a}.{b}.{id}:7400").parse().unwrap();
                let advertise = proxies.map(|p| p.add(id, addr).to_string());
                Node {
                    id,
                    addr: addr.to_string(),
                    data: dir.path().join(format!("n{id}")),
                    child: None,
                    extra: extra.iter().map(|s| s.to_string()).collect(),
                    advertise,
                    join_token: None,
                }
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
        support::api::register(&nodes[0].data, &addrs);
        nodes[0].start(None);
        let seed = nodes[0].addr.clone();
        wait_for("bootstrap leader", Duration::from_secs(10), || {
            status(&seed)
                .filter(|s| s["leader"] == json!(1))
                .map(|_| ())
        });
        let token = (n > 1).then(|| support::api::join_token(&seed));
        for node in nodes.iter_mut().skip(1) {
            node.join_token = token.clone();
            node.start(Some(&seed));
        }
        let c = Cluster { nodes, _dir: dir };
        c.wait_members(n as usize);
        c
    }

    fn wait_members(&self, n: usize) {
        wait_for("all voters", Duration::from_secs(20), || {
            let s = status(&self.nodes[0].addr)?;
            let voters = s["members"]
                .as_array()?
                .iter()
                .filter(|m| m["voter"] == json!(true))
                .count();
            (voters == n).then_some(())
        });
    }

    /// The live node in state leader with the highest term (a restarted old leader reports
    /// itself leader of its old term until it hears from the current one).
    fn leader(&self) -> Option<u64> {
        let mut best: Option<(u64, u64)> = None;
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let s = status(&n.addr)?;
            let term = s["term"].as_u64()?;
            if s["state"] == json!("leader") && best.is_none_or(|(t, _)| term > t) {
                best = Some((term, n.id));
            }
        }
        best.map(|(_, id)| id)
    }

    fn node(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    fn any_live_addr(&self) -> String {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .unwrap()
            .addr
            .clone()
    }

    fn schedules(&self, addr: &str) -> Vec<String> {
        let v: Value = client(addr)
            .unwrap()
            .get(url(addr, "/v1/state"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        v["schedules"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }
}

#[test]
fn cluster_three_and_five_nodes_elect_a_leader_and_forward_writes() {
    for n in [3u64, 5] {
        let c = Cluster::start(n, &[]);
        let leader = wait_for("leader", Duration::from_secs(5), || c.leader());
        assert!((1..=n).contains(&leader));
        // A write sent to a follower is forwarded to the leader and committed.
        let follower = c
            .nodes
            .iter()
            .find(|x| x.id != leader)
            .unwrap()
            .addr
            .clone();
        write(&follower, schedule("via-follower")).expect("forwarded write");
        // Hosts register themselves; every node serves the linearizable host list.
        let hosts: Vec<Value> = wait_for("hosts", Duration::from_secs(10), || {
            let h: Vec<Value> = client(&follower)?
                .get(url(&follower, "/v1/hosts"))
                .send()
                .ok()?
                .json()
                .ok()?;
            (h.len() == n as usize).then_some(h)
        });
        assert!(hosts.iter().all(|h| h["state"] == json!("connected")));
        // Invalid commands are rejected with a typed error and change nothing.
        let err = write(
            &follower,
            json!({"command": {"op": "remove_host", "id": 999}}),
        )
        .unwrap_err();
        assert!(err.contains("unknown_host"), "{err}");
    }
}

#[test]
fn cluster_leader_kill_fails_over_without_losing_writes() {
    let mut c = Cluster::start(3, &[]);
    let leader = wait_for("leader", Duration::from_secs(5), || c.leader());
    let mut committed = Vec::new();
    for i in 0..20 {
        let name = format!("before-{i}");
        write(&c.node(leader).addr.clone(), schedule(&name)).unwrap();
        committed.push(name);
    }
    c.node(leader).kill();
    let killed_at = Instant::now();
    let survivor = c.any_live_addr();
    wait_for("write after failover", Duration::from_secs(3), || {
        write(&survivor, schedule("after")).ok()
    });
    assert!(
        killed_at.elapsed() < Duration::from_secs(3),
        "failover took {:?}",
        killed_at.elapsed()
    );
    committed.push("after".into());
    let new_leader = c.leader().expect("new leader");
    assert_ne!(new_leader, leader);
    let have = c.schedules(&survivor);
    for name in &committed {
        assert!(have.contains(name), "committed write {name} lost");
    }
    // The killed node restarts from its own sled data and catches up.
    let old = c.node(leader);
    old.start(None);
    let addr = old.addr.clone();
    wait_for("restarted node catches up", Duration::from_secs(10), || {
        let s = status(&addr)?;
        let lead = status(&c.nodes[(new_leader - 1) as usize].addr)?;
        (s["last_applied"] == lead["last_applied"] && s["leader"] == json!(new_leader))
            .then_some(())
    });
}

#[test]
fn cluster_restart_after_snapshot_and_purge_keeps_state() {
    let mut c = Cluster::start(3, &["--snapshot-every", "20", "--keep-after-snapshot", "0"]);
    let seed = c.nodes[0].addr.clone();
    for i in 0..60 {
        write(&seed, schedule(&format!("s{i}"))).unwrap();
    }
    wait_for("snapshot on every node", Duration::from_secs(10), || {
        c.nodes
            .iter()
            .all(|n| {
                status(&n.addr).is_some_and(|s| s["snapshot_index"].as_u64().unwrap_or(0) >= 40)
            })
            .then_some(())
    });
    for id in 1..=3 {
        c.node(id).kill();
    }
    for id in 1..=3 {
        c.node(id).start(None);
    }
    wait_for("leader after full restart", Duration::from_secs(10), || {
        c.leader()
    });
    let have = c.schedules(&seed);
    for i in 0..60 {
        assert!(
            have.contains(&format!("s{i}")),
            "s{i} lost across snapshot + restart"
        );
    }
    write(&seed, schedule("after-restart")).unwrap();
}

#[test]
fn cluster_bad_api_bodies_get_clear_errors() {
    let c = Cluster::start(1, &[]);
    let addr = &c.nodes[0].addr;
    for (path, body) in [
        ("/v1/write", "{\"command\": {\"op\": \"remo"),
        ("/v1/write", "{\"command\": {\"op\": \"no_such_op\"}}"),
        ("/raft/append", "\u{0}\u{1}garbage"),
        ("/raft/vote", "{}"),
        ("/raft/snapshot", "[1,2,3]"),
    ] {
        let resp = client(addr)
            .unwrap()
            .post(url(addr, path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .unwrap();
        assert!(
            resp.status().is_client_error(),
            "{path} {body:?}: {}",
            resp.status()
        );
        assert!(!resp.text().unwrap().is_empty());
    }
    // The node is still healthy and commits.
    write(addr, schedule("still-alive")).unwrap();
}

/// One gauge from the node's Prometheus endpoint.
fn metric(addr: &str, name: &str) -> Option<f64> {
    let text = client(addr)?
        .get(url(addr, "/metrics"))
        .send()
        .ok()?
        .text()
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn applied(addr: &str) -> Option<u64> {
    status(addr)?["last_applied"].as_u64()
}

/// Two more writes, applied everywhere: a node saves the committed index after flushing the
/// entries it receives, so the second write's flush makes the first commit index durable on
/// every node (the on-disk committed index is then at least the one before these writes).
fn sync_commit_index_to_disk(c: &Cluster, leader_addr: &str) {
    for i in 0..2 {
        write(leader_addr, schedule(&format!("sync-{i}"))).unwrap();
        let target = applied(leader_addr).unwrap();
        wait_for("every node applied", Duration::from_secs(10), || {
            c.nodes
                .iter()
                .all(|n| applied(&n.addr).is_some_and(|a| a >= target))
                .then_some(())
        });
    }
}

/// Stop every node and read each one's log from its sled directory.
fn stop_and_read_logs(c: &mut Cluster) -> Vec<(u64, support::store::DiskLog)> {
    for id in 1..=c.nodes.len() as u64 {
        c.node(id).kill();
    }
    c.nodes.iter().map(|n| (n.id, read_log(&n.data))).collect()
}

#[test]
fn cluster_minority_cannot_commit_and_majority_keeps_committing() {
    let proxies = ProxyNet::new();
    let mut c = Cluster::start_with(3, &[], Some(&proxies));
    let leader = wait_for("leader", Duration::from_secs(5), || c.leader());
    for i in 0..5 {
        write(
            &c.node(leader).addr.clone(),
            schedule(&format!("before-{i}")),
        )
        .unwrap();
    }
    // Cut the leader off from both followers (the network, not the processes).
    proxies.isolate(leader);
    let lone = c.node(leader).addr.clone();
    let lone_applied = applied(&lone).expect("old leader answers");
    let err = write(&lone, schedule("minority")).expect_err("a minority must not commit");
    assert!(
        err.contains("not committed") || err.contains("no quorum"),
        "unclear error: {err}"
    );
    assert_eq!(
        applied(&lone),
        Some(lone_applied),
        "the cut-off node applied something"
    );
    // Its log holds the uncommitted entry: the commit-index metric stays at the committed
    // index, behind the last log index.
    let (commit, last_log) = wait_for(
        "metrics of the cut-off node",
        Duration::from_secs(5),
        || {
            let commit = metric(&lone, "tern_raft_commit_index")?;
            let last_log = metric(&lone, "tern_raft_last_log_index")?;
            (last_log > commit).then_some((commit, last_log))
        },
    );
    assert_eq!(commit, lone_applied as f64, "last log {last_log}");
    // The majority elects a leader among itself and keeps committing.
    let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    let majority = c.node(followers[0]).addr.clone();
    wait_for("majority commit", Duration::from_secs(10), || {
        write(&majority, schedule("majority-0")).ok()
    });
    for i in 1..10 {
        write(&majority, schedule(&format!("majority-{i}"))).unwrap();
    }
    let new_leader = wait_for("new leader", Duration::from_secs(5), || {
        let s = status(&majority)?;
        s["leader"].as_u64().filter(|&l| l != leader)
    });
    assert!(followers.contains(&new_leader));
    assert_eq!(applied(&lone), Some(lone_applied));
    // Heal: the old leader steps down and converges to the majority's log.
    proxies.heal_all();
    let leader_addr = c.node(new_leader).addr.clone();
    wait_for("old leader converges", Duration::from_secs(10), || {
        let s = status(&lone)?;
        let l = status(&leader_addr)?;
        (s["leader"] == json!(new_leader)
            && s["state"] == json!("follower")
            && s["last_log_index"] == l["last_log_index"]
            && s["last_applied"] == l["last_applied"])
            .then_some(())
    });
    let have = c.schedules(&majority);
    for i in 0..10 {
        assert!(have.contains(&format!("majority-{i}")));
    }
    assert!(
        !have.contains(&"minority".to_string()),
        "the minority write must never commit"
    );
    // On disk: every node holds the same committed log, and the minority entry is gone.
    sync_commit_index_to_disk(&c, &leader_addr);
    let logs = stop_and_read_logs(&mut c);
    let upto = assert_committed_prefix_agrees(&logs);
    assert!(
        upto >= lone_applied + 10,
        "committed prefix too short: {upto}"
    );
    for (id, log) in &logs {
        assert!(
            !log.entries.values().any(|e| e.contains("\"minority\"")),
            "node {id} still holds the minority entry"
        );
        assert!(log.committed_contains("\"majority-9\""), "node {id}");
    }
}

#[test]
fn cluster_five_nodes_restarted_node_catches_up_from_its_own_data() {
    let mut c = Cluster::start(5, &[]);
    let leader = wait_for("leader", Duration::from_secs(5), || c.leader());
    let leader_addr = c.node(leader).addr.clone();
    for i in 0..10 {
        write(&leader_addr, schedule(&format!("early-{i}"))).unwrap();
    }
    let victim = (1..=5).find(|&id| id != leader).unwrap();
    let victim_addr = c.node(victim).addr.clone();
    wait_for(
        "victim applied the early writes",
        Duration::from_secs(5),
        || (applied(&victim_addr)? == applied(&leader_addr)?).then_some(()),
    );
    c.node(victim).kill();
    // What the victim holds on disk when it comes back: the early writes.
    let before = read_log(&c.node(victim).data);
    assert!(before.entries.values().any(|e| e.contains("\"early-9\"")));
    let held = *before.entries.keys().last().unwrap();
    // Four of five keep committing while it is down.
    for i in 0..30 {
        write(&leader_addr, schedule(&format!("late-{i}"))).unwrap();
    }
    c.node(victim).start(None);
    wait_for("restarted node catches up", Duration::from_secs(15), || {
        let s = status(&victim_addr)?;
        let l = status(&leader_addr)?;
        (s["leader"] == json!(leader)
            && s["last_applied"] == l["last_applied"]
            && s["last_log_index"] == l["last_log_index"])
            .then_some(())
    });
    // It caught up by log replication on top of its own data, not a snapshot.
    assert_eq!(status(&victim_addr).unwrap()["snapshot_index"], Value::Null);
    sync_commit_index_to_disk(&c, &leader_addr);
    let logs = stop_and_read_logs(&mut c);
    let upto = assert_committed_prefix_agrees(&logs);
    assert!(upto > held + 30, "committed {upto}, held {held}");
    let (_, victim_log) = logs.iter().find(|(id, _)| *id == victim).unwrap();
    assert!(victim_log.committed_contains("\"late-29\""));
    assert_eq!(
        before.entries.get(&held),
        victim_log.entries.get(&held),
        "the entries it held before the restart were kept"
    );
}
