//! The Redis store: stateless pushmatch replicas that share one Redis (or a Redis
//! Cluster). Everything that decides is one atomic step in Redis (a Lua script or
//! a compare-and-set), so of racing replicas exactly one wins. The one decision
//! that spans two slots, that a public key enrolls once, is a claim (`SET NX`) on
//! the key before the user's script; `records.rs` shows why that is safe.
//!
//! Time is the store's clock (the `now` every call passes; `spend_proof`, which
//! gets none, reads the clock the store was given): windows and lockouts are decided
//! in the scripts and in Rust against `now`; Redis TTLs only collect garbage, with a
//! margin. One rule also asks Redis's clock: a challenge's expiry. Its
//! compare-and-set (`challenge_cas.lua`) refuses any answer once the later of `now`
//! and Redis's `TIME` has reached `expires_at`, so a replica whose clock is behind
//! cannot accept an answer late; one whose clock is ahead expires early, which is
//! the safe side. Blocks, the wrong-number and TOTP windows and the create limits
//! stay on the store's clock, on purpose: there a clock behind is the strict side
//! (a block or lock lasts longer, a window counts more), a clock ahead ends a timed
//! block or lock early by its skew, at most, and the blocks that matter most (a
//! fraud report, `max_consecutive` TOTP failures) have no end time at all. Taking
//! the earlier of the two clocks there would make a timed block outlast its end
//! for every replica whose clock is right, and tie the store's behaviour to a clock
//! its tests cannot move. Keep the replicas' clocks synchronised (NTP) all the same.
//!
//! A device's answer is one call (`answer.lua`): the proof spent (its key in the
//! user's slot), the number compared, the challenge resolved, the device touched,
//! the user's devices read for the clears. The device whose proof is checked
//! before it may be the one this replica remembers (`answering`: read before, or
//! enrolled here): a device's id, owner and key never change, and `answer.lua`
//! refuses a device removed since.
//!
//! A create is one call when the replica remembers the user's devices
//! (`user_devices`, kept only for a user with a device that can answer): the
//! pushes are chosen from them, and `create.lua` compares their fingerprint
//! (`user_devices.lua`: the records, sorted, without the last use and TOTP step)
//! with the records as they are, in the same step as the insert and before any
//! limit or block is read. If the devices changed it writes nothing and answers
//! them, and the broker chooses again (or refuses a user left without a device
//! that can answer, as on a fresh read). So a
//! replica's memory can make a create cost a second call, never push to the wrong
//! phones; and since the fingerprint is taken from the records, not from a counter
//! each writer must bump, a replica of an older version writing devices cannot
//! leave it stale. A replica that does not remember them (the IdP's replica meets
//! each user once after it starts) is one call as well: the broker passes the room
//! its push queues have ([`crate::domain::challenge::PushRoom`]) and `create.lua`
//! chooses the pushes from the records it reads (`choose_pushes`, the same choice
//! as `PushRoom::choose`, held to it by the stores' shared conformance case),
//! splices the deliveries into the challenge's JSON, and answers the records for
//! the replica to remember. When no device can answer or the pushes do not fit, it
//! writes nothing and answers the records, and the broker decides from them as
//! above (the refusal names the reason).
//!
//! Every change to a challenge is announced, as its id and version and nothing
//! else, on one of [`SHARDS`] channels (by challenge id), so each replica holds one
//! pub/sub connection subscribed to a fixed handful of channels, not one SUBSCRIBE
//! per challenge; `watch` turns that into reads of the record (Redis's keys are the
//! truth, a message only says where to look) and so into wake-ups and expiry across
//! replicas. Whoever can reach the channels learns no number and can make no watcher
//! report anything the record does not say.
//!
//! | module | holds |
//! | --- | --- |
//! | `keys` | the key schema: every key, its type, content and TTL; the channels |
//! | `scripts` | the Lua scripts (`scripts/*.lua`, each documents its KEYS and ARGV) |
//! | `connection` | the connection: call deadline and the mapping to [`StoreError`] |
//! | `link` | reaching Redis: one node, a cluster or Sentinel; TLS, ACL credentials, WAIT for replicas |
//! | `create` | a new challenge: `create.lua`, with the pushes chosen here or in the script |
//! | `challenges` | challenge reads and compare-and-sets, the challenge half of [`Store`] |
//! | `records` | enrollments and devices, their caps and the public-key claims: the durable half |
//! | `limits` | blocks, wrong numbers, VerifyTotp attempts and locks, used device proofs; the key count |
//! | `watch` | the watch registry, the pub/sub follower and the deadline task |
//! | [`testing`] | real `redis-server` processes for tests |

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{
    AdmissionPolicy, Answered, ChallengeDevices, ChallengeWatch, CompleteOutcome, CreateFor, CreateOutcome, DeviceAnswer,
    EnrollmentLimits, InsertOutcome, PushesFrom, ResolveOutcome, Store, StoreError, StrikePolicy, TenantPurge, TotpAttempt,
    TotpPolicy, UserBlock,
};
use crate::domain::challenge::{Challenge, Delivery, Resolution};
use crate::domain::device::{Device, ProofUse};
use crate::domain::enrollment::Enrollment;
use crate::domain::ids::{ChallengeId, CodeDigest, DeviceId, EnrollmentId, TenantId, UserId};
use crate::domain::time::{Clock, Millis};

