//! Runs one sequence: each step against the store and the model, outcomes compared.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

mod devices;

use super::rules::{self, CreateExpected, Model};
use super::{Answer, BlockKind, Op, USERS};
use crate::domain::challenge::{Challenge, ChallengeState, Decision, Resolution, SignInContext};
use crate::domain::device::Device;
use crate::domain::ids::{ChallengeId, ChallengeNumber, DeviceId, TenantId, UserId};
use crate::domain::time::{Clock, ManualClock, Millis};
use crate::store::conformance::{Fixture, Scope, device_answer};
use crate::store::{
    Answered, BlockReason, ChallengeWatch, CreateOutcome, Refusal, ResolveOutcome, Store, StoreError, TotpAttempt, UserBlock,
};

macro_rules! ensure {
    ($cond:expr, $($message:tt)+) => {
        if !$cond {
            return Err(format!($($message)+));
        }
    };
}
use ensure;

/// How often each kind of outcome was seen, over every case of the process: what
/// the sequences reach (printed after a run, with `--nocapture`).
static SEEN: parking_lot::Mutex<std::collections::BTreeMap<String, u64>> =
    parking_lot::Mutex::new(std::collections::BTreeMap::new());

fn seen(what: String) {
    *SEEN.lock().entry(what).or_default() += 1;
}

/// The name of `value`'s enum variant, without its data.
fn variant(value: &impl std::fmt::Debug) -> String {
    let text = format!("{value:?}");
    text[..text.find([' ', '(', '{']).unwrap_or(text.len())].to_owned()
}

/// The outcome counts so far, and clears them.
pub(super) fn take_seen() -> std::collections::BTreeMap<String, u64> {
    std::mem::take(&mut *SEEN.lock())
}

fn ok<T>(result: Result<T, StoreError>) -> Result<T, String> {
    result.map_err(|error| format!("store error: {error}"))
}

/// Runs `calls` at once, each a task of its own (both workers race them).
async fn race<T: Send + 'static>(
    calls: Vec<impl Future<Output = Result<T, StoreError>> + Send + 'static>,
) -> Result<Vec<T>, String> {
    let tasks: Vec<_> = calls.into_iter().map(tokio::spawn).collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(ok(task.await.map_err(|e| format!("a racing call panicked: {e}"))?)?);
    }
    Ok(results)
}

/// One racing resolution: a device's answer or the IdP's.
type Resolving = Pin<Box<dyn Future<Output = Result<Option<ResolveOutcome>, StoreError>> + Send>>;

/// Another number than `number`.
fn wrong(number: ChallengeNumber) -> ChallengeNumber {
    let other = (number.value() - 10 + 1) % 90 + 10;
    ChallengeNumber::parse_typed(&format!("{other:02}")).expect("two digits")
}

fn token(n: u8) -> String {
    format!("token-{n}")
}

struct Driver<'a, X> {
    fixture: Arc<X>,
    clock: &'a ManualClock,
    tenant: TenantId,
    other: TenantId,
    users: Vec<UserId>,
    model: Model,
    watches: Vec<(usize, ChallengeWatch)>,
    /// This case's device proofs: random bytes, the first set by `SpendProof`.
    proof_base: [u8; 32],
    /// When each proof used so far may be forgotten.
    proofs_kept: std::collections::HashMap<u8, Millis>,
}

pub(super) async fn run<X: Fixture + Send + Sync + 'static>(
    fixture: Arc<X>,
    clock: &ManualClock,
    scope: &Scope,
    ops: &[Op],
) -> Result<(), String> {
    let users = (0..USERS).map(|i| UserId::parse(&format!("u{i}")).expect("user")).collect();
    let mut driver = Driver {
        fixture,
        clock,
        tenant: scope.tenant("a"),
        other: scope.tenant("b"),
        users,
        model: Model::new(USERS),
        watches: Vec::new(),
        proof_base: {
            let mut bytes = [0u8; 32];
            crate::domain::ids::os_random(&mut bytes).expect("random bytes");
            bytes
        },
        proofs_kept: std::collections::HashMap::new(),
    };
    for (step, op) in ops.iter().enumerate() {
        driver.model.tick(clock.now());
        driver.step(op).await.map_err(|error| format!("step {step} ({op:?}): {error}"))?;
    }
    driver.model.tick(clock.now());
    driver.finish().await.map_err(|error| format!("after the last step: {error}"))
}

