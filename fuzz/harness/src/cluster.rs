//! The control plane's outside input: API request bodies, commands applied to the replicated
//! state, Raft RPC bodies, state-machine snapshots and the VM configs in the datastore.
use std::path::PathBuf;
use std::sync::OnceLock;

use crate::{refuse, Outcome};
use tern_consensus::openraft::error::{InstallSnapshotError, RaftError};
use tern_consensus::openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use tern_consensus::openraft::{BasicNode, EntryPayload, StoredMembership};
use tern_consensus::state::{Capacity, Command, ResourcePool, TaskState, VmSpec};
use tern_consensus::store::decode_snapshot;
use tern_consensus::{Applied, ClusterState, CommandError, Request, TypeConfig};
use tern_hypervisor::Workload;
use tern_node::cluster::WriteBody;
use tern_node::cron::{parse_time, When};
use tern_node::datastore::{Datastore, VmConfig};
use tern_node::load::LoadReport;
use tern_node::maintenance::MaintenanceBody;
use tern_node::members::{JoinBody, RemoveBody};
use tern_node::migrations::{CancelBody, MigrationBody};
use tern_node::outbound::PrepareBody;
use tern_node::vms::CreateVmBody;

/// Most commands one input applies (keeps each run short).
const MAX_COMMANDS: usize = 16;
/// A clock late enough for every retention rule to fire.
const LATE_MS: u64 = 10 * 24 * 3_600_000;

fn req(at_ms: u64, command: Command) -> Request {
    Request {
        actor: "fuzz".into(),
        at_ms,
        command,
    }
}

/// The commands that build [`seed_state`], in order (the generator writes them as seeds too).
pub fn seed_commands() -> Vec<Command> {
    let host = |id: u64| Command::RegisterHost {
        id,
        address: format!("127.0.0.1:{}", 7000 + id),
        capacity: Capacity {
            cpus: 8,
            memory_mib: 16_384,
        },
        cpu_features: vec!["sse2".into()],
    };
    let vm = |name: &str, owner: u64, pool: Option<&str>| Command::CreateVm {
        spec: VmSpec {
            name: name.into(),
            vcpus: 2,
            memory_mib: 512,
            cpu_features: Vec::new(),
        },
        pool: pool.map(Into::into),
        owner,
    };
    vec![
        host(1),
        host(2),
        host(3),
        Command::PutPool {
            pool: ResourcePool {
                name: "gold".into(),
                cpu_reservation_mhz: 1000,
                cpu_limit_mhz: Some(8000),
                memory_reservation_mib: 1024,
                memory_limit_mib: None,
                shares: 2000,
            },
        },
        vm("vm-a", 1, None),
        vm("vm-b", 2, Some("gold")),
        vm("vm-c", 3, None),
        Command::CreateTask {
            vm: "vm-a".into(),
            to: 2,
            priority: 1,
            reason: "seed".into(),
            token: "t".into(),
        },
        Command::UpdateTask {
            id: 0,
            state: TaskState::Running,
            stats: None,
            error: None,
        },
        Command::CreateTask {
            vm: "vm-c".into(),
            to: 1,
            priority: 2,
            reason: "seed".into(),
            token: "u".into(),
        },
    ]
}

/// A small cluster: three hosts, a pool, three VMs, a running and a queued migration.
pub fn seed_state() -> ClusterState {
    static S: OnceLock<ClusterState> = OnceLock::new();
    S.get_or_init(|| {
        let mut state = ClusterState::default();
        for (i, c) in seed_commands().into_iter().enumerate() {
            state
                .apply(i as u64 + 1, &req(1_000 + i as u64, c))
                .expect("seed command applies");
        }
        state
    })
    .clone()
}

/// Snapshot data as the state machine builds it (membership and log id empty).
pub fn snapshot_bytes(state: &ClusterState) -> Vec<u8> {
    let data = serde_json::json!({
        "last_applied": null,
        "membership": StoredMembership::<u64, BasicNode>::default(),
        "state": state,
    });
    serde_json::to_vec(&data).expect("a state serializes")
}

