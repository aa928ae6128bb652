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
use tern_hypervisor::migration::CancelToken;
use tern_hypervisor::vmm::protocol::{MigrationView, Tuning};
use tern_hypervisor::vmm::{GateDecision, Request, VmmState};

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

/// The answer for a source VMM waiting at its switchover gate. The lease is written before
/// the answer: the side that may run the VM next finds it naming itself at the new epoch.
fn gate_decision(
    ctx: &HostCtx,
    vm: &str,
    epoch: u64,
    to: u64,
    cancel: &CancelToken,
) -> GateDecision {
    if cancel.is_cancelled() {
        return GateDecision::Refused {
            reason: "cancelled".into(),
            epoch: None,
        };
    }
    let lease = |owner: u64, epoch: u64| {
        let written = ctx
            .datastore()
            .and_then(|ds| ds.write_lease(vm, owner, epoch));
        if let Err(e) = written {
            // The new owner's node writes it too once it applies the commit.
            tracing::warn!(vm, "lease not written: {e:#}");
        }
    };
    match switchover(ctx, vm, epoch, to) {
        Ok(()) => {
            lease(to, epoch + 1);
            GateDecision::Committed
        }
        Err(reason) => {
            let fenced = ctx.vms().get(vm).map(|l| l.epoch).filter(|&e| e > epoch);
            if let Some(e) = fenced {
                lease(ctx.id, e);
            }
            GateDecision::Refused {
                reason,
                epoch: fenced,
            }
        }
    }
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
        forget_task(&ctx, task.id);
    });
}

/// Drop task `id`'s cancel token and progress once its thread is done with it.
fn forget_task(ctx: &HostCtx, id: u64) {
    ctx.cancels
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    ctx.progress
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
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
    let result = execute(ctx, &task, cancel);
    conclude(ctx, &task, cancel, result);
}

/// After a node restart, carry on with task `task` of this host that was running: its source
/// VMM kept migrating (and waits at its gate for this node), or it has to be failed.
pub fn carry_on(ctx: &Arc<HostCtx>, task: MigrationTask) {
    let token = CancelToken::new();
    ctx.cancels
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(task.id, token.clone());
    let (ctx, task) = (ctx.clone(), task.clone());
    std::thread::spawn(move || {
        tracing::info!(task = task.id, vm = %task.vm, "carrying on with the migration");
        let result = resume(&ctx, &task, &token);
        conclude(&ctx, &task, &token, result);
        forget_task(&ctx, task.id);
    });
}

