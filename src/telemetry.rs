//! Logs, traces and metrics. `RUST_LOG` overrides `[log] level`; `[log] format =
//! "json"` gives one JSON object a line. What may never appear in a log (API keys,
//! enrollment codes, numbers, TOTP secrets, full push tokens) is kept out at the
//! source: handlers log ids and outcomes, never requests; secret types redact their
//! `Debug`; tokens go through `crate::push::redact_token`.
//!
//! Traces: the broker's spans (`create_challenge`, `respond`, ...) give log lines
//! their context, and each push (`push` in the dispatcher) is a child of the call
//! that created its challenge. With the `otlp` cargo feature and `[tracing]
//! otlp_endpoint` set, spans are exported over OTLP/gRPC, every gRPC call opens a
//! `grpc` span ([`grpc::GrpcTelemetryLayer`]) in which the broker's nest, and the
//! caller's W3C `traceparent` becomes that span's parent. Without an exporter the
//! `grpc` span is not made ([`spans_exported`]).
//!
//! Metrics: [`metrics`] (the catalogue of names and the recorder) and [`grpc`] (per
//! call); the store's latency and errors are measured by `crate::store::metered`,
//! and the `/metrics` endpoint is served by `crate::server::ops`.

use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::EnvFilter;
#[cfg(feature = "otlp")]
use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};

use serde::{Deserialize, Serialize};

pub mod grpc;
pub mod metrics;
#[cfg(feature = "otlp")]
mod otlp;

/// `[log]` and `[tracing]` of the configuration, owned here; `crate::config` reads
/// and validates them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter, e.g. "info" or "pushmatch=debug"; `RUST_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text }
    }
}

/// Span export. Logs are `[log]`; spans always reach the log subscriber.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/gRPC collector, e.g. "http://otel-collector:4317"; "" exports nothing.
    /// Needs a build with the `otlp` cargo feature.
    pub otlp_endpoint: String,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Share of traces exported, 0.0 to 1.0 (a caller's sampled `traceparent` wins).
    pub sample_ratio: f64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self { otlp_endpoint: String::new(), service_name: "pushmatch".into(), sample_ratio: 1.0 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("tracing.otlp_endpoint: {0}")]
    Otlp(String),
}

/// Set once an OTLP exporter is installed as part of the global subscriber.
static SPANS_EXPORTED: AtomicBool = AtomicBool::new(false);

/// Whether spans leave the process (an OTLP exporter is installed): the servers
/// built after [`init_with_traces`] open a `grpc` span per call only then.
pub fn spans_exported() -> bool {
    SPANS_EXPORTED.load(Ordering::Relaxed)
}

/// Text logs are coloured only on a terminal: a file, a pipe or journald would
/// otherwise keep the escape codes in every line.
fn colours() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// Installs the global subscriber; a second call is a no-op.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colours());
    let _already_set = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Flushes exported spans when dropped (at the end of `serve`).
#[must_use = "spans are flushed when the guard drops"]
pub struct TraceGuard {
    #[cfg(feature = "otlp")]
    provider: Option<otlp::Provider>,
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take() {
            otlp::shutdown(provider);
        }
    }
}

/// Logs as [`init`], plus the OTLP span exporter when `[tracing] otlp_endpoint` is
/// set (the `otlp` feature; configuration validation refuses the key without it).
/// Call it inside the tokio runtime: the exporter's gRPC channel lives there.
pub fn init_with_traces(log: &LogConfig, traces: &TracingConfig) -> Result<TraceGuard, TelemetryError> {
    if traces.otlp_endpoint.is_empty() {
        init(log);
        return Ok(TraceGuard {
            #[cfg(feature = "otlp")]
            provider: None,
        });
    }
    #[cfg(feature = "otlp")]
    {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
        let (provider, layer) = otlp::layer(traces)?;
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(colours());
        let registry = tracing_subscriber::registry().with(filter).with(layer);
        let installed = match log.format {
            LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
            LogFormat::Text => registry.with(fmt).try_init(),
        };
        if installed.is_ok() {
            SPANS_EXPORTED.store(true, Ordering::Relaxed);
        }
        Ok(TraceGuard { provider: Some(provider) })
    }
    #[cfg(not(feature = "otlp"))]
    {
        Err(TelemetryError::Otlp("this build has no OTLP exporter; build with `--features otlp`".into()))
    }
}

/// Makes the caller's W3C trace context (the `traceparent` header) the parent of a
/// call's span, when spans are exported; otherwise nothing.
pub(crate) fn set_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    #[cfg(feature = "otlp")]
    otlp::set_remote_parent(span, headers);
    #[cfg(not(feature = "otlp"))]
    let _ = (span, headers);
}

/// Where a piece of work was asked for, carried to where it runs (a push job from
/// CreateChallenge to the dispatcher's task). It holds the trace's ids only, not the
/// span: the call's span still ends when the call does. Without `otlp` it is empty.
#[derive(Clone, Debug, Default)]
pub struct TraceOrigin {
    #[cfg(feature = "otlp")]
    context: Option<opentelemetry::Context>,
}

impl TraceOrigin {
    pub fn current() -> Self {
        Self {
            #[cfg(feature = "otlp")]
            context: otlp::current_context(),
        }
    }

    /// Makes `span` a child of the origin in the exported trace.
    pub fn adopt(&self, span: &tracing::Span) {
        #[cfg(feature = "otlp")]
        if let Some(context) = &self.context {
            otlp::set_parent(span, context.clone());
        }
        #[cfg(not(feature = "otlp"))]
        let _ = span;
    }
}
