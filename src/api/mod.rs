//! The gRPC edge. [`auth::TenantAuthLayer`] authenticates every call to the IdP's
//! services once, in front of them; each handler converts the request into domain
//! types (validation lives in those conversions, see [`convert`]), makes one call
//! on the [`crate::broker::Broker`] and converts the answer back. Errors become
//! statuses in one place, [`status`]. No rule of the service lives here.

pub mod auth;
pub mod challenges;
pub mod convert;
pub mod devices;
pub mod drain;
pub mod enrollments;
pub mod status;
