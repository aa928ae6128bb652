//! Property tests of the state machine: determinism and reject-without-change.
use proptest::prelude::*;
use tern_consensus::state::{Capacity, ClusterState, Command, HostState, Request, VmSpec};

fn command() -> impl Strategy<Value = Command> {
    let host = 0u64..4;
    let vm = prop::sample::select(vec!["a", "b", "c"]).prop_map(str::to_string);
    prop_oneof![
        (host.clone(), "[a-z]{0,3}").prop_map(|(id, a)| Command::RegisterHost {
            id,
            address: a,
            capacity: Capacity {
                cpus: 2,
                memory_mib: 1024
            },
            cpu_features: vec![]
        }),
        (host.clone(), 0u8..4).prop_map(|(id, s)| Command::SetHostState {
            id,
            state: [
                HostState::Connected,
                HostState::EnteringMaintenance,
                HostState::InMaintenance,
                HostState::Down
            ][s as usize]
        }),
        host.clone().prop_map(|id| Command::RemoveHost { id }),
        (vm.clone(), host.clone(), 0u32..3).prop_map(|(name, owner, vcpus)| Command::CreateVm {
            spec: VmSpec {
                name,
                vcpus,
                memory_mib: 64,
                cpu_features: vec![]
            },
            pool: None,
            owner
        }),
        (vm.clone(), host.clone(), 0u64..3, host.clone()).prop_map(
            |(vm, expected_owner, expected_epoch, to)| {
                Command::TransferOwnership {
                    vm,
                    expected_owner,
                    expected_epoch,
                    to,
                }
            }
        ),
        (vm.clone(), host.clone()).prop_map(|(vm, to)| Command::CreateTask {
            vm,
            to,
            priority: 1,
            reason: "t".into(),
            token: String::new(),
        }),
        vm.prop_map(|vm| Command::DeleteVm { vm }),
        Just(Command::Noop),
    ]
}

proptest! {
    #[test]
    fn same_commands_same_state_and_rejects_change_nothing(cmds in prop::collection::vec(command(), 0..60)) {
        let mut a = ClusterState::default();
        let mut b = ClusterState::default();
        for (i, command) in cmds.into_iter().enumerate() {
            let req = Request { actor: "p".into(), at_ms: i as u64, command };
            let before = a.clone();
            let ra = a.apply(i as u64 + 1, &req);
            let rb = b.apply(i as u64 + 1, &req);
            prop_assert_eq!(&ra, &rb);
            prop_assert_eq!(&a, &b);
            if ra.is_err() {
                prop_assert_eq!(&a, &before);
            }
            // Ownership is compare-and-set: at most one owner, epochs only grow.
            for (name, vm) in &a.vms {
                if let Some(old) = before.vms.get(name) {
                    prop_assert!(vm.epoch >= old.epoch);
                }
            }
        }
        // Serialized state round-trips (snapshots are this encoding).
        let bytes = serde_json::to_vec(&a).unwrap();
        let back: ClusterState = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(a, back);
    }

    #[test]
    fn arbitrary_bytes_never_decode_into_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = serde_json::from_slice::<Request>(&bytes);
        let _ = serde_json::from_slice::<ClusterState>(&bytes);
    }
}

#[test]
fn ownership_transfer_is_compare_and_set() {
    let mut s = ClusterState::default();
    let req = |command| Request {
        actor: "t".into(),
        at_ms: 7,
        command,
    };
    for id in [1, 2] {
        s.apply(
            id,
            &req(Command::RegisterHost {
                id,
                address: "x".into(),
                capacity: Capacity::default(),
                cpu_features: vec![],
            }),
        )
        .unwrap();
    }
    let spec = VmSpec {
        name: "vm".into(),
        vcpus: 1,
        memory_mib: 64,
        cpu_features: vec![],
    };
    s.apply(
        3,
        &req(Command::CreateVm {
            spec,
            pool: None,
            owner: 1,
        }),
    )
    .unwrap();
    let t = Command::TransferOwnership {
        vm: "vm".into(),
        expected_owner: 1,
        expected_epoch: 0,
        to: 2,
    };
    s.apply(4, &req(t.clone())).unwrap();
    let before = s.clone();
    assert!(
        s.apply(5, &req(t)).is_err(),
        "a stale compare-and-set must be rejected"
    );
    assert_eq!(s, before);
    assert_eq!((s.vms["vm"].owner, s.vms["vm"].epoch), (2, 1));
    assert_eq!(s.audit.last().unwrap().at_ms, 7);
}
