//! One module per subcommand group; each owns its arguments and its `run`.
pub mod cluster;
pub mod drs;
pub mod guest;
pub mod node;
pub mod sim;
pub mod vm;
pub mod vm_migrate;
