//! Applying a write costs O(log n) in the size of the state: with 8,000 VMs and 100,000
//! finished tasks (and a full audit trail) the state machine applies a committed write, and
//! publishes the new state to its subscribers, within 2x of the time it takes on an almost
//! empty state. Both states are measured interleaved in the same run and compared by median, so
//! the machine's load moves both alike; no absolute time is asserted.
use std::time::{Duration, Instant};

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use tern_consensus::state::{
    Capacity, Command, Request, TaskState, VmSpec, AUDIT_RETAIN, TRIM_BATCH,
};
use tern_consensus::store::{open_db, StateMachineStore};
use tern_consensus::{openraft, TypeConfig};

const VMS: usize = 8_000;
const FINISHED_TASKS: usize = 100_000;

struct Machine {
    store: StateMachineStore,
    next_index: u64,
    _dir: tempfile::TempDir,
}

impl Machine {
    fn new() -> Machine {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = open_db(&dir.path().join("db")).expect("sled");
        Machine {
            store: StateMachineStore::open(&db).expect("state machine"),
            next_index: 1,
            _dir: dir,
        }
    }

    fn entry(&mut self, command: Command) -> Entry<TypeConfig> {
        let index = self.next_index;
        self.next_index += 1;
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Request {
                actor: "test".into(),
                at_ms: 1_000 + index,
                command,
            }),
        }
    }

    /// Apply commands as committed entries, in batches as openraft hands them over.
    async fn apply_all(&mut self, commands: impl IntoIterator<Item = Command>) {
        let commands: Vec<Command> = commands.into_iter().collect();
        for chunk in commands.chunks(512) {
            let entries: Vec<Entry<TypeConfig>> =
                chunk.iter().map(|c| self.entry(c.clone())).collect();
            for r in self.store.apply(entries).await.expect("apply") {
                r.result.expect("command accepted");
            }
        }
    }

    /// One committed write, timed through the state machine (apply + publish).
    async fn timed_write(&mut self, command: Command) -> Duration {
        let entry = self.entry(command);
        let t = Instant::now();
        let r = self.store.apply([entry]).await.expect("apply");
        let took = t.elapsed();
        assert!(r[0].result.is_ok(), "{:?}", r[0].result);
        took
    }
}

fn host(id: u64) -> Command {
    Command::RegisterHost {
        id,
        address: format!("10.0.0.{id}:7400"),
        capacity: Capacity {
            cpus: 64,
            memory_mib: 1 << 20,
        },
        cpu_features: vec!["sse2".into(), "avx2".into()],
    }
}

fn vm(i: usize) -> Command {
    Command::CreateVm {
        spec: VmSpec {
            name: format!("vm-{i:05}"),
            vcpus: 2,
            memory_mib: 2048,
            cpu_features: vec!["sse2".into()],
        },
        pool: None,
        owner: 1 + (i % 2) as u64,
    }
}

/// The writes a busy cluster makes, in rotation: a no-op (the leader's commit check), a VM
/// state change, and a migration task's life (create, then finish).
fn workload(step: usize, vms: usize, task_id: &mut u64) -> Command {
    let name = format!("vm-{:05}", step % vms);
    match step % 4 {
        0 => Command::Noop,
        1 => Command::SetVmState {
            vm: name,
            state: tern_consensus::state::VmState::Running,
        },
        2 => Command::CreateTask {
            vm: name,
            to: 3,
            priority: 1,
            reason: "test".into(),
            token: "0123456789abcdef".into(),
        },
        _ => {
            let id = *task_id;
            *task_id += 1;
            Command::UpdateTask {
                id,
                state: TaskState::Cancelled,
                stats: None,
                error: Some("cancelled by the test".into()),
            }
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "current_thread")]
async fn a_write_on_a_big_state_costs_within_2x_of_an_empty_one() {
    let mut big = Machine::new();
    big.apply_all((1..=3).map(host)).await;
    big.apply_all((0..VMS).map(vm)).await;
    // 100,000 migration tasks, each created and finished (they retire to the task history).
    let tasks = (0..FINISHED_TASKS).flat_map(|i| {
        let name = format!("vm-{:05}", i % VMS);
        [
            Command::CreateTask {
                vm: name,
                to: 3,
                priority: 1,
                reason: "load".into(),
                token: "0123456789abcdef".into(),
            },
            Command::UpdateTask {
                id: i as u64,
                state: TaskState::Succeeded,
                stats: None,
                error: None,
            },
        ]
    });
    big.apply_all(tasks).await;
    let state = big.store.view().state;
    assert_eq!(state.vms.len(), VMS);
    assert_eq!(state.tasks.len() + state.task_history.len(), FINISHED_TASKS);
    assert!(state.task_history.len() >= FINISHED_TASKS - 1_000);
    assert!(state.audit.len() >= AUDIT_RETAIN);
    assert!(state.audit.len() < AUDIT_RETAIN + TRIM_BATCH);
    // A subscriber holds the published state, as the node's loops do: the next write must not
    // copy it.
    let _subscriber = big.store.subscribe();

    let mut small = Machine::new();
    small.apply_all((1..=3).map(host)).await;
    small.apply_all((0..4).map(vm)).await;
    let _small_subscriber = small.store.subscribe();

    let (mut big_ids, mut small_ids) = (FINISHED_TASKS as u64, 0u64);
    let (mut t_big, mut t_small) = (Vec::new(), Vec::new());
    for step in 0..4_000 {
        t_big.push(big.timed_write(workload(step, VMS, &mut big_ids)).await);
        t_small.push(small.timed_write(workload(step, 4, &mut small_ids)).await);
    }
    let (b, s) = (median(t_big), median(t_small));
    println!("median write: big state {b:?}, small state {s:?}");
    assert!(
        b <= s * 2,
        "a write on the big state took {b:?}, more than 2x the {s:?} on a small one"
    );
}
