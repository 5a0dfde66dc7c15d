//! The one way the store talks to Redis, and how what goes wrong becomes a
//! [`StoreError`]: a call past its deadline or a Redis error is UNAVAILABLE
//! ([`unavailable`]), a record this version cannot read is corrupt ([`corrupt`]).

use std::time::Duration;

use redis::cluster_routing::{AggregateOp, MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{Cmd, FromRedisValue, Pipeline, ScriptInvocation};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::link::{self, Link, Subscriber, bounded};
use super::{BACKEND, RedisSettings};
use crate::store::StoreError;

pub(super) fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::unavailable(BACKEND, error)
}

pub(super) fn corrupt(error: impl std::fmt::Display) -> StoreError {
    StoreError::corrupt(BACKEND, error)
}

pub(super) fn encode<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(corrupt)
}

pub(super) fn decode<T: DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(corrupt)
}

/// A connection that reconnects by itself (to one node, to a cluster, or to the
/// master that Sentinel names; see `link`), with the deadline of one call: past it
/// the call fails with UNAVAILABLE. Cheap to clone.
#[derive(Clone)]
pub(super) struct Connection {
    link: Link,
    timeout: Duration,
}

impl Connection {
    /// Connects as `settings` say (TLS, credentials, Sentinel, WAIT for replicas);
    /// gives up after five call deadlines. Also answers where pub/sub connects.
    pub(super) async fn open(settings: &RedisSettings) -> Result<(Self, Subscriber), StoreError> {
        let opened = link::open(settings).await?;
        Ok((Self { link: opened.link, timeout: settings.operation_timeout }, opened.subscriber))
    }

    /// The deadline of one call.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(super) fn is_cluster(&self) -> bool {
        self.link.is_cluster()
    }

    pub(super) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        counted(1);
        let mut link = self.link.clone();
        bounded(self.timeout, "timed out", cmd.query_async(&mut link)).await
    }

    pub(super) async fn invoke<T: FromRedisValue>(&self, invocation: &ScriptInvocation<'_>) -> Result<T, StoreError> {
        counted(1);
        let mut link = self.link.clone();
        bounded(self.timeout, "timed out", invocation.invoke_async(&mut link)).await
    }

    /// The integer answers of `cmd` (DBSIZE) from every primary, summed: the one
    /// node, or each master of the cluster (replicas would count keys twice).
    pub(super) async fn sum_over_primaries(&self, cmd: &Cmd) -> Result<u64, StoreError> {
        match self.link.cluster() {
            None => self.query(cmd).await,
            Some(connection) => {
                let mut connection = connection.clone();
                let routing = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::Aggregate(AggregateOp::Sum)),
                ));
                let sum = bounded(self.timeout, "timed out", connection.route_command(cmd.clone(), routing)).await?;
                redis::from_redis_value(sum).map_err(corrupt)
            }
        }
    }

    /// Runs a pipeline (all its keys in one slot on a cluster).
    pub(super) async fn pipeline<T: FromRedisValue>(&self, pipeline: &Pipeline) -> Result<T, StoreError> {
        counted(pipeline.cmd_iter().count());
        let mut link = self.link.clone();
        bounded(self.timeout, "timed out", pipeline.query_async(&mut link)).await
    }
}

/// Counts calls made to Redis (`pushmatch_store_redis_calls_total`).
fn counted(calls: usize) {
    metrics::counter!(crate::telemetry::metrics::names::REDIS_CALLS).increment(calls as u64);
}
