//! The model: API.md's rules for one tenant's users, challenges, enrollments and
//! devices, kept in plain vectors and decided one call at a time. The driver
//! (`mod.rs`) asks it what a call must return and compares that with the store.

use std::time::Duration;

use crate::domain::challenge::{Challenge, ChallengeState, DenyReason, Resolution};
use crate::domain::device::Device;
use crate::domain::enrollment::{Enrollment, EnrollmentKind};
use crate::domain::ids::{ChallengeId, ChallengeNumber, DeviceId};
use crate::domain::time::Millis;
use crate::store::{
    AdmissionPolicy, BlockReason, CompleteOutcome, EnrollmentLimits, StrikePolicy, TotpAttempt, TotpPolicy, UserBlock,
};

/// Smaller than the API's defaults, so short sequences reach every limit.
pub fn admission() -> AdmissionPolicy {
    AdmissionPolicy {
        max_pending: 2,
        max_per_window: 4,
        window: Duration::from_secs(300),
        retention: Duration::from_secs(120),
        report_retention: Duration::from_secs(240),
    }
}

pub fn strikes() -> StrikePolicy {
    StrikePolicy { limit: 3, window: Duration::from_secs(300), block_for: Duration::from_secs(300) }
}

pub fn totp() -> TotpPolicy {
    TotpPolicy {
        strikes: StrikePolicy { limit: 4, window: Duration::from_secs(300), block_for: Duration::from_secs(300) },
        max_consecutive: 5,
    }
}

pub fn caps() -> EnrollmentLimits {
    EnrollmentLimits { max_devices: 2, max_open_enrollments: 2 }
}

/// One challenge as the rules see it.
#[derive(Clone, Debug)]
pub struct ModelChallenge {
    pub id: ChallengeId,
    pub user: usize,
    pub number: ChallengeNumber,
    pub request: Option<String>,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub purge_at: Millis,
    /// `purge_at` once it is APPROVED or FRAUD_REPORTED.
    pub settled_purge_at: Millis,
    pub state: ChallengeState,
    pub deny_reason: Option<DenyReason>,
    pub resolved_at: Option<Millis>,
    pub resolved_by: Option<DeviceId>,
}

impl ModelChallenge {
    /// Pending past its expiry reads EXPIRED, resolved at its expiry.
    pub fn expire(&mut self, now: Millis) {
        if self.state == ChallengeState::Pending && now >= self.expires_at {
            self.state = ChallengeState::Expired;
            self.resolved_at = Some(self.expires_at);
        }
    }

    /// Readable until its retention has passed.
    pub fn readable(&self, now: Millis) -> bool {
        now < self.purge_at
    }

    pub fn resolve(&mut self, resolution: &Resolution, now: Millis) {
        if matches!(resolution.state, ChallengeState::Approved | ChallengeState::FraudReported) {
            self.purge_at = self.purge_at.min(self.settled_purge_at);
        }
        self.state = resolution.state;
        self.deny_reason = resolution.deny_reason;
        self.resolved_by = resolution.device_id.clone();
        self.resolved_at = Some(now);
    }

    /// Where the store's copy differs from the model's, if it does.
    pub fn differs(&self, got: &Challenge) -> Option<String> {
        let ours = (
            &self.id,
            self.state,
            self.deny_reason,
            self.resolved_at,
            &self.resolved_by,
            self.expires_at,
            self.created_at,
            self.number,
            &self.request,
        );
        let theirs = (
            &got.id,
            got.state,
            got.deny_reason,
            got.resolved_at,
            &got.resolved_by,
            got.expires_at,
            got.created_at,
            got.number,
            &got.request_id,
        );
        (ours != theirs).then(|| {
            format!(
                "model: {:?} {:?} {:?} resolved_at {:?} by {:?}; store: {:?} {:?} {:?} resolved_at {:?} by {:?}",
                self.id,
                self.state,
                self.deny_reason,
                self.resolved_at,
                self.resolved_by,
                got.id,
                got.state,
                got.deny_reason,
                got.resolved_at,
                got.resolved_by
            )
        })
    }
}

