//! The VMMs' lives as the node sees them: adopting the ones a previous run of the node left
//! (checked against the committed state), and noticing within a second when one dies, which is
//! recorded (audit entry, metric) and answered with the VM's restart policy.
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_consensus::state::{Command, TaskState, VmState};
use tern_consensus::ClusterState;
use tern_hypervisor::vmm::VmmState;

use super::datastore::RestartPolicy;
use super::host::{HostCtx, LocalVm};
use super::supervisor::{verdict, Committed, Death, Verdict, WATCH_EVERY};
use super::{inbound, outbound};

/// What to do with one VMM found after a restart (the decision alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    /// Its VM runs here as committed.
    Run,
    /// It is a migration's source: carry on with the task.
    CarryOn(u64),
    /// It is a migration's destination: follow it to the end.
    Receive,
    Stop(String),
}

/// Decide the fate of an adopted VMM from the committed state.
pub fn adoption(
    me: u64,
    status: &tern_hypervisor::vmm::VmmStatus,
    state: &tern_consensus::ClusterState,
) -> Adoption {
    let committed = state.vms.get(&status.name).map(|v| Committed {
        owner: v.owner,
        epoch: v.epoch,
        running: v.state == VmState::Running,
    });
    if let Verdict::Stop(why) = verdict(me, status, committed) {
        return Adoption::Stop(why);
    }
    let task = |to_me: bool| {
        state.tasks.values().find(|t| {
            t.vm == status.name
                && t.state == TaskState::Running
                && if to_me { t.to == me } else { t.from == me }
        })
    };
    match status.state {
        VmmState::Migrating | VmmState::AtGate => match task(false) {
            Some(t) => Adoption::CarryOn(t.id),
            None => Adoption::Stop("it migrates for no running task".into()),
        },
        VmmState::Receiving => match task(true) {
            Some(_) => Adoption::Receive,
            None => Adoption::Stop("it receives for no running task".into()),
        },
        _ => Adoption::Run,
    }
}

/// How long adoption waits for a fresh read of the committed state before it uses its own.
const FRESH_STATE_WAIT: Duration = Duration::from_secs(30);

