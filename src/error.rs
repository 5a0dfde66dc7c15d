//! The domain's error enum and the ONE place that maps errors to `tonic::Status`.
//!
//! Messages of the client-facing variants are written for the caller and name the
//! field at fault. Internal detail (store or OS errors) is logged here and never
//! sent: the caller reads a generic message with the right code.

use tonic::{Code, Status};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A missing or wrong API key, a bad device proof, an unknown or removed device.
    #[error("{0}")]
    Unauthenticated(String),
    /// A malformed or oversize field; `field` is its name in the proto.
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// An unknown id, or another tenant's (the two are indistinguishable on purpose).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The request is well-formed but the state forbids it: user blocked, no device,
    /// enrollment used or expired.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Per-user limits, lockouts and overload.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A capability that this build does not offer yet.
    #[error("{0}")]
    Unimplemented(&'static str),
    /// The store cannot be reached; the caller may retry.
    #[error("store unavailable")]
    StoreUnavailable(#[source] StoreError),
    /// A bug or an OS failure. The text is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl BrokerError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument { field, reason: reason.into() }
    }

    pub fn unauthenticated(reason: impl Into<String>) -> Self {
        Self::Unauthenticated(reason.into())
    }

    pub fn code(&self) -> Code {
        match self {
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Unimplemented(_) => Code::Unimplemented,
            Self::StoreUnavailable(_) => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<StoreError> for BrokerError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable { .. } => Self::StoreUnavailable(error),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<BrokerError> for Status {
    fn from(error: BrokerError) -> Self {
        let code = error.code();
        let message = match &error {
            BrokerError::StoreUnavailable(source) => {
                tracing::warn!(error = %source, "store unavailable");
                let backend = match source {
                    StoreError::Unavailable { backend, .. } | StoreError::Corrupt { backend, .. } => *backend,
                };
                format!("the {backend} store is unavailable; retry shortly")
            }
            BrokerError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        Status::new(code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_detail_is_not_sent() {
        let status = Status::from(BrokerError::Internal("redb: page 7 corrupt at /secret/path".into()));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret"));
    }

    #[test]
    fn store_outage_is_unavailable_without_its_text() {
        let status = Status::from(BrokerError::from(StoreError::unavailable("redis", "connection refused 10.1.2.3")));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("10.1.2.3"));
    }

    #[test]
    fn invalid_argument_names_the_field() {
        let status = Status::from(BrokerError::invalid("context.location", "is longer than 256 bytes"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("context.location: "));
    }
}