impl<X: Fixture + Send + Sync + 'static> Driver<'_, X> {
    fn store(&self) -> &X::Store {
        self.fixture.store()
    }

    fn now(&self) -> Millis {
        self.clock.now()
    }

    /// The `index`-th newest of `items`, modulo their number.
    fn pick<T>(items: &[T], index: usize) -> Option<usize> {
        (!items.is_empty()).then(|| items.len() - 1 - index % items.len())
    }

    fn new_block(&self, kind: BlockKind) -> UserBlock {
        let now = self.now();
        match kind {
            BlockKind::Fraud => UserBlock { reason: BlockReason::FraudReported, since: now, until: None },
            BlockKind::ForSecs(secs) => UserBlock {
                reason: BlockReason::WrongNumbers,
                since: now,
                until: Some(now.plus(Duration::from_secs(u64::from(secs)))),
            },
        }
    }

    async fn step(&mut self, op: &Op) -> Result<(), String> {
        let now = self.now();
        match op.clone() {
            Op::Create { user, request, ttl_secs, racers } => self.create(user, request, ttl_secs, racers).await,
            Op::SpendProof { proof, racers } => self.spend_proof(proof, racers).await,
            Op::Get { challenge, other_tenant } => {
                let Some(index) = Self::pick(&self.model.challenges, challenge) else { return Ok(()) };
                let tenant = if other_tenant { &self.other } else { &self.tenant };
                let got = ok(self.store().get_challenge(tenant, &self.model.challenges[index].id, now).await)?;
                self.compare_read(index, other_tenant, got.as_ref())
            }
            Op::Answer { challenge, answers, block } => {
                let Some(index) = Self::pick(&self.model.challenges, challenge) else { return Ok(()) };
                self.answer(index, &answers, block).await
            }
            Op::Watch { challenge } => {
                let Some(index) = Self::pick(&self.model.challenges, challenge) else { return Ok(()) };
                let watch = ok(self.store().watch_challenge(&self.tenant, &self.model.challenges[index].id, now).await)?;
                self.compare_read(index, false, watch.as_ref().map(|w| w.borrow().clone()).as_ref())?;
                if let Some(watch) = watch {
                    self.watches.push((index, watch));
                }
                Ok(())
            }
            Op::Pending { user } => self.pending(user).await,
            Op::Advance { millis } => {
                self.clock.advance(Duration::from_millis(millis));
                Ok(())
            }
            Op::Block { user, kind } => {
                let block = self.new_block(kind);
                let got = ok(self.store().block_user(&self.tenant, &self.users[user], block.clone(), now).await)?;
                let expected = self.model.block(user, block, now);
                ensure!(got == expected, "the block that stands: model {expected:?}, store {got:?}");
                Ok(())
            }
            Op::Unblock { user } => {
                ok(self.store().unblock_user(&self.tenant, &self.users[user]).await)?;
                self.model.unblock(user);
                Ok(())
            }
            Op::WrongNumber { user } => {
                let got = ok(self.store().record_wrong_number(&self.tenant, &self.users[user], &rules::strikes(), now).await)?;
                let expected = self.model.wrong_number(user, now);
                seen(format!("record_wrong_number: blocks {}", expected.is_some()));
                ensure!(got == expected, "after a wrong number: model {expected:?}, store {got:?}");
                Ok(())
            }
            Op::ReserveTotp { user, racers } => self.reserve_totp(user, racers).await,
            Op::TotpSucceeded { user } => {
                ok(self.store().totp_attempt_succeeded(&self.tenant, &self.users[user], now).await)?;
                self.model.totp_succeeded(user);
                Ok(())
            }
            Op::SpendTotpStep { device, steps } => {
                let Some(index) = Self::pick(&self.model.devices, device) else { return Ok(()) };
                self.spend_steps(index, &steps).await
            }
            Op::BeginEnrollment { user, totp } => self.begin_enrollment(user, totp).await,
            Op::CompleteEnrollment { enrollment, racers, key, other_tenant } => {
                let Some(index) = Self::pick(&self.model.enrollments, enrollment) else { return Ok(()) };
                self.complete_enrollment(index, racers, key, other_tenant).await
            }
            Op::RemoveDevice { device, other_tenant } => {
                let Some(index) = Self::pick(&self.model.devices, device) else { return Ok(()) };
                let tenant = if other_tenant { &self.other } else { &self.tenant };
                let removed = ok(self.store().remove_device(tenant, &self.model.devices[index].device.id).await)?;
                let expected = self.model.devices[index].present && !other_tenant;
                ensure!(removed == expected, "remove_device: model {expected}, store {removed}");
                self.model.devices[index].present &= !removed;
                self.compare_device(index).await
            }
            Op::ListDevices { user } => {
                let mut got: Vec<DeviceId> =
                    ok(self.store().list_devices(&self.tenant, &self.users[user]).await)?.into_iter().map(|d| d.id).collect();
                let mut expected: Vec<DeviceId> =
                    self.model.devices.iter().filter(|d| d.user == user && d.present).map(|d| d.device.id.clone()).collect();
                got.sort();
                expected.sort();
                ensure!(got == expected, "list_devices: model {expected:?}, store {got:?}");
                Ok(())
            }
            Op::PushToken { device, token: n, disable } => {
                let Some(index) = Self::pick(&self.model.devices, device) else { return Ok(()) };
                let id = self.model.devices[index].device.id.clone();
                if disable {
                    ok(self.store().disable_push(&id, &token(n)).await)?;
                    let model = &mut self.model.devices[index];
                    if model.present && model.device.push_token == token(n) {
                        model.device.push_enabled = false;
                    }
                } else {
                    let set = ok(self.store().set_push_token(&id, &token(n)).await)?;
                    let model = &mut self.model.devices[index];
                    ensure!(set == model.present, "set_push_token: model {}, store {set}", model.present);
                    model.device.push_token = token(n);
                    model.device.push_enabled = true;
                }
                self.compare_device(index).await
            }
        }
    }

