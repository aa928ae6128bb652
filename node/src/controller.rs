//! Leader-only control loops: maintenance evacuation, schedules and DRS. Every node runs the
//! loop; only the current leader acts, and everything it decides goes through the Raft log, so
//! a new leader picks up where the old one stopped.
use std::sync::Arc;
use std::time::Duration;

use super::host::HostCtx;
use super::{drs, maintenance, schedules};

pub async fn controller_loop(ctx: Arc<HostCtx>) {
    let mut rx = ctx.node.machine.subscribe();
    loop {
        let state = rx.borrow_and_update().state.clone();
        if ctx.node.raft.current_leader().await == Some(ctx.id) {
            maintenance::pass(&ctx, &state).await;
            schedules::fire_due(&ctx, &state).await;
            drs::pass(&ctx, &state, false).await;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
