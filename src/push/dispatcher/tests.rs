//! The dispatcher's unit tests: scripted senders, a manual clock, reports
//! collected in memory.

use async_trait::async_trait;
use parking_lot::Mutex;

use super::*;
use crate::domain::ids::{ChallengeId, DeviceId};
use crate::domain::time::{ManualClock, Millis};

struct Scripted {
    outcomes: Mutex<Vec<SendOutcome>>,
}

#[async_trait]
impl PushSender for Scripted {
    fn platform(&self) -> Platform {
        Platform::Fcm
    }
    async fn send(&self, _job: &PushJob) -> SendOutcome {
        let mut outcomes = self.outcomes.lock();
        if outcomes.is_empty() { SendOutcome::Sent } else { outcomes.remove(0) }
    }
}

/// Every report, in order, behind a watch so several waiters can follow it.
struct Reports {
    seen: tokio::sync::watch::Sender<Vec<(DeliveryState, u32, String)>>,
}

impl Default for Reports {
    fn default() -> Self {
        Self { seen: tokio::sync::watch::Sender::new(vec![]) }
    }
}

#[async_trait]
impl DeliveryReporter for Reports {
    async fn report(&self, _job: &PushJob, state: DeliveryState, attempts: u32, error: &str) {
        self.seen.send_modify(|seen| seen.push((state, attempts, error.to_owned())));
    }
}

fn job(platform: Platform, clock: &ManualClock) -> PushJob {
    job_of("t", platform, clock)
}

fn job_of(tenant: &str, platform: Platform, clock: &ManualClock) -> PushJob {
    PushJob {
        kind: PushKind::Challenge { challenge_id: ChallengeId::generate().expect("id"), pushes: 1 },
        tenant: TenantId(tenant.into()),
        device_id: DeviceId::generate().expect("id"),
        platform,
        push_token: "token".into(),
        expires_at: clock.now().plus(Duration::from_secs(60)),
    }
}

async fn final_report(reports: &Reports) -> (DeliveryState, u32, String) {
    let mut seen = reports.seen.subscribe();
    let last = tokio::time::timeout(
        Duration::from_secs(5),
        seen.wait_for(|seen| seen.last().is_some_and(|r| r.0 != DeliveryState::Queued)),
    )
    .await
    .expect("a final report in time")
    .expect("reporter alive");
    last.last().cloned().expect("a report")
}

fn start(outcomes: Vec<SendOutcome>, clock: &ManualClock, reports: &Arc<Reports>, capacity: usize) -> Dispatcher {
    let sender: Arc<dyn PushSender> = Arc::new(Scripted { outcomes: Mutex::new(outcomes) });
    let settings = DispatcherSettings { queue_capacity: capacity, ..DispatcherSettings::default() };
    Dispatcher::start(vec![sender], reports.clone(), Arc::new(clock.clone()), settings, Arc::default(), CancellationToken::new())
}

#[tokio::test]
async fn a_platform_without_sender_reads_not_configured() {
    let clock = ManualClock::new(Millis(0));
    let reports = Arc::new(Reports::default());
    let dispatcher = start(vec![], &clock, &reports, 8);
    dispatcher.enqueue(job(Platform::Apns, &clock)).expect("room");
    assert_eq!(final_report(&reports).await, (DeliveryState::Failed, 0, "not configured".into()));
}

#[tokio::test]
async fn retryable_failures_are_retried_until_sent() {
    let clock = ManualClock::new(Millis(0));
    let reports = Arc::new(Reports::default());
    let retry = || SendOutcome::Retry { reason: "503".into(), after: Some(Duration::from_millis(1)) };
    let dispatcher = start(vec![retry(), retry()], &clock, &reports, 8);
    dispatcher.enqueue(job(Platform::Fcm, &clock)).expect("room");
    let advancing = {
        let clock = clock.clone();
        let reports = reports.clone();
        async move {
            // Each retry sleeps on the manual clock: move it along as the queued reports appear.
            let mut seen = reports.seen.subscribe();
            while seen.changed().await.is_ok() {
                clock.advance(Duration::from_millis(5));
            }
        }
    };
    let result = tokio::select! { r = final_report(&reports) => r, () = advancing => panic!("reporter gone") };
    assert_eq!(result, (DeliveryState::Sent, 3, String::new()));
}

