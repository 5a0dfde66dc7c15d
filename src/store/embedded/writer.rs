//! Grouped commits for enrollments. A company rolling out MFA enrolls thousands of
//! phones in its first hour, and each BeginEnrollment and CompleteEnrollment is a
//! durable write: one fsync each would bound the rate by the disk. So these three
//! operations (insert, complete, confirm a TOTP enrollment) go to one writer task,
//! which takes every operation waiting, decides each in arrival order against the
//! mirror plus the writes decided before it in the same group ([`View`]), commits
//! the group's writes in one transaction (one fsync), applies them to the mirror, and
//! only then answers every caller: a caller hears "completed" only once its device
//! is on disk, and nobody reads a record the file does not hold. If the commit fails,
//! every caller of the group gets UNAVAILABLE and nothing of it is applied.
//!
//! The writer holds `write_gate` for a group's decisions and commit, as every other
//! durable write does, so the other writers (blocks, token updates, removals,
//! purges) stay serialised with it; while it commits, the next group gathers in the
//! channel.

use std::collections::HashMap;
use std::sync::Weak;

use redb::Durability;
use tokio::sync::{mpsc, oneshot};

use super::durable::{DurableMirror, DurableWrite};
use super::{BACKEND, Shared};
use crate::domain::device::Device;
use crate::domain::enrollment::{Enrollment, EnrollmentKind};
use crate::domain::ids::{CodeDigest, EnrollmentId, TenantId, UserId};
use crate::domain::time::Millis;
use crate::store::{CompleteOutcome, EnrollmentLimits, InsertOutcome, StoreError};

/// The most operations one commit carries.
const MAX_GROUP: usize = 512;

/// An enrollment write waiting for the writer, with where its answer goes.
pub(super) enum EnrollmentOp {
    Insert {
        enrollment: Enrollment,
        limits: EnrollmentLimits,
        now: Millis,
        answer: oneshot::Sender<Result<InsertOutcome, StoreError>>,
    },
    Complete {
        code: CodeDigest,
        device: Device,
        limits: EnrollmentLimits,
        now: Millis,
        answer: oneshot::Sender<Result<CompleteOutcome, StoreError>>,
    },
    ConfirmTotp {
        tenant: TenantId,
        id: EnrollmentId,
        device: Device,
        limits: EnrollmentLimits,
        now: Millis,
        answer: oneshot::Sender<Result<CompleteOutcome, StoreError>>,
    },
}

impl EnrollmentOp {
    /// Answers UNAVAILABLE without deciding.
    fn fail(self, detail: &str) {
        let failed = || StoreError::unavailable(BACKEND, detail);
        match self {
            Self::Insert { answer, .. } => {
                answer.send(Err(failed())).ok();
            }
            Self::Complete { answer, .. } | Self::ConfirmTotp { answer, .. } => {
                answer.send(Err(failed())).ok();
            }
        }
    }
}

/// A decided operation's answer, sent once the group's commit is done.
enum Decided {
    Insert(oneshot::Sender<Result<InsertOutcome, StoreError>>, InsertOutcome),
    Complete(oneshot::Sender<Result<CompleteOutcome, StoreError>>, CompleteOutcome),
}

impl Decided {
    fn send(self, committed: Result<(), &str>) {
        let failed = |detail: &str| StoreError::unavailable(BACKEND, detail);
        // A caller that went away (its call was cancelled) needs no answer.
        match self {
            Self::Insert(answer, outcome) => {
                answer.send(committed.map(|()| outcome).map_err(failed)).ok();
            }
            Self::Complete(answer, outcome) => {
                answer.send(committed.map(|()| outcome).map_err(failed)).ok();
            }
        }
    }
}

/// The mirror as the group's earlier decisions leave it: their writes (enrollments
/// put, devices added) laid over the committed records; under both, the completed
/// enrollments the group asks about, read from the file (`finished.rs`).
struct View<'a> {
    mirror: &'a DurableMirror,
    staged: &'a [DurableWrite],
    from_file: &'a FromFile,
}

/// Completed enrollments read from the file for a group, by code and by id.
#[derive(Default)]
struct FromFile {
    by_code: HashMap<CodeDigest, Enrollment>,
    by_id: HashMap<EnrollmentId, Enrollment>,
}

impl FromFile {
    /// Reads what the group's completions ask for and the mirror does not hold.
    async fn read(shared: &Shared, group: &[EnrollmentOp]) -> Result<Self, StoreError> {
        let (codes, ids) = {
            let mirror = shared.durable();
            let codes: Vec<CodeDigest> = group
                .iter()
                .filter_map(|op| match op {
                    EnrollmentOp::Complete { code, .. } if mirror.enrollment_id_by_code(code).is_none() => Some(code.clone()),
                    _ => None,
                })
                .collect();
            let ids: Vec<EnrollmentId> = group
                .iter()
                .filter_map(|op| match op {
                    EnrollmentOp::ConfirmTotp { id, .. } if !mirror.enrollments.contains_key(id) => Some(id.clone()),
                    _ => None,
                })
                .collect();
            (codes, ids)
        };
        let mut from_file = Self::default();
        for code in codes {
            if let Some(enrollment) = shared.read_enrollment_by_code(&code).await? {
                from_file.by_code.insert(code, enrollment);
            }
        }
        for id in ids {
            if let Some(enrollment) = shared.read_enrollment(&id).await? {
                from_file.by_id.insert(id, enrollment);
            }
        }
        Ok(from_file)
    }
}

