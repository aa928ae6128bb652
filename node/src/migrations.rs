//! Migration tasks: queueing one (a Raft command; the source node's executor runs it),
//! cancelling, progress, and the destination's prepare step.
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tern_consensus::state::{Command, TaskId, TaskState};
use tern_consensus::Applied;
use tern_scheduler::Move;

use super::error::ServiceError;
use super::host::{HostCtx, TaskProgress};
use super::inbound::{prepare, Refusal};
use super::outbound::{PrepareBody, PrepareReply};
use super::queue_view::{self, PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL};
use super::sched_view::parse_host;

#[derive(Debug, Serialize, Deserialize)]
pub struct MigrationBody {
    pub vm: String,
    pub to: u64,
    #[serde(default = "default_priority")]
    pub priority: u8,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub actor: Option<String>,
}

fn default_priority() -> u8 {
    PRIORITY_NORMAL
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MigrationReply {
    pub task: TaskId,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CancelBody {
    #[serde(default)]
    pub actor: Option<String>,
}

/// 128 random bits from the kernel, hex.
pub fn new_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Queue a migration task (the source node's executor runs it).
pub async fn queue_migration(ctx: &HostCtx, body: MigrationBody) -> Result<TaskId, ServiceError> {
    if body.priority >= PRIORITY_HIGH {
        let state = ctx.state();
        let from = state
            .vms
            .get(&body.vm)
            .map(|v| v.owner)
            .ok_or_else(|| ServiceError::not_found(format!("no vm {}", body.vm)))?;
        queue_view::admit_high(&state, &body.vm, from, body.to).map_err(ServiceError::conflict)?;
    }
    let token = new_token().map_err(|e| ServiceError::internal(e.to_string()))?;
    let applied = ctx
        .cluster
        .propose(
            body.actor.unwrap_or_else(|| "api".into()),
            None,
            Command::CreateTask {
                vm: body.vm,
                to: body.to,
                priority: body.priority,
                reason: body.reason.unwrap_or_else(|| "manual".into()),
                token,
            },
            false,
        )
        .await?;
    match applied {
        Applied::TaskCreated { id } => Ok(id),
        other => Err(ServiceError::internal(format!(
            "unexpected result {other:?}"
        ))),
    }
}

/// The task priority of a scheduler move (its priority 1 is the most urgent).
fn priority_of(m: &Move) -> u8 {
    match m.priority {
        1 => PRIORITY_HIGH,
        2 | 3 => PRIORITY_NORMAL,
        _ => PRIORITY_LOW,
    }
}

/// Queue the scheduler's moves as tasks; returns how many were queued.
pub async fn queue_moves(ctx: &HostCtx, moves: &[Move], reason: &str, actor: &str) -> usize {
    let mut queued = 0;
    for m in moves {
        let Some(to) = parse_host(&m.to) else {
            continue;
        };
        let body = MigrationBody {
            vm: m.vm.clone(),
            to,
            priority: if reason == "maintenance" {
                PRIORITY_NORMAL
            } else {
                priority_of(m)
            },
            reason: Some(reason.to_string()),
            actor: Some(actor.to_string()),
        };
        match queue_migration(ctx, body).await {
            Ok(_) => queued += 1,
            Err(e) => tracing::debug!(vm = %m.vm, "not queued: {e}"),
        }
    }
    queued
}

/// Open this host's listener for an inbound task (asked by the task's source).
pub async fn prepare_inbound(
    ctx: Arc<HostCtx>,
    body: PrepareBody,
) -> Result<PrepareReply, ServiceError> {
    match prepare(ctx, body.task).await {
        Ok(listen) => Ok(PrepareReply { listen }),
        Err(Refusal::NoTask(id)) => Err(ServiceError::not_found(format!("no committed task {id}"))),
        Err(Refusal::Invalid(m)) => Err(ServiceError::conflict(m)),
        Err(Refusal::Unavailable(m)) => Err(ServiceError::unavailable(m)),
    }
}

/// Cancel a task on behalf of `actor` (default `api`).
pub async fn cancel(
    ctx: &HostCtx,
    id: TaskId,
    actor: Option<String>,
) -> Result<Applied, ServiceError> {
    let actor = actor.unwrap_or_else(|| "api".into());
    ctx.cluster
        .propose(
            actor.clone(),
            None,
            Command::UpdateTask {
                id,
                state: TaskState::Cancelled,
                stats: None,
                error: Some(format!("cancelled by {actor}")),
            },
            false,
        )
        .await
}

/// Progress of a task this host is sending.
pub fn progress(ctx: &HostCtx, id: TaskId) -> Result<TaskProgress, ServiceError> {
    ctx.progress
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&id)
        .cloned()
        .ok_or_else(|| ServiceError::not_found(format!("task {id} is not running here")))
}
