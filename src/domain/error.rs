//! The domain's error: what went wrong, in words for the caller, and a small
//! transport-neutral [`ErrorKind`] (as quickwit's `ServiceErrorCode`). The one
//! mapping of a kind to a gRPC status lives at the edge, in `crate::api::status`.
//!
//! Messages of the client-facing variants are written for the caller and name the
//! field at fault. Internal detail (store or OS errors) is carried for the log and
//! never sent: the edge replaces it with a generic message.

use super::ports::StoreError;

/// The kinds of failure a caller can tell apart; each maps to one status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Unauthenticated,
    InvalidArgument,
    NotFound,
    /// What the call would create exists already (a request_id used for another
    /// sign-in, a public key enrolled before).
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    /// A dependency (the store) cannot be reached now; the caller may retry.
    Unavailable,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// A missing or wrong API key, a bad device proof, an unknown or removed device.
    #[error("{0}")]
    Unauthenticated(String),
    /// A malformed or oversize field; `field` is its name in the proto.
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// An unknown id, or another tenant's (the two are indistinguishable on purpose).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// What the call would create exists already; the message names the field.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well-formed but the state forbids it: user blocked, no device,
    /// enrollment used or expired.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Per-user limits, lockouts and overload.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The store cannot be reached; the caller may retry.
    #[error("store unavailable")]
    StoreUnavailable(#[source] StoreError),
    /// A bug or an OS failure. The text is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl DomainError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument { field, reason: reason.into() }
    }

    pub fn unauthenticated(reason: impl Into<String>) -> Self {
        Self::Unauthenticated(reason.into())
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Unauthenticated(_) => ErrorKind::Unauthenticated,
            Self::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Self::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            Self::ResourceExhausted(_) => ErrorKind::ResourceExhausted,
            Self::StoreUnavailable(_) => ErrorKind::Unavailable,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }
}

impl From<StoreError> for DomainError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable { .. } => Self::StoreUnavailable(error),
            other => Self::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_outage_is_unavailable_and_corruption_internal() {
        assert_eq!(DomainError::from(StoreError::unavailable("redis", "refused")).kind(), ErrorKind::Unavailable);
        assert_eq!(DomainError::from(StoreError::corrupt("redis", "bad json")).kind(), ErrorKind::Internal);
    }

    #[test]
    fn invalid_argument_names_the_field() {
        let error = DomainError::invalid("context.location", "is longer than 256 bytes");
        assert_eq!(error.kind(), ErrorKind::InvalidArgument);
        assert!(error.to_string().starts_with("context.location: "));
    }
}
