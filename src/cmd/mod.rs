//! One module per subcommand group; each owns its arguments and its `run`.
pub mod cluster;
pub mod demo;
pub mod drs;
pub mod drs_cluster;
pub mod guest;
pub mod migrate;
pub mod node;
pub mod placement;
pub mod sim;
pub mod token;
pub mod vm;
pub mod vm_migrate;
pub mod vmm;
pub mod vms;
