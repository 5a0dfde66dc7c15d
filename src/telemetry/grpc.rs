//! [`GrpcTelemetryLayer`]: a tower layer on the tonic server that measures every
//! call and opens its span.
//!
//! Per call: `grpc_server_started_total` at the start; at the end
//! `grpc_server_handled_total` with the status code and
//! `grpc_server_handling_seconds`. "The end" is where the status is known: the
//! response headers for an error (gRPC's trailers-only response), the trailers
//! otherwise, which for a server stream is when the stream ends. A response the
//! client abandons (its body dropped before the trailers) counts as `Canceled`.
//!
//! Labels come from a table built from the served protos' descriptors, so a client
//! that sends random paths cannot grow the label space: unknown paths are
//! `unknown`.
//!
//! The call's `grpc` span (OpenTelemetry's `otel.*` and `rpc.*` fields) is opened
//! only when spans are exported ([`crate::telemetry::spans_exported`]). Without an
//! exporter nobody reads it, and at the shipped `info` level it cost some 14 µs of
//! the broker's CPU a sign-in (BENCHMARKS.md): made, formatted, re-formatted for
//! its status code and written at the head of every log line of the call.
//! Log lines keep the broker's own spans (`create_challenge{tenant}`,
//! `respond{device_id, challenge_id}`, ...), which say which call they belong to.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use prost::Message as _;
use tower::{Layer, Service};
use tracing::Span;

use super::metrics::names;

/// The labels of one RPC.
#[derive(Clone, Copy, Debug)]
struct Method {
    service: &'static str,
    method: &'static str,
    /// unary, server_stream, client_stream, bidi_stream (go-grpc-prometheus's words).
    kind: &'static str,
}

const UNKNOWN: Method = Method { service: "unknown", method: "unknown", kind: "unknown" };
const WATCH_PATH: &str = "/pushmatch.v1.ChallengeService/WatchChallenge";
const CREATE_AND_WATCH_PATH: &str = "/pushmatch.v1.ChallengeService/CreateAndWatchChallenge";

/// Every RPC this server serves, by path, from the descriptor sets of the protos.
/// Built once per process; its strings live as long as the process.
fn methods() -> &'static HashMap<String, Method> {
    static TABLE: OnceLock<HashMap<String, Method>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = HashMap::new();
        for encoded in
            [crate::pb::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET, tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET]
        {
            let Ok(set) = prost_types::FileDescriptorSet::decode(encoded) else { continue };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let full =
                        if package.is_empty() { service.name().to_owned() } else { format!("{package}.{}", service.name()) };
                    let full: &'static str = Box::leak(full.into_boxed_str());
                    for method in service.method {
                        let kind = match (method.client_streaming(), method.server_streaming()) {
                            (false, false) => "unary",
                            (false, true) => "server_stream",
                            (true, false) => "client_stream",
                            (true, true) => "bidi_stream",
                        };
                        let name: &'static str = Box::leak(method.name().to_owned().into_boxed_str());
                        table.insert(format!("/{full}/{name}"), Method { service: full, method: name, kind });
                    }
                }
            }
        }
        table
    })
}

