//! How the store reaches Redis: one node, a Redis Cluster, or the master that Redis
//! Sentinel names; TLS (rustls, the server name always checked) and ACL credentials
//! for each; and, when `wait_replicas` asks for it, a `WAIT` after every write so
//! that nothing is acknowledged before replicas hold it.
//!
//! Credentials come from the URL (`rediss://user:password@host:6380`) or from
//! `username` and `password_file`, which win over the URL's. They are handed to the
//! `redis` crate and appear in no error and no log line.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection, PubSub};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, RedisResult, ServerErrorKind, TlsCertificates, TlsMode, Value,
};

use super::RedisSettings;
use super::connection::unavailable;
use crate::store::StoreError;

/// TLS trust and ACL credentials, read once when the store opens.
struct Access {
    /// The CA certificates of `ca_cert_path`; `None`: the webpki (Mozilla) roots.
    certs: Option<TlsCertificates>,
    username: Option<String>,
    password: Option<String>,
}

impl Access {
    async fn load(settings: &RedisSettings) -> Result<Self, StoreError> {
        let certs = match &settings.ca_cert_path {
            Some(path) => Some(TlsCertificates { client_tls: None, root_cert: Some(read_ca(path).await?) }),
            None => None,
        };
        let password = match &settings.password_file {
            Some(path) => {
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|error| unavailable(format!("cannot read the Redis password file {}: {error}", path.display())))?;
                let password = text.trim_end_matches(['\r', '\n']);
                if password.is_empty() {
                    return Err(unavailable(format!("the Redis password file {} is empty", path.display())));
                }
                Some(password.to_owned())
            }
            None => None,
        };
        Ok(Self { certs, username: settings.username.clone(), password })
    }

    /// `url` with the configured username and password in place of its own.
    fn info(&self, url: &str) -> RedisResult<ConnectionInfo> {
        let info = url.into_connection_info()?;
        let mut redis = info.redis_settings().clone();
        if let Some(username) = &self.username {
            redis = redis.set_username(username);
        }
        if let Some(password) = &self.password {
            redis = redis.set_password(password);
        }
        Ok(info.set_redis_settings(redis))
    }

    /// A client of one node: TLS with the configured CA for `rediss://`.
    fn client(&self, url: &str) -> RedisResult<Client> {
        let info = self.info(url)?;
        match (&self.certs, info.addr()) {
            (Some(certs), ConnectionAddr::TcpTls { .. }) => Client::build_with_tls(info, certs.clone()),
            _ => Client::open(info),
        }
    }
}

/// The PEM file of `ca_cert_path`, refused unless it holds a certificate.
async fn read_ca(path: &Path) -> Result<Vec<u8>, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let pem = tokio::fs::read(path)
        .await
        .map_err(|error| unavailable(format!("cannot read the Redis CA file {}: {error}", path.display())))?;
    let certificates = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>();
    match certificates {
        Ok(certificates) if !certificates.is_empty() => Ok(pem),
        _ => Err(unavailable(format!("the Redis CA file {} holds no PEM certificate", path.display()))),
    }
}

/// What [`open`] gives: the link for commands and where pub/sub connects.
pub(super) struct Opened {
    pub(super) link: Link,
    pub(super) subscriber: Subscriber,
}

/// Connections to the same node(s) when writes WAIT for replicas: a WAIT holds up
/// the commands behind it on its connection until the replicas answer, so writes
/// spread over a few connections wait side by side rather than in a row.
const CONNECTIONS_WITH_WAIT: usize = 4;

/// Connects as `settings` says; gives up after five call deadlines.
pub(super) async fn open(settings: &RedisSettings) -> Result<Opened, StoreError> {
    let access = Access::load(settings).await?;
    let timeout = settings.operation_timeout;
    let wait = (settings.wait_replicas > 0).then(|| WaitFor {
        replicas: i64::from(settings.wait_replicas),
        timeout_ms: u64::try_from(settings.wait_timeout.as_millis()).unwrap_or(u64::MAX).max(1),
    });
    let count = if wait.is_some() { CONNECTIONS_WITH_WAIT } else { 1 };
    let mut nodes = Vec::with_capacity(count);
    let subscriber = if let Some(sentinel) = &settings.sentinel {
        let client = sentinel_client(&access, &sentinel.urls, &sentinel.master).map_err(explained)?;
        let shared = Arc::new(tokio::sync::Mutex::new(client));
        for _ in 0..count {
            let node = SentinelNode::new(Arc::clone(&shared), timeout);
            // Connect now, so a wrong configuration fails the start.
            bounded(timeout * 5, "timed out connecting through Sentinel", node.connection()).await?;
            nodes.push(Node::Sentinel(node));
        }
        Subscriber::Sentinel(shared)
    } else {
        let clients = settings.urls.iter().map(|url| access.client(url)).collect::<RedisResult<Vec<_>>>().map_err(explained)?;
        for _ in 0..count {
            nodes.push(connect_direct(&access, settings, &clients).await?);
        }
        Subscriber::Nodes { clients: Arc::new(clients), next: Arc::new(AtomicUsize::new(0)) }
    };
    Ok(Opened { link: Link { nodes: nodes.into(), next: Arc::new(AtomicUsize::new(0)), wait }, subscriber })
}

