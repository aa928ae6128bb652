//! Shared harness for the cluster tests: real `tern node` processes on a private loopback
//! /24, a shared datastore directory, and the `tern` CLI.
#![allow(dead_code)]
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::proxy::ProxyNet;
#[allow(unused_imports)] // not every test crate needs all of them
pub use crate::support::{api, kvm_or_skip, wait_for};

pub struct Node {
    pub id: u64,
    pub addr: String,
    pub data: std::path::PathBuf,
    pub child: Option<Child>,
    /// The address peers use (its proxy), when the cluster is partitionable.
    pub advertise: Option<String>,
}

impl Node {
    /// kill -9: no shutdown path runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A host crash: kill -9 of the node and of every VMM it runs.
    pub fn crash(&mut self) {
        self.kill();
        crate::support::kill_vmms(&self.data);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.crash();
    }
}

impl Drop for Cluster {
    /// Kill the nodes and their VMMs, then remove the pool cgroups their VMs left behind.
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.crash();
        }
        std::thread::sleep(Duration::from_millis(200));
        tern_node::cgroup::sweep_empty();
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub datastore: std::path::PathBuf,
    pub extra: Vec<String>,
    pub dir: tempfile::TempDir,
    /// Proxies in front of every node's peer address (see `start_partitionable`).
    pub proxies: Option<ProxyNet>,
    /// What joining nodes present (minted once the bootstrap node leads).
    pub join_token: Option<String>,
}

/// A random 127.a.b.0/24 network per test so concurrent runs never share ports.
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

/// An admin client for `addr`'s cluster (TLS with the cluster CA pinned, bearer token).
pub fn client(addr: &str) -> Option<reqwest::blocking::Client> {
    api::client(addr, Duration::from_secs(5))
}

pub fn get(addr: &str, path: &str) -> Option<Value> {
    let resp = client(addr)?.get(api::url(addr, path)).send().ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().ok()
}

