//! The Lua scripts: every step that decides runs in Redis as one of these. Each
//! `.lua` file documents its KEYS, ARGV and answer at its top.

use std::sync::Arc;

use redis::Script;

pub(super) struct Scripts {
    /// Creates a challenge within the user's block and limits (`create.lua`).
    pub(super) create: Script,
    /// The compare-and-set that every challenge change goes through, shared with
    /// the background tasks (`challenge_cas.lua`).
    pub(super) challenge_cas: Arc<Script>,
    /// Compare-and-set of a device record (`value_cas.lua`).
    pub(super) value_cas: Script,
    /// Spends an enrollment and adds its device (`enroll.lua`).
    pub(super) enroll: Script,
    /// Counts a strike in a sliding window (`strike.lua`).
    pub(super) strike: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            create: Script::new(include_str!("scripts/create.lua")),
            challenge_cas: Arc::new(Script::new(include_str!("scripts/challenge_cas.lua"))),
            value_cas: Script::new(include_str!("scripts/value_cas.lua")),
            enroll: Script::new(include_str!("scripts/enroll.lua")),
            strike: Script::new(include_str!("scripts/strike.lua")),
        }
    }
}