/// The state a replica installing `state`'s snapshot holds; panics if it cannot install it.
fn installed(state: &ClusterState) -> ClusterState {
    let bytes = snapshot_bytes(state);
    let back = decode_snapshot(&bytes)
        .unwrap_or_else(|e| panic!("a state's own snapshot does not install: {e}"));
    assert_eq!(*back, *state, "a state changed through its own snapshot");
    (*back).clone()
}

/// Apply one command as every replica does, checking the state machine's promises: a
/// rejected command changes nothing, and a replica that installed a snapshot of the state
/// before the command reaches the same result and the same state.
pub fn apply_checked(
    state: &mut ClusterState,
    index: u64,
    request: &Request,
) -> Result<Applied, CommandError> {
    let before = state.clone();
    let mut replica = installed(state);
    let result = state.apply(index, request);
    let replica_result = replica.apply(index, request);
    assert_eq!(
        result, replica_result,
        "a replica from a snapshot disagrees"
    );
    assert_eq!(*state, replica, "a replica from a snapshot diverged");
    if result.is_err() {
        assert_eq!(*state, before, "a rejected command changed the state");
    }
    result
}

/// Commands applied to the seed cluster, one `/v1/write` body (JSON) per line.
pub fn state_apply(data: &[u8]) -> Outcome {
    let mut state = seed_state();
    let mut applied = 0;
    for (i, line) in data.split(|&b| b == b'\n').take(MAX_COMMANDS).enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let body: WriteBody = serde_json::from_slice(line).map_err(refuse)?;
        let request = Request {
            actor: body.actor.unwrap_or_else(|| "api".into()),
            at_ms: body.at_ms.unwrap_or(2_000 + i as u64),
            command: body.command,
        };
        if apply_checked(&mut state, 100 + i as u64, &request).is_ok() {
            applied += 1;
        }
    }
    installed(&state);
    if applied == 0 {
        return Err("no command applied".into());
    }
    Ok(())
}

/// Decode an API body as JSON of type `T`.
fn body<T: serde::de::DeserializeOwned>(data: &[u8]) -> Result<T, String> {
    serde_json::from_slice(data).map_err(refuse)
}

/// Endpoints whose bodies [`api_body`] decodes, by the input's first byte (modulo).
pub const API_ENDPOINTS: &[&str] = &[
    "POST /v1/vms",
    "POST /v1/migrations",
    "POST /v1/tasks/{id}/cancel",
    "POST /v1/load",
    "POST /v1/hosts/{id}/maintenance",
    "POST /v1/migrations/prepare",
    "POST /v1/write",
    "POST /v1/members/join",
    "POST /v1/members/remove",
    "schedule cron",
    "operator time",
];

/// One API request body: the first byte picks the endpoint ([`API_ENDPOINTS`]), the rest is
/// the body, decoded as the handler decodes it and parsed further where the service parses
/// (workload strings, commands applied to the state, cron expressions, times).
pub fn api_body(data: &[u8]) -> Outcome {
    let (&pick, rest) = data.split_first().ok_or("empty input")?;
    match pick as usize % API_ENDPOINTS.len() {
        0 => {
            let b: CreateVmBody = body(rest)?;
            let w: Workload = b.workload.parse().map_err(refuse)?;
            w.min_memory();
        }
        1 => {
            body::<MigrationBody>(rest)?;
        }
        2 => {
            if !rest.is_empty() {
                body::<CancelBody>(rest)?;
            }
        }
        3 => {
            body::<LoadReport>(rest)?;
        }
        4 => {
            body::<MaintenanceBody>(rest)?;
        }
        5 => {
            body::<PrepareBody>(rest)?;
        }
        6 => return state_apply(rest),
        7 => {
            body::<JoinBody>(rest)?;
        }
        8 => {
            body::<RemoveBody>(rest)?;
        }
        9 => {
            let text = std::str::from_utf8(rest).map_err(refuse)?;
            if let When::Cron(cron) = text.parse::<When>()? {
                for ms in [0, 1_700_000_000_000, u64::MAX] {
                    cron.matches(ms);
                }
            }
        }
        _ => {
            let text = std::str::from_utf8(rest).map_err(refuse)?;
            parse_time(text, 1_700_000_000_000)?;
        }
    }
    Ok(())
}

