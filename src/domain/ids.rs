//! Identifiers and the secrets made from the OS's random generator.
//!
//! Ids carry 128 random bits (API.md): knowing one challenge id tells nothing about
//! another. They are prefixed by kind (`ch_`, `dv_`, `en_`) so that a misplaced id
//! gives a precise error instead of a puzzling NOT_FOUND.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::BrokerError;

/// Fills `buf` from the operating system's generator (getrandom(2) on Linux).
pub fn os_random(buf: &mut [u8]) -> Result<(), BrokerError> {
    getrandom::fill(buf).map_err(|e| BrokerError::Internal(format!("os random generator failed: {e}")))
}

/// 128 random bits as 32 lowercase hex digits.
fn random_hex_128() -> Result<String, BrokerError> {
    let mut bytes = [0u8; 16];
    os_random(&mut bytes)?;
    Ok(hex::encode(bytes))
}

macro_rules! random_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn generate() -> Result<Self, BrokerError> {
                Ok(Self(format!("{}{}", $prefix, random_hex_128()?)))
            }

            /// Checks the shape of an id that came from outside; `field` names it in the error.
            pub fn parse(raw: &str) -> Result<Self, BrokerError> {
                Self::parse_field(raw, $field)
            }

            pub fn parse_field(raw: &str, field: &'static str) -> Result<Self, BrokerError> {
                let well_formed = raw
                    .strip_prefix($prefix)
                    .is_some_and(|rest| rest.len() == 32 && rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
                if raw.is_empty() {
                    Err(BrokerError::invalid(field, "is required"))
                } else if well_formed {
                    Ok(Self(raw.to_owned()))
                } else {
                    Err(BrokerError::invalid(field, concat!("is not a ", $prefix, "… id")))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

random_id!(
    /// A challenge: one sign-in attempt.
    ChallengeId, "ch_", "challenge_id"
);
random_id!(
    /// An enrolled device or TOTP credential.
    DeviceId, "dv_", "device_id"
);
random_id!(
    /// One enrollment (a QR code shown on a setup page).
    EnrollmentId, "en_", "enrollment_id"
);

/// A tenant, named by the configuration; its API keys decide who calls as it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TenantId(pub String);

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The IdP's name for a user: opaque to pushmatch, 1 to 256 bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    pub const MAX_BYTES: usize = 256;

    pub fn parse(raw: &str) -> Result<Self, BrokerError> {
        if raw.is_empty() {
            return Err(BrokerError::invalid("user_id", "is required"));
        }
        check_text("user_id", raw, Self::MAX_BYTES)?;
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The shared rule for free text from callers: at most `max_bytes`, no control
/// characters (they could forge lines in logs or in the app's prompt).
pub fn check_text(field: &'static str, value: &str, max_bytes: usize) -> Result<(), BrokerError> {
    if value.len() > max_bytes {
        return Err(BrokerError::invalid(field, format!("is longer than {max_bytes} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(BrokerError::invalid(field, "contains control characters"));
    }
    Ok(())
}

/// The two-digit number of a challenge, "10" to "99". It is shown on the sign-in
/// page and typed by the user; it never leaves for a phone and is never logged, so
/// its `Debug` hides it.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChallengeNumber(u8);

impl ChallengeNumber {
    /// Uniform over 10..=99 from the OS generator (rejection sampling, no modulo bias).
    pub fn generate() -> Result<Self, BrokerError> {
        loop {
            let mut byte = [0u8; 1];
            os_random(&mut byte)?;
            // 180 = 2 * 90: the largest multiple of 90 that fits in a byte.
            if byte[0] < 180 {
                return Ok(Self(10 + byte[0] % 90));
            }
        }
    }

    /// Parses what a user typed: exactly two ASCII digits.
    pub fn parse_typed(raw: &str) -> Option<Self> {
        let bytes = raw.as_bytes();
        if bytes.len() == 2 && bytes.iter().all(u8::is_ascii_digit) {
            Some(Self((bytes[0] - b'0') * 10 + (bytes[1] - b'0')))
        } else {
            None
        }
    }

    pub fn value(self) -> u8 {
        self.0
    }

    pub fn to_digits(self) -> String {
        format!("{:02}", self.0)
    }
}

impl fmt::Debug for ChallengeNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChallengeNumber(**)")
    }
}

/// A one-time enrollment code: 128 random bits as 32 hex digits. Only its SHA-256
/// digest is stored, so a copy of the store cannot enroll a device.
pub struct EnrollmentCode(String);

impl EnrollmentCode {
    pub fn generate() -> Result<Self, BrokerError> {
        Ok(Self(random_hex_128()?))
    }

    pub fn from_request(raw: &str) -> Result<Self, BrokerError> {
        if raw.is_empty() {
            return Err(BrokerError::invalid("enrollment_code", "is required"));
        }
        if raw.len() > 128 || !raw.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(BrokerError::invalid("enrollment_code", "is not an enrollment code"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn digest(&self) -> CodeDigest {
        CodeDigest(hex::encode(Sha256::digest(self.0.as_bytes())))
    }
}

impl fmt::Debug for EnrollmentCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EnrollmentCode(<redacted>)")
    }
}

/// SHA-256 of an enrollment code, hex: how the stores find an enrollment by its code.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CodeDigest(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_unique_and_parse_back() {
        let a = ChallengeId::generate().expect("id");
        let b = ChallengeId::generate().expect("id");
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("ch_"));
        assert_eq!(ChallengeId::parse(a.as_str()).expect("parses"), a);
        assert!(DeviceId::parse(a.as_str()).is_err(), "a challenge id is not a device id");
        assert!(ChallengeId::parse("ch_0123").is_err());
        assert!(ChallengeId::parse("").is_err());
    }

    #[test]
    fn numbers_stay_in_range_and_cover_it() {
        let mut seen = [false; 100];
        for _ in 0..20_000 {
            let n = ChallengeNumber::generate().expect("number").value();
            assert!((10..=99).contains(&n), "{n} out of range");
            seen[usize::from(n)] = true;
        }
        assert!(seen[10..=99].iter().all(|s| *s), "every number from 10 to 99 appears");
    }

    #[test]
    fn typed_numbers_are_exactly_two_digits() {
        assert_eq!(ChallengeNumber::parse_typed("42").map(ChallengeNumber::value), Some(42));
        assert_eq!(ChallengeNumber::parse_typed("07").map(ChallengeNumber::value), Some(7));
        for bad in ["", "4", "420", "4a", " 42", "٤٢"] {
            assert!(ChallengeNumber::parse_typed(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn number_debug_hides_the_value() {
        let n = ChallengeNumber::parse_typed("42").expect("number");
        assert!(!format!("{n:?}").contains("42"));
    }

    #[test]
    fn free_text_rejects_control_characters_and_oversize() {
        assert!(check_text("f", "Rotterdam, NL", 256).is_ok());
        assert!(check_text("f", "a\nb", 256).is_err());
        assert!(check_text("f", &"x".repeat(257), 256).is_err());
        assert!(UserId::parse("").is_err());
    }
}