    /// A read of challenge `index` (get or watch) against the model.
    fn compare_read(&self, index: usize, other_tenant: bool, got: Option<&Challenge>) -> Result<(), String> {
        let model = &self.model.challenges[index];
        match got {
            None if other_tenant || !model.readable(self.now()) => Ok(()),
            None => Err(format!("{:?} is gone; the model reads it {:?}", model.id, model.state)),
            Some(got) if other_tenant => Err(format!("another tenant read {:?}", got.id)),
            Some(got) if !model.readable(self.now()) => {
                Err(format!("{:?} reads {:?} past its retention (purge at {:?})", got.id, got.state, model.purge_at))
            }
            Some(got) => model.differs(got).map_or(Ok(()), Err),
        }
    }

    /// `racers` creates for one user at once, all with the same request_id (or none).
    async fn create(&mut self, user: usize, request: Option<u8>, ttl_secs: u32, racers: usize) -> Result<(), String> {
        let now = self.now();
        let challenges: Vec<Challenge> = (0..racers)
            .map(|_| Challenge {
                id: ChallengeId::generate().expect("id"),
                tenant: self.tenant.clone(),
                user_id: self.users[user].clone(),
                number: ChallengeNumber::generate().expect("number"),
                state: ChallengeState::Pending,
                deny_reason: None,
                context: SignInContext::default(),
                created_at: now,
                expires_at: now.plus(Duration::from_secs(u64::from(ttl_secs))),
                resolved_at: None,
                resolved_by: None,
                deliveries: vec![],
                request_id: request.map(|r| format!("req-{r}")),
            })
            .collect();
        let calls = challenges
            .iter()
            .map(|challenge| {
                let (fixture, challenge) = (Arc::clone(&self.fixture), challenge.clone());
                async move { fixture.store().create_challenge(challenge, &rules::admission(), now).await }
            })
            .collect();
        let got = race(calls).await?;
        // The racers differ only in their ids, so an order that puts the ones the
        // store created first explains every answer, if any order does.
        let mut order: Vec<usize> = (0..racers).collect();
        order.sort_by_key(|i| !matches!(got[*i], CreateOutcome::Created(_)));
        for i in order {
            let (challenge, outcome) = (&challenges[i], &got[i]);
            let expected = self.model.create(user, challenge, now);
            seen(format!("create: {}", variant(&expected)));
            let fine = match (&expected, outcome) {
                (CreateExpected::Created, CreateOutcome::Created(created)) => created == challenge,
                (CreateExpected::Existing(index), CreateOutcome::Existing(existing)) => {
                    if let Some(difference) = self.model.challenges[*index].differs(existing) {
                        return Err(format!("create {i} of {racers} returned the existing challenge: {difference}"));
                    }
                    true
                }
                (CreateExpected::Blocked(block), CreateOutcome::Refused(Refusal::Blocked(got))) => block == got,
                (CreateExpected::TooManyPending, CreateOutcome::Refused(Refusal::TooManyPending { .. }))
                | (CreateExpected::RateLimited, CreateOutcome::Refused(Refusal::RateLimited { .. })) => true,
                _ => false,
            };
            ensure!(fine, "create {i} of {racers}: model {expected:?}, store {outcome:?} (all: {got:?})");
        }
        Ok(())
    }

