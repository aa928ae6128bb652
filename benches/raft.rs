//! Consensus benchmark: 3 `tern node` processes (this build's binary) on loopback, driven by a
//! keep-alive HTTP load generator. Prints commit latency p50/p99 at a paced 100 writes/s,
//! sustained throughput with N concurrent writers, failover time (kill -9 of the leader until
//! the first new commit), and the same load against nodes started with `--no-fsync` as the
//! peer that shows what the disk flush costs, plus the raw sled flush time on this disk.
//!
//! Run: `cargo bench -p tern --bench raft` (a release build). Environment knobs:
//! `RAFT_BENCH_PACED_SECS` (default 10), `RAFT_BENCH_LOAD_SECS` per concurrency (default 4),
//! `RAFT_BENCH_FAILOVERS` (default 5), `RAFT_BENCH_DIR` (data directories; default a temp dir:
//! put it on the disk you want to measure), `RAFT_BENCH_NICE` (niceness of nodes and load
//! generator, e.g. -10 on a shared machine; see `nice()`).
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tern_node::client::{admin_config_path, url, OperatorConfig};
use tern_node::pki::operator_client_config;

const WRITE: &str = r#"{"command":{"op":"noop"}}"#;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `RAFT_BENCH_NICE`: the scheduling niceness for the nodes and the load generator (e.g. -10,
/// as root), so that other work on a shared machine does not preempt them: it approximates
/// hosts dedicated to the cluster. Unset: the default niceness.
fn nice() -> Option<String> {
    std::env::var("RAFT_BENCH_NICE")
        .ok()
        .filter(|n| !n.is_empty())
}

struct Node {
    id: u64,
    addr: String,
    data: std::path::PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
    join_token: Option<String>,
}

