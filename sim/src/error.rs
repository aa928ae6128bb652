//! Errors of the simulator library. Every bad input names the file (and line) it came from.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg}")]
    Trace {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("invalid setup: {0}")]
    Invalid(String),
    #[error("cannot place VM {vm}: no host has room for it")]
    NoRoom { vm: usize },
}

pub type Result<T> = std::result::Result<T, SimError>;
