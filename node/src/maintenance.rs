//! Maintenance mode: entering marks the host (it takes no new VMs); on the leader, each pass
//! queues evacuation moves for its idle VMs and marks it in maintenance once it owns nothing.
use serde::{Deserialize, Serialize};
use tern_consensus::state::{Command, HostState};
use tern_consensus::{Applied, ClusterState};
use tern_scheduler::{evacuate, Config, Move};

use super::cluster::now_ms;
use super::error::ServiceError;
use super::host::HostCtx;
use super::migrations::queue_moves;
use super::sched_view::{self, host_key};

#[derive(Debug, Serialize, Deserialize)]
pub struct MaintenanceBody {
    pub enter: bool,
    #[serde(default)]
    pub actor: Option<String>,
}

/// Enter: the host stops taking VMs and the leader evacuates it. Exit: back to connected.
pub async fn set(ctx: &HostCtx, id: u64, body: MaintenanceBody) -> Result<Applied, ServiceError> {
    let state = ctx.state();
    let host = state
        .hosts
        .get(&id)
        .ok_or_else(|| ServiceError::not_found(format!("no host {id}")))?;
    let target = if body.enter {
        if host.state == HostState::InMaintenance {
            HostState::InMaintenance
        } else {
            HostState::EnteringMaintenance
        }
    } else {
        HostState::Connected
    };
    let actor = body.actor.unwrap_or_else(|| "api".into());
    ctx.cluster
        .propose(
            actor,
            None,
            Command::SetHostState { id, state: target },
            false,
        )
        .await
}

/// Hosts entering maintenance: queue evacuation moves for VMs without a task; mark the host
/// in maintenance once it owns nothing.
pub async fn pass(ctx: &HostCtx, state: &ClusterState) {
    for host in state.hosts.values() {
        if host.state != HostState::EnteringMaintenance {
            continue;
        }
        let owned = state.vms.values().filter(|v| v.owner == host.id).count();
        if owned == 0 {
            let cmd = Command::SetHostState {
                id: host.id,
                state: HostState::InMaintenance,
            };
            if let Err(e) = ctx
                .cluster
                .propose("maintenance".into(), None, cmd, false)
                .await
            {
                tracing::debug!("marking host {} in maintenance: {e}", host.id);
            }
            continue;
        }
        let busy = |vm: &str| {
            state
                .tasks
                .values()
                .any(|t| t.vm == vm && !t.state.is_final())
        };
        let idle: Vec<&String> = state
            .vms
            .iter()
            .filter(|(n, v)| v.owner == host.id && !busy(n))
            .map(|(n, _)| n)
            .collect();
        if idle.is_empty() {
            continue;
        }
        let loads = ctx.leader.loads(state);
        let plan = sched_view::cluster(state, &loads, now_ms() as f64 / 1000.0).and_then(|c| {
            evacuate(&c, &host_key(host.id), &Config::default()).map_err(|e| anyhow::anyhow!("{e}"))
        });
        match plan {
            Ok(ev) => {
                let moves: Vec<Move> = ev
                    .moves
                    .into_iter()
                    .filter(|m| idle.contains(&&m.vm))
                    .collect();
                let n = queue_moves(ctx, &moves, "maintenance", "maintenance").await;
                if n > 0 {
                    tracing::info!(host = host.id, n, "evacuation tasks queued");
                }
                for s in ev.stuck {
                    tracing::warn!(host = host.id, vm = %s.vm, "cannot evacuate: {}", s.reason);
                }
            }
            Err(e) => tracing::warn!(host = host.id, "evacuation plan: {e:#}"),
        }
    }
}
