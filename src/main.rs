//! `tern`: the one binary. Host agent daemon (`tern node`), operator CLI, `tern demo`, `tern sim`.
//!
//! Each subcommand lives in its own module under `cmd/`, which owns its clap arguments and its
//! `run` function; this file only dispatches.
#![forbid(unsafe_code)]

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Live migration and cluster balancing for KVM hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run, migrate and receive virtual machines on this host's embedded hypervisor.
    Vm(cmd::vm::VmArgs),
    /// Run one VM as its own process, driven through its control socket (started by `tern node`).
    Vmm(cmd::vmm::VmmArgs),
    /// Write the built-in test guest image (a multiboot v1 ELF) to a file.
    GuestImage(cmd::guest::GuestImageArgs),
    /// Run the host agent: a Raft member with its HTTP API.
    Node(cmd::node::NodeArgs),
    /// Inspect the cluster.
    Cluster(cmd::cluster::ClusterArgs),
    /// Inspect and manage hosts.
    Host(cmd::cluster::HostArgs),
    /// DRS: the live cluster (status, recommendations, apply, set) or the scheduler on a snapshot file.
    Drs(cmd::drs::DrsArgs),
    /// Start a 3-node cluster here and narrate DRS, migrations and maintenance mode.
    Demo(cmd::demo::DemoArgs),
    /// Live-migrate a cluster VM to another host (a migration task run by its source node).
    Migrate(cmd::migrate::MigrateArgs),
    /// List, show and cancel migration tasks.
    Task(cmd::migrate::TaskArgs),
    /// The audit trail of migration tasks.
    Audit(cmd::migrate::AuditArgs),
    /// Resource pools (reservation, limit, shares).
    Pool(cmd::placement::PoolArgs),
    /// Affinity and anti-affinity rules (VM-VM, VM-host; must or should).
    Rule(cmd::placement::RuleArgs),
    /// Simulate a fleet under a balancing policy.
    Sim(cmd::sim::SimArgs),
    /// Operators' API tokens and their roles (admin, operator, auditor).
    Token(cmd::token::TokenArgs),
}

fn main() -> std::process::ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vm(args) => cmd::vm::run(args),
        Command::Vmm(args) => cmd::vmm::run(args),
        Command::GuestImage(args) => cmd::guest::run(args),
        Command::Node(args) => cmd::node::run(args),
        Command::Cluster(args) => cmd::cluster::run_cluster(args),
        Command::Host(args) => cmd::cluster::run_host(args),
        Command::Drs(args) => cmd::drs::run(args),
        Command::Sim(args) => cmd::sim::run(args),
        Command::Demo(args) => cmd::demo::run(args),
        Command::Migrate(args) => cmd::migrate::run_migrate(args),
        Command::Task(args) => cmd::migrate::run_task(args),
        Command::Audit(args) => cmd::migrate::run_audit(args),
        Command::Pool(args) => cmd::placement::run_pool(args),
        Command::Rule(args) => cmd::placement::run_rule(args),
        Command::Token(args) => cmd::token::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr so that `--json` output on stdout stays machine-readable.
/// `RUST_LOG` overrides the default level (warn).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
