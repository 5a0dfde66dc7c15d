//! Durable records and counters: enrollments, devices, blocks, strikes and TOTP.
//! Records change by compare-and-set on their whole value.

use serde::de::DeserializeOwned;

use super::RedisStore;
use super::connection::{corrupt, decode, encode};
use super::keys::{ENROLLMENT_KEEP, Keys, TTL_MARGIN, code_index, device_index, enrollment_index, ttl_ms, user_tag};
use crate::domain::device::Device;
use crate::domain::enrollment::{Enrollment, EnrollmentKind};
use crate::domain::ids::{CodeDigest, DeviceId, EnrollmentId, TenantId, UserId, os_random};
use crate::domain::time::Millis;
use crate::store::{BlockReason, CompleteOutcome, StoreError, StrikePolicy, UserBlock};

/// Reads and compare-and-sets behind the trait methods below.
impl RedisStore {
    /// Reads a string key holding JSON.
    async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let text: Option<String> = self.connection.query(redis::cmd("GET").arg(key)).await?;
        text.map(|t| decode(&t)).transpose()
    }

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

    /// Counts a strike at `key`; true when it is the policy's limit-th in its window.
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

/// The durable half of [`crate::store::Store`] (the trait impl in `mod.rs` calls these).
impl RedisStore {
    pub(super) async fn insert_enrollment(&self, enrollment: Enrollment) -> Result<(), StoreError> {
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
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError> {
        let Some(enrollment) = self.enrollment_by_code(code).await? else { return Ok(CompleteOutcome::UnknownCode) };
        self.spend_enrollment(&enrollment.id, None, EnrollmentKind::Push, device, now).await
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

    pub(super) async fn block_user(&self, tenant: &TenantId, user: &UserId, block: UserBlock) -> Result<(), StoreError> {
        let tag = user_tag(tenant, user);
        self.connection.query(redis::cmd("SET").arg(Keys(&tag).block()).arg(encode(&block)?)).await
    }

    pub(super) async fn record_wrong_number(
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

    pub(super) async fn unblock_user(&self, tenant: &TenantId, user: &UserId) -> Result<(), StoreError> {
        let tag = user_tag(tenant, user);
        let keys = Keys(&tag);
        self.connection.query(redis::cmd("DEL").arg(keys.block()).arg(keys.wrong())).await
    }

    pub(super) async fn user_block(
        &self,
        tenant: &TenantId,
        user: &UserId,
        now: Millis,
    ) -> Result<Option<UserBlock>, StoreError> {
        let tag = user_tag(tenant, user);
        let block: Option<UserBlock> = self.get_json(&Keys(&tag).block()).await?;
        Ok(block.filter(|b| b.in_force(now)))
    }

    pub(super) async fn confirm_totp_enrollment(
        &self,
        tenant: &TenantId,
        id: &EnrollmentId,
        device: Device,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError> {
        self.spend_enrollment(id, Some(tenant), EnrollmentKind::Totp, device, now).await
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

    pub(super) async fn record_totp_failure(
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

    pub(super) async fn totp_locked_until(
        &self,
        tenant: &TenantId,
        user: &UserId,
        now: Millis,
    ) -> Result<Option<Millis>, StoreError> {
        let tag = user_tag(tenant, user);
        let until: Option<i64> = self.connection.query(redis::cmd("GET").arg(Keys(&tag).totp_lock())).await?;
        Ok(until.map(Millis).filter(|until| now < *until))
    }
}
