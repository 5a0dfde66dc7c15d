//! The rules of pushmatch, free of transport and storage types: challenges and
//! their state machine, enrollment, device proofs, limits. [`broker::Broker`] is the
//! one entry point the gRPC edge calls.

pub mod broker;
pub mod challenge;
pub mod device;
pub mod enrollment;
pub mod ids;
pub mod secrets;
pub mod time;
pub mod totp;
