//! Push throughput: pushes per second through the dispatcher and the real APNs and FCM
//! senders into the mock servers of `tests/support/mock_push.rs` (HTTP/2 over TLS on
//! loopback, in the same process and runtime: the mock's work is counted too), with
//! 0 ms and 25 ms of mock latency, over one connection and over the configured pool.
//!
//! `cargo bench --bench push_throughput` prints a table (BENCHMARKS.md has the
//! figures). `PUSHMATCH_BENCH_PUSHES` sets the pushes per row (default 20,000).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic, clippy::print_stdout)]

#[path = "../tests/support/mock_push.rs"]
mod mock_push;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mock_push::{MockServer, Reply, TestCa, apns_key, service_account_json};
use pushmatch::config::{ApnsConfig, FcmConfig, PushConfig};
use pushmatch::domain::challenge::{DeliveryState, Platform};
use pushmatch::domain::ids::{ChallengeId, DeviceId, TenantId};
use pushmatch::domain::time::{Clock, SystemClock};
use pushmatch::push::dispatcher::{Dispatcher, DispatcherSettings};
use pushmatch::push::{DeliveryReporter, PushJob, PushKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const APNS_TOKEN: &str = "a3f9c2e1d4b5a6978812ab34cd56ef78a3f9c2e1d4b5a6978812ab34cd56ef78";
const FCM_TOKEN: &str = "fcm-registration-token:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx";
/// The configured pool (`connections` default).
const POOL: u32 = 4;

/// Counts final reports; the benchmark waits on the count.
struct Finished {
    sent: AtomicUsize,
    other: AtomicUsize,
    done: watch::Sender<usize>,
}

#[async_trait]
impl DeliveryReporter for Finished {
    async fn report(&self, _job: &PushJob, state: DeliveryState, _attempts: u32, _error: &str) {
        match state {
            DeliveryState::Queued => return,
            DeliveryState::Sent => self.sent.fetch_add(1, Ordering::Relaxed),
            _ => self.other.fetch_add(1, Ordering::Relaxed),
        };
        self.done.send_modify(|done| *done += 1);
    }
}

struct Row {
    provider: &'static str,
    latency_ms: u64,
    connections: u32,
    pushes: usize,
    seconds: f64,
    /// CPU time of the whole process (senders, dispatcher and mock) per push.
    cpu_micros_per_push: f64,
    tcp_connections: usize,
}

/// User plus system CPU time of this process so far, from /proc/self/stat (in clock
/// ticks of 10 ms on Linux); `None` elsewhere.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn main() {
    let pushes: usize = std::env::var("PUSHMATCH_BENCH_PUSHES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let rows = runtime.block_on(async {
        let mut rows = Vec::new();
        for platform in [Platform::Apns, Platform::Fcm] {
            for latency_ms in [0, 25] {
                for connections in [1, POOL] {
                    rows.push(run(platform, Duration::from_millis(latency_ms), connections, pushes).await);
                }
            }
        }
        rows
    });
    println!();
    println!("| provider | mock latency | connections | pushes | seconds | pushes/s | CPU µs/push | TCP connections |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in rows {
        println!(
            "| {} | {} ms | {} | {} | {:.2} | {:.0} | {:.0} | {} |",
            row.provider,
            row.latency_ms,
            row.connections,
            row.pushes,
            row.seconds,
            row.pushes as f64 / row.seconds,
            row.cpu_micros_per_push,
            row.tcp_connections
        );
    }
}

async fn run(platform: Platform, latency: Duration, connections: u32, pushes: usize) -> Row {
    let ca = TestCa::new();
    let files = tempfile::tempdir().expect("temp dir");
    let ca_path = ca.write_pem(files.path());
    let mock = MockServer::h2_counting(&ca, Reply::ok().after(latency)).await;
    let oauth = MockServer::token_endpoint().await;
    let mut config = PushConfig::default();
    match platform {
        Platform::Apns => {
            let (pem, _) = apns_key();
            let key_path = files.path().join("AuthKey.p8");
            std::fs::write(&key_path, pem).expect("write key");
            config.apns = Some(ApnsConfig {
                team_id: "ABCDE12345".into(),
                key_id: "KEY1234567".into(),
                private_key_path: key_path,
                topic: "nl.gors.authenticator".into(),
                endpoint: mock.endpoint(),
                ca_cert_path: ca_path,
                connections,
                max_in_flight: 1_000,
                request_timeout_ms: 10_000,
            });
        }
        Platform::Fcm => {
            let account_path = files.path().join("service-account.json");
            std::fs::write(&account_path, service_account_json(&oauth.token_uri())).expect("write account");
            config.fcm = Some(FcmConfig {
                service_account_path: account_path,
                endpoint: mock.endpoint(),
                ca_cert_path: ca_path,
                connections,
                max_in_flight: 1_000,
                request_timeout_ms: 10_000,
            });
        }
        Platform::WebPush => unreachable!("this bench measures the HTTP/2 providers"),
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let senders = pushmatch::push::senders_from_config(&config, Arc::clone(&clock)).await.expect("senders");
    let finished = Arc::new(Finished { sent: AtomicUsize::new(0), other: AtomicUsize::new(0), done: watch::Sender::new(0) });
    let shutdown = CancellationToken::new();
    let settings = DispatcherSettings { queue_capacity: pushes + 1_000, ..DispatcherSettings::default() };
    let dispatcher = Dispatcher::start(senders, finished.clone(), Arc::clone(&clock), settings, Arc::default(), shutdown.clone());
    let job = || PushJob {
        kind: PushKind::Challenge { challenge_id: ChallengeId::generate().expect("id"), pushes: 1 },
        tenant: TenantId("bench".into()),
        device_id: DeviceId::generate().expect("id"),
        platform,
        push_token: if platform == Platform::Apns { APNS_TOKEN } else { FCM_TOKEN }.into(),
        expires_at: clock.now().plus(Duration::from_secs(60)),
    };
    let jobs: Vec<PushJob> = (0..pushes).map(|_| job()).collect();

    // Warm up: connections open, the provider token is made, the OAuth grant done.
    let warmup = 1_000;
    for _ in 0..warmup {
        dispatcher.enqueue(job()).expect("room");
    }
    wait_for(&finished, warmup).await;

    let cpu_before = process_cpu();
    let started = Instant::now();
    for job in jobs {
        dispatcher.enqueue(job).expect("room");
    }
    wait_for(&finished, warmup + pushes).await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = match (cpu_before, process_cpu()) {
        (Some(before), Some(after)) => after.saturating_sub(before).as_secs_f64(),
        _ => f64::NAN,
    };
    shutdown.cancel();
    assert_eq!(finished.other.load(Ordering::Relaxed), 0, "every push was sent");
    assert_eq!(mock.count(), warmup + pushes, "the mock saw every push");
    Row {
        provider: platform.name(),
        latency_ms: u64::try_from(latency.as_millis()).expect("ms"),
        connections,
        pushes,
        seconds,
        cpu_micros_per_push: cpu * 1e6 / pushes as f64,
        tcp_connections: mock.connections(),
    }
}

async fn wait_for(finished: &Finished, count: usize) {
    let mut done = finished.done.subscribe();
    tokio::time::timeout(Duration::from_secs(300), done.wait_for(|done| *done >= count))
        .await
        .expect("pushes finish in time")
        .expect("reporter alive");
}