#[tokio::test]
async fn retries_stop_before_the_challenge_expires() {
    let clock = ManualClock::new(Millis(0));
    let reports = Arc::new(Reports::default());
    let retry = SendOutcome::Retry { reason: "429".into(), after: Some(Duration::from_secs(120)) };
    let dispatcher = start(vec![retry], &clock, &reports, 8);
    dispatcher.enqueue(job(Platform::Fcm, &clock)).expect("room");
    assert_eq!(final_report(&reports).await, (DeliveryState::Failed, 1, "429".into()));
}

#[tokio::test]
async fn a_full_queue_refuses_at_once() {
    let clock = ManualClock::new(Millis(0));
    let reports = Arc::new(Reports::default());
    // Capacity 1 and a worker that may take one job off: at most two fit quickly,
    // and a burst of ten must see a refusal.
    let dispatcher = start(vec![], &clock, &reports, 1);
    let refused = (0..10).map(|_| dispatcher.enqueue(job(Platform::Apns, &clock))).filter(Result::is_err).count();
    assert!(refused > 0);
}

/// Holds every send until opened; follows how many are in flight.
struct Gate {
    platform: Platform,
    limit: usize,
    in_flight: tokio::sync::watch::Sender<usize>,
    most: AtomicU64,
    open: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    fn new(platform: Platform, limit: usize) -> Arc<Self> {
        Arc::new(Self {
            platform,
            limit,
            in_flight: tokio::sync::watch::Sender::new(0),
            most: AtomicU64::new(0),
            open: tokio::sync::watch::Sender::new(false),
        })
    }
}

#[async_trait]
impl PushSender for Gate {
    fn platform(&self) -> Platform {
        self.platform
    }
    fn max_in_flight(&self) -> Option<usize> {
        Some(self.limit)
    }
    async fn send(&self, _job: &PushJob) -> SendOutcome {
        self.in_flight.send_modify(|n| *n += 1);
        self.most.fetch_max(*self.in_flight.borrow() as u64, Ordering::SeqCst);
        let _ = self.open.subscribe().wait_for(|open| *open).await;
        self.in_flight.send_modify(|n| *n -= 1);
        SendOutcome::Sent
    }
}

#[tokio::test]
async fn each_provider_sends_at_most_its_own_limit_and_a_stuck_one_does_not_hold_the_other() {
    let clock = ManualClock::new(Millis(0));
    let reports = Arc::new(Reports::default());
    let (apns, fcm) = (Gate::new(Platform::Apns, 2), Gate::new(Platform::Fcm, 3));
    let dispatcher = Dispatcher::start(
        vec![apns.clone(), fcm.clone()],
        reports.clone(),
        Arc::new(clock.clone()),
        DispatcherSettings { queue_capacity: 64, ..DispatcherSettings::default() },
        Arc::default(),
        CancellationToken::new(),
    );
    for _ in 0..10 {
        dispatcher.enqueue(job(Platform::Apns, &clock)).expect("room");
    }
    for _ in 0..10 {
        dispatcher.enqueue(job(Platform::Fcm, &clock)).expect("room");
    }
    // APNs is stuck at its limit with eight more waiting, and FCM still fills its own.
    let reached = |gate: &Arc<Gate>| {
        let gate = Arc::clone(gate);
        async move {
            let mut in_flight = gate.in_flight.subscribe();
            let _ = in_flight.wait_for(|n| *n == gate.limit).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), futures::future::join(reached(&apns), reached(&fcm)))
        .await
        .expect("both providers reach their limits");
    apns.open.send_replace(true);
    fcm.open.send_replace(true);
    let mut seen = reports.seen.subscribe();
    tokio::time::timeout(Duration::from_secs(5), seen.wait_for(|seen| seen.len() == 20)).await.expect("all sent").expect("alive");
    assert_eq!(apns.most.load(Ordering::SeqCst), 2);
    assert_eq!(fcm.most.load(Ordering::SeqCst), 3);
}

/// Each final report's platform and state, for tests with both providers.
#[derive(Default)]
struct ByPlatform {
    done: tokio::sync::watch::Sender<Vec<(Platform, DeliveryState)>>,
    queued: tokio::sync::watch::Sender<Vec<Platform>>,
}

impl ByPlatform {
    fn done(&self, platform: Platform) -> usize {
        self.done.borrow().iter().filter(|(p, _)| *p == platform).count()
    }

    /// Waits, with a deadline, until `platform` has `count` final reports, all SENT.
    async fn wait_sent(&self, platform: Platform, count: usize) {
        let mut done = self.done.subscribe();
        let seen = tokio::time::timeout(
            Duration::from_secs(5),
            done.wait_for(|done| done.iter().filter(|(p, _)| *p == platform).count() >= count),
        )
        .await
        .unwrap_or_else(|_| panic!("{count} {} pushes delivered in time", platform.name()))
        .expect("reporter alive")
        .clone();
        assert!(seen.iter().filter(|(p, _)| *p == platform).all(|(_, state)| *state == DeliveryState::Sent), "{seen:?}");
    }
}