impl View<'_> {
    fn staged_enrollments(&self) -> impl Iterator<Item = &Enrollment> {
        self.staged.iter().rev().filter_map(|write| match write {
            DurableWrite::PutEnrollment(enrollment) => Some(enrollment),
            _ => None,
        })
    }

    fn staged_devices(&self) -> impl Iterator<Item = &Device> {
        self.staged.iter().filter_map(|write| match write {
            DurableWrite::PutDevice(device) => Some(device),
            _ => None,
        })
    }

    fn enrollment(&self, id: &EnrollmentId) -> Option<&Enrollment> {
        self.staged_enrollments()
            .find(|e| e.id == *id)
            .or_else(|| self.mirror.enrollments.get(id))
            .or_else(|| self.from_file.by_id.get(id))
    }

    fn enrollment_by_code(&self, code: &CodeDigest) -> Option<&Enrollment> {
        let staged = self.staged_enrollments().find(|e| e.code_digest.as_ref() == Some(code));
        staged
            .or_else(|| self.mirror.enrollment_id_by_code(code).and_then(|id| self.enrollment(id)))
            .or_else(|| self.from_file.by_code.get(code))
    }

    fn open_enrollments(&self, tenant: &TenantId, user: &UserId, now: Millis) -> usize {
        let mut ids: Vec<&EnrollmentId> = self.mirror.enrollment_ids_of(tenant, user).collect();
        for staged in self.staged_enrollments().filter(|e| e.tenant == *tenant && e.user_id == *user) {
            if !ids.contains(&&staged.id) {
                ids.push(&staged.id);
            }
        }
        ids.into_iter().filter_map(|id| self.enrollment(id)).filter(|e| !e.completed && now < e.expires_at).count()
    }

    /// Why `device` may not be added for its user now, if it may not.
    fn refuse_device(&self, device: &Device, limits: &EnrollmentLimits) -> Option<CompleteOutcome> {
        let staged = self.staged_devices().filter(|d| d.tenant == device.tenant && d.user_id == device.user_id).count();
        if self.mirror.device_count(&device.tenant, &device.user_id) + staged >= limits.max_devices as usize {
            return Some(CompleteOutcome::TooManyDevices { limit: limits.max_devices });
        }
        let fingerprint = device.public_key.as_ref().and_then(|key| key.fingerprint().ok())?;
        let staged_key =
            self.staged_devices().any(|d| d.public_key.as_ref().and_then(|k| k.fingerprint().ok()) == Some(fingerprint));
        (staged_key || self.mirror.key_in_use(&fingerprint)).then_some(CompleteOutcome::KeyInUse)
    }

    /// An open enrollment completed by `device`: the outcome and its writes.
    fn complete(
        &self,
        enrollment: Option<&Enrollment>,
        device: Device,
        limits: &EnrollmentLimits,
        now: Millis,
        kind: EnrollmentKind,
    ) -> (CompleteOutcome, Vec<DurableWrite>) {
        let enrollment = match enrollment.filter(|e| e.kind == kind) {
            None => return (CompleteOutcome::UnknownCode, Vec::new()),
            Some(e) if e.completed => return (CompleteOutcome::AlreadyUsed, Vec::new()),
            Some(e) if now >= e.expires_at => return (CompleteOutcome::Expired, Vec::new()),
            Some(e) => e.clone(),
        };
        if let Some(refusal) = self.refuse_device(&device, limits) {
            return (refusal, Vec::new());
        }
        // A TOTP enrollment's pending secret moves onto the device: the enrollment
        // keeps no copy.
        let totp_secret = if kind == EnrollmentKind::Totp { None } else { enrollment.totp_secret.clone() };
        let completed = Enrollment { completed: true, device_id: Some(device.id.clone()), totp_secret, ..enrollment };
        let writes = vec![DurableWrite::PutEnrollment(completed.clone()), DurableWrite::PutDevice(device)];
        (CompleteOutcome::Completed(Box::new(completed)), writes)
    }

    fn decide(&self, op: EnrollmentOp) -> (Decided, Vec<DurableWrite>) {
        match op {
            EnrollmentOp::Insert { enrollment, limits, now, answer } => {
                if self.open_enrollments(&enrollment.tenant, &enrollment.user_id, now) >= limits.max_open_enrollments as usize {
                    let refused = InsertOutcome::TooManyOpen { limit: limits.max_open_enrollments };
                    return (Decided::Insert(answer, refused), Vec::new());
                }
                (Decided::Insert(answer, InsertOutcome::Inserted), vec![DurableWrite::PutEnrollment(enrollment)])
            }
            EnrollmentOp::Complete { code, device, limits, now, answer } => {
                let (outcome, writes) = self.complete(self.enrollment_by_code(&code), device, &limits, now, EnrollmentKind::Push);
                (Decided::Complete(answer, outcome), writes)
            }
            EnrollmentOp::ConfirmTotp { tenant, id, device, limits, now, answer } => {
                let enrollment = self.enrollment(&id).filter(|e| e.tenant == tenant);
                let (outcome, writes) = self.complete(enrollment, device, &limits, now, EnrollmentKind::Totp);
                (Decided::Complete(answer, outcome), writes)
            }
        }
    }
}

