//! Challenges: one sign-in attempt, its number, its state machine and its deliveries.

use serde::{Deserialize, Serialize};

use super::device::Device;
use super::error::DomainError;
use super::ids::{ChallengeId, ChallengeNumber, DeviceId, TenantId, UserId, check_text};
use super::time::Millis;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChallengeState {
    Pending,
    Approved,
    Denied,
    Expired,
    Cancelled,
    FraudReported,
}

impl ChallengeState {
    /// A final state never changes again.
    pub fn is_final(self) -> bool {
        self != ChallengeState::Pending
    }

    /// The state's name as API.md spells it (and as the proto's enum does, less
    /// its `CHALLENGE_STATE_` prefix): the one place a state becomes text. Push
    /// payloads carry it; metric labels use it in lower case.
    pub fn name(self) -> &'static str {
        match self {
            ChallengeState::Pending => "PENDING",
            ChallengeState::Approved => "APPROVED",
            ChallengeState::Denied => "DENIED",
            ChallengeState::Expired => "EXPIRED",
            ChallengeState::Cancelled => "CANCELLED",
            ChallengeState::FraudReported => "FRAUD_REPORTED",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DenyReason {
    UserDenied,
    WrongNumber,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Platform {
    Apns,
    Fcm,
    /// Web Push (RFC 8030): browsers and UnifiedPush distributors. Last, so the
    /// stores' encodings of the others stay as they were.
    WebPush,
}

impl Platform {
    /// Every platform, in the order of [`Platform::index`].
    pub const ALL: [Platform; 3] = [Platform::Apns, Platform::Fcm, Platform::WebPush];

    pub fn name(self) -> &'static str {
        match self {
            Platform::Apns => "apns",
            Platform::Fcm => "fcm",
            Platform::WebPush => "webpush",
        }
    }

    /// Its place in [`Platform::ALL`], for tables with one slot per platform.
    pub fn index(self) -> usize {
        match self {
            Platform::Apns => 0,
            Platform::Fcm => 1,
            Platform::WebPush => 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryState {
    Queued,
    Sent,
    Failed,
    Unregistered,
}

/// What became of the push to one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub device_id: DeviceId,
    pub platform: Platform,
    pub state: DeliveryState,
    pub attempts: u32,
    /// The provider's reason, e.g. "Unregistered"; empty when there is none.
    pub error: String,
}

impl Delivery {
    /// A new challenge's delivery to `device`, QUEUED; `None` for a device without
    /// a platform (TOTP only), which takes no pushes.
    pub fn queued(device: &Device) -> Option<Self> {
        Some(Self {
            device_id: device.id.clone(),
            platform: device.platform?,
            state: DeliveryState::Queued,
            attempts: 0,
            error: String::new(),
        })
    }
}

/// How many more pushes each platform's queue takes now, by [`Platform::index`]
/// (the tenant's share and the queue's own room, the smaller): what lets a store
/// choose a new challenge's pushes in its create's own step
/// ([`crate::domain::ports::PushesFrom::Store`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PushRoom(pub [usize; Platform::ALL.len()]);

impl PushRoom {
    /// The deliveries of a new challenge to `devices` (in their order): one QUEUED
    /// for each that takes pushes. `None` when none of them can answer a challenge
    /// or the pushes do not fit: the caller then decides from the devices, which
    /// names the reason.
    pub fn choose(&self, devices: &[Device]) -> Option<Vec<Delivery>> {
        if !devices.iter().any(Device::answers_challenges) {
            return None;
        }
        let deliveries: Vec<Delivery> =
            devices.iter().filter(|device| device.takes_pushes()).filter_map(Delivery::queued).collect();
        let fits = Platform::ALL.iter().all(|platform| {
            deliveries.iter().filter(|delivery| delivery.platform == *platform).count() <= self.0[platform.index()]
        });
        fits.then_some(deliveries)
    }
}

/// What the app shows beside the number prompt. Each field at most 256 bytes of
/// UTF-8 without control characters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignInContext {
    pub application: String,
    pub ip_address: String,
    pub location: String,
    pub user_agent: String,
}

impl SignInContext {
    pub const MAX_FIELD_BYTES: usize = 256;

    pub fn new(application: String, ip_address: String, location: String, user_agent: String) -> Result<Self, DomainError> {
        for (field, value) in [
            ("context.application", &application),
            ("context.ip_address", &ip_address),
            ("context.location", &location),
            ("context.user_agent", &user_agent),
        ] {
            check_text(field, value, Self::MAX_FIELD_BYTES)?;
        }
        Ok(Self { application, ip_address, location, user_agent })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    pub id: ChallengeId,
    pub tenant: TenantId,
    pub user_id: UserId,
    pub number: ChallengeNumber,
    pub state: ChallengeState,
    pub deny_reason: Option<DenyReason>,
    pub context: SignInContext,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub resolved_at: Option<Millis>,
    pub resolved_by: Option<DeviceId>,
    pub deliveries: Vec<Delivery>,
    /// The IdP's idempotency key, if it gave one.
    pub request_id: Option<String>,
}

impl Challenge {
    /// Applies a resolution if the challenge is still pending; returns whether it did.
    /// Every store resolves through this, so the state machine lives in one place.
    pub fn apply(&mut self, resolution: &Resolution, now: Millis) -> bool {
        if self.state.is_final() {
            return false;
        }
        self.state = resolution.state;
        self.deny_reason = resolution.deny_reason;
        self.resolved_at = Some(now);
        self.resolved_by = resolution.device_id.clone();
        true
    }

    /// Marks a pending challenge past its expiry as EXPIRED; returns whether it did.
    pub fn expire_if_due(&mut self, now: Millis) -> bool {
        if self.state == ChallengeState::Pending && now >= self.expires_at {
            self.state = ChallengeState::Expired;
            self.resolved_at = Some(self.expires_at);
            true
        } else {
            false
        }
    }

    /// Records one delivery's latest state; returns whether anything changed.
    pub fn record_delivery(&mut self, delivery: Delivery) -> bool {
        match self.deliveries.iter_mut().find(|d| d.device_id == delivery.device_id) {
            Some(existing) if *existing == delivery => false,
            Some(existing) => {
                *existing = delivery;
                true
            }
            None => {
                self.deliveries.push(delivery);
                true
            }
        }
    }
}

/// How a challenge ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    pub state: ChallengeState,
    pub deny_reason: Option<DenyReason>,
    pub device_id: Option<DeviceId>,
}

impl Resolution {
    pub fn cancelled() -> Self {
        Self { state: ChallengeState::Cancelled, deny_reason: None, device_id: None }
    }
}

/// A device's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Approve,
    Deny,
    ReportFraud,
}

impl Decision {
    /// The proto enum name, as it appears in the device's signing string.
    pub fn proto_name(self) -> &'static str {
        match self {
            Decision::Approve => "DECISION_APPROVE",
            Decision::Deny => "DECISION_DENY",
            Decision::ReportFraud => "DECISION_REPORT_FRAUD",
        }
    }

    /// What the answer does to a challenge whose number is `expected`. An approval
    /// with another number denies: one try, no guessing.
    pub fn resolve(self, typed: Option<ChallengeNumber>, expected: ChallengeNumber, device_id: DeviceId) -> Resolution {
        let (on_match, otherwise) = self.resolutions(device_id);
        if typed == Some(expected) { on_match } else { otherwise }
    }

    /// The answer's resolution when the number typed is the challenge's, and when
    /// it is not (or none was typed): what a store that compares the numbers
    /// itself chooses between (see [`crate::store::DeviceAnswer`]).
    pub fn resolutions(self, device_id: DeviceId) -> (Resolution, Resolution) {
        let (on_match, otherwise) = match self {
            Decision::Approve => ((ChallengeState::Approved, None), (ChallengeState::Denied, Some(DenyReason::WrongNumber))),
            Decision::Deny => {
                let denied = (ChallengeState::Denied, Some(DenyReason::UserDenied));
                (denied, denied)
            }
            Decision::ReportFraud => ((ChallengeState::FraudReported, None), (ChallengeState::FraudReported, None)),
        };
        let resolution = |(state, deny_reason)| Resolution { state, deny_reason, device_id: Some(device_id.clone()) };
        (resolution(on_match), resolution(otherwise))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(raw: &str) -> ChallengeNumber {
        ChallengeNumber::parse_typed(raw).expect("number")
    }

    fn pending() -> Challenge {
        Challenge {
            id: ChallengeId::generate().expect("id"),
            tenant: TenantId("t".into()),
            user_id: UserId::parse("u").expect("user"),
            number: number("42"),
            state: ChallengeState::Pending,
            deny_reason: None,
            context: SignInContext::default(),
            created_at: Millis(0),
            expires_at: Millis(60_000),
            resolved_at: None,
            resolved_by: None,
            deliveries: vec![],
            request_id: None,
        }
    }

    #[test]
    fn approval_needs_the_right_number() {
        let device = DeviceId::generate().expect("id");
        let right = Decision::Approve.resolve(Some(number("42")), number("42"), device.clone());
        assert_eq!(right.state, ChallengeState::Approved);
        let wrong = Decision::Approve.resolve(Some(number("24")), number("42"), device.clone());
        assert_eq!((wrong.state, wrong.deny_reason), (ChallengeState::Denied, Some(DenyReason::WrongNumber)));
        let fraud = Decision::ReportFraud.resolve(None, number("42"), device);
        assert_eq!(fraud.state, ChallengeState::FraudReported);
    }

    #[test]
    fn a_challenge_resolves_once() {
        let mut challenge = pending();
        let device = DeviceId::generate().expect("id");
        assert!(challenge.apply(&Decision::Deny.resolve(None, number("42"), device.clone()), Millis(1)));
        assert!(!challenge.apply(&Resolution::cancelled(), Millis(2)));
        assert_eq!(challenge.state, ChallengeState::Denied);
        assert_eq!(challenge.resolved_by, Some(device));
    }

    #[test]
    fn expiry_applies_only_at_or_after_the_deadline() {
        let mut challenge = pending();
        assert!(!challenge.expire_if_due(Millis(59_999)));
        assert!(challenge.expire_if_due(Millis(60_000)));
        assert_eq!(challenge.state, ChallengeState::Expired);
        assert!(!challenge.apply(&Resolution::cancelled(), Millis(60_001)));
    }

    #[test]
    fn context_fields_are_checked_by_name() {
        let err = SignInContext::new("a".into(), "b".into(), "x\u{7}".into(), "d".into()).expect_err("bell char");
        assert!(err.to_string().starts_with("context.location"));
        let err = SignInContext::new("a".into(), "b".into(), "c".into(), "u".repeat(257)).expect_err("oversize");
        assert!(err.to_string().starts_with("context.user_agent"));
    }
}
