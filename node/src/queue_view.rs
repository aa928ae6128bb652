//! The committed tasks seen through the scheduler's `MigrationQueue`, so every node applies the
//! same slot and priority rules: high priority reserves its slots at both ends at once or is
//! refused with the reason; normal and low wait and start in (priority, age) order; one source
//! never holds every cluster slot.
use tern_consensus::state::{HostId, MigrationTask, TaskId, TaskState};
use tern_consensus::ClusterState;
use tern_scheduler::{MigrationQueue, QueueError, QueuePriority, Request, SlotLimits};

/// Migration task priorities as committed (`MigrationTask::priority`).
pub const PRIORITY_LOW: u8 = 1;
pub const PRIORITY_NORMAL: u8 = 2;
pub const PRIORITY_HIGH: u8 = 3;

pub fn queue_priority(p: u8) -> QueuePriority {
    match p {
        p if p >= PRIORITY_HIGH => QueuePriority::High,
        PRIORITY_NORMAL => QueuePriority::Normal,
        _ => QueuePriority::Low,
    }
}

fn request(t: &MigrationTask, priority: QueuePriority) -> Request {
    Request {
        id: t.id,
        vm: t.vm.clone(),
        from: t.from.to_string(),
        to: t.to.to_string(),
        priority,
    }
}

/// A queue holding the committed running tasks, then the queued ones in the order they will be
/// considered. Queued high-priority tasks (admitted earlier) wait ahead of normal ones.
fn rebuild(state: &ClusterState) -> Result<MigrationQueue, QueueError> {
    let mut q = MigrationQueue::new(SlotLimits {
        per_source: state.slots.per_source as usize,
        per_destination: state.slots.per_destination as usize,
        per_cluster: state.slots.per_cluster as usize,
    })?;
    for t in state
        .tasks
        .values()
        .filter(|t| t.state == TaskState::Running)
    {
        // Admitted under the committed limits; if those were lowered since, it simply holds
        // no slot here and newer tasks wait a little longer.
        let _ = q.submit(request(t, QueuePriority::High));
    }
    let mut queued: Vec<&MigrationTask> = state
        .tasks
        .values()
        .filter(|t| t.state == TaskState::Queued)
        .collect();
    queued.sort_by_key(|t| (std::cmp::Reverse(t.priority), t.id));
    for t in queued {
        let p = match queue_priority(t.priority) {
            QueuePriority::High => QueuePriority::Normal,
            p => p,
        };
        let _ = q.submit(request(t, p));
    }
    Ok(q)
}

/// Queued tasks from `host` that may start now, in start order.
pub fn startable(state: &ClusterState, host: HostId) -> Vec<TaskId> {
    let Ok(q) = rebuild(state) else {
        return Vec::new();
    };
    let from = host.to_string();
    q.running()
        .iter()
        .filter(|r| r.from == from)
        .filter(|r| {
            state
                .tasks
                .get(&r.id)
                .is_some_and(|t| t.state == TaskState::Queued)
        })
        .map(|r| r.id)
        .collect()
}

/// Whether a new high-priority migration of `vm` from `from` to `to` gets its slots now; the
/// reason when it does not.
pub fn admit_high(state: &ClusterState, vm: &str, from: HostId, to: HostId) -> Result<(), String> {
    let mut q = rebuild(state).map_err(|e| e.to_string())?;
    let r = Request {
        id: u64::MAX,
        vm: vm.to_string(),
        from: from.to_string(),
        to: to.to_string(),
        priority: QueuePriority::High,
    };
    match q.submit(r) {
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}