/// What the rules count against one user.
#[derive(Clone, Debug, Default)]
pub struct ModelUser {
    pub block: Option<UserBlock>,
    wrong_numbers: Vec<Millis>,
    created: Vec<Millis>,
    totp_attempts: Vec<Millis>,
    totp_locked_until: Option<Millis>,
    totp_in_a_row: u32,
    totp_locked_for_good: bool,
}

#[derive(Clone, Debug)]
pub struct ModelEnrollment {
    pub enrollment: Enrollment,
    pub user: usize,
}

#[derive(Clone, Debug)]
pub struct ModelDevice {
    pub device: Device,
    pub user: usize,
    pub present: bool,
}

/// What CreateChallenge must answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateExpected {
    Created,
    /// The challenge (an index into `Model::challenges`) made for that request_id.
    Existing(usize),
    Blocked(UserBlock),
    TooManyPending,
    RateLimited,
}

#[derive(Default)]
pub struct Model {
    pub users: Vec<ModelUser>,
    pub challenges: Vec<ModelChallenge>,
    pub enrollments: Vec<ModelEnrollment>,
    /// Every device ever added, removed ones too (`present == false`).
    pub devices: Vec<ModelDevice>,
}

impl Model {
    pub fn new(users: usize) -> Self {
        Self { users: vec![ModelUser::default(); users], ..Self::default() }
    }

    /// Expires every challenge whose time is up at `now`.
    pub fn tick(&mut self, now: Millis) {
        for challenge in &mut self.challenges {
            challenge.expire(now);
        }
    }

    pub fn block_in_force(&self, user: usize, now: Millis) -> Option<UserBlock> {
        self.users[user].block.clone().filter(|block| block.in_force(now))
    }

    /// Decides a create (and records it when it is created: `challenge` is the one
    /// the driver sends).
    pub fn create(&mut self, user: usize, challenge: &Challenge, now: Millis) -> CreateExpected {
        let policy = admission();
        if let Some(request) = &challenge.request_id
            && let Some(index) = self.challenges.iter().rposition(|c| c.user == user && c.request.as_ref() == Some(request))
            && now < self.challenges[index].expires_at
        {
            return CreateExpected::Existing(index);
        }
        if let Some(block) = self.block_in_force(user, now) {
            return CreateExpected::Blocked(block);
        }
        let pending = self.challenges.iter().filter(|c| c.user == user && c.state == ChallengeState::Pending).count();
        if pending >= policy.max_pending as usize {
            return CreateExpected::TooManyPending;
        }
        let counts = &mut self.users[user];
        let cutoff = now.minus(policy.window);
        counts.created.retain(|at| *at > cutoff);
        if counts.created.len() >= policy.max_per_window as usize {
            return CreateExpected::RateLimited;
        }
        counts.created.push(now);
        let (settled_purge_at, purge_at) = policy.purge_times(challenge.expires_at);
        self.challenges.push(ModelChallenge {
            id: challenge.id.clone(),
            user,
            number: challenge.number,
            request: challenge.request_id.clone(),
            created_at: now,
            expires_at: challenge.expires_at,
            purge_at,
            settled_purge_at,
            state: ChallengeState::Pending,
            deny_reason: None,
            resolved_at: None,
            resolved_by: None,
        });
        CreateExpected::Created
    }

    /// A block merged with the one stored: the stronger and longer stands.
    pub fn block(&mut self, user: usize, block: UserBlock, now: Millis) -> UserBlock {
        let merged = match &self.users[user].block {
            Some(existing) => existing.merge(block, now),
            None => block,
        };
        self.users[user].block = Some(merged.clone());
        merged
    }

    pub fn unblock(&mut self, user: usize) {
        let counts = &mut self.users[user];
        let created = std::mem::take(&mut counts.created);
        // UnblockUser forgets blocks, strikes and TOTP counts; not the rate window.
        *counts = ModelUser { created, ..ModelUser::default() };
    }

