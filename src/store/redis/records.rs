//! Durable records: enrollments and devices, with the caps on them (open
//! enrollments, devices per user) and the claim that lets a public key enroll once.
//! Records change by compare-and-set on their whole value.

use std::sync::Arc;

use super::RedisStore;
use super::connection::{corrupt, decode, encode};
use super::keys::{ENROLLMENT_KEEP, Keys, TTL_MARGIN, code_index, device_index, enrollment_index, public_key, ttl_ms, user_tag};
use crate::domain::device::Device;
use crate::domain::enrollment::{Enrollment, EnrollmentKind};
use crate::domain::ids::{CodeDigest, DeviceId, EnrollmentId, TenantId, UserId};
use crate::domain::time::Millis;
use crate::store::{ChallengeDevices, CompleteOutcome, EnrollmentLimits, InsertOutcome, StoreError};

/// What a device kept in memory weighs, from the size of its JSON record: its
/// strings (ids, names, token, key, sealed secret) take about as many bytes as
/// their text there, beside the struct itself.
fn weight(record_len: usize) -> usize {
    record_len + std::mem::size_of::<Device>()
}

/// The devices among `records` (JSON, as the user's slot holds them) that are
/// `tenant`'s `user`'s, oldest first: a tag shared by two users would not show one
/// user's devices to the other.
pub(super) fn user_devices(records: &[String], tenant: &TenantId, user: &UserId) -> Result<Vec<Device>, StoreError> {
    let mut devices: Vec<Device> = Vec::new();
    for record in records {
        let device: Device = decode(record)?;
        if device.tenant == *tenant && device.user_id == *user {
            devices.push(device);
        }
    }
    devices.sort_by(|a, b| a.enrolled_at.cmp(&b.enrolled_at).then_with(|| a.id.as_str().cmp(b.id.as_str())));
    Ok(devices)
}

/// Reads and compare-and-sets behind the trait methods below.
impl RedisStore {
    /// The device's key, its stored text and the device.
    /// The device's index is read once per replica: its owner never changes.
    async fn load_device(&self, id: &DeviceId) -> Result<Option<(String, String, Device)>, StoreError> {
        let tag = match self.device_tags.get(id) {
            Some(tag) => tag.to_string(),
            // On one Redis the index and the record are read in one call.
            None if !self.connection.is_cluster() => {
                let reply: Vec<String> =
                    self.connection.invoke(self.scripts.device.key(device_index(id)).arg(id.as_str())).await?;
                let Some(tag) = reply.first() else { return Ok(None) };
                self.device_tags.put(id, Arc::from(tag.as_str()));
                let Some(text) = reply.get(1) else { return Ok(None) };
                return Ok(Some((Keys(tag).device(id.as_str()), text.clone(), decode(text)?)));
            }
            None => {
                let tag: Option<String> = self.connection.query(redis::cmd("GET").arg(device_index(id))).await?;
                let Some(tag) = tag else { return Ok(None) };
                self.device_tags.put(id, Arc::from(tag.as_str()));
                tag
            }
        };
        let key = Keys(&tag).device(id.as_str());
        let text: Option<String> = self.connection.query(redis::cmd("GET").arg(&key)).await?;
        match text {
            Some(text) => Ok(Some((key, text.clone(), decode(&text)?))),
            None => Ok(None),
        }
    }

    /// Writes `updated` over the device at `key` if it still reads `current`.
    async fn compare_and_set_device(&self, key: &str, current: &str, updated: &Device) -> Result<bool, StoreError> {
        let set: i64 = self.connection.invoke(self.scripts.value_cas.key(key).arg(current).arg(encode(updated)?)).await?;
        Ok(set == 1)
    }

    /// Read-modify-write of a device by compare-and-set; `change` returns `None` to
    /// leave it as it is. Returns whether the device exists.
    async fn update_device(&self, id: &DeviceId, change: impl Fn(&Device) -> Option<Device>) -> Result<bool, StoreError> {
        loop {
            let Some((key, current, device)) = self.load_device(id).await? else { return Ok(false) };
            let Some(updated) = change(&device) else { return Ok(true) };
            if self.compare_and_set_device(&key, &current, &updated).await? {
                return Ok(true);
            }
        }
    }

