//! The per-VM process (`tern vmm`) as a library: one [`Vm`](crate::Vm) with its vCPU threads
//! and devices, both ends of live migration, and a control socket that the node (or any local
//! client with access to the run directory) drives with a small versioned protocol.
//!
//! - [`protocol`]: frames, requests, replies; every message length-checked and validated.
//! - [`core`]: the VMM's state and operations ([`Vmm`]), including the switchover gate that
//!   waits for the supervisor's decision.
//! - [`server`] / [`client`]: the unix socket's two ends.
//! - [`lease`] / [`guarded`]: the ownership lease every boot and resume checks.
//! - [`rundir`]: `ctl.sock`, `pid`, `exit.json`, and leaving the parent's session.
//!
//! See docs/hypervisor.md ("The VMM process").
pub mod client;
pub mod core;
pub mod guarded;
pub mod lease;
pub mod protocol;
pub mod rundir;
pub mod server;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use self::core::{Vmm, VmmConfig, WireSpec};
pub use client::{Client, ClientError};
pub use protocol::{GateDecision, Request, Response, VmSpec, VmmState, VmmStatus};
pub use rundir::{detach, ExitRecord, RunDir};

/// Why a VMM could not start or do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Hypervisor(#[from] crate::Error),
    #[error("refusing to run the VM: {0}")]
    Lease(#[from] lease::LeaseError),
    #[error("run directory: {0}")]
    RunDir(String),
    #[error("invalid VM spec: {0}")]
    Spec(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

static EXIT: AtomicBool = AtomicBool::new(false);

/// Ask [`run`] to end (after a `Stop` has been answered).
pub(crate) fn request_exit() {
    EXIT.store(true, Ordering::SeqCst);
}

/// A VM that has moved away is kept this long for its supervisor to read the outcome.
const LINGER: Duration = Duration::from_secs(300);

/// Run one VMM in `run_dir` until it is stopped (a `Stop` request, SIGTERM/SIGINT when
/// [`crate::signals::install_stop_handler`] was called) or its migrated-away copy has lingered.
/// A VMM that cannot start records why in `exit.json` too.
pub fn run(cfg: VmmConfig, run_dir: &Path) -> Result<ExitRecord, VmmError> {
    let dir = RunDir::claim(run_dir)?;
    let started = Vmm::new(cfg).and_then(|vmm| {
        let listener = dir.bind()?;
        dir.write_pid()?;
        Ok((vmm, listener))
    });
    let vmm = match started {
        Ok((vmm, listener)) => {
            let server = vmm.clone();
            std::thread::Builder::new()
                .name("vmm-control".into())
                .spawn(move || server::serve(listener, server))?;
            vmm
        }
        Err(e) => {
            dir.finish(&ExitRecord {
                pid: std::process::id(),
                state: VmmState::Failed,
                error: Some(e.to_string()),
            });
            return Err(e);
        }
    };
    let mut away_since = None;
    while !EXIT.load(Ordering::SeqCst) && !crate::signals::stop_requested() {
        std::thread::sleep(Duration::from_millis(20));
        match vmm.state() {
            VmmState::MigratedAway => {
                if away_since.get_or_insert_with(Instant::now).elapsed() >= LINGER {
                    break;
                }
            }
            _ => away_since = None,
        }
    }
    vmm.stop();
    let record = ExitRecord {
        pid: std::process::id(),
        state: vmm.state(),
        error: vmm.last_error(),
    };
    dir.finish(&record);
    Ok(record)
}
