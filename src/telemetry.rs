//! Logs. `RUST_LOG` overrides `[log] level`; `[log] format = "json"` gives one JSON
//! object a line. What may never appear in a log (API keys, enrollment codes,
//! numbers, TOTP secrets, full push tokens) is kept out at the source: handlers log
//! ids and outcomes, never requests; secret types redact their `Debug`; tokens go
//! through [`crate::push::redact_token`].

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber; a second call is a no-op.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _already_set = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