    /// The enrollment's user tag, its stored text and the enrollment.
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

    /// Spends a pending enrollment of `kind` and adds `device` (`enroll.lua`): the
    /// script re-checks the enrollment by compare-and-set, the user's device cap and
    /// the key's claim, and spends nothing and adds nothing unless it completes.
    ///
    /// A public key enrolls once, for any user, but its claim `pm:pubkey:<hex>`
    /// lives in a slot of its own, so it is a step before the script: `SET NX` names
    /// this device; when the script then refuses, the claim is released by
    /// compare-and-delete (`release.lua`). That is safe because a device with a key
    /// is only ever added while its completion holds the key's claim, and a claim
    /// goes only when no device was added with it (a refusal) or after its device
    /// was removed (`remove_device`): a key never names two devices. What can go
    /// wrong between the steps fails closed: a crash, or an error that leaves open
    /// whether the script ran, keeps the claim, and the key is refused (KeyInUse)
    /// until an operator deletes the claim; the code is not spent by a refusal.
    async fn spend_enrollment(
        &self,
        id: &EnrollmentId,
        expected_tenant: Option<&TenantId>,
        kind: EnrollmentKind,
        device: Device,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError> {
        let claim = device.public_key.as_ref().and_then(|key| key.fingerprint().ok()).map(|f| public_key(&f));
        // Whether this call holds `claim` (None: not tried yet).
        let mut claimed: Option<bool> = None;
        let mut indexed = false;
        let outcome = loop {
            let Some((tag, current, enrollment)) = self.load_enrollment(id).await? else {
                break CompleteOutcome::UnknownCode;
            };
            if enrollment.kind != kind || expected_tenant.is_some_and(|t| *t != enrollment.tenant) {
                break CompleteOutcome::UnknownCode;
            }
            if enrollment.completed {
                break CompleteOutcome::AlreadyUsed;
            }
            if now >= enrollment.expires_at {
                break CompleteOutcome::Expired;
            }
            if let (Some(key), None) = (&claim, claimed) {
                let set: Option<String> =
                    self.connection.query(redis::cmd("SET").arg(key).arg(device.id.as_str()).arg("NX")).await?;
                claimed = Some(set.is_some());
            }
            let key_in_use = claimed == Some(false);
            let mut completed = Enrollment { completed: true, device_id: Some(device.id.clone()), ..enrollment };
            if kind == EnrollmentKind::Totp {
                completed.totp_secret = None;
            }
            let keys = Keys(&tag);
            // The index goes first, so a device is never without one; a refusal removes it.
            if !indexed {
                let _: () = self.connection.query(redis::cmd("SET").arg(device_index(&device.id)).arg(&tag)).await?;
                indexed = true;
            }
            let record = encode(&device)?;
            let answer: String = self
                .connection
                .invoke(
                    self.scripts
                        .enroll
                        .key(keys.enrollment(id.as_str()))
                        .key(keys.device(device.id.as_str()))
                        .key(keys.devices())
                        .key(keys.open_enrollments())
                        .arg(&current)
                        .arg(encode(&completed)?)
                        .arg(&record)
                        .arg(device.id.as_str())
                        .arg(id.as_str())
                        .arg(limits.max_devices)
                        .arg(if key_in_use { "1" } else { "0" })
                        .arg(keys.device_prefix()),
                )
                .await?;
            match answer.as_str() {
                "completed" => {
                    // The phone's first answer (often the IdP's test sign-in right
                    // after setup, on the same connection) finds it here without a
                    // read: this is the record just written, and a device's id, owner
                    // and key never change (`answering_device`).
                    // A TOTP-only device signs nothing, so it is not kept.
                    if device.public_key.is_some() {
                        let id = device.id.clone();
                        self.answering.put_sized(&id, Arc::new(device), weight(record.len()));
                    }
                    return Ok(CompleteOutcome::Completed(Box::new(completed)));
                }
                "changed" => continue,
                "too_many_devices" => break CompleteOutcome::TooManyDevices { limit: limits.max_devices },
                "key_in_use" => break CompleteOutcome::KeyInUse,
                other => return Err(corrupt(format!("unexpected enroll answer {other:?}"))),
            }
        };
        // Refused: nothing was added, so what this call set up goes again.
        if let (Some(key), Some(true)) = (&claim, claimed) {
            let _: i64 = self.connection.invoke(self.scripts.release.key(key).arg(device.id.as_str())).await?;
        }
        if indexed {
            let _: () = self.connection.query(redis::cmd("DEL").arg(device_index(&device.id))).await?;
        }
        Ok(outcome)
    }
}

/// The durable half of [`crate::store::Store`] (the trait impl in `mod.rs` calls these).
impl RedisStore {
    /// The global indexes first (other slots), then the record within the user's
    /// cap on open enrollments (`insert_enrollment.lua`); a refusal removes the
    /// indexes again (a fresh id and code: no one else's).
    pub(super) async fn insert_enrollment(
        &self,
        enrollment: Enrollment,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<InsertOutcome, StoreError> {
        let tag = user_tag(&enrollment.tenant, &enrollment.user_id);
        let keys = Keys(&tag);
        let ttl = ttl_ms(enrollment.created_at, enrollment.expires_at.plus(ENROLLMENT_KEEP));
        let index = redis::cmd("SET").arg(enrollment_index(&enrollment.id)).arg(&tag).arg("PX").arg(ttl).clone();
        let code = enrollment.code_digest.as_ref().map(|code| {
            redis::cmd("SET").arg(code_index(code)).arg(format!("{tag} {}", enrollment.id)).arg("PX").arg(ttl).clone()
        });
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
        let margin = i64::try_from(TTL_MARGIN.as_millis()).unwrap_or(i64::MAX);
        let inserted: i64 = self
            .connection
            .invoke(
                self.scripts
                    .insert_enrollment
                    .key(keys.enrollment(enrollment.id.as_str()))
                    .key(keys.open_enrollments())
                    .arg(encode(&enrollment)?)
                    .arg(enrollment.id.as_str())
                    .arg(now.0)
                    .arg(enrollment.expires_at.0)
                    .arg(ttl)
                    .arg(limits.max_open_enrollments)
                    .arg(keys.enrollment_prefix())
                    .arg(margin),
            )
            .await?;
        if inserted == 1 {
            return Ok(InsertOutcome::Inserted);
        }
        let _: () = self.connection.query(redis::cmd("DEL").arg(enrollment_index(&enrollment.id))).await?;
        if let Some(code) = &enrollment.code_digest {
            let _: () = self.connection.query(redis::cmd("DEL").arg(code_index(code))).await?;
        }
        Ok(InsertOutcome::TooManyOpen { limit: limits.max_open_enrollments })
    }

    pub(super) async fn get_enrollment(&self, tenant: &TenantId, id: &EnrollmentId) -> Result<Option<Enrollment>, StoreError> {
        Ok(self.load_enrollment(id).await?.map(|(_, _, e)| e).filter(|e| e.tenant == *tenant))
    }

    pub(super) async fn enrollment_by_code(&self, code: &CodeDigest) -> Result<Option<Enrollment>, StoreError> {
        let found: Option<String> = self.connection.query(redis::cmd("GET").arg(code_index(code))).await?;
        let Some(id) = found.as_deref().and_then(|value| value.split_once(' ')).map(|(_, id)| id.to_owned()) else {
            return Ok(None);
        };
        let id = EnrollmentId::parse(&id).map_err(corrupt)?;
        Ok(self.load_enrollment(&id).await?.map(|(_, _, e)| e))
    }

    pub(super) async fn complete_enrollment(
        &self,
        code: &CodeDigest,
        device: Device,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError> {
        let Some(enrollment) = self.enrollment_by_code(code).await? else { return Ok(CompleteOutcome::UnknownCode) };
        self.spend_enrollment(&enrollment.id, None, EnrollmentKind::Push, device, limits, now).await
    }

    pub(super) async fn get_device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        Ok(self.load_device(id).await?.map(|(_, _, device)| device))
    }

    pub(super) async fn list_devices(&self, tenant: &TenantId, user: &UserId) -> Result<Vec<Device>, StoreError> {
        Ok(self.read_user_devices(tenant, user).await?.devices)
    }

    /// The user's devices and their fingerprint, as Redis holds them now.
    pub(super) async fn read_user_devices(&self, tenant: &TenantId, user: &UserId) -> Result<ChallengeDevices, StoreError> {
        let tag = user_tag(tenant, user);
        let keys = Keys(&tag);
        let reply: Vec<String> =
            self.connection.invoke(self.scripts.devices.key(keys.devices()).arg(keys.device_prefix())).await?;
        self.remember_devices(&tag, tenant, user, &reply)
    }

    /// The user's devices from `reply` (their fingerprint, then their records, as
    /// `devices.lua` and `create.lua` answer), remembered for the next challenge
    /// when one of them can answer. A user without one is never answered from
    /// memory: the refusal that follows is always read fresh.
    pub(super) fn remember_devices(
        &self,
        tag: &str,
        tenant: &TenantId,
        user: &UserId,
        reply: &[String],
    ) -> Result<ChallengeDevices, StoreError> {
        let (seen, records) = reply.split_first().ok_or_else(|| corrupt("devices without their fingerprint"))?;
        let devices = user_devices(records, tenant, user)?;
        let tag = tag.to_owned();
        if devices.iter().any(Device::answers_challenges) {
            let bytes = records.iter().map(|record| weight(record.len())).sum();
            self.user_devices.put_sized(&tag, (Arc::from(seen.as_str()), Arc::new(devices.clone())), bytes);
        } else {
            self.user_devices.forget(&tag);
        }
        Ok(ChallengeDevices { devices, seen: Some(seen.clone()) })
    }

    /// The user's devices for a new challenge: as this replica read them last, if
    /// it did (`create.lua` checks their fingerprint in the same step as the
    /// insert); else `None`, and `create.lua` chooses the pushes from the devices
    /// as it reads them: one call, not a read and then a create.
    pub(super) fn challenge_devices(&self, tenant: &TenantId, user: &UserId) -> Option<ChallengeDevices> {
        let (seen, devices) = self.user_devices.get(&user_tag(tenant, user))?;
        // The tag is a digest of the tenant and user; a list is only ever theirs.
        devices
            .iter()
            .all(|device| device.tenant == *tenant && device.user_id == *user)
            .then(|| ChallengeDevices { devices: devices.as_ref().clone(), seen: Some(seen.to_string()) })
    }

    /// The device whose proof an answer carries: as this replica read it last, if
    /// it did. Its id, owner and key never change; `answer.lua` checks that it is
    /// still enrolled, and a removal forgets it here.
    pub(super) async fn answering_device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        if let Some(device) = self.answering.get(id) {
            return Ok(Some(device.as_ref().clone()));
        }
        let device = self.get_device(id).await?;
        if let Some(device) = &device {
            // A device that does not encode again is not kept (it weighs too much).
            let bytes = encode(device).map_or(usize::MAX, |json| weight(json.len()));
            self.answering.put_sized(id, Arc::new(device.clone()), bytes);
        }
        Ok(device)
    }