/// Find this host's VMMs after a (re)start and carry on with each, judged against a fresh
/// (linearizable) read of the committed state: a node that has not caught up with its log must
/// not stop VMs that moved here while it was away.
pub async fn adopt(ctx: Arc<HostCtx>) {
    let until = Instant::now() + FRESH_STATE_WAIT;
    let state = loop {
        match ctx.cluster.read(false).await {
            Ok(s) => break s,
            Err(e) if Instant::now() >= until => {
                tracing::warn!("no fresh committed state ({e}); adopting VMMs on the local view");
                break ctx.state();
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let _ = tokio::task::spawn_blocking(move || adopt_with(&ctx, &state)).await;
}

fn adopt_with(ctx: &Arc<HostCtx>, state: &ClusterState) {
    let Ok(ds) = ctx.datastore() else { return };
    for status in ctx.supervisor.adopt_all() {
        let name = status.name.clone();
        let decision = adoption(ctx.id, &status, state);
        tracing::info!(vm = %name, pid = status.pid, ?decision, "adopting a VMM");
        let cfg = match (&decision, ds.config(&name)) {
            (Adoption::Stop(_), _) => None,
            (_, Ok(cfg)) => Some(cfg),
            (_, Err(e)) => {
                tracing::warn!(vm = %name, "no config on the datastore: {e:#}");
                None
            }
        };
        let Some(cfg) = cfg else {
            let _ = ctx.supervisor.stop(&name);
            continue;
        };
        let migrating = decision != Adoption::Run;
        ctx.vms().insert(
            name.clone(),
            LocalVm {
                cfg,
                epoch: status.epoch,
                pid: status.pid,
                migrating,
                cgroup: None,
            },
        );
        match decision {
            Adoption::CarryOn(id) => {
                if let Some(t) = state.tasks.get(&id) {
                    outbound::carry_on(ctx, t.clone());
                }
            }
            Adoption::Receive => {
                ctx.arriving_insert(&name);
                let (c, epoch) = (ctx.clone(), status.epoch);
                std::thread::spawn(move || inbound::watch(&c, &name, epoch));
            }
            _ => {}
        }
    }
    // Running tasks of this host whose VMM is not migrating: nothing carries them on.
    for t in state.tasks.values() {
        let ours = t.from == ctx.id && t.state == TaskState::Running;
        let carried = ctx
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&t.id);
        if ours && !carried {
            outbound::carry_on(ctx, t.clone());
        }
    }
}

/// Watch for VMMs that die, for the life of the node.
pub async fn watch_loop(ctx: Arc<HostCtx>) {
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let c = ctx.clone();
        let Ok(deaths) = tokio::task::spawn_blocking(move || c.supervisor.reap()).await else {
            return;
        };
        for d in deaths {
            on_death(&ctx, d).await;
        }
    }
}

/// A VMM ended. One this node stopped is no news (it was forgotten first); any other death is
/// recorded, and the VM restarted per its policy.
async fn on_death(ctx: &Arc<HostCtx>, death: Death) {
    let local = {
        let mut vms = ctx.vms();
        match vms.get(&death.name) {
            Some(l) if l.pid == death.pid => vms.remove(&death.name),
            _ => None,
        }
    };
    let Some(local) = local else { return };
    let policy = local.cfg.restart;
    if policy == RestartPolicy::Never {
        // Keep the reconciler from booting it while it is marked stopped.
        ctx.arriving_insert(&death.name);
    }
    if let Some(cg) = local.cgroup {
        let _ = cg.release();
    }
    let why = death
        .exit
        .as_ref()
        .and_then(|e| e.error.clone())
        .unwrap_or_else(|| "killed or crashed".into());
    metrics::counter!("tern_vmm_deaths_total").increment(1);
    tracing::warn!(vm = %death.name, pid = death.pid, ?policy, "VMM died: {why}");
    let event = format!(
        "VMM pid {} died ({why}); restart policy {}",
        death.pid,
        match policy {
            RestartPolicy::Always => "always: cold boot here",
            RestartPolicy::Never => "never: stopped",
        }
    );
    let actor = format!("host/{}", ctx.id);
    let record = Command::RecordVmEvent {
        vm: death.name.clone(),
        host: ctx.id,
        event,
    };
    if let Err(e) = ctx
        .cluster
        .propose(actor.clone(), None, record, false)
        .await
    {
        tracing::warn!(vm = %death.name, "recording the death: {e}");
    }
    let state = ctx.state();
    let ours = state
        .vms
        .get(&death.name)
        .is_some_and(|v| v.owner == ctx.id && v.epoch == local.epoch);
    if policy == RestartPolicy::Never && ours && !local.migrating {
        let stop = Command::SetVmState {
            vm: death.name.clone(),
            state: VmState::Stopped,
        };
        if let Err(e) = ctx.cluster.propose(actor, None, stop, false).await {
            tracing::warn!(vm = %death.name, "marking it stopped: {e}");
        }
    }
    if policy == RestartPolicy::Never {
        ctx.arriving_remove(&death.name);
    }
    // `always`: the reconciler boots it again from its datastore files.
    let c = ctx.clone();
    let _ = tokio::task::spawn_blocking(move || {
        let state = c.state();
        c.reconcile_now(&state)
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_consensus::state::{Capacity, MigrationTask, Request, VmSpec};
    use tern_hypervisor::vmm::protocol::Load;
    use tern_hypervisor::vmm::VmmStatus;

    fn apply(s: &mut ClusterState, command: Command) {
        let index = s.audit.len() as u64 + 1;
        s.apply(
            index,
            &Request {
                actor: "t".into(),
                at_ms: 1,
                command,
            },
        )
        .unwrap();
    }

    /// Hosts 1 and 2, vm `a` on host 1 at epoch 0.
    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for id in [1, 2] {
            apply(
                &mut s,
                Command::RegisterHost {
                    id,
                    address: format!("h{id}"),
                    capacity: Capacity {
                        cpus: 4,
                        memory_mib: 4096,
                    },
                    cpu_features: vec![],
                },
            );
        }
        apply(
            &mut s,
            Command::CreateVm {
                spec: VmSpec {
                    name: "a".into(),
                    vcpus: 1,
                    memory_mib: 64,
                    cpu_features: vec![],
                },
                pool: None,
                owner: 1,
            },
        );
        apply(
            &mut s,
            Command::SetVmState {
                vm: "a".into(),
                state: VmState::Running,
            },
        );
        s
    }

    fn vmm(state: VmmState, epoch: u64) -> VmmStatus {
        VmmStatus {
            name: "a".into(),
            pid: 9,
            state,
            epoch,
            owner: 1,
            spec: None,
            guest: None,
            load: Load::default(),
            error: None,
        }
    }

    fn running_task(s: &mut ClusterState, from: u64, to: u64) -> u64 {
        apply(
            s,
            Command::CreateTask {
                vm: "a".into(),
                to,
                priority: 1,
                reason: "manual".into(),
                token: "t".into(),
            },
        );
        let id = *s.tasks.keys().next().unwrap();
        apply(
            s,
            Command::UpdateTask {
                id,
                state: TaskState::Running,
                stats: None,
                error: None,
            },
        );
        let t: &MigrationTask = &s.tasks[&id];
        assert_eq!((t.from, t.to), (from, to));
        id
    }

    #[test]
    fn adopted_vmms_are_kept_carried_on_followed_or_stopped_as_committed() {
        let mut s = state();
        assert_eq!(adoption(1, &vmm(VmmState::Running, 0), &s), Adoption::Run);
        // Host 2 never runs host 1's VM; a VMM for a VM gone from the cluster stops.
        assert!(matches!(
            adoption(2, &vmm(VmmState::Running, 0), &s),
            Adoption::Stop(_)
        ));
        let mut gone = vmm(VmmState::Running, 0);
        gone.name = "zz".into();
        assert!(matches!(adoption(1, &gone, &s), Adoption::Stop(_)));
        // A migrating VMM with no running task has nothing to carry on.
        assert!(matches!(
            adoption(1, &vmm(VmmState::AtGate, 0), &s),
            Adoption::Stop(_)
        ));
        let id = running_task(&mut s, 1, 2);
        for st in [VmmState::Migrating, VmmState::AtGate] {
            assert_eq!(adoption(1, &vmm(st, 0), &s), Adoption::CarryOn(id));
        }
        assert_eq!(
            adoption(2, &vmm(VmmState::Receiving, 1), &s),
            Adoption::Receive
        );
        // The source of a migration never receives it.
        assert!(matches!(
            adoption(1, &vmm(VmmState::Receiving, 1), &s),
            Adoption::Stop(_)
        ));
        // A copy that migrated away is stopped.
        assert!(matches!(
            adoption(1, &vmm(VmmState::MigratedAway, 0), &s),
            Adoption::Stop(_)
        ));
    }
}
