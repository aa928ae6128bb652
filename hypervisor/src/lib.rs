//! tern-hypervisor: the embedded KVM VMM (guest memory, vCPUs, devices, state save/restore)
//! and live migration. The only crate in Tern that may contain `unsafe`; every block carries
//! a `// SAFETY:` comment.
//!
//! Entry point: [`Vm`]. See docs/hypervisor.md for the API tour.
pub mod cpu;
pub mod devices;
pub mod disk_workload;
pub mod error;
pub mod guest_image;
mod kick;
pub mod memory;
pub mod migration;
pub mod multiboot;
pub mod serial;
pub mod signals;
pub mod state;
pub mod status;
pub mod uffd;
pub mod vm;
pub mod vmm;
pub mod workload;

pub use cpu::CpuFeatures;
pub use error::{Error, Result};
pub use memory::{GuestMemory, PAGE_SIZE};
pub use state::{VcpuState, VmState, STATE_VERSION};
pub use status::{DiskStatus, GuestState, GuestStatus, STATUS_ADDR};
pub use vm::{RunState, Vm, VmConfig, THROTTLE_WINDOW};
pub use workload::{Content, Pattern, Workload};
