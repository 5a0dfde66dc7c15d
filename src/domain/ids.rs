//! Identifiers and the secrets made from the OS's random generator.
//!
//! Ids carry 128 random bits (API.md): knowing one challenge id tells nothing about
//! another. They are prefixed by kind (`ch_`, `dv_`, `en_`) so that a misplaced id
//! gives a precise error instead of a puzzling NOT_FOUND.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::DomainError;

/// Fills `buf` from the operating system's generator (getrandom(2) on Linux).
pub fn os_random(buf: &mut [u8]) -> Result<(), DomainError> {
    getrandom::fill(buf).map_err(|e| DomainError::Internal(format!("os random generator failed: {e}")))
}

/// The text of an id: a three-byte prefix and 32 lowercase hex digits (128 bits).
const ID_LEN: usize = 3 + 32;

/// An id's text held inline, without a heap allocation: a broker holds several
/// hundred thousand challenges at once (BENCHMARKS.md, "live challenges"), each
/// naming itself, its devices and its deadline by id.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct IdText([u8; ID_LEN]);

impl IdText {
    fn random(prefix: &str) -> Result<Self, DomainError> {
        let mut random = [0u8; 16];
        os_random(&mut random)?;
        Self::from_bits(prefix, random)
    }

    /// The id with this prefix whose 128 random bits are `bits` ([`IdText::bits`]).
    fn from_bits(prefix: &str, bits: [u8; 16]) -> Result<Self, DomainError> {
        let mut text = [0u8; ID_LEN];
        text[..3].copy_from_slice(prefix.as_bytes());
        hex::encode_to_slice(bits, &mut text[3..]).map_err(|e| DomainError::Internal(format!("id encoding: {e}")))?;
        Ok(Self(text))
    }

    /// `raw` when it is a well-formed id with this prefix.
    fn parse(raw: &str, prefix: &str) -> Option<Self> {
        let well_formed = raw
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.len() == 32 && rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        if !well_formed {
            return None;
        }
        raw.as_bytes().try_into().ok().map(Self)
    }

    /// The 128 random bits behind the hex digits.
    fn bits(&self) -> [u8; 16] {
        let nibble = |digit: u8| if digit.is_ascii_digit() { digit - b'0' } else { digit.wrapping_sub(b'a' - 10) };
        let mut bits = [0u8; 16];
        for (byte, pair) in bits.iter_mut().zip(self.0[3..].chunks_exact(2)) {
            *byte = (nibble(pair[0]) << 4) | nibble(pair[1]);
        }
        bits
    }

    fn as_str(&self) -> &str {
        // Only ASCII is ever stored (checked by `parse`, written by `random`).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

macro_rules! random_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(IdText);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn generate() -> Result<Self, DomainError> {
                IdText::random($prefix).map(Self)
            }

            /// Checks the shape of an id that came from outside; `field` names it in the error.
            pub fn parse(raw: &str) -> Result<Self, DomainError> {
                Self::parse_field(raw, $field)
            }

            pub fn parse_field(raw: &str, field: &'static str) -> Result<Self, DomainError> {
                if raw.is_empty() {
                    return Err(DomainError::invalid(field, "is required"));
                }
                IdText::parse(raw, $prefix)
                    .map(Self)
                    .ok_or_else(|| DomainError::invalid(field, concat!("is not a ", $prefix, "… id")))
            }

            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }

