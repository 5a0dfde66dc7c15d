//! The one way the store talks to Redis, and how what goes wrong becomes a
//! [`StoreError`]: a call past its deadline or a Redis error is UNAVAILABLE
//! ([`unavailable`]), a record this version cannot read is corrupt ([`corrupt`]).

use std::time::Duration;

use redis::cluster_routing::{AggregateOp, MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, FromRedisValue, Pipeline, Script, ScriptInvocation};
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

    /// Loads `script` (SCRIPT LOAD; on a cluster, the `redis` crate sends it to
    /// every primary), so that calls find it without the NOSCRIPT round trip.
    pub(super) async fn load(&self, script: &Script) -> Result<(), StoreError> {
        counted(1);
        let mut link = self.link.clone();
        bounded(self.timeout, "timed out", script.load_async(&mut link)).await.map(drop)
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

    /// Every key matching `pattern`, by SCAN (never KEYS, which blocks the server):
    /// on the one node, or on each master of the cluster in turn. For operators'
    /// commands only; it walks the whole keyspace.
    pub(super) async fn scan(&self, pattern: &str) -> Result<Vec<String>, StoreError> {
        let nodes: Vec<Option<(String, u16)>> = match self.link.cluster() {
            None => vec![None],
            Some(_) => self.primaries().await?.into_iter().map(Some).collect(),
        };
        let mut keys = Vec::new();
        for node in nodes {
            let mut cursor = "0".to_owned();
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(&cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1_000);
                let (next, found): (String, Vec<String>) = match (&node, self.link.cluster()) {
                    (Some((host, port)), Some(cluster)) => {
                        counted(1);
                        let routing =
                            RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: host.clone(), port: *port });
                        let value = bounded(self.timeout, "timed out", cluster.clone().route_command(cmd, routing)).await?;
                        redis::from_redis_value(value).map_err(corrupt)?
                    }
                    _ => self.query(&cmd).await?,
                };
                keys.extend(found);
                if next == "0" {
                    break;
                }
                cursor = next;
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// The cluster's masters (host, port), from CLUSTER NODES.
    async fn primaries(&self) -> Result<Vec<(String, u16)>, StoreError> {
        let nodes: String = self.query(redis::cmd("CLUSTER").arg("NODES")).await?;
        let mut primaries = Vec::new();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(address), Some(flags)) = (fields.get(1), fields.get(2)) else { continue };
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.iter().any(|f| *f == "fail" || *f == "noaddr") {
                continue;
            }
            // ip:port@cport[,hostname]
            let address = address.split(['@', ',']).next().unwrap_or_default();
            let Some((host, port)) = address.rsplit_once(':') else { continue };
            let port = port.parse().map_err(|_| corrupt(format!("CLUSTER NODES: a port {port:?}")))?;
            primaries.push((host.to_owned(), port));
        }
        if primaries.is_empty() {
            return Err(unavailable("CLUSTER NODES names no master"));
        }
        Ok(primaries)
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