/// Raft RPCs, by the first byte: the three requests a node decodes from a peer (append
/// entries, vote, install snapshot) and the three replies the sender decodes. Appended
/// commands are applied to the seed state, and a snapshot that arrives whole is decoded as
/// installing it would.
pub fn raft_rpc(data: &[u8]) -> Outcome {
    let (&pick, rest) = data.split_first().ok_or("empty input")?;
    match pick % 6 {
        0 => {
            let rpc: AppendEntriesRequest<TypeConfig> = body(rest)?;
            let mut state = seed_state();
            for entry in rpc.entries.iter().take(MAX_COMMANDS) {
                if let EntryPayload::Normal(request) = &entry.payload {
                    let _ = apply_checked(&mut state, entry.log_id.index, request);
                }
            }
            installed(&state);
        }
        1 => {
            body::<VoteRequest<u64>>(rest)?;
        }
        2 => {
            let rpc: InstallSnapshotRequest<TypeConfig> = body(rest)?;
            if rpc.offset == 0 && rpc.done {
                snapshot(&rpc.data)?;
            }
        }
        3 => {
            let _reply: Result<AppendEntriesResponse<u64>, RaftError<u64>> = body(rest)?;
        }
        4 => {
            let _reply: Result<VoteResponse<u64>, RaftError<u64>> = body(rest)?;
        }
        _ => {
            let _reply: Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>> =
                body(rest)?;
        }
    }
    Ok(())
}

/// State-machine snapshot data, decoded as `install_snapshot` does; the installed state must
/// then take commands (a no-op late enough to retire old tasks, a migration of its first VM)
/// and snapshot again.
pub fn snapshot(data: &[u8]) -> Outcome {
    let mut state = (*decode_snapshot(data).map_err(refuse)?).clone();
    let _ = apply_checked(&mut state, 1, &req(LATE_MS, Command::Noop));
    let first = state
        .vms
        .iter()
        .next()
        .map(|(name, vm)| (name.clone(), vm.owner));
    let host = state.hosts.keys().next().copied();
    if let (Some((vm, owner)), Some(to)) = (first, host) {
        let create = Command::CreateTask {
            vm,
            to: if to == owner { to.wrapping_add(1) } else { to },
            priority: 2,
            reason: "fuzz".into(),
            token: String::new(),
        };
        let _ = apply_checked(&mut state, 2, &req(LATE_MS + 1, create));
    }
    installed(&state);
    Ok(())
}

/// A datastore shared by every run (made once per process).
fn datastore() -> &'static (Datastore, PathBuf, tempfile::TempDir) {
    static D: OnceLock<(Datastore, PathBuf, tempfile::TempDir)> = OnceLock::new();
    D.get_or_init(|| {
        let dir = crate::scratch_dir();
        let ds = Datastore::open(dir.path()).expect("datastore");
        let vm_dir = dir.path().join("vms").join("fz");
        std::fs::create_dir_all(&vm_dir).expect("vm directory");
        (ds, vm_dir.join("config.json"), dir)
    })
}

/// A VM's `config.json` on the datastore, read as a node reads it before booting the VM
/// (then its workload string parsed).
pub fn datastore_config(data: &[u8]) -> Outcome {
    let (ds, path, _) = datastore();
    std::fs::write(path, data).map_err(refuse)?;
    let cfg: VmConfig = ds.config("fz").map_err(|e| format!("{e:#}"))?;
    let w: Workload = cfg.workload.parse().map_err(refuse)?;
    w.min_memory();
    Ok(())
}