/// Commit how task `task` ended.
fn conclude(ctx: &HostCtx, task: &MigrationTask, cancel: &CancelToken, result: TaskResult) {
    let (state, stats, error) = match result {
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
    {
        let mut vms = ctx.vms();
        let local = vms
            .get_mut(&task.vm)
            .filter(|l| l.epoch == epoch && !l.migrating)
            .ok_or_else(|| fail(format!("vm {} is not running on this host", task.vm)))?;
        local.migrating = true;
    }
    let result = start(ctx, task).and_then(|()| drive(ctx, task, epoch, cancel));
    finish(ctx, task, result)
}

/// After a node restart: carry on with a migration the VMM kept running (`Running` task of
/// this host).
pub fn resume(ctx: &Arc<HostCtx>, task: &MigrationTask, cancel: &CancelToken) -> TaskResult {
    let epoch = ctx
        .vms()
        .get(&task.vm)
        .map(|l| l.epoch)
        .ok_or_else(|| (None, format!("vm {} has no VMM on this host", task.vm)))?;
    let result = drive(ctx, task, epoch, cancel);
    finish(ctx, task, result)
}

/// What a migration ended with: stats, or (migrated away but not confirmed, error).
type Outcome = Result<TaskStats, (bool, String)>;

fn finish(ctx: &Arc<HostCtx>, task: &MigrationTask, result: Outcome) -> TaskResult {
    match result {
        Ok(s) => {
            // The VM runs on the destination: this VMM holds no VM any more.
            ctx.stop_local(&task.vm);
            Ok(s)
        }
        Err((true, e)) => {
            // Ownership was committed to the destination: this paused copy must never run.
            ctx.stop_local(&task.vm);
            Err((
                None,
                format!(
                    "ownership committed to host {} but its resume was not confirmed: {e}",
                    task.to
                ),
            ))
        }
        Err((false, e)) => {
            if let Some(l) = ctx.vms().get_mut(&task.vm) {
                l.migrating = false;
            }
            Err((None, e))
        }
    }
}

/// Prepare the destination (a receiving VMM there) and tell this VM's VMM to stream to it.
fn start(ctx: &Arc<HostCtx>, task: &MigrationTask) -> Result<(), (bool, String)> {
    let refused = |e: String| Err((false, e));
    let state = ctx.state();
    let Some(dest) = state.hosts.get(&task.to) else {
        return refused(format!("host {} is gone", task.to));
    };
    let reply: PrepareReply = match ctx.handle.block_on(ctx.cluster.post_json(
        &dest.address,
        "/v1/migrations/prepare",
        &PrepareBody { task: task.id },
        false,
    )) {
        Ok(r) => r,
        Err(e) => return refused(format!("destination: {e}")),
    };
    let addr: SocketAddr = match reply.listen.parse() {
        Ok(a) => a,
        Err(e) => return refused(format!("destination address: {e}")),
    };
    let tuning = Tuning {
        downtime_ms: 20,
        bandwidth: ctx
            .migrate_bandwidth
            .load(std::sync::atomic::Ordering::Relaxed),
        streams: 0,
        io_timeout_ms: 10_000,
    };
    let asked = ctx.vmm(&task.vm).and_then(|mut c| {
        Ok(c.call(&Request::MigrateOut {
            dest: addr,
            token: task.token.clone(),
            tuning,
        })?)
    });
    match asked {
        Ok(_) => Ok(()),
        Err(e) => refused(format!("{e:#}")),
    }
}

/// Follow the VMM's outbound migration: relay progress and cancellation, answer its switchover
/// gate, and read how it ended.
fn drive(ctx: &Arc<HostCtx>, task: &MigrationTask, epoch: u64, cancel: &CancelToken) -> Outcome {
    let mut cancel_sent = false;
    let mut failures = 0;
    let view = loop {
        let step = ctx.vmm(&task.vm).and_then(|mut c| {
            if cancel.is_cancelled() && !cancel_sent {
                cancel_sent = true;
                if let Err(e) = c.cancel() {
                    tracing::debug!(task = task.id, "cancel: {e}");
                }
            }
            let view = c.wait_gate(Duration::from_millis(500))?;
            if view.gate_pending {
                record_progress(ctx, task.id, &view);
                let decision = gate_decision(ctx, &task.vm, epoch, task.to, cancel);
                c.gate(decision)?;
            }
            Ok(view)
        });
        match step {
            Ok(v) if v.finished => break v,
            Ok(v) => {
                failures = 0;
                record_progress(ctx, task.id, &v);
                if v.phase.is_empty() {
                    return Err((false, "the VMM runs no migration".into()));
                }
            }
            Err(e) => {
                failures += 1;
                if failures >= 10 {
                    return Err((false, format!("lost the VMM: {e:#}")));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    record_progress(ctx, task.id, &view);
    let away = ctx
        .vmm_status(&task.vm)
        .map(|s| matches!(s.state, VmmState::MigratedAway | VmmState::Handover))
        .unwrap_or(false);
    match (view.error, view.stats) {
        (None, Some(s)) => Ok(TaskStats {
            downtime_us: s.downtime_us,
            total_ms: s.total_ms,
            bytes: s.bytes,
            rounds: s.rounds,
        }),
        (Some(e), _) => Err((away, e)),
        (None, None) => Err((away, "the migration ended without figures".into())),
    }
}

fn record_progress(ctx: &HostCtx, id: TaskId, v: &MigrationView) {
    ctx.progress
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            id,
            TaskProgress {
                phase: v.phase.replace('_', "-"),
                round: v.round,
                bytes_sent: v.bytes_sent,
                bytes_remaining: v.bytes_remaining,
            },
        );
}
