//! `tern demo`: a three-node cluster on this machine, narrated. Real node processes, real VMs
//! on KVM, real live migrations: DRS rebalancing, an operator's high-priority migration, a
//! scheduled migration, a maintenance-mode evacuation and the audit trail, then checks that
//! every guest verified its memory and its disk blocks with zero mismatches and no VM ever ran on two hosts.
use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use tern_consensus::state::{HostState, MigrationTask, TaskState};
use tern_consensus::ClusterState;

use super::cluster::{get, post};

#[derive(Args)]
pub struct DemoArgs {
    /// Print one JSON summary instead of the narration.
    #[arg(long)]
    json: bool,
    /// Leave the cluster running at the end and print how to talk to it.
    #[arg(long)]
    keep: bool,
    /// Number of VMs to create on the first host.
    #[arg(long, default_value_t = 9)]
    vms: usize,
    /// Memory of each VM in MiB.
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
}

struct Nodes {
    children: Vec<Child>,
    /// Each node's data directory (its VMMs' run directories are under it).
    data: Vec<std::path::PathBuf>,
    keep: bool,
}

impl Drop for Nodes {
    /// Stop the nodes, then the VMMs they ran (which outlive their node by design).
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let exe = std::env::current_exe().unwrap_or_default();
        for data in &self.data {
            let vmms = tern_node::supervisor::Supervisor::new(data, exe.clone(), 0);
            for s in vmms.adopt_all() {
                let _ = vmms.stop(&s.name);
            }
        }
    }
}

#[derive(Serialize, Default)]
struct Summary {
    ok: bool,
    vms: usize,
    migrations: usize,
    failed: usize,
    by_reason: BTreeMap<String, usize>,
    max_downtime_ms: f64,
    mean_downtime_ms: f64,
    imbalance_before: f64,
    imbalance_after: f64,
    /// VMs on the first host before DRS ran, and after it settled.
    first_host_vms_before: usize,
    first_host_vms_after_drs: usize,
    guests_verified_pages: u64,
    guest_mismatches: u64,
    /// Disk blocks the guests verified, and mismatches or I/O errors they saw.
    guests_verified_blocks: u64,
    guest_disk_mismatches: u64,
    guest_disk_io_errors: u64,
    double_runs: u64,
    seconds: f64,
    problems: Vec<String>,
}

struct Narrator {
    json: bool,
    start: Instant,
}

