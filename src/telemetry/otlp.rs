//! Span export over OTLP/gRPC (the `otlp` cargo feature). Kept out of the default
//! build: the OpenTelemetry SDK and exporter are a sizeable compile for a feature
//! that many deployments leave off.

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::registry::LookupSpan;

use super::TelemetryError;
use super::TracingConfig;

pub type Provider = SdkTracerProvider;

/// The exporter's provider (flushed at shutdown) and the subscriber layer that
/// turns tracing spans into OpenTelemetry spans.
pub fn layer<S>(
    config: &TracingConfig,
) -> Result<(Provider, tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>), TelemetryError>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.otlp_endpoint.clone())
        .build()
        .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio))))
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(config.service_name.clone()).build())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let tracer = provider.tracer("pushmatch");
    Ok((provider, tracing_opentelemetry::layer().with_tracer(tracer)))
}

pub fn shutdown(provider: Provider) {
    if let Err(error) = provider.shutdown() {
        tracing::warn!(%error, "could not flush the last spans");
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

pub fn set_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    let context = opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&HeaderExtractor(headers)));
    if context.span().span_context().is_valid() {
        set_parent(span, context);
    }
}

pub fn current_context() -> Option<opentelemetry::Context> {
    let context = tracing::Span::current().context();
    context.span().span_context().is_valid().then_some(context)
}

pub fn set_parent(span: &tracing::Span, context: opentelemetry::Context) {
    #[allow(clippy::let_underscore_must_use, let_underscore_drop)]
    let _ = span.set_parent(context);
}