mod challenges;
mod connection;
mod create;
mod keys;
mod limits;
mod link;
mod purge;
mod records;
mod scripts;
mod watch;

use challenges::Reader;
use connection::{Connection, unavailable};
pub use keys::SHARDS;
use keys::{Recent, TagCache};
use scripts::Scripts;
use watch::WatchRegistry;

const BACKEND: &str = "redis";

/// How to reach Redis.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// One URL: a single Redis. Several: the seed nodes of a Redis Cluster. Not used
    /// with `sentinel`. `rediss://` connects over TLS.
    pub urls: Vec<String>,
    /// Ask these sentinels for the master instead.
    pub sentinel: Option<SentinelSettings>,
    /// PEM CA certificate(s) that issued the Redis servers' certificates; `None`: the
    /// webpki (Mozilla) roots. The server name is checked either way.
    pub ca_cert_path: Option<PathBuf>,
    /// ACL user; wins over a user in the URL.
    pub username: Option<String>,
    /// A file holding the password (one line); wins over a password in the URL.
    pub password_file: Option<PathBuf>,
    /// The deadline of one Redis call; past it the request fails with UNAVAILABLE.
    pub operation_timeout: Duration,
    /// Replicas that must hold each write (`WAIT`) before the store acknowledges it;
    /// 0: none (asynchronous replication: a failover may lose the last writes).
    pub wait_replicas: u32,
    /// How long a write waits for them; past it the call fails with UNAVAILABLE.
    pub wait_timeout: Duration,
}

impl RedisSettings {
    /// Plain settings: `urls`, no TLS CA, no credentials but the URLs', no WAIT.
    pub fn new(urls: Vec<String>, operation_timeout: Duration) -> Self {
        Self {
            urls,
            sentinel: None,
            ca_cert_path: None,
            username: None,
            password_file: None,
            operation_timeout,
            wait_replicas: 0,
            wait_timeout: Duration::from_millis(500),
        }
    }
}

/// Redis Sentinel: where the sentinels are and the name of the master they watch.
#[derive(Clone, Debug)]
pub struct SentinelSettings {
    /// `redis://host:26379` (or `rediss://`, which the data nodes then use too); a
    /// user and password in them are the sentinels' own.
    pub urls: Vec<String>,
    pub master: String,
}

