// Test support: a failed expectation here is a failed test, so panicking is the point.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

//! The broker's rules without gRPC: a real embedded store in a temporary folder, a
//! manual clock and a recording push sender.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::domain::challenge::{ChallengeState, Platform};
use crate::domain::enrollment::EnrollmentKind;
use crate::domain::error::{DomainError, ErrorKind};
use crate::domain::ids::UserId;
use crate::domain::ports::{BlockReason, UserBlock};
use crate::domain::time::ManualClock;
use crate::push::DeliveryReporter as _;
use crate::push::dispatcher::{DispatcherCounters, DispatcherSettings};
use crate::push::recording::RecordingPushSender;
use crate::store::conformance::{sample_device, sample_enrollment};
use crate::store::embedded::EmbeddedStore;

struct Fixture {
    broker: Broker,
    store: Arc<dyn Store>,
    clock: ManualClock,
    fcm: RecordingPushSender,
    tenant: TenantId,
    /// A second tenant, for the rules between tenants.
    other: TenantId,
    _dir: tempfile::TempDir,
}

pub(super) fn settings() -> BrokerSettings {
    BrokerSettings {
        default_ttl: Duration::from_secs(60),
        max_ttl: Duration::from_secs(300),
        admission: AdmissionPolicy {
            max_pending: 2,
            max_per_window: 10,
            window: Duration::from_secs(600),
            retention: Duration::from_secs(300),
            report_retention: Duration::from_secs(900),
        },
        wrong_numbers: StrikePolicy { limit: 3, window: Duration::from_secs(600), block_for: Duration::from_secs(900) },
        totp_lockout: crate::store::conformance::totp_policy(),
        enrollment_limits: crate::store::conformance::limits(),
        fraud_report_window: Duration::from_secs(900),
        enrollment_ttl: Duration::from_secs(600),
        max_clock_skew: Duration::from_secs(300),
        webpush_endpoints: crate::push::webpush::guard::EndpointPolicy::default(),
        public_url: "https://mfa.example.com".into(),
        max_creates_in_flight: 4,
        max_creates_in_flight_per_tenant: 2,
        per_tenant: HashMap::new(),
    }
}

async fn fixture() -> Fixture {
    fixture_with(DispatcherSettings::default()).await
}

async fn fixture_with(dispatcher: DispatcherSettings) -> Fixture {
    fixture_with_settings(dispatcher, settings()).await
}

async fn fixture_with_settings(dispatcher: DispatcherSettings, settings: BrokerSettings) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = ManualClock::starting_now();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path(), Arc::new(clock.clone())).await.expect("store"));
    fixture_on(store, clock, dir, dispatcher, settings)
}

/// The broker over `store` (on `clock`), with a recording FCM sender.
fn fixture_on(
    store: Arc<dyn Store>,
    clock: ManualClock,
    dir: tempfile::TempDir,
    dispatcher: DispatcherSettings,
    settings: BrokerSettings,
) -> Fixture {
    let fcm = RecordingPushSender::new(Platform::Fcm);
    let dispatcher = Dispatcher::start(
        vec![Arc::new(fcm.clone())],
        Arc::new(DeliveryRecorder::new(Arc::clone(&store))),
        Arc::new(clock.clone()),
        dispatcher,
        Arc::new(DispatcherCounters::default()),
        tokio_util::sync::CancellationToken::new(),
    );
    let (tenant, other) = (TenantId("acme".into()), TenantId("globex".into()));
    let broker = Broker::new(
        Arc::clone(&store),
        dispatcher,
        Arc::new(clock.clone()),
        settings,
        vec![
            Tenant { id: tenant.clone(), display_name: "Acme".into() },
            Tenant { id: other.clone(), display_name: "Globex".into() },
        ],
        SecretBox::new(&[9u8; 32]),
    );
    Fixture { broker, store, clock, fcm, tenant, other, _dir: dir }
}

impl Fixture {
    /// Enrolls a push device (FCM) for `user` straight through the store.
    async fn enroll(&self, user: &UserId) -> Device {
        self.enroll_in(&self.tenant, user).await
    }

