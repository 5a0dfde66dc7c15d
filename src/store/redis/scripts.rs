//! The Lua scripts: every step that decides runs in Redis as one of these. Each
//! `.lua` file documents its KEYS, ARGV and answer at its top; `challenge_common.lua`
//! holds what the challenge scripts share.

use std::sync::Arc;

use redis::Script;

pub(super) struct Scripts {
    /// Creates a challenge within the user's block and limits, for the devices its
    /// pushes were chosen from (`create.lua`).
    pub(super) create: Script,
    /// The compare-and-set that every challenge change goes through, shared with
    /// the background tasks (`challenge_cas.lua`).
    pub(super) challenge_cas: Arc<Script>,
    /// A device's answer in one call (`answer.lua`).
    pub(super) answer: Script,
    /// Records deliveries, each in its own field of the challenge (`delivery.lua`).
    pub(super) delivery: Script,
    /// A user's device records and their fingerprint (`devices.lua`).
    pub(super) devices: Script,
    /// A device by its id alone, index and record in one call; one Redis only (`device.lua`).
    pub(super) device: Script,
    /// Compare-and-set of a device record or a user's block (`value_cas.lua`).
    pub(super) value_cas: Script,
    /// Compare-and-delete of a claim: a public key's (`release.lua`).
    pub(super) release: Script,
    /// Inserts an enrollment within the user's cap on open ones (`insert_enrollment.lua`).
    pub(super) insert_enrollment: Script,
    /// Spends an enrollment and adds its device within the user's cap (`enroll.lua`).
    pub(super) enroll: Script,
    /// Counts a strike in a sliding window (`strike.lua`).
    pub(super) strike: Script,
    /// Reserves a VerifyTotp attempt, or answers the lock (`reserve_totp.lua`).
    pub(super) reserve_totp: Script,
    /// Takes back a reserved attempt whose code was right (`totp_succeeded.lua`).
    pub(super) totp_succeeded: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            create: with_user_devices(include_str!("scripts/create.lua")),
            challenge_cas: Arc::new(with_common(include_str!("scripts/challenge_cas.lua"))),
            answer: with_common(include_str!("scripts/answer.lua")),
            delivery: Script::new(include_str!("scripts/delivery.lua")),
            devices: with_user_devices(include_str!("scripts/devices.lua")),
            device: Script::new(include_str!("scripts/device.lua")),
            value_cas: Script::new(include_str!("scripts/value_cas.lua")),
            release: Script::new(include_str!("scripts/release.lua")),
            insert_enrollment: Script::new(include_str!("scripts/insert_enrollment.lua")),
            enroll: Script::new(include_str!("scripts/enroll.lua")),
            strike: Script::new(include_str!("scripts/strike.lua")),
            reserve_totp: Script::new(include_str!("scripts/reserve_totp.lua")),
            totp_succeeded: Script::new(include_str!("scripts/totp_succeeded.lua")),
        }
    }

    /// Every script, to load when a replica connects.
    pub(super) fn all(&self) -> [&Script; 13] {
        [
            &self.create,
            self.challenge_cas.as_ref(),
            &self.answer,
            &self.delivery,
            &self.devices,
            &self.device,
            &self.value_cas,
            &self.release,
            &self.insert_enrollment,
            &self.enroll,
            &self.strike,
            &self.reserve_totp,
            &self.totp_succeeded,
        ]
    }
}

/// A challenge script with `challenge_common.lua` (the rules every change obeys:
/// expiry by both clocks, the block, the commit and its announcement) before it.
fn with_common(script: &str) -> Script {
    Script::new(&format!("{}\n{script}", include_str!("scripts/challenge_common.lua")))
}

/// A script that reads a user's devices, with `user_devices.lua` (the records and
/// their fingerprint) before it.
fn with_user_devices(script: &str) -> Script {
    Script::new(&format!("{}\n{script}", include_str!("scripts/user_devices.lua")))
}
