//! Schedules on the leader: fire each due one (a one-off time or a cron expression) once per
//! slot, creating its migration task in the same command.
use tern_consensus::state::{Command, ScheduledTask};
use tern_consensus::{Applied, ClusterState};

use super::cluster::now_ms;
use super::cron::When;
use super::host::HostCtx;
use super::migrations::{new_token, MigrationBody};
use super::queue_view::{self, PRIORITY_HIGH};

/// Fire due schedules: one command records the firing (at most once per slot, whoever leads)
/// and creates its migration task, so a leader dying in between cannot lose the run.
pub async fn fire_due(ctx: &HostCtx, state: &ClusterState) {
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
                if let Err(why) = queue_view::admit_high(state, &body.vm, from, body.to) {
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
        match ctx
            .cluster
            .propose("scheduler".into(), None, fire, false)
            .await
        {
            Ok(Applied::TaskCreated { id }) => {
                tracing::info!(schedule = %s.name, task = id, "schedule fired")
            }
            Ok(_) => tracing::warn!(schedule = %s.name, "schedule fired without a task"),
            Err(e) => tracing::debug!(schedule = %s.name, "schedule not fired: {e}"),
        }
    }
}
