//! sled-backed Raft storage: the log (`log`) and the state machine with snapshots (`machine`).
//! Both live in one sled database under the node's data directory, in separate trees.
mod log;
mod machine;

pub use log::LogStore;
pub use machine::{decode_snapshot, AppliedEvent, StateMachineStore, StateView};

use openraft::{AnyError, StorageIOError};

use crate::StorageError;

/// Opens (or creates) the node's sled database.
pub fn open_db(dir: &std::path::Path) -> Result<sled::Db, sled::Error> {
    sled::Config::new()
        .path(dir)
        .mode(sled::Mode::HighThroughput)
        .open()
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read(AnyError::new(&e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write(AnyError::new(&e)).into()
}
