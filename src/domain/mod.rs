//! The rules of pushmatch, free of transport and storage: a leaf that names no
//! other module of the crate (and no gRPC, Redis or HTTP type). Challenges and their
//! state machine, enrollment, device proofs, TOTP, ids and secrets, time as an
//! input, the error with its transport-neutral kind, and the ports the rules need
//! from the outside ([`ports::Store`]). `tests/architecture.rs` holds it to that.
//!
//! The use cases that put these rules to work live in `crate::broker`.

pub mod api_key;
pub mod challenge;
pub mod device;
pub mod enrollment;
pub mod error;
pub mod ids;
pub mod ports;
pub mod qr;
pub mod secrets;
pub mod time;
pub mod totp;