    /// Enrolls a push device (FCM) for `user` of `tenant`.
    async fn enroll_in(&self, tenant: &TenantId, user: &UserId) -> Device {
        let now = self.clock.now();
        let enrollment = sample_enrollment(tenant, user, now);
        let limits = crate::store::conformance::limits();
        self.store.insert_enrollment(enrollment.clone(), &limits, now).await.expect("insert");
        let device = sample_device(tenant, user, now);
        let code = enrollment.code_digest.as_ref().expect("code");
        self.store.complete_enrollment(code, device.clone(), &limits, now).await.expect("complete");
        device
    }

    async fn create(&self, user: &UserId, ttl_seconds: u32) -> Result<Challenge, DomainError> {
        self.create_in(&self.tenant, user, ttl_seconds).await
    }

    async fn create_in(&self, tenant: &TenantId, user: &UserId, ttl_seconds: u32) -> Result<Challenge, DomainError> {
        let request =
            ChallengeRequest { user_id: user.clone(), context: SignInContext::default(), ttl_seconds, request_id: None };
        self.broker.create_challenge(tenant, request).await
    }
}

fn user(name: &str) -> UserId {
    UserId::parse(name).expect("user id")
}

fn expires_in(challenge: &Challenge) -> Duration {
    challenge.created_at.until(challenge.expires_at)
}

#[tokio::test]
async fn ttl_zero_takes_the_default_and_past_the_maximum_is_refused_by_name() {
    let f = fixture().await;
    let jan = user("jan");
    f.enroll(&jan).await;

    assert_eq!(expires_in(&f.create(&jan, 0).await.expect("default ttl")), Duration::from_secs(60));
    assert_eq!(expires_in(&f.create(&jan, 300).await.expect("the maximum itself")), Duration::from_secs(300));
    let error = f.create(&jan, 301).await.expect_err("above the maximum");
    assert_eq!(error.kind(), ErrorKind::InvalidArgument);
    assert!(error.to_string().starts_with("ttl_seconds: "), "{error}");
}

#[tokio::test]
async fn creates_past_the_in_flight_cap_are_shed_at_once_and_go_through_after() {
    let f = fixture().await;
    let jan = user("jan");
    f.enroll(&jan).await;

    let held = f.broker.creating.try_acquire_many(4).expect("every permit");
    let error = f.create(&jan, 0).await.expect_err("shed");
    assert_eq!(error.kind(), ErrorKind::ResourceExhausted);
    assert!(error.to_string().contains("server.max_creates_in_flight"), "{error}");
    assert!(f.store.pending_challenges(&f.tenant, &jan, f.clock.now()).await.expect("read").is_empty(), "nothing stored");

    drop(held);
    f.create(&jan, 0).await.expect("a permit is free again");
}