    pub(super) async fn remove_device(&self, tenant: &TenantId, id: &DeviceId) -> Result<bool, StoreError> {
        let Some((key, _, device)) = self.load_device(id).await? else { return Ok(false) };
        if device.tenant != *tenant {
            return Ok(false);
        }
        self.answering.forget(id);
        let tag = user_tag(&device.tenant, &device.user_id);
        let _: () = self.connection.query(redis::cmd("DEL").arg(&key)).await?;
        let _: () = self.connection.query(redis::cmd("SREM").arg(Keys(&tag).devices()).arg(id.as_str())).await?;
        // The key's claim goes after the device, so the key never names two devices
        // (see `spend_enrollment`); compare-and-delete, so a repeated removal never
        // frees a claim that a later enrollment holds.
        if let Some(fingerprint) = device.public_key.as_ref().and_then(|key| key.fingerprint().ok()) {
            let _: i64 = self.connection.invoke(self.scripts.release.key(public_key(&fingerprint)).arg(id.as_str())).await?;
        }
        let _: () = self.connection.query(redis::cmd("DEL").arg(device_index(id))).await?;
        Ok(true)
    }

    pub(super) async fn set_push_token(&self, id: &DeviceId, token: &str) -> Result<bool, StoreError> {
        self.update_device(id, |device| {
            Some(Device { push_token: token.to_owned(), push_enabled: !token.is_empty(), ..device.clone() })
        })
        .await
    }

