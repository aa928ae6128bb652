//! DRS on the leader: one pass plans moves over the committed state and the leader's load
//! window (an I/O-free function), remembers the report, and in fully automated mode queues
//! the moves as migration tasks (reason `drs`). Also the ranked destinations for one VM.
use std::time::{Duration, Instant};

use tern_consensus::state::{AutomationLevel, DrsSettings, TaskState};
use tern_consensus::ClusterState;
use tern_scheduler::{balance, Config, Move};

use super::cluster::now_ms;
use super::error::ServiceError;
use super::host::HostCtx;
use super::leader_state::DrsReport;
use super::migrations::queue_moves;
use super::sched_view::{self, host_key, Loads};

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
pub async fn pass(ctx: &HostCtx, state: &ClusterState, force: bool) -> Option<DrsReport> {
    let settings = state.drs.clone();
    {
        let mut last = ctx
            .leader
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
    let loads = ctx.leader.loads(state);
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
    *ctx.leader
        .last_plan
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
    Some(report)
}

/// A DRS pass on the leader (forwarding once from a follower); `apply` queues its
/// recommendations.
pub async fn report(
    ctx: &HostCtx,
    apply: bool,
    forwarded: bool,
) -> Result<DrsReport, ServiceError> {
    if ctx.node.raft.current_leader().await == Some(ctx.id) {
        let state = ctx.state();
        let report = pass(ctx, &state, true)
            .await
            .ok_or_else(|| ServiceError::unavailable("drs pass failed"))?;
        if apply {
            queue_moves(ctx, &report.recommendations, "drs", "drs").await;
        }
        return Ok(report);
    }
    if forwarded {
        return Err(ServiceError::unavailable("not the leader"));
    }
    let (_, leader) = ctx
        .cluster
        .leader_addr()
        .ok_or_else(|| ServiceError::unavailable("no leader known"))?;
    let path = if apply { "/v1/drs/apply" } else { "/v1/drs" };
    if apply {
        ctx.cluster.post_json(&leader, path, &(), true).await
    } else {
        ctx.cluster.get_json(&leader, path).await
    }
}

/// Ranked destinations for one VM (the migration wizard), with reasons.
pub fn recommend(ctx: &HostCtx, name: &str) -> Result<tern_scheduler::Ranking, ServiceError> {
    let state = ctx.state();
    let loads = ctx.leader.loads(&state);
    let cluster = sched_view::cluster(&state, &loads, now_ms() as f64 / 1000.0)
        .map_err(|e| ServiceError::bad(format!("{e:#}")))?;
    tern_scheduler::rank_destinations(&cluster, name, &tern_scheduler::Config::default())
        .map_err(|e| ServiceError::not_found(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched_view::VmLoad;
    use tern_consensus::state::{Capacity, Command, MigrationTask, TaskStats, VmSpec};
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
