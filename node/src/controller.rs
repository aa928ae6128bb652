//! Leader-only control loops: maintenance evacuation and DRS. Every node runs the loop; only
//! the current leader acts, and everything it decides goes through the Raft log, so a new
//! leader picks up where the old one stopped.
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_consensus::state::{
    AutomationLevel, Command, DrsSettings, HostState, ScheduledTask, TaskState,
};
use tern_consensus::{Applied, ClusterState};
use tern_scheduler::{balance, evacuate, Config, Move};

use super::cron::When;
use super::host::HostCtx;
use super::sched_view::{self, host_key, parse_host, Loads, VmLoad};
use super::vm_api::{
    new_token, queue_migration, MigrationBody, PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL,
};

/// Samples of each VM kept on the leader (the scheduler sees their average).
const WINDOW: usize = 5;

/// What the leader knows beyond the committed state: recent load, the last DRS pass.
#[derive(Default)]
pub struct Controller {
    samples: Mutex<HashMap<String, VecDeque<VmLoad>>>,
    pub last_plan: Mutex<Option<DrsReport>>,
    last_drs: Mutex<Option<Instant>>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DrsReport {
    pub at_ms: u64,
    pub imbalance: f64,
    pub target: Option<f64>,
    pub recommendations: Vec<Move>,
    /// Per host: (cpu load, memory load), normalized.
    pub host_load: Vec<(u64, f64, f64)>,
}

impl Controller {
    pub fn record(&self, vms: HashMap<String, VmLoad>) {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        for (name, load) in vms {
            let q = s.entry(name).or_default();
            q.push_back(load);
            while q.len() > WINDOW {
                q.pop_front();
            }
        }
    }

