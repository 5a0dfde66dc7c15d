//! Challenges: ephemeral records that change only by compare-and-set on their
//! version, each change announced (id and version, nothing else) for the watchers
//! on every replica, who read the record itself before they report anything.
//!
//! Expiry is decided twice: by the store's clock when a record is read, and inside
//! the compare-and-set by the later of that clock and Redis's (`TIME`), so a replica
//! whose clock is behind cannot accept an answer after the challenge's expiry.

use std::collections::HashMap;
use std::sync::Arc;

use redis::Script;

use super::RedisStore;
use super::connection::{Connection, corrupt, decode, encode};
use super::keys::{Keys, TTL_MARGIN, TagCache, challenge_index, shard_channel, ttl_ms, user_tag};
use super::watch::WatchRegistry;
use crate::domain::challenge::{Challenge, ChallengeState, Delivery, Resolution};
use crate::domain::ids::{ChallengeId, DeviceId, TenantId, UserId};
use crate::domain::time::Millis;
use crate::store::{Answered, ChallengeWatch, DeviceAnswer, ResolveOutcome, StoreError};

/// How a resolution is decided from the challenge as read.
type Decide<'a> = dyn Fn(&Challenge) -> Resolution + Send + Sync + 'a;

/// What a challenge read returns: the challenge, its version and when it goes.
pub(super) struct ChallengeRecord {
    tag: String,
    version: u64,
    purge_at: Millis,
    pub(super) challenge: Challenge,
}

/// What a compare-and-set of a challenge came to.
enum Written {
    Version(u64),
    /// Someone else changed the record first (or it is gone).
    Stale,
    /// It would have approved while the user is blocked.
    Blocked,
    /// The challenge is PENDING past its expiry by Redis's clock, which read this.
    Expired(Millis),
}

/// A challenge record from its hash's fields (`HGETALL`): the challenge in `json`
/// with the deliveries in their own fields (`d:<device id>`, see `delivery.lua`)
/// laid over it; `None` for a record that is not there.
fn parse_record(tag: &str, id: &ChallengeId, mut fields: HashMap<String, String>) -> Result<Option<ChallengeRecord>, StoreError> {
    let (Some(json), Some(version), Some(purge_at)) = (fields.remove("json"), fields.remove("v"), fields.remove("purge_at"))
    else {
        return Ok(None);
    };
    let mut challenge: Challenge = decode(&json)?;
    if challenge.id != *id {
        return Err(corrupt("a challenge record under another challenge's id"));
    }
    let mut deliveries: Vec<(String, String)> = fields.into_iter().filter(|(name, _)| name.starts_with("d:")).collect();
    deliveries.sort();
    for (_, delivery) in deliveries {
        challenge.record_delivery(decode(&delivery)?);
    }
    let version = version.parse().map_err(corrupt)?;
    let purge_at = Millis(purge_at.parse().map_err(corrupt)?);
    Ok(Some(ChallengeRecord { tag: tag.to_owned(), version, purge_at, challenge }))
}

/// What the background tasks need: reads, expiry compare-and-sets, the registry.
#[derive(Clone)]
pub(super) struct Reader {
    pub(super) connection: Connection,
    /// The compare-and-set that every challenge change goes through.
    pub(super) challenge_cas: Arc<Script>,
    pub(super) watchers: Arc<WatchRegistry>,
    pub(super) tags: Arc<TagCache<ChallengeId>>,
}

impl Reader {
    /// The tag of the user whose slot holds challenge `id`: from the cache, else
    /// from the index.
    pub(super) async fn locate(&self, id: &ChallengeId) -> Result<Option<Arc<str>>, StoreError> {
        if let Some(tag) = self.tags.get(id) {
            return Ok(Some(tag));
        }
        let tag: Option<String> = self.connection.query(redis::cmd("GET").arg(challenge_index(id))).await?;
        Ok(tag.map(|tag| {
            let tag = Arc::<str>::from(tag);
            self.tags.put(id, Arc::clone(&tag));
            tag
        }))
    }

    /// Reads the record: the challenge in `json` with the deliveries in their own
    /// fields (`d:<device id>`, see `delivery.lua`) laid over it.
    async fn load(&self, id: &ChallengeId) -> Result<Option<ChallengeRecord>, StoreError> {
        let Some(tag) = self.locate(id).await? else { return Ok(None) };
        self.load_at(&tag, id).await
    }