/// Takes the operations waiting, decides them, commits them as one, answers them;
/// until the store is dropped (its sender with it).
pub(super) async fn run(shared: Weak<Shared>, mut ops: mpsc::Receiver<EnrollmentOp>) {
    while let Some(first) = ops.recv().await {
        let Some(shared) = shared.upgrade() else { return };
        let _gate = shared.write_gate.lock().await;
        // Everything that queued while the last group committed joins this one.
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match ops.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        let from_file = match FromFile::read(&shared, &group).await {
            Ok(from_file) => from_file,
            Err(error) => {
                // The file cannot be read: nothing of the group is decided.
                let failed = error.to_string();
                for op in group {
                    op.fail(&failed);
                }
                continue;
            }
        };
        let mut staged: Vec<DurableWrite> = Vec::new();
        let mut decided = Vec::with_capacity(group.len());
        {
            let mirror = shared.durable();
            for op in group {
                let (answer, writes) = View { mirror: &mirror, staged: &staged, from_file: &from_file }.decide(op);
                staged.extend(writes);
                decided.push(answer);
            }
        }
        let committed = if staged.is_empty() { Ok(()) } else { shared.commit(staged, Durability::Immediate).await };
        shared.groups.record(decided.len());
        let committed = committed.map_err(|error| error.to_string());
        for answer in decided {
            answer.send(committed.as_ref().copied().map_err(String::as_str));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use crate::domain::ids::UserId;
    use crate::domain::time::{Clock, ManualClock};
    use crate::store::conformance::{limits, sample_device, sample_enrollment};
    use crate::store::embedded::EmbeddedStore;
    use crate::store::{CompleteOutcome, InsertOutcome, Store};

    /// Enrollments begun and completed at once are committed in groups (fewer
    /// commits than operations), each call answered once its group is on disk: a
    /// store opened again on the file has every device whose call returned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn enrollments_at_once_are_committed_in_groups_and_each_is_durable_when_answered() {
        const PHONES: usize = 64;
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::starting_now();
        let tenant = crate::domain::ids::TenantId("t".into());
        let store = Arc::new(EmbeddedStore::open(dir.path(), Arc::new(clock.clone())).await.expect("open"));
        let enrollments: Vec<_> = (0..PHONES)
            .map(|i| sample_enrollment(&tenant, &UserId::parse(&format!("user-{i}")).expect("user"), clock.now()))
            .collect();
        let inserts = enrollments.iter().map(|enrollment| {
            let (store, enrollment) = (Arc::clone(&store), enrollment.clone());
            let now = clock.now();
            tokio::spawn(async move { store.insert_enrollment(enrollment, &limits(), now).await })
        });
        for insert in futures::future::join_all(inserts).await {
            assert_eq!(insert.expect("task").expect("insert"), InsertOutcome::Inserted);
        }
        let completions = enrollments.iter().map(|enrollment| {
            let store = Arc::clone(&store);
            let code = enrollment.code_digest.clone().expect("code");
            let device = sample_device(&tenant, &enrollment.user_id, clock.now());
            let now = clock.now();
            tokio::spawn(async move {
                let outcome = store.complete_enrollment(&code, device.clone(), &limits(), now).await;
                (device, outcome)
            })
        });
        let mut acknowledged = Vec::new();
        for completion in futures::future::join_all(completions).await {
            let (device, outcome) = completion.expect("task");
            assert!(matches!(outcome.expect("complete"), CompleteOutcome::Completed(_)));
            acknowledged.push(device);
        }
        let groups = store.shared.groups.groups.load(Ordering::Relaxed);
        let operations = store.shared.groups.operations.load(Ordering::Relaxed);
        assert_eq!(operations, 2 * PHONES as u64);
        assert!(groups < operations, "{operations} operations in {groups} commits: none was grouped");

        drop(store);
        let reopened = EmbeddedStore::open(dir.path(), Arc::new(clock.clone())).await.expect("reopen");
        for device in acknowledged {
            assert_eq!(reopened.get_device(&device.id).await.expect("get"), Some(device), "an acknowledged device is on disk");
        }
    }
}
