//! tracing subscriber: text or JSON lines on stderr, filtered by --log-level.

use std::io::IsTerminal;

use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;
use crate::error::ServerError;

/// Installs the global subscriber. Errors on a bad filter or when one is already set.
pub fn init(format: LogFormat, level: &str) -> Result<(), ServerError> {
    let filter = EnvFilter::try_new(level).map_err(|e| ServerError::Logging(format!("--log-level {level:?}: {e}")))?;
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
    result.map_err(|e| ServerError::Logging(e.to_string()))
}
