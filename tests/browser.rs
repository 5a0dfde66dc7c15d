//! The whole flow in a real browser: the reference IdP pages (examples/idp) in
//! headless Chromium over WebDriver, against a real pushmatch server, with the
//! library's simulated phone scanning the QR code and answering.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them);
//! without them this test says so and passes, unless `PUSHMATCH_BROWSER_TEST=required`.
//! `PUSHMATCH_SCREENSHOTS=docs/screenshots` saves a screenshot of each step
//! (the README's walkthrough).

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

#[path = "support/browser.rs"]
mod browser;

#[path = "../examples/idp/app/mod.rs"]
mod app;

use std::net::SocketAddr;
use std::time::Duration;

use browser::{Browser, screenshot, text_of, wait_for};
use fantoccini::{Client, Locator};
use pushmatch::domain::time::Clock as _;
use pushmatch::domain::totp;
use pushmatch::pb;
use pushmatch::phone::{P256Encoding, PhoneKey, SimulatedPhone};
use support::{KEY_A, TestServer};

/// Serves the IdP pages for tenant "a" of `server` on a free loopback port.
async fn start_idp(server: &TestServer) -> SocketAddr {
    let idp = app::Idp::new(server.channel.clone(), KEY_A).expect("idp");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind idp");
    let addr = listener.local_addr().expect("idp addr");
    tokio::spawn(async move { axum::serve(listener, app::router(idp)).await });
    addr
}

/// Decodes the QR image on the page (a `data:` PNG) with an independent decoder.
async fn scan_qr(client: &Client) -> String {
    use base64::Engine as _;
    let src = wait_for(client, "img#qr").await.attr("src").await.expect("src").expect("the QR has a src");
    let png_base64 = src.strip_prefix("data:image/png;base64,").expect("a PNG data URL");
    let png_bytes = base64::engine::general_purpose::STANDARD.decode(png_base64).expect("base64");
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    // One bit a pixel as the server writes it, read as 8-bit grey.
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().expect("png");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).expect("frame");
    let (width, height) = (info.width as usize, info.height as usize);
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(width, height, |x, y| pixels[y * width + x]);
    let grids = image.detect_grids();
    assert_eq!(grids.len(), 1, "one QR code on the page");
    grids[0].decode().expect("the QR decodes").1
}

/// The page's HTML holds what the person must see (the QR, the number), never the API key.
async fn assert_no_api_key(client: &Client) {
    let html = client.source().await.expect("page source");
    assert!(!html.contains(KEY_A), "the API key is not in the page");
}

async fn click(client: &Client, css: &str) {
    wait_for(client, css).await.click().await.unwrap_or_else(|e| panic!("click {css}: {e}"));
}

/// Waits for the live status to reach `state` and returns its words.
async fn outcome(client: &Client, state: &str) -> String {
    text_of(client, &format!("#status[data-state=\"{state}\"] [data-text]")).await
}

/// Sign-in page → user name → the challenge page; returns the number shown.
async fn sign_in(client: &Client, base: &str, user: &str) -> String {
    client.goto(&format!("{base}/signin")).await.expect("open sign-in");
    wait_for(client, "input#user").await.send_keys(user).await.expect("type user");
    click(client, "button#next").await;
    number_on_page(client).await
}

async fn number_on_page(client: &Client) -> String {
    let number = text_of(client, "#number").await;
    assert!(number.len() == 2 && number.bytes().all(|b| b.is_ascii_digit()), "two digits on the page: {number:?}");
    number
}

/// The phone's one pending challenge.
async fn the_pending_challenge(phone: &mut SimulatedPhone) -> String {
    let pending = phone.pending().await.expect("pending");
    assert_eq!(pending.len(), 1, "one challenge waits on the phone");
    pending[0].challenge_id.clone()
}

