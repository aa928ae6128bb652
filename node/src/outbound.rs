//! The source side: the executor runs this host's queued migration tasks in priority order
//! within the slots (checked again when `Running` is committed), streams each VM to the
//! destination's per-task listener, and gates the switchover on the Raft commit of ownership.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_consensus::state::{
    Command, CommandError, MigrationTask, TaskId, TaskState, TaskStats, VmState,
};
use tern_consensus::{Applied, ClusterState};
use tern_hypervisor::migration::{
    migrate, CancelToken, MigrationConfig, MigrationError, MigrationStats, Phase, Progress,
};

use super::error::ServiceError;
use super::host::{HostCtx, TaskProgress};

#[derive(serde::Serialize, serde::Deserialize)]
pub struct PrepareBody {
    pub task: TaskId,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct PrepareReply {
    pub listen: String,
}

fn actor(ctx: &HostCtx) -> String {
    format!("host/{}", ctx.id)
}

/// How long the source keeps trying to commit the switchover before it fences the VM.
const SWITCHOVER_COMMIT_WAIT: Duration = Duration::from_secs(3);

/// Commit `command`, retrying while the outcome is unknown (no leader, timeouts), until
/// `limit` has passed (`None`: for as long as it takes). Returns the definite result, or the
/// last unknown-outcome error once the limit has passed.
fn commit_within(
    ctx: &HostCtx,
    command: Command,
    limit: Option<Duration>,
) -> Result<Applied, ServiceError> {
    let deadline = limit.map(|l| Instant::now() + l);
    loop {
        match ctx.handle.block_on(
            ctx.cluster
                .propose(actor(ctx), None, command.clone(), false),
        ) {
            Ok(a) => return Ok(a),
            Err(e) if e.rejected.is_some() || deadline.is_some_and(|d| Instant::now() >= d) => {
                return Err(e)
            }
            Err(e) => {
                tracing::warn!("commit outcome unknown, retrying: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Commit `command`, retrying while the outcome is unknown, for up to an hour.
fn commit_until_known(ctx: &HostCtx, command: Command) -> Result<Applied, ServiceError> {
    commit_within(ctx, command, Some(Duration::from_secs(3600)))
}

/// Whether `e` says the VM is already at `owner`, `epoch` (an earlier attempt of ours won).
fn already(e: &ServiceError, owner: u64, epoch: u64) -> bool {
    matches!(
        e.rejected,
        Some(CommandError::OwnershipConflict { owner: o, epoch: e2, .. }) if o == owner && e2 == epoch
    )
}

/// The switchover gate: commit `vm := to, epoch + 1`. `Ok` means committed (the destination may
/// resume); `Err` means certainly not committed (the source resumes). When the outcome stays
/// unknown, the VM stays paused while this host commits a fence (owner kept, epoch + 1),
/// retrying for as long as it takes: the fence and the transfer are compare-and-sets on the same
/// epoch, so exactly one of them wins and its result tells the outcome for certain.
fn switchover(ctx: &HostCtx, vm: &str, epoch: u64, to: u64) -> Result<(), String> {
    let transfer = Command::TransferOwnership {
        vm: vm.to_string(),
        expected_owner: ctx.id,
        expected_epoch: epoch,
        to,
    };
    let unknown = match commit_within(ctx, transfer, Some(SWITCHOVER_COMMIT_WAIT)) {
        Ok(_) => return Ok(()),
        Err(e) if already(&e, to, epoch + 1) => return Ok(()),
        Err(e) if e.rejected.is_some() => return Err(e.to_string()),
        Err(e) => e,
    };
    tracing::warn!(
        vm,
        "switchover commit outcome unknown ({unknown}); fencing, the VM stays paused until known"
    );
    let fence = Command::FenceVm {
        vm: vm.to_string(),
        expected_owner: ctx.id,
        expected_epoch: epoch,
    };
    match commit_within(ctx, fence, None) {
        Err(e) if already(&e, to, epoch + 1) => Ok(()),
        Ok(_) => fenced(ctx, vm, epoch, &unknown),
        Err(e) if already(&e, ctx.id, epoch + 1) => fenced(ctx, vm, epoch, &unknown),
        Err(e) => {
            // Neither this host nor the destination holds the next epoch: the VM is not ours
            // to resume. Passing the gate lets the destination check the committed owner itself
            // (it will not resume either) and makes this host drop its paused copy.
            tracing::error!(vm, "fence refused: {e}; the VM will not resume here");
            Ok(())
        }
    }
}

fn fenced(ctx: &HostCtx, vm: &str, epoch: u64, unknown: &ServiceError) -> Result<(), String> {
    if let Some(l) = ctx.vms().get_mut(vm) {
        l.epoch = epoch + 1;
    }
    Err(format!(
        "switchover commit outcome was unknown ({unknown}); fenced at epoch {}: the VM resumes on \
         the source",
        epoch + 1
    ))
}

/// Executor loop: on every committed change (and once a second), cancel what was cancelled and
/// start what may start.
pub async fn executor_loop(ctx: Arc<HostCtx>) {
    let mut rx = ctx.node.machine.subscribe();
    loop {
        let state = rx.borrow_and_update().state.clone();
        step(&ctx, &state);
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn step(ctx: &Arc<HostCtx>, state: &ClusterState) {
    let mut cancels = ctx.cancels.lock().unwrap_or_else(|p| p.into_inner());
    for (id, token) in cancels.iter() {
        if state
            .tasks
            .get(id)
            .is_some_and(|t| t.state == TaskState::Cancelled)
        {
            token.cancel();
        }
    }
    // The scheduler's queue decides, over the whole cluster's committed tasks, which may start.
    // Start only the first of ours; the commit of `Running` re-runs this step.
    let Some(task) = super::queue_view::startable(state, ctx.id)
        .into_iter()
        .filter(|id| !cancels.contains_key(id))
        .find_map(|id| state.tasks.get(&id))
    else {
        return;
    };
    let token = CancelToken::new();
    cancels.insert(task.id, token.clone());
    let (ctx, task) = (ctx.clone(), task.clone());
    std::thread::spawn(move || {
        run_task(&ctx, task.clone(), &token);
        ctx.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&task.id);
        ctx.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&task.id);
    });
}

fn run_task(ctx: &Arc<HostCtx>, task: MigrationTask, cancel: &CancelToken) {
    let start = Command::UpdateTask {
        id: task.id,
        state: TaskState::Running,
        stats: None,
        error: None,
    };
    if let Err(e) = ctx
        .handle
        .block_on(ctx.cluster.propose(actor(ctx), None, start, false))
    {
        tracing::debug!(task = task.id, "not started: {e}");
        return;
    }
    tracing::info!(task = task.id, vm = %task.vm, to = task.to, "migration started");
    let (state, stats, error) = match execute(ctx, &task, cancel) {
        Ok(s) => (TaskState::Succeeded, Some(s), None),
        Err((s, e)) => {
            let st = if cancel.is_cancelled() {
                TaskState::Cancelled
            } else {
                TaskState::Failed
            };
            (st, s, Some(e))
        }
    };
    tracing::info!(task = task.id, ?state, ?error, "migration finished");
    let result = format!("{state:?}").to_lowercase();
    metrics::counter!("tern_migrations_total", "result" => result).increment(1);
    if let Some(s) = &stats {
        metrics::counter!("tern_migration_bytes_total").increment(s.bytes);
        if state == TaskState::Succeeded {
            metrics::histogram!("tern_migration_downtime_seconds")
                .record(s.downtime_us as f64 / 1e6);
            metrics::histogram!("tern_migration_total_seconds").record(s.total_ms as f64 / 1e3);
        }
    }
    let done = Command::UpdateTask {
        id: task.id,
        state,
        stats,
        error,
    };
    if let Err(e) = commit_until_known(ctx, done) {
        tracing::debug!(task = task.id, "final update: {e}");
    }
}

fn stats_of(s: &MigrationStats) -> TaskStats {
    TaskStats {
        downtime_us: s.downtime.as_micros() as u64,
        total_ms: s.total.as_millis() as u64,
        bytes: s.bytes_sent,
        rounds: s.rounds,
    }
}

type TaskResult = Result<TaskStats, (Option<TaskStats>, String)>;

fn execute(ctx: &Arc<HostCtx>, task: &MigrationTask, cancel: &CancelToken) -> TaskResult {
    let fail = |e: String| (None, e);
    let state = ctx.state();
    let vm_state = state
        .vms
        .get(&task.vm)
        .ok_or_else(|| fail(format!("vm {} no longer exists", task.vm)))?;
    let epoch = vm_state.epoch;
    if vm_state.owner != ctx.id {
        return Err(fail(format!(
            "vm {} is owned by host {}",
            task.vm, vm_state.owner
        )));
    }
    let transfer = Command::TransferOwnership {
        vm: task.vm.clone(),
        expected_owner: ctx.id,
        expected_epoch: epoch,
        to: task.to,
    };
    if vm_state.state == VmState::Stopped {
        // Cold migration: nothing runs, ownership is all there is to move.
        ctx.stop_local(&task.vm);
        return commit_until_known(ctx, transfer)
            .map(|_| TaskStats::default())
            .map_err(|e| fail(e.to_string()));
    }
    let vm = {
        let mut vms = ctx.vms();
        let local = vms
            .get_mut(&task.vm)
            .filter(|l| l.epoch == epoch && !l.migrating)
            .ok_or_else(|| fail(format!("vm {} is not running on this host", task.vm)))?;
        local.migrating = true;
        local.vm.clone()
    };
    let result = stream(ctx, task, &vm, epoch, cancel);
    match &result {
        Ok(_) | Err(MigrationError::OutcomeUnknown(_)) => {
            // Ownership was committed to the destination: this paused copy must never run.
            ctx.stop_local(&task.vm);
        }
        Err(_) => {
            if let Some(l) = ctx.vms().get_mut(&task.vm) {
                l.migrating = false;
            }
        }
    }
    match result {
        Ok(s) => Ok(stats_of(&s)),
        Err(MigrationError::OutcomeUnknown(e)) => Err(fail(format!(
            "ownership committed to host {} but its resume was not confirmed: {e}",
            task.to
        ))),
        Err(e) => Err(fail(e.to_string())),
    }
}

fn stream(
    ctx: &Arc<HostCtx>,
    task: &MigrationTask,
    vm: &Arc<tern_hypervisor::migration::KvmMigratable>,
    epoch: u64,
    cancel: &CancelToken,
) -> Result<MigrationStats, MigrationError> {
    let state = ctx.state();
    let dest = state
        .hosts
        .get(&task.to)
        .ok_or_else(|| MigrationError::Refused(format!("host {} is gone", task.to)))?;
    let reply: PrepareReply = ctx
        .handle
        .block_on(ctx.cluster.post_json(
            &dest.address,
            "/v1/migrations/prepare",
            &PrepareBody { task: task.id },
            false,
        ))
        .map_err(|e| MigrationError::Refused(format!("destination: {e}")))?;
    let addr: SocketAddr = reply
        .listen
        .parse()
        .map_err(|e| MigrationError::Refused(format!("destination address: {e}")))?;
    let cfg = MigrationConfig {
        token: task.token.clone(),
        downtime_target: Duration::from_millis(20),
        io_timeout: Duration::from_secs(10),
        bandwidth_limit: ctx
            .migrate_bandwidth
            .load(std::sync::atomic::Ordering::Relaxed),
        ..Default::default()
    };
    let name = task.vm.clone();
    let to = task.to;
    let gate_ctx = ctx.clone();
    let gate_cancel = cancel.clone();
    let gate = Box::new(move || {
        if gate_cancel.is_cancelled() {
            return Err("cancelled".to_string());
        }
        switchover(&gate_ctx, &name, epoch, to)?;
        // This host no longer owns the VM: let the destination take the datastore lock.
        if let Some(l) = gate_ctx.vms().get_mut(&name) {
            l.lock = None;
        }
        Ok(())
    });
    let id = task.id;
    let mut on_progress = |p: &Progress| {
        let phase = match p.phase {
            Phase::Handshake => "handshake",
            Phase::FirstPass => "first-pass",
            Phase::DirtyRounds => "dirty-rounds",
            Phase::StopAndCopy => "stop-and-copy",
            Phase::Switchover => "switchover",
            Phase::Done => "done",
        };
        ctx.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                TaskProgress {
                    phase: phase.to_string(),
                    round: p.round,
                    bytes_sent: p.bytes_sent,
                    bytes_remaining: p.bytes_remaining,
                },
            );
    };
    migrate(&**vm, addr, &cfg, gate, cancel, &mut on_progress)
}
