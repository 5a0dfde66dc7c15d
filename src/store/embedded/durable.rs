//! The durable half of the embedded store: devices, enrollments and user blocks in
//! redb tables, mirrored in memory ([`DurableMirror`]). Every change is a
//! [`DurableWrite`], committed to the file before the mirror shows it; a device's
//! `last_used_at` alone reaches the file later, in batches (`touches.rs`), into
//! a table of its own (`DEVICE_LAST_USED`).

use std::collections::HashMap;
use std::sync::Arc;

use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use super::device_record::DeviceRecord;
use super::writer::EnrollmentOp;
use super::{BACKEND, Shared, UserKey, io_error};
use crate::domain::device::{Device, KeyFingerprint};
use crate::domain::enrollment::{Enrollment, EnrollmentKind};
use crate::domain::ids::{CodeDigest, DeviceId, EnrollmentId, TenantId, UserId};
use crate::domain::time::Millis;
use crate::store::{CompleteOutcome, EnrollmentLimits, InsertOutcome, StoreError, UserBlock};

const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
pub(super) const ENROLLMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("enrollments");
/// Enrollment code digest -> enrollment id.
pub(super) const ENROLLMENT_CODES: TableDefinition<&str, &str> = TableDefinition::new("enrollment_codes");
/// "tenant\0user" -> block.
const BLOCKS: TableDefinition<&str, &[u8]> = TableDefinition::new("blocks");
/// "tenant\0user" -> since (Unix ms): VerifyTotp locked until UnblockUser, after
/// too many wrong codes in a row. Durable, so a restart does not hand out guesses.
const TOTP_LOCKS: TableDefinition<&str, i64> = TableDefinition::new("totp_locks");
/// Device id -> its last use (Unix ms), as the touch flushes write it. A table of
/// its own so that a flush rewrites 8 bytes a device, about 80 to a page, not the
/// device's whole record (some 500 bytes of JSON, 8 to a page): at 1,000 sign-ins
/// a second the record rewrites cost about 5 page reads and writes a sign-in
/// (BENCHMARKS.md). A device's record keeps the `last_used_at` it had when it was
/// last written; loading takes the later of the two.
const DEVICE_LAST_USED: TableDefinition<&str, i64> = TableDefinition::new("device_last_used");

/// How long an enrollment stays readable (GetEnrollment) after its expiry, as in
/// the Redis store; then it is purged.
pub(super) const ENROLLMENT_KEEP: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

fn block_key(tenant: &TenantId, user: &UserId) -> String {
    format!("{}\0{}", tenant.0, user.as_str())
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::corrupt(BACKEND, e))
}

pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::corrupt(BACKEND, e))
}

/// The durable records, mirrored in memory.
#[derive(Default)]
pub(super) struct DurableMirror {
    /// Each device as one record, its last use and then postcard ([`DeviceRecord`]:
    /// a few hundred bytes, against some 700 as a struct whose dozen strings and vectors
    /// are each an allocation of their own): memory per enrolled phone is what a
    /// rollout to a whole company grows with.
    devices: HashMap<DeviceId, DeviceRecord>,
    user_devices: HashMap<UserKey, Vec<DeviceId>>,
    pub(super) enrollments: HashMap<EnrollmentId, Enrollment>,
    /// Each user's enrollments, so that counting a user's open ones (every
    /// BeginEnrollment) reads that user's, not every enrollment of every user.
    user_enrollments: HashMap<UserKey, Vec<EnrollmentId>>,
    codes: HashMap<CodeDigest, EnrollmentId>,
    /// Every device key's fingerprint: a key enrolls once.
    keys: HashMap<KeyFingerprint, DeviceId>,
    pub(super) blocks: HashMap<UserKey, UserBlock>,
    pub(super) totp_locks: HashMap<UserKey, Millis>,
}

impl DurableMirror {
    /// The device `id`, decoded.
    pub(super) fn device(&self, id: &DeviceId) -> Option<Device> {
        self.devices.get(id).and_then(DeviceRecord::unpack)
    }

    /// The device's last use, without decoding the rest of it.
    pub(super) fn last_used(&self, id: &DeviceId) -> Option<Millis> {
        self.devices.get(id).and_then(DeviceRecord::last_used)
    }

