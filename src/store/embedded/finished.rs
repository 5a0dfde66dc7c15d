//! Completed enrollments live in the file only. The mirror holds the enrollments
//! that can still be completed (open, or expired and not yet purged); once one is
//! completed, its record (GetEnrollment shows COMPLETED and the device for a week
//! after its expiry) and its code (a second use must read "completed already") are
//! read from redb when asked, which is rare, instead of sitting in memory beside
//! the device for every enrolled phone. Their purge after the keep time scans the
//! file, every [`FILE_SWEEP_EVERY`].

use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableTable};

use super::durable::{DurableWrite, ENROLLMENT_CODES, ENROLLMENT_KEEP, ENROLLMENTS, decode};
use super::{Shared, io_error};
use crate::domain::enrollment::Enrollment;
use crate::domain::ids::{CodeDigest, EnrollmentId, TenantId};
use crate::domain::time::Millis;
use crate::store::StoreError;

/// How often the file is scanned for completed enrollments past their keep time.
pub(super) const FILE_SWEEP_EVERY: Duration = Duration::from_secs(600);

impl Shared {
    /// The open file for a read; after a failed write it is closed until the next
    /// commit opens it again, and a read meanwhile is UNAVAILABLE.
    fn file(&self) -> Result<Arc<Database>, StoreError> {
        self.db.lock().clone().ok_or_else(|| io_error("the store's file is being opened again after a failed write"))
    }

    /// The enrollment `id` from the file.
    pub(super) async fn read_enrollment(&self, id: &EnrollmentId) -> Result<Option<Enrollment>, StoreError> {
        let db = self.file()?;
        let id = id.to_string();
        tokio::task::spawn_blocking(move || read(&db, &id)).await.map_err(io_error)?
    }

    /// The enrollment of `code` from the file.
    pub(super) async fn read_enrollment_by_code(&self, code: &CodeDigest) -> Result<Option<Enrollment>, StoreError> {
        let db = self.file()?;
        let code = code.0.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(io_error)?;
            let codes = txn.open_table(ENROLLMENT_CODES).map_err(io_error)?;
            let Some(id) = codes.get(code.as_str()).map_err(io_error)?.map(|id| id.value().to_owned()) else {
                return Ok(None);
            };
            read(&db, &id)
        })
        .await
        .map_err(io_error)?
    }

    /// The completed enrollments in the file for which `keep` holds (the mirror
    /// holds the others).
    pub(super) async fn completed_in_file(
        &self,
        keep: impl Fn(&Enrollment) -> bool + Send + 'static,
    ) -> Result<Vec<Enrollment>, StoreError> {
        let db = self.file()?;
        tokio::task::spawn_blocking(move || -> Result<Vec<Enrollment>, StoreError> {
            let txn = db.begin_read().map_err(io_error)?;
            let mut found = Vec::new();
            for row in txn.open_table(ENROLLMENTS).map_err(io_error)?.iter().map_err(io_error)? {
                let (_, value) = row.map_err(io_error)?;
                let enrollment: Enrollment = decode(value.value())?;
                if enrollment.completed && keep(&enrollment) {
                    found.push(enrollment);
                }
            }
            Ok(found)
        })
        .await
        .map_err(io_error)?
    }

    /// Removes the completed enrollments past their keep time from the file, at
    /// most every [`FILE_SWEEP_EVERY`]. Callers hold `write_gate`.
    pub(super) async fn purge_completed_enrollments(&self, now: Millis) -> Result<usize, StoreError> {
        {
            let mut next = self.next_file_sweep.lock();
            if now < *next {
                return Ok(0);
            }
            *next = now.plus(FILE_SWEEP_EVERY);
        }
        let old = self.completed_in_file(move |e| now >= e.expires_at.plus(ENROLLMENT_KEEP)).await?;
        let count = old.len();
        if count > 0 {
            let writes = old.into_iter().map(|e| DurableWrite::RemoveEnrollment(e.id)).collect();
            self.commit(writes, redb::Durability::Immediate).await?;
        }
        Ok(count)
    }

    /// The tenant's completed enrollments in the file (for `purge_tenant`).
    pub(super) async fn completed_of_tenant(&self, tenant: &TenantId) -> Result<Vec<Enrollment>, StoreError> {
        let tenant = tenant.clone();
        self.completed_in_file(move |e| e.tenant == tenant).await
    }
}