    /// [`Reader::load`] in the slot of user tag `tag`, known already: no index read.
    async fn load_at(&self, tag: &str, id: &ChallengeId) -> Result<Option<ChallengeRecord>, StoreError> {
        let key = Keys(tag).challenge(id.as_str());
        let fields: HashMap<String, String> = self.connection.query(redis::cmd("HGETALL").arg(&key)).await?;
        parse_record(tag, id, fields)
    }

    /// Writes `challenge` if the record is still at `version`; returns the new
    /// version, or `None` when someone else changed it first, or (Redis's clock
    /// says so) it expired: the caller reads it again, and expires it then.
    /// `now` is the store's clock (`Millis(0)` for none: Redis's alone decides).
    async fn compare_and_set(
        &self,
        tag: &str,
        version: u64,
        challenge: &Challenge,
        now: Millis,
    ) -> Result<Option<u64>, StoreError> {
        match self.write(tag, version, challenge, now, false).await? {
            Written::Version(version) => Ok(Some(version)),
            Written::Stale | Written::Blocked => Ok(None),
            Written::Expired(redis_now) => {
                self.expire(tag, challenge.id.clone(), redis_now).await?;
                Ok(None)
            }
        }
    }

    /// Expires challenge `id` at `now` (Redis's clock, past the store's) if it is
    /// still PENDING: what `current` does by the store's clock.
    async fn expire(&self, tag: &str, id: ChallengeId, now: Millis) -> Result<(), StoreError> {
        loop {
            let Some(mut record) = self.load(&id).await? else { return Ok(()) };
            if !record.challenge.expire_if_due(now) {
                return Ok(());
            }
            if let Written::Version(_) = self.write(tag, record.version, &record.challenge, now, false).await? {
                crate::telemetry::metrics::challenge_resolved(&record.challenge.tenant, ChallengeState::Expired, None);
                return Ok(());
            }
        }
    }

    /// The compare-and-set itself; `approving`, it refuses (Blocked) to approve
    /// while the user's block is in force at `now` (the store's clock). Any change
    /// but to EXPIRED is refused (Expired) for a PENDING challenge past its expiry
    /// by the later of `now` and Redis's clock.
    async fn write(
        &self,
        tag: &str,
        version: u64,
        challenge: &Challenge,
        now: Millis,
        approving: bool,
    ) -> Result<Written, StoreError> {
        let keys = Keys(tag);
        let json = encode(challenge)?;
        let state = encode(&challenge.state)?;
        let mut invocation = self.challenge_cas.prepare_invoke();
        invocation
            .key(keys.challenge(challenge.id.as_str()))
            .key(keys.pending())
            .key(keys.block())
            .arg(version)
            .arg(&json)
            .arg(state.trim_matches('"'))
            .arg(shard_channel(&challenge.id))
            .arg(challenge.id.as_str())
            .arg(now.0)
            .arg(if approving { "1" } else { "0" })
            .arg(u64::try_from(TTL_MARGIN.as_millis()).unwrap_or(u64::MAX));
        let answer: Vec<i64> = self.connection.invoke(&invocation).await?;
        match answer.as_slice() {
            [0] => Ok(Written::Stale),
            [-1] => Ok(Written::Blocked),
            [-2, redis_now] => Ok(Written::Expired(Millis(*redis_now))),
            [version] if *version > 0 => {
                let version = version.unsigned_abs();
                self.watchers.apply(version, challenge);
                Ok(Written::Version(version))
            }
            other => Err(corrupt(format!("unexpected compare-and-set answer {other:?}"))),
        }
    }

    /// Reads a challenge of `tenant`, expiring it first when its time is up; `None`
    /// when unknown, another tenant's, or past its retention.
    pub(super) async fn current(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        now: Millis,
    ) -> Result<Option<ChallengeRecord>, StoreError> {
        self.read(None, Some(tenant), id, now).await
    }

    /// Reads a challenge for its watchers on this replica, after a change was
    /// announced: what the record says is what they see, whatever the message said.
    pub(super) async fn refresh(&self, id: &ChallengeId, now: Millis) -> Result<(), StoreError> {
        self.read(None, None, id, now).await.map(drop)
    }