    /// Every device, decoded (operators' commands).
    pub(super) fn all_devices(&self) -> impl Iterator<Item = Device> + '_ {
        self.devices.values().filter_map(DeviceRecord::unpack)
    }

    fn put_device(&mut self, device: Device) {
        let mut record = match DeviceRecord::pack(&device) {
            Ok(record) => record,
            Err(error) => {
                tracing::error!(%error, "a device could not be encoded for the mirror");
                return;
            }
        };
        // A device read before an answer touched it and written after (a token
        // update, say) keeps the answer's last use.
        if let Some(known) = self.last_used(&device.id) {
            record.keep_later(known);
        }
        let ids = self.user_devices.entry((device.tenant.clone(), device.user_id.clone())).or_default();
        if !ids.contains(&device.id) {
            ids.push(device.id.clone());
        }
        if let Some(fingerprint) = device.public_key.as_ref().and_then(|key| key.fingerprint().ok()) {
            self.keys.insert(fingerprint, device.id.clone());
        }
        self.devices.insert(device.id.clone(), record);
    }

    /// Takes a last use from `DEVICE_LAST_USED` when it is later than the record's.
    fn used(&mut self, id: &DeviceId, at: Millis) {
        if let Some(record) = self.devices.get_mut(id) {
            record.keep_later(at);
        }
    }

    fn remove_enrollment(&mut self, id: &EnrollmentId) {
        let Some(enrollment) = self.enrollments.remove(id) else { return };
        if let Some(digest) = &enrollment.code_digest {
            self.codes.remove(digest);
        }
        let key = (enrollment.tenant, enrollment.user_id);
        if let Some(ids) = self.user_enrollments.get_mut(&key) {
            ids.retain(|other| other != id);
            if ids.is_empty() {
                self.user_enrollments.remove(&key);
            }
        }
    }

    pub(super) fn device_count(&self, tenant: &TenantId, user: &UserId) -> usize {
        self.user_devices.get(&(tenant.clone(), user.clone())).map_or(0, Vec::len)
    }

    /// The ids of the user's enrollments (open or not).
    pub(super) fn enrollment_ids_of(&self, tenant: &TenantId, user: &UserId) -> impl Iterator<Item = &EnrollmentId> {
        self.user_enrollments.get(&(tenant.clone(), user.clone())).into_iter().flatten()
    }

    pub(super) fn enrollment_id_by_code(&self, code: &CodeDigest) -> Option<&EnrollmentId> {
        self.codes.get(code)
    }

    /// Whether a device holds the key of this fingerprint (a key enrolls once).
    pub(super) fn key_in_use(&self, fingerprint: &KeyFingerprint) -> bool {
        self.keys.contains_key(fingerprint)
    }

    /// How many records the mirror holds (each also a row in the file).
    pub(super) fn record_count(&self) -> usize {
        self.devices.len() + self.enrollments.len() + self.codes.len() + self.blocks.len() + self.totp_locks.len()
    }

    fn put_enrollment(&mut self, enrollment: Enrollment) {
        if let Some(digest) = &enrollment.code_digest {
            self.codes.insert(digest.clone(), enrollment.id.clone());
        }
        let ids = self.user_enrollments.entry((enrollment.tenant.clone(), enrollment.user_id.clone())).or_default();
        if !ids.contains(&enrollment.id) {
            ids.push(enrollment.id.clone());
        }
        self.enrollments.insert(enrollment.id.clone(), enrollment);
    }

    fn remove_device(&mut self, id: &DeviceId) {
        if let Some(device) = self.devices.remove(id).and_then(|record| record.unpack()) {
            if let Some(fingerprint) = device.public_key.as_ref().and_then(|key| key.fingerprint().ok()) {
                self.keys.remove(&fingerprint);
            }
            let key = (device.tenant, device.user_id);
            if let Some(ids) = self.user_devices.get_mut(&key) {
                ids.retain(|other| other != id);
                if ids.is_empty() {
                    self.user_devices.remove(&key);
                }
            }
        }
    }

    /// Mirrors a write that is committed to the file.
    fn apply(&mut self, write: DurableWrite) {
        match write {
            DurableWrite::PutDevice(device) => self.put_device(device),
            DurableWrite::RemoveDevice(id) => self.remove_device(&id),
            // A completed enrollment leaves the mirror: it is read from the file
            // when asked (`finished.rs`).
            DurableWrite::PutEnrollment(enrollment) if enrollment.completed => self.remove_enrollment(&enrollment.id),
            DurableWrite::PutEnrollment(enrollment) => self.put_enrollment(enrollment),
            DurableWrite::RemoveEnrollment(id) => self.remove_enrollment(&id),
            DurableWrite::PutBlock(key, block) => {
                self.blocks.insert(key, block);
            }
            DurableWrite::RemoveBlock(key) => {
                self.blocks.remove(&key);
            }
            DurableWrite::PutTotpLock(key, since) => {
                self.totp_locks.insert(key, since);
            }
            DurableWrite::RemoveTotpLock(key) => {
                self.totp_locks.remove(&key);
            }
            // The mirror took it when the device was touched.
            DurableWrite::DeviceUsed(..) => {}
        }
    }
}

