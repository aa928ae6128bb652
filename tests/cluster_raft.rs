//! End-to-end Raft tests: real `tern node` processes on loopback with sled data dirs.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Node {
    id: u64,
    addr: String,
    data: std::path::PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
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

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

fn status(addr: &str) -> Option<Value> {
    client()
        .get(format!("http://{addr}/v1/status"))
        .send()
        .ok()?
        .json()
        .ok()
}

fn write(addr: &str, body: Value) -> Result<Value, String> {
    let resp = client()
        .post(format!("http://{addr}/v1/write"))
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

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    fn start(n: u64, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = net();
        let mut nodes: Vec<Node> = (1..=n)
            .map(|id| Node {
                id,
                addr: format!("127.{a}.{b}.{id}:7400"),
                data: dir.path().join(format!("n{id}")),
                child: None,
                extra: extra.iter().map(|s| s.to_string()).collect(),
            })
            .collect();
        nodes[0].start(None);
        let seed = nodes[0].addr.clone();
        wait_for("bootstrap leader", Duration::from_secs(10), || {
            status(&seed)
                .filter(|s| s["leader"] == json!(1))
                .map(|_| ())
        });
        for node in nodes.iter_mut().skip(1) {
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

    fn leader(&self) -> Option<u64> {
        let mut leader = None;
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let s = status(&n.addr)?;
            if s["state"] == json!("leader") {
                leader = s["id"].as_u64();
            }
        }
        leader
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
        let v: Value = client()
            .get(format!("http://{addr}/v1/state"))
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
            let h: Vec<Value> = client()
                .get(format!("http://{follower}/v1/hosts"))
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
        let resp = client()
            .post(format!("http://{addr}{path}"))
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

fn signal(node: &Node, sig: &str) {
    let pid = node.child.as_ref().expect("running").id().to_string();
    let ok = Command::new("kill")
        .args([sig, &pid])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[test]
fn cluster_minority_cannot_commit_and_majority_keeps_committing() {
    let mut c = Cluster::start(3, &[]);
    let leader = wait_for("leader", Duration::from_secs(5), || c.leader());
    // Freeze both followers (SIGSTOP): the leader is now a minority of one.
    let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    for &f in &followers {
        signal(c.node(f), "-STOP");
    }
    let lone = c.node(leader).addr.clone();
    assert!(
        write(&lone, schedule("minority")).is_err(),
        "a minority must not commit"
    );
    // Thaw the followers and freeze the old leader: the majority elects and commits.
    for &f in &followers {
        signal(c.node(f), "-CONT");
    }
    signal(c.node(leader), "-STOP");
    let majority = c.node(followers[0]).addr.clone();
    wait_for("majority commit", Duration::from_secs(5), || {
        write(&majority, schedule("majority")).ok()
    });
    signal(c.node(leader), "-CONT");
    let have = c.schedules(&majority);
    assert!(have.contains(&"majority".to_string()));
    assert!(
        !have.contains(&"minority".to_string()),
        "the minority write must never commit"
    );
}
