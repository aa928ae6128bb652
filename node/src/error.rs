//! The error every service returns: an HTTP-style status (so a forwarded request's error maps
//! back unchanged), a message, and, for a command the state machine refused, its typed reason.
use axum::http::StatusCode;
use tern_consensus::CommandError;

#[derive(Debug)]
pub struct ServiceError {
    pub status: StatusCode,
    pub message: String,
    /// A rejected command carries its typed reason.
    pub rejected: Option<CommandError>,
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ServiceError {}

impl ServiceError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ServiceError {
            status,
            message: message.into(),
            rejected: None,
        }
    }

    /// Bad input (400).
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// The cluster cannot answer now: no leader, peer unreachable (503).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}
