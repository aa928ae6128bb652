//! `tern migrate`, `tern task ...`, `tern audit`: migration tasks through a node's API.
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tern_consensus::state::{MigrationTask, TaskId, TaskState};
use tern_consensus::ClusterState;

use super::cluster::{get, post, ServerArg};
use tern_node::cron::format_time;

#[derive(Clone, Copy, ValueEnum)]
pub enum Priority {
    High,
    Normal,
    Low,
}

impl Priority {
    pub fn value(self) -> u8 {
        match self {
            Priority::High => 3,
            Priority::Normal => 2,
            Priority::Low => 1,
        }
    }
}

fn priority_name(p: u8) -> &'static str {
    match p {
        0 | 1 => "low",
        2 => "normal",
        _ => "high",
    }
}

#[derive(Args)]
pub struct MigrateArgs {
    /// The VM to move.
    vm: String,
    /// Destination host id.
    #[arg(long, required_unless_present = "recommend")]
    to: Option<u64>,
    #[arg(long, value_enum, default_value = "normal")]
    priority: Priority,
    /// Wait for the task to finish, with a progress bar; fail if it fails.
    #[arg(long, conflicts_with_all = ["at", "cron"])]
    wait: bool,
    /// Run once at this time: +10m, unix seconds, or 2026-01-31T22:00Z (UTC).
    #[arg(long, conflicts_with = "cron")]
    at: Option<String>,
    /// Run on this cron schedule (5 fields, UTC), e.g. "0 2 * * *".
    #[arg(long)]
    cron: Option<String>,
    /// Rank the destinations for this VM instead of migrating it.
    #[arg(long, conflicts_with_all = ["at", "cron", "wait"])]
    recommend: bool,
    /// Who asks (recorded in the audit trail).
    #[arg(long, env = "TERN_USER")]
    user: Option<String>,
    #[command(flatten)]
    server: ServerArg,
}

#[derive(Args)]
pub struct TaskArgs {
    #[command(subcommand)]
    command: TaskCommand,
}

