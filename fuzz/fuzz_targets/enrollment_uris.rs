//! The enrollment URIs: the `pushmatch://enroll?...` URI the server writes
//! (`domain::enrollment::push_enrollment_uri`) and the phone reads
//! (`phone::enrollment_code_from_uri`), and the `otpauth://totp/...` key URI
//! (`domain::totp::otpauth_uri`) any authenticator app reads.
//!
//! The input is split at 0xFF bytes into the server URL, the issuer, the account
//! name, the code and the TOTP secret. Checked: no panic; the phone reads back the
//! very code the server wrote; every query parameter (and the otpauth label) decodes
//! back to what went in; the encoded text is plain ASCII with no separator that
//! could inject a parameter. (Rendering the QR code is too slow to fuzz, some
//! 30 inputs a second; the unit test `the_longest_uri_the_api_allows_renders` in
//! src/domain/enrollment.rs covers the largest URI the API lets through.)
//! The whole input is also handed to the phone's parser as a URI of its own.

#![no_main]

use libfuzzer_sys::fuzz_target;
use percent_encoding::percent_decode_str;
use pushmatch::domain::enrollment::push_enrollment_uri;
use pushmatch::domain::ids::EnrollmentCode;
use pushmatch::domain::totp::otpauth_uri;
use pushmatch::phone::enrollment_code_from_uri;

fn decoded(component: &str) -> String {
    percent_decode_str(component).decode_utf8().expect("the server encodes UTF-8").into_owned()
}

/// The query parameters of `uri` after `prefix`, decoded.
fn parameters(uri: &str, prefix: &str) -> Vec<(String, String)> {
    let query = uri.strip_prefix(prefix).expect("the URI starts with its scheme");
    query
        .split('&')
        .map(|pair| {
            let (name, value) = pair.split_once('=').expect("name=value");
            (name.to_owned(), decoded(value))
        })
        .collect()
}

fn value<'a>(parameters: &'a [(String, String)], name: &str) -> &'a str {
    let found: Vec<&str> = parameters.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect();
    assert_eq!(found.len(), 1, "{name} appears once");
    found[0]
}

fuzz_target!(|data: &[u8]| {
    // The phone reads whatever a QR code held.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = enrollment_code_from_uri(text);
    }

    let mut parts = data.split(|&b| b == 0xFF);
    let (Some(_), Some(server), Some(issuer), Some(account), Some(code), Some(secret)) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let (Ok(server), Ok(issuer), Ok(account), Ok(code)) =
        (std::str::from_utf8(server), std::str::from_utf8(issuer), std::str::from_utf8(account), std::str::from_utf8(code))
    else {
        return;
    };
    let code = match EnrollmentCode::from_request(code) {
        Ok(code) => code,
        Err(_) => EnrollmentCode::generate().expect("a fresh code"),
    };

    let uri = push_enrollment_uri(server, &code, issuer, account);
    assert!(uri.bytes().all(|b| b.is_ascii_graphic()), "{uri:?}");
    assert_eq!(enrollment_code_from_uri(&uri).as_deref(), Some(code.expose()), "the phone reads the code back");
    let read = parameters(&uri, "pushmatch://enroll?");
    assert_eq!(read.len(), 5, "no component adds a parameter: {uri}");
    assert_eq!(value(&read, "v"), "1");
    assert_eq!(value(&read, "server"), server);
    assert_eq!(value(&read, "code"), code.expose());
    assert_eq!(value(&read, "issuer"), issuer);
    assert_eq!(value(&read, "account"), account);

    let key = otpauth_uri(issuer, account, secret);
    assert!(key.bytes().all(|b| b.is_ascii_graphic()), "{key:?}");
    let (label, query) = key.strip_prefix("otpauth://totp/").expect("scheme").split_once('?').expect("a query");
    let (label_issuer, label_account) = label.split_once(':').expect("issuer:account");
    assert_eq!(decoded(label_issuer), issuer);
    assert_eq!(decoded(label_account), account);
    let read = parameters(&format!("?{query}"), "?");
    assert_eq!(read.len(), 5, "no component adds a parameter: {key}");
    assert_eq!(data_encoding::BASE32_NOPAD.decode(value(&read, "secret").as_bytes()).expect("base32"), secret);
    assert_eq!(value(&read, "issuer"), issuer);
});
