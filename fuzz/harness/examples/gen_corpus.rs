//! Writes the seed corpora `fuzz/corpus/<target>/seed-*` with the real encoders.
//!
//!     cargo run -p tern-fuzz-harness --example gen_corpus
//!
//! Each seed is checked against its target before it is written (every seed must be
//! accepted; tests/corpus.rs checks that again on every `cargo test`). The vm_state seeds
//! need /dev/kvm (a real VM's saved state); without it they are left as they are.
use std::path::{Path, PathBuf};

use serde::Serialize;
use tern_consensus::openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use tern_consensus::openraft::{
    CommittedLeaderId, Entry, EntryPayload, LogId, SnapshotMeta, StoredMembership, Vote,
};
use tern_consensus::state::{
    AutomationLevel, Command, DrsSettings, HostState, Role, Rule, RuleKind, Schedule,
    ScheduledTask, SlotSettings, TaskState, TaskStats, User,
};
use tern_consensus::{ClusterState, Request, TypeConfig};
use tern_fuzz_harness::cluster::{seed_commands, seed_state, snapshot_bytes, API_ENDPOINTS};
use tern_fuzz_harness::migration::TOKEN;
use tern_fuzz_harness::state_blob::blk_device;
use tern_fuzz_harness::target;
use tern_hypervisor::devices::MmioDevice;
use tern_hypervisor::migration::compress::{BatchEncoder, Encoded};
use tern_hypervisor::migration::frame::write_frame;
use tern_hypervisor::migration::messages::{Hello, Message, VmSpec};
use tern_hypervisor::migration::Compression;
use tern_hypervisor::vmm::protocol::{
    self as vmm, GateDecision, Request as VmmRequest, Response as VmmResponse, Tuning,
};
use tern_hypervisor::vmm::WireSpec;
use tern_node::cluster::WriteBody;
use tern_node::datastore::VmConfig;

struct Out {
    root: PathBuf,
    written: usize,
    refused: Vec<String>,
}

