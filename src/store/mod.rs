//! Where state lives: the implementations of the domain's [`Store`] port
//! (`crate::domain::ports`). [`embedded::EmbeddedStore`] keeps challenges in memory
//! and devices, enrollments and blocks in a redb file; [`redis::RedisStore`] keeps
//! everything in Redis (one node or a cluster) for replicas that share state;
//! [`metered::MeteredStore`] wraps either with latency and error metrics.
//!
//! The port's types are re-exported here so the backends name them as their own.
//! The conformance suite in `conformance` runs against every backend.

pub use crate::domain::ports::{
    AdmissionPolicy, BlockReason, ChallengeWatch, CompleteOutcome, CreateOutcome, Refusal, ResolveOutcome, Store, StoreError,
    StrikePolicy, UserBlock,
};

pub mod embedded;
pub mod metered;
pub mod redis;

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