#[derive(Subcommand)]
enum TaskCommand {
    /// Migration tasks, newest last.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// One task in full.
    Show {
        id: TaskId,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Cancel a queued or running task (a running migration aborts; the VM stays on its source).
    Cancel {
        id: TaskId,
        /// Who cancels (recorded in the task and the audit trail).
        #[arg(long, env = "TERN_USER")]
        user: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Args)]
pub struct AuditArgs {
    /// Only tasks of this VM.
    #[arg(long)]
    vm: Option<String>,
    /// Only tasks created at or after this time: UTC RFC 3339 (2026-11-24T22:00:00Z), a
    /// duration ago (10m, 2h), or unix milliseconds.
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArg,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn run_migrate(a: MigrateArgs) -> anyhow::Result<()> {
    let server = &a.server.server;
    if a.recommend {
        return recommend(server, &a.vm);
    }
    let to = a.to.context("--to is required")?;
    if a.at.is_some() || a.cron.is_some() {
        return schedule(&a, to);
    }
    let body = serde_json::json!({
        "vm": a.vm, "to": to, "priority": a.priority.value(), "actor": a.user,
        "reason": "manual",
    });
    let reply: serde_json::Value = post(server, "/v1/migrations", &body)?;
    let id = reply
        .get("task")
        .and_then(|t| t.as_u64())
        .context("no task id in reply")?;
    println!("task {id}: migrate {} to host {to}", a.vm);
    if !a.wait {
        return Ok(());
    }
    let task = wait_task(server, id)?;
    print_task(&task);
    if task.state != TaskState::Succeeded {
        bail!(
            "task {id} {:?}: {}",
            task.state,
            task.error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

fn schedule(a: &MigrateArgs, to: u64) -> anyhow::Result<()> {
    use tern_node::cron::{parse_time, When};
    let now = now_ms();
    let cron = match (&a.at, &a.cron) {
        (Some(at), _) => format!("@at {}", parse_time(at, now).map_err(anyhow::Error::msg)?),
        (None, Some(expr)) => {
            expr.parse::<When>().map_err(anyhow::Error::msg)?;
            expr.clone()
        }
        (None, None) => bail!("--at or --cron"),
    };
    let action = serde_json::json!({
        "vm": a.vm, "to": to, "priority": a.priority.value(), "actor": a.user,
        "reason": "scheduled",
    });
    let name = format!("migrate-{}-{now}", a.vm);
    let body = serde_json::json!({ "actor": a.user, "command": { "op": "put_schedule", "schedule": {
        "name": name, "cron": cron, "action": action.to_string(), "enabled": true } } });
    let _: serde_json::Value = post(&a.server.server, "/v1/write", &body)?;
    println!("schedule {name}: migrate {} to host {to} at {cron}", a.vm);
    Ok(())
}

fn recommend(server: &str, vm: &str) -> anyhow::Result<()> {
    let (r, _): (serde_json::Value, String) = get(server, &format!("/v1/vms/{vm}/recommend"))?;
    if let Some(b) = r["blocked"].as_str() {
        println!("{vm} cannot move: {b}");
    }
    println!(
        "{vm} on host {}: imbalance now {:.3}",
        r["from"],
        r["imbalance_now"].as_f64().unwrap_or(0.0)
    );
    for (i, c) in r["candidates"].as_array().into_iter().flatten().enumerate() {
        let reasons: Vec<String> = c["reasons"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect();
        println!(
            "{:>2}. host {:<4} score {:7.3}  imbalance after {:.3}  {}",
            i + 1,
            c["host"].as_str().unwrap_or("?"),
            c["score"].as_f64().unwrap_or(0.0),
            c["imbalance_after"].as_f64().unwrap_or(0.0),
            reasons.join("; ")
        );
    }
    for e in r["excluded"].as_array().into_iter().flatten() {
        println!(
            "    host {:<4} excluded: {}",
            e["host"].as_str().unwrap_or("?"),
            e["reasons"]
        );
    }
    Ok(())
}

/// Poll until the task is final, drawing a progress bar from the source's progress.
pub fn wait_task(server: &str, id: TaskId) -> anyhow::Result<MigrationTask> {
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:32} [{bar:30}] {bytes}/{total_bytes}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    loop {
        let (state, _): (ClusterState, String) = get(server, "/v1/state")?;
        let task = state
            .find_task(id)
            .cloned()
            .with_context(|| format!("no task {id}"))?;
        if task.state.is_final() {
            bar.finish_and_clear();
            return Ok(task);
        }
        let src = state.hosts.get(&task.from).map(|h| h.address.clone());
        let progress = src.and_then(|addr| {
            get::<serde_json::Value>(&addr, &format!("/v1/tasks/{id}/progress"))
                .ok()
                .map(|(v, _)| v)
        });
        match progress {
            Some(p) => {
                let sent = p.get("bytes_sent").and_then(|v| v.as_u64()).unwrap_or(0);
                let left = p
                    .get("bytes_remaining")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0);
                bar.set_length(sent + left.max(1));
                bar.set_position(sent);
                bar.set_message(format!(
                    "{} round {}",
                    p.get("phase").and_then(|v| v.as_str()).unwrap_or("?"),
                    p.get("round").and_then(|v| v.as_u64()).unwrap_or(0)
                ));
            }
            None => bar.set_message(format!("{:?}", task.state).to_lowercase()),
        }
        bar.tick();
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_task(t: &MigrationTask) {
    println!(
        "task {}: vm {} host {} -> {} [{}] {:?} by {} ({}) downtime {:.1} ms, total {} ms, {} MiB, {} rounds{}",
        t.id,
        t.vm,
        t.from,
        t.to,
        priority_name(t.priority),
        t.state,
        t.requested_by,
        t.reason,
        t.stats.downtime_us as f64 / 1000.0,
        t.stats.total_ms,
        t.stats.bytes >> 20,
        t.stats.rounds,
        t.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
    );
}

pub fn run_task(a: TaskArgs) -> anyhow::Result<()> {
    match a.command {
        TaskCommand::List { json, server } => {
            let (state, _): (ClusterState, String) = get(&server.server, "/v1/state")?;
            if json {
                let tasks: Vec<&MigrationTask> = state.tasks.values().collect();
                println!("{}", serde_json::to_string_pretty(&tasks)?);
                return Ok(());
            }
            for t in state.tasks.values() {
                print_task(t);
            }
            Ok(())
        }
        TaskCommand::Show { id, server } => {
            let (state, _): (ClusterState, String) = get(&server.server, "/v1/state")?;
            let t = state
                .find_task(id)
                .with_context(|| format!("no task {id}"))?;
            println!("{}", serde_json::to_string_pretty(t)?);
            Ok(())
        }
        TaskCommand::Cancel { id, user, server } => {
            let _: serde_json::Value = post(
                &server.server,
                &format!("/v1/tasks/{id}/cancel"),
                &serde_json::json!({ "actor": user }),
            )?;
            println!("task {id} cancelled");
            Ok(())
        }
    }
}

/// `--since`: an RFC 3339 time, a duration ago, or unix milliseconds (at `now_ms`).
fn parse_since(s: &str, now_ms: u64) -> anyhow::Result<u64> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    if s.contains('T') {
        return tern_node::cron::parse_time(s, now_ms).map_err(|e| anyhow::anyhow!("--since: {e}"));
    }
    let ago = super::vm::parse_duration(s)
        .context("--since: use 2026-11-24T22:00:00Z, a duration ago like 10m, or unix ms")?;
    Ok(now_ms.saturating_sub(ago.as_millis() as u64))
}

pub fn run_audit(a: AuditArgs) -> anyhow::Result<()> {
    let since = a
        .since
        .as_deref()
        .map(|s| parse_since(s, now_ms()))
        .transpose()?;
    let (state, _): (ClusterState, String) = get(&a.server.server, "/v1/state")?;
    let tasks: Vec<&MigrationTask> = state
        .all_tasks()
        .filter(|t| a.vm.as_ref().is_none_or(|v| *v == t.vm))
        .filter(|t| since.is_none_or(|s| t.created_at_ms >= s))
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&tasks)?);
        return Ok(());
    }
    // Times in UTC RFC 3339; --json keeps unix milliseconds.
    let time = |t: Option<u64>| t.map_or("-".into(), format_time);
    println!(
        "{:>4} {:<12} {:>4} {:>4} {:<10} {:<10} {:<12} {:<24} {:<24} {:<24} {:>10} {:>8} {:>8}  ERROR",
        "TASK", "VM", "FROM", "TO", "RESULT", "REASON", "REQUESTED_BY", "CREATED", "STARTED",
        "FINISHED", "DOWNTIME", "TOTAL", "MiB"
    );
    for t in tasks {
        println!(
            "{:>4} {:<12} {:>4} {:>4} {:<10} {:<10} {:<12} {:<24} {:<24} {:<24} {:>8.1}ms {:>6}ms {:>8}  {}",
            t.id,
            t.vm,
            t.from,
            t.to,
            format!("{:?}", t.state).to_lowercase(),
            t.reason,
            t.requested_by,
            time(Some(t.created_at_ms)),
            time(t.started_at_ms),
            time(t.finished_at_ms),
            t.stats.downtime_us as f64 / 1000.0,
            t.stats.total_ms,
            t.stats.bytes >> 20,
            t.error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_since;

    const NOW: u64 = 1_764_023_465_123; // 2025-11-24T22:31:05.123Z

    #[test]
    fn since_takes_rfc3339_a_duration_ago_or_unix_ms() {
        assert_eq!(
            parse_since("2025-11-24T22:31:05.123Z", 0).unwrap(),
            NOW,
            "RFC 3339"
        );
        assert_eq!(parse_since("10m", NOW).unwrap(), NOW - 600_000);
        assert_eq!(parse_since("2h", NOW).unwrap(), NOW - 7_200_000);
        assert_eq!(parse_since("1764023465123", 0).unwrap(), NOW);
        for bad in ["yesterday", "2025-13-01T00:00Z", "10y", ""] {
            assert!(parse_since(bad, NOW).is_err(), "{bad:?}");
        }
    }
}
