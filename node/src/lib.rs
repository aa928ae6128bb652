//! tern-node: the host agent (`tern node`): a Raft member plus its HTTP API, this host's VMs,
//! the migration executor, and on the leader the DRS, maintenance and schedule loops.
//!
//! Module map (docs/architecture.md has the picture): `api` is the HTTP edge and nothing else
//! imports it; services (`vms`, `migrations`, `maintenance`, `drs`, `schedules`, `members`,
//! `load`) hold the logic the handlers and the leader's `controller` loop call; `cluster` is the
//! client everything uses to commit and read through the leader. No two modules import each
//! other (checked by `layout_tests`).
pub mod access;
pub mod admission;
pub mod api;
pub mod auth;
pub mod cgroup;
pub mod client;
pub mod cluster;
pub mod controller;
pub mod cron;
pub mod datastore;
pub mod drs;
pub mod error;
pub mod host;
mod host_info;
pub mod inbound;
mod join;
#[cfg(test)]
mod layout_tests;
pub mod leader_state;
pub mod listener;
pub mod liveness;
pub mod load;
pub mod maintenance;
pub mod members;
mod metrics;
pub mod migrations;
pub mod outbound;
pub mod pki;
pub mod queue_view;
mod raft_rpc;
pub mod sched_view;
pub mod schedules;
pub mod supervisor;
pub mod vmm_watch;
pub mod vms;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tern_consensus::state::Command;
use tern_consensus::{ConsensusNode, RaftOptions};

pub struct NodeConfig {
    pub id: u64,
    pub listen: String,
    pub data: PathBuf,
    pub bootstrap: bool,
    pub join: Option<String>,
    /// The join token (`tern cluster join-token`) a new node presents with `join`.
    pub join_token: Option<String>,
    /// Address peers use for this node (default: the bound address).
    pub advertise: Option<String>,
    pub raft: RaftOptions,
    /// Shared directory holding VM configs and disks (same path on every node).
    pub datastore: Option<PathBuf>,
    /// How often VM load is sampled and reported to the leader.
    pub load_interval: Duration,
    /// Bandwidth cap per outbound migration, MiB/s (0 = none).
    pub migrate_bandwidth_mib: u64,
    /// Capacity offered to VMs, when less than the machine's (several nodes on one machine).
    pub capacity_memory_mib: Option<u64>,
    pub capacity_cpus: Option<u32>,
    /// A host silent this long is marked down (not-responding after three missed reports).
    pub host_down_after: Duration,
}