/// One change to the durable half, written in one redb transaction.
pub(super) enum DurableWrite {
    PutDevice(Device),
    RemoveDevice(DeviceId),
    PutEnrollment(Enrollment),
    /// An enrollment past its keep time, with its code's index entry.
    RemoveEnrollment(EnrollmentId),
    PutBlock(UserKey, UserBlock),
    RemoveBlock(UserKey),
    PutTotpLock(UserKey, Millis),
    RemoveTotpLock(UserKey),
    /// A device's last use, already in the mirror (`Shared::touch_device`).
    DeviceUsed(DeviceId, Millis),
}

impl Shared {
    /// The open database, opening the file again if a failed write closed it.
    /// Callers hold `write_gate`, so no other commit holds the old one.
    async fn database(&self) -> Result<Arc<Database>, StoreError> {
        if let Some(db) = self.db.lock().as_ref() {
            return Ok(Arc::clone(db));
        }
        let path = self.path.clone();
        let db = Arc::new(tokio::task::spawn_blocking(move || super::open_database(&path)).await.map_err(io_error)??);
        tracing::info!("the embedded store's file is open again after a failed write");
        *self.db.lock() = Some(Arc::clone(&db));
        Ok(db)
    }

    /// Commits `writes` in one transaction on the blocking pool, then mirrors them.
    /// Callers hold `write_gate`. A write that fails for I/O (a full disk, say) is
    /// UNAVAILABLE and closes the file: redb refuses every later write on it, so
    /// the next commit opens it again (redb's recovery brings it back to the last
    /// commit), and writes succeed again once the disk has room, without a restart.
    pub(super) async fn commit(&self, writes: Vec<DurableWrite>, durability: Durability) -> Result<(), StoreError> {
        let db = self.database().await?;
        let result = Self::write(db, writes, durability).await;
        if let Err(StoreError::Unavailable { detail, .. }) = &result {
            tracing::warn!(error = %detail, "a durable write failed; the store's file will be opened again");
            // The last handle: dropping it closes the file (the blocking task has
            // returned, and callers hold `write_gate`).
            self.db.lock().take();
        }
        let writes = result?;
        let mut mirror = self.durable_mut();
        for write in writes {
            mirror.apply(write);
        }
        Ok(())
    }