impl Out {
    /// Write `data` as seed `name` of `target_name` if the target accepts it.
    fn seed(&mut self, target_name: &str, name: &str, data: &[u8]) {
        let t = target(target_name).unwrap_or_else(|| panic!("no target {target_name}"));
        if let Err(e) = (t.run)(data) {
            self.refused.push(format!("{target_name}/seed-{name}: {e}"));
            return;
        }
        let dir = self.root.join(target_name);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        std::fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
        self.written += 1;
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("serializes")
}

fn with_byte(b: u8, rest: &[u8]) -> Vec<u8> {
    let mut v = vec![b];
    v.extend_from_slice(rest);
    v
}

fn pages(n: u64, fill: impl Fn(u64, usize) -> u8) -> Message {
    Message::Pages(
        (0..n)
            .map(|pfn| (pfn * 3, (0..4096).map(|i| fill(pfn, i)).collect()))
            .collect(),
    )
}

fn wire_config() -> String {
    serde_json::to_string(&WireSpec {
        vm: vmm::VmSpec {
            name: "vm-a".into(),
            memory_mib: 64,
            vcpus: 2,
            workload: "wss=16M,rate=1000,pattern=random,duty=50".into(),
            disk: None,
        },
        cpu_vendor: "GenuineIntel".into(),
    })
    .expect("serializes")
}

fn hello(version: u32) -> Hello {
    Hello {
        version,
        token: TOKEN.into(),
        streams: 4,
        spec: VmSpec {
            memory_bytes: 64 << 20,
            vcpus: 2,
            page_size: 4096,
            config: wire_config(),
        },
        cpu_features: vec![0x1234, 0xff],
        features: if version >= 2 { 1 } else { 0 },
    }
}

fn zpages_payload() -> Vec<u8> {
    let plain = pages(8, |p, i| (p as u8).wrapping_add((i / 512) as u8))
        .encode()
        .1;
    let mut enc = BatchEncoder::new(Compression::On, 0.0);
    match enc.encode(&plain) {
        Encoded::Compressed(z) => z.to_vec(),
        Encoded::Plain(_) => panic!("a compressible batch went plain"),
    }
}

fn migration(out: &mut Out) {
    let zp = zpages_payload();
    let raw_len = u32::from_le_bytes([zp[0], zp[1], zp[2], zp[3]]);
    let messages = vec![
        ("hello-v2", Message::Hello(hello(2))),
        ("hello-v1", Message::Hello(hello(1))),
        (
            "join",
            Message::Join {
                session: 42,
                stream: 1,
                token: TOKEN.into(),
            },
        ),
        (
            "welcome",
            Message::Welcome {
                session: 42,
                features: 1,
            },
        ),
        (
            "refuse",
            Message::Refuse {
                reason: "busy".into(),
            },
        ),
        ("pages", pages(2, |p, i| (p as usize + i) as u8)),
        ("zeros", Message::Zeros(vec![(0, 16), (100, 1)])),
        (
            "zpages",
            Message::ZPages {
                raw_len,
                data: zp[4..].to_vec(),
            },
        ),
        ("flush", Message::Flush { epoch: 3 }),
        (
            "device-state",
            Message::DeviceState(b"{\"version\":2}".to_vec()),
        ),
        (
            "complete",
            Message::Complete {
                epoch: 3,
                want_hash: true,
            },
        ),
        ("image-ready", Message::ImageReady { hash: 0xfeed }),
        ("resume", Message::Resume),
        ("resumed", Message::Resumed),
        (
            "abort",
            Message::Abort {
                reason: "cancelled".into(),
            },
        ),
    ];
    let mut session = Vec::new();
    for (name, msg) in &messages {
        let (kind, payload) = msg.encode();
        out.seed("migration_message", name, &with_byte(kind, &payload));
        let mut frame = Vec::new();
        write_frame(&mut frame, kind, &payload).expect("frame");
        out.seed("migration_frame", name, &frame);
        session.extend_from_slice(&frame);
    }
    out.seed("migration_frame", "session", &session);
    out.seed("migration_zpages", "eight-pages", &zp);
    for v in [1, 2] {
        let (_, payload) = Message::Hello(hello(v)).encode();
        out.seed(
            "migration_handshake",
            &format!("hello-v{v}"),
            &with_byte(0, &payload),
        );
    }
    let (_, join) = Message::Join {
        session: 7,
        stream: 3,
        token: TOKEN.into(),
    }
    .encode();
    out.seed("migration_handshake", "join", &with_byte(1, &join));
}

/// A real VM's saved state with one virtio-blk disk (needs /dev/kvm).
fn real_vm_state() -> Option<tern_hypervisor::VmState> {
    use tern_hypervisor::devices::virtio::{blk::create_image, DiskConfig};
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIP: no /dev/kvm: vm_state seeds from a real VM are not regenerated");
        return None;
    }
    let dir = tempfile::tempdir().ok()?;
    let disk = dir.path().join("disk.img");
    create_image(&disk, 1 << 20).ok()?;
    let mut vm = tern_hypervisor::Vm::new(tern_hypervisor::VmConfig {
        memory: tern_hypervisor::memory::MIN_MEMORY,
        vcpus: 2,
        serial_log: None,
    })
    .expect("VM");
    vm.attach_disk(&DiskConfig {
        path: disk,
        read_only: false,
    })
    .expect("disk");
    let w: tern_hypervisor::Workload = "wss=4M,rate=1000,disk=512K,iops=100"
        .parse()
        .expect("workload");
    vm.boot(tern_hypervisor::guest_image::IMAGE, &w.cmdline())
        .expect("boot");
    std::thread::sleep(std::time::Duration::from_millis(700));
    vm.pause().expect("pause");
    let state = vm.save_state().expect("save");
    vm.shutdown();
    Some(state)
}

fn state_blob(out: &mut Out) {
    let fresh = blk_device().save().expect("save");
    let mut sections = vec![("fresh-blk", fresh)];
    if let Some(state) = real_vm_state() {
        out.seed(
            "vm_state",
            "booted-vm-with-disk",
            &state.to_bytes().expect("encode"),
        );
        if let Some(d) = state.devices.first() {
            sections.push(("booted-blk", d.clone()));
        }
    }
    for (name, s) in sections {
        out.seed("device_section", name, &json(&s));
    }
}