#[tokio::test]
async fn a_tenant_past_its_share_of_creates_is_shed_while_another_tenant_still_creates() {
    let f = fixture().await;
    let jan = user("jan");
    f.enroll_in(&f.tenant, &jan).await;
    f.enroll_in(&f.other, &jan).await;
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    // This test's calls run on this thread: its counters land in this recorder.
    let _local = metrics::set_default_local_recorder(&recorder);

    // Acme's herd holds its whole share in flight: its 2 permits of its own, and the
    // 2 of the 4 global permits those calls took.
    let herd = (
        f.broker
            .tenancy
            .load()
            .get(&f.tenant)
            .and_then(|e| e.creating.clone())
            .expect("acme's part")
            .try_acquire_many_owned(2)
            .expect("acme's share"),
        f.broker.creating.try_acquire_many(2).expect("global permits"),
    );
    let error = f.create_in(&f.tenant, &jan, 0).await.expect_err("acme is past its share");
    assert_eq!(error.kind(), ErrorKind::ResourceExhausted);
    assert!(error.to_string().contains("server.creates_share_per_tenant"), "{error}");
    assert!(f.store.pending_challenges(&f.tenant, &jan, f.clock.now()).await.expect("read").is_empty(), "nothing stored");
    assert_eq!(f.broker.creating.available_permits(), 2, "the refusal took no global permit");

    // Globex's sign-ins go through the permits acme cannot reach.
    f.create_in(&f.other, &jan, 0).await.expect("globex still creates");
    let shed = metrics.render();
    let series = r#"pushmatch_challenges_shed_total{tenant="acme",limit="server.creates_share_per_tenant"} 1"#;
    assert!(shed.contains(series), "{series} in\n{shed}");
    assert!(!shed.contains(r#"pushmatch_challenges_shed_total{tenant="globex""#), "globex was not shed:\n{shed}");

    drop(herd);
    f.create_in(&f.tenant, &jan, 0).await.expect("acme's share is free again");
}

#[tokio::test]
async fn a_tenant_past_its_share_of_the_push_queue_is_refused_while_another_tenant_still_pushes() {
    let f = fixture_with(DispatcherSettings {
        queue_capacity: 4,
        max_in_flight: 1,
        tenants: vec![(TenantId("acme".into()), 2), (TenantId("globex".into()), 2)],
        ..DispatcherSettings::default()
    })
    .await;
    // The provider holds every send: one push is in flight, the rest wait in the queue.
    f.fcm.hold();
    let users: Vec<UserId> = (0..8).map(|i| user(&format!("herd-{i}"))).collect();
    for herd in &users {
        f.enroll_in(&f.tenant, herd).await;
    }
    let piet = user("piet");
    f.enroll_in(&f.other, &piet).await;

    // Acme's burst meets its share of two within four challenges (the worker takes at
    // most two pushes off the queue while the provider holds them).
    let mut created = 0;
    let error = loop {
        match f.create_in(&f.tenant, &users[created], 0).await {
            Ok(_) => created += 1,
            Err(error) => break error,
        }
        assert!(created <= 4, "acme's burst was never refused");
    };
    assert_eq!(error.kind(), ErrorKind::ResourceExhausted);
    assert!(
        error.to_string().contains("push queue is full") && error.to_string().contains("push.queue_share_per_tenant"),
        "{error}"
    );
    assert!(f.store.pending_challenges(&f.tenant, &users[created], f.clock.now()).await.expect("read").is_empty());

    // Globex's challenge is created and its push queued behind acme's.
    let challenge = f.create_in(&f.other, &piet, 0).await.expect("globex still creates");
    f.fcm.release();
    tokio::time::timeout(Duration::from_secs(10), f.fcm.wait_for(|job| job.challenge_id() == Some(&challenge.id)))
        .await
        .expect("globex's push is sent");
}

#[tokio::test]
async fn a_user_without_a_device_is_refused_naming_the_user() {
    let f = fixture().await;
    let error = f.create(&user("nobody"), 0).await.expect_err("no device");
    assert_eq!(error.kind(), ErrorKind::FailedPrecondition);
    assert!(error.to_string().starts_with("user_id: "), "{error}");
}

#[tokio::test]
async fn a_tenant_with_limits_of_its_own_gets_them_and_the_other_tenant_the_global_ones() {
    let mut settings = settings();
    let globex = TenantId("globex".into());
    let mut own = settings.global_limits();
    own.default_ttl = Duration::from_secs(30);
    own.max_ttl = Duration::from_secs(120);
    own.admission.max_pending = 1;
    own.enrollment_limits.max_open_enrollments = 1;
    settings.per_tenant.insert(globex.clone(), own);
    let f = fixture_with_settings(DispatcherSettings::default(), settings).await;
    assert_eq!(f.other, globex);
    let jan = user("jan");
    f.enroll_in(&f.tenant, &jan).await;
    f.enroll_in(&f.other, &jan).await;

    // TTLs: the tenant's default and maximum; the other tenant keeps the global ones.
    assert_eq!(expires_in(&f.create_in(&f.other, &jan, 0).await.expect("own default")), Duration::from_secs(30));
    assert_eq!(expires_in(&f.create_in(&f.tenant, &jan, 0).await.expect("global default")), Duration::from_secs(60));
    let error = f.create_in(&f.other, &jan, 121).await.expect_err("above the tenant's maximum");
    assert_eq!(error.kind(), ErrorKind::InvalidArgument);
    assert!(error.to_string().starts_with("ttl_seconds: ") && error.to_string().contains("120"), "{error}");
    f.create_in(&f.tenant, &jan, 300).await.expect("the global maximum for the other tenant");

    // Pending challenges: one for the tenant (it holds one now), two for the other.
    let error = f.create_in(&f.other, &jan, 0).await.expect_err("a second pending challenge");
    assert_eq!(error.kind(), ErrorKind::ResourceExhausted);
    assert!(error.to_string().contains("1 pending challenge"), "{error}");
    let error = f.create_in(&f.tenant, &jan, 0).await.expect_err("a third pending challenge");
    assert!(error.to_string().contains("2 pending challenges"), "{error}");

    // Open enrollments: one for the tenant.
    let piet = user("piet");
    f.broker.begin_enrollment(&f.other, piet.clone(), "piet".into(), EnrollmentKind::Push).await.expect("first");
    // (A begun enrollment holds its code: it has no Debug to print, so no expect_err.)
    let Err(error) = f.broker.begin_enrollment(&f.other, piet.clone(), "piet".into(), EnrollmentKind::Push).await else {
        panic!("a second open enrollment was begun past the tenant's limit of one");
    };
    assert_eq!(error.kind(), ErrorKind::ResourceExhausted);
    f.broker.begin_enrollment(&f.tenant, piet.clone(), "piet".into(), EnrollmentKind::Push).await.expect("first");
    f.broker.begin_enrollment(&f.tenant, piet, "piet".into(), EnrollmentKind::Push).await.expect("second: global limit");
}

#[tokio::test]
async fn per_user_limits_and_blocks_are_refused_with_their_reason() {
    let f = fixture().await;
    let (jan, piet) = (user("jan"), user("piet"));
    f.enroll(&jan).await;
    f.enroll(&piet).await;

    f.create(&jan, 0).await.expect("first");
    f.create(&jan, 0).await.expect("second");
    let error = f.create(&jan, 0).await.expect_err("a third pending challenge");
    assert_eq!(error.kind(), ErrorKind::ResourceExhausted);
    assert!(error.to_string().contains("2 pending challenges"), "{error}");

    let fraud = UserBlock { reason: BlockReason::FraudReported, since: f.clock.now(), until: None };
    f.store.block_user(&f.tenant, &piet, fraud, f.clock.now()).await.expect("block");
    let error = f.create(&piet, 0).await.expect_err("blocked");
    assert_eq!(error.kind(), ErrorKind::FailedPrecondition);
    assert!(error.to_string().contains("UnblockUser"), "{error}");

    f.broker.unblock_user(&f.tenant, &piet).await.expect("unblock");
    f.create(&piet, 0).await.expect("unblocked");
}

#[tokio::test]
async fn a_challenge_is_pushed_to_each_device_and_its_delivery_recorded() {
    let f = fixture().await;
    let jan = user("jan");
    let (first, second) = (f.enroll(&jan).await, f.enroll(&jan).await);

    let challenge = f.create(&jan, 0).await.expect("created");
    assert_eq!(challenge.state, ChallengeState::Pending);
    assert_eq!(challenge.deliveries.len(), 2);
    let jobs = f.fcm.wait_until(|jobs| jobs.len() == 2).await;
    for device in [&first, &second] {
        let job = jobs.iter().find(|job| job.device_id == device.id).expect("a push to each device");
        assert_eq!(
            (job.kind.clone(), job.expires_at),
            (PushKind::Challenge { challenge_id: challenge.id.clone(), pushes: 2 }, challenge.expires_at)
        );
    }

    // The recorder writes each SENT back to the challenge, where watchers see it.
    let mut watch = f.broker.watch_challenge(&f.tenant, &challenge.id).await.expect("watch");
    let sent = watch
        .wait_for(|c| c.deliveries.iter().all(|d| d.state == DeliveryState::Sent))
        .await
        .expect("deliveries recorded")
        .clone();
    assert!(sent.deliveries.iter().all(|d| d.attempts == 1));
}

/// The push of `challenge` to `device`, as the broker hands it to the dispatcher.
fn push_of(challenge: &Challenge, device: &Device) -> PushJob {
    PushJob {
        kind: PushKind::Challenge { challenge_id: challenge.id.clone(), pushes: 2 },
        tenant: challenge.tenant.clone(),
        device_id: device.id.clone(),
        platform: Platform::Fcm,
        push_token: device.push_token.clone(),
        expires_at: challenge.expires_at,
    }
}

/// The states of the challenge's deliveries to `devices`, as the store holds them.
async fn delivery_states(f: &Fixture, challenge: &Challenge, devices: [&Device; 2]) -> [DeliveryState; 2] {
    let stored = f.broker.get_challenge(&f.tenant, &challenge.id).await.expect("read");
    devices.map(|device| stored.deliveries.iter().find(|d| d.device_id == device.id).expect("delivery").state)
}

/// Two phones of `user` and a recorder whose reports wait at most `hold`; the
/// dispatcher's own pushes wait, so only the reports a test makes are recorded.
async fn two_phones_reporting(f: &Fixture, user: &UserId, hold: Duration) -> (Device, Device, DeliveryRecorder) {
    let (first, second) = (f.enroll(user).await, f.enroll(user).await);
    f.fcm.hold();
    (first, second, DeliveryRecorder::holding(Arc::clone(&f.store), hold))
}

/// A challenge pushed to two phones has its two reports recorded together, once
/// both came (one store write, one wake-up of its watchers); a retry's note goes
/// out at once, with what waited.
#[tokio::test]
async fn the_reports_of_a_challenges_pushes_are_recorded_together() {
    let f = fixture().await;
    let jan = user("jan");
    let (first, second, recorder) = two_phones_reporting(&f, &jan, Duration::from_secs(3_600)).await;

    let challenge = f.create(&jan, 0).await.expect("created");
    recorder.report(&push_of(&challenge, &first), DeliveryState::Sent, 1, "").await;
    assert_eq!(delivery_states(&f, &challenge, [&first, &second]).await, [DeliveryState::Queued; 2], "waits");
    recorder.report(&push_of(&challenge, &second), DeliveryState::Unregistered, 1, "UNREGISTERED").await;
    assert_eq!(
        delivery_states(&f, &challenge, [&first, &second]).await,
        [DeliveryState::Sent, DeliveryState::Unregistered],
        "both reports, recorded together"
    );

    let challenge = f.create(&jan, 0).await.expect("created");
    recorder.report(&push_of(&challenge, &first), DeliveryState::Sent, 1, "").await;
    recorder.report(&push_of(&challenge, &second), DeliveryState::Queued, 1, "HTTP 503").await;
    let stored = f.broker.get_challenge(&f.tenant, &challenge.id).await.expect("read");
    let retried = stored.deliveries.iter().find(|d| d.device_id == second.id).expect("delivery");
    assert_eq!((retried.attempts, retried.error.as_str()), (1, "HTTP 503"), "a retry's note at once");
    assert_eq!(delivery_states(&f, &challenge, [&first, &second]).await[0], DeliveryState::Sent, "with what waited");
    // The retried push's last word is the last one awaited: recorded at once, not
    // held as the first report of a new wait.
    recorder.report(&push_of(&challenge, &second), DeliveryState::Sent, 2, "").await;
    assert_eq!(
        delivery_states(&f, &challenge, [&first, &second]).await,
        [DeliveryState::Sent; 2],
        "the retried push's report, once it came"
    );
}

/// What waits for a sibling's report when the server stops is recorded by the
/// flush it makes on the way out, not lost with the process.
#[tokio::test]
async fn a_flush_records_the_reports_that_wait() {
    let f = fixture().await;
    let jan = user("jan");
    let (first, second, recorder) = two_phones_reporting(&f, &jan, Duration::from_secs(3_600)).await;
    let challenge = f.create(&jan, 0).await.expect("created");
    recorder.report(&push_of(&challenge, &first), DeliveryState::Sent, 1, "").await;
    assert_eq!(delivery_states(&f, &challenge, [&first, &second]).await, [DeliveryState::Queued; 2], "waits");
    recorder.flush().await;
    assert_eq!(
        delivery_states(&f, &challenge, [&first, &second]).await,
        [DeliveryState::Sent, DeliveryState::Queued],
        "recorded by the flush"
    );
}

/// A report waits for the other pushes of its challenge only so long: a slow
/// provider does not keep the watchers from the push that went out.
#[tokio::test]
async fn a_report_waits_for_a_slow_sibling_only_so_long() {
    let f = fixture().await;
    let jan = user("jan");
    let (first, second, recorder) = two_phones_reporting(&f, &jan, Duration::from_millis(50)).await;
    let challenge = f.create(&jan, 0).await.expect("created");
    let mut watch = f.broker.watch_challenge(&f.tenant, &challenge.id).await.expect("watch");
    recorder.report(&push_of(&challenge, &first), DeliveryState::Sent, 1, "").await;
    let seen = tokio::time::timeout(
        Duration::from_secs(10),
        watch.wait_for(|c| c.deliveries.iter().any(|d| d.device_id == first.id && d.state == DeliveryState::Sent)),
    )
    .await
    .expect("recorded once the hold is over")
    .expect("watch open")
    .clone();
    let other = seen.deliveries.iter().find(|d| d.device_id == second.id).expect("delivery");
    assert_eq!(other.state, DeliveryState::Queued, "the slow push has not reported");
}

#[tokio::test]
async fn a_dead_token_reported_on_a_notice_turns_pushes_off() {
    let f = fixture().await;
    let jan = user("jan");
    let (told, added) = (f.enroll(&jan).await, f.enroll(&jan).await);
    let notice = PushJob {
        kind: PushKind::NewDevice { new_device_id: added.id.clone(), method: EnrollmentKind::Push, enrolled_at: f.clock.now() },
        tenant: f.tenant.clone(),
        device_id: told.id.clone(),
        platform: Platform::Fcm,
        push_token: told.push_token.clone(),
        expires_at: f.clock.now().plus(crate::push::NOTICE_LIFETIME),
    };
    let recorder = DeliveryRecorder::new(Arc::clone(&f.store));
    // A notice has no challenge: SENT has nothing to record, and changes nothing.
    recorder.report(&notice, DeliveryState::Sent, 1, "").await;
    assert!(f.store.get_device(&told.id).await.expect("read").expect("device").push_enabled);
    recorder.report(&notice, DeliveryState::Unregistered, 1, "UNREGISTERED").await;
    assert!(!f.store.get_device(&told.id).await.expect("read").expect("device").push_enabled);
    assert!(f.store.get_device(&added.id).await.expect("read").expect("device").push_enabled, "only the device told");
}

#[tokio::test]
async fn cancel_resolves_once_and_an_expired_challenge_reads_expired() {
    let f = fixture().await;
    let jan = user("jan");
    f.enroll(&jan).await;

    let first = f.create(&jan, 0).await.expect("created");
    assert_eq!(f.broker.cancel_challenge(&f.tenant, &first.id).await.expect("cancel").state, ChallengeState::Cancelled);
    f.clock.advance(Duration::from_secs(1));
    let again = f.broker.cancel_challenge(&f.tenant, &first.id).await.expect("cancel again");
    assert_eq!((again.state, again.resolved_at), (ChallengeState::Cancelled, Some(f.clock.now().minus(Duration::from_secs(1)))));

    let second = f.create(&jan, 10).await.expect("created");
    f.clock.advance(Duration::from_secs(11));
    assert_eq!(f.broker.get_challenge(&f.tenant, &second.id).await.expect("get").state, ChallengeState::Expired);
    let other = TenantId("other".into());
    let error = f.broker.get_challenge(&other, &second.id).await.expect_err("another tenant's");
    assert_eq!(error.kind(), ErrorKind::NotFound);
}

/// VerifyTotp for user ids nobody enrolled: 100,000 calls (64 at a time) leave
/// the store as it was, so a stranger with a tenant key cannot grow it.
async fn totp_for_strangers_stores_nothing(f: &Fixture) {
    use futures::StreamExt as _;
    let jan = user("jan");
    f.enroll(&jan).await;
    let before = f.store.record_count().await.expect("count");
    let calls = futures::stream::iter(0..100_000u32).map(|n| async move {
        let stranger = user(&format!("stranger-{n:x}-{:x}", n.wrapping_mul(2_654_435_761)));
        f.broker.verify_totp(&f.tenant, &stranger, "123456").await.expect("verify").valid
    });
    let valid = calls.buffer_unordered(64).filter(|valid| std::future::ready(*valid)).count().await;
    assert_eq!(valid, 0);
    assert_eq!(f.store.record_count().await.expect("count"), before, "the store grew with strangers' calls");
}

#[tokio::test]
async fn totp_calls_for_random_users_leave_the_embedded_store_as_it_was() {
    totp_for_strangers_stores_nothing(&fixture().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totp_calls_for_random_users_leave_the_redis_store_as_it_was() {
    // A server of its own: the count is every key in the database.
    let server = crate::store::redis::testing::RedisServer::start().await;
    let clock = ManualClock::starting_now();
    let settings = crate::store::redis::RedisSettings::new(vec![server.url()], Duration::from_secs(2));
    let store = crate::store::redis::RedisStore::connect(settings, Arc::new(clock.clone())).await.expect("connect");
    let dir = tempfile::tempdir().expect("temp dir");
    let f = fixture_on(Arc::new(store), clock, dir, DispatcherSettings::default(), self::settings());
    totp_for_strangers_stores_nothing(&f).await;
}