/// gRPC status codes as grpc-go (and so every Prometheus dashboard) spells them.
fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "Canceled",
        2 => "Unknown",
        3 => "InvalidArgument",
        4 => "DeadlineExceeded",
        5 => "NotFound",
        6 => "AlreadyExists",
        7 => "PermissionDenied",
        8 => "ResourceExhausted",
        9 => "FailedPrecondition",
        10 => "Aborted",
        11 => "OutOfRange",
        12 => "Unimplemented",
        13 => "Internal",
        14 => "Unavailable",
        15 => "DataLoss",
        16 => "Unauthenticated",
        _ => "Unknown",
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Registers every call series at zero (at start, so that `rate()` and alerts see
/// them before the first call): for each served RPC, calls started, calls handled
/// with each of the 17 status codes (as go-grpc-prometheus does), and the latency
/// histogram; and the open watch streams. Bounded by the served protos: the
/// `unknown` label of a stranger's path appears only when one comes. Adding zero
/// keeps what another server in the same process counted already.
pub fn register_series() {
    for Method { service, method, kind } in methods().values().copied() {
        metrics::counter!(names::GRPC_STARTED, "grpc_service" => service, "grpc_method" => method, "grpc_type" => kind)
            .increment(0);
        for code in 0..=16 {
            metrics::counter!(names::GRPC_HANDLED, "grpc_service" => service, "grpc_method" => method, "grpc_type" => kind, "grpc_code" => code_name(code))
                .increment(0);
        }
        let _registered = metrics::histogram!(names::GRPC_HANDLING_SECONDS, "grpc_service" => service, "grpc_method" => method, "grpc_type" => kind);
    }
    metrics::gauge!(names::WATCH_STREAMS_OPEN).increment(0.0);
}

#[derive(Clone, Copy, Debug)]
pub struct GrpcTelemetryLayer {
    spans: bool,
}

impl GrpcTelemetryLayer {
    /// `spans`: open each call's `grpc` span (when spans are exported); metrics are
    /// recorded either way.
    pub fn new(spans: bool) -> Self {
        Self { spans }
    }
}

impl<S> Layer<S> for GrpcTelemetryLayer {
    type Service = GrpcTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTelemetry { inner, spans: self.spans }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcTelemetry<S> {
    inner: S,
    spans: bool,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcTelemetry<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<TelemetryBody<ResBody>>;
    type Error = S::Error;
    type Future = TelemetryFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let method = methods().get(path).copied().unwrap_or(UNKNOWN);
        let span = if self.spans {
            let span = tracing::info_span!(
                "grpc",
                otel.name = %format_args!("{}/{}", method.service, method.method),
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = method.service,
                rpc.method = method.method,
                rpc.grpc.status_code = tracing::field::Empty,
            );
            super::set_remote_parent(&span, request.headers());
            span
        } else {
            Span::none()
        };
        // Both calls hold a watch stream open until the challenge's final state.
        let watch_stream = path == WATCH_PATH || path == CREATE_AND_WATCH_PATH;
        let tracker = CallTracker::start(method, watch_stream, span.clone());
        let inner = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        TelemetryFuture { inner, span, tracker: Some(tracker) }
    }
}

/// Follows one call from its start to its status; records it exactly once, also
/// when the response is dropped half way.
struct CallTracker {
    method: Method,
    started: Instant,
    watch_stream: bool,
    span: Span,
    done: bool,
}

impl CallTracker {
    fn start(method: Method, watch_stream: bool, span: Span) -> Self {
        metrics::counter!(names::GRPC_STARTED, "grpc_service" => method.service, "grpc_method" => method.method, "grpc_type" => method.kind)
            .increment(1);
        if watch_stream {
            metrics::gauge!(names::WATCH_STREAMS_OPEN).increment(1.0);
        }
        Self { method, started: Instant::now(), watch_stream, span, done: false }
    }

    fn finish(&mut self, code: i32) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let Method { service, method, kind } = self.method;
        metrics::counter!(names::GRPC_HANDLED, "grpc_service" => service, "grpc_method" => method, "grpc_type" => kind, "grpc_code" => code_name(code))
            .increment(1);
        metrics::histogram!(names::GRPC_HANDLING_SECONDS, "grpc_service" => service, "grpc_method" => method, "grpc_type" => kind)
            .record(self.started.elapsed().as_secs_f64());
        if self.watch_stream {
            metrics::gauge!(names::WATCH_STREAMS_OPEN).decrement(1.0);
        }
        self.span.record("rpc.grpc.status_code", code);
    }
}

impl Drop for CallTracker {
    fn drop(&mut self) {
        // Dropped before a status was seen: the client went away (or the request
        // timed out, which tonic also reports as cancelled).
        self.finish(1);
    }
}