            /// The id's 128 random bits: a compact key for tables of many ids.
            pub fn bits(&self) -> [u8; 16] {
                self.0.bits()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_tuple(stringify!($name)).field(&self.as_str()).finish()
            }
        }

        // Stored and sent as the id's text, as when ids were Strings, in every
        // human-readable format (JSON: the API's payloads, the redb records, Redis).
        // A binary format (postcard: only the embedded store's in-memory records,
        // rebuilt from the JSON on disk at each start) gets the 16 random bytes,
        // less than half the text's 36: a broker holds hundreds of thousands.
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                if serializer.is_human_readable() {
                    serializer.serialize_str(self.as_str())
                } else {
                    self.bits().serialize(serializer)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                if !deserializer.is_human_readable() {
                    let bits = <[u8; 16]>::deserialize(deserializer)?;
                    return IdText::from_bits($prefix, bits).map(Self).map_err(serde::de::Error::custom);
                }
                let raw = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                IdText::parse(&raw, $prefix)
                    .map(Self)
                    .ok_or_else(|| serde::de::Error::custom(concat!("not a ", $prefix, "… id")))
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

    pub fn parse(raw: &str) -> Result<Self, DomainError> {
        if raw.is_empty() {
            return Err(DomainError::invalid("user_id", "is required"));
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
pub fn check_text(field: &'static str, value: &str, max_bytes: usize) -> Result<(), DomainError> {
    if value.len() > max_bytes {
        return Err(DomainError::invalid(field, format!("is longer than {max_bytes} bytes")));
    }
    if let Some(bad) = value.chars().find(|c| spoofs_text(*c)) {
        return Err(DomainError::invalid(
            field,
            format!(
                "contains U+{:04X}: control, format (bidi, zero-width) and line or paragraph separator characters are refused",
                u32::from(bad)
            ),
        ));
    }
    Ok(())
}

/// Characters that can make a prompt read other than it is: controls (Cc), format
/// characters (Cf: bidi overrides such as U+202E, zero-width joiners and spaces)
/// and line and paragraph separators (Zl, Zp). A context that reads
/// "Rotterdam\u{202E}..." could show the user a reversed, invented location.
fn spoofs_text(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory as _};
    matches!(
        c.general_category(),
        GeneralCategory::Control | GeneralCategory::Format | GeneralCategory::LineSeparator | GeneralCategory::ParagraphSeparator
    )
}

/// The two-digit number of a challenge, "10" to "99". It is shown on the sign-in
/// page and typed by the user; it never leaves for a phone and is never logged, so
/// its `Debug` hides it.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChallengeNumber(u8);

impl ChallengeNumber {
    /// Uniform over 10..=99 from the OS generator (rejection sampling, no modulo bias).
    pub fn generate() -> Result<Self, DomainError> {
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
    pub fn generate() -> Result<Self, DomainError> {
        let mut bytes = [0u8; 16];
        os_random(&mut bytes)?;
        Ok(Self(hex::encode(bytes)))
    }

    pub fn from_request(raw: &str) -> Result<Self, DomainError> {
        if raw.is_empty() {
            return Err(DomainError::invalid("enrollment_code", "is required"));
        }
        if raw.len() > 128 || !raw.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(DomainError::invalid("enrollment_code", "is not an enrollment code"));
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
        assert_eq!(hex::encode(a.bits()), a.as_str()[3..], "bits are the hex digits' value");
        assert_ne!(a.bits(), b.bits());
        assert!(ChallengeId::parse(&a.as_str().to_uppercase().replacen("CH_", "ch_", 1)).is_err(), "lowercase hex only");
    }

    #[test]
    fn ids_serialize_as_their_text() {
        let id = DeviceId::generate().expect("id");
        let json = serde_json::to_string(&id).expect("serializes");
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<DeviceId>(&json).expect("deserializes"), id);
        assert!(serde_json::from_str::<DeviceId>(&format!("\"{}\"", ChallengeId::generate().expect("id"))).is_err());
        assert_eq!(format!("{id:?}"), format!("DeviceId({:?})", id.as_str()));
    }

    /// JSON (the API, redb, Redis) keeps an id's text; postcard (the embedded
    /// store's records in memory) its 16 bytes, and gives the same id back.
    #[test]
    fn ids_are_text_in_json_and_sixteen_bytes_in_postcard() {
        let id = ChallengeId::generate().expect("id");
        assert_eq!(serde_json::to_string(&id).expect("json"), format!("\"{id}\""));
        let packed = postcard::to_stdvec(&id).expect("postcard");
        assert_eq!(packed, id.bits().to_vec());
        assert_eq!(postcard::from_bytes::<ChallengeId>(&packed).expect("decodes"), id);
        let device = DeviceId::generate().expect("id");
        let decoded: DeviceId = postcard::from_bytes(&postcard::to_stdvec(&device).expect("postcard")).expect("decodes");
        assert_eq!(decoded.as_str(), device.as_str(), "the prefix comes back with the bits");
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