async fn answer(phone: &mut SimulatedPhone, decision: pb::Decision, number: &str) -> pb::RespondToChallengeResponse {
    let id = the_pending_challenge(phone).await;
    phone.respond(&id, decision, number).await.expect("respond")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_sign_in_and_devices_in_headless_chromium() {
    let browser = match Browser::find() {
        Ok(browser) => browser,
        Err(missing) if std::env::var("PUSHMATCH_BROWSER_TEST").as_deref() != Ok("required") => {
            // Straight to stderr, past the test harness's capture: the skip shows in every run.
            use std::io::Write as _;
            let line = format!("SKIPPED the browser test: {missing} (apt-get install chromium chromium-driver; .ci/run does)\n");
            let _ = std::io::stderr().write_all(line.as_bytes());
            return;
        }
        Err(missing) => panic!("PUSHMATCH_BROWSER_TEST=required but {missing}"),
    };
    let server = TestServer::start().await;
    let base = format!("http://{}", start_idp(&server).await);
    let driver = browser.start_driver().await;

    // Setup, in Dutch: security info → add method → authenticator app → QR.
    let nl = driver.session("nl").await;
    nl.goto(&format!("{base}/setup?user=jan")).await.expect("open setup");
    assert_eq!(text_of(&nl, "#no-methods").await, "Nog geen aanmeldmethoden.");
    screenshot(&nl, "01-security-info").await;
    click(&nl, "#add-method").await;
    wait_for(&nl, "#authenticator-app").await;
    screenshot(&nl, "02-add-method").await;
    click(&nl, "#authenticator-app").await;
    let uri = scan_qr(&nl).await;
    assert!(uri.starts_with("pushmatch://enroll?"), "{uri}");
    let shown = wait_for(&nl, "#enrollment-uri").await.prop("textContent").await.expect("text").expect("uri text");
    assert_eq!(shown, uri, "\"can't scan?\" shows what the QR encodes");
    assert_eq!(outcome(&nl, "PENDING").await, "Wachten op je telefoon…");
    assert_no_api_key(&nl).await;
    screenshot(&nl, "03-qr-code").await;

    // The phone scans it; the page sees COMPLETED live and offers "try it".
    let mut phone = server.phone(PhoneKey::p256(P256Encoding::Sec1Uncompressed), pb::Platform::Apns);
    let enrolled = phone.enroll(&uri, "Jan's iPhone").await.expect("enroll");
    assert_eq!(outcome(&nl, "COMPLETED").await, "Je authenticator-app is ingesteld.");
    wait_for(&nl, "#try-it:not([hidden]) #try-it-button").await;
    screenshot(&nl, "04-enrolled").await;
    click(&nl, "#try-it-button").await;
    let number = number_on_page(&nl).await;
    assert_no_api_key(&nl).await;
    screenshot(&nl, "05-try-it-number").await;
    assert!(answer(&mut phone, pb::Decision::Approve, &number).await.accepted);
    assert_eq!(outcome(&nl, "APPROVED").await, "Melding goedgekeurd");
    assert!(nl.find(Locator::Css("#number")).await.expect("number").is_displayed().await.ok() == Some(false));
    screenshot(&nl, "06-approved-nl").await;
    nl.close().await.expect("close");

    // Sign-in, in English: approved, denied, wrong number.
    let en = driver.session("en").await;
    let number = sign_in(&en, &base, "jan").await;
    screenshot(&en, "07-sign-in-number").await;
    answer(&mut phone, pb::Decision::Approve, &number).await;
    assert_eq!(outcome(&en, "APPROVED").await, "Notification approved");
    screenshot(&en, "08-approved-en").await;

    sign_in(&en, &base, "jan").await;
    answer(&mut phone, pb::Decision::Deny, "").await;
    assert_eq!(outcome(&en, "DENIED").await, "Notification denied");
    screenshot(&en, "09-denied").await;

    let number = sign_in(&en, &base, "jan").await;
    let wrong = if number == "42" { "43" } else { "42" };
    answer(&mut phone, pb::Decision::Approve, wrong).await;
    assert_eq!(outcome(&en, "DENIED").await, "Wrong number chosen: sign-in denied");

    // "Use a verification code instead": the challenge ends, VerifyTotp decides.
    sign_in(&en, &base, "jan").await;
    let pending_id = the_pending_challenge(&mut phone).await;
    click(&en, "#use-code").await;
    wait_for(&en, "input#code").await;
    screenshot(&en, "10-verification-code").await;
    let cancelled = server.challenges(KEY_A).get_challenge(pb::GetChallengeRequest { challenge_id: pending_id }).await;
    assert_eq!(cancelled.expect("get").into_inner().state(), pb::ChallengeState::Cancelled);
    let secret = enrolled.totp_secret;
    let step = totp::step_at(server.clock.now());
    let valid: Vec<String> = (step - 1..=step + 1).map(|s| totp::code_for_step(&secret, s)).collect();
    let wrong_code = (0..).map(|n| format!("{:06}", 123_456 + n)).find(|c| !valid.contains(c)).expect("a wrong code");
    wait_for(&en, "input#code").await.send_keys(&wrong_code).await.expect("type code");
    click(&en, "#verify").await;
    assert!(text_of(&en, "#code-error").await.starts_with("That code is not right"));
    wait_for(&en, "input#code").await.send_keys(&totp::code_for_step(&secret, step)).await.expect("type code");
    click(&en, "#verify").await;
    assert_eq!(outcome(&en, "APPROVED").await, "Code accepted: you are signed in");
    screenshot(&en, "11-code-accepted").await;

    // Expired: nobody answers before the challenge's deadline (the server's clock moves).
    sign_in(&en, &base, "jan").await;
    server.clock.advance(Duration::from_secs(61));
    assert_eq!(outcome(&en, "EXPIRED").await, "Notification expired: no answer in time");
    screenshot(&en, "12-expired").await;

    // Without JavaScript: no live update, the page reloads itself until the outcome.
    let plain = driver.session_without_javascript("en").await;
    let number = sign_in(&plain, &base, "jan").await;
    // The refresh link inside <noscript> is an element only when scripts are off.
    wait_for(&plain, "a#refresh").await;
    answer(&mut phone, pb::Decision::Approve, &number).await;
    assert_eq!(outcome(&plain, "APPROVED").await, "Notification approved");
    plain.close().await.expect("close");

    // Reported as fraud, then the blocked user's next sign-in.
    let mut piet = server.enrolled_phone("piet", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    sign_in(&en, &base, "piet").await;
    answer(&mut piet, pb::Decision::ReportFraud, "").await;
    assert_eq!(outcome(&en, "FRAUD_REPORTED").await, "Reported as fraud: sign-in blocked");
    en.goto(&format!("{base}/signin")).await.expect("open sign-in");
    wait_for(&en, "input#user").await.send_keys("piet").await.expect("type user");
    click(&en, "button#next").await;
    assert!(text_of(&en, "#message").await.starts_with("Sign-in with notifications is blocked for this account"));
    screenshot(&en, "13-blocked").await;

    // My devices: jan's phone with its push state; remove it.
    en.goto(&format!("{base}/devices?user=jan")).await.expect("open devices");
    let row = format!("tr[data-device=\"{}\"]", phone.device_id());
    assert_eq!(text_of(&en, &format!("{row} .push-state")).await, "notifications on");
    screenshot(&en, "14-my-devices").await;
    click(&en, &format!("{row} button")).await;
    wait_for(&en, "#removed").await;
    assert_eq!(text_of(&en, "#no-devices").await, "No devices.");
    screenshot(&en, "15-device-removed").await;
    let status = phone.pending().await.expect_err("a removed device is refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    en.close().await.expect("close");
}