pub async fn serve(cfg: NodeConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data)
        .with_context(|| format!("creating {}", cfg.data.display()))?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let bound = listener.local_addr()?;
    let addr = cfg.advertise.clone().unwrap_or_else(|| bound.to_string());
    let mut raft_opts = cfg.raft.clone();
    raft_opts.source_ip = (!bound.ip().is_unspecified()).then_some(bound.ip());
    let addrs = vec![bound.to_string(), addr.clone()];
    let (tls, admin_secret) = join::identity(&cfg, &addrs).await?;
    let tls = Arc::new(tls);
    let node = ConsensusNode::open(
        cfg.id,
        addr.clone(),
        &cfg.data,
        &raft_opts,
        Arc::new(tls.peer_client_config()?),
    )
    .await
    .context("opening raft")?;
    let prometheus = metrics::install(&node)?;
    let cluster = cluster::Cluster::new(node.clone())?;
    let datastore = match &cfg.datastore {
        Some(d) => Some(datastore::Datastore::open(d)?),
        None => None,
    };
    let ip = listener.local_addr()?.ip().to_string();
    let binary = std::env::current_exe().context("locating the tern binary for VMMs")?;
    let vmms = supervisor::Supervisor::new(&cfg.data, binary, cfg.id);
    let ctx = host::HostCtx::new(cfg.id, cluster.clone(), node.clone(), datastore, ip, vmms);
    if cfg.datastore.is_some() {
        enforce_pools(&ctx, &cfg);
    }
    ctx.migrate_bandwidth.store(
        cfg.migrate_bandwidth_mib.saturating_mul(1 << 20),
        std::sync::atomic::Ordering::Relaxed,
    );
    let router = api::router(ctx.clone(), prometheus, tls.clone()).layer(
        axum::middleware::from_fn_with_state(node.clone(), auth::authorize),
    );
    let server = tokio::spawn(listener::serve(
        listener,
        tls.server_config()?,
        router,
        listener::Limits::default(),
    ));
    tracing::info!(id = cfg.id, %addr, "node listening");
    println!("tern node {} listening on {bound}", cfg.id);

    let initialized = node.raft.is_initialized().await?;
    if cfg.bootstrap {
        node.bootstrap().await?;
        if let Some(secret) = admin_secret {
            tokio::spawn(join::create_admin_token(cluster.clone(), secret));
        }
    } else if !initialized {
        let (Some(seed), Some(token)) = (cfg.join.clone(), cfg.join_token.clone()) else {
            anyhow::bail!("a new node needs --bootstrap, or --join ADDR with --join-token");
        };
        tokio::spawn(join::join_loop(
            tls.clone(),
            seed,
            cfg.id,
            addr.clone(),
            token,
        ));
    }
    let mut info = host_info::probe();
    if let Some(m) = cfg.capacity_memory_mib {
        info.capacity.memory_mib = m;
    }
    if let Some(c) = cfg.capacity_cpus {
        info.capacity.cpus = c;
    }
    tokio::spawn(register_loop(cluster, cfg.id, addr, info));
    // VMMs a previous run of this node left are adopted before anything else touches VMs.
    let vm_ctx = ctx.clone();
    tokio::spawn(async move {
        if vm_ctx.datastore.is_some() {
            vmm_watch::adopt(vm_ctx.clone()).await;
        }
        tokio::spawn(vmm_watch::watch_loop(vm_ctx.clone()));
        tokio::spawn(host::reconcile_loop(vm_ctx.clone()));
        outbound::executor_loop(vm_ctx).await;
    });
    let liveness = liveness::LivenessConfig {
        not_responding_after_ms: 3 * cfg.load_interval.as_millis() as u64,
        down_after_ms: (cfg.host_down_after.as_millis() as u64)
            .max(4 * cfg.load_interval.as_millis() as u64),
    };
    tokio::spawn(controller::controller_loop(ctx.clone(), liveness));
    tokio::spawn(load::report_loop(ctx.clone(), cfg.load_interval));

    tokio::select! {
        res = server => { res??; }
        _ = tokio::signal::ctrl_c() => { tracing::info!("shutting down"); }
    }
    node.raft.shutdown().await.ok();
    Ok(())
}

/// Put this host's VMs in cgroups of their pools (see `cgroup`); without cgroups the node
/// still runs VMs, with a warning.
fn enforce_pools(ctx: &host::HostCtx, cfg: &NodeConfig) {
    cgroup::sweep_empty();
    let name = cgroup::node_name(cfg.id, &cfg.data);
    match cgroup::Cgroups::open(&name, cgroup::NodeWeight::PerVcpu) {
        Ok(cg) => {
            let _ = ctx.cgroups.set(cg);
        }
        Err(e) => tracing::warn!("resource pools are not enforced on this host: {e}"),
    }
}

/// Record this host (address, capacity, CPU features) in the cluster state, until committed.
async fn register_loop(
    cluster: cluster::Cluster,
    id: u64,
    addr: String,
    info: host_info::HostInfo,
) {
    let command = Command::RegisterHost {
        id,
        address: addr,
        capacity: info.capacity,
        cpu_features: info.cpu_features,
    };
    loop {
        match cluster
            .propose(format!("host/{id}"), None, command.clone(), false)
            .await
        {
            Ok(_) => return,
            Err(e) => tracing::debug!("registering host: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