/// See the module documentation.
pub struct RedisStore {
    connection: Connection,
    scripts: Scripts,
    watchers: Arc<WatchRegistry>,
    /// Which user's slot holds a challenge, for the challenges this replica has seen.
    tags: Arc<TagCache<ChallengeId>>,
    /// Which user's slot holds a device, for the devices this replica has seen.
    device_tags: TagCache<DeviceId>,
    /// A user's devices (one that can answer among them) and their fingerprint, by
    /// the user's tag, as this replica read them last: a new challenge's pushes
    /// are chosen from them and `create.lua` checks the fingerprint.
    user_devices: Recent<String, (Arc<str>, Arc<Vec<Device>>)>,
    /// The devices that answered here lately, as read: an answer's proof is
    /// checked against the key and `answer.lua` checks the device is still there.
    answering: Recent<DeviceId, Arc<Device>>,
    /// The store's clock, for the calls that get no `now` (`spend_proof`).
    clock: Arc<dyn Clock>,
    /// Stops the pub/sub and deadline tasks when the store is dropped.
    closing: CancellationToken,
}

/// The device data one generation of [`RedisStore::user_devices`] holds at most
/// (by the records' size, see `records::weight`); with the generation before it,
/// 32 MiB however many devices the users have and however long their tokens.
const USER_DEVICES_BUDGET: usize = 16 << 20;
/// The same for [`RedisStore::answering`]: 16 MiB with both generations.
const ANSWERING_BUDGET: usize = 8 << 20;

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.closing.cancel();
    }
}

impl RedisStore {
    /// Connects (failing fast with UNAVAILABLE when Redis is not there) and starts the
    /// pub/sub and deadline tasks on the current runtime.
    pub async fn connect(settings: RedisSettings, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let (connection, subscriber) = Connection::open(&settings).await?;
        let store = Self {
            connection,
            scripts: Scripts::new(),
            watchers: Arc::new(WatchRegistry::default()),
            tags: Arc::new(TagCache::default()),
            device_tags: TagCache::default(),
            user_devices: Recent::with_budget(USER_DEVICES_BUDGET),
            answering: Recent::with_budget(ANSWERING_BUDGET),
            clock: Arc::clone(&clock),
            closing: CancellationToken::new(),
        };
        store.health_check().await?;
        // Loaded before the first call: otherwise every call of a burst that meets
        // a script not loaded yet gets NOSCRIPT, loads it and calls again (the
        // bench's first 200 creates in flight did). After a failover or a SCRIPT
        // FLUSH, that fallback of the `redis` crate still loads them.
        for script in store.scripts.all() {
            if let Err(error) = store.connection.load(script).await {
                tracing::warn!(%error, "could not load a script when connecting; the first call will");
            }
        }
        tokio::spawn(watch::follow_changes(subscriber, store.reader(), Arc::clone(&clock), store.closing.clone()));
        tokio::spawn(watch::expire_watched(store.reader(), clock, store.closing.clone()));
        Ok(store)
    }

    /// A cheap handle for the background tasks: the connection and the registry.
    fn reader(&self) -> Reader {
        Reader {
            connection: self.connection.clone(),
            challenge_cas: Arc::clone(&self.scripts.challenge_cas),
            watchers: Arc::clone(&self.watchers),
            tags: Arc::clone(&self.tags),
        }
    }

    async fn health_check(&self) -> Result<(), StoreError> {
        let pong: String = self.connection.query(&redis::cmd("PING")).await?;
        if pong == "PONG" { Ok(()) } else { Err(unavailable(format!("unexpected PING answer {pong:?}"))) }
    }
}

