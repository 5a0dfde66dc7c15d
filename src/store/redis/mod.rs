//! The Redis store: stateless pushmatch replicas that share one Redis (or a Redis
//! Cluster). Everything that decides is one atomic step in Redis (a Lua script or
//! a compare-and-set), so of racing replicas exactly one wins.
//!
//! # Key schema
//!
//! One user's keys share a hash slot through a tag derived from tenant and user;
//! global indexes find a user's slot from an id. The `keys` module lists every key,
//! its type and its TTL; the scripts are in `scripts/*.lua`.
//!
//! Time is the store's clock (the `now` every call passes), never Redis's: expiry,
//! windows and lockouts are decided in the scripts and in Rust against `now`; Redis
//! TTLs only collect garbage, with a margin.
//!
//! # Wake-ups across replicas
//!
//! Every change to a challenge is published, with its version, on one of
//! [`SHARDS`] channels `pm:ev:<n>` (by challenge id), so each replica holds one
//! pub/sub connection subscribed to a fixed handful of channels, not one SUBSCRIBE
//! per challenge. A watch registers its interest first and reads second, and
//! updates apply only when their version is newer: no change slips through the gap.
//! After a pub/sub reconnect every watched challenge is read again. Each replica
//! expires the challenges it watches at their deadline (a compare-and-set, so one
//! replica wins and publishes), which is how expiry reaches watchers everywhere.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt as _;
use redis::Script;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{
    AdmissionPolicy, BlockReason, ChallengeWatch, CompleteOutcome, CreateOutcome, Refusal, ResolveOutcome, Store, StoreError,
    StrikePolicy, UserBlock,
};
use crate::domain::challenge::{Challenge, ChallengeState, Delivery, Resolution};
use crate::domain::device::Device;
use crate::domain::enrollment::{Enrollment, EnrollmentKind};
use crate::domain::ids::{ChallengeId, CodeDigest, DeviceId, EnrollmentId, TenantId, UserId, os_random};
use crate::domain::time::{Clock, Millis};

mod connection;
mod keys;
mod scripts;

use connection::{Connection, corrupt, decode, encode, unavailable};
pub use keys::SHARDS;
use keys::{
    ENROLLMENT_KEEP, Keys, TTL_MARGIN, challenge_index, code_index, device_index, enrollment_index, shard_channel, ttl_ms,
    user_tag,
};
use scripts::Scripts;

const BACKEND: &str = "redis";

/// How to reach Redis.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// One URL: a single Redis. Several: the seed nodes of a Redis Cluster.
    pub urls: Vec<String>,
    /// The deadline of one Redis call; past it the request fails with UNAVAILABLE.
    pub operation_timeout: Duration,
}

struct Watched {
    /// The newest version seen and the challenge at it.
    latest: Option<(u64, Challenge)>,
    sender: Option<watch::Sender<Challenge>>,
}

#[derive(Default)]
struct WatchRegistry {
    entries: Mutex<HashMap<ChallengeId, Watched>>,
    /// Wakes the deadline task when a watch arrives.
    changed: Notify,
}

impl WatchRegistry {
    fn lock(&self) -> MutexGuard<'_, HashMap<ChallengeId, Watched>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies a version of a challenge if it is newer than what watchers saw.
    fn apply(&self, version: u64, challenge: &Challenge) {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(&challenge.id) else { return };
        if entry.latest.as_ref().is_some_and(|(seen, _)| *seen >= version) {
            return;
        }
        entry.latest = Some((version, challenge.clone()));
        if let Some(sender) = &entry.sender {
            sender.send_replace(challenge.clone());
        }
    }

    /// Drops entries nobody watches any more; returns the earliest pending expiry.
    fn sweep(&self) -> Option<Millis> {
        let mut entries = self.lock();
        entries.retain(|_, entry| entry.sender.as_ref().is_none_or(|sender| sender.receiver_count() > 0));
        entries
            .values()
            .filter_map(|entry| entry.latest.as_ref())
            .filter(|(_, challenge)| challenge.state == ChallengeState::Pending)
            .map(|(_, challenge)| challenge.expires_at)
            .min()
    }