    /// Device proofs (`proof` picks one of a few per case) spent by racing calls:
    /// the first use passes, once; later ones fail while the proof is kept.
    async fn spend_proof(&mut self, proof: u8, racers: usize) -> Result<(), String> {
        let now = self.now();
        let mut bytes = self.proof_base;
        bytes[0] = proof;
        let use_of = crate::domain::device::ProofUse(bytes);
        let keep_until = now.plus(Duration::from_secs(240));
        let calls = (0..racers)
            .map(|_| {
                let fixture = Arc::clone(&self.fixture);
                async move { fixture.store().spend_proof(use_of, keep_until).await }
            })
            .collect();
        let got = race(calls).await?;
        let passed = got.iter().filter(|first| **first).count();
        let kept = self.proofs_kept.get(&proof).copied();
        match kept {
            // Kept: every use fails.
            Some(until) if now < until => ensure!(passed == 0, "a proof used before passed again ({passed} of {racers})"),
            // Never used, or past its keep time (when a store may have forgotten it).
            None => ensure!(passed == 1, "{passed} of {racers} racing first uses of a proof passed"),
            Some(_) => ensure!(passed <= 1, "{passed} of {racers} racing uses of a proof passed"),
        }
        seen(format!("spend_proof: {racers} racing, {passed} passed"));
        if passed == 1 {
            self.proofs_kept.insert(proof, keep_until);
        }
        Ok(())
    }

