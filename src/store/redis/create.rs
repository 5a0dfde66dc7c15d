//! Creating a challenge (`create.lua`): the user's block and limits, the
//! idempotency key and the insert in one call, with the pushes either chosen by
//! the replica from the devices it remembers (their fingerprint checked in the
//! script) or, when it does not remember them, chosen by the script itself.

use std::sync::Arc;

use super::RedisStore;
use super::connection::{corrupt, decode, encode};
use super::keys::{Keys, TTL_MARGIN, challenge_index, ttl_ms, user_tag};
use crate::domain::challenge::{Challenge, PushRoom};
use crate::domain::ids::ChallengeId;
use crate::domain::time::Millis;
use crate::store::{AdmissionPolicy, CreateFor, CreateOutcome, PushesFrom, Refusal, StoreError};

/// A new challenge's JSON, cut where its deliveries go: up to and including
/// `"deliveries":[`, and from the `]` that closes them. `None` unless the list is
/// there once and empty. A quote inside a string is escaped in JSON, so the
/// pattern can only be the key itself (no other field of a challenge is named so).
fn split_at_deliveries(json: &str) -> Option<(&str, &str)> {
    const EMPTY: &str = "\"deliveries\":[]";
    let mut found = json.match_indices(EMPTY);
    let (at, _) = found.next()?;
    if found.next().is_some() {
        return None;
    }
    Some(json.split_at(at + EMPTY.len() - 1))
}

impl RedisStore {
    /// `pushes`: the fingerprint of the user's devices the challenge's pushes were
    /// chosen from (`user_devices.lua`), checked in the script (`None` skips it);
    /// or the room the push queues have, for the script to choose them itself.
    pub(super) async fn create_for(
        &self,
        mut challenge: Challenge,
        policy: &AdmissionPolicy,
        now: Millis,
        pushes: PushesFrom<'_>,
    ) -> Result<CreateFor, StoreError> {
        let tag = user_tag(&challenge.tenant, &challenge.user_id);
        let keys = Keys(&tag);
        let (settled_purge_at, purge_at) = policy.purge_times(challenge.expires_at);
        let key_ttl = ttl_ms(now, purge_at.plus(TTL_MARGIN));
        let window = i64::try_from(policy.window.as_millis()).unwrap_or(i64::MAX);
        let request_key = keys.request(challenge.request_id.as_deref().unwrap_or(""));
        let index = challenge_index(&challenge.id);
        // Before anything is written (the cluster's index below).
        let json = encode(&challenge)?;
        let (json, seen, rest) = match pushes {
            PushesFrom::Devices(seen) => (json.as_str(), seen.unwrap_or(""), ""),
            PushesFrom::Store(_) => match split_at_deliveries(&json) {
                Some((head, rest)) => (head, "*", rest),
                None => return Err(corrupt("a new challenge's JSON without its one empty deliveries list")),
            },
        };
        // On a cluster the index is another slot's key: set before the record (so a
        // record never lacks it) and removed again on a refusal. On one Redis the
        // script sets it with the record: one call.
        let cluster = self.connection.is_cluster();
        if cluster {
            let _: () = self.connection.query(redis::cmd("SET").arg(&index).arg(&tag).arg("PX").arg(key_ttl)).await?;
        }
        let mut invocation = self.scripts.create.prepare_invoke();
        invocation
            .key(keys.challenge(challenge.id.as_str()))
            .key(keys.pending())
            .key(keys.created())
            .key(request_key)
            .key(keys.block())
            .arg(json)
            .arg(challenge.id.as_str())
            .arg(now.0)
            .arg(challenge.expires_at.0)
            .arg(key_ttl)
            .arg(policy.max_pending)
            .arg(policy.max_per_window)
            .arg(window.max(1))
            .arg(if challenge.request_id.is_some() { "1" } else { "0" })
            .arg(keys.challenge_prefix())
            .arg(purge_at.0)
            .arg(&tag)
            .arg(settled_purge_at.0)
            .arg(seen)
            .arg(keys.device_prefix())
            .key(keys.devices());
        if let PushesFrom::Store(PushRoom(room)) = pushes {
            invocation.arg(rest);
            // By Platform::index: APNs, FCM, Web Push.
            for left in room {
                invocation.arg(u64::try_from(left).unwrap_or(u64::MAX));
            }
            invocation.arg(challenge.tenant.0.as_str()).arg(challenge.user_id.as_str());
        }
        if !cluster {
            invocation.key(&index);
        }
        // Noted as version 1 (`create.lua`) before the script: a change another
        // replica makes the moment the record exists (a block's cancel) is announced
        // to an entry already here. Forgotten unless the script creates it.
        self.watchers.created(1, &challenge);
        let interest = super::watch::Interest::new(&self.watchers, &challenge.id);
        let outcome: Vec<String> = self.connection.invoke(&invocation).await?;
        let refused = |refusal| CreateOutcome::Refused(refusal);
        let result = match outcome.first().map(String::as_str) {
            Some("created") => {
                self.tags.put(&challenge.id, Arc::from(tag.as_str()));
                if let PushesFrom::Devices(_) = pushes {
                    interest.keep();
                    return Ok(CreateFor::Done(CreateOutcome::Created(challenge)));
                }
                // Chosen by the script: the challenge as it wrote it, and the
                // devices it chose from, remembered for the user's next sign-in.
                let (deliveries, devices) =
                    outcome[1..].split_first().ok_or_else(|| corrupt("a chosen create without its deliveries"))?;
                challenge.deliveries = decode(deliveries)?;
                self.watchers.chosen(&challenge);
                interest.keep();
                let devices = self.remember_devices(&tag, &challenge.tenant, &challenge.user_id, devices)?;
                return Ok(CreateFor::Chose(challenge, devices));
            }
            Some("devices_changed") => {
                if cluster {
                    let _: () = self.connection.query(redis::cmd("DEL").arg(&index)).await?;
                }
                let devices = self.remember_devices(&tag, &challenge.tenant, &challenge.user_id, &outcome[1..])?;
                return Ok(CreateFor::DevicesChanged(devices));
            }
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
        if cluster {
            let _: () = self.connection.query(redis::cmd("DEL").arg(&index)).await?;
        }
        Ok(CreateFor::Done(result))
    }
}

#[cfg(test)]
mod tests {
    use super::super::keys::{Keys, user_tag};
    use super::super::testing::RedisServer;
    use super::super::tests::store_on;
    use super::split_at_deliveries;
    use crate::domain::challenge::PushRoom;
    use crate::domain::ids::UserId;
    use crate::domain::time::{Clock as _, ManualClock};
    use crate::store::PushesFrom;
    use crate::store::conformance::{Scope, enrolled_device, policy, sample_challenge};

