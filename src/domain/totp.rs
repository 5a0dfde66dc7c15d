//! TOTP (RFC 6238): the offline fallback. SHA1, 6 digits, 30-second steps, the
//! current step and one either side. totp-rs computes the codes; which steps are
//! accepted, and that each is accepted once, is decided here and in the store.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, TOTP};

use super::error::DomainError;
use super::ids::os_random;
use super::time::Millis;

pub const STEP_SECONDS: u64 = 30;
pub const DIGITS: usize = 6;
/// 160 bits, as RFC 4226 recommends for HMAC-SHA1.
pub const SECRET_BYTES: usize = 20;

pub fn generate_secret() -> Result<Vec<u8>, DomainError> {
    let mut secret = vec![0u8; SECRET_BYTES];
    os_random(&mut secret)?;
    Ok(secret)
}

fn totp(secret: &[u8]) -> TOTP {
    TOTP::new_unchecked(Algorithm::SHA1, DIGITS, 0, STEP_SECONDS, secret.to_vec())
}

/// The time step that contains `at`.
pub fn step_at(at: Millis) -> u64 {
    u64::try_from(at.as_unix_seconds()).unwrap_or(0) / STEP_SECONDS
}

/// The code of `step`.
pub fn code_for_step(secret: &[u8], step: u64) -> String {
    totp(secret).generate(step * STEP_SECONDS)
}

/// A code as typed: exactly six ASCII digits.
pub fn check_code_shape(code: &str) -> Result<(), DomainError> {
    if code.len() == DIGITS && code.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(DomainError::invalid("code", "must be exactly 6 digits"))
    }
}

/// The step among now-1, now and now+1 whose code is `code` (compared in constant
/// time), if any. Every candidate is compared, so timing says nothing about which.
pub fn matching_step(secret: &[u8], code: &str, now: Millis) -> Option<u64> {
    let current = step_at(now);
    let mut found = None;
    for step in current.saturating_sub(1)..=current + 1 {
        if bool::from(code_for_step(secret, step).as_bytes().ct_eq(code.as_bytes())) {
            found = Some(step);
        }
    }
    found
}

const LABEL: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'@');

/// The standard key URI of API.md, for any authenticator app:
/// `otpauth://totp/<issuer>:<account>?secret=<BASE32>&issuer=<issuer>&algorithm=SHA1&digits=6&period=30`.
pub fn otpauth_uri(issuer: &str, account: &str, secret: &[u8]) -> String {
    let issuer = utf8_percent_encode(issuer, LABEL).to_string();
    let account = utf8_percent_encode(account, LABEL).to_string();
    let secret = data_encoding::BASE32_NOPAD.encode(secret);
    format!(
        "otpauth://totp/{issuer}:{account}?secret={secret}&issuer={issuer}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECONDS}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA1 (seed "12345678901234567890"). The RFC prints
    /// 8 digits; a 6-digit code is the same truncation modulo 10^6, so its last six.
    #[test]
    fn rfc6238_appendix_b_vectors() {
        let secret = b"12345678901234567890";
        for (unix_seconds, eight_digits) in [
            (59i64, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
            (20_000_000_000, "65353130"),
        ] {
            let at = Millis(unix_seconds * 1000);
            assert_eq!(code_for_step(secret, step_at(at)), eight_digits[2..], "T = {unix_seconds}");
            assert_eq!(matching_step(secret, &eight_digits[2..], at), Some(step_at(at)), "verifies at T = {unix_seconds}");
        }
    }

    #[test]
    fn the_window_is_one_step_either_side() {
        let secret = generate_secret().expect("secret");
        let now = Millis(1_700_000_015_000);
        let current = step_at(now);
        for step in [current - 1, current, current + 1] {
            assert_eq!(matching_step(&secret, &code_for_step(&secret, step), now), Some(step));
        }
        for step in [current - 2, current + 2] {
            let code = code_for_step(&secret, step);
            // A far code can collide with a near one by chance (1 in 10^6 a step); skip that case.
            if [current - 1, current, current + 1].iter().all(|s| code_for_step(&secret, *s) != code) {
                assert_eq!(matching_step(&secret, &code, now), None);
            }
        }
    }

    #[test]
    fn uri_is_the_standard_key_uri() {
        let uri = otpauth_uri("Gors & Co", "jan@gors.nl", b"12345678901234567890");
        assert_eq!(
            uri,
            "otpauth://totp/Gors%20%26%20Co:jan@gors.nl?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=Gors%20%26%20Co&algorithm=SHA1&digits=6&period=30"
        );
    }

    #[test]
    fn codes_are_exactly_six_digits() {
        assert!(check_code_shape("123456").is_ok());
        for bad in ["12345", "1234567", "12345a", " 12345", "١٢٣٤٥٦"] {
            assert!(check_code_shape(bad).is_err(), "{bad:?}");
        }
    }
}