/// POST, returning (status, body).
pub fn post(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    let resp = client(addr)
        .expect("the cluster's admin config")
        .post(api::url(addr, path))
        .json(body)
        .send()
        .expect("post");
    let status = resp.status().as_u16();
    let text = resp.text().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

impl Cluster {
    pub fn start(n: u64, extra: &[&str]) -> Cluster {
        Self::start_with(n, extra, false)
    }

    /// Every node advertises a proxy on its own IP, so the test can cut the links between
    /// nodes (Raft and API traffic); migration streams connect directly, like a separate
    /// migration network.
    pub fn start_partitionable(n: u64, extra: &[&str]) -> Cluster {
        Self::start_with(n, extra, true)
    }

    pub fn proxies(&self) -> &ProxyNet {
        self.proxies.as_ref().expect("a partitionable cluster")
    }

    fn start_with(n: u64, extra: &[&str], partitionable: bool) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let proxies = partitionable.then(ProxyNet::new);
        let (a, b) = net();
        let datastore = dir.path().join("datastore");
        let nodes: Vec<Node> = (1..=n)
            .map(|id| {
                let addr: std::net::SocketAddr = format!("127.{a}.{b}.{id}:7400").parse().unwrap();
                let advertise = proxies
                    .as_ref()
                    .map(|p| p.add_node(id, addr.ip(), addr.ip(), addr).to_string());
                Node {
                    id,
                    addr: addr.to_string(),
                    data: dir.path().join(format!("n{id}")),
                    child: None,
                    advertise,
                }
            })
            .collect();
        let mut c = Cluster {
            nodes,
            datastore,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir,
            proxies,
            join_token: None,
        };
        let addrs: Vec<String> = c.nodes.iter().map(|n| n.addr.clone()).collect();
        api::register(&c.nodes[0].data, &addrs);
        c.start_node(1, None);
        let seed = c.addr(1);
        wait_for("bootstrap leader", Duration::from_secs(10), || {
            get(&seed, "/v1/status")
                .filter(|s| s["leader"] == json!(1))
                .map(|_| ())
        });
        if n > 1 {
            c.join_token = Some(api::join_token(&seed));
        }
        for id in 2..=n {
            c.start_node(id, Some(&seed));
        }
        wait_for("all hosts registered", Duration::from_secs(20), || {
            let s = get(&seed, "/v1/state")?;
            (s["hosts"].as_object()?.len() == n as usize).then_some(())
        });
        c
    }

    pub fn start_node(&mut self, id: u64, join: Option<&str>) {
        let (addr, data, advertise) = {
            let n = &self.nodes[(id - 1) as usize];
            (n.addr.clone(), n.data.clone(), n.advertise.clone())
        };
        let log = std::fs::File::create(self.dir.path().join(format!("n{id}.log"))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern"));
        cmd.args(["node", "--id", &id.to_string(), "--listen", &addr]);
        cmd.arg("--data").arg(&data);
        cmd.arg("--datastore").arg(&self.datastore);
        if let Some(a) = &advertise {
            cmd.args(["--advertise", a]);
        }
        match join {
            Some(seed) => cmd.args(["--join", seed]),
            None => cmd.arg("--bootstrap"),
        };
        if let Some(t) = &self.join_token {
            cmd.args(["--join-token", t]);
        }
        cmd.args(&self.extra)
            // The bootstrap node writes its admin config here, not into the user's home.
            .env("TERN_CONFIG", api::config_path(&addr))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        self.nodes[(id - 1) as usize].child = Some(cmd.spawn().expect("spawn tern node"));
    }

    pub fn node(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    pub fn addr(&self, id: u64) -> String {
        self.nodes[(id - 1) as usize].addr.clone()
    }

    /// The address of a live node.
    pub fn live(&self) -> String {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .unwrap()
            .addr
            .clone()
    }

    pub fn state(&self) -> Value {
        wait_for("state", Duration::from_secs(10), || {
            get(&self.live(), "/v1/state")
        })
    }

    /// `tern ARGS` against a live node; panics with its output unless it succeeds.
    pub fn tern_ok(&self, args: &[&str]) -> String {
        self.tern_ok_at(&self.live(), args)
    }

    pub fn tern_ok_at(&self, server: &str, args: &[&str]) -> String {
        let (ok, out, err) = self.tern_at(server, args);
        assert!(ok, "tern {args:?} failed:\n{out}\n{err}\n{}", self.logs());
        out
    }

    /// `tern ARGS` with an operator token (`TERN_TOKEN`); panics unless it succeeds.
    pub fn tern_as(&self, token: &str, args: &[&str]) -> String {
        self.tern_as_at(&self.live(), token, args)
    }

    pub fn tern_as_at(&self, server: &str, token: &str, args: &[&str]) -> String {
        let (ok, out, err) = self.tern_with(server, Some(token), args);
        assert!(ok, "tern {args:?} failed:\n{out}\n{err}\n{}", self.logs());
        out
    }

    /// A new API token named `name` with `role`; returns its secret.
    pub fn token(&self, name: &str, role: &str) -> String {
        let out = self.tern_ok(&["token", "create", name, "--role", role, "--json"]);
        let v: Value = serde_json::from_str(&out).expect("token json");
        v["token"].as_str().expect("secret").to_string()
    }

    pub fn tern_at(&self, server: &str, args: &[&str]) -> (bool, String, String) {
        self.tern_with(server, None, args)
    }

    /// `tern ARGS` against `server` as admin, or with `token` instead.
    fn tern_with(
        &self,
        server: &str,
        token: Option<&str>,
        args: &[&str],
    ) -> (bool, String, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern"));
        if let Some(t) = token {
            cmd.env("TERN_TOKEN", t);
        } else {
            cmd.env_remove("TERN_TOKEN");
        }
        let out = cmd
            .args(args)
            .env("TERN_SERVER", server)
            .env("TERN_CONFIG", api::config_path(server))
            .env_remove("TERN_CA")
            .env_remove("TERN_USER")
            .output()
            .expect("run tern");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The guest status of `vm` as node `id` reports it, if it runs there.
    pub fn guest(&self, vm: &str, id: u64) -> Option<Value> {
        self.nodes[(id - 1) as usize].child.as_ref()?;
        get(&self.addr(id), &format!("/v1/vms/{vm}/guest"))
    }

    /// Wait until `vm` runs on node `id` and its guest has written and verified pages.
    pub fn wait_guest_progress(&self, vm: &str, id: u64) -> Value {
        let first = wait_for(
            &format!("{vm} running on {id}"),
            Duration::from_secs(30),
            || {
                self.guest(vm, id)
                    .filter(|g| g["status"]["pages_written"].as_u64() > Some(0))
            },
        );
        let v0 = first["status"]["pages_verified"].as_u64();
        wait_for(
            &format!("{vm} verifying on {id}"),
            Duration::from_secs(30),
            || {
                self.guest(vm, id)
                    .filter(|g| g["status"]["pages_verified"].as_u64() > v0)
            },
        )
    }

    /// The last lines of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(self.dir.path().join(format!("n{}.log", n.id)))
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            out += &format!("--- node {} ---\n{}\n", n.id, tail.join("\n"));
        }
        out
    }
}

impl Cluster {
    /// Commit a raw command through any live node.
    pub fn write(&self, command: Value) -> Value {
        let (status, body) = post(&self.live(), "/v1/write", &json!({ "command": command }));
        assert_eq!(status, 200, "write {command}: {body}");
        body
    }

    /// Create a small VM on host `host` and wait until its guest verifies pages.
    pub fn create_vm(&self, name: &str, host: u64, workload: &str) {
        self.tern_ok(&[
            "vm",
            "create",
            name,
            "--memory",
            "64M",
            "--workload",
            workload,
            "--host",
            &host.to_string(),
        ]);
        self.wait_guest_progress(name, host);
    }

    /// The tasks in the committed state.
    pub fn tasks(&self) -> Vec<Value> {
        self.state()["tasks"]
            .as_object()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Wait until every task is final.
    pub fn wait_tasks_idle(&self, timeout: Duration) -> Vec<Value> {
        wait_for("tasks to finish", timeout, || {
            let t = self.tasks();
            t.iter()
                .all(|t| !matches!(t["state"].as_str(), Some("queued" | "running")))
                .then_some(t)
        })
    }

    /// Every VM is held (running) by exactly one node, its owner, and verifies cleanly.
    pub fn assert_single_owners(&self) {
        let state = self.state();
        let vms = state["vms"].as_object().cloned().unwrap_or_default();
        for (name, vm) in vms {
            let owner = vm["owner"].as_u64().unwrap();
            let holders: Vec<u64> = self
                .nodes
                .iter()
                .filter(|n| n.child.is_some())
                .filter(|n| {
                    get(&n.addr, "/v1/local").is_some_and(|l| {
                        l.as_array()
                            .unwrap()
                            .iter()
                            .any(|x| x["name"] == json!(name) && x["running"] == json!(true))
                    })
                })
                .map(|n| n.id)
                .collect();
            assert_eq!(
                holders,
                vec![owner],
                "{name} owned by {owner}\n{}",
                self.logs()
            );
            // A guest that just booted or resumed may not have published its status yet.
            let g = wait_for(
                &format!("{name} guest status"),
                Duration::from_secs(15),
                || self.guest(&name, owner),
            );
            assert_eq!(g["status"]["mismatches"], json!(0), "{name}");
        }
    }
}