/// One connection that reconnects by itself: to the one node, or to the cluster
/// that several URLs seed.
async fn connect_direct(access: &Access, settings: &RedisSettings, clients: &[Client]) -> Result<Node, StoreError> {
    let timeout = settings.operation_timeout;
    match (settings.urls.as_slice(), clients) {
        ([_], [client]) => {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            let connecting = ConnectionManager::new_with_config(client.clone(), config);
            Ok(Node::Single(bounded(timeout * 5, "timed out connecting", connecting).await?))
        }
        ([], _) | ([_], _) => Err(unavailable("no Redis URL configured")),
        (seeds, _) => {
            let infos = seeds.iter().map(|url| access.info(url)).collect::<RedisResult<Vec<_>>>().map_err(explained)?;
            let mut builder =
                redis::cluster::ClusterClientBuilder::new(infos).connection_timeout(timeout).response_timeout(timeout);
            if let Some(certs) = &access.certs {
                builder = builder.certs(certs.clone());
            }
            let client = builder.build().map_err(explained)?;
            let connecting = client.get_async_connection();
            Ok(Node::Cluster(bounded(timeout * 5, "timed out connecting to the cluster", connecting).await?))
        }
    }
}

/// A client that asks the sentinels of `urls` for the master named `master`. The
/// sentinels' own credentials come from their URLs; the data nodes get the
/// configured ones, and TLS when the sentinels' URLs are `rediss://`.
fn sentinel_client(access: &Access, urls: &[String], master: &str) -> RedisResult<SentinelClient> {
    let infos = urls.iter().map(|url| url.as_str().into_connection_info()).collect::<RedisResult<Vec<_>>>()?;
    let tls = infos.iter().any(|info| matches!(info.addr(), ConnectionAddr::TcpTls { .. }));
    let mut builder =
        SentinelClientBuilder::new(infos.iter().map(|info| info.addr().clone()), master, SentinelServerType::Master)?;
    if let Some(first) = infos.first() {
        if let Some(username) = first.redis_settings().username() {
            builder = builder.set_client_to_sentinel_username(username);
        }
        if let Some(password) = first.redis_settings().password() {
            builder = builder.set_client_to_sentinel_password(password);
        }
    }
    if tls {
        builder = builder.set_client_to_sentinel_tls_mode(TlsMode::Secure).set_client_to_redis_tls_mode(TlsMode::Secure);
        if let Some(certs) = &access.certs {
            builder = builder.set_client_to_sentinel_certificates(certs.clone()).set_client_to_redis_certificates(certs.clone());
        }
    }
    if let Some(username) = &access.username {
        builder = builder.set_client_to_redis_username(username);
    }
    if let Some(password) = &access.password {
        builder = builder.set_client_to_redis_password(password);
    }
    builder.build()
}

/// A Redis error as a [`StoreError`], with a hint when TLS refused the server or
/// the server refused the credentials.
pub(super) fn explained(error: RedisError) -> StoreError {
    let text = error.to_string();
    let refused_credentials = error.kind() == ErrorKind::AuthenticationFailed
        || ["WRONGPASS", "NOAUTH", "NOPERM"].iter().any(|code| error.code() == Some(*code));
    if refused_credentials {
        unavailable(format!(
            "Redis refused the credentials ({text}): check the ACL user and password (store.redis_username, \
             store.redis_password_file or the URL) and the user's permissions"
        ))
    } else if text.contains("certificate") || text.contains("CertificateError") || text.contains("UnknownIssuer") {
        unavailable(format!(
            "TLS refused the Redis server's certificate ({text}): the certificate must name the host of the URL and be \
             issued by the CA of store.redis_ca_cert_path (or a public CA when that is not set)"
        ))
    } else {
        unavailable(text)
    }
}