#[async_trait]
impl DeliveryReporter for ByPlatform {
    async fn report(&self, job: &PushJob, state: DeliveryState, _attempts: u32, _error: &str) {
        if state == DeliveryState::Queued {
            self.queued.send_modify(|queued| queued.push(job.platform));
        } else {
            self.done.send_modify(|done| done.push((job.platform, state)));
        }
    }
}

/// Answers every send with the same outcome at once.
struct Answering {
    platform: Platform,
    limit: usize,
    outcome: SendOutcome,
}

#[async_trait]
impl PushSender for Answering {
    fn platform(&self) -> Platform {
        self.platform
    }
    fn max_in_flight(&self) -> Option<usize> {
        Some(self.limit)
    }
    async fn send(&self, _job: &PushJob) -> SendOutcome {
        self.outcome.clone()
    }
}

fn start_both(
    apns: Arc<dyn PushSender>,
    fcm: Arc<dyn PushSender>,
    max_in_flight: usize,
    clock: &ManualClock,
) -> (Dispatcher, Arc<ByPlatform>) {
    let reports = Arc::new(ByPlatform::default());
    let settings = DispatcherSettings { queue_capacity: 64, max_in_flight, ..DispatcherSettings::default() };
    let dispatcher = Dispatcher::start(
        vec![apns, fcm],
        reports.clone(),
        Arc::new(clock.clone()),
        settings,
        Arc::default(),
        CancellationToken::new(),
    );
    (dispatcher, reports)
}

#[tokio::test]
async fn a_hung_provider_filled_past_its_limit_does_not_hold_the_other_providers_pushes() {
    let clock = ManualClock::new(Millis(0));
    // Four sends at once in all; APNs may have two of them, and it hangs.
    let apns = Gate::new(Platform::Apns, 2);
    let fcm: Arc<dyn PushSender> = Arc::new(Answering { platform: Platform::Fcm, limit: 2, outcome: SendOutcome::Sent });
    let (dispatcher, reports) = start_both(apns.clone(), fcm, 4, &clock);
    // Ten APNs pushes: past APNs's limit and past the four shared places. Two hang
    // at APNs; the others wait for APNs (or in its queue), holding no shared place.
    for _ in 0..10 {
        dispatcher.enqueue(job(Platform::Apns, &clock)).expect("room");
    }
    let mut in_flight = apns.in_flight.subscribe();
    tokio::time::timeout(Duration::from_secs(5), in_flight.wait_for(|n| *n == 2))
        .await
        .expect("APNs at its limit")
        .expect("alive");

    for _ in 0..6 {
        dispatcher.enqueue(job(Platform::Fcm, &clock)).expect("room");
    }
    reports.wait_sent(Platform::Fcm, 6).await;
    // Delivered while APNs is still stuck: nothing of it has come back.
    assert_eq!(*apns.in_flight.borrow(), 2);
    assert_eq!(reports.done(Platform::Apns), 0);
    assert!(dispatcher.queue_depth(Platform::Apns) > 0, "APNs's pushes wait in its own queue");

    apns.open.send_replace(true);
    reports.wait_sent(Platform::Apns, 10).await;
    assert_eq!(apns.most.load(Ordering::SeqCst), 2, "APNs never had more than its limit");
}

#[tokio::test]
async fn a_provider_answering_503_backs_off_without_holding_the_other_providers_places() {
    // The manual clock never moves: every APNs retry waits forever.
    let clock = ManualClock::new(Millis(0));
    let unavailable = SendOutcome::Retry { reason: "ServiceUnavailable".into(), after: Some(Duration::from_secs(30)) };
    let apns: Arc<dyn PushSender> = Arc::new(Answering { platform: Platform::Apns, limit: 2, outcome: unavailable });
    let fcm: Arc<dyn PushSender> = Arc::new(Answering { platform: Platform::Fcm, limit: 2, outcome: SendOutcome::Sent });
    // Two places in all, and two APNs pushes backing off (then more in its queue).
    let (dispatcher, reports) = start_both(apns, fcm, 2, &clock);
    for _ in 0..6 {
        dispatcher.enqueue(job(Platform::Apns, &clock)).expect("room");
    }
    let mut queued = reports.queued.subscribe();
    tokio::time::timeout(Duration::from_secs(5), queued.wait_for(|queued| queued.len() >= 2))
        .await
        .expect("two APNs pushes back off")
        .expect("alive");

    for _ in 0..4 {
        dispatcher.enqueue(job(Platform::Fcm, &clock)).expect("room");
    }
    reports.wait_sent(Platform::Fcm, 4).await;
    assert_eq!(reports.done(Platform::Apns), 0, "APNs's pushes are still backing off");
    assert_eq!(reports.queued.borrow().len(), 2, "no more than two APNs pushes out of its queue");
}