    fn watched(&self) -> Vec<(ChallengeId, TenantId)> {
        self.lock().iter().filter_map(|(id, entry)| entry.latest.as_ref().map(|(_, c)| (id.clone(), c.tenant.clone()))).collect()
    }
}

/// See the module documentation.
pub struct RedisStore {
    connection: Connection,
    scripts: Scripts,
    watchers: Arc<WatchRegistry>,
    /// Stops the pub/sub and deadline tasks when the store is dropped.
    closing: CancellationToken,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.closing.cancel();
    }
}

/// What a challenge read returns: the challenge, its version and when it goes.
struct ChallengeRecord {
    tag: String,
    version: u64,
    purge_at: Millis,
    challenge: Challenge,
}

impl RedisStore {
    /// Connects (failing fast with UNAVAILABLE when Redis is not there) and starts the
    /// pub/sub and deadline tasks on the current runtime.
    pub async fn connect(settings: RedisSettings, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let first = settings.urls.first().cloned().ok_or_else(|| unavailable("no Redis URL configured"))?;
        let store = Self {
            connection: Connection::open(&settings.urls, settings.operation_timeout).await?,
            scripts: Scripts::new(),
            watchers: Arc::new(WatchRegistry::default()),
            closing: CancellationToken::new(),
        };
        store.health_check().await?;
        let pubsub_client = redis::Client::open(first.as_str()).map_err(unavailable)?;
        tokio::spawn(follow_changes(pubsub_client, store.reader(), Arc::clone(&clock), store.closing.clone()));
        tokio::spawn(expire_watched(store.reader(), clock, store.closing.clone()));
        Ok(store)
    }

    /// A cheap handle for the background tasks: the connection and the registry.
    fn reader(&self) -> Reader {
        Reader {
            connection: self.connection.clone(),
            challenge_cas: Arc::clone(&self.scripts.challenge_cas),
            watchers: Arc::clone(&self.watchers),
        }
    }

    async fn health_check(&self) -> Result<(), StoreError> {
        let pong: String = self.connection.query(&redis::cmd("PING")).await?;
        if pong == "PONG" { Ok(()) } else { Err(unavailable(format!("unexpected PING answer {pong:?}"))) }
    }