    /// A device of a platform this replica does not know (a newer replica wrote
    /// it) stops the script's choice before anything is written: the replica,
    /// which cannot read the record, fails the create instead of leaving a
    /// challenge it never pushed.
    #[tokio::test]
    async fn a_device_of_an_unknown_platform_stops_the_choice_before_the_write() {
        let url = RedisServer::shared().await;
        let clock = ManualClock::starting_now();
        let store = store_on(vec![url.to_owned()], clock.clone()).await;
        let (tenant, user) = (Scope::unique().tenant("a"), UserId::parse("u").expect("user"));
        let now = clock.now();
        let device = enrolled_device(&store, &tenant, &user, now).await;
        let key = Keys(&user_tag(&tenant, &user)).device(device.id.as_str());
        let client = redis::Client::open(url).expect("url");
        let mut raw = client.get_multiplexed_async_connection().await.expect("connect");
        let record: String = redis::cmd("GET").arg(&key).query_async(&mut raw).await.expect("get");
        // Not pushed (pushes off), but a device that answers: the choice writes
        // for it unless the platform stops it.
        let newer = record
            .replace(r#""platform":"Fcm""#, r#""platform":"Pager""#)
            .replace(r#""push_enabled":true"#, r#""push_enabled":false"#);
        assert!(newer.contains("Pager") && newer.contains(r#""push_enabled":false"#), "{newer}");
        let _: () = redis::cmd("SET").arg(&key).arg(&newer).query_async(&mut raw).await.expect("set");

        let challenge = sample_challenge(&tenant, &user, now, None);
        let id = challenge.id.clone();
        let created = store.create_for(challenge, &policy(), now, PushesFrom::Store(PushRoom([10; 3]))).await;
        assert!(created.is_err(), "{created:?}");
        assert_eq!(store.get_challenge(&tenant, &id, now).await.expect("get"), None, "nothing was written");
    }

    #[test]
    fn a_challenge_is_cut_where_its_deliveries_go() {
        let json = r#"{"id":"a","deliveries":[],"request_id":null}"#;
        assert_eq!(split_at_deliveries(json), Some((r#"{"id":"a","deliveries":["#, r#"],"request_id":null}"#)));
        assert_eq!(split_at_deliveries(r#"{"deliveries":[{"device_id":"d"}]}"#), None, "not empty");
        assert_eq!(split_at_deliveries(r#"{"deliveries":[],"deliveries":[]}"#), None, "twice");
        assert_eq!(split_at_deliveries(r#"{"context":"\"deliveries\":[]"}"#), None, "inside a string, escaped");
    }
}
