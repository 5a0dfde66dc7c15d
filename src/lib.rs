//! pushmatch: a push-notification challenge broker for multi-factor sign-in.
//!
//! An identity provider asks for a challenge; pushmatch picks a two-digit number for
//! the sign-in page, pushes the challenge id to every phone the user enrolled, and
//! tells the identity provider, over a gRPC stream, the moment the user typed the
//! number and approved (or denied, or reported fraud). `README.md` has the tour;
//! `../shared/API.md` (mirrored in the README) is the outside contract.
//!
//! Modules, outside in (arrows point inward only; `ARCHITECTURE.md` draws them and
//! walks one sign-in through them):
//!
//! - [`server`]: `run(listener, config, shutdown)`: wires store, dispatcher, broker and services; health, reflection, limits, drain; [`server::ops`] serves `/metrics` and `/healthz`.
//! - [`config`]: defaults, then the TOML file, then `PUSHMATCH_*` environment; validated before a port opens; translated into each module's settings. Only `main`, [`server`] and [`demo`] import it.
//! - [`api`]: the gRPC edge: one authentication layer, validate and convert, one broker call, convert back; [`api::status`] is the one error-to-status map.
//! - [`broker`]: the use cases: puts the domain's rules to work over the store port and the push dispatcher.
//! - [`store`]: implementations of the domain's `Store` port: embedded (memory plus a redb file), Redis (replicas), and a metrics decorator.
//! - [`push`]: the `PushSender` trait, the dispatcher that queues, sends and retries pushes, and the APNs and FCM senders on a shared HTTP/2 client.
//! - [`reload`]: when file-backed settings are read again (SIGHUP, a polling interval, an in-process request); the TLS certificates and the tenants use it.
//! - [`tls`]: certificate loading, reload and the TLS accept loop for the gRPC port.
//! - [`telemetry`]: logs, spans (OTLP with the `otlp` feature), the catalogue of metric names and the recorder, per-call gRPC metrics.
//! - [`domain`]: the leaf: challenges, enrollment, device proofs, TOTP, limits, ids, time, the error with its transport-neutral kind, and the ports it needs (`Store`). Names no other module.
//! - [`phone`]: a simulated authenticator app (a real `DeviceService` client); the demo, tests and benches use it, and [`phone::cli`] is `pushmatch phone`.
//! - [`demo`]: `pushmatch demo`, the whole flow in one process.
//! - [`pb`]: the Rust types generated from `proto/pushmatch/v1/pushmatch.proto`.

pub mod api;
pub mod broker;
pub mod config;
pub mod demo;
pub mod domain;
pub mod phone;
pub mod push;
pub mod reload;
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