    /// Answers raced on one challenge, maybe with a block of its user among them.
    async fn answer(&mut self, index: usize, answers: &[Answer], block: Option<BlockKind>) -> Result<(), String> {
        let now = self.now();
        let model = self.model.challenges[index].clone();
        let user = model.user;
        // A device's answer goes the phone's way (`Store::answer_challenge`) when
        // the user has a device, by turns between its devices; otherwise, and
        // for the IdP's cancel, by `resolve_challenge`.
        let phones: Vec<Device> =
            self.model.devices.iter().filter(|d| d.user == user && d.present).map(|d| d.device.clone()).collect();
        let mut calls: Vec<Resolving> = Vec::new();
        let mut resolutions: Vec<Resolution> = Vec::new();
        let mut by_device = 0;
        for (i, answer) in answers.iter().enumerate() {
            let phone = phones.get(i % phones.len().max(1)).filter(|_| *answer != Answer::Cancel).cloned();
            let device = phone.as_ref().map_or_else(|| DeviceId::generate().expect("id"), |phone| phone.id.clone());
            let (decision, typed) = match answer {
                Answer::ApproveRight => (Decision::Approve, Some(model.number)),
                Answer::ApproveWrong => (Decision::Approve, Some(wrong(model.number))),
                Answer::Deny => (Decision::Deny, None),
                Answer::ReportFraud => (Decision::ReportFraud, None),
                Answer::Cancel => (Decision::Deny, None),
            };
            let resolution = match answer {
                Answer::Cancel => Resolution::cancelled(),
                _ => decision.resolve(typed, model.number, device.clone()),
            };
            resolutions.push(resolution.clone());
            let (fixture, tenant, id) = (Arc::clone(&self.fixture), self.tenant.clone(), model.id.clone());
            by_device += usize::from(phone.is_some());
            calls.push(match phone {
                Some(phone) => Box::pin(async move {
                    let answer = device_answer(&phone, &id, decision, typed, now);
                    match fixture.store().answer_challenge(&answer, now).await? {
                        Answered::Done { outcome, .. } => Ok(Some(outcome)),
                        Answered::Unknown => Ok(None),
                        other => Err(StoreError::corrupt("model", format!("a device's answer came to {other:?}"))),
                    }
                }),
                None => Box::pin(async move { fixture.store().resolve_challenge(&tenant, &id, resolution, now).await }),
            });
        }
        let blocked_before = self.model.block_in_force(user, now).is_some();
        let new_block = block.map(|kind| self.new_block(kind));
        let blocking = {
            let (fixture, tenant, user_id, new_block) =
                (Arc::clone(&self.fixture), self.tenant.clone(), self.users[user].clone(), new_block.clone());
            tokio::spawn(async move {
                match new_block {
                    Some(block) => fixture.store().block_user(&tenant, &user_id, block, now).await.map(Some),
                    None => Ok(None),
                }
            })
        };
        let outcomes = race(calls).await?;
        let standing = ok(blocking.await.map_err(|e| format!("block_user panicked: {e}"))?)?;
        if let Some(block) = new_block {
            let expected = self.model.block(user, block, now);
            ensure!(standing.as_ref() == Some(&expected), "the block that stands: model {expected:?}, store {standing:?}");
        }

        if !model.readable(now) {
            ensure!(outcomes.iter().all(Option::is_none), "answers to a purged challenge found it: {outcomes:?}");
            return Ok(());
        }
        let Some(outcomes) = outcomes.into_iter().collect::<Option<Vec<_>>>() else {
            return Err(format!("{:?} is gone while the model reads it {:?}", model.id, model.state));
        };
        let accepted: Vec<usize> = (0..outcomes.len()).filter(|i| outcomes[*i].accepted).collect();
        let last = &outcomes[0].challenge;
        seen(format!(
            "answer: {} racing ({by_device} by a device), {} accepted, {:?} -> {:?}",
            outcomes.len(),
            accepted.len(),
            model.state,
            last.state
        ));
        ensure!(
            outcomes.iter().all(|o| o.challenge.state == last.state && o.challenge.resolved_by == last.resolved_by),
            "racing answers read different final states: {:?}",
            outcomes.iter().map(|o| (o.accepted, o.challenge.state, &o.challenge.resolved_by)).collect::<Vec<_>>()
        );
        if model.state.is_final() {
            ensure!(accepted.is_empty(), "an answer to a {:?} challenge was accepted", model.state);
            return model.differs(last).map_or(Ok(()), Err);
        }
        ensure!(accepted.len() <= 1, "{} racing answers were accepted", accepted.len());
        let resolution = match accepted.first() {
            Some(&winner) => {
                let resolution = resolutions[winner].clone();
                ensure!(
                    !(resolution.state == ChallengeState::Approved && blocked_before),
                    "an approval was accepted while the user's block was in force"
                );
                resolution
            }
            None => {
                // The one way no answer wins: an approval refused by a block, which
                // cancels the challenge instead.
                let blocked_now = blocked_before || self.model.block_in_force(user, now).is_some();
                let approving = resolutions.iter().any(|r| r.state == ChallengeState::Approved);
                ensure!(
                    blocked_now && approving && last.state == ChallengeState::Cancelled,
                    "no answer accepted, the challenge reads {:?} (blocked {blocked_now}, an approval among them {approving})",
                    last.state
                );
                Resolution::cancelled()
            }
        };
        self.model.challenges[index].resolve(&resolution, now);
        self.model.challenges[index].differs(last).map_or(Ok(()), Err)
    }

