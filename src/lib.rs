//! pushmatch: a push-notification challenge broker for multi-factor sign-in.
//!
//! An identity provider asks for a challenge; pushmatch picks a two-digit number for
//! the sign-in page, pushes the challenge id to every phone the user enrolled, and
//! tells the identity provider, over a gRPC stream, the moment the user typed the
//! number and approved (or denied, or reported fraud). `README.md` has the tour;
//! `../shared/API.md` (mirrored in the README) is the outside contract.
//!
//! Modules, outside in:
//!
//! - [`config`]: defaults, then the TOML file, then `PUSHMATCH_*` environment; validated before a port opens.
//! - [`server`]: `run(listener, config, shutdown)`: the tonic server, health, reflection, limits, drain.
//! - [`api`]: the gRPC edge: authenticate, validate and convert, one domain call, convert back.
//! - [`domain`]: challenges, enrollment, device proofs and limits; knows no gRPC, Redis or HTTP types.
//! - [`store`]: the `Store` trait; the embedded backend (memory plus a redb file) and the Redis backend (replicas).
//! - [`push`]: the `PushSender` trait, the dispatcher that queues, sends and retries pushes, and the APNs and FCM senders on a shared HTTP/2 client.
//! - [`error`]: the domain's error enum and the one mapping to `tonic::Status`.
//! - [`telemetry`]: logs, spans (OTLP with the `otlp` feature), Prometheus metrics and `/healthz`.
//! - [`tls`]: TLS and mutual TLS for the gRPC port, with certificate reload.
//! - [`phone`]: a simulated authenticator app (a real `DeviceService` client); the demo, tests and benches use it.
//! - [`demo`]: `pushmatch demo`, the whole flow in one process.
//! - [`pb`]: the Rust types generated from `proto/pushmatch/v1/pushmatch.proto`.

pub mod api;
pub mod config;
pub mod demo;
pub mod domain;
pub mod error;
pub mod phone;
pub mod push;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;

/// The generated gRPC types and services. Only [`api`], [`phone`] and [`demo`] use them:
/// nothing below the edge sees a generated type.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("pushmatch.v1");

    /// The encoded descriptor set of the proto, served by gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("pushmatch_descriptor");
}