    pub(super) async fn disable_push(&self, id: &DeviceId, token: &str) -> Result<(), StoreError> {
        self.update_device(id, |device| {
            (device.push_token == token && device.push_enabled).then(|| Device { push_enabled: false, ..device.clone() })
        })
        .await
        .map(drop)
    }

    pub(super) async fn touch_device(&self, id: &DeviceId, now: Millis) -> Result<(), StoreError> {
        self.update_device(id, |device| Some(Device { last_used_at: Some(now), ..device.clone() })).await.map(drop)
    }

    pub(super) async fn confirm_totp_enrollment(
        &self,
        tenant: &TenantId,
        id: &EnrollmentId,
        device: Device,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError> {
        self.spend_enrollment(id, Some(tenant), EnrollmentKind::Totp, device, limits, now).await
    }

    pub(super) async fn spend_totp_step(&self, id: &DeviceId, step: u64) -> Result<bool, StoreError> {
        loop {
            let Some((key, current, device)) = self.load_device(id).await? else { return Ok(false) };
            if device.totp_last_step.is_some_and(|last| last >= step) {
                return Ok(false);
            }
            let updated = Device { totp_last_step: Some(step), ..device };
            if self.compare_and_set_device(&key, &current, &updated).await? {
                return Ok(true);
            }
        }
    }
}

/// What the conformance suite cannot see: the claims and indexes behind the caps.
#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::super::RedisStore;
    use super::super::keys::{Keys, public_key, user_tag};
    use super::super::testing::{RedisCluster, RedisServer};
    use super::super::tests::store_on;
    use crate::domain::device::Device;
    use crate::domain::ids::UserId;
    use crate::domain::time::{Clock, ManualClock};
    use crate::store::conformance::{Scope, sample_device, sample_enrollment};
    use crate::store::{CompleteOutcome, EnrollmentLimits, InsertOutcome};