    /// Reads a string key holding JSON.
    async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let text: Option<String> = self.connection.query(redis::cmd("GET").arg(key)).await?;
        text.map(|t| decode(&t)).transpose()
    }

    async fn device_tag(&self, id: &DeviceId) -> Result<Option<String>, StoreError> {
        self.connection.query(redis::cmd("GET").arg(device_index(id))).await
    }

    async fn load_device(&self, id: &DeviceId) -> Result<Option<(String, String, Device)>, StoreError> {
        let Some(tag) = self.device_tag(id).await? else { return Ok(None) };
        let key = Keys(&tag).device(id.as_str());
        let text: Option<String> = self.connection.query(redis::cmd("GET").arg(&key)).await?;
        match text {
            Some(text) => Ok(Some((key, text.clone(), decode(&text)?))),
            None => Ok(None),
        }
    }

    /// Read-modify-write of a device by compare-and-set; `change` returns `None` to
    /// leave it as it is. Returns whether the device exists.
    async fn update_device(&self, id: &DeviceId, change: impl Fn(&Device) -> Option<Device>) -> Result<bool, StoreError> {
        loop {
            let Some((key, current, device)) = self.load_device(id).await? else { return Ok(false) };
            let Some(updated) = change(&device) else { return Ok(true) };
            let set: i64 = self.connection.invoke(self.scripts.value_cas.key(&key).arg(&current).arg(encode(&updated)?)).await?;
            if set == 1 {
                return Ok(true);
            }
        }
    }

    async fn load_enrollment(&self, id: &EnrollmentId) -> Result<Option<(String, String, Enrollment)>, StoreError> {
        let tag: Option<String> = self.connection.query(redis::cmd("GET").arg(enrollment_index(id))).await?;
        let Some(tag) = tag else { return Ok(None) };
        let key = Keys(&tag).enrollment(id.as_str());
        let text: Option<String> = self.connection.query(redis::cmd("GET").arg(&key)).await?;
        match text {
            Some(text) => Ok(Some((tag, text.clone(), decode(&text)?))),
            None => Ok(None),
        }
    }

    /// Spends a pending enrollment of `kind` and adds `device`, by compare-and-set.
    async fn spend_enrollment(
        &self,
        id: &EnrollmentId,
        expected_tenant: Option<&TenantId>,
        kind: EnrollmentKind,
        device: Device,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError> {
        // The index goes first, so a device is never without one; a failed attempt removes it.
        loop {
            let Some((tag, current, enrollment)) = self.load_enrollment(id).await? else {
                return Ok(CompleteOutcome::UnknownCode);
            };
            if enrollment.kind != kind || expected_tenant.is_some_and(|t| *t != enrollment.tenant) {
                return Ok(CompleteOutcome::UnknownCode);
            }
            if enrollment.completed {
                return Ok(CompleteOutcome::AlreadyUsed);
            }
            if now >= enrollment.expires_at {
                return Ok(CompleteOutcome::Expired);
            }
            let mut completed = Enrollment { completed: true, device_id: Some(device.id.clone()), ..enrollment };
            if kind == EnrollmentKind::Totp {
                completed.totp_secret = None;
            }
            let keys = Keys(&tag);
            let _: () = self.connection.query(redis::cmd("SET").arg(device_index(&device.id)).arg(&tag)).await?;
            let spent: i64 = self
                .connection
                .invoke(
                    self.scripts
                        .enroll
                        .key(keys.enrollment(id.as_str()))
                        .key(keys.device(device.id.as_str()))
                        .key(keys.devices())
                        .arg(&current)
                        .arg(encode(&completed)?)
                        .arg(encode(&device)?)
                        .arg(device.id.as_str()),
                )
                .await?;
            if spent == 1 {
                return Ok(CompleteOutcome::Completed(Box::new(completed)));
            }
            let _: () = self.connection.query(redis::cmd("DEL").arg(device_index(&device.id))).await?;
        }
    }

    async fn strike(&self, key: String, policy: &StrikePolicy, now: Millis) -> Result<bool, StoreError> {
        let mut nonce = [0u8; 8];
        os_random(&mut nonce).map_err(corrupt)?;
        let member = format!("{}-{}", now.0, hex::encode(nonce));
        let window = i64::try_from(policy.window.as_millis()).unwrap_or(i64::MAX);
        let reached: i64 =
            self.connection.invoke(self.scripts.strike.key(key).arg(now.0).arg(window).arg(policy.limit).arg(member)).await?;
        Ok(reached == 1)
    }
}

/// What the background tasks need: reads, expiry compare-and-sets, the registry.
#[derive(Clone)]
struct Reader {
    connection: Connection,
    challenge_cas: Arc<Script>,
    watchers: Arc<WatchRegistry>,
}

impl Reader {
    async fn load(&self, id: &ChallengeId) -> Result<Option<ChallengeRecord>, StoreError> {
        let tag: Option<String> = self.connection.query(redis::cmd("GET").arg(challenge_index(id))).await?;
        let Some(tag) = tag else { return Ok(None) };
        let key = Keys(&tag).challenge(id.as_str());
        let fields: (Option<String>, Option<u64>, Option<i64>) =
            self.connection.query(redis::cmd("HMGET").arg(&key).arg("json").arg("v").arg("purge_at")).await?;
        let (Some(json), Some(version), Some(purge_at)) = fields else { return Ok(None) };
        Ok(Some(ChallengeRecord { tag, version, purge_at: Millis(purge_at), challenge: decode(&json)? }))
    }