    /// Window averages, for VMs that still exist.
    pub fn loads(&self, state: &ClusterState) -> Loads {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.retain(|name, _| state.vms.contains_key(name));
        s.iter()
            .map(|(name, q)| {
                let n = q.len().max(1) as f64;
                let avg = VmLoad {
                    cpu_percent: q.iter().map(|l| l.cpu_percent).sum::<f64>() / n,
                    active_mib: (q.iter().map(|l| l.active_mib as f64).sum::<f64>() / n) as u64,
                    dirty_mib_s: q.iter().map(|l| l.dirty_mib_s).sum::<f64>() / n,
                };
                (name.clone(), avg)
            })
            .collect()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub async fn controller_loop(ctx: Arc<HostCtx>) {
    let mut rx = ctx.node.machine.subscribe();
    loop {
        let state = rx.borrow_and_update().state.clone();
        if ctx.node.raft.current_leader().await == Some(ctx.id) {
            maintenance(&ctx, &state).await;
            schedules(&ctx, &state).await;
            drs(&ctx, &state, false).await;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

fn priority_of(m: &Move) -> u8 {
    match m.priority {
        1 => PRIORITY_HIGH,
        2 | 3 => PRIORITY_NORMAL,
        _ => PRIORITY_LOW,
    }
}

pub async fn queue_moves(ctx: &HostCtx, moves: &[Move], reason: &str, actor: &str) -> usize {
    let mut queued = 0;
    for m in moves {
        let (Some(to), true) = (parse_host(&m.to), true) else {
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

/// Hosts entering maintenance: queue evacuation moves for VMs without a task; mark the host
/// in maintenance once it owns nothing.
async fn maintenance(ctx: &HostCtx, state: &ClusterState) {
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
                .api
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
        let loads = ctx.controller.loads(state);
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

/// The DRS settings as the scheduler's config: the cooldown is at most three intervals, so a
/// short interval (tests, the demo) does not pin VMs for the scheduler's default 15 minutes.
fn drs_config(settings: &DrsSettings) -> Config {
    let mut cfg = Config::with_threshold(settings.migration_threshold);
    cfg.interval_s = f64::from(settings.interval_s);
    cfg.cooldown_s = cfg.cooldown_s.min(f64::from(settings.interval_s) * 3.0);
    cfg
}

/// One DRS plan on the committed state and the leader's load window, at `now_ms`: the
/// scheduler's moves minus maintenance moves (the maintenance loop's job) and VMs with an
/// active task. VMs still in their cooldown are never proposed (by the scheduler).
fn plan_pass(
    state: &ClusterState,
    loads: &Loads,
    now_ms: u64,
) -> anyhow::Result<(tern_scheduler::Cluster, tern_scheduler::Plan, Vec<Move>)> {
    let cluster = sched_view::cluster(state, loads, now_ms as f64 / 1000.0)?;
    let mut plan = balance(&cluster, &drs_config(&state.drs))?;
    let busy = |vm: &str| {
        state
            .tasks
            .values()
            .any(|t| t.vm == vm && t.state != TaskState::Succeeded && !t.state.is_final())
    };
    let recommendations = std::mem::take(&mut plan.moves)
        .into_iter()
        .filter(|m| m.kind != tern_scheduler::MoveKind::Maintenance && !busy(&m.vm))
        .collect();
    Ok((cluster, plan, recommendations))
}

/// One DRS pass when the interval has passed (or `force`): remember the recommendations, and
/// in fully automated mode queue them as tasks (reason `drs`).
pub async fn drs(ctx: &HostCtx, state: &ClusterState, force: bool) -> Option<DrsReport> {
    let settings = state.drs.clone();
    {
        let mut last = ctx
            .controller
            .last_drs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let due =
            last.is_none_or(|t| t.elapsed() >= Duration::from_secs(settings.interval_s.into()));
        if !due && !force {
            return None;
        }
        *last = Some(Instant::now());
    }
    let loads = ctx.controller.loads(state);
    let (cluster, plan, recommendations) = match plan_pass(state, &loads, now_ms()) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("drs pass: {e:#}");
            return None;
        }
    };
    let host_load = state
        .hosts
        .keys()
        .filter_map(|h| {
            let (c, m) = cluster.host_load(&host_key(*h))?;
            Some((*h, c, m))
        })
        .collect();
    let report = DrsReport {
        at_ms: now_ms(),
        imbalance: plan.imbalance_before,
        target: plan.target_imbalance,
        recommendations,
        host_load,
    };
    metrics::gauge!("tern_drs_imbalance").set(report.imbalance);
    for (h, c, m) in &report.host_load {
        metrics::gauge!("tern_host_cpu_load", "host" => h.to_string()).set(*c);
        metrics::gauge!("tern_host_memory_load", "host" => h.to_string()).set(*m);
    }
    if settings.automation == AutomationLevel::FullyAutomated && !report.recommendations.is_empty()
    {
        let n = queue_moves(ctx, &report.recommendations, "drs", "drs").await;
        tracing::info!(n, imbalance = report.imbalance, "drs queued migrations");
    }
    *ctx.controller
        .last_plan
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
    Some(report)
}

/// Fire due schedules: one command records the firing (at most once per slot, whoever leads)
/// and creates its migration task, so a leader dying in between cannot lose the run.
async fn schedules(ctx: &HostCtx, state: &ClusterState) {
    let now = now_ms();
    for s in state.schedules.values().filter(|s| s.enabled) {
        let Ok(when) = s.cron.parse::<When>() else {
            continue;
        };
        let Ok(body) = serde_json::from_str::<MigrationBody>(&s.action) else {
            continue;
        };
        let slot = match when {
            When::At(t) if now >= t => t,
            When::Cron(c) if c.matches(now / 60_000 * 60_000) => now / 60_000 * 60_000,
            _ => continue,
        };
        if s.last_fired_ms.is_some_and(|l| l >= slot) {
            continue;
        }
        if body.priority >= PRIORITY_HIGH {
            if let Some(from) = state.vms.get(&body.vm).map(|v| v.owner) {
                // High priority needs its slots now; wait for them rather than fire late.
                if let Err(why) = super::queue_view::admit_high(state, &body.vm, from, body.to) {
                    tracing::debug!(schedule = %s.name, "scheduled migration waits: {why}");
                    continue;
                }
            }
        }
        let Ok(token) = new_token() else {
            continue;
        };
        let fire = Command::FireSchedule {
            name: s.name.clone(),
            slot_ms: slot,
            task: Some(ScheduledTask {
                vm: body.vm.clone(),
                to: body.to,
                priority: body.priority,
                reason: body.reason.clone().unwrap_or_else(|| "scheduled".into()),
                // Whoever committed the schedule, never what its action text claims.
                requested_by: if s.created_by.is_empty() {
                    "scheduler".into()
                } else {
                    s.created_by.clone()
                },
                token,
            }),
        };
        match ctx.api.propose("scheduler".into(), None, fire, false).await {
            Ok(Applied::TaskCreated { id }) => {
                tracing::info!(schedule = %s.name, task = id, "schedule fired")
            }
            Ok(_) => tracing::warn!(schedule = %s.name, "schedule fired without a task"),
            Err(e) => tracing::debug!(schedule = %s.name, "schedule not fired: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_consensus::state::{Capacity, MigrationTask, TaskStats, VmSpec};
    use tern_consensus::Request;

    const NOW_MS: u64 = 10_000_000;

    /// Two hosts; `a` and `b` busy on host 1, host 2 idle; DRS interval 60 s (cooldown 180 s).
    fn overloaded() -> (ClusterState, Loads) {
        let mut s = ClusterState::default();
        let mut apply = |command| {
            let req = Request {
                actor: "test".into(),
                at_ms: 1,
                command,
            };
            s.apply(1, &req).expect("apply");
        };
        for id in [1, 2] {
            apply(Command::RegisterHost {
                id,
                address: format!("h{id}"),
                capacity: Capacity {
                    cpus: 2,
                    memory_mib: 4096,
                },
                cpu_features: vec![],
            });
        }
        for vm in ["a", "b"] {
            apply(Command::CreateVm {
                spec: VmSpec {
                    name: vm.into(),
                    vcpus: 1,
                    memory_mib: 64,
                    cpu_features: vec![],
                },
                pool: None,
                owner: 1,
            });
        }
        apply(Command::SetDrs {
            settings: DrsSettings {
                automation: AutomationLevel::FullyAutomated,
                migration_threshold: 3,
                interval_s: 60,
            },
        });
        let busy = VmLoad {
            cpu_percent: 90.0,
            active_mib: 16,
            dirty_mib_s: 0.0,
        };
        let loads = ["a", "b"].map(|v| (v.to_string(), busy.clone())).into();
        (s, loads)
    }

    /// Record that `vm` arrived on host 1 by a migration that finished `ago_s` before NOW_MS.
    fn migrated(s: &mut ClusterState, vm: &str, ago_s: u64) {
        let id = s.next_task_id;
        s.next_task_id += 1;
        let finished = NOW_MS - ago_s * 1000;
        s.tasks.insert(
            id,
            MigrationTask {
                id,
                vm: vm.into(),
                from: 2,
                to: 1,
                priority: 2,
                state: TaskState::Succeeded,
                reason: "manual".into(),
                requested_by: "test".into(),
                created_at_ms: finished - 5_000,
                started_at_ms: Some(finished - 4_000),
                finished_at_ms: Some(finished),
                stats: TaskStats::default(),
                error: None,
                token: String::new(),
            },
        );
    }

    fn moved_vms(s: &ClusterState, loads: &Loads) -> Vec<String> {
        let (_, _, moves) = plan_pass(s, loads, NOW_MS).expect("plan");
        moves.into_iter().map(|m| m.vm).collect()
    }

    #[test]
    fn drs_moves_a_vm_off_the_overloaded_host() {
        let (s, loads) = overloaded();
        assert_eq!(moved_vms(&s, &loads).len(), 1, "one of a, b should move");
    }

    #[test]
    fn a_vm_in_its_cooldown_is_not_moved_again() {
        let (mut s, loads) = overloaded();
        migrated(&mut s, "a", 10);
        assert_eq!(
            moved_vms(&s, &loads),
            ["b"],
            "a just migrated: only b may move"
        );
        migrated(&mut s, "b", 10);
        assert!(moved_vms(&s, &loads).is_empty(), "both in their cooldown");
    }

    #[test]
    fn the_cooldown_ends_after_three_intervals() {
        let (mut s, loads) = overloaded();
        migrated(&mut s, "a", 181);
        migrated(&mut s, "b", 181);
        assert_eq!(moved_vms(&s, &loads).len(), 1);
        assert_eq!(drs_config(&s.drs).cooldown_s, 180.0);
    }
}