fn vmm_frames(out: &mut Out) {
    let spec = vmm::VmSpec {
        name: "vm-a".into(),
        memory_mib: 64,
        vcpus: 2,
        workload: "wss=8M".into(),
        disk: Some("/datastore/vms/vm-a/disk.img".into()),
    };
    let requests = vec![
        ("status", VmmRequest::Status),
        ("pause", VmmRequest::Pause),
        ("stop", VmmRequest::Stop),
        (
            "migrate-out",
            VmmRequest::MigrateOut {
                dest: "127.0.0.1:7100".parse().expect("addr"),
                token: "t".into(),
                tuning: Tuning {
                    downtime_ms: 300,
                    bandwidth: 1 << 30,
                    streams: 4,
                    io_timeout_ms: 5000,
                },
            },
        ),
        (
            "receive",
            VmmRequest::Receive {
                listen: "127.0.0.1:0".parse().expect("addr"),
                token: "t".into(),
                expected: Box::new(spec),
                epoch: 3,
                accept_timeout_ms: Some(1000),
            },
        ),
        ("wait-gate", VmmRequest::WaitGate { timeout_ms: 1000 }),
        (
            "gate-refused",
            VmmRequest::Gate {
                decision: GateDecision::Refused {
                    reason: "lost".into(),
                    epoch: Some(4),
                },
            },
        ),
        (
            "gate-committed",
            VmmRequest::Gate {
                decision: GateDecision::Committed,
            },
        ),
    ];
    let mut all = Vec::new();
    for (name, r) in requests {
        let mut f = Vec::new();
        vmm::write_frame(&mut f, &vmm::encode_request(&r)).expect("frame");
        out.seed("vmm_protocol", &format!("request-{name}"), &f);
        all.extend_from_slice(&f);
    }
    let replies: Vec<(&str, Result<VmmResponse, String>)> = vec![
        ("done", Ok(VmmResponse::Done)),
        ("error", Err("no such vm".into())),
        (
            "listening",
            Ok(VmmResponse::Listening {
                addr: "127.0.0.1:7200".parse().expect("addr"),
            }),
        ),
    ];
    for (name, r) in replies {
        let mut f = Vec::new();
        vmm::write_frame(&mut f, &vmm::encode_reply(&r)).expect("frame");
        out.seed("vmm_protocol", &format!("reply-{name}"), &f);
        all.extend_from_slice(&f);
    }
    out.seed("vmm_protocol", "conversation", &all);
}

fn write_line(command: Command, at_ms: Option<u64>) -> Vec<u8> {
    json(&WriteBody {
        actor: Some("ops".into()),
        at_ms,
        command,
    })
}

/// One command of each kind that the seed cluster accepts.
fn commands(state: &ClusterState) -> Vec<(&'static str, Command)> {
    let epoch = |vm: &str| state.vms.get(vm).map(|v| v.epoch).unwrap_or(0);
    vec![
        (
            "create-task",
            Command::CreateTask {
                vm: "vm-b".into(),
                to: 3,
                priority: 1,
                reason: "manual".into(),
                token: "x".into(),
            },
        ),
        (
            "update-task",
            Command::UpdateTask {
                id: 0,
                state: TaskState::Succeeded,
                stats: Some(TaskStats {
                    downtime_us: 900,
                    total_ms: 1200,
                    bytes: 1 << 30,
                    rounds: 4,
                }),
                error: None,
            },
        ),
        (
            "transfer",
            Command::TransferOwnership {
                vm: "vm-a".into(),
                expected_owner: 1,
                expected_epoch: epoch("vm-a"),
                to: 2,
            },
        ),
        (
            "fence",
            Command::FenceVm {
                vm: "vm-b".into(),
                expected_owner: 2,
                expected_epoch: epoch("vm-b"),
            },
        ),
        (
            "host-state",
            Command::SetHostState {
                id: 3,
                state: HostState::EnteringMaintenance,
            },
        ),
        (
            "rule",
            Command::PutRule {
                rule: Rule {
                    name: "apart".into(),
                    kind: RuleKind::VmVmAntiAffinity,
                    mandatory: true,
                    vms: vec!["vm-a".into(), "vm-c".into()],
                    hosts: Vec::new(),
                },
            },
        ),
        (
            "schedule",
            Command::PutSchedule {
                schedule: Schedule {
                    name: "nightly".into(),
                    cron: "0 2 * * *".into(),
                    action: r#"{"vm":"vm-b","to":3}"#.into(),
                    enabled: true,
                    last_fired_ms: None,
                    last_error: None,
                    created_by: String::new(),
                },
            },
        ),
        (
            "drs",
            Command::SetDrs {
                settings: DrsSettings {
                    automation: AutomationLevel::FullyAutomated,
                    migration_threshold: 2,
                    interval_s: 60,
                },
            },
        ),
        (
            "role",
            Command::PutRole {
                role: Role {
                    name: "admin".into(),
                    privileges: vec!["vm.create".into()],
                },
            },
        ),
        (
            "user",
            Command::PutUser {
                user: User {
                    name: "ann".into(),
                    roles: vec!["admin".into()],
                },
            },
        ),
        (
            "slots",
            Command::SetSlots {
                slots: SlotSettings {
                    per_source: 1,
                    per_destination: 1,
                    per_cluster: 2,
                },
            },
        ),
        (
            "vm-state",
            Command::SetVmState {
                vm: "vm-c".into(),
                state: tern_consensus::state::VmState::Stopped,
            },
        ),
        ("noop", Command::Noop),
    ]
}

