//! Criterion micro-benchmarks of the hot paths of a sign-in: number and id
//! generation, the device signature checks, the APNs provider token, and the
//! embedded store's create and resolve and a device's touch and read, the enrollment QR code,
//! and one call through the gRPC telemetry layer under the shipped `info` log level.
//! `cargo bench --bench hot_paths`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use p256::ecdsa::signature::Signer as _;
use p256::elliptic_curve::rand_core::OsRng;
use pushmatch::domain::challenge::Decision;
use pushmatch::domain::device::{DevicePublicKey, KeyAlgorithm};
use pushmatch::domain::ids::{ChallengeId, ChallengeNumber, DeviceId, TenantId, UserId};
use pushmatch::domain::time::{Clock as _, ManualClock, Millis};
use pushmatch::push::apns::ProviderTokens;
use pushmatch::store::conformance::{sample_challenge, sample_device, sample_enrollment};
use pushmatch::store::embedded::EmbeddedStore;
use pushmatch::store::{AdmissionPolicy, EnrollmentLimits, Store};
use pushmatch::telemetry::grpc::GrpcTelemetryLayer;

fn ids_and_numbers(c: &mut Criterion) {
    c.bench_function("challenge number (OS random, rejection sampled)", |b| b.iter(ChallengeNumber::generate));
    c.bench_function("challenge id (128 bits, OS random)", |b| b.iter(ChallengeId::generate));
}

fn signatures(c: &mut Criterion) {
    let message = b"pushmatch/v1\nRespondToChallenge\ndv_0123456789abcdef0123456789abcdef\n1732800000000\nch_0123456789abcdef0123456789abcdef\nDECISION_APPROVE\n42";
    let p256 = p256::ecdsa::SigningKey::random(&mut OsRng);
    let p256_key =
        DevicePublicKey::new(KeyAlgorithm::EcdsaP256Sha256, p256.verifying_key().to_encoded_point(false).as_bytes().to_vec())
            .unwrap();
    let p256_signature: p256::ecdsa::Signature = p256.sign(message);
    let raw = p256_signature.to_vec();
    let der = p256_signature.to_der().as_bytes().to_vec();
    c.bench_function("verify P-256 (raw r||s)", |b| b.iter(|| assert!(p256_key.verifies(message, &raw))));
    c.bench_function("verify P-256 (DER)", |b| b.iter(|| assert!(p256_key.verifies(message, &der))));
    let ed = ed25519_dalek::SigningKey::generate(&mut OsRng);
    let ed_key = DevicePublicKey::new(KeyAlgorithm::Ed25519, ed.verifying_key().to_bytes().to_vec()).unwrap();
    let ed_signature = ed25519_dalek::Signer::sign(&ed, message).to_bytes().to_vec();
    c.bench_function("verify Ed25519", |b| b.iter(|| assert!(ed_key.verifies(message, &ed_signature))));
}

fn apns_token(c: &mut Criterion) {
    use p256::pkcs8::EncodePrivateKey as _;
    let pem = p256::ecdsa::SigningKey::random(&mut OsRng).to_pkcs8_pem(p256::pkcs8::LineEnding::LF).unwrap().to_string();
    let tokens = ProviderTokens::from_pkcs8_pem("KEY1234567", "ABCDE12345", &pem).unwrap();
    let mut now = 1_732_800_000u64;
    c.bench_function("APNs provider token: sign a new ES256 JWT", |b| {
        b.iter(|| {
            // An hour later each time: the cached token is too old and is signed anew.
            now += 3_600;
            tokens.current(now)
        });
    });
    c.bench_function("APNs provider token: the cached one", |b| b.iter(|| tokens.current(now)));
}

