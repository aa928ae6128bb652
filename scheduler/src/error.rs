//! Errors: a bad snapshot names what is wrong; a bad request names the unknown id.
use thiserror::Error;

/// Why a snapshot was rejected. Nothing is planned on a rejected snapshot.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SnapshotError {
    #[error("snapshot JSON at line {line} column {column}: {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("duplicate {kind} id {id:?}")]
    DuplicateId { kind: &'static str, id: String },
    #[error("{owner} refers to unknown {kind} id {id:?}")]
    UnknownId {
        owner: String,
        kind: &'static str,
        id: String,
    },
    #[error("{owner}: {field} is {value}, must be a finite number >= 0")]
    BadNumber {
        owner: String,
        field: &'static str,
        value: f64,
    },
    #[error("{owner}: {field} must be greater than zero")]
    NotPositive { owner: String, field: &'static str },
    #[error("{owner}: {resource} reservation {reservation} is above its limit {limit}")]
    ReservationAboveLimit {
        owner: String,
        resource: &'static str,
        reservation: f64,
        limit: f64,
    },
    #[error("pool {0:?} is its own ancestor (parent cycle)")]
    PoolCycle(String),
    #[error("rule {rule:?}: {problem}")]
    BadRule { rule: String, problem: String },
    #[error("vm {vm:?} is in flight to {to:?}, the host it already runs on")]
    InFlightToSelf { vm: String, to: String },
    #[error("refresh gives {got} {what}, the cluster has {expected}")]
    CountMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
}

/// Why a request on a valid snapshot could not be answered.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SchedError {
    #[error("unknown host id {0:?}")]
    UnknownHost(String),
    #[error("unknown vm id {0:?}")]
    UnknownVm(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid vm: {0}")]
    InvalidVm(String),
}