    /// One redb transaction with `writes`, on the blocking pool.
    async fn write(
        db: Arc<Database>,
        writes: Vec<DurableWrite>,
        durability: Durability,
    ) -> Result<Vec<DurableWrite>, StoreError> {
        tokio::task::spawn_blocking(move || -> Result<Vec<DurableWrite>, StoreError> {
            let mut txn = db.begin_write().map_err(io_error)?;
            txn.set_durability(durability);
            {
                let mut devices = txn.open_table(DEVICES).map_err(io_error)?;
                let mut enrollments = txn.open_table(ENROLLMENTS).map_err(io_error)?;
                let mut codes = txn.open_table(ENROLLMENT_CODES).map_err(io_error)?;
                let mut blocks = txn.open_table(BLOCKS).map_err(io_error)?;
                let mut totp_locks = txn.open_table(TOTP_LOCKS).map_err(io_error)?;
                let mut last_used = txn.open_table(DEVICE_LAST_USED).map_err(io_error)?;
                for write in &writes {
                    match write {
                        DurableWrite::PutDevice(device) => {
                            devices.insert(device.id.to_string().as_str(), encode(device)?.as_slice()).map_err(io_error)?;
                        }
                        DurableWrite::RemoveDevice(id) => {
                            let id = id.to_string();
                            devices.remove(id.as_str()).map_err(io_error)?;
                            last_used.remove(id.as_str()).map_err(io_error)?;
                        }
                        DurableWrite::DeviceUsed(id, at) => {
                            last_used.insert(id.to_string().as_str(), at.0).map_err(io_error)?;
                        }
                        DurableWrite::PutEnrollment(enrollment) => {
                            let id = enrollment.id.to_string();
                            enrollments.insert(id.as_str(), encode(enrollment)?.as_slice()).map_err(io_error)?;
                            if let Some(digest) = &enrollment.code_digest {
                                codes.insert(digest.0.as_str(), id.as_str()).map_err(io_error)?;
                            }
                        }
                        DurableWrite::RemoveEnrollment(id) => {
                            let removed = enrollments.remove(id.to_string().as_str()).map_err(io_error)?;
                            if let Some(removed) = removed {
                                let enrollment: Enrollment = decode(removed.value())?;
                                if let Some(digest) = &enrollment.code_digest {
                                    codes.remove(digest.0.as_str()).map_err(io_error)?;
                                }
                            }
                        }
                        DurableWrite::PutTotpLock((tenant, user), since) => {
                            totp_locks.insert(block_key(tenant, user).as_str(), since.0).map_err(io_error)?;
                        }
                        DurableWrite::RemoveTotpLock((tenant, user)) => {
                            totp_locks.remove(block_key(tenant, user).as_str()).map_err(io_error)?;
                        }
                        DurableWrite::PutBlock((tenant, user), block) => {
                            blocks.insert(block_key(tenant, user).as_str(), encode(block)?.as_slice()).map_err(io_error)?;
                        }
                        DurableWrite::RemoveBlock((tenant, user)) => {
                            blocks.remove(block_key(tenant, user).as_str()).map_err(io_error)?;
                        }
                    }
                }
            }
            txn.commit().map_err(io_error)?;
            Ok(writes)
        })
        .await
        .map_err(io_error)?
    }
}

pub(super) fn load_mirror(db: &Database) -> Result<DurableMirror, StoreError> {
    // Create the tables on first open so that reads find them.
    let txn = db.begin_write().map_err(io_error)?;
    {
        txn.open_table(DEVICES).map_err(io_error)?;
        txn.open_table(ENROLLMENTS).map_err(io_error)?;
        txn.open_table(ENROLLMENT_CODES).map_err(io_error)?;
        txn.open_table(BLOCKS).map_err(io_error)?;
        txn.open_table(TOTP_LOCKS).map_err(io_error)?;
        txn.open_table(DEVICE_LAST_USED).map_err(io_error)?;
    }
    txn.commit().map_err(io_error)?;

    let mut mirror = DurableMirror::default();
    let txn = db.begin_read().map_err(io_error)?;
    for row in txn.open_table(DEVICES).map_err(io_error)?.iter().map_err(io_error)? {
        let (_, value) = row.map_err(io_error)?;
        mirror.put_device(decode(value.value())?);
    }
    for row in txn.open_table(DEVICE_LAST_USED).map_err(io_error)?.iter().map_err(io_error)? {
        let (id, at) = row.map_err(io_error)?;
        let id = DeviceId::parse(id.value()).map_err(|e| StoreError::corrupt(BACKEND, e))?;
        mirror.used(&id, Millis(at.value()));
    }
    for row in txn.open_table(ENROLLMENTS).map_err(io_error)?.iter().map_err(io_error)? {
        let (_, value) = row.map_err(io_error)?;
        let enrollment: Enrollment = decode(value.value())?;
        // Completed ones stay in the file only (`finished.rs`).
        if !enrollment.completed {
            mirror.put_enrollment(enrollment);
        }
    }
    for row in txn.open_table(BLOCKS).map_err(io_error)?.iter().map_err(io_error)? {
        let (key, value) = row.map_err(io_error)?;
        mirror.blocks.insert(user_key(key.value())?, decode(value.value())?);
    }
    for row in txn.open_table(TOTP_LOCKS).map_err(io_error)?.iter().map_err(io_error)? {
        let (key, since) = row.map_err(io_error)?;
        mirror.totp_locks.insert(user_key(key.value())?, Millis(since.value()));
    }
    Ok(mirror)
}