impl Narrator {
    fn say(&self, msg: impl AsRef<str>) {
        if !self.json {
            println!(
                "[{:5.1}s] {}",
                self.start.elapsed().as_secs_f64(),
                msg.as_ref()
            );
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn wait<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn state(server: &str) -> Option<ClusterState> {
    get::<ClusterState>(server, "/v1/state")
        .ok()
        .map(|(s, _)| s)
}

#[derive(serde::Deserialize, Clone)]
struct Local {
    name: String,
    epoch: u64,
    running: bool,
}

fn local(addr: &str) -> Option<Vec<Local>> {
    get::<Vec<Local>>(addr, "/v1/local").ok().map(|(v, _)| v)
}

/// Polls every node's local VMs and counts proven double runs: node A runs a VM at epoch e,
/// then node B runs it, then A still runs it at epoch e (so A ran throughout B's run).
fn watch_double_runs(addrs: Vec<String>, stop: Arc<AtomicBool>, count: Arc<AtomicU64>) {
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let first: Vec<Option<Vec<Local>>> = addrs.iter().map(|a| local(a)).collect();
            for (i, a) in first.iter().enumerate() {
                let Some(a) = a else { continue };
                for vm in a.iter().filter(|v| v.running) {
                    let elsewhere = first.iter().enumerate().skip(i + 1).any(|(_, b)| {
                        b.as_ref()
                            .is_some_and(|b| b.iter().any(|x| x.name == vm.name && x.running))
                    });
                    if !elsewhere {
                        continue;
                    }
                    let again = local(&addrs[i]).unwrap_or_default();
                    if again
                        .iter()
                        .any(|x| x.name == vm.name && x.running && x.epoch == vm.epoch)
                    {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

/// Every guest also writes, flushes and re-verifies blocks of its disk on the datastore.
const DEMO_DISK: &str = "disk=8M,iops=200,dflush=4";

const WORKLOADS: [&str; 9] = [
    "wss=16M,rate=4000,pattern=random,duty=40",
    "wss=32M,rate=8000,pattern=hotcold,duty=30",
    "wss=8M,rate=1000,pattern=seq,duty=10",
    "wss=24M,rate=6000,pattern=random,duty=50",
    "wss=16M,rate=2000,pattern=seq,duty=20",
    "wss=32M,rate=3000,pattern=hotcold,duty=35",
    "wss=8M,rate=500,pattern=random,duty=15",
    "wss=16M,rate=5000,pattern=random,duty=25",
    "wss=24M,rate=2500,pattern=seq,duty=45",
];

fn task_line(t: &MigrationTask) -> String {
    format!(
        "task {} {} host {} -> {} [{}] {:?}: downtime {:.1} ms, total {:.2} s, {} MiB{}",
        t.id,
        t.vm,
        t.from,
        t.to,
        t.reason,
        t.state,
        t.stats.downtime_us as f64 / 1000.0,
        t.stats.total_ms as f64 / 1000.0,
        t.stats.bytes >> 20,
        t.error
            .as_ref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    )
}

/// Wait until every task matching `pick` is final, narrating each as it finishes.
fn follow_tasks(
    n: &Narrator,
    server: &str,
    seen: &mut HashMap<u64, TaskState>,
    timeout: Duration,
    mut done: impl FnMut(&ClusterState) -> bool,
) -> anyhow::Result<ClusterState> {
    let start = Instant::now();
    loop {
        if let Some(s) = state(server) {
            for t in s.tasks.values() {
                if seen.get(&t.id) != Some(&t.state) {
                    seen.insert(t.id, t.state);
                    match t.state {
                        TaskState::Queued => n.say(format!(
                            "  queued: task {} {} host {} -> {} ({}, by {})",
                            t.id, t.vm, t.from, t.to, t.reason, t.requested_by
                        )),
                        TaskState::Running => {}
                        _ => n.say(format!("  {}", task_line(t))),
                    }
                }
            }
            if done(&s) {
                return Ok(s);
            }
        }
        if start.elapsed() > timeout {
            bail!("timed out following migrations");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn drs_report(server: &str) -> Option<serde_json::Value> {
    get::<serde_json::Value>(server, "/v1/drs")
        .ok()
        .map(|(v, _)| v)
}

fn loads_line(report: &serde_json::Value) -> String {
    report["host_load"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            format!(
                "host {} cpu {:.0}% mem {:.1}%",
                h[0],
                h[1].as_f64().unwrap_or(0.0) * 100.0,
                h[2].as_f64().unwrap_or(0.0) * 100.0
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn write(server: &str, command: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    post(
        server,
        "/v1/write",
        &serde_json::json!({ "actor": "demo", "command": command }),
    )
}

fn all_idle(s: &ClusterState) -> bool {
    s.tasks.values().all(|t| t.state.is_final())
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if !std::path::Path::new("/dev/kvm").exists() {
        bail!("tern demo needs /dev/kvm");
    }
    let n = Narrator {
        json: args.json,
        start: Instant::now(),
    };
    let dir = tempfile::Builder::new().prefix("tern-demo-").tempdir()?;
    let root = if args.keep {
        dir.keep()
    } else {
        dir.path().to_path_buf()
    };
    let datastore = root.join("datastore");
    let exe = std::env::current_exe()?;
    let addrs: Vec<String> = (0..3)
        .map(|_| free_port().map(|p| format!("127.0.0.1:{p}")))
        .collect::<Result<_, _>>()?;
    let mut nodes = Nodes {
        children: Vec::new(),
        data: (1..=3).map(|id| root.join(format!("node{id}"))).collect(),
        keep: false,
    };
    n.say(format!(
        "starting 3 tern nodes on {} (each offers 1 CPU and 2 GiB of this machine; data and \
         shared datastore under {})",
        addrs.join(", "),
        root.display()
    ));
    // Secure by default: the first node creates the cluster CA and an admin token and writes
    // them here; the demo (and, with --keep, the user) talks to the cluster with them.
    let admin_config = tern_node::client::admin_config_path(&root.join("node1"));
    std::env::set_var("TERN_CONFIG", &admin_config);
    std::env::remove_var("TERN_TOKEN");
    std::env::remove_var("TERN_CA");
    let mut join_token = String::new();
    for (i, addr) in addrs.iter().enumerate() {
        let id = i + 1;
        let log = std::fs::File::create(root.join(format!("node{id}.log")))?;
        let mut cmd = Command::new(&exe);
        cmd.args(["node", "--id", &id.to_string(), "--listen", addr])
            .arg("--data")
            .arg(root.join(format!("node{id}")))
            .arg("--datastore")
            .arg(&datastore)
            .args(["--load-interval-ms", "500"])
            // Three hosts share this machine: each offers a slice of it to its VMs.
            .args(["--capacity-cpus", "1", "--capacity-memory-mib", "2048"]);
        if id == 1 {
            cmd.arg("--bootstrap");
        } else {
            cmd.args(["--join", &addrs[0], "--join-token", &join_token]);
        }
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        nodes.children.push(cmd.spawn().context("starting a node")?);
        if id == 1 {
            wait("the first node to lead", Duration::from_secs(15), || {
                get::<serde_json::Value>(&addrs[0], "/v1/status")
                    .ok()
                    .filter(|(s, _)| s["leader"] == serde_json::json!(1))
            })?;
            let reply: tern_node::access::JoinTokenReply = post(
                &addrs[0],
                "/v1/cluster/join-token",
                &serde_json::json!({ "ttl_s": 600 }),
            )?;
            join_token = reply.token;
        }
    }
    let server = addrs[0].clone();
    wait("3 hosts to register", Duration::from_secs(30), || {
        state(&server).filter(|s| s.hosts.len() == 3)
    })?;
    n.say("cluster up: 3 voters, 3 hosts registered");

    let stop = Arc::new(AtomicBool::new(false));
    let doubles = Arc::new(AtomicU64::new(0));
    watch_double_runs(addrs.clone(), stop.clone(), doubles.clone());

    write(
        &server,
        serde_json::json!({"op": "set_drs", "settings":
            {"automation": "manual", "migration_threshold": 3, "interval_s": 2}}),
    )?;
    n.say(format!(
        "creating {} VMs of {} MiB, all on host 1:",
        args.vms, args.memory_mib
    ));
    let names: Vec<String> = (1..=args.vms).map(|i| format!("vm{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let w = WORKLOADS[i % WORKLOADS.len()];
        let w = format!("{w},{DEMO_DISK}");
        let body = serde_json::json!({"name": name, "memory_mib": args.memory_mib, "vcpus": 1,
            "workload": w, "host": 1, "actor": "demo", "disk_mib": 16});
        let _: serde_json::Value = post(&server, "/v1/vms", &body)?;
        n.say(format!("  {name}: {w}"));
    }
    wait("every guest to run", Duration::from_secs(60), || {
        let l = local(&addrs[0])?;
        (l.iter().filter(|v| v.running).count() == names.len()).then_some(())
    })?;
    // Let the leader collect a few load samples.
    std::thread::sleep(Duration::from_secs(3));
    let before = drs_report(&server).context("drs report")?;
    let mut summary = Summary {
        vms: names.len(),
        imbalance_before: before["imbalance"].as_f64().unwrap_or(0.0),
        ..Default::default()
    };
    n.say(format!(
        "all guests running and verifying; imbalance {:.3} ({})",
        summary.imbalance_before,
        loads_line(&before)
    ));

    n.say("DRS: switching to fully automated, threshold 3, interval 2 s");
    write(
        &server,
        serde_json::json!({"op": "set_drs", "settings":
            {"automation": "fully-automated", "migration_threshold": 3, "interval_s": 2}}),
    )?;
    let mut seen = HashMap::new();
    let mut quiet_since: Option<Instant> = None;
    follow_tasks(&n, &server, &mut seen, Duration::from_secs(120), |s| {
        let drs_tasks = s.tasks.values().filter(|t| t.reason == "drs").count();
        if drs_tasks == 0 || !all_idle(s) {
            quiet_since = None;
            return false;
        }
        // Done once DRS has been quiet for two passes.
        let since = *quiet_since.get_or_insert_with(Instant::now);
        since.elapsed() > Duration::from_secs(5)
    })?;
    write(
        &server,
        serde_json::json!({"op": "set_drs", "settings":
            {"automation": "manual", "migration_threshold": 3, "interval_s": 2}}),
    )?;
    let after = drs_report(&server).context("drs report")?;
    summary.first_host_vms_before = names.len();
    summary.first_host_vms_after_drs =
        state(&server).map_or(0, |s| s.vms.values().filter(|v| v.owner == 1).count());
    summary.imbalance_after = after["imbalance"].as_f64().unwrap_or(0.0);
    n.say(format!(
        "DRS done: host 1 runs {} of {} VMs; imbalance {:.3} -> {:.3} ({}); DRS back to manual",
        summary.first_host_vms_after_drs,
        summary.first_host_vms_before,
        summary.imbalance_before,
        summary.imbalance_after,
        loads_line(&after)
    ));

    // An operator moves one VM now, at high priority.
    let s = state(&server).context("state")?;
    let (vm, from) = s
        .vms
        .iter()
        .map(|(name, v)| (name.clone(), v.owner))
        .next()
        .context("no vms")?;
    let to = if from == 3 { 2 } else { 3 };
    n.say(format!(
        "operator alice: migrate {vm} host {from} -> {to}, priority high"
    ));
    let _: serde_json::Value = post(
        &server,
        "/v1/migrations",
        &serde_json::json!({"vm": vm, "to": to, "priority": 3, "actor": "alice", "reason": "manual"}),
    )?;
    follow_tasks(&n, &server, &mut seen, Duration::from_secs(60), all_idle)?;

    // A scheduled migration, fired by the leader.
    let s = state(&server).context("state")?;
    let (vm, from) = s
        .vms
        .iter()
        .rev()
        .map(|(name, v)| (name.clone(), v.owner))
        .next()
        .context("no vms")?;
    let to = if from == 1 { 2 } else { 1 };
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64
        + 2000;
    let action = serde_json::json!({"vm": vm, "to": to, "priority": 2, "actor": "bob",
        "reason": "scheduled"});
    write(
        &server,
        serde_json::json!({"op": "put_schedule", "schedule": {"name": "demo-at",
            "cron": format!("@at {at}"), "action": action.to_string(), "enabled": true}}),
    )?;
    n.say(format!(
        "operator bob: schedule {vm} host {from} -> {to} in 2 s"
    ));
    follow_tasks(&n, &server, &mut seen, Duration::from_secs(60), |s| {
        s.tasks.values().any(|t| t.reason == "scheduled") && all_idle(s)
    })?;

    // Maintenance: evacuate the host with the most VMs.
    let s = state(&server).context("state")?;
    let host = s
        .hosts
        .keys()
        .max_by_key(|h| s.vms.values().filter(|v| v.owner == **h).count())
        .copied()
        .context("no hosts")?;
    let count = s.vms.values().filter(|v| v.owner == host).count();
    n.say(format!(
        "maintenance: host {host} enters maintenance mode with {count} VMs"
    ));
    let _: serde_json::Value = post(
        &server,
        &format!("/v1/hosts/{host}/maintenance"),
        &serde_json::json!({"enter": true, "actor": "carol"}),
    )?;
    let evac_start = Instant::now();
    follow_tasks(&n, &server, &mut seen, Duration::from_secs(120), |s| {
        s.hosts
            .get(&host)
            .is_some_and(|h| h.state == HostState::InMaintenance)
            && all_idle(s)
    })?;
    n.say(format!(
        "host {host} is in maintenance, empty after {:.1} s; exiting maintenance",
        evac_start.elapsed().as_secs_f64()
    ));
    let _: serde_json::Value = post(
        &server,
        &format!("/v1/hosts/{host}/maintenance"),
        &serde_json::json!({"enter": false, "actor": "carol"}),
    )?;

    // The audit trail.
    let s = state(&server).context("state")?;
    n.say("audit trail:");
    for t in s.tasks.values() {
        n.say(format!(
            "  {} (requested by {})",
            task_line(t),
            t.requested_by
        ));
    }
    let downtimes: Vec<f64> = s
        .tasks
        .values()
        .filter(|t| t.state == TaskState::Succeeded)
        .map(|t| t.stats.downtime_us as f64 / 1000.0)
        .collect();
    summary.migrations = downtimes.len();
    summary.failed = s
        .tasks
        .values()
        .filter(|t| t.state == TaskState::Failed)
        .count();
    for t in s.tasks.values() {
        *summary.by_reason.entry(t.reason.clone()).or_default() += 1;
    }
    summary.max_downtime_ms = downtimes.iter().copied().fold(0.0, f64::max);
    summary.mean_downtime_ms = downtimes.iter().sum::<f64>() / downtimes.len().max(1) as f64;

    // The checks.
    stop.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    let locals: Vec<Vec<Local>> = addrs.iter().map(|a| local(a).unwrap_or_default()).collect();
    for (name, vm) in &s.vms {
        let holders: Vec<u64> = locals
            .iter()
            .enumerate()
            .filter(|(_, l)| l.iter().any(|x| x.name == *name && x.running))
            .map(|(i, _)| i as u64 + 1)
            .collect();
        if holders != [vm.owner] {
            summary.problems.push(format!(
                "{name} is owned by host {} but runs on {holders:?}",
                vm.owner
            ));
        }
        let owner = &addrs[(vm.owner - 1) as usize];
        match get::<serde_json::Value>(owner, &format!("/v1/vms/{name}/guest")) {
            Ok((g, _)) => {
                let mism = g["status"]["mismatches"].as_u64().unwrap_or(u64::MAX);
                summary.guest_mismatches += mism;
                summary.guests_verified_pages +=
                    g["status"]["pages_verified"].as_u64().unwrap_or(0);
                if mism != 0 {
                    summary
                        .problems
                        .push(format!("{name}: {mism} mismatching pages"));
                }
                let d = &g["status"]["disk"];
                let (verified, dmism, ioerr) = (
                    d["verified"].as_u64().unwrap_or(0),
                    d["mismatches"].as_u64().unwrap_or(u64::MAX),
                    d["io_errors"].as_u64().unwrap_or(u64::MAX),
                );
                summary.guests_verified_blocks += verified;
                summary.guest_disk_mismatches = summary.guest_disk_mismatches.saturating_add(dmism);
                summary.guest_disk_io_errors = summary.guest_disk_io_errors.saturating_add(ioerr);
                if dmism != 0 || ioerr != 0 || verified == 0 {
                    summary.problems.push(format!(
                        "{name}: disk {verified} blocks verified, {dmism} mismatches, {ioerr} I/O errors"
                    ));
                }
            }
            Err(e) => summary
                .problems
                .push(format!("{name}: no guest status: {e:#}")),
        }
    }
    summary.double_runs = doubles.load(Ordering::SeqCst);
    if summary.double_runs > 0 {
        summary
            .problems
            .push(format!("{} double runs observed", summary.double_runs));
    }
    if summary.failed > 0 {
        summary
            .problems
            .push(format!("{} migrations failed", summary.failed));
    }
    summary.seconds = n.start.elapsed().as_secs_f64();
    summary.ok = summary.problems.is_empty();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!();
        println!(
            "summary: {} VMs, {} live migrations ({}), downtime mean {:.1} ms / max {:.1} ms, \
             imbalance {:.3} -> {:.3}, {} pages verified by the guests, {} mismatches, \
             {} disk blocks verified, {} disk mismatches, {} disk I/O errors, \
             {} double runs, {:.0} s",
            summary.vms,
            summary.migrations,
            summary
                .by_reason
                .iter()
                .map(|(r, c)| format!("{c} {r}"))
                .collect::<Vec<_>>()
                .join(", "),
            summary.mean_downtime_ms,
            summary.max_downtime_ms,
            summary.imbalance_before,
            summary.imbalance_after,
            summary.guests_verified_pages,
            summary.guest_mismatches,
            summary.guests_verified_blocks,
            summary.guest_disk_mismatches,
            summary.guest_disk_io_errors,
            summary.double_runs,
            summary.seconds
        );
        for p in &summary.problems {
            println!("PROBLEM: {p}");
        }
    }
    if args.keep {
        nodes.keep = true;
        let pids: Vec<String> = nodes.children.iter().map(|c| c.id().to_string()).collect();
        println!();
        println!(
            "the cluster keeps running (node PIDs {}); try:",
            pids.join(" ")
        );
        println!(
            "  export TERN_SERVER={server} TERN_CONFIG={}",
            admin_config.display()
        );
        println!("  tern cluster status; tern vm list; tern drs status; tern audit");
        println!("  tern migrate vm1 --to 2 --wait");
        // The VMs are processes of their own (`tern vmm`), outliving their nodes.
        let vmms: Vec<String> = nodes
            .data
            .iter()
            .filter_map(|d| std::fs::read_dir(d.join("run").join("vms")).ok())
            .flat_map(|dirs| dirs.flatten())
            .filter_map(|d| tern_hypervisor::vmm::rundir::read_pid(&d.path()))
            .map(|p| p.to_string())
            .collect();
        println!(
            "stop it with: kill {}; then its VMs: kill {}",
            pids.join(" "),
            vmms.join(" ")
        );
        println!("files: {}", root.display());
    }
    if !summary.ok {
        bail!("the demo found problems");
    }
    Ok(())
}
