//! `tern pool ...` and `tern rule ...`: resource pools and affinity rules, committed through
//! any node's API and honoured by placement and DRS.
use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use tern_consensus::state::{Command, ResourcePool, Rule, RuleKind};
use tern_consensus::ClusterState;

use super::cluster::{get, post, ServerArg};

#[derive(Args)]
pub struct PoolArgs {
    #[command(flatten)]
    server: ServerArg,
    #[arg(long, env = "TERN_USER", global = true)]
    user: Option<String>,
    #[command(subcommand)]
    command: PoolCommand,
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Create or update a resource pool.
    Set {
        name: String,
        /// CPU reservation, MHz.
        #[arg(long, default_value_t = 0)]
        cpu_reservation: u64,
        /// CPU limit, MHz (default: none).
        #[arg(long)]
        cpu_limit: Option<u64>,
        /// Memory reservation, MiB.
        #[arg(long, default_value_t = 0)]
        memory_reservation: u64,
        /// Memory limit, MiB (default: none).
        #[arg(long)]
        memory_limit: Option<u64>,
        #[arg(long, default_value_t = 4000)]
        shares: u32,
    },
    /// List pools with their VMs.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a pool (its VMs move to the cluster root).
    Delete { name: String },
}

#[derive(Args)]
pub struct RuleArgs {
    #[command(flatten)]
    server: ServerArg,
    #[arg(long, env = "TERN_USER", global = true)]
    user: Option<String>,
    #[command(subcommand)]
    command: RuleCommand,
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    /// The VMs run on one host.
    Together,
    /// The VMs run on different hosts.
    Apart,
    /// The VMs run on the listed hosts.
    OnHosts,
    /// The VMs stay off the listed hosts.
    OffHosts,
}

#[derive(Subcommand)]
enum RuleCommand {
    /// Create or replace a rule.
    Set {
        name: String,
        #[arg(long, value_enum)]
        kind: Kind,
        /// VM names, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        vms: Vec<String>,
        /// Host ids, comma-separated (for on-hosts / off-hosts).
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<u64>,
        /// A preference the scheduler may break, instead of a hard rule.
        #[arg(long)]
        should: bool,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Delete {
        name: String,
    },
}

fn write(server: &str, user: Option<String>, command: Command) -> anyhow::Result<()> {
    let _: serde_json::Value = post(
        server,
        "/v1/write",
        &serde_json::json!({ "actor": user.unwrap_or_else(|| "cli".into()), "command": command }),
    )?;
    Ok(())
}

fn state(server: &str) -> anyhow::Result<ClusterState> {
    Ok(get::<ClusterState>(server, "/v1/state")
        .context("reading cluster state")?
        .0)
}

pub fn run_pool(a: PoolArgs) -> anyhow::Result<()> {
    let server = &a.server.server;
    match a.command {
        PoolCommand::Set {
            name,
            cpu_reservation,
            cpu_limit,
            memory_reservation,
            memory_limit,
            shares,
        } => {
            if shares == 0 {
                bail!("--shares must be at least 1");
            }
            let pool = ResourcePool {
                name: name.clone(),
                cpu_reservation_mhz: cpu_reservation,
                cpu_limit_mhz: cpu_limit,
                memory_reservation_mib: memory_reservation,
                memory_limit_mib: memory_limit,
                shares,
            };
            write(server, a.user, Command::PutPool { pool })?;
            println!("pool {name} set");
        }
        PoolCommand::Delete { name } => {
            write(server, a.user, Command::DeletePool { name: name.clone() })?;
            println!("pool {name} deleted");
        }
        PoolCommand::List { json } => {
            let s = state(server)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s.pools)?);
                return Ok(());
            }
            println!(
                "{:<16} {:>10} {:>10} {:>10} {:>10} {:>7}  vms",
                "pool", "cpu-res", "cpu-lim", "mem-res", "mem-lim", "shares"
            );
            let lim = |l: Option<u64>| l.map_or("-".to_string(), |v| v.to_string());
            for p in s.pools.values() {
                let vms: Vec<&str> = s
                    .vms
                    .iter()
                    .filter(|(_, v)| v.pool.as_deref() == Some(p.name.as_str()))
                    .map(|(n, _)| n.as_str())
                    .collect();
                println!(
                    "{:<16} {:>10} {:>10} {:>10} {:>10} {:>7}  {}",
                    p.name,
                    p.cpu_reservation_mhz,
                    lim(p.cpu_limit_mhz),
                    p.memory_reservation_mib,
                    lim(p.memory_limit_mib),
                    p.shares,
                    vms.join(",")
                );
            }
        }
    }
    Ok(())
}

pub fn run_rule(a: RuleArgs) -> anyhow::Result<()> {
    let server = &a.server.server;
    match a.command {
        RuleCommand::Set {
            name,
            kind,
            vms,
            hosts,
            should,
        } => {
            let kind = match kind {
                Kind::Together => RuleKind::VmVmAffinity,
                Kind::Apart => RuleKind::VmVmAntiAffinity,
                Kind::OnHosts => RuleKind::VmHostAffinity,
                Kind::OffHosts => RuleKind::VmHostAntiAffinity,
            };
            let host_rule = matches!(
                kind,
                RuleKind::VmHostAffinity | RuleKind::VmHostAntiAffinity
            );
            if host_rule == hosts.is_empty() {
                bail!("--hosts is required for on-hosts/off-hosts rules and only for them");
            }
            if should && !host_rule {
                // Known limitation: tern-scheduler only has hard VM-VM rules.
                eprintln!(
                    "warning: VM-VM rules are always enforced as must; {name} is stored as \
                     should but placement and DRS treat it as a hard rule"
                );
            }
            let rule = Rule {
                name: name.clone(),
                kind,
                mandatory: !should,
                vms,
                hosts,
            };
            write(server, a.user, Command::PutRule { rule })?;
            println!("rule {name} set");
        }
        RuleCommand::Delete { name } => {
            write(server, a.user, Command::DeleteRule { name: name.clone() })?;
            println!("rule {name} deleted");
        }
        RuleCommand::List { json } => {
            let s = state(server)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s.rules)?);
                return Ok(());
            }
            println!(
                "{:<16} {:<22} {:<6} {:<24} hosts",
                "rule", "kind", "must", "vms"
            );
            for r in s.rules.values() {
                let hosts: Vec<String> = r.hosts.iter().map(u64::to_string).collect();
                // A VM-VM should rule is enforced as must (the scheduler has only hard ones).
                let must = match (r.mandatory, vm_vm(r.kind)) {
                    (false, true) => "false*".to_string(),
                    (m, _) => m.to_string(),
                };
                println!(
                    "{:<16} {:<22} {:<6} {:<24} {}",
                    r.name,
                    format!("{:?}", r.kind),
                    must,
                    r.vms.join(","),
                    hosts.join(",")
                );
            }
            if s.rules.values().any(|r| !r.mandatory && vm_vm(r.kind)) {
                println!("* VM-VM should rule: enforced as must (known limitation)");
            }
        }
    }
    Ok(())
}

fn vm_vm(kind: RuleKind) -> bool {
    matches!(kind, RuleKind::VmVmAffinity | RuleKind::VmVmAntiAffinity)
}