    /// [`Reader::current`], for any tenant when `tenant` is `None`, in the slot of
    /// user tag `tag` when it is known (else the index says). Either way the
    /// watchers of the challenge on this replica get what was read.
    async fn read(
        &self,
        tag: Option<&str>,
        tenant: Option<&TenantId>,
        id: &ChallengeId,
        now: Millis,
    ) -> Result<Option<ChallengeRecord>, StoreError> {
        loop {
            let loaded = match tag {
                Some(tag) => self.load_at(tag, id).await?,
                None => self.load(id).await?,
            };
            let Some(mut record) = loaded else { return Ok(None) };
            if tenant.is_some_and(|tenant| record.challenge.tenant != *tenant) || now >= record.purge_at {
                return Ok(None);
            }
            if !record.challenge.expire_if_due(now) {
                self.watchers.apply(record.version, &record.challenge);
                return Ok(Some(record));
            }
            if let Some(version) = self.compare_and_set(&record.tag, record.version, &record.challenge, now).await? {
                // Counted once across replicas: only the compare-and-set winner gets here.
                crate::telemetry::metrics::challenge_resolved(&record.challenge.tenant, ChallengeState::Expired, None);
                record.version = version;
                return Ok(Some(record));
            }
        }
    }
}

/// The challenge half of [`crate::store::Store`] (the trait impl in `mod.rs` calls these).
impl RedisStore {
    pub(super) async fn get_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        now: Millis,
    ) -> Result<Option<Challenge>, StoreError> {
        Ok(self.reader().current(tenant, id, now).await?.map(|record| record.challenge))
    }

    pub(super) async fn watch_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        now: Millis,
    ) -> Result<Option<ChallengeWatch>, StoreError> {
        // Interest first, read second: a change published in between is kept by the
        // registry and wins over the read by its version. A challenge this replica
        // holds already (created here, or watched here by another stream) needs no
        // read: every change to it since is announced here and read.
        self.watchers.expect(id);
        let interest = super::watch::Interest::new(&self.watchers, id);
        if let Some((version, challenge)) = self.watchers.known(id, tenant, now) {
            let watch = self.watchers.subscribe(id, version, &challenge);
            interest.keep();
            return Ok(Some(watch));
        }
        // Nothing found, an error, or the call dropped midway: `interest` forgets.
        let Some(record) = self.reader().current(tenant, id, now).await? else { return Ok(None) };
        let watch = self.watchers.subscribe(id, record.version, &record.challenge);
        interest.keep();
        Ok(Some(watch))
    }

    pub(super) async fn resolve_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        resolution: Resolution,
        now: Millis,
    ) -> Result<Option<ResolveOutcome>, StoreError> {
        let outcome = self.settle(None, tenant, id, &|_| resolution.clone(), now).await?;
        Ok(outcome.map(|(_, outcome)| outcome))
    }

    /// One call (`answer.lua`) on any replica: the user's slot comes from the
    /// device, and the script does every step of [`DeviceAnswer`] and reads the
    /// user's devices for the clears. What the script leaves to Rust (an expiry
    /// come, an approval while blocked: rare) is settled by read and
    /// compare-and-set, as any resolution is. The id is not put in the tag cache:
    /// it is the caller's word that the challenge is this user's.
    pub(super) async fn answer_challenge(&self, answer: &DeviceAnswer<'_>, now: Millis) -> Result<Answered, StoreError> {
        let device = answer.device;
        let id = answer.challenge;
        let tag = user_tag(&device.tenant, &device.user_id);
        let keys = Keys(&tag);
        let text = AnswerText::new(answer, now)?;
        let mut invocation = self.scripts.answer.prepare_invoke();
        invocation
            .key(keys.challenge(id.as_str()))
            .key(keys.pending())
            .key(keys.block())
            .key(keys.proof(&answer.proof))
            .key(keys.device(device.id.as_str()))
            .key(keys.devices())
            .arg(ttl_ms(now, answer.proof_keep_until))
            .arg(now.0)
            .arg(u64::try_from(TTL_MARGIN.as_millis()).unwrap_or(u64::MAX))
            .arg(shard_channel(id))
            .arg(id.as_str())
            .arg(&text.owner)
            .arg(&text.number)
            .arg(&text.pending[0])
            .arg(&text.pending[1]);
        for [state, state_text, resolved_text] in [&text.on_match, &text.otherwise] {
            invocation.arg(state).arg(state_text).arg(resolved_text);
        }
        invocation.arg(keys.device_prefix()).arg(&text.touched);
        let reply: Vec<String> = self.connection.invoke(&invocation).await?;
        let (word, matched) = (reply.first().map(String::as_str), reply.get(1).is_some_and(|m| m == "m"));
        let resolution = if matched { &answer.on_match } else { &answer.otherwise };
        match word {
            Some("device_gone") => {
                self.answering.forget(&device.id);
                Ok(Answered::DeviceGone)
            }
            Some("replayed") => Ok(Answered::Replayed),
            Some("unknown") => Ok(Answered::Unknown),
            Some(word @ ("final" | "answered")) => {
                let count: usize =
                    reply.get(2).and_then(|count| count.parse().ok()).ok_or_else(|| corrupt("answer without a record"))?;
                let fields = reply.get(3..3 + count).ok_or_else(|| corrupt("answer with a short record"))?;
                let fields: HashMap<String, String> =
                    fields.chunks_exact(2).map(|pair| (pair[0].clone(), pair[1].clone())).collect();
                let record = parse_record(&tag, id, fields)?.ok_or_else(|| corrupt("answer with an empty record"))?;
                self.watchers.apply(record.version, &record.challenge);
                if word == "final" {
                    let resolution = answer.decide(&record.challenge);
                    return Ok(Answered::Done {
                        resolution,
                        outcome: ResolveOutcome { accepted: false, challenge: record.challenge },
                        devices: None,
                    });
                }
                // The answer is in already: a device record that does not read only
                // costs the clears' shortcut (the broker lists the devices itself),
                // never the answer or the block that may follow it.
                let devices = super::records::user_devices(&reply[3 + count..], &device.tenant, &device.user_id)
                    .inspect_err(|error| tracing::warn!(%error, "a device record read with the answer does not decode"))
                    .ok();
                Ok(Answered::Done {
                    resolution: resolution.clone(),
                    outcome: ResolveOutcome { accepted: true, challenge: record.challenge },
                    devices,
                })
            }
            Some("fallback") => {
                let settled = self.settle(Some((&tag, &device.user_id)), &device.tenant, id, &|c| answer.decide(c), now).await?;
                Ok(settled.map_or(Answered::Unknown, |(resolution, outcome)| Answered::Done {
                    resolution,
                    outcome,
                    devices: None,
                }))
            }
            other => Err(corrupt(format!("unexpected answer {other:?}"))),
        }
    }

    /// Reads the challenge (in `slot`'s user tag, and only if it is that user's,
    /// when given), decides its resolution and sets it by compare-and-set from
    /// what was read, again from a fresh read when another change came first.
    async fn settle(
        &self,
        slot: Option<(&str, &UserId)>,
        tenant: &TenantId,
        id: &ChallengeId,
        decide: &Decide<'_>,
        now: Millis,
    ) -> Result<Option<(Resolution, ResolveOutcome)>, StoreError> {
        let reader = self.reader();
        let (mut cancel_instead, mut now) = (false, now);
        loop {
            let Some(mut record) = reader.read(slot.map(|(tag, _)| tag), Some(tenant), id, now).await? else {
                return Ok(None);
            };
            if slot.is_some_and(|(_, user)| record.challenge.user_id != *user) {
                return Ok(None);
            }
            let decided = decide(&record.challenge);
            let resolution = if cancel_instead { Resolution::cancelled() } else { decided.clone() };
            if !record.challenge.apply(&resolution, now) {
                return Ok(Some((decided, ResolveOutcome { accepted: false, challenge: record.challenge })));
            }
            let approving = resolution.state == ChallengeState::Approved;
            match reader.write(&record.tag, record.version, &record.challenge, now, approving).await? {
                Written::Version(_) => {
                    let accepted = !cancel_instead;
                    return Ok(Some((decided, ResolveOutcome { accepted, challenge: record.challenge })));
                }
                Written::Stale => {}
                // A block came first: the approval is refused and the challenge
                // cancelled, as the block's own cancellation would have.
                Written::Blocked => cancel_instead = true,
                // Redis's clock is past the expiry (this replica's is behind): the
                // answer is refused, and the read again by that clock expires it.
                Written::Expired(redis_now) => now = now.max(redis_now),
            }
        }
    }

    /// One call (`delivery.lua`): the delivery goes in a field of its own, so it
    /// needs no read first and races with no other change. Watchers elsewhere hear
    /// of it as of any change; those here get it at once, without a read, when
    /// they saw the version before it.
    pub(super) async fn record_deliveries(&self, id: &ChallengeId, deliveries: Vec<Delivery>) -> Result<(), StoreError> {
        let Some(tag) = self.reader().locate(id).await? else { return Ok(()) };
        let mut invocation = self.scripts.delivery.prepare_invoke();
        invocation.key(Keys(&tag).challenge(id.as_str())).arg(shard_channel(id)).arg(id.as_str());
        for delivery in &deliveries {
            invocation.arg(format!("d:{}", delivery.device_id)).arg(encode(delivery)?);
        }
        let mut writing = super::watch::Writing::begin(self.reader(), Arc::clone(&self.clock), id.clone());
        let recorded: Result<u64, StoreError> = self.connection.invoke(&invocation).await;
        writing.recorded = recorded.as_ref().ok().filter(|version| **version > 0).map(|version| (*version, deliveries));
        drop(writing);
        recorded.map(drop)
    }

    pub(super) async fn pending_challenges(
        &self,
        tenant: &TenantId,
        user: &UserId,
        now: Millis,
    ) -> Result<Vec<Challenge>, StoreError> {
        let tag = user_tag(tenant, user);
        let ids: Vec<String> = self.connection.query(redis::cmd("ZREVRANGE").arg(Keys(&tag).pending()).arg(0).arg(-1)).await?;
        let reader = self.reader();
        let mut pending = Vec::new();
        for id in ids {
            let Ok(id) = ChallengeId::parse(&id) else { continue };
            // The user's pending set names challenges in the user's slot.
            self.tags.put(&id, Arc::from(tag.as_str()));
            // The tag is a hash of the tenant and user: the record itself must be
            // the user's too, or it is not listed.
            if let Some(record) = reader.current(tenant, &id, now).await?
                && record.challenge.user_id == *user
                && record.challenge.state == ChallengeState::Pending
            {
                pending.push(record.challenge);
            }
        }
        pending.sort_by_key(|c| std::cmp::Reverse(c.created_at));
        Ok(pending)
    }
}