/// Each method calls the inherent method of the same name: challenges in
/// `challenges.rs`, enrollments and devices in `records.rs`, blocks, strikes, TOTP
/// attempts, proofs and the key count in `limits.rs`.
#[async_trait]
impl Store for RedisStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.health_check().await
    }

    // ---- challenges: ephemeral ----

    async fn create_challenge(
        &self,
        challenge: Challenge,
        policy: &AdmissionPolicy,
        now: Millis,
    ) -> Result<CreateOutcome, StoreError> {
        match RedisStore::create_for(self, challenge, policy, now, PushesFrom::Devices(None)).await? {
            CreateFor::Done(outcome) => Ok(outcome),
            CreateFor::Chose(..) | CreateFor::DevicesChanged(_) => {
                Err(connection::corrupt("a create without a device check answered as one with it"))
            }
        }
    }

    async fn challenge_devices(&self, tenant: &TenantId, user: &UserId) -> Result<Option<ChallengeDevices>, StoreError> {
        Ok(RedisStore::challenge_devices(self, tenant, user))
    }

    async fn create_challenge_for(
        &self,
        challenge: Challenge,
        policy: &AdmissionPolicy,
        now: Millis,
        pushes: PushesFrom<'_>,
    ) -> Result<CreateFor, StoreError> {
        RedisStore::create_for(self, challenge, policy, now, pushes).await
    }

    async fn answering_device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        RedisStore::answering_device(self, id).await
    }

    async fn get_challenge(&self, tenant: &TenantId, id: &ChallengeId, now: Millis) -> Result<Option<Challenge>, StoreError> {
        RedisStore::get_challenge(self, tenant, id, now).await
    }

    async fn watch_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        now: Millis,
    ) -> Result<Option<ChallengeWatch>, StoreError> {
        RedisStore::watch_challenge(self, tenant, id, now).await
    }

    async fn resolve_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        resolution: Resolution,
        now: Millis,
    ) -> Result<Option<ResolveOutcome>, StoreError> {
        RedisStore::resolve_challenge(self, tenant, id, resolution, now).await
    }

    async fn answer_challenge(&self, answer: &DeviceAnswer<'_>, now: Millis) -> Result<Answered, StoreError> {
        RedisStore::answer_challenge(self, answer, now).await
    }

    async fn record_deliveries(&self, id: &ChallengeId, deliveries: Vec<Delivery>) -> Result<(), StoreError> {
        RedisStore::record_deliveries(self, id, deliveries).await
    }

    async fn pending_challenges(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<Vec<Challenge>, StoreError> {
        RedisStore::pending_challenges(self, tenant, user, now).await
    }

    // ---- enrollments and devices: durable ----

    async fn insert_enrollment(
        &self,
        enrollment: Enrollment,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<InsertOutcome, StoreError> {
        RedisStore::insert_enrollment(self, enrollment, limits, now).await
    }

    async fn get_enrollment(&self, tenant: &TenantId, id: &EnrollmentId) -> Result<Option<Enrollment>, StoreError> {
        RedisStore::get_enrollment(self, tenant, id).await
    }

    async fn enrollment_by_code(&self, code: &CodeDigest) -> Result<Option<Enrollment>, StoreError> {
        RedisStore::enrollment_by_code(self, code).await
    }

    async fn complete_enrollment(
        &self,
        code: &CodeDigest,
        device: Device,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError> {
        RedisStore::complete_enrollment(self, code, device, limits, now).await
    }

    async fn get_device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        RedisStore::get_device(self, id).await
    }

    async fn list_devices(&self, tenant: &TenantId, user: &UserId) -> Result<Vec<Device>, StoreError> {
        RedisStore::list_devices(self, tenant, user).await
    }

    async fn remove_device(&self, tenant: &TenantId, id: &DeviceId) -> Result<bool, StoreError> {
        RedisStore::remove_device(self, tenant, id).await
    }

    async fn set_push_token(&self, id: &DeviceId, token: &str) -> Result<bool, StoreError> {
        RedisStore::set_push_token(self, id, token).await
    }

    async fn disable_push(&self, id: &DeviceId, token: &str) -> Result<(), StoreError> {
        RedisStore::disable_push(self, id, token).await
    }

    async fn touch_device(&self, id: &DeviceId, now: Millis) -> Result<(), StoreError> {
        RedisStore::touch_device(self, id, now).await
    }

    // ---- blocks ----

    async fn block_user(&self, tenant: &TenantId, user: &UserId, block: UserBlock, now: Millis) -> Result<UserBlock, StoreError> {
        RedisStore::block_user(self, tenant, user, block, now).await
    }

    async fn record_wrong_number(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &StrikePolicy,
        now: Millis,
    ) -> Result<Option<UserBlock>, StoreError> {
        RedisStore::record_wrong_number(self, tenant, user, policy, now).await
    }

    async fn unblock_user(&self, tenant: &TenantId, user: &UserId) -> Result<(), StoreError> {
        RedisStore::unblock_user(self, tenant, user).await
    }

    // ---- TOTP ----

    async fn confirm_totp_enrollment(
        &self,
        tenant: &TenantId,
        id: &EnrollmentId,
        device: Device,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError> {
        RedisStore::confirm_totp_enrollment(self, tenant, id, device, limits, now).await
    }

    async fn spend_totp_step(&self, id: &DeviceId, step: u64) -> Result<bool, StoreError> {
        RedisStore::spend_totp_step(self, id, step).await
    }

    async fn reserve_totp_attempt(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &TotpPolicy,
        now: Millis,
    ) -> Result<TotpAttempt, StoreError> {
        RedisStore::reserve_totp_attempt(self, tenant, user, policy, now).await
    }

    async fn totp_attempt_succeeded(&self, tenant: &TenantId, user: &UserId, _now: Millis) -> Result<(), StoreError> {
        RedisStore::totp_attempt_succeeded(self, tenant, user).await
    }

    // ---- device proofs ----

    async fn spend_proof(&self, proof: ProofUse, keep_until: Millis) -> Result<bool, StoreError> {
        RedisStore::spend_proof(self, proof, keep_until).await
    }

    async fn record_count(&self) -> Result<u64, StoreError> {
        RedisStore::record_count(self).await
    }

    // ---- operators ----

    async fn purge_tenant(&self, tenant: &TenantId, dry_run: bool) -> Result<TenantPurge, StoreError> {
        RedisStore::purge_tenant(self, tenant, dry_run).await
    }
}

#[cfg(any(test, feature = "test-util"))]
pub mod testing;

#[cfg(test)]
mod challenge_tests;
#[cfg(test)]
mod tests_failover;
#[cfg(test)]
mod tests_tls;

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::testing::{RedisCluster, RedisServer};
    use super::{RedisSettings, RedisStore};
    use crate::domain::time::ManualClock;

    /// A store on `urls` (one: a single node; several: a cluster's seeds), on `clock`.
    pub(super) async fn store_on(urls: Vec<String>, clock: ManualClock) -> RedisStore {
        RedisStore::connect(RedisSettings::new(urls, Duration::from_secs(2)), Arc::new(clock)).await.expect("store connects")
    }

    /// The conformance cases on one redis-server that they share.
    mod single_node {
        use super::*;

        async fn store(clock: ManualClock) -> RedisStore {
            store_on(vec![RedisServer::shared().await.to_owned()], clock).await
        }

        crate::store::conformance::conformance_suite!(store);

        /// Random sequences against the rules' model (`conformance::model`).
        #[test]
        fn model_matches_the_rules() {
            crate::store::conformance::model::check("redis", 512, store);
        }
    }

    /// The conformance cases on one three-master Redis Cluster that they share.
    mod cluster {
        use super::*;

        async fn store(clock: ManualClock) -> RedisStore {
            store_on(RedisCluster::shared().await.to_vec(), clock).await
        }

        crate::store::conformance::conformance_suite!(store);

        /// Random sequences against the rules' model (`conformance::model`).
        #[test]
        fn model_matches_the_rules() {
            crate::store::conformance::model::check("redis cluster", 256, store);
        }
    }
}