pin_project_lite::pin_project! {
    pub struct TelemetryFuture<F> {
        #[pin]
        inner: F,
        span: Span,
        tracker: Option<CallTracker>,
    }
}

impl<F, ResBody, E> Future for TelemetryFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<TelemetryBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let result = ready!(this.inner.poll(cx));
        let mut tracker = this.tracker.take();
        Poll::Ready(match result {
            Ok(response) => {
                // Trailers-only (every error status): the code is in the headers.
                if let (Some(code), Some(tracker)) = (grpc_status(response.headers()), tracker.as_mut()) {
                    tracker.finish(code);
                }
                let span = this.span.clone();
                Ok(response.map(|inner| TelemetryBody { inner, span, tracker }))
            }
            Err(error) => {
                if let Some(tracker) = tracker.as_mut() {
                    tracker.finish(2);
                }
                Err(error)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// The response body, watched for the trailers that carry the status.
    pub struct TelemetryBody<B> {
        #[pin]
        inner: B,
        span: Span,
        tracker: Option<CallTracker>,
    }
}

impl<B: Body> Body for TelemetryBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let _entered = this.span.enter();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status)
                    && let Some(mut tracker) = this.tracker.take()
                {
                    tracker.finish(code);
                }
            }
            Some(Err(_)) => {
                if let Some(mut tracker) = this.tracker.take() {
                    tracker.finish(2);
                }
            }
            None => {
                // The body ended without trailers: not a well-formed gRPC response.
                if let Some(mut tracker) = this.tracker.take() {
                    tracker.finish(2);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_method_table_knows_every_served_rpc() {
        let table = methods();
        let create = table.get("/pushmatch.v1.ChallengeService/CreateChallenge").expect("create");
        assert_eq!((create.service, create.method, create.kind), ("pushmatch.v1.ChallengeService", "CreateChallenge", "unary"));
        assert_eq!(table.get(WATCH_PATH).expect("watch").kind, "server_stream");
        assert_eq!(table.get("/grpc.health.v1.Health/Watch").expect("health watch").kind, "server_stream");
        assert_eq!(
            table.get("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo").expect("reflection").kind,
            "bidi_stream"
        );
        assert!(table.get("/pushmatch.v1.ChallengeService/Nope").is_none());
    }

    /// The names of the spans opened while one call to CreateChallenge goes through
    /// the layer, the handler opening its own span as the broker's do.
    fn spans_of_one_call(layer: GrpcTelemetryLayer) -> Vec<&'static str> {
        use tracing_subscriber::layer::SubscriberExt as _;

        #[derive(Clone, Default)]
        struct SpanNames(std::sync::Arc<parking_lot::Mutex<Vec<&'static str>>>);

        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SpanNames {
            fn on_new_span(
                &self,
                attributes: &tracing::span::Attributes<'_>,
                _: &tracing::span::Id,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                self.0.lock().push(attributes.metadata().name());
            }
        }

        let names = SpanNames::default();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(names.clone()), || {
            let handler = tower::service_fn(|_: Request<()>| async {
                let _span = tracing::info_span!("create_challenge").entered();
                Ok::<_, std::convert::Infallible>(Response::new(()))
            });
            let mut service = layer.layer(handler);
            let request = Request::builder().uri("/pushmatch.v1.ChallengeService/CreateChallenge").body(()).expect("request");
            futures::executor::block_on(service.call(request)).expect("response");
        });
        names.0.lock().clone()
    }

    #[test]
    fn a_call_opens_its_grpc_span_only_when_spans_are_exported() {
        assert_eq!(spans_of_one_call(GrpcTelemetryLayer::new(true)), ["grpc", "create_challenge"]);
        assert_eq!(spans_of_one_call(GrpcTelemetryLayer::new(false)), ["create_challenge"]);
    }

    #[test]
    fn codes_are_spelled_as_grpc_go_does() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(1), "Canceled");
        assert_eq!(code_name(16), "Unauthenticated");
        assert_eq!(code_name(99), "Unknown");
    }
}