/// The user of a "tenant\0user" key.
fn user_key(key: &str) -> Result<UserKey, StoreError> {
    let Some((tenant, user)) = key.split_once('\0') else {
        return Err(StoreError::corrupt(BACKEND, "user key without separator"));
    };
    let user = UserId::parse(user).map_err(|e| StoreError::corrupt(BACKEND, e))?;
    Ok((TenantId(tenant.to_owned()), user))
}

/// The `Store` operations on devices, enrollments and blocks.
impl Shared {
    /// Decided and committed by the enrollment writer (`writer.rs`), grouped with
    /// the other enrollment writes waiting.
    pub(super) async fn insert_enrollment(
        &self,
        enrollment: Enrollment,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<InsertOutcome, StoreError> {
        let (answer, outcome) = oneshot::channel();
        self.enroll(EnrollmentOp::Insert { enrollment, limits: limits.clone(), now, answer }).await?;
        outcome.await.map_err(|_| io_error("the enrollment writer stopped"))?
    }

    async fn enroll(&self, op: EnrollmentOp) -> Result<(), StoreError> {
        self.enrollment_ops.send(op).await.map_err(|_| io_error("the enrollment writer stopped"))
    }

    /// Removes enrollments whose keep time has passed (in one commit).
    pub(super) async fn purge_enrollments(&self, now: Millis) -> Result<usize, StoreError> {
        let _gate = self.write_gate.lock().await;
        let old: Vec<DurableWrite> = self
            .durable()
            .enrollments
            .values()
            .filter(|e| now >= e.expires_at.plus(ENROLLMENT_KEEP))
            .map(|e| DurableWrite::RemoveEnrollment(e.id.clone()))
            .collect();
        let count = old.len();
        if count > 0 {
            self.commit(old, Durability::Immediate).await?;
        }
        Ok(count + self.purge_completed_enrollments(now).await?)
    }

    /// From the mirror, or (a completed one) from the file.
    pub(super) async fn get_enrollment(&self, tenant: &TenantId, id: &EnrollmentId) -> Result<Option<Enrollment>, StoreError> {
        let open = self.durable().enrollments.get(id).cloned();
        let found = match open {
            Some(enrollment) => Some(enrollment),
            None => self.read_enrollment(id).await?,
        };
        Ok(found.filter(|e| e.tenant == *tenant))
    }

    /// From the mirror, or (a completed one) from the file.
    pub(super) async fn enrollment_by_code(&self, code: &CodeDigest) -> Result<Option<Enrollment>, StoreError> {
        let open = {
            let mirror = self.durable();
            mirror.codes.get(code).and_then(|id| mirror.enrollments.get(id)).cloned()
        };
        match open {
            Some(enrollment) => Ok(Some(enrollment)),
            None => self.read_enrollment_by_code(code).await,
        }
    }

    /// Decided and committed by the enrollment writer (`writer.rs`).
    pub(super) async fn complete_enrollment(
        &self,
        code: &CodeDigest,
        device: Device,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError> {
        // A code no open enrollment has is answered here, from the file, without the
        // writer: a caller sending made-up codes must not hold up the writer (and
        // with it every durable write) with a file read each.
        if self.durable().enrollment_id_by_code(code).is_none() {
            return Ok(match self.read_enrollment_by_code(code).await? {
                Some(enrollment) if enrollment.completed && enrollment.kind == EnrollmentKind::Push => {
                    CompleteOutcome::AlreadyUsed
                }
                _ => CompleteOutcome::UnknownCode,
            });
        }
        let (answer, outcome) = oneshot::channel();
        self.enroll(EnrollmentOp::Complete { code: code.clone(), device, limits: limits.clone(), now, answer }).await?;
        outcome.await.map_err(|_| io_error("the enrollment writer stopped"))?
    }

    pub(super) fn get_device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        Ok(self.durable().device(id))
    }

    pub(super) fn list_devices(&self, tenant: &TenantId, user: &UserId) -> Result<Vec<Device>, StoreError> {
        let mirror = self.durable();
        let ids = mirror.user_devices.get(&(tenant.clone(), user.clone()));
        Ok(ids.into_iter().flatten().filter_map(|id| mirror.device(id)).collect())
    }

    pub(super) async fn remove_device(&self, tenant: &TenantId, id: &DeviceId) -> Result<bool, StoreError> {
        let _gate = self.write_gate.lock().await;
        let owned = self.durable().device(id).is_some_and(|device| device.tenant == *tenant);
        if owned {
            self.commit(vec![DurableWrite::RemoveDevice(id.clone())], Durability::Immediate).await?;
        }
        Ok(owned)
    }

    pub(super) async fn set_push_token(&self, id: &DeviceId, token: &str) -> Result<bool, StoreError> {
        let _gate = self.write_gate.lock().await;
        let Some(device) = self.durable().device(id) else { return Ok(false) };
        let updated = Device { push_token: token.to_owned(), push_enabled: !token.is_empty(), ..device };
        self.commit(vec![DurableWrite::PutDevice(updated)], Durability::Immediate).await?;
        Ok(true)
    }

    pub(super) async fn disable_push(&self, id: &DeviceId, token: &str) -> Result<(), StoreError> {
        let _gate = self.write_gate.lock().await;
        let device = self.durable().device(id).filter(|d| d.push_token == token && d.push_enabled);
        if let Some(device) = device {
            let updated = Device { push_enabled: false, ..device };
            self.commit(vec![DurableWrite::PutDevice(updated)], Durability::Immediate).await?;
        }
        Ok(())
    }

    /// Informational only, and on every answer's path: the mirror changes at once and
    /// the file follows in batches (`flush_touches`), so answers never queue behind a
    /// disk write for it. A crash can lose the last few seconds of `last_used_at`.
    pub(super) fn touch_device(&self, id: &DeviceId, now: Millis) -> Result<(), StoreError> {
        let mut mirror = self.durable_mut();
        if let Some(record) = mirror.devices.get_mut(id) {
            record.set_last_used(now);
            self.touched.lock().insert(id.clone());
        }
        Ok(())
    }

    /// Merges `block` with the user's block in force, under the write gate.
    pub(super) async fn block_user(
        &self,
        tenant: &TenantId,
        user: &UserId,
        block: UserBlock,
        now: Millis,
    ) -> Result<UserBlock, StoreError> {
        let _gate = self.write_gate.lock().await;
        let key = (tenant.clone(), user.clone());
        let merged = match self.durable().blocks.get(&key) {
            Some(existing) => existing.merge(block, now),
            None => block,
        };
        self.commit(vec![DurableWrite::PutBlock(key, merged.clone())], Durability::Immediate).await?;
        Ok(merged)
    }

    /// Decided and committed by the enrollment writer (`writer.rs`).
    pub(super) async fn confirm_totp_enrollment(
        &self,
        tenant: &TenantId,
        id: &EnrollmentId,
        device: Device,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError> {
        let (answer, outcome) = oneshot::channel();
        let op =
            EnrollmentOp::ConfirmTotp { tenant: tenant.clone(), id: id.clone(), device, limits: limits.clone(), now, answer };
        self.enroll(op).await?;
        outcome.await.map_err(|_| io_error("the enrollment writer stopped"))?
    }

    pub(super) async fn spend_totp_step(&self, id: &DeviceId, step: u64) -> Result<bool, StoreError> {
        let _gate = self.write_gate.lock().await;
        let Some(device) = self.durable().device(id) else { return Ok(false) };
        if device.totp_last_step.is_some_and(|last| last >= step) {
            return Ok(false);
        }
        let updated = Device { totp_last_step: Some(step), ..device };
        self.commit(vec![DurableWrite::PutDevice(updated)], Durability::Immediate).await?;
        Ok(true)
    }
}

#[cfg(test)]
#[path = "durable_tests.rs"]
mod tests;