    async fn holder(store: &RedisStore, device: &Device) -> Option<String> {
        let fingerprint = device.public_key.as_ref().expect("a key").fingerprint().expect("fingerprint");
        store.connection.query(redis::cmd("GET").arg(public_key(&fingerprint))).await.expect("get")
    }

    /// A completion refused for the user's cap leaves the key free; a completed one
    /// holds it until its device is removed.
    async fn refusals_release_the_key_claim(store: RedisStore) {
        let clock = ManualClock::starting_now();
        let now = clock.now();
        let scope = Scope::unique();
        let tenant = scope.tenant("a");
        let (full, other) = (UserId::parse("full").expect("user"), UserId::parse("other").expect("user"));
        let one = EnrollmentLimits { max_devices: 1, max_open_enrollments: 5 };
        let first = sample_enrollment(&tenant, &full, now);
        store.insert_enrollment(first.clone(), &one, now).await.expect("insert");
        let owned = sample_device(&tenant, &full, now);
        let code = first.code_digest.as_ref().expect("code");
        assert!(matches!(
            store.complete_enrollment(code, owned.clone(), &one, now).await.expect("complete"),
            CompleteOutcome::Completed(_)
        ));
        assert_eq!(holder(&store, &owned).await.as_deref(), Some(owned.id.as_str()));

        let second = sample_enrollment(&tenant, &full, now);
        store.insert_enrollment(second.clone(), &one, now).await.expect("insert");
        let refused = sample_device(&tenant, &full, now);
        let code = second.code_digest.as_ref().expect("code");
        assert_eq!(
            store.complete_enrollment(code, refused.clone(), &one, now).await.expect("complete"),
            CompleteOutcome::TooManyDevices { limit: 1 }
        );
        assert_eq!(holder(&store, &refused).await, None, "the refused device's key is free");
        let index: Option<String> =
            store.connection.query(redis::cmd("GET").arg(format!("pm:didx:{}", refused.id))).await.expect("get");
        assert_eq!(index, None, "and so is its id");

        // Another user enrolls that key.
        let theirs = sample_enrollment(&tenant, &other, now);
        store.insert_enrollment(theirs.clone(), &one, now).await.expect("insert");
        let same_key = Device { public_key: refused.public_key.clone(), ..sample_device(&tenant, &other, now) };
        let code = theirs.code_digest.as_ref().expect("code");
        assert!(matches!(
            store.complete_enrollment(code, same_key.clone(), &one, now).await.expect("complete"),
            CompleteOutcome::Completed(_)
        ));
        assert_eq!(holder(&store, &same_key).await.as_deref(), Some(same_key.id.as_str()));

        assert!(store.remove_device(&tenant, &owned.id).await.expect("remove"));
        assert_eq!(holder(&store, &owned).await, None, "a removed device frees its key");
    }

