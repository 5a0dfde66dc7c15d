//! The driver's steps on devices and enrollments: TOTP steps raced, enrollments
//! begun and completed (raced, keys reused) against the caps.

use std::sync::Arc;
use std::time::Duration;

use super::super::KeyChoice;
use super::super::rules;
use super::{Driver, ensure, ok, race, seen, variant};
use crate::domain::device::Device;
use crate::domain::enrollment::{Enrollment, EnrollmentKind};
use crate::domain::ids::{EnrollmentCode, EnrollmentId};
use crate::store::conformance::{Fixture, sample_device};
use crate::store::{CompleteOutcome, InsertOutcome, Store};

impl<X: Fixture + Send + Sync + 'static> Driver<'_, X> {
    pub(super) async fn spend_steps(&mut self, index: usize, steps: &[u8]) -> Result<(), String> {
        let id = self.model.devices[index].device.id.clone();
        let steps: Vec<u64> = steps.iter().map(|s| 1000 + u64::from(*s)).collect();
        let calls = steps
            .iter()
            .map(|step| {
                let (fixture, id, step) = (Arc::clone(&self.fixture), id.clone(), *step);
                async move { fixture.store().spend_totp_step(&id, step).await }
            })
            .collect();
        let got = race(calls).await?;
        let model = &mut self.model.devices[index];
        let spent: Vec<u64> = steps.iter().zip(&got).filter(|(_, spent)| **spent).map(|(step, _)| *step).collect();
        if !model.present {
            ensure!(spent.is_empty(), "steps {spent:?} spent on a removed device");
            return Ok(());
        }
        // Some order of the racers explains it: each step past every one before, the
        // highest always (once), none twice.
        let last = model.device.totp_last_step;
        let highest = steps.iter().copied().max().expect("one step at least");
        let mut distinct = spent.clone();
        distinct.sort_unstable();
        distinct.dedup();
        ensure!(distinct.len() == spent.len(), "a step was spent twice: {spent:?}");
        ensure!(spent.iter().all(|s| last.is_none_or(|last| *s > last)), "spent {spent:?}, not past step {last:?}");
        let forward = last.is_none_or(|last| highest > last);
        seen(format!("spend_totp_step: {} racing, {} spent", steps.len(), spent.len()));
        ensure!(spent.contains(&highest) == forward, "racing steps {steps:?} after {last:?}: spent {spent:?}");
        if forward {
            model.device.totp_last_step = Some(highest);
        }
        self.compare_device(index).await
    }

    pub(super) async fn compare_device(&self, index: usize) -> Result<(), String> {
        let model = &self.model.devices[index];
        let got = ok(self.store().get_device(&model.device.id).await)?;
        match (&got, model.present) {
            (None, false) => Ok(()),
            (Some(got), true)
                if (got.totp_last_step, &got.push_token, got.push_enabled)
                    == (model.device.totp_last_step, &model.device.push_token, model.device.push_enabled) =>
            {
                Ok(())
            }
            _ => Err(format!("device: model {:?} (present {}), store {got:?}", model.device, model.present)),
        }
    }

    pub(super) async fn begin_enrollment(&mut self, user: usize, totp: bool) -> Result<(), String> {
        let now = self.now();
        let enrollment = Enrollment {
            id: EnrollmentId::generate().expect("id"),
            tenant: self.tenant.clone(),
            user_id: self.users[user].clone(),
            account_name: "model@example.com".into(),
            kind: if totp { EnrollmentKind::Totp } else { EnrollmentKind::Push },
            code_digest: (!totp).then(|| EnrollmentCode::generate().expect("code").digest()),
            totp_secret: None,
            created_at: now,
            expires_at: now.plus(Duration::from_secs(600)),
            completed: false,
            device_id: None,
        };
        let got = ok(self.store().insert_enrollment(enrollment.clone(), &rules::caps(), now).await)?;
        let limit = rules::caps().max_open_enrollments;
        let expected = if self.model.open_enrollments(user, now) >= limit as usize {
            InsertOutcome::TooManyOpen { limit }
        } else {
            self.model.enrollments.push(rules::ModelEnrollment { enrollment, user });
            InsertOutcome::Inserted
        };
        seen(format!("insert_enrollment: {}", variant(&expected)));
        ensure!(got == expected, "insert_enrollment: model {expected:?}, store {got:?}");
        Ok(())
    }

