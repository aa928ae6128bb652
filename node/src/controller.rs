//! Leader-only control loops: maintenance evacuation, schedules and DRS. Every node runs the
//! loop; only the current leader acts, and everything it decides goes through the Raft log, so
//! a new leader picks up where the old one stopped.
use std::sync::Arc;
use std::time::Duration;

use super::host::HostCtx;
use super::liveness::{self, LivenessConfig, Observations};
use super::{drs, maintenance, schedules};

pub async fn controller_loop(ctx: Arc<HostCtx>, liveness_cfg: LivenessConfig) {
    let mut rx = ctx.node.machine.subscribe();
    let mut leader_since_ms = None;
    loop {
        let state = rx.borrow_and_update().state.clone();
        liveness::export_metrics(&state.hosts);
        if ctx.node.raft.current_leader().await == Some(ctx.id) {
            let now_ms = ctx.leader.clock_ms();
            let beats = ctx.leader.beats();
            let seen = Observations {
                leader_since_ms: *leader_since_ms.get_or_insert(now_ms),
                last_beat_ms: &beats,
                now_ms,
            };
            for cmd in liveness::decide(state.hosts.values(), &seen, &liveness_cfg) {
                tracing::info!("host liveness: {cmd:?}");
                if let Err(e) = ctx
                    .cluster
                    .propose("liveness".into(), None, cmd, false)
                    .await
                {
                    tracing::warn!("host liveness: {e}");
                }
            }
            maintenance::pass(&ctx, &state).await;
            schedules::fire_due(&ctx, &state).await;
            drs::pass(&ctx, &state, false).await;
        } else {
            leader_since_ms = None;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
