//! The broker's error type and its one mapping to gRPC codes and HTTP statuses.
//!
//! Variants that describe the caller's mistake carry a message meant for the caller. Store and
//! internal failures carry their cause for the log only: the caller gets a generic message.

use std::fmt;

use tonic::Code;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Longest message a client is sent. A refusal may quote the value it refuses, which can be as
/// large as a request; gRPC carries the message in a trailer, and an HTTP/2 client drops the
/// whole connection (GOAWAY) rather than read a header block of hundreds of KiB.
pub const MAX_CLIENT_MESSAGE_BYTES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// A precondition the caller stated (generation, uid) no longer holds.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The broker is stopping; the caller should reconnect (to another replica).
    #[error("{0}")]
    ShuttingDown(String),
    /// The store cannot be reached or timed out; the caller should retry.
    #[error("store unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::InvalidArgument { field: field.into(), reason: reason.into() }
    }

    pub fn internal(msg: impl fmt::Display) -> Error {
        Error::Internal(msg.to_string().into())
    }

    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Aborted(_) => Code::Aborted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Unavailable(_) | Error::ShuttingDown(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        }
    }

    pub fn http_status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Error::InvalidArgument { .. } => S::BAD_REQUEST,
            Error::NotFound(_) => S::NOT_FOUND,
            Error::AlreadyExists(_) | Error::Aborted(_) => S::CONFLICT,
            Error::FailedPrecondition(_) => S::PRECONDITION_FAILED,
            Error::ResourceExhausted(_) => S::TOO_MANY_REQUESTS,
            Error::PermissionDenied(_) => S::FORBIDDEN,
            Error::Unauthenticated(_) => S::UNAUTHORIZED,
            Error::DeadlineExceeded(_) => S::GATEWAY_TIMEOUT,
            Error::Unavailable(_) | Error::ShuttingDown(_) => S::SERVICE_UNAVAILABLE,
            Error::Internal(_) => S::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable machine-readable code for JSON error bodies.
    pub fn code_str(&self) -> &'static str {
        match self {
            Error::InvalidArgument { .. } => "invalid_argument",
            Error::NotFound(_) => "not_found",
            Error::AlreadyExists(_) => "already_exists",
            Error::Aborted(_) => "aborted",
            Error::FailedPrecondition(_) => "failed_precondition",
            Error::ResourceExhausted(_) => "resource_exhausted",
            Error::PermissionDenied(_) => "permission_denied",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::DeadlineExceeded(_) => "deadline_exceeded",
            Error::Unavailable(_) | Error::ShuttingDown(_) => "unavailable",
            Error::Internal(_) => "internal",
        }
    }

    /// The message a client may see. Internal causes are logged here and never returned.
    pub fn client_message(&self) -> String {
        match self {
            Error::Unavailable(cause) => {
                tracing::warn!(error = %cause, "store unavailable");
                "store unavailable, retry later".to_string()
            }
            Error::Internal(cause) => {
                tracing::error!(error = %cause, "internal error");
                "internal error".to_string()
            }
            other => truncate(other.to_string(), MAX_CLIENT_MESSAGE_BYTES),
        }
    }
}

/// Cuts `s` to at most `max` bytes (on a character boundary), marking the cut.
fn truncate(mut s: String, max: usize) -> String {
    const MARK: &str = "… (truncated)";
    if s.len() <= max {
        return s;
    }
    let mut end = max - MARK.len();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(MARK);
    s
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Error {
        match err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => Error::Unavailable(Box::new(err)),
            sqlx::Error::Database(ref db) if is_retryable_db_code(db.code().as_deref()) => {
                Error::Unavailable(Box::new(err))
            }
            other => Error::Internal(Box::new(other)),
        }
    }
}

/// Postgres SQLSTATEs that mean "try again": connection failures, shutdown, statement timeout,
/// serialization failure, deadlock.
fn is_retryable_db_code(code: Option<&str>) -> bool {
    matches!(code, Some(c) if c.starts_with("08") || c.starts_with("57") || c == "40001" || c == "40P01")
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> tonic::Status {
        tonic::Status::new(err.code(), err.client_message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_causes_are_not_echoed() {
        let err = Error::internal("relation \"objects\" does not exist");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn caller_errors_name_the_field() {
        let status = tonic::Status::from(Error::invalid("spec.macAddress", "not a MAC: \"zz\""));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "invalid spec.macAddress: not a MAC: \"zz\"");
        assert_eq!(Error::invalid("a", "b").http_status(), http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let err = Error::invalid("metadata.labels[\"k\"]", format!("label value {:?} is bad", "é".repeat(100_000)));
        let msg = tonic::Status::from(err).message().to_string();
        assert!(msg.len() <= MAX_CLIENT_MESSAGE_BYTES, "{}", msg.len());
        assert!(msg.starts_with("invalid metadata.labels[\"k\"]: label value \"éé"), "{msg}");
        assert!(msg.ends_with("… (truncated)"), "{msg}");
        assert_eq!(Error::invalid("a", "short").client_message(), "invalid a: short");
    }
}
