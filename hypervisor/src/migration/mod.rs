//! Live migration: a versioned, checksummed wire protocol; pre-copy off the dirty bitmap with
//! untouched/zero-page elision; convergence by downtime target with auto-converge throttling;
//! parallel streams, bandwidth cap, cancel, progress; and a switchover gate the caller owns.
//! The protocol is documented in docs/migration.md.
pub mod bitmap;
pub mod compress;
pub mod dest;
pub mod frame;
pub mod kvm;
pub mod link;
pub mod messages;
pub mod policy;
pub mod source;
pub mod stats;
pub mod transport;
pub mod vm;

#[cfg(test)]
mod kvm_tests;
#[cfg(test)]
mod tests;

pub use bitmap::PageBitmap;
pub use compress::Compression;
pub use dest::{receive, ReceiveConfig, ReceiveStats};
pub use kvm::{feature_words, KvmMigratable};
pub use link::{ClientTls, Link};
pub use messages::{Hello, VmSpec, MIN_PROTOCOL_VERSION, PAGE_SIZE, PROTOCOL_VERSION};
pub use policy::MigrationConfig;
pub use source::{migrate, SwitchoverGate};
pub use stats::{MigrationStats, Phase, Progress, SwitchoverProfile};
pub use transport::CancelToken;
pub use vm::{MigratableVm, VmOpError, VmResult};

/// Why a migration did not complete. Unless it is [`MigrationError::OutcomeUnknown`], the VM
/// is running on the source.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed migration stream: {0}")]
    Protocol(String),
    #[error("peer closed the connection")]
    PeerClosed,
    #[error("refused: {0}")]
    Refused(String),
    #[error("cancelled")]
    Cancelled,
    #[error("did not converge: {0}")]
    NotConverging(String),
    #[error("switchover gate refused: {0}")]
    GateRefused(String),
    #[error("VM operation failed: {0}")]
    Vm(String),
    #[error("timed out: {0}")]
    Timeout(String),
    /// Failed after the gate: the destination may be running the VM, so the source stays paused.
    #[error("outcome unknown after the switchover gate: {0}")]
    OutcomeUnknown(String),
}
