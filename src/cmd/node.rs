//! `tern node`: the host agent daemon (Raft member + HTTP API).
use std::path::PathBuf;

use clap::Args;
use tern_consensus::RaftOptions;

use tern_node::{serve, NodeConfig};

#[derive(Args)]
pub struct NodeArgs {
    /// This node's id (also its host id); unique in the cluster, never reused.
    #[arg(long)]
    id: u64,
    /// Address for the HTTP API and Raft traffic, e.g. 127.0.0.1:7400.
    #[arg(long)]
    listen: String,
    /// Address the other members use to reach this node (default: the bound listen address),
    /// e.g. a proxy in front of it. Outgoing peer connections leave from the listen IP.
    #[arg(long)]
    advertise: Option<String>,
    /// Data directory (Raft log and state machine live here).
    #[arg(long)]
    data: PathBuf,
    /// Start a new one-node cluster (ignored if the data directory already holds one).
    #[arg(long, conflicts_with = "join")]
    bootstrap: bool,
    /// Join the cluster through any member's address (ignored when restarting a member).
    #[arg(long)]
    join: Option<String>,
    /// The join token a new node presents (`tern cluster join-token` on the cluster).
    #[arg(long, env = "TERN_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Shared datastore directory for VM configs and disks (the same path on every node).
    #[arg(long)]
    datastore: Option<PathBuf>,
    /// How often this node samples its VMs' load and reports it to the leader (milliseconds).
    #[arg(long, default_value_t = 2000)]
    load_interval_ms: u64,
    /// A host whose reports stop is marked not-responding after three missed reports and down
    /// after this many milliseconds.
    #[arg(long, default_value_t = 15000)]
    host_down_after_ms: u64,
    /// Bandwidth cap per outbound live migration in MiB/s (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    migrate_bandwidth_mib: u64,
    /// Memory this host offers to VMs, MiB (default: all of it, from /proc/meminfo).
    #[arg(long)]
    capacity_memory_mib: Option<u64>,
    /// CPUs this host offers to VMs (default: all of them).
    #[arg(long)]
    capacity_cpus: Option<u32>,
    /// Raft heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    heartbeat_ms: u64,
    /// Minimum election timeout in milliseconds (the maximum is twice this).
    #[arg(long, default_value_t = 300)]
    election_ms: u64,
    /// Build a snapshot after this many log entries (then purge the log behind it).
    #[arg(long, default_value_t = 5000)]
    snapshot_every: u64,
    /// Log entries kept behind a snapshot.
    #[arg(long, default_value_t = 1000)]
    keep_after_snapshot: u64,
    /// Do not flush the log to disk before acknowledging (unsafe; only to measure its cost).
    #[arg(long)]
    no_fsync: bool,
    /// A write not committed within this many milliseconds answers 503 (outcome unknown).
    #[arg(long, default_value_t = 5000)]
    write_timeout_ms: u64,
}

pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    let cfg = NodeConfig {
        id: args.id,
        listen: args.listen,
        data: args.data,
        bootstrap: args.bootstrap,
        join: args.join,
        join_token: args.join_token,
        datastore: args.datastore,
        migrate_bandwidth_mib: args.migrate_bandwidth_mib,
        capacity_memory_mib: args.capacity_memory_mib,
        capacity_cpus: args.capacity_cpus,
        load_interval: std::time::Duration::from_millis(args.load_interval_ms.max(100)),
        advertise: args.advertise,
        host_down_after: std::time::Duration::from_millis(args.host_down_after_ms),
        raft: RaftOptions {
            heartbeat_ms: args.heartbeat_ms,
            election_min_ms: args.election_ms,
            election_max_ms: args.election_ms * 2,
            snapshot_every: args.snapshot_every,
            keep_after_snapshot: args.keep_after_snapshot,
            durable: !args.no_fsync,
            write_timeout_ms: args.write_timeout_ms,
            // Set from the bound listen address by `serve`.
            source_ip: None,
        },
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(cfg))
}