/// `call` within `timeout`: a late call fails with UNAVAILABLE (`late`), and so
/// does a Redis error.
pub(super) async fn bounded<T>(
    timeout: Duration,
    late: &str,
    call: impl Future<Output = RedisResult<T>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(timeout, call).await.map_err(|_| unavailable(late))?.map_err(explained)
}

/// Where the pub/sub connection goes, asked again at each (re)connect: the next of
/// the configured nodes in turn (any node of a cluster hears every PUBLISH), or the
/// master that the sentinels name now.
#[derive(Clone)]
pub(super) enum Subscriber {
    Nodes { clients: Arc<Vec<Client>>, next: Arc<AtomicUsize> },
    Sentinel(Arc<tokio::sync::Mutex<SentinelClient>>),
}

impl Subscriber {
    pub(super) async fn pubsub(&self) -> RedisResult<PubSub> {
        let client = match self {
            Self::Nodes { clients, next } => {
                let index = next.fetch_add(1, Ordering::Relaxed) % clients.len().max(1);
                clients.get(index).cloned().ok_or_else(|| RedisError::from((ErrorKind::Client, "no Redis URL configured")))?
            }
            Self::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await?,
        };
        client.get_async_pubsub().await
    }
}

/// `WAIT replicas timeout_ms` after each write.
#[derive(Clone, Copy)]
struct WaitFor {
    replicas: i64,
    timeout_ms: u64,
}

impl WaitFor {
    fn command(self) -> Cmd {
        redis::cmd("WAIT").arg(self.replicas).arg(self.timeout_ms).clone()
    }

    /// The answer of `WAIT`: enough replicas, or an error (the write is not acknowledged).
    fn check(self, acknowledged: Option<Value>) -> RedisResult<()> {
        match acknowledged {
            Some(Value::Int(count)) if count >= self.replicas => Ok(()),
            Some(Value::Int(count)) => Err(RedisError::from((
                ErrorKind::Io,
                "write not acknowledged by enough replicas in time",
                format!("{count} of {} within {} ms (store.redis_wait_replicas)", self.replicas, self.timeout_ms),
            ))),
            Some(other) => other.extract_error().and_then(|value| {
                Err(RedisError::from((ErrorKind::UnexpectedReturnType, "WAIT answered", format!("{value:?}"))))
            }),
            None => Err(RedisError::from((ErrorKind::UnexpectedReturnType, "WAIT answered nothing"))),
        }
    }
}

/// Commands that change nothing, after which there is nothing to WAIT for. Every
/// other command (scripts included) is taken for a write.
fn is_read(cmd: &Cmd) -> bool {
    const READS: &[&[u8]] = &[
        b"GET",
        b"MGET",
        b"HGET",
        b"HMGET",
        b"HGETALL",
        b"EXISTS",
        b"TTL",
        b"PTTL",
        b"ZRANGE",
        b"ZREVRANGE",
        b"ZRANGEBYSCORE",
        b"ZCARD",
        b"ZSCORE",
        b"SMEMBERS",
        b"SCARD",
        b"SISMEMBER",
        b"PING",
        b"DBSIZE",
        b"INFO",
        b"TIME",
        b"SCRIPT",
        b"EVALSHA_RO",
        b"EVAL_RO",
        b"CLUSTER",
        b"ROLE",
        b"WAIT",
    ];
    match cmd.args_iter().next() {
        Some(redis::Arg::Simple(name)) => READS.iter().any(|read| name.eq_ignore_ascii_case(read)),
        _ => false,
    }
}

/// The connection of every command: reconnects by itself; WAITs for replicas after
/// writes when configured, over [`CONNECTIONS_WITH_WAIT`] connections taken in turn.
/// Cheap to clone.
#[derive(Clone)]
pub(super) struct Link {
    nodes: Arc<[Node]>,
    next: Arc<AtomicUsize>,
    wait: Option<WaitFor>,
}

impl Link {
    pub(super) fn is_cluster(&self) -> bool {
        self.cluster().is_some()
    }

    pub(super) fn cluster(&self) -> Option<&ClusterConnection> {
        match self.nodes.first() {
            Some(Node::Cluster(connection)) => Some(connection),
            _ => None,
        }
    }