fn read(db: &Database, id: &str) -> Result<Option<Enrollment>, StoreError> {
    let txn = db.begin_read().map_err(io_error)?;
    let table = txn.open_table(ENROLLMENTS).map_err(io_error)?;
    let Some(value) = table.get(id).map_err(io_error)? else { return Ok(None) };
    decode(value.value()).map(Some)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::domain::ids::{TenantId, UserId};
    use crate::domain::time::{Clock, ManualClock};
    use crate::store::conformance::{limits, sample_device, sample_enrollment};
    use crate::store::embedded::EmbeddedStore;
    use crate::store::{CompleteOutcome, Store};

    /// A completed enrollment leaves memory, is still read (by id, by code, after a
    /// restart), its code still reads "completed already", and it is purged from
    /// the file after its keep time.
    #[tokio::test]
    async fn a_completed_enrollment_is_read_from_the_file_until_its_keep_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::starting_now();
        let (tenant, user) = (TenantId("t".into()), UserId::parse("jan").expect("user"));
        let enrollment = sample_enrollment(&tenant, &user, clock.now());
        let code = enrollment.code_digest.clone().expect("code");
        {
            let store = EmbeddedStore::open(dir.path(), Arc::new(clock.clone())).await.expect("open");
            store.insert_enrollment(enrollment.clone(), &limits(), clock.now()).await.expect("insert");
            let device = sample_device(&tenant, &user, clock.now());
            let outcome = store.complete_enrollment(&code, device, &limits(), clock.now()).await.expect("complete");
            assert!(matches!(outcome, CompleteOutcome::Completed(_)));
            assert!(store.shared.durable().enrollments.is_empty(), "the completed enrollment left the mirror");
            assert!(store.shared.durable().enrollment_id_by_code(&code).is_none());
            let read = store.get_enrollment(&tenant, &enrollment.id).await.expect("get").expect("from the file");
            assert!(read.completed);
            assert_eq!(store.get_enrollment(&TenantId("other".into()), &enrollment.id).await.expect("get"), None);
            assert!(store.enrollment_by_code(&code).await.expect("by code").is_some_and(|e| e.completed));
            // A used code and a made-up one are answered without the writer (from the
            // file), so a flood of made-up codes holds up no durable write.
            let written = store.shared.groups.operations.load(std::sync::atomic::Ordering::Relaxed);
            let again = sample_device(&tenant, &user, clock.now());
            assert_eq!(
                store.complete_enrollment(&code, again, &limits(), clock.now()).await.expect("again"),
                CompleteOutcome::AlreadyUsed
            );
            let made_up = crate::domain::ids::EnrollmentCode::generate().expect("code").digest();
            let stranger = sample_device(&tenant, &user, clock.now());
            assert_eq!(
                store.complete_enrollment(&made_up, stranger, &limits(), clock.now()).await.expect("made up"),
                CompleteOutcome::UnknownCode
            );
            let now_written = store.shared.groups.operations.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(now_written, written, "the writer saw neither");
        }
        let store = EmbeddedStore::open(dir.path(), Arc::new(clock.clone())).await.expect("reopen");
        assert!(store.shared.durable().enrollments.is_empty(), "not loaded into memory at start either");
        assert!(store.get_enrollment(&tenant, &enrollment.id).await.expect("get").is_some_and(|e| e.completed));

        clock.advance(Duration::from_secs(600) + super::ENROLLMENT_KEEP);
        store.shared.sweep(clock.now()).await.expect("sweep");
        assert_eq!(store.get_enrollment(&tenant, &enrollment.id).await.expect("get"), None, "purged after the keep time");
        assert_eq!(store.enrollment_by_code(&code).await.expect("by code"), None);
    }
}
