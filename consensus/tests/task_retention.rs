//! Finished tasks leave the live state after their retention and stay findable in the task
//! history; the state's snapshot format is what earlier versions wrote; the derived task index
//! is rebuilt after a state is read back.
use tern_consensus::state::{
    Capacity, ClusterState, Command, CommandError, Request, TaskState, VmSpec,
    FINISHED_TASK_RETAIN, FINISHED_TASK_RETAIN_MS,
};

fn apply(s: &mut ClusterState, at_ms: u64, command: Command) -> Result<(), CommandError> {
    let index = s.audit.len() as u64 + 1;
    let req = Request {
        actor: "t".into(),
        at_ms,
        command,
    };
    s.apply(index, &req).map(|_| ())
}

fn cluster(vms: usize) -> ClusterState {
    let mut s = ClusterState::default();
    for id in [1, 2] {
        let host = Command::RegisterHost {
            id,
            address: format!("h{id}"),
            capacity: Capacity {
                cpus: 8,
                memory_mib: 8192,
            },
            cpu_features: vec![],
        };
        apply(&mut s, 0, host).expect("host");
    }
    for i in 0..vms {
        let vm = Command::CreateVm {
            spec: VmSpec {
                name: format!("vm{i}"),
                vcpus: 1,
                memory_mib: 64,
                cpu_features: vec![],
            },
            pool: None,
            owner: 1,
        };
        apply(&mut s, 0, vm).expect("vm");
    }
    s
}

fn create(vm: &str) -> Command {
    Command::CreateTask {
        vm: vm.into(),
        to: 2,
        priority: 1,
        reason: "t".into(),
        token: "secret".into(),
    }
}

fn finish(id: u64) -> Command {
    Command::UpdateTask {
        id,
        state: TaskState::Succeeded,
        stats: None,
        error: None,
    }
}

#[test]
fn a_finished_task_moves_to_the_history_after_its_retention() {
    let mut s = cluster(1);
    apply(&mut s, 1_000, create("vm0")).expect("create");
    apply(&mut s, 2_000, finish(0)).expect("finish");
    // Within the retention it is still a live task.
    apply(&mut s, 2_000 + FINISHED_TASK_RETAIN_MS - 1, Command::Noop).expect("noop");
    assert!(s.tasks.contains_key(&0));
    assert!(s.task_history.is_empty());
    // Past it, the next committed write moves it to the history, without its token.
    apply(&mut s, 2_000 + FINISHED_TASK_RETAIN_MS, Command::Noop).expect("noop");
    assert!(s.tasks.is_empty());
    assert_eq!(s.task_history.len(), 1);
    let t = s.find_task(0).expect("task 0 in the history");
    assert_eq!(
        (t.state, t.finished_at_ms),
        (TaskState::Succeeded, Some(2_000))
    );
    assert!(t.token.is_empty(), "a finished task's token is dropped");
    assert_eq!(s.all_tasks().count(), 1);
}

#[test]
fn at_most_the_retained_count_of_finished_tasks_stay_live_and_active_ones_always_do() {
    let mut s = cluster(2);
    // vm1 keeps one queued task throughout.
    apply(&mut s, 0, create("vm1")).expect("queued task");
    let n = FINISHED_TASK_RETAIN as u64 + 10;
    for i in 0..n {
        apply(&mut s, 10, create("vm0")).expect("create");
        apply(&mut s, 10, finish(i + 1)).expect("finish");
    }
    assert_eq!(s.tasks.len(), FINISHED_TASK_RETAIN + 1);
    assert_eq!(s.task_history.len(), 10);
    assert_eq!(s.tasks[&0].state, TaskState::Queued);
    // The oldest finished ones left first.
    let first: Vec<u64> = s.task_history.iter().map(|t| t.id).collect();
    assert_eq!(first, (1..=10).collect::<Vec<_>>());
    // The active task still blocks a second one for its VM.
    assert!(apply(&mut s, 10, create("vm1")).is_err());
}

#[test]
fn a_state_read_back_from_json_rebuilds_its_task_index() {
    let mut s = cluster(1);
    apply(&mut s, 0, create("vm0")).expect("create");
    let json = serde_json::to_vec(&s).expect("serialize");
    let mut back: ClusterState = serde_json::from_slice(&json).expect("deserialize");
    assert_eq!(back, s);
    // The queued task is known to the read-back state: no second task for the VM.
    let err = apply(&mut back, 1, create("vm0")).expect_err("second active task");
    assert!(
        err.to_string().contains("already has migration task 0"),
        "{err}"
    );
    apply(&mut back, 1, finish(0)).expect("finish");
    apply(&mut back, 2, create("vm0")).expect("a new task once the first finished");
}

/// A state as the version with `BTreeMap`s and a `Vec` audit wrote it (no task history).
#[test]
fn a_snapshot_of_the_earlier_format_still_reads() {
    let old = serde_json::json!({
        "hosts": {"1": {"id": 1, "address": "h1", "capacity": {"cpus": 2, "memory_mib": 1024},
                        "cpu_features": [], "state": "connected", "registered_at_ms": 5}},
        "vms": {"a": {"spec": {"name": "a", "vcpus": 1, "memory_mib": 64}, "pool": null,
                      "owner": 1, "epoch": 3, "state": "running"}},
        "pools": {}, "rules": {},
        "tasks": {"7": {"id": 7, "vm": "a", "from": 1, "to": 2, "priority": 1,
                        "state": "queued", "reason": "r", "requested_by": "u",
                        "created_at_ms": 9, "started_at_ms": null, "finished_at_ms": null,
                        "stats": {"downtime_us": 0, "total_ms": 0, "bytes": 0, "rounds": 0},
                        "error": null}},
        "next_task_id": 8, "schedules": {},
        "drs": {"automation": "manual", "migration_threshold": 3, "interval_s": 300},
        "audit": [{"index": 1, "at_ms": 5, "actor": "x", "action": "register host 1 at h1"}],
        "users": {}, "roles": {}
    });
    let s: ClusterState = serde_json::from_value(old.clone()).expect("old format reads");
    assert_eq!(s.vms["a"].epoch, 3);
    assert_eq!(s.tasks[&7].state, TaskState::Queued);
    assert_eq!(s.audit.len(), 1);
    assert!(s.task_history.is_empty());
    // And it writes the same shape back (plus fields added since, with their defaults).
    let again = serde_json::to_value(&s).expect("serialize");
    for key in ["hosts", "audit", "next_task_id"] {
        assert_eq!(again[key], old[key], "{key}");
    }
    assert_eq!(again["tasks"]["7"]["created_at_ms"], 9);
    assert_eq!(again["vms"]["a"]["owner"], 1);
}