#[tokio::test]
async fn a_refused_provider_token_is_sent_again_at_once_and_counts_two_attempts() {
    let clock = ManualClock::new(Millis(0));
    let reports = Arc::new(Reports::default());
    let refused = || SendOutcome::TokenRefused { reason: "ExpiredProviderToken".into() };
    let dispatcher = start(vec![refused()], &clock, &reports, 8);
    dispatcher.enqueue(job(Platform::Fcm, &clock)).expect("room");
    assert_eq!(final_report(&reports).await, (DeliveryState::Sent, 2, String::new()));
    assert_eq!(reports.seen.borrow().len(), 1, "no backoff, so no QUEUED report: {:?}", reports.seen.borrow());

    // Refused again with the new token: failed, not renewed without end.
    let reports = Arc::new(Reports::default());
    let dispatcher = start(vec![refused(), refused(), refused()], &clock, &reports, 8);
    dispatcher.enqueue(job(Platform::Fcm, &clock)).expect("room");
    assert_eq!(final_report(&reports).await, (DeliveryState::Failed, 2, "ExpiredProviderToken".into()));
}

fn tenant(id: &str) -> TenantId {
    TenantId(id.into())
}

#[tokio::test]
async fn a_tenant_past_its_share_of_the_queue_is_refused_while_another_still_enqueues() {
    let clock = ManualClock::new(Millis(0));
    let reports = Arc::new(Reports::default());
    // One send at a time, held at the gate: from then on the queue only fills.
    let fcm = Gate::new(Platform::Fcm, 1);
    let settings = DispatcherSettings {
        queue_capacity: 4,
        max_in_flight: 1,
        tenants: vec![(tenant("a"), 2), (tenant("b"), 2)],
        ..DispatcherSettings::default()
    };
    let dispatcher = Dispatcher::start(
        vec![fcm.clone()],
        reports.clone(),
        Arc::new(clock.clone()),
        settings,
        Arc::default(),
        CancellationToken::new(),
    );

    // The worker takes at most two jobs off the queue (one at the gate, one waiting
    // for the send slot), so a's burst meets its share of two within four jobs.
    let mut accepted = 0;
    let refused = loop {
        match dispatcher.enqueue(job_of("a", Platform::Fcm, &clock)) {
            Ok(()) => accepted += 1,
            Err(full) => break full,
        }
        assert!(accepted <= 4, "a's burst was never refused");
    };
    assert_eq!(refused, QueueFull::TenantShare);
    assert_eq!(dispatcher.room_for(&tenant("a"), [Platform::Fcm]), Err(QueueFull::TenantShare));
    assert_eq!(dispatcher.room(&tenant("a")).0[Platform::Fcm.index()], 0, "a's share is full");
    // a's share is half the queue: b's jobs still fit.
    dispatcher.room_for(&tenant("b"), [Platform::Fcm; 2]).expect("room for b");
    assert!(dispatcher.room(&tenant("b")).0[Platform::Fcm.index()] >= 2, "room says what room_for does");
    dispatcher.enqueue(job_of("b", Platform::Fcm, &clock)).expect("b enqueues past a's burst");
    dispatcher.enqueue(job_of("b", Platform::Fcm, &clock)).expect("b enqueues its share");

    // Once the jobs have left the queue, a has its whole share again.
    fcm.open.send_replace(true);
    let mut seen = reports.seen.subscribe();
    tokio::time::timeout(Duration::from_secs(5), seen.wait_for(|seen| seen.len() == accepted + 2))
        .await
        .expect("all sent")
        .expect("alive");
    dispatcher.room_for(&tenant("a"), [Platform::Fcm; 2]).expect("a's share is free again");
    dispatcher.enqueue(job_of("a", Platform::Fcm, &clock)).expect("a enqueues again");
}