    pub(super) async fn complete_enrollment(
        &mut self,
        index: usize,
        racers: usize,
        key: KeyChoice,
        other: bool,
    ) -> Result<(), String> {
        let now = self.now();
        let entry = self.model.enrollments[index].clone();
        let totp = entry.enrollment.kind == EnrollmentKind::Totp;
        let reused = match key {
            KeyChoice::SameAs(device) if !totp => {
                Self::pick(&self.model.devices, device).and_then(|d| self.model.devices[d].device.public_key.clone())
            }
            _ => None,
        };
        let devices: Vec<Device> = (0..racers)
            .map(|_| {
                let device = sample_device(&self.tenant, &entry.enrollment.user_id, now);
                if totp {
                    Device { platform: None, public_key: None, ..device }
                } else {
                    Device { public_key: reused.clone().or(device.public_key.clone()), ..device }
                }
            })
            .collect();
        let tenant = if other && totp { self.other.clone() } else { self.tenant.clone() };
        let calls = devices
            .iter()
            .map(|device| {
                let (fixture, tenant, enrollment, device) =
                    (Arc::clone(&self.fixture), tenant.clone(), entry.enrollment.clone(), device.clone());
                async move {
                    let store = fixture.store();
                    match &enrollment.code_digest {
                        Some(code) => store.complete_enrollment(code, device, &rules::caps(), now).await,
                        None => store.confirm_totp_enrollment(&tenant, &enrollment.id, device, &rules::caps(), now).await,
                    }
                }
            })
            .collect();
        let got = race(calls).await?;
        let winners: Vec<usize> = (0..got.len()).filter(|i| matches!(got[*i], CompleteOutcome::Completed(_))).collect();
        got.iter().for_each(|outcome| seen(format!("complete: {}", variant(outcome))));
        ensure!(winners.len() <= 1, "{} racing completions of one enrollment completed: {got:?}", winners.len());
        // Every racer sees what the first in some order would: the winner's answer
        // (the model's, given its device) and AlreadyUsed, or the same refusal.
        let expected = self.model.complete(index, &devices[winners.first().copied().unwrap_or(0)], other && totp, now);
        for (i, outcome) in got.iter().enumerate() {
            let fine = if winners.is_empty() {
                *outcome == expected
                    // A key that the racers share is claimed by the first of them for
                    // its whole attempt: on Redis a racer that meets the claim before the
                    // code is spent reads KeyInUse instead of AlreadyUsed.
                    || (reused.is_some() && racers > 1 && *outcome == CompleteOutcome::KeyInUse)
            } else if winners[0] == i {
                *outcome == expected
            } else {
                *outcome == CompleteOutcome::AlreadyUsed || (reused.is_some() && *outcome == CompleteOutcome::KeyInUse)
            };
            ensure!(fine, "completion {i} of {racers}: store {outcome:?}, model {expected:?} (all: {got:?})");
        }
        if let Some(&winner) = winners.first() {
            self.model.completed(index, devices[winner].clone());
        }
        let stored = ok(self.store().get_enrollment(&self.tenant, &entry.enrollment.id).await)?;
        let model = &self.model.enrollments[index].enrollment;
        ensure!(stored.as_ref() == Some(model), "enrollment: model {model:?}, store {stored:?}");
        if winners.is_empty() {
            return Ok(());
        }
        self.compare_device(self.model.devices.len() - 1).await
    }
}
