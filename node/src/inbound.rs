//! The destination side: a migration stream is accepted only for a committed, running task that
//! names this host, by a receiving VMM started for that task, on a listener opened for it,
//! authenticated by the task's token. The received VM resumes only once the lease on the
//! datastore names this host at the task's epoch, which its source writes after the Raft commit
//! of the ownership transfer (and this node too, once it applies that commit).
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_consensus::state::{MigrationTask, TaskId, TaskState};
use tern_hypervisor::vmm::{Request, Response, VmmState};

use super::host::{vmm_spec, HostCtx, LocalVm};
use super::supervisor::Launch;

/// How long a prepared listener waits for its source.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a prepare request is refused (HTTP 409 / 404 / 503).
#[derive(Debug)]
pub enum Refusal {
    NoTask(TaskId),
    Invalid(String),
    Unavailable(String),
}

/// Wait briefly until this node has applied task `id` (the source commits it before asking).
async fn committed_task(ctx: &HostCtx, id: TaskId) -> Option<MigrationTask> {
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let state = ctx.state();
        if let Some(t) = state.tasks.get(&id) {
            if t.state != TaskState::Queued || Instant::now() >= until {
                return Some(t.clone());
            }
        } else if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Start a receiving VMM for task `id` and let it listen; returns the address.
pub async fn prepare(ctx: Arc<HostCtx>, id: TaskId) -> Result<String, Refusal> {
    let task = committed_task(&ctx, id).await.ok_or(Refusal::NoTask(id))?;
    if task.to != ctx.id {
        return Err(Refusal::Invalid(format!(
            "task {id} migrates to host {}, not this host ({})",
            task.to, ctx.id
        )));
    }
    if task.state != TaskState::Running {
        return Err(Refusal::Invalid(format!(
            "task {id} is {:?}, not running",
            task.state
        )));
    }
    let state = ctx.state();
    let vm = state
        .vms
        .get(&task.vm)
        .ok_or_else(|| Refusal::Invalid(format!("vm {} no longer exists", task.vm)))?;
    if vm.owner != task.from {
        return Err(Refusal::Invalid(format!(
            "vm {} is owned by host {}, not the task's source {}",
            task.vm, vm.owner, task.from
        )));
    }
    ctx.datastore()
        .map_err(|e| Refusal::Unavailable(e.to_string()))?;
    if ctx.vms().contains_key(&task.vm) || !ctx.arriving_insert(&task.vm) {
        return Err(Refusal::Invalid(format!(
            "vm {} is already here or arriving",
            task.vm
        )));
    }
    let epoch = vm.epoch + 1;
    let c = ctx.clone();
    let t = task.clone();
    let started = tokio::task::spawn_blocking(move || start_receiver(&c, &t, epoch))
        .await
        .map_err(|e| Refusal::Unavailable(e.to_string()))
        .and_then(|r| r);
    match started {
        Ok(addr) => {
            let name = task.vm.clone();
            std::thread::spawn(move || watch(&ctx, &name, epoch));
            Ok(addr)
        }
        Err(e) => {
            ctx.arriving_remove(&task.vm);
            Err(e)
        }
    }
}

/// Start the VMM in receive mode and tell it what to wait for.
fn start_receiver(ctx: &HostCtx, task: &MigrationTask, epoch: u64) -> Result<String, Refusal> {
    let unavailable = |e: anyhow::Error| Refusal::Unavailable(format!("{e:#}"));
    let ds = ctx.datastore().map_err(unavailable)?;
    let cfg = ds.config(&task.vm).map_err(unavailable)?;
    let spec = vmm_spec(ds, &cfg).map_err(unavailable)?;
    let lease = ds.lease_path(&task.vm).map_err(unavailable)?;
    let pid = ctx
        .supervisor
        .start(&Launch {
            spec: spec.clone(),
            epoch,
            lease: Some(lease),
            receive: true,
        })
        .map_err(unavailable)?;
    let cgroup = ctx.place(&task.vm, pid, cfg.vcpus);
    let listen = format!("{}:0", ctx.ip)
        .parse()
        .map_err(|e| Refusal::Unavailable(format!("listen address: {e}")))?;
    let reply = ctx.vmm(&task.vm).and_then(|mut c| {
        Ok(c.call(&Request::Receive {
            listen,
            token: task.token.clone(),
            expected: Box::new(spec),
            epoch,
            accept_timeout_ms: Some(ACCEPT_TIMEOUT.as_millis() as u64),
        })?)
    });
    match reply {
        Ok(Response::Listening { addr }) => {
            // Known from here on, so that a death is noticed; `watch` decides its fate.
            ctx.vms().insert(
                task.vm.clone(),
                LocalVm {
                    cfg,
                    epoch,
                    pid,
                    migrating: true,
                    cgroup,
                },
            );
            Ok(addr.to_string())
        }
        other => {
            let _ = ctx.supervisor.stop(&task.vm);
            if let Some(cg) = cgroup {
                let _ = cg.release();
            }
            Err(Refusal::Unavailable(format!(
                "the receiving VMM did not listen: {other:?}"
            )))
        }
    }
}

/// Follow a receiving VMM until its migration has ended: a VM that runs is this host's, one
/// that failed is stopped. Also used for a receiving VMM adopted after a node restart.
pub fn watch(ctx: &Arc<HostCtx>, name: &str, epoch: u64) {
    let outcome = loop {
        let view = ctx
            .vmm(name)
            .and_then(|mut c| Ok(c.wait_gate(Duration::from_secs(2))?));
        match view {
            Ok(v) if v.finished => break v.error,
            // Never told to receive (its node restarted before it could be): nothing will come.
            Ok(v) if v.phase.is_empty() => break Some("never told what to receive".into()),
            Ok(_) => {}
            Err(e) => break Some(format!("{e:#}")),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let running = ctx
        .vmm_status(name)
        .is_ok_and(|s| s.state == VmmState::Running && s.epoch == epoch);
    match (running, outcome) {
        (true, _) => {
            if let Some(l) = ctx.vms().get_mut(name) {
                l.migrating = false;
                l.epoch = epoch;
            }
            tracing::info!(vm = %name, epoch, "migration received, running here");
        }
        (false, why) => {
            tracing::warn!(vm = %name, "inbound migration failed: {}", why.unwrap_or_default());
            ctx.stop_local(name);
        }
    }
    ctx.arriving_remove(name);
    let state = ctx.state();
    ctx.reconcile_now(&state);
}
