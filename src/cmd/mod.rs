//! One module per subcommand group; each owns its arguments and its `run`.
pub mod cluster;
pub mod drs;
pub mod guest;
pub mod node;
pub mod sim;
pub mod vm;
// Wired into `vm run` / `vm receive` once the VMM's `vm run` lands in vm.rs.
#[allow(dead_code)]
pub mod vm_migrate;