impl Node {
    fn start(&mut self, join: Option<&str>) {
        let mut cmd = match nice() {
            Some(n) => {
                let mut c = Command::new("nice");
                c.args(["-n", &n, env!("CARGO_BIN_EXE_tern")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_tern")),
        };
        cmd.args(["node", "--id", &self.id.to_string(), "--listen", &self.addr]);
        cmd.arg("--data").arg(&self.data);
        match join {
            Some(seed) => cmd.args(["--join", seed]),
            None => cmd.arg("--bootstrap"),
        };
        if let Some(t) = &self.join_token {
            cmd.args(["--join-token", t]);
        }
        // The bootstrap node writes its admin config into its data dir, not the user's home.
        cmd.env("TERN_CONFIG", admin_config_path(&self.data));
        cmd.args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(cmd.spawn().expect("spawn tern node"));
    }

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
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// A keep-alive HTTPS client with the cluster CA pinned and the admin token the bootstrap node
/// wrote (waits until it exists).
async fn admin_client(bootstrap_data: &std::path::Path) -> reqwest::Client {
    let path = admin_config_path(bootstrap_data);
    let cfg = wait_for("the admin config", Duration::from_secs(10), || {
        let path = path.clone();
        async move { OperatorConfig::read(&path).ok() }
    })
    .await;
    let tls = operator_client_config(cfg.ca.as_deref().expect("ca")).expect("tls");
    let mut headers = reqwest::header::HeaderMap::new();
    let token = cfg.token.expect("token");
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .default_headers(headers)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(256)
        .build()
        .expect("http client")
}

async fn get_json(http: &reqwest::Client, addr: &str, path: &str) -> Option<Value> {
    let r = http
        .get(url(addr, path))
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

/// One write; Ok(()) only when the node answered 200 (committed and applied).
async fn write(http: &reqwest::Client, addr: &str, timeout: Duration) -> Result<(), String> {
    let r = http
        .post(url(addr, "/v1/write"))
        .header("content-type", "application/json")
        .body(WRITE)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let body = r.bytes().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{status}: {}", String::from_utf8_lossy(&body)))
    }
}

async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Cluster {
    async fn start(extra: &[&str]) -> Cluster {
        let dir = match std::env::var("RAFT_BENCH_DIR") {
            Ok(d) => tempfile::tempdir_in(d).expect("temp dir in RAFT_BENCH_DIR"),
            Err(_) => tempfile::tempdir().expect("temp dir"),
        };
        let seed = std::process::id() as u64 ^ u64::from(Instant::now().elapsed().subsec_nanos());
        let (a, b) = (seed % 200 + 30, (seed / 200) % 200 + 30);
        let mut nodes: Vec<Node> = (1..=3)
            .map(|id| Node {
                id,
                addr: format!("127.{a}.{b}.{id}:7400"),
                data: dir.path().join(format!("n{id}")),
                extra: extra.iter().map(|s| s.to_string()).collect(),
                child: None,
                join_token: None,
            })
            .collect();
        nodes[0].start(None);
        let http = admin_client(&nodes[0].data).await;
        let first = nodes[0].addr.clone();
        wait_for("bootstrap", Duration::from_secs(10), || {
            let (http, first) = (http.clone(), first.clone());
            async move {
                let s = get_json(&http, &first, "/v1/status").await?;
                (s["leader"] == json!(1)).then_some(())
            }
        })
        .await;
        let token = wait_for("a join token", Duration::from_secs(10), || {
            let (http, first) = (http.clone(), first.clone());
            async move {
                let r = http
                    .post(url(&first, "/v1/cluster/join-token"))
                    .json(&json!({ "ttl_s": 3600 }))
                    .send()
                    .await
                    .ok()?;
                let v: Value = r.json().await.ok()?;
                v["token"].as_str().map(str::to_string)
            }
        })
        .await;
        for n in nodes.iter_mut().skip(1) {
            n.join_token = Some(token.clone());
            n.start(Some(&first));
        }
        let c = Cluster {
            nodes,
            http,
            _dir: dir,
        };
        wait_for("3 voters", Duration::from_secs(20), || async {
            let s = get_json(&c.http, &first, "/v1/status").await?;
            let voters = s["members"]
                .as_array()?
                .iter()
                .filter(|m| m["voter"] == json!(true))
                .count();
            (voters == 3).then_some(())
        })
        .await;
        // Let the join and host registrations settle.
        tokio::time::sleep(Duration::from_millis(500)).await;
        c
    }

    /// The live node in state leader with the highest term. A restarted old leader briefly
    /// reports itself leader of its old term (openraft restores that state on startup) until it
    /// hears from the current one, so the highest term decides.
    async fn leader(&self) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        for (i, n) in self.nodes.iter().enumerate() {
            if n.child.is_none() {
                continue;
            }
            let s = get_json(&self.http, &n.addr, "/v1/status").await?;
            let term = s["term"].as_u64()?;
            if s["state"] == json!("leader") && best.is_none_or(|(t, _)| term > t) {
                best = Some((term, i));
            }
        }
        best.map(|(_, i)| i)
    }

    async fn applied(&self, i: usize) -> Option<u64> {
        get_json(&self.http, &self.nodes[i].addr, "/v1/status").await?["last_applied"].as_u64()
    }
}

/// The leader's `tern_raft_write_seconds` (time inside `client_write`: append, replicate, fsync
/// on a majority, apply) as (sum in seconds, count): the difference between two scrapes gives
/// the mean server-side commit time of the writes in between.
async fn server_side(http: &reqwest::Client, addr: &str) -> Option<(f64, f64)> {
    let text = http
        .get(url(addr, "/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    Some((
        value("tern_raft_write_seconds_sum")?,
        value("tern_raft_write_seconds_count")?,
    ))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn mean(v: &[Duration]) -> Duration {
    v.iter().sum::<Duration>() / (v.len().max(1) as u32)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Latency {
    mean: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    errors: usize,
    n: usize,
}

/// Open-loop: write i is sent at start + i x 10 ms whether or not earlier ones finished.
/// With `status_only`, the request is `GET /v1/status` instead (no Raft round): the control
/// that shows what HTTP and scheduling on this machine cost by themselves.
async fn paced(c: &Cluster, addr: &str, rate: u64, secs: u64, status_only: bool) -> Latency {
    let total = rate * secs;
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let at = start + period * i as u32;
        tokio::time::sleep_until(at).await;
        let (http, addr) = (c.http.clone(), addr.to_string());
        tasks.push(tokio::spawn(async move {
            // From the moment the request is issued: tokio's timer wakes a sleeper up to 1 ms
            // late, which is the generator's lateness, not the cluster's. The writes are
            // independent tasks, so a slow answer never delays the next send (open loop).
            let sent = tokio::time::Instant::now();
            let ok = if status_only {
                get_json(&http, &addr, "/v1/status").await.is_some()
            } else {
                write(&http, &addr, Duration::from_secs(10)).await.is_ok()
            };
            (ok, sent.elapsed())
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok((true, d)) => lat.push(d),
            _ => errors += 1,
        }
    }
    lat.sort();
    Latency {
        mean: mean(&lat),
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        max: lat.last().copied().unwrap_or_default(),
        errors,
        n: total as usize,
    }
}

/// Closed-loop: `writers` clients each write back to back for `secs`.
async fn sustained(c: &Cluster, addr: &str, writers: usize, secs: u64) -> (f64, Latency) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let (http, addr, errors) = (c.http.clone(), addr.to_string(), errors.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match write(&http, &addr, Duration::from_secs(10)).await {
                        Ok(()) => lat.push(t.elapsed()),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap_or_default());
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort();
    let n = lat.len();
    (
        n as f64 / elapsed,
        Latency {
            mean: mean(&lat),
            p50: percentile(&lat, 0.50),
            p99: percentile(&lat, 0.99),
            max: lat.last().copied().unwrap_or_default(),
            errors: errors.load(Ordering::Relaxed) as usize,
            n,
        },
    )
}

/// kill -9 the leader; time until a write to a survivor commits. Then restart the killed node
/// and wait until it has caught up, for the next round.
async fn failover(c: &mut Cluster) -> Duration {
    let leader = wait_for("leader", Duration::from_secs(10), || c.leader()).await;
    let survivors: Vec<String> = (0..3)
        .filter(|&i| i != leader)
        .map(|i| c.nodes[i].addr.clone())
        .collect();
    c.nodes[leader].kill();
    let killed = Instant::now();
    let mut k = 0;
    loop {
        let addr = &survivors[k % 2];
        k += 1;
        if write(&c.http, addr, Duration::from_millis(500))
            .await
            .is_ok()
        {
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "no failover");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = killed.elapsed();
    c.nodes[leader].start(None);
    let new_leader = wait_for("new leader", Duration::from_secs(10), || c.leader()).await;
    wait_for(
        "restarted node catches up",
        Duration::from_secs(20),
        || async {
            let s = get_json(&c.http, &c.nodes[leader].addr, "/v1/status").await?;
            let theirs = c.applied(new_leader).await?;
            (s["state"] == json!("follower")
                && s["leader"] == json!(new_leader + 1)
                && s["last_applied"].as_u64()? == theirs)
                .then_some(())
        },
    )
    .await;
    took
}

/// The disk's floor: a small sled insert + flush, as one log append does.
async fn sled_flush(samples: usize) -> (Duration, Duration) {
    let dir = match std::env::var("RAFT_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).expect("temp dir"),
        Err(_) => tempfile::tempdir().expect("temp dir"),
    };
    let db = tern_consensus::store::open_db(&dir.path().join("flush.sled")).expect("sled");
    let tree = db.open_tree("t").expect("tree");
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples as u64 {
        let t = Instant::now();
        tree.insert(i.to_be_bytes(), vec![7u8; 300])
            .expect("insert");
        db.flush_async().await.expect("flush");
        lat.push(t.elapsed());
    }
    lat.sort();
    (percentile(&lat, 0.5), percentile(&lat, 0.99))
}

fn print_latency(label: &str, l: &Latency) {
    println!(
        "{label}: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} writes, {} errors)",
        ms(l.p50),
        ms(l.p99),
        ms(l.max),
        l.n,
        l.errors
    );
}

async fn run() {
    let paced_secs = env_u64("RAFT_BENCH_PACED_SECS", 10);
    let load_secs = env_u64("RAFT_BENCH_LOAD_SECS", 4);
    let failovers = env_u64("RAFT_BENCH_FAILOVERS", 5) as usize;
    let (f50, f99) = sled_flush(300).await;
    println!(
        "sled insert+flush on this disk: p50 {:.2} ms  p99 {:.2} ms",
        ms(f50),
        ms(f99)
    );

    let mut results = Vec::new();
    for (mode, extra) in [("durable", &[][..]), ("no-fsync", &["--no-fsync"][..])] {
        let mut c = Cluster::start(extra).await;
        let leader = wait_for("leader", Duration::from_secs(10), || c.leader()).await;
        let leader_addr = c.nodes[leader].addr.clone();
        let follower_addr = c.nodes[(leader + 1) % 3].addr.clone();
        println!("== {mode}: 3 nodes, leader is node {}", leader + 1);
        let before = server_side(&c.http, &leader_addr).await;
        let to_leader = paced(&c, &leader_addr, 100, paced_secs, false).await;
        print_latency("  paced 100 writes/s to the leader", &to_leader);
        if let (Some((s0, n0)), Some((s1, n1))) = (before, server_side(&c.http, &leader_addr).await)
        {
            println!(
                "    mean end to end {:.2} ms, of which inside Raft on the leader (client_write) {:.2} ms",
                ms(to_leader.mean),
                (s1 - s0) / (n1 - n0).max(1.0) * 1000.0
            );
        }
        let via_follower = paced(&c, &follower_addr, 100, paced_secs.min(5), false).await;
        print_latency("  paced 100 writes/s via a follower", &via_follower);
        let control = paced(&c, &leader_addr, 100, paced_secs.min(5), true).await;
        print_latency("  control: paced 100 GET /v1/status/s (no Raft)", &control);
        for writers in [1usize, 8, 32, 128] {
            let (tput, l) = sustained(&c, &leader_addr, writers, load_secs).await;
            println!(
                "  {writers:>3} concurrent writers: {tput:>7.0} writes/s  p50 {:.2} ms  p99 {:.2} ms  ({} errors)",
                ms(l.p50),
                ms(l.p99),
                l.errors
            );
        }
        // The state is bigger now (the audit trail holds its maximum): latency must not grow
        // with it.
        let after_load = paced(&c, &leader_addr, 100, paced_secs.min(5), false).await;
        print_latency("  paced 100 writes/s after the load", &after_load);
        if mode == "durable" {
            let mut times = Vec::new();
            for _ in 0..failovers {
                times.push(failover(&mut c).await);
            }
            let list: Vec<String> = times.iter().map(|t| format!("{:.0}", ms(*t))).collect();
            times.sort();
            println!(
                "  failover (kill -9 of the leader until the first new commit), {} runs: median {:.0} ms  max {:.0} ms  [{}]",
                times.len(),
                ms(percentile(&times, 0.5)),
                ms(times.last().copied().unwrap_or_default()),
                list.join(", ")
            );
        }
        results.push((mode, to_leader));
    }
    if let [(_, durable), (_, nofsync)] = &results[..] {
        println!(
            "durable / no-fsync at 100 writes/s: p50 x{:.2}  p99 x{:.2}",
            durable.p50.as_secs_f64() / nofsync.p50.as_secs_f64().max(1e-9),
            durable.p99.as_secs_f64() / nofsync.p99.as_secs_f64().max(1e-9)
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average after the run: {}", load.trim());
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run only for bench.
    if !std::env::args().any(|a| a == "--bench") {
        println!("raft bench: run with `cargo bench -p tern --bench raft`");
        return;
    }
    if let Some(n) = nice() {
        // Before the runtime starts: its threads inherit the main thread's niceness.
        let pid = std::process::id().to_string();
        let ok = Command::new("renice")
            .args(["-n", &n, "-p", &pid])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "renice -n {n} failed (negative values need root)");
        println!("nodes and load generator run at niceness {n}");
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(run());
}
