//! `tern drs status|recommendations|apply|set` and `tern host maintenance`: the cluster's
//! DRS and maintenance mode through a node's API.
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use tern_consensus::state::{AutomationLevel, DrsSettings, HostState};
use tern_consensus::ClusterState;

use super::cluster::{get, post, ServerArg};

#[derive(Clone, Copy, ValueEnum)]
pub enum Automation {
    /// Recommendations only.
    Manual,
    /// Placement automatic, migrations recommended.
    Partial,
    /// Migrations run automatically.
    Full,
}

#[derive(Subcommand)]
pub enum ClusterDrsCommand {
    /// DRS settings, imbalance and host loads as the leader sees them.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// The moves a DRS pass recommends now.
    Recommendations {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Queue the current recommendations as migration tasks (reason drs).
    Apply {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Change DRS settings.
    Set {
        #[arg(long, value_enum)]
        automation: Option<Automation>,
        /// Migration threshold 1 (conservative) ..= 5 (aggressive).
        #[arg(long)]
        threshold: Option<u8>,
        /// Seconds between DRS passes.
        #[arg(long)]
        interval: Option<u32>,
        #[command(flatten)]
        server: ServerArg,
    },
}

pub fn run_drs(cmd: ClusterDrsCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterDrsCommand::Status { json, server } => {
            let (state, _): (ClusterState, String) = get(&server.server, "/v1/state")?;
            let (report, raw): (serde_json::Value, String) = get(&server.server, "/v1/drs")?;
            if json {
                let out = serde_json::json!({ "settings": state.drs, "report": report });
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            let _ = raw;
            println!(
                "automation {:?}, threshold {}, interval {}s",
                state.drs.automation, state.drs.migration_threshold, state.drs.interval_s
            );
            println!(
                "imbalance {:.3} (target {})",
                report["imbalance"].as_f64().unwrap_or(0.0),
                report["target"]
                    .as_f64()
                    .map_or("none".into(), |t| format!("{t:.3}"))
            );
            for h in report["host_load"].as_array().into_iter().flatten() {
                println!(
                    "  host {:>3}: cpu {:5.1}%  memory {:5.1}%",
                    h[0],
                    h[1].as_f64().unwrap_or(0.0) * 100.0,
                    h[2].as_f64().unwrap_or(0.0) * 100.0
                );
            }
            Ok(())
        }
        ClusterDrsCommand::Recommendations { json, server } => {
            let (report, _): (serde_json::Value, String) = get(&server.server, "/v1/drs")?;
            print_moves(&report, json)
        }
        ClusterDrsCommand::Apply { server } => {
            let report: serde_json::Value = post(&server.server, "/v1/drs/apply", &())?;
            print_moves(&report, false)
        }
        ClusterDrsCommand::Set {
            automation,
            threshold,
            interval,
            server,
        } => {
            let (state, _): (ClusterState, String) = get(&server.server, "/v1/state")?;
            let mut s: DrsSettings = state.drs;
            if let Some(a) = automation {
                s.automation = match a {
                    Automation::Manual => AutomationLevel::Manual,
                    Automation::Partial => AutomationLevel::PartiallyAutomated,
                    Automation::Full => AutomationLevel::FullyAutomated,
                };
            }
            if let Some(t) = threshold {
                s.migration_threshold = t;
            }
            if let Some(i) = interval {
                s.interval_s = i;
            }
            let body = serde_json::json!({ "command": { "op": "set_drs", "settings": s } });
            let _: serde_json::Value = post(&server.server, "/v1/write", &body)?;
            println!(
                "drs: {:?}, threshold {}, interval {}s",
                s.automation, s.migration_threshold, s.interval_s
            );
            Ok(())
        }
    }
}

fn print_moves(report: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report["recommendations"])?
        );
        return Ok(());
    }
    let moves = report["recommendations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if moves.is_empty() {
        println!("no recommendations");
    }
    for m in moves {
        println!(
            "{} host {} -> {} (priority {}): {}",
            m["vm"].as_str().unwrap_or("?"),
            m["from"].as_str().unwrap_or("?"),
            m["to"].as_str().unwrap_or("?"),
            m["priority"],
            m["reason"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
pub enum MaintenanceAction {
    Enter,
    Exit,
}

/// `tern host maintenance enter|exit H [--wait]`.
pub fn run_maintenance(
    server: &str,
    action: MaintenanceAction,
    id: u64,
    wait: bool,
) -> anyhow::Result<()> {
    let enter = matches!(action, MaintenanceAction::Enter);
    let _: serde_json::Value = post(
        server,
        &format!("/v1/hosts/{id}/maintenance"),
        &serde_json::json!({ "enter": enter }),
    )?;
    if !enter {
        println!("host {id} left maintenance");
        return Ok(());
    }
    if !wait {
        println!("host {id} entering maintenance");
        return Ok(());
    }
    let start = Instant::now();
    loop {
        let (state, _): (ClusterState, String) = get(server, "/v1/state")?;
        let host = state
            .hosts
            .get(&id)
            .with_context(|| format!("no host {id}"))?;
        let left = state.vms.values().filter(|v| v.owner == id).count();
        match host.state {
            HostState::InMaintenance => {
                println!(
                    "host {id} in maintenance after {:.1}s",
                    start.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            HostState::EnteringMaintenance => {
                eprint!("\rhost {id}: {left} VMs left   ");
            }
            other => bail!("host {id} is {other:?}: maintenance was cancelled"),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