fn store(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Millis(1_732_800_000_000));
    let store = runtime.block_on(EmbeddedStore::open(dir.path(), Arc::new(clock.clone()))).unwrap();
    let policy = AdmissionPolicy {
        max_pending: u32::MAX,
        max_per_window: u32::MAX,
        window: Duration::from_secs(600),
        retention: Duration::from_secs(300),
        report_retention: Duration::from_secs(900),
    };
    let tenant = TenantId("bench".into());
    let device = DeviceId::generate().unwrap();
    let mut user = 0u64;
    let advancing = clock.clone();
    let mut new_challenge = || {
        user += 1;
        if user.is_multiple_of(10_000) {
            // Let old challenges expire and be purged, so memory stays flat however
            // many iterations criterion runs.
            advancing.advance(Duration::from_secs(400));
        }
        let user_id = UserId::parse(&format!("user-{}", user % 10_000)).unwrap();
        sample_challenge(&tenant, &user_id, advancing.now(), None)
    };
    c.bench_function("embedded store: create challenge", |b| {
        b.iter(|| {
            let challenge = new_challenge();
            let now = challenge.created_at;
            runtime.block_on(store.create_challenge(challenge, &policy, now)).unwrap()
        });
    });
    c.bench_function("embedded store: create then resolve", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let challenge = new_challenge();
                let (id, number, now) = (challenge.id.clone(), challenge.number, challenge.created_at);
                store.create_challenge(challenge, &policy, now).await.unwrap();
                let resolution = Decision::Approve.resolve(Some(number), number, device.clone());
                let outcome = store.resolve_challenge(&tenant, &id, resolution, now).await.unwrap().unwrap();
                assert!(outcome.accepted);
            });
        });
    });

    // An answer's last use: a device enrolled through the store, touched.
    let user_id = UserId::parse("touched").unwrap();
    let enrolled = sample_device(&tenant, &user_id, clock.now());
    let enrollment = sample_enrollment(&tenant, &user_id, clock.now());
    let code = enrollment.code_digest.clone().unwrap();
    let limits = EnrollmentLimits { max_devices: 10, max_open_enrollments: 5 };
    runtime.block_on(async {
        store.insert_enrollment(enrollment, &limits, clock.now()).await.unwrap();
        store.complete_enrollment(&code, enrolled.clone(), &limits, clock.now()).await.unwrap();
    });
    // The touch the bench repeats lands (checked before it, so that a filter that
    // skips the bench skips nothing else).
    let mut at = clock.now().plus(Duration::from_millis(1));
    runtime.block_on(store.touch_device(&enrolled.id, at)).unwrap();
    assert_eq!(runtime.block_on(store.get_device(&enrolled.id)).unwrap().unwrap().last_used_at, Some(at));
    c.bench_function("embedded store: touch a device (an answer's last use)", |b| {
        b.iter(|| {
            at = at.plus(Duration::from_millis(1));
            runtime.block_on(store.touch_device(&enrolled.id, at)).unwrap();
        });
    });
    c.bench_function("embedded store: read a device (each answer and each create does)", |b| {
        b.iter(|| runtime.block_on(store.get_device(&enrolled.id)).unwrap().unwrap());
    });
}

/// The enrollment QR code of a typical URI: the `qrcode` crate choosing its mask,
/// the same code with the mask chosen by `domain::qr`, and the whole PNG.
fn enrollment_qr(c: &mut Criterion) {
    let code = pushmatch::domain::ids::EnrollmentCode::generate().expect("code");
    let uri = pushmatch::domain::enrollment::push_enrollment_uri("https://mfa.gors.nl", &code, "Gors", "jan@gors.nl");
    c.bench_function("enrollment QR: the qrcode crate's mask choice", |b| {
        b.iter(|| qrcode::QrCode::with_error_correction_level(uri.as_bytes(), qrcode::EcLevel::M).expect("qr"))
    });
    c.bench_function("enrollment QR: encoding the bits alone (no masks)", |b| {
        b.iter(|| qrcode::bits::encode_auto(uri.as_bytes(), qrcode::EcLevel::M).expect("bits"))
    });
    c.bench_function("enrollment QR: domain::qr's mask choice", |b| {
        b.iter(|| pushmatch::domain::qr::modules(uri.as_bytes(), qrcode::EcLevel::M).expect("qr"))
    });
    c.bench_function("enrollment QR: the PNG (qr_png)", |b| b.iter(|| pushmatch::domain::enrollment::qr_png(&uri).expect("png")));
}

/// One RespondToChallenge-shaped call through [`GrpcTelemetryLayer`] with the logs at
/// `info` (written to a sink): the handler opens its span and logs the resolution,
/// as the broker's does, and the response body ends with its status trailers. With
/// the call's `grpc` span (as when spans are exported) and without it (the default).
fn grpc_telemetry(c: &mut Criterion) {
    use http_body_util::BodyExt as _;
    use tower::{Layer as _, Service as _};

    let subscriber = tracing_subscriber::fmt().with_writer(std::io::sink).with_max_level(tracing::Level::INFO).finish();
    tracing::subscriber::with_default(subscriber, || {
        for (name, spans) in [
            ("gRPC telemetry: a call, logs at info, with its grpc span (spans exported)", true),
            ("gRPC telemetry: a call, logs at info, without it (no exporter)", false),
        ] {
            let handler = tower::service_fn(|_: http::Request<()>| async {
                let _span = tracing::info_span!(
                    "respond",
                    device_id = "dv_e3a33135949d52dd5d7af4779a2dcc8f",
                    challenge_id = "ch_ba3e0cb08a9571be75959f72afed49ff"
                )
                .entered();
                tracing::info!(state = "Approved", "challenge resolved");
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                let frames = [
                    Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from_static(b"\0\0\0\0\x02\x08\x01"))),
                    Ok(http_body::Frame::trailers(trailers)),
                ];
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::StreamBody::new(futures::stream::iter(
                    frames,
                ))))
            });
            let mut service = GrpcTelemetryLayer::new(spans).layer(handler);
            c.bench_function(name, |b| {
                b.iter(|| {
                    let request =
                        http::Request::builder().uri("/pushmatch.v1.DeviceService/RespondToChallenge").body(()).unwrap();
                    futures::executor::block_on(async {
                        service.call(request).await.unwrap().into_body().collect().await.unwrap()
                    })
                })
            });
        }
    });
}

criterion_group!(benches, ids_and_numbers, signatures, apns_token, store, enrollment_qr, grpc_telemetry);
criterion_main!(benches);