fn cluster(out: &mut Out) {
    let state = seed_state();
    let cmds = commands(&state);
    let mut script = Vec::new();
    for (i, (name, c)) in cmds.iter().enumerate() {
        let mut line = write_line(c.clone(), None);
        if *name == "user" {
            // A user's roles must exist: the role first.
            let mut both = write_line(cmds[i - 1].1.clone(), None);
            both.push(b'\n');
            both.extend_from_slice(&line);
            line = both;
        }
        out.seed("state_apply", name, &line);
        out.seed("api_body", &format!("write-{name}"), &with_byte(6, &line));
        script.extend_from_slice(&line);
        script.push(b'\n');
    }
    out.seed("state_apply", "script", &script);
    let fire = Command::FireSchedule {
        name: "nightly".into(),
        slot_ms: 7_200_000,
        task: Some(ScheduledTask {
            vm: "vm-b".into(),
            to: 3,
            priority: 2,
            reason: "schedule nightly".into(),
            requested_by: "schedule".into(),
            token: "y".into(),
        }),
    };
    let mut fired = write_line(cmds[6].1.clone(), None);
    fired.push(b'\n');
    fired.extend_from_slice(&write_line(fire, Some(7_200_000)));
    out.seed("state_apply", "schedule-fires", &fired);

    let body = |i: usize, v: serde_json::Value| with_byte(i as u8, &json(&v));
    assert_eq!(API_ENDPOINTS.len(), 11);
    let api = [
        (
            "create-vm",
            body(
                0,
                serde_json::json!({"name":"vm-x","memory_mib":256,"vcpus":2,
                    "workload":"wss=64M,rate=5000,pattern=hotcold,duty=30,content=compressible",
                    "pool":"gold","host":2,"actor":"ann","disk_mib":64}),
            ),
        ),
        (
            "migration",
            body(
                1,
                serde_json::json!({"vm":"vm-a","to":2,"priority":1,"reason":"x"}),
            ),
        ),
        ("cancel", body(2, serde_json::json!({"actor":"ann"}))),
        (
            "load",
            body(
                3,
                serde_json::json!({"host":1,"vms":{"vm-a":{"cpu_percent":12.5,
                    "active_mib":100,"dirty_mib_s":3.25}}}),
            ),
        ),
        (
            "maintenance",
            body(4, serde_json::json!({"enter":true,"actor":"ann"})),
        ),
        ("prepare", body(5, serde_json::json!({"task":7}))),
        (
            "join",
            body(7, serde_json::json!({"id":4,"addr":"127.0.0.1:7004"})),
        ),
        ("remove", body(8, serde_json::json!({"id":4}))),
        ("cron", with_byte(9, b"*/15 2-4 1,15 * 1-5")),
        ("cron-at", with_byte(9, b"@at 1700000000000")),
        ("time-rfc3339", with_byte(10, b"2026-01-31T22:00:05.250Z")),
        ("time-relative", with_byte(10, b"+90m")),
        ("time-unix", with_byte(10, b"1700000000")),
    ];
    for (name, data) in api {
        out.seed("api_body", name, &data);
    }

    // Raft RPCs carrying the seed commands.
    let log_id = |i: u64| LogId::new(CommittedLeaderId::new(1, 1), i);
    let entries: Vec<Entry<TypeConfig>> = seed_commands()
        .into_iter()
        .chain(cmds.iter().map(|(_, c)| c.clone()))
        .enumerate()
        .map(|(i, command)| Entry {
            log_id: log_id(i as u64 + 2),
            payload: EntryPayload::Normal(Request {
                actor: "ops".into(),
                at_ms: 1_000 + i as u64,
                command,
            }),
        })
        .take(16)
        .collect();
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(1, 1),
        prev_log_id: Some(log_id(1)),
        entries,
        leader_commit: Some(log_id(1)),
    };
    out.seed("raft_rpc", "append", &with_byte(0, &json(&append)));
    let heartbeat = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(2, 3),
        prev_log_id: None,
        entries: vec![Entry {
            log_id: log_id(1),
            payload: EntryPayload::Blank,
        }],
        leader_commit: None,
    };
    out.seed("raft_rpc", "append-blank", &with_byte(0, &json(&heartbeat)));
    let vote = VoteRequest::<u64> {
        vote: Vote::new(3, 2),
        last_log_id: Some(log_id(9)),
    };
    out.seed("raft_rpc", "vote", &with_byte(1, &json(&vote)));
    let snap = InstallSnapshotRequest::<TypeConfig> {
        vote: Vote::new_committed(1, 1),
        meta: SnapshotMeta {
            last_log_id: Some(log_id(12)),
            last_membership: StoredMembership::default(),
            snapshot_id: "1-1-12".into(),
        },
        offset: 0,
        data: snapshot_bytes(&state),
        done: true,
    };
    out.seed("raft_rpc", "install-snapshot", &with_byte(2, &json(&snap)));
    let ok_append: Result<AppendEntriesResponse<u64>, ()> = Ok(AppendEntriesResponse::Success);
    out.seed("raft_rpc", "append-reply", &with_byte(3, &json(&ok_append)));
    let ok_vote: Result<VoteResponse<u64>, ()> = Ok(VoteResponse {
        vote: Vote::new(3, 2),
        vote_granted: true,
        last_log_id: Some(log_id(9)),
    });
    out.seed("raft_rpc", "vote-reply", &with_byte(4, &json(&ok_vote)));
    let ok_snap: Result<InstallSnapshotResponse<u64>, ()> = Ok(InstallSnapshotResponse {
        vote: Vote::new_committed(1, 1),
    });
    out.seed("raft_rpc", "snapshot-reply", &with_byte(5, &json(&ok_snap)));

    out.seed("snapshot", "seed-cluster", &snapshot_bytes(&state));
    let mut busy = state.clone();
    for (i, (_, c)) in cmds.iter().enumerate() {
        let _ = busy.apply(
            100 + i as u64,
            &Request {
                actor: "ops".into(),
                at_ms: 5_000 + i as u64,
                command: c.clone(),
            },
        );
    }
    out.seed("snapshot", "busy-cluster", &snapshot_bytes(&busy));

    let cfg = VmConfig {
        name: "vm-a".into(),
        memory_mib: 256,
        vcpus: 2,
        workload: "wss=64M,rate=5000,pattern=random".into(),
        disk_mib: 1024,
        restart: Default::default(),
    };
    out.seed("datastore_config", "vm", &json(&cfg));
    out.seed(
        "datastore_config",
        "legacy-no-disk",
        br#"{"name":"old","memory_mib":64,"vcpus":1,"workload":"wss=8M"}"#,
    );
}

