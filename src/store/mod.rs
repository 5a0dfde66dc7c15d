//! Where state lives: the implementations of the domain's [`Store`] port
//! (`crate::domain::ports`). [`embedded::EmbeddedStore`] keeps challenges in memory
//! and devices, enrollments and blocks in a redb file; [`redis::RedisStore`] keeps
//! everything in Redis (one node or a cluster) for replicas that share state;
//! [`metered::MeteredStore`] wraps either with latency and error metrics.
//!
//! The port's types are re-exported here so the backends name them as their own.
//! The conformance suite in `conformance` runs against every backend.

pub use crate::domain::ports::{
    AdmissionPolicy, Answered, BlockReason, ChallengeDevices, ChallengeWatch, CompleteOutcome, CreateFor, CreateOutcome,
    DeviceAnswer, EnrollmentLimits, InsertOutcome, PushesFrom, Refusal, ResolveOutcome, Store, StoreError, StrikePolicy,
    TenantPurge, TotpAttempt, TotpPolicy, UserBlock,
};

pub mod embedded;
pub mod metered;
pub mod redis;

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;

/// A store URL fit for a log line or an error message: any password in it (as in
/// `redis://user:password@host:6379`) is replaced by `***`. A URL that cannot be
/// parsed has its whole user part replaced, so nothing after `://` and before `@`
/// is ever echoed.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return if url.contains('@') { "***".to_owned() } else { url.to_owned() };
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else { return url.to_owned() };
    let user = match userinfo.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{scheme}://{user}@{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::redacted_url;

    #[test]
    fn passwords_in_store_urls_are_never_shown() {
        for (url, shown) in [
            ("redis://:s3cret@redis:6379", "redis://:***@redis:6379"),
            ("rediss://app:s3cret@cache.example.com:6380/0", "rediss://app:***@cache.example.com:6380/0"),
            ("redis://s3cret@redis:6379", "redis://***@redis:6379"),
            ("redis://a:b:s3cret@redis", "redis://a:***@redis"),
            ("http://u:s3cret@x", "http://u:***@x"),
            ("s3cret@redis:6379", "***"),
            ("redis://redis:6379", "redis://redis:6379"),
        ] {
            assert_eq!(redacted_url(url), shown);
            assert!(!redacted_url(url).contains("s3cret"));
        }
    }
}