    #[tokio::test]
    async fn refusals_release_the_key_claim_on_a_single_node() {
        let store = store_on(vec![RedisServer::shared().await.to_owned()], ManualClock::starting_now()).await;
        refusals_release_the_key_claim(store).await;
    }

    #[tokio::test]
    async fn refusals_release_the_key_claim_on_a_cluster() {
        let store = store_on(RedisCluster::shared().await.to_vec(), ManualClock::starting_now()).await;
        refusals_release_the_key_claim(store).await;
    }

    /// The index of open enrollments holds the open ones only, and goes with the
    /// latest expiry; a refused insert leaves no trace.
    #[tokio::test]
    async fn the_open_enrollment_index_stays_bounded() {
        let clock = ManualClock::starting_now();
        let store = store_on(vec![RedisServer::shared().await.to_owned()], clock.clone()).await;
        let now = clock.now();
        let (tenant, user) = (Scope::unique().tenant("a"), UserId::parse("u").expect("user"));
        let tag = user_tag(&tenant, &user);
        let index = Keys(&tag).open_enrollments();
        let two = EnrollmentLimits { max_devices: 10, max_open_enrollments: 2 };
        let first = sample_enrollment(&tenant, &user, now);
        for enrollment in [first.clone(), sample_enrollment(&tenant, &user, now)] {
            assert_eq!(store.insert_enrollment(enrollment, &two, now).await.expect("insert"), InsertOutcome::Inserted);
        }
        let refused = sample_enrollment(&tenant, &user, now);
        assert_eq!(
            store.insert_enrollment(refused.clone(), &two, now).await.expect("insert"),
            InsertOutcome::TooManyOpen { limit: 2 }
        );
        let code = refused.code_digest.as_ref().expect("code");
        assert_eq!(store.enrollment_by_code(code).await.expect("by code"), None, "no code index for a refused insert");
        let ttl: i64 = store.connection.query(redis::cmd("PTTL").arg(&index)).await.expect("pttl");
        assert!(ttl > 600_000 && ttl <= 660_000, "{ttl}");

        let code = first.code_digest.as_ref().expect("code");
        let device = sample_device(&tenant, &user, now);
        assert!(matches!(
            store.complete_enrollment(code, device, &two, now).await.expect("complete"),
            CompleteOutcome::Completed(_)
        ));
        let open: Vec<String> = store.connection.query(redis::cmd("ZRANGE").arg(&index).arg(0).arg(-1)).await.expect("zrange");
        assert_eq!(open.len(), 1, "a completed enrollment leaves the index: {open:?}");
    }
}