    /// Writes `challenge` if the record is still at `version`; returns the new
    /// version, or `None` when someone else changed it first.
    async fn compare_and_set(&self, tag: &str, version: u64, challenge: &Challenge) -> Result<Option<u64>, StoreError> {
        let keys = Keys(tag);
        let json = encode(challenge)?;
        let state = encode(&challenge.state)?;
        let mut invocation = self.challenge_cas.prepare_invoke();
        invocation
            .key(keys.challenge(challenge.id.as_str()))
            .key(keys.pending())
            .arg(version)
            .arg(&json)
            .arg(state.trim_matches('"'))
            .arg(shard_channel(&challenge.id))
            .arg(challenge.id.as_str());
        let new_version: u64 = self.connection.invoke(&invocation).await?;
        if new_version == 0 {
            return Ok(None);
        }
        self.watchers.apply(new_version, challenge);
        Ok(Some(new_version))
    }

    /// Reads a challenge of `tenant`, expiring it first when its time is up; `None`
    /// when unknown, another tenant's, or past its retention.
    async fn current(&self, tenant: &TenantId, id: &ChallengeId, now: Millis) -> Result<Option<ChallengeRecord>, StoreError> {
        loop {
            let Some(mut record) = self.load(id).await? else { return Ok(None) };
            if record.challenge.tenant != *tenant || now >= record.purge_at {
                return Ok(None);
            }
            if !record.challenge.expire_if_due(now) {
                self.watchers.apply(record.version, &record.challenge);
                return Ok(Some(record));
            }
            if let Some(version) = self.compare_and_set(&record.tag, record.version, &record.challenge).await? {
                // Counted once across replicas: only the compare-and-set winner gets here.
                crate::telemetry::metrics::challenge_resolved(ChallengeState::Expired, None);
                record.version = version;
                return Ok(Some(record));
            }
        }
    }
}