#[tokio::test]
async fn a_job_the_queue_refuses_gives_its_place_in_the_tenants_share_back() {
    let clock = ManualClock::new(Millis(0));
    let reports = Arc::new(Reports::default());
    let settings = DispatcherSettings {
        queue_capacity: 4,
        tenants: vec![(tenant("a"), 1), (tenant("b"), 1)],
        ..DispatcherSettings::default()
    };
    let shutdown = CancellationToken::new();
    let dispatcher = Dispatcher::start(vec![], reports, Arc::new(clock.clone()), settings, Arc::default(), shutdown.clone());
    // A stopped worker closes its queue: every job is refused by the queue itself.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), dispatcher.queues.of(Platform::Fcm).jobs.closed())
        .await
        .expect("the worker stops");
    for _ in 0..3 {
        assert_eq!(
            dispatcher.enqueue(job_of("a", Platform::Fcm, &clock)),
            Err(QueueFull::Queue),
            "not a's share: it was given back"
        );
    }
    dispatcher.room_for(&tenant("a"), [Platform::Fcm]).expect("a's share is empty");
    assert_eq!(dispatcher.room(&tenant("a")).0[Platform::Fcm.index()], 1, "a's whole share of one");
}

fn notice(clock: &ManualClock) -> PushJob {
    PushJob {
        kind: PushKind::NewDevice {
            new_device_id: DeviceId::generate().expect("id"),
            method: crate::domain::enrollment::EnrollmentKind::Push,
            enrolled_at: clock.now(),
        },
        ..job(Platform::Fcm, clock)
    }
}

#[tokio::test]
async fn a_notice_reports_a_dead_token_and_nothing_else() {
    let clock = ManualClock::new(Millis(0));
    let reports = Arc::new(Reports::default());
    let unregistered = SendOutcome::Unregistered { reason: "UNREGISTERED".into() };
    let sender: Arc<dyn PushSender> =
        Arc::new(Scripted { outcomes: Mutex::new(vec![SendOutcome::Sent, retry_now(), unregistered]) });
    // One job at a time: the first notice is done, reported or not, before the second starts.
    let settings = DispatcherSettings { max_in_flight: 1, ..DispatcherSettings::default() };
    let dispatcher = Dispatcher::start(
        vec![sender],
        reports.clone(),
        Arc::new(clock.clone()),
        settings,
        Arc::default(),
        CancellationToken::new(),
    );
    dispatcher.enqueue(notice(&clock)).expect("room");
    dispatcher.enqueue(notice(&clock)).expect("room");
    // Neither the first notice's SENT nor the second's retry is reported (a notice
    // has no delivery to record); its dead token is, so pushes go off for the device.
    assert_eq!(final_report(&reports).await, (DeliveryState::Unregistered, 2, "UNREGISTERED".into()));
    assert_eq!(reports.seen.borrow().len(), 1, "{:?}", reports.seen.borrow());
}

/// A retry due at once, so the manual clock need not move.
fn retry_now() -> SendOutcome {
    SendOutcome::Retry { reason: "503".into(), after: Some(Duration::ZERO) }
}

#[test]
fn deliveries_are_counted_by_kind() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let clock = ManualClock::new(Millis(0));
    metrics::with_local_recorder(&recorder, || {
        record_delivery(Platform::Fcm, &job(Platform::Fcm, &clock), DeliveryState::Sent);
        record_delivery(Platform::Apns, &notice(&clock), DeliveryState::Sent);
        record_delivery(Platform::Apns, &notice(&clock), DeliveryState::Unregistered);
    });
    let text = handle.render();
    for expected in [
        r#"pushmatch_push_deliveries_total{tenant="t",provider="fcm",kind="challenge",state="sent"} 1"#,
        r#"pushmatch_push_deliveries_total{tenant="t",provider="apns",kind="new_device",state="sent"} 1"#,
        r#"pushmatch_push_deliveries_total{tenant="t",provider="apns",kind="new_device",state="unregistered"} 1"#,
    ] {
        assert!(text.contains(expected), "{expected} in\n{text}");
    }
}

#[test]
fn attempts_are_counted_and_timed_per_provider() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        record_attempt(Platform::Apns, &SendOutcome::Sent, Duration::from_millis(12));
        record_attempt(Platform::Apns, &SendOutcome::Sent, Duration::from_millis(20));
        record_attempt(Platform::Fcm, &SendOutcome::Retry { reason: "HTTP 503".into(), after: None }, Duration::from_millis(5));
    });
    let text = handle.render();
    for expected in [
        r#"pushmatch_push_sends_total{provider="apns",outcome="sent"} 2"#,
        r#"pushmatch_push_sends_total{provider="fcm",outcome="retry"} 1"#,
        r#"pushmatch_push_latency_seconds_count{provider="apns"} 2"#,
    ] {
        assert!(text.contains(expected), "{expected} in\n{text}");
    }
}
