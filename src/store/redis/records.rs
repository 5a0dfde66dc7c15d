//! Durable records: enrollments and devices, with the caps on them (open
//! enrollments, devices per user) and the claim that lets a public key enroll once.
//! Records change by compare-and-set on their whole value.

use super::RedisStore;
use super::connection::{corrupt, decode, encode};
use super::keys::{ENROLLMENT_KEEP, Keys, TTL_MARGIN, code_index, device_index, enrollment_index, public_key, ttl_ms, user_tag};
use crate::domain::device::Device;
use crate::domain::enrollment::{Enrollment, EnrollmentKind};
use crate::domain::ids::{CodeDigest, DeviceId, EnrollmentId, TenantId, UserId};
use crate::domain::time::Millis;
use crate::store::{CompleteOutcome, EnrollmentLimits, InsertOutcome, StoreError};

/// Reads and compare-and-sets behind the trait methods below.
impl RedisStore {
    /// The device's key, its stored text and the device.
    async fn load_device(&self, id: &DeviceId) -> Result<Option<(String, String, Device)>, StoreError> {
        let tag: Option<String> = self.connection.query(redis::cmd("GET").arg(device_index(id))).await?;
        let Some(tag) = tag else { return Ok(None) };
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
                        .arg(encode(&device)?)
                        .arg(device.id.as_str())
                        .arg(id.as_str())
                        .arg(limits.max_devices)
                        .arg(if key_in_use { "1" } else { "0" })
                        .arg(keys.device_prefix()),
                )
                .await?;
            match answer.as_str() {
                "completed" => return Ok(CompleteOutcome::Completed(Box::new(completed))),
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

    pub(super) async fn remove_device(&self, tenant: &TenantId, id: &DeviceId) -> Result<bool, StoreError> {
        let Some((key, _, device)) = self.load_device(id).await? else { return Ok(false) };
        if device.tenant != *tenant {
            return Ok(false);
        }
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