/// Follows the change channels and applies what arrives to local watchers.
/// Reconnects by itself; after each (re)subscription, reads every watched
/// challenge again so nothing published while disconnected is missed.
async fn follow_changes(client: redis::Client, reader: Reader, clock: Arc<dyn Clock>, closing: CancellationToken) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            for channel in keys::all_channels() {
                pubsub.subscribe(channel).await?;
            }
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            () = closing.cancelled() => return,
            result = tokio::time::timeout(reader.connection.timeout(), subscribed) => result,
        };
        match pubsub {
            Ok(Ok(pubsub)) => {
                backoff = Duration::from_millis(50);
                for (id, tenant) in reader.watchers.watched() {
                    if let Err(error) = reader.current(&tenant, &id, clock.now()).await {
                        tracing::debug!(%error, "could not refresh a watched challenge");
                    }
                }
                let mut messages = pubsub.into_on_message();
                loop {
                    let message = tokio::select! {
                        () = closing.cancelled() => return,
                        message = messages.next() => message,
                    };
                    let Some(message) = message else { break };
                    let Ok(payload) = message.get_payload::<String>() else { continue };
                    let mut parts = payload.splitn(3, ' ');
                    let (Some(_id), Some(version), Some(json)) = (parts.next(), parts.next(), parts.next()) else { continue };
                    let (Ok(version), Ok(challenge)) = (version.parse::<u64>(), serde_json::from_str::<Challenge>(json)) else {
                        continue;
                    };
                    reader.watchers.apply(version, &challenge);
                }
                tracing::warn!("redis pub/sub connection lost; reconnecting");
            }
            Ok(Err(error)) => tracing::warn!(%error, "redis pub/sub subscribe failed; retrying"),
            Err(_) => tracing::warn!("redis pub/sub subscribe timed out; retrying"),
        }
        tokio::select! {
            () = closing.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Expires watched challenges at their deadline (by the store's clock).
async fn expire_watched(reader: Reader, clock: Arc<dyn Clock>, closing: CancellationToken) {
    loop {
        let changed = reader.watchers.changed.notified();
        let next = reader.watchers.sweep();
        let now = clock.now();
        if next.is_some_and(|when| when <= now) {
            for (id, tenant) in reader.watchers.watched() {
                if let Err(error) = reader.current(&tenant, &id, now).await {
                    tracing::debug!(%error, "could not expire a watched challenge; retrying");
                }
            }
        }
        let sleep = match next {
            Some(when) if when > now => clock.sleep_until(when),
            // Due now but the store failed: try again shortly.
            Some(_) => Box::pin(tokio::time::sleep(Duration::from_millis(200))),
            None => Box::pin(std::future::pending()),
        };
        tokio::select! {
            () = closing.cancelled() => return,
            () = sleep => {}
            () = changed => {}
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.health_check().await
    }

    async fn create_challenge(
        &self,
        challenge: Challenge,
        policy: &AdmissionPolicy,
        now: Millis,
    ) -> Result<CreateOutcome, StoreError> {
        let tag = user_tag(&challenge.tenant, &challenge.user_id);
        let keys = Keys(&tag);
        let purge_at = challenge.expires_at.plus(policy.retention);
        let key_ttl = ttl_ms(now, purge_at.plus(TTL_MARGIN));
        let window = i64::try_from(policy.window.as_millis()).unwrap_or(i64::MAX);
        let request_key = keys.request(challenge.request_id.as_deref().unwrap_or(""));
        let index = challenge_index(&challenge.id);
        let _: () = self.connection.query(redis::cmd("SET").arg(&index).arg(&tag).arg("PX").arg(key_ttl)).await?;
        let outcome: Vec<String> = self
            .connection
            .invoke(
                self.scripts
                    .create
                    .key(keys.challenge(challenge.id.as_str()))
                    .key(keys.pending())
                    .key(keys.created())
                    .key(request_key)
                    .key(keys.block())
                    .arg(encode(&challenge)?)
                    .arg(challenge.id.as_str())
                    .arg(now.0)
                    .arg(challenge.expires_at.0)
                    .arg(key_ttl)
                    .arg(policy.max_pending)
                    .arg(policy.max_per_window)
                    .arg(window.max(1))
                    .arg(if challenge.request_id.is_some() { "1" } else { "0" })
                    .arg(keys.challenge_prefix())
                    .arg(purge_at.0),
            )
            .await?;
        let refused = |refusal| CreateOutcome::Refused(refusal);
        let result = match outcome.first().map(String::as_str) {
            Some("created") => return Ok(CreateOutcome::Created(challenge)),
            Some("existing") => {
                let existing = outcome.get(1).map(|id| ChallengeId::parse(id)).transpose().map_err(corrupt)?;
                let reader = self.reader();
                match existing {
                    Some(id) => match reader.current(&challenge.tenant, &id, now).await? {
                        Some(record) => CreateOutcome::Existing(record.challenge),
                        None => return Err(corrupt("idempotency key without its challenge")),
                    },
                    None => return Err(corrupt("idempotency answer without an id")),
                }
            }
            Some("blocked") => refused(Refusal::Blocked(decode(outcome.get(1).map_or("", String::as_str))?)),
            Some("too_many_pending") => refused(Refusal::TooManyPending { limit: policy.max_pending }),
            Some("rate_limited") => refused(Refusal::RateLimited { limit: policy.max_per_window, window: policy.window }),
            other => return Err(corrupt(format!("unexpected create answer {other:?}"))),
        };
        let _: () = self.connection.query(redis::cmd("DEL").arg(&index)).await?;
        Ok(result)
    }

    async fn get_challenge(&self, tenant: &TenantId, id: &ChallengeId, now: Millis) -> Result<Option<Challenge>, StoreError> {
        Ok(self.reader().current(tenant, id, now).await?.map(|record| record.challenge))
    }

    async fn watch_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        now: Millis,
    ) -> Result<Option<ChallengeWatch>, StoreError> {
        // Interest first, read second: a change published in between is kept by the
        // registry and wins over the read by its version.
        self.watchers.lock().entry(id.clone()).or_insert(Watched { latest: None, sender: None });
        let record = match self.reader().current(tenant, id, now).await {
            Ok(Some(record)) => record,
            other => {
                let mut entries = self.watchers.lock();
                if entries.get(id).is_some_and(|entry| entry.sender.is_none()) {
                    entries.remove(id);
                }
                return other.map(|_| None);
            }
        };
        let receiver = {
            let mut entries = self.watchers.lock();
            let entry = entries.entry(id.clone()).or_insert(Watched { latest: None, sender: None });
            if entry.latest.as_ref().is_none_or(|(seen, _)| *seen < record.version) {
                entry.latest = Some((record.version, record.challenge.clone()));
            }
            let current = entry.latest.as_ref().map_or_else(|| record.challenge.clone(), |(_, c)| c.clone());
            match &entry.sender {
                Some(sender) => {
                    sender.send_replace(current);
                    sender.subscribe()
                }
                None => {
                    let sender = watch::Sender::new(current);
                    let receiver = sender.subscribe();
                    entry.sender = Some(sender);
                    receiver
                }
            }
        };
        self.watchers.changed.notify_one();
        Ok(Some(receiver))
    }

    async fn resolve_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        resolution: Resolution,
        now: Millis,
    ) -> Result<Option<ResolveOutcome>, StoreError> {
        let reader = self.reader();
        loop {
            let Some(mut record) = reader.current(tenant, id, now).await? else { return Ok(None) };
            if !record.challenge.apply(&resolution, now) {
                return Ok(Some(ResolveOutcome { accepted: false, challenge: record.challenge }));
            }
            if reader.compare_and_set(&record.tag, record.version, &record.challenge).await?.is_some() {
                return Ok(Some(ResolveOutcome { accepted: true, challenge: record.challenge }));
            }
        }
    }

    async fn record_delivery(&self, id: &ChallengeId, delivery: Delivery) -> Result<(), StoreError> {
        let reader = self.reader();
        loop {
            let Some(mut record) = reader.load(id).await? else { return Ok(()) };
            if !record.challenge.record_delivery(delivery.clone()) {
                return Ok(());
            }
            if reader.compare_and_set(&record.tag, record.version, &record.challenge).await?.is_some() {
                return Ok(());
            }
        }
    }

    async fn pending_challenges(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<Vec<Challenge>, StoreError> {
        let tag = user_tag(tenant, user);
        let ids: Vec<String> = self.connection.query(redis::cmd("ZREVRANGE").arg(Keys(&tag).pending()).arg(0).arg(-1)).await?;
        let reader = self.reader();
        let mut pending = Vec::new();
        for id in ids {
            let Ok(id) = ChallengeId::parse(&id) else { continue };
            if let Some(record) = reader.current(tenant, &id, now).await?
                && record.challenge.state == ChallengeState::Pending
            {
                pending.push(record.challenge);
            }
        }
        pending.sort_by_key(|c| std::cmp::Reverse(c.created_at));
        Ok(pending)
    }

    async fn insert_enrollment(&self, enrollment: Enrollment) -> Result<(), StoreError> {
        let tag = user_tag(&enrollment.tenant, &enrollment.user_id);
        let ttl = ttl_ms(enrollment.created_at, enrollment.expires_at.plus(ENROLLMENT_KEEP));
        let index = redis::cmd("SET").arg(enrollment_index(&enrollment.id)).arg(&tag).arg("PX").arg(ttl).clone();
        let code = enrollment.code_digest.as_ref().map(|code| {
            redis::cmd("SET").arg(code_index(code)).arg(format!("{tag} {}", enrollment.id)).arg("PX").arg(ttl).clone()
        });
        let record = redis::cmd("SET")
            .arg(Keys(&tag).enrollment(enrollment.id.as_str()))
            .arg(encode(&enrollment)?)
            .arg("PX")
            .arg(ttl)
            .clone();
        if self.connection.is_cluster() {
            // Keys of different slots: one by one on a cluster.
            let _: () = self.connection.query(&index).await?;
            if let Some(code) = &code {
                let _: () = self.connection.query(code).await?;
            }
        } else {
            let mut pipeline = redis::pipe();
            pipeline.atomic();
            pipeline.add_command(index).ignore();
            if let Some(code) = code {
                pipeline.add_command(code).ignore();
            }
            self.connection.pipeline::<()>(&pipeline).await?;
        }
        // The record last: once it exists, its indexes do too.
        self.connection.query(&record).await
    }

    async fn get_enrollment(&self, tenant: &TenantId, id: &EnrollmentId) -> Result<Option<Enrollment>, StoreError> {
        Ok(self.load_enrollment(id).await?.map(|(_, _, e)| e).filter(|e| e.tenant == *tenant))
    }

    async fn enrollment_by_code(&self, code: &CodeDigest) -> Result<Option<Enrollment>, StoreError> {
        let found: Option<String> = self.connection.query(redis::cmd("GET").arg(code_index(code))).await?;
        let Some(id) = found.as_deref().and_then(|value| value.split_once(' ')).map(|(_, id)| id.to_owned()) else {
            return Ok(None);
        };
        let id = EnrollmentId::parse(&id).map_err(corrupt)?;
        Ok(self.load_enrollment(&id).await?.map(|(_, _, e)| e))
    }

    async fn complete_enrollment(&self, code: &CodeDigest, device: Device, now: Millis) -> Result<CompleteOutcome, StoreError> {
        let Some(enrollment) = self.enrollment_by_code(code).await? else { return Ok(CompleteOutcome::UnknownCode) };
        self.spend_enrollment(&enrollment.id, None, EnrollmentKind::Push, device, now).await
    }

    async fn get_device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        Ok(self.load_device(id).await?.map(|(_, _, device)| device))
    }

    async fn list_devices(&self, tenant: &TenantId, user: &UserId) -> Result<Vec<Device>, StoreError> {
        let tag = user_tag(tenant, user);
        let keys = Keys(&tag);
        let mut ids: Vec<String> = self.connection.query(redis::cmd("SMEMBERS").arg(keys.devices())).await?;
        ids.sort();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut get = redis::cmd("MGET");
        for id in &ids {
            get.arg(keys.device(id));
        }
        let records: Vec<Option<String>> = self.connection.query(&get).await?;
        let mut devices: Vec<Device> = Vec::new();
        for record in records.into_iter().flatten() {
            let device: Device = decode(&record)?;
            if device.tenant == *tenant && device.user_id == *user {
                devices.push(device);
            }
        }
        devices.sort_by_key(|d| d.enrolled_at);
        Ok(devices)
    }

    async fn remove_device(&self, tenant: &TenantId, id: &DeviceId) -> Result<bool, StoreError> {
        let Some((key, _, device)) = self.load_device(id).await? else { return Ok(false) };
        if device.tenant != *tenant {
            return Ok(false);
        }
        let tag = user_tag(&device.tenant, &device.user_id);
        let _: () = self.connection.query(redis::cmd("DEL").arg(&key)).await?;
        let _: () = self.connection.query(redis::cmd("SREM").arg(Keys(&tag).devices()).arg(id.as_str())).await?;
        let _: () = self.connection.query(redis::cmd("DEL").arg(device_index(id))).await?;
        Ok(true)
    }

    async fn set_push_token(&self, id: &DeviceId, token: &str) -> Result<bool, StoreError> {
        self.update_device(id, |device| {
            Some(Device { push_token: token.to_owned(), push_enabled: !token.is_empty(), ..device.clone() })
        })
        .await
    }

    async fn disable_push(&self, id: &DeviceId, token: &str) -> Result<(), StoreError> {
        self.update_device(id, |device| {
            (device.push_token == token && device.push_enabled).then(|| Device { push_enabled: false, ..device.clone() })
        })
        .await
        .map(drop)
    }

    async fn touch_device(&self, id: &DeviceId, now: Millis) -> Result<(), StoreError> {
        self.update_device(id, |device| Some(Device { last_used_at: Some(now), ..device.clone() })).await.map(drop)
    }

    async fn block_user(&self, tenant: &TenantId, user: &UserId, block: UserBlock) -> Result<(), StoreError> {
        let tag = user_tag(tenant, user);
        self.connection.query(redis::cmd("SET").arg(Keys(&tag).block()).arg(encode(&block)?)).await
    }

    async fn record_wrong_number(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &StrikePolicy,
        now: Millis,
    ) -> Result<Option<UserBlock>, StoreError> {
        let tag = user_tag(tenant, user);
        if !self.strike(Keys(&tag).wrong(), policy, now).await? {
            return Ok(None);
        }
        let block = UserBlock { reason: BlockReason::WrongNumbers, since: now, until: Some(now.plus(policy.block_for)) };
        self.block_user(tenant, user, block.clone()).await?;
        Ok(Some(block))
    }

    async fn unblock_user(&self, tenant: &TenantId, user: &UserId) -> Result<(), StoreError> {
        let tag = user_tag(tenant, user);
        let keys = Keys(&tag);
        self.connection.query(redis::cmd("DEL").arg(keys.block()).arg(keys.wrong())).await
    }

    async fn user_block(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<Option<UserBlock>, StoreError> {
        let tag = user_tag(tenant, user);
        let block: Option<UserBlock> = self.get_json(&Keys(&tag).block()).await?;
        Ok(block.filter(|b| b.in_force(now)))
    }

    async fn confirm_totp_enrollment(
        &self,
        tenant: &TenantId,
        id: &EnrollmentId,
        device: Device,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError> {
        self.spend_enrollment(id, Some(tenant), EnrollmentKind::Totp, device, now).await
    }

    async fn spend_totp_step(&self, id: &DeviceId, step: u64) -> Result<bool, StoreError> {
        loop {
            let Some((key, current, device)) = self.load_device(id).await? else { return Ok(false) };
            if device.totp_last_step.is_some_and(|last| last >= step) {
                return Ok(false);
            }
            let updated = Device { totp_last_step: Some(step), ..device };
            let set: i64 = self.connection.invoke(self.scripts.value_cas.key(&key).arg(&current).arg(encode(&updated)?)).await?;
            if set == 1 {
                return Ok(true);
            }
        }
    }

    async fn record_totp_failure(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &StrikePolicy,
        now: Millis,
    ) -> Result<Option<Millis>, StoreError> {
        let tag = user_tag(tenant, user);
        let keys = Keys(&tag);
        if !self.strike(keys.totp_failures(), policy, now).await? {
            return Ok(None);
        }
        let until = now.plus(policy.block_for);
        let ttl = ttl_ms(now, until.plus(TTL_MARGIN));
        let _: () = self.connection.query(redis::cmd("SET").arg(keys.totp_lock()).arg(until.0).arg("PX").arg(ttl)).await?;
        Ok(Some(until))
    }

    async fn totp_locked_until(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<Option<Millis>, StoreError> {
        let tag = user_tag(tenant, user);
        let until: Option<i64> = self.connection.query(redis::cmd("GET").arg(Keys(&tag).totp_lock())).await?;
        Ok(until.map(Millis).filter(|until| now < *until))
    }
}

#[cfg(any(test, feature = "test-util"))]
pub mod testing;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::testing::{RedisCluster, RedisServer};
    use super::*;

    async fn store_on(urls: Vec<String>, clock: crate::domain::time::ManualClock) -> RedisStore {
        RedisStore::connect(RedisSettings { urls, operation_timeout: Duration::from_secs(2) }, Arc::new(clock))
            .await
            .expect("store connects")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_store_passes_the_conformance_suite() {
        let server = RedisServer::start().await;
        let url = server.url();
        super::super::conformance::run_all(|clock| {
            let url = url.clone();
            async move {
                let store = store_on(vec![url], clock).await;
                let _: () = store.connection.query(&redis::cmd("FLUSHALL")).await.expect("flush");
                store
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_three_master_cluster_passes_the_conformance_suite() {
        let cluster = RedisCluster::start(3).await;
        let urls = cluster.urls();
        super::super::conformance::run_all(|clock| {
            let urls = urls.clone();
            async move {
                cluster_flush(&urls).await;
                store_on(urls, clock).await
            }
        })
        .await;
    }

    async fn cluster_flush(urls: &[String]) {
        for url in urls {
            let client = redis::Client::open(url.as_str()).expect("url");
            let mut connection = client.get_multiplexed_async_connection().await.expect("node");
            let _: () = redis::cmd("FLUSHALL").query_async(&mut connection).await.expect("flush");
        }
    }
}
