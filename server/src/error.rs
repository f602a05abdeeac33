//! The service's one error type and its one mapping to gRPC status codes; and the errors
//! that stop the server from starting or running.

use tonic::{Code, Status};

use crate::engine::{EngineError, ModelError};
use crate::runtime::RuntimeError;

/// Everything a request can fail with. Messages of client errors name the field or limit and
/// the value given; internal causes are logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Cancelled(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// Reading the request stream failed; tonic's own status (a message over the size limit,
    /// a broken stream) is answered as it is.
    #[error("{}", .0.message())]
    Stream(Status),
}

impl From<EngineError> for ServiceError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::TooManyTokens { .. } => ServiceError::InvalidArgument(e.to_string()),
            EngineError::DeadlineExceeded { .. } => ServiceError::DeadlineExceeded(format!("deadline exceeded: {e}")),
            EngineError::Cancelled => ServiceError::Cancelled(e.to_string()),
            EngineError::Unavailable(msg) => ServiceError::Unavailable(msg),
            EngineError::Tokenizer(_) | EngineError::Runtime(_) | EngineError::Model(_) | EngineError::Panicked(_) => {
                ServiceError::Internal(e.to_string())
            }
        }
    }
}

impl ServiceError {
    /// The gRPC status code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            ServiceError::InvalidArgument(_) => Code::InvalidArgument,
            ServiceError::ResourceExhausted(_) => Code::ResourceExhausted,
            ServiceError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ServiceError::Cancelled(_) => Code::Cancelled,
            ServiceError::Unavailable(_) => Code::Unavailable,
            ServiceError::Internal(_) => Code::Internal,
            ServiceError::Stream(s) => s.code(),
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let code = e.code();
        match e {
            ServiceError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                Status::new(code, "internal error; the cause is in the server log")
            }
            ServiceError::Stream(status) => status,
            ServiceError::InvalidArgument(m)
            | ServiceError::ResourceExhausted(m)
            | ServiceError::DeadlineExceeded(m)
            | ServiceError::Cancelled(m)
            | ServiceError::Unavailable(m) => Status::new(code, m),
        }
    }
}

/// Why `serve` could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot set up logging: {0}")]
    Logging(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_maps_to_its_code() {
        let cases = [
            (ServiceError::InvalidArgument("a".into()), Code::InvalidArgument),
            (ServiceError::ResourceExhausted("b".into()), Code::ResourceExhausted),
            (ServiceError::DeadlineExceeded("c".into()), Code::DeadlineExceeded),
            (ServiceError::Cancelled("d".into()), Code::Cancelled),
            (ServiceError::Unavailable("e".into()), Code::Unavailable),
        ];
        for (err, code) in cases {
            let msg = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), msg);
        }
    }

    #[test]
    fn internal_cause_is_not_sent() {
        let status = Status::from(ServiceError::Internal("secret path /x/y failed".into()));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("/x/y"));
    }

    #[test]
    fn engine_errors_map_to_service_errors() {
        let too_long = ServiceError::from(EngineError::TooManyTokens { tokens: 300, limit: 256 });
        assert!(matches!(too_long, ServiceError::InvalidArgument(ref m) if m.contains("300") && m.contains("256")));
        assert!(matches!(
            ServiceError::from(EngineError::DeadlineExceeded { generated: 3 }),
            ServiceError::DeadlineExceeded(_)
        ));
        assert!(matches!(ServiceError::from(EngineError::Cancelled), ServiceError::Cancelled(_)));
        assert!(matches!(ServiceError::from(EngineError::Runtime("x".into())), ServiceError::Internal(_)));
    }
}