    /// The next connection in turn.
    fn pick(&self) -> Node {
        let index = if self.nodes.len() > 1 { self.next.fetch_add(1, Ordering::Relaxed) % self.nodes.len() } else { 0 };
        self.nodes[index].clone()
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let mut node = self.pick();
        let Some(wait) = self.wait.filter(|_| !is_read(cmd)) else {
            return Box::pin(async move { node.req_packed_command(cmd).await });
        };
        Box::pin(async move {
            // One pipeline: the WAIT goes down the connection that carried the write
            // (on a cluster, to the node that owns its slot), right behind it.
            let mut pipeline = redis::pipe();
            pipeline.add_command(cmd.clone()).add_command(wait.command());
            let mut answers = node.req_packed_commands(&pipeline, 0, 2).await?.into_iter();
            let answer = answers.next().ok_or_else(|| RedisError::from((ErrorKind::UnexpectedReturnType, "no answer")))?;
            let answer = answer.extract_error()?;
            wait.check(answers.next())?;
            Ok(answer)
        })
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        let mut node = self.pick();
        let Some(wait) = self.wait.filter(|_| pipeline.cmd_iter().any(|cmd| !is_read(cmd))) else {
            return Box::pin(async move { node.req_packed_commands(pipeline, offset, count).await });
        };
        Box::pin(async move {
            if pipeline.is_transaction() {
                // A WAIT inside MULTI would not wait: it follows the EXEC, on the same
                // connection unless that one was replaced in between (then WAIT finds
                // nothing of this connection's to wait for and answers at once).
                let answers = node.req_packed_commands(pipeline, offset, count).await?;
                wait.check(Some(node.req_packed_command(&wait.command()).await?))?;
                return Ok(answers);
            }
            let mut waiting = pipeline.clone();
            waiting.add_command(wait.command());
            let mut answers = node.req_packed_commands(&waiting, offset, count + 1).await?;
            wait.check(answers.pop())?;
            Ok(answers)
        })
    }

    fn get_db(&self) -> i64 {
        self.nodes.first().map_or(0, Node::get_db)
    }
}

#[derive(Clone)]
enum Node {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(SentinelNode),
}

impl ConnectionLike for Node {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
            Self::Sentinel(node) => {
                Box::pin(node.call(move |mut connection| async move { connection.req_packed_command(cmd).await }))
            }
        }
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(node) => Box::pin(
                node.call(move |mut connection| async move { connection.req_packed_commands(pipeline, offset, count).await }),
            ),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
            Self::Sentinel(_) => 0,
        }
    }
}

/// The master that the sentinels name: one multiplexed connection to it, dropped
/// when it fails (a lost connection, or a node that is no longer master), so the
/// next call asks the sentinels again. A failed call is not retried: the request
/// fails with UNAVAILABLE (closed), and the next one finds the new master.
#[derive(Clone)]
struct SentinelNode {
    sentinel: Arc<tokio::sync::Mutex<SentinelClient>>,
    /// The connection and its generation (so a late failure does not drop a newer one).
    current: Arc<Mutex<Option<(u64, MultiplexedConnection)>>>,
    generation: Arc<AtomicUsize>,
    config: AsyncConnectionConfig,
}

impl SentinelNode {
    fn new(sentinel: Arc<tokio::sync::Mutex<SentinelClient>>, timeout: Duration) -> Self {
        let config = AsyncConnectionConfig::new().set_connection_timeout(Some(timeout)).set_response_timeout(Some(timeout));
        Self { sentinel, current: Arc::new(Mutex::new(None)), generation: Arc::new(AtomicUsize::new(0)), config }
    }

    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(current) = self.current.lock().clone() {
            return Ok(current);
        }
        let mut sentinel = self.sentinel.lock().await;
        // Another call may have connected while this one waited for the lock.
        if let Some(current) = self.current.lock().clone() {
            return Ok(current);
        }
        let client = sentinel.async_get_client().await?;
        let connection = client.get_multiplexed_async_connection_with_config(&self.config).await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) as u64 + 1;
        *self.current.lock() = Some((generation, connection.clone()));
        tracing::info!(master = %client.get_connection_info().addr(), "redis: connected to the master that Sentinel names");
        Ok((generation, connection))
    }

    async fn call<T, F, Fut>(&self, call: F) -> RedisResult<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (generation, connection) = self.connection().await?;
        let result = call(connection).await;
        if let Err(error) = &result
            && !answered_normally(error)
        {
            let mut current = self.current.lock();
            if current.as_ref().is_some_and(|(held, _)| *held == generation) {
                tracing::warn!(%error, "redis: the master's connection failed; asking Sentinel again");
                *current = None;
            }
        }
        result
    }
}

/// A server's error answer that says nothing against the connection (a script's
/// error, a missing script), as opposed to one that may mean another master now.
fn answered_normally(error: &RedisError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Server(
            ServerErrorKind::ResponseError
                | ServerErrorKind::NoScript
                | ServerErrorKind::ExecAbort
                | ServerErrorKind::CrossSlot
                | ServerErrorKind::NoPerm
        )
    )
}
