//! `tern vm create|list|show|stop|start|destroy`: cluster VMs through a node's API.
use anyhow::Context;
use clap::{Args, Subcommand};
use tern_consensus::ClusterState;
use tern_hypervisor::workload::parse_size;

use super::cluster::{get, post, ServerArg};

#[derive(Subcommand)]
pub enum ClusterVmCommand {
    /// Create a VM in the cluster and start it (placed by the scheduler unless --host is given).
    Create(CreateArgs),
    /// List the cluster's VMs.
    List {
        #[command(flatten)]
        server: ServerArg,
        #[arg(long)]
        json: bool,
    },
    /// Show one VM, with its guest's live status from the owner node.
    Show {
        name: String,
        #[command(flatten)]
        server: ServerArg,
        #[arg(long)]
        json: bool,
    },
    /// Stop a VM (it keeps its owner and datastore files).
    Stop {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Start a stopped VM on its owner.
    Start {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Stop and delete a VM and its datastore files.
    Destroy {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    name: String,
    /// Guest RAM (K/M/G suffix).
    #[arg(long, default_value = "512M")]
    memory: String,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest workload: wss=SIZE,rate=PAGES_PER_S,pattern=seq|random|hotcold,duty=1..100.
    #[arg(long, default_value = "wss=64M,rate=5000,pattern=random,duty=20")]
    workload: String,
    #[arg(long)]
    pool: Option<String>,
    /// Size of the VM's disk (a sparse raw disk.img on the datastore; K/M/G suffix, whole MiB).
    #[arg(long, default_value = "1G")]
    disk: String,
    /// When the VM's process dies: `always` cold-boot it again on the same host, or `never`.
    #[arg(long, default_value = "always", value_parser = ["always", "never"])]
    restart: String,
    /// Host id to run on (default: the scheduler places it).
    #[arg(long)]
    host: Option<u64>,
    #[arg(long, env = "TERN_USER")]
    user: Option<String>,
    #[command(flatten)]
    server: ServerArg,
}

pub fn run(cmd: ClusterVmCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterVmCommand::Create(a) => {
            let memory = parse_size(&a.memory).context("--memory")?;
            let disk_mib = disk_mib(&a.disk).context("--disk")?;
            let body = serde_json::json!({
                "name": a.name, "memory_mib": memory >> 20, "vcpus": a.vcpus,
                "workload": a.workload, "pool": a.pool, "host": a.host, "actor": a.user,
                "disk_mib": disk_mib, "restart": a.restart,
            });
            let reply: serde_json::Value = post(&a.server.server, "/v1/vms", &body)?;
            println!(
                "vm {} created on host {}",
                a.name,
                reply.get("host").and_then(|h| h.as_u64()).unwrap_or(0)
            );
            Ok(())
        }
        ClusterVmCommand::List { server, json } => {
            let (state, _): (ClusterState, String) = get(&server.server, "/v1/state")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&state.vms)?);
                return Ok(());
            }
            println!(
                "{:<16} {:>5} {:>6} {:>9} {:>6} {:<10}",
                "NAME", "HOST", "VCPUS", "MEM MiB", "EPOCH", "STATE"
            );
            for (name, vm) in &state.vms {
                println!(
                    "{:<16} {:>5} {:>6} {:>9} {:>6} {:<10}",
                    name,
                    vm.owner,
                    vm.spec.vcpus,
                    vm.spec.memory_mib,
                    vm.epoch,
                    format!("{:?}", vm.state).to_lowercase()
                );
            }
            Ok(())
        }
        ClusterVmCommand::Show { name, server, json } => show(&server.server, &name, json),
        ClusterVmCommand::Stop { name, server } => {
            let _: serde_json::Value = post(&server.server, &format!("/v1/vms/{name}/stop"), &())?;
            println!("vm {name} stopped");
            Ok(())
        }
        ClusterVmCommand::Start { name, server } => {
            let _: serde_json::Value = post(&server.server, &format!("/v1/vms/{name}/start"), &())?;
            println!("vm {name} started");
            Ok(())
        }
        ClusterVmCommand::Destroy { name, server } => {
            let _: serde_json::Value =
                post(&server.server, &format!("/v1/vms/{name}/destroy"), &())?;
            println!("vm {name} destroyed");
            Ok(())
        }
    }
}

/// A disk size as whole MiB, at least 1 MiB.
fn disk_mib(s: &str) -> anyhow::Result<u64> {
    let bytes = parse_size(s)?;
    anyhow::ensure!(
        bytes >= 1 << 20 && bytes % (1 << 20) == 0,
        "{s:?}: a disk is a whole number of MiB, at least 1M (e.g. 512M, 1G)"
    );
    Ok(bytes >> 20)
}

fn show(server: &str, name: &str, json: bool) -> anyhow::Result<()> {
    let (state, _): (ClusterState, String) = get(server, "/v1/state")?;
    let vm = state
        .vms
        .get(name)
        .with_context(|| format!("no vm {name:?}"))?;
    let owner_addr = state.hosts.get(&vm.owner).map(|h| h.address.clone());
    let guest: Option<serde_json::Value> = owner_addr
        .and_then(|addr| get::<serde_json::Value>(&addr, &format!("/v1/vms/{name}/guest")).ok())
        .map(|(v, _)| v);
    let config: Option<serde_json::Value> =
        get::<serde_json::Value>(server, &format!("/v1/vms/{name}/config"))
            .ok()
            .map(|(v, _)| v);
    if json {
        let out = serde_json::json!({ "vm": vm, "guest": guest, "config": config });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("name:    {name}");
    println!("owner:   host {} (epoch {})", vm.owner, vm.epoch);
    println!("state:   {:?}", vm.state);
    println!("vcpus:   {}", vm.spec.vcpus);
    println!("memory:  {} MiB", vm.spec.memory_mib);
    match config
        .as_ref()
        .and_then(|c| c.get("disk_mib"))
        .and_then(|d| d.as_u64())
    {
        Some(mib) => println!("disk:    {mib} MiB (disk.img on the datastore)"),
        None => println!("disk:    unknown (no datastore on this node)"),
    }
    if let Some(pool) = &vm.pool {
        println!("pool:    {pool}");
    }
    match guest.as_ref().and_then(|g| g.get("status")) {
        Some(s) => println!(
            "guest:   {} pages written, {} verified, {} mismatches",
            s.get("pages_written").and_then(|v| v.as_u64()).unwrap_or(0),
            s.get("pages_verified")
                .and_then(|v| v.as_u64())
                .unwrap_or(0),
            s.get("mismatches").and_then(|v| v.as_u64()).unwrap_or(0),
        ),
        None => println!("guest:   not running"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::disk_mib;

    #[test]
    fn disk_sizes_are_whole_mib() {
        assert_eq!(disk_mib("1G").unwrap(), 1024);
        assert_eq!(disk_mib("512M").unwrap(), 512);
        assert_eq!(disk_mib("1048576").unwrap(), 1);
        for bad in ["0", "100K", "1536K1", "1.5G", "-1G", "", "1T", "1025K"] {
            assert!(disk_mib(bad).is_err(), "{bad:?}");
        }
    }
}
