//! The gRPC edge. Each handler authenticates, converts the request into domain
//! types (validation lives in those conversions, see [`convert`]), makes one call
//! on the [`crate::domain::broker::Broker`] and converts the answer back. No rule
//! of the service lives here.

pub mod auth;
pub mod challenges;
pub mod convert;
pub mod devices;
pub mod enrollments;