    pub fn wrong_number(&mut self, user: usize, now: Millis) -> Option<UserBlock> {
        let policy = strikes();
        let counts = &mut self.users[user];
        let cutoff = now.minus(policy.window);
        counts.wrong_numbers.retain(|at| *at > cutoff);
        counts.wrong_numbers.push(now);
        if counts.wrong_numbers.len() < policy.limit as usize {
            return None;
        }
        counts.wrong_numbers.clear();
        let block = UserBlock { reason: BlockReason::WrongNumbers, since: now, until: Some(now.plus(policy.block_for)) };
        Some(self.block(user, block, now))
    }

    pub fn reserve_totp(&mut self, user: usize, now: Millis) -> TotpAttempt {
        let policy = totp();
        let counts = &mut self.users[user];
        if counts.totp_locked_for_good {
            return TotpAttempt::Locked { until: None };
        }
        if let Some(until) = counts.totp_locked_until.filter(|until| now < *until) {
            return TotpAttempt::Locked { until: Some(until) };
        }
        let cutoff = now.minus(policy.strikes.window);
        counts.totp_attempts.retain(|at| *at > cutoff);
        if counts.totp_in_a_row >= policy.max_consecutive {
            counts.totp_locked_for_good = true;
            return TotpAttempt::Locked { until: None };
        }
        if counts.totp_attempts.len() >= policy.strikes.limit as usize {
            let until = now.plus(policy.strikes.block_for);
            counts.totp_locked_until = Some(until);
            return TotpAttempt::Locked { until: Some(until) };
        }
        counts.totp_attempts.push(now);
        counts.totp_in_a_row += 1;
        TotpAttempt::Allowed
    }

    /// The latest reserved attempt was a right code: it no longer counts.
    pub fn totp_succeeded(&mut self, user: usize) {
        let counts = &mut self.users[user];
        if let Some(latest) = counts.totp_attempts.iter().enumerate().max_by_key(|(_, at)| **at).map(|(i, _)| i) {
            counts.totp_attempts.remove(latest);
        }
        counts.totp_in_a_row = 0;
    }

    pub fn open_enrollments(&self, user: usize, now: Millis) -> usize {
        self.enrollments.iter().filter(|e| e.user == user && !e.enrollment.completed && now < e.enrollment.expires_at).count()
    }

    pub fn device_count(&self, user: usize) -> usize {
        self.devices.iter().filter(|d| d.user == user && d.present).count()
    }

    /// What completing enrollment `index` with `device` must answer (before any of
    /// it happens); `wrong_tenant` for a TOTP confirmation under another tenant.
    pub fn complete(&self, index: usize, device: &Device, wrong_tenant: bool, now: Millis) -> CompleteOutcome {
        let ModelEnrollment { enrollment, user } = &self.enrollments[index];
        if wrong_tenant {
            return CompleteOutcome::UnknownCode;
        }
        if enrollment.completed {
            return CompleteOutcome::AlreadyUsed;
        }
        if now >= enrollment.expires_at {
            return CompleteOutcome::Expired;
        }
        let limit = caps().max_devices;
        if self.device_count(*user) >= limit as usize {
            return CompleteOutcome::TooManyDevices { limit };
        }
        let key_in_use = device
            .public_key
            .as_ref()
            .is_some_and(|key| self.devices.iter().any(|d| d.present && d.device.public_key.as_ref() == Some(key)));
        if key_in_use {
            return CompleteOutcome::KeyInUse;
        }
        let completed = Enrollment { completed: true, device_id: Some(device.id.clone()), ..enrollment.clone() };
        let completed =
            if enrollment.kind == EnrollmentKind::Totp { Enrollment { totp_secret: None, ..completed } } else { completed };
        CompleteOutcome::Completed(Box::new(completed))
    }

    /// Records a completion the store reported (`device` is the winner's).
    pub fn completed(&mut self, index: usize, device: Device) {
        let entry = &mut self.enrollments[index];
        entry.enrollment.completed = true;
        entry.enrollment.device_id = Some(device.id.clone());
        if entry.enrollment.kind == EnrollmentKind::Totp {
            entry.enrollment.totp_secret = None;
        }
        let user = entry.user;
        self.devices.push(ModelDevice { device, user, present: true });
    }
}
