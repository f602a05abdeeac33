//! The client's one error type. Every failure reaches `main` as a `ClientError` and is
//! printed as a single line: `qclient: error: <Display>`.

use std::error::Error as _;
use std::fmt;
use std::path::PathBuf;

use tonic::Code;

use crate::dataset::DatasetError;
use qreformulate::code_name;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `--addr` is not a usable URI.
    #[error("invalid server address {addr:?}: {reason}")]
    InvalidAddress { addr: String, reason: String },

    /// The TCP/HTTP2 connection could not be established.
    #[error("cannot connect to {addr}: {}", chain(.source))]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },

    /// The server answered an RPC with a non-OK status.
    #[error("{rpc} failed: {}", StatusLine(.status))]
    Rpc { rpc: &'static str, status: Box<tonic::Status> },

    /// An input file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An output file (e.g. a man page) could not be written.
    #[error("cannot write {}: {source}", .path.display())]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// `bench`: more requests failed than --max-error-rate allows.
    #[error(
        "{failed} of {requests} requests failed ({:.1}%: {by_code}); --max-error-rate {max_rate} allows at most {:.1}%",
        100.0 * *.failed as f64 / (*.requests).max(1) as f64,
        100.0 * .max_rate
    )]
    TooManyFailures { failed: u64, requests: u64, by_code: String, max_rate: f64 },

    /// An input file (or stdin) has a malformed line.
    #[error("{origin}: {source}")]
    Dataset {
        origin: String,
        #[source]
        source: DatasetError,
    },

    /// Reading stdin or writing stdout failed.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// Arguments that parse but make no sense together (e.g. an empty query file).
    #[error("{0}")]
    Usage(String),
}

impl ClientError {
    pub fn rpc(rpc: &'static str, status: tonic::Status) -> Self {
        ClientError::Rpc { rpc, status: Box::new(normalise(status)) }
    }

    pub fn stdout(source: std::io::Error) -> Self {
        ClientError::Io { what: "cannot write to stdout", source }
    }

    /// True when stdout was closed by the reader (`qclient ... | head`): not worth an error.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, ClientError::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// tonic reports the client's own deadline (`--timeout-ms`) as CANCELLED "Timeout expired";
/// gRPC calls that DEADLINE_EXCEEDED, whichever side noticed first.
pub fn normalise(status: tonic::Status) -> tonic::Status {
    if status.code() != Code::Cancelled {
        return status;
    }
    let mut timed_out = status.message() == "Timeout expired";
    let mut source = status.source();
    while let Some(e) = source {
        timed_out |= e.is::<tonic::TimeoutExpired>();
        source = e.source();
    }
    if timed_out {
        tonic::Status::deadline_exceeded("the deadline (--timeout-ms) passed before the answer came")
    } else {
        status
    }
}

/// `CODE_NAME: message`, on one line (tonic may put a transport error chain in the message).
pub struct StatusLine<'a>(pub &'a tonic::Status);

impl fmt::Display for StatusLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.0;
        let mut message = one_line(status.message());
        // A status made from a transport error keeps the cause in its source chain.
        if let Some(source) = status.source() {
            let cause = chain(source);
            if !cause.is_empty() && !message.contains(&cause) {
                if message.is_empty() {
                    message = cause;
                } else {
                    message = format!("{message}: {cause}");
                }
            }
        }
        if message.is_empty() {
            write!(f, "{}", code_name(status.code()))
        } else {
            write!(f, "{}: {}", code_name(status.code()), message)
        }
    }
}

/// An error and its sources joined with ": " on one line, skipping repeated parts
/// (hyper and tonic often wrap the same message twice).
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        let text = one_line(&e.to_string());
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_error_names_code_and_message_on_one_line() {
        let err = ClientError::rpc("Reformulate", tonic::Status::invalid_argument("query is empty\n(after trimming)"));
        assert_eq!(err.to_string(), "Reformulate failed: INVALID_ARGUMENT: query is empty (after trimming)");
    }

    #[test]
    fn client_side_timeout_becomes_deadline_exceeded() {
        let err = ClientError::rpc("Reformulate", tonic::Status::cancelled("Timeout expired"));
        assert_eq!(
            err.to_string(),
            "Reformulate failed: DEADLINE_EXCEEDED: the deadline (--timeout-ms) passed before the answer came"
        );
        let other = ClientError::rpc("Reformulate", tonic::Status::cancelled("client went away"));
        assert_eq!(other.to_string(), "Reformulate failed: CANCELLED: client went away");
    }

    #[test]
    fn rpc_error_without_message_prints_the_code() {
        let err = ClientError::rpc("Evaluate", tonic::Status::new(Code::Unavailable, ""));
        assert_eq!(err.to_string(), "Evaluate failed: UNAVAILABLE");
    }

    #[test]
    fn chain_skips_repeated_messages() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: connection refused")]
        struct Outer(#[source] std::io::Error);
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        assert_eq!(chain(&Outer(inner)), "outer: connection refused");
    }

    #[test]
    fn broken_pipe_is_recognised() {
        let err = ClientError::stdout(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(err.is_broken_pipe());
        assert!(!ClientError::Usage("x".into()).is_broken_pipe());
    }
}
