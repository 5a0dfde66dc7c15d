//! The one way the store talks to Redis, and how what goes wrong becomes a
//! [`StoreError`]: a call past its deadline or a Redis error is UNAVAILABLE
//! ([`unavailable`]), a record this version cannot read is corrupt ([`corrupt`]).

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{AggregateOp, MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, ScriptInvocation, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::BACKEND;
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

/// A connection that reconnects by itself (to one node, or to a cluster), with the
/// deadline of one call: past it the call fails with UNAVAILABLE. Cheap to clone.
#[derive(Clone)]
pub(super) struct Connection {
    link: Link,
    timeout: Duration,
}

impl Connection {
    /// Connects to the one node of `urls`, or to the cluster they seed when there are
    /// several; gives up after five call deadlines.
    pub(super) async fn open(urls: &[String], timeout: Duration) -> Result<Self, StoreError> {
        let link = match urls {
            [url] => {
                let client = redis::Client::open(url.as_str()).map_err(unavailable)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                let connecting = ConnectionManager::new_with_config(client, config);
                Link::Single(bounded(timeout * 5, "timed out connecting", connecting).await?)
            }
            seeds => {
                let client = redis::cluster::ClusterClientBuilder::new(seeds.to_vec())
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build()
                    .map_err(unavailable)?;
                let connecting = client.get_async_connection();
                Link::Cluster(bounded(timeout * 5, "timed out connecting to the cluster", connecting).await?)
            }
        };
        Ok(Self { link, timeout })
    }

    /// The deadline of one call.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.link, Link::Cluster(_))
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
        match &self.link {
            Link::Single(_) => self.query(cmd).await,
            Link::Cluster(connection) => {
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

/// `call` within `timeout`: a late call fails with UNAVAILABLE (`late`), and so
/// does a Redis error.
async fn bounded<T>(timeout: Duration, late: &str, call: impl Future<Output = RedisResult<T>>) -> Result<T, StoreError> {
    tokio::time::timeout(timeout, call).await.map_err(|_| unavailable(late))?.map_err(unavailable)
}

#[derive(Clone)]
enum Link {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}