    async fn pending(&self, user: usize) -> Result<(), String> {
        let got = ok(self.store().pending_challenges(&self.tenant, &self.users[user], self.now()).await)?;
        let mut expected: Vec<&ChallengeId> = self
            .model
            .challenges
            .iter()
            .filter(|c| c.user == user && c.state == ChallengeState::Pending)
            .map(|c| &c.id)
            .collect();
        let mut ids: Vec<&ChallengeId> = got.iter().map(|c| &c.id).collect();
        ensure!(got.windows(2).all(|w| w[0].created_at >= w[1].created_at), "pending not newest first: {ids:?}");
        expected.sort();
        ids.sort();
        ensure!(ids == expected, "pending: model {expected:?}, store {ids:?}");
        Ok(())
    }

    async fn reserve_totp(&mut self, user: usize, racers: usize) -> Result<(), String> {
        let now = self.now();
        let calls = (0..racers)
            .map(|_| {
                let (fixture, tenant, user_id) = (Arc::clone(&self.fixture), self.tenant.clone(), self.users[user].clone());
                async move { fixture.store().reserve_totp_attempt(&tenant, &user_id, &rules::totp(), now).await }
            })
            .collect();
        let got = race(calls).await?;
        let expected: Vec<_> = (0..racers).map(|_| self.model.reserve_totp(user, now)).collect();
        expected.iter().for_each(|attempt| {
            seen(match attempt {
                TotpAttempt::Allowed => "reserve_totp: allowed".to_owned(),
                TotpAttempt::Locked { until: None } => "reserve_totp: locked until unblocked".to_owned(),
                TotpAttempt::Locked { until: Some(_) } => "reserve_totp: locked for a while".to_owned(),
            })
        });
        let key = |attempts: &[TotpAttempt]| {
            let mut keys: Vec<String> = attempts.iter().map(|a| format!("{a:?}")).collect();
            keys.sort();
            keys
        };
        ensure!(key(&got) == key(&expected), "racing TOTP reservations: model {expected:?}, store {got:?}");
        Ok(())
    }

    /// Every challenge read once more (a final state never changes), and every
    /// watcher told of the final state its challenge reached.
    async fn finish(&self) -> Result<(), String> {
        let now = self.now();
        for index in 0..self.model.challenges.len() {
            let got = ok(self.store().get_challenge(&self.tenant, &self.model.challenges[index].id, now).await)?;
            self.compare_read(index, false, got.as_ref())?;
        }
        for (index, watch) in &self.watches {
            let model = &self.model.challenges[*index];
            if !model.state.is_final() || !model.readable(now) {
                continue;
            }
            let mut watch = watch.clone();
            let seen = tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|c| c.state == model.state))
                .await
                .is_ok_and(|r| r.is_ok());
            let latest = watch.borrow().clone();
            ensure!(
                seen || latest.state == model.state,
                "the watcher of {:?} reads {:?}, not {:?}",
                model.id,
                latest.state,
                model.state
            );
            model.differs(&latest).map_or(Ok(()), Err)?;
        }
        Ok(())
    }
}
