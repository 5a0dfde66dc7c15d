//! What the push providers send back: APNs and FCM answers to a push
//! (`push::apns::classify`, `push::fcm::classify`), the OAuth token endpoint's
//! answer to FCM's grant (`push::fcm::read_grant`), and the credentials files the
//! operator supplies (`ServiceAccount::from_json`, `ProviderTokens::from_pkcs8_pem`).
//!
//! Input: a selector byte, two bytes of HTTP status, a length-prefixed
//! `Retry-After` value, then the body. Checked: no panic; a success is `Sent`; the
//! reason recorded for a delivery (shown in gRPC answers) is a plain provider
//! code or `HTTP <status>`, never the provider's free text; a granted token makes a
//! valid header value.

#![no_main]

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use pushmatch::push::SendOutcome;
use pushmatch::push::apns::ProviderTokens;
use pushmatch::push::fcm::{ServiceAccount, read_grant};
use pushmatch::push::transport::Response;

fn plain_reason(reason: &str, status: StatusCode) {
    let plain = !reason.is_empty() && reason.len() <= 64 && reason.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    assert!(plain || reason == format!("HTTP {}", status.as_u16()), "reason {reason:?}");
}

fn check(outcome: SendOutcome, status: StatusCode) {
    match outcome {
        SendOutcome::Sent => assert!(status.is_success()),
        SendOutcome::Unregistered { reason } | SendOutcome::Failed { reason } => plain_reason(&reason, status),
        SendOutcome::Retry { reason, after } => {
            plain_reason(&reason, status);
            assert!(status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error());
            let _ = after;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let selector = data[0];
    let Ok(status) = StatusCode::from_u16(100 + u16::from_le_bytes([data[1], data[2]]) % 900) else { return };
    let retry_len = usize::from(data[3]).min(data.len() - 4) % 32;
    let (retry, body) = data[4..].split_at(retry_len);
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(retry) {
        headers.insert(http::header::RETRY_AFTER, value);
    }
    let response = Response { status, headers, body: Bytes::copy_from_slice(body) };
    let _ = response.retry_after();
    match selector % 5 {
        0 => check(pushmatch::push::apns::classify(&response), status),
        1 => check(pushmatch::push::fcm::classify(&response), status),
        2 => {
            if let Ok((authorization, _lifetime)) = read_grant(&response) {
                assert!(status.is_success());
                assert!(authorization.as_bytes().starts_with(b"Bearer "));
            }
        }
        3 => {
            if let Err(message) = ServiceAccount::from_json(body) {
                assert!(!message.is_empty());
            }
        }
        _ => {
            let Ok(pem) = std::str::from_utf8(body) else { return };
            let _ = ProviderTokens::from_pkcs8_pem("KEY1234567", "ABCDE12345", pem);
        }
    }
});
