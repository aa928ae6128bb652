//! The one error type of the hypervisor crate.
use thiserror::Error;

/// Everything that can go wrong in the VMM, with enough context to act on.
#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot open /dev/kvm: {0}")]
    NoKvm(#[source] kvm_ioctls::Error),
    #[error("KVM {op} failed: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("invalid guest image: {0}")]
    Image(String),
    #[error("invalid workload: {0}")]
    Workload(String),
    #[error("guest address range {addr:#x}+{len:#x} is outside guest memory ({size:#x} bytes)")]
    OutOfRange { addr: u64, len: u64, size: u64 },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("status page: {0}")]
    Status(String),
    #[error("VM is in state {state}, but {op} needs {needed}")]
    WrongState {
        op: &'static str,
        state: &'static str,
        needed: &'static str,
    },
    #[error("invalid VM state: {0}")]
    State(String),
    #[error("vCPU {vcpu} stopped: {reason}")]
    VcpuFailed { vcpu: usize, reason: String },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for mapping a kvm-ioctls error to [`Error::Kvm`].
pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}