fn sim(out: &mut Out) {
    out.seed("sim_trace", "trace", &with_byte(0, b"12\n0\n\n100\n57\n"));
    out.seed(
        "sim_trace",
        "order",
        &with_byte(1, b"vm_index\tfile\tvm_type\n1\tb\t2\n0\ta\t0\n"),
    );
    out.seed(
        "fleet_toml",
        "small",
        br#"interval_s = 300
days = 0.05
migration = { model = "precopy", bw_share = 0.5, max_rounds = 30, downtime_target_s = 0.3 }

[[host]]
count = 2
pes = 4
pe_mips = 2000
ram_mb = 16384
bw_mbps = 1000
power_w = [90, 100, 110, 120, 130, 140, 150, 160, 170, 180, 190]

[[vm]]
count = 3
pes = 1
mips = 1000
ram_mb = 1024
dirty_mb_s = 10
mix = { diurnal = 2, bursty = 1 }

[[vm]]
count = 1
mips = 500
ram_mb = 512
workload = "trend"

[[event]]
at_s = 600
host = 1
kind = "maintenance_enter"
"#,
    );
}

fn guest(out: &mut Out) {
    for (name, w) in [
        ("default", "wss=64M"),
        (
            "full",
            "wss=256M,rate=50000,pattern=hotcold,duty=30,seed=7,content=compressible",
        ),
        ("once", "wss=4K,pattern=once"),
        ("disk", "wss=16M,disk=64M,iops=2000"),
    ] {
        out.seed("workload", name, w.as_bytes());
    }
    // A status page as the guest writes it: magic, ABI version, then counters.
    let mut page = vec![0u8; 0x200];
    page[0..8].copy_from_slice(&tern_hypervisor::status::STATUS_MAGIC.to_le_bytes());
    page[8..12].copy_from_slice(&tern_hypervisor::status::STATUS_VERSION.to_le_bytes());
    out.seed("guest_status", "zero-counters", &page);
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus");
    let mut out = Out {
        root,
        written: 0,
        refused: Vec::new(),
    };
    migration(&mut out);
    state_blob(&mut out);
    vmm_frames(&mut out);
    cluster(&mut out);
    sim(&mut out);
    guest(&mut out);
    println!("wrote {} seeds under {}", out.written, out.root.display());
    if !out.refused.is_empty() {
        eprintln!("refused by their targets (not written):");
        for r in &out.refused {
            eprintln!("  {r}");
        }
        std::process::exit(1);
    }
}
