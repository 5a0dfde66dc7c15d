//! The ONE place that turns the domain's errors into `tonic::Status`.
//!
//! Client-facing messages pass through as written (they name the field at
//! fault). Internal detail (store or OS errors) is logged here and never sent: the
//! caller reads a generic message with the right code.

use tonic::{Code, Status};

use crate::domain::error::{DomainError, ErrorKind};
use crate::domain::ports::StoreError;

/// The status code of each kind of domain error.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    }
}

impl From<DomainError> for Status {
    fn from(error: DomainError) -> Self {
        let code = code(error.kind());
        let message = match &error {
            DomainError::StoreUnavailable(source) => {
                tracing::warn!(error = %source, "store unavailable");
                let backend = match source {
                    StoreError::Unavailable { backend, .. } | StoreError::Corrupt { backend, .. } => *backend,
                };
                format!("the {backend} store is unavailable; retry shortly")
            }
            DomainError::Internal(detail) => {
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
        let status = Status::from(DomainError::Internal("redb: page 7 corrupt at /secret/path".into()));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret"));
    }

    #[test]
    fn store_outage_is_unavailable_without_its_text() {
        let status = Status::from(DomainError::from(StoreError::unavailable("redis", "connection refused 10.1.2.3")));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("10.1.2.3"));
    }

    #[test]
    fn invalid_argument_names_the_field() {
        let status = Status::from(DomainError::invalid("context.location", "is longer than 256 bytes"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("context.location: "));
    }
}
