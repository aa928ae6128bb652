//! Fuzz targets for every decoder of outside input, as plain functions.
//!
//! Each function takes the raw bytes a peer, a client, a guest or a file could hand Tern and
//! runs them through the same decoder (and the checks right after it) that production uses.
//! It returns `Ok` when the input was accepted and `Err(reason)` when it was refused cleanly.
//! A panic is a bug: either a decoder panicked, or an invariant checked here failed (for
//! example a decoded message that does not survive its own encoding, or a rejected command
//! that changed the replicated state).
//!
//! The cargo-fuzz project in `fuzz/` wraps each function in a libFuzzer target of the same
//! name; `tests/corpus.rs` replays the committed corpora and crash regressions through them
//! in `cargo test --workspace`; `examples/gen_corpus.rs` writes the seed corpora with the real
//! encoders.
pub mod cluster;
pub mod guest;
pub mod migration;
pub mod sim;
pub mod state_blob;
pub mod vmm;

/// The outcome of one input: accepted, or refused with a reason.
pub type Outcome = Result<(), String>;

/// One fuzz target: its name (the cargo-fuzz target and corpus directory) and its function.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]) -> Outcome,
}

/// Every target, in the order CI runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "migration_frame",
        run: migration::frame_stream,
    },
    Target {
        name: "migration_message",
        run: migration::message,
    },
    Target {
        name: "migration_zpages",
        run: migration::zpages,
    },
    Target {
        name: "migration_handshake",
        run: migration::handshake,
    },
    Target {
        name: "vm_state",
        run: state_blob::vm_state,
    },
    Target {
        name: "device_section",
        run: state_blob::device_section,
    },
    Target {
        name: "vmm_protocol",
        run: vmm::protocol,
    },
    Target {
        name: "api_body",
        run: cluster::api_body,
    },
    Target {
        name: "state_apply",
        run: cluster::state_apply,
    },
    Target {
        name: "raft_rpc",
        run: cluster::raft_rpc,
    },
    Target {
        name: "snapshot",
        run: cluster::snapshot,
    },
    Target {
        name: "datastore_config",
        run: cluster::datastore_config,
    },
    Target {
        name: "sim_trace",
        run: sim::trace,
    },
    Target {
        name: "fleet_toml",
        run: sim::fleet_toml,
    },
    Target {
        name: "workload",
        run: guest::workload,
    },
    Target {
        name: "guest_status",
        run: guest::status_page,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// A temporary directory in memory (/dev/shm) where there is one: the file-reading targets
/// write every input to a file, and a disk would slow them down.
pub(crate) fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    shm.is_dir()
        .then(|| tempfile::tempdir_in(shm).ok())
        .flatten()
        .unwrap_or_else(|| tempfile::tempdir().expect("temporary directory"))
}

/// An error as the reason of a refusal.
pub(crate) fn refuse(e: impl std::fmt::Display) -> String {
    e.to_string()
}