/// The fragments of a challenge's JSON that `answer.lua` finds and replaces (see
/// its header for why by text). Made by serde from the same types the JSON is, and
/// checked against serde's own output by `answer_text_rewrites_as_serde_writes`.
pub(super) struct AnswerText {
    /// `"tenant":<t>,"user_id":<u>,`: whose challenge it must be.
    pub(super) owner: String,
    /// `"number":<n>,`: the typed number; empty when none was typed.
    pub(super) number: String,
    /// A PENDING challenge's state and resolution fields.
    pub(super) pending: [String; 2],
    /// The state's name, the state text and the resolution text, when the number matches.
    pub(super) on_match: [String; 3],
    pub(super) otherwise: [String; 3],
    /// The device JSON's end with its last use: `"last_used_at":<ms>}`.
    pub(super) touched: String,
}

impl AnswerText {
    pub(super) fn new(answer: &DeviceAnswer<'_>, now: Millis) -> Result<Self, StoreError> {
        let device = answer.device;
        let state_text = |state: &ChallengeState, deny_reason| -> Result<String, StoreError> {
            Ok(format!("\"state\":{},\"deny_reason\":{},", encode(state)?, encode(&deny_reason)?))
        };
        let resolved_text = |at: Option<Millis>, by: &Option<DeviceId>| -> Result<String, StoreError> {
            Ok(format!("\"resolved_at\":{},\"resolved_by\":{},", encode(&at)?, encode(by)?))
        };
        let parts = |resolution: &Resolution| -> Result<[String; 3], StoreError> {
            Ok([
                encode(&resolution.state)?.trim_matches('"').to_owned(),
                state_text(&resolution.state, resolution.deny_reason)?,
                resolved_text(Some(now), &resolution.device_id)?,
            ])
        };
        Ok(Self {
            owner: format!("\"tenant\":{},\"user_id\":{},", encode(&device.tenant)?, encode(&device.user_id)?),
            number: match answer.typed {
                Some(typed) => format!("\"number\":{},", encode(&typed)?),
                None => String::new(),
            },
            pending: [state_text(&ChallengeState::Pending, None)?, resolved_text(None, &None)?],
            on_match: parts(&answer.on_match)?,
            otherwise: parts(&answer.otherwise)?,
            touched: format!("\"last_used_at\":{}}}", encode(&Some(now))?),
        })
    }
}
