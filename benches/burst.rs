//! The Monday-morning rush: a whole company signs in at once.
//!
//! `cargo bench --bench burst -- [flags]`. The broker runs as its real binary (one
//! process, or two replicas on one Redis) with its real APNs and FCM senders,
//! pointed at mock providers (HTTP/2 over TLS, lognormal latency, optional errors)
//! in this process. Users are enrolled before the clock starts; then an open-loop
//! burst of sign-ins: each is CreateChallenge plus WatchChallenge; the phone answers
//! when its push reaches the mock (or by the pull fallback), signing with its real
//! key. Latencies go into HDR histograms, measured from each sign-in's scheduled
//! start (so a stalled broker cannot hide its queueing: coordinated omission is
//! corrected). The last line of output is one JSON object.
//!
//! With `--store redis` that object also says what Redis cost, over the measured
//! window and per sign-in completed: `redis_calls_per_signin`, the calls the
//! replicas made (their `pushmatch_store_redis_calls_total`: a script or a command
//! is one); `redis_commands_per_signin`, the commands Redis executed (`INFO
//! commandstats`, so the commands inside scripts count too); and
//! `redis_cpu_us_per_signin`, the `redis-server` process's CPU (utime + stime from
//! `/proc/<pid>/stat`).
//!
//! Every run also says what a sign-in cost, over the measured window and per
//! sign-in completed: `broker_cpu_us_per_signin` (the broker processes' CPU,
//! utime + stime from `/proc`), `loadgen_cpu_us_per_signin` (this process's: the
//! IdPs, phones and mock providers), and `messages_per_signin`, the gRPC messages
//! the broker received and sent (`grpc_messages_per_signin`: each unary call is
//! two, a watch is its request plus each update) plus the requests its push
//! senders made to the providers (`pushes_per_signin`). CPU per sign-in is far
//! steadier than sign-ins per second on a shared machine. `--pin` puts the broker
//! on CPU 0 and everything else on CPU 1 (`taskset`), so one core's ceiling can
//! be read.
//!
//! Flags, each with its default: `cargo bench --bench burst -- --help` (the `Args`
//! struct below).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic, dead_code)]

#[path = "../tests/support/mock_push.rs"]
mod mock_push;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{CommandFactory as _, FromArgMatches as _, Parser};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mock_push::{MockServer, TestCa};
use pushmatch::demo::{ApiKeyInterceptor, IdpChallenges, IdpEnrollments};
use pushmatch::domain::api_key::api_key_digest_hex;
use pushmatch::pb;
use pushmatch::pb::challenge_service_client::ChallengeServiceClient;
use pushmatch::pb::enrollment_service_client::EnrollmentServiceClient;
use pushmatch::phone::{P256Encoding, PhoneKey, SimulatedPhone};
use pushmatch::store::redis::testing::RedisServer;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tonic::transport::{Channel, Endpoint};

const API_KEY: &str = "burst-bench-api-key";
/// How long a phone waits for its push before it falls back to pulling.
const WAIT: Duration = Duration::from_secs(15);
/// How long an IdP watches: past the longest TTL (60 s), so a watcher that sees no
/// final state in that time has really lost it.
const WATCH_WAIT: Duration = Duration::from_secs(75);

/// The bench's flags (`cargo bench --bench burst -- --help`). A flag given twice
/// keeps its last value.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "burst",
    bin_name = "cargo bench --bench burst --",
    about = "The Monday-morning rush: a sign-in burst against the real broker binary",
    long_about = None,
    args_override_self = true,
    allow_negative_numbers = true
)]
struct Args {
    /// Store backend: one broker on the embedded store, or two replicas on one Redis.
    #[arg(long, value_name = "STORE", default_value = "embedded", value_parser = ["embedded", "redis"])]
    store: String,
    /// Users to enroll (2,000 with --quick unless given).
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    users: usize,
    /// Sign-ins in the burst, round robin over the users (6,000 with --quick unless given).
    #[arg(long, value_name = "K", default_value_t = 50_000)]
    signins: usize,
    /// Offered sign-ins per second, open loop; 0 = as fast as it goes (closed loop, see --concurrency).
    #[arg(long, value_name = "R", default_value_t = 0.0)]
    rate: f64,
    /// Sign-ins in flight when --rate is 0.
    #[arg(long, value_name = "C", default_value_t = 1_000)]
    concurrency: usize,
    /// How long a phone's user takes to answer once the push arrives, in milliseconds.
    #[arg(long = "human-delay-ms", value_name = "D", default_value = "0", value_parser = millis)]
    human_delay: Duration,
    /// Mock providers' median answer latency in milliseconds (lognormal; 0 = no delay).
    #[arg(long, value_name = "M", default_value_t = 25.0)]
    median_ms: f64,
    /// Mock providers' p99 answer latency in milliseconds.
    #[arg(long, value_name = "P", default_value_t = 120.0)]
    p99_ms: f64,
    /// Fraction of pushes the mock providers refuse with 503.
    #[arg(long = "error-5xx", value_name = "F", default_value_t = 0.0)]
    error_5xx: f64,
    /// Fraction of pushes refused as unregistered (APNs 410, FCM 404 UNREGISTERED).
    #[arg(long = "error-410", value_name = "F", default_value_t = 0.0)]
    error_410: f64,
    /// Fraction of pushes refused with 429 and Retry-After.
    #[arg(long = "error-429", value_name = "F", default_value_t = 0.0)]
    error_429: f64,
    /// Fraction of phones enrolled on Web Push (PLATFORM_WEBPUSH) instead of APNs or
    /// FCM, pushed to through a mock push service that decrypts each message.
    #[arg(long = "webpush-share", value_name = "F", default_value_t = 0.0)]
    webpush_share: f64,
    /// The IdP signs in with CreateAndWatchChallenge (one call) instead of
    /// CreateChallenge followed by WatchChallenge.
    #[arg(long = "create-and-watch")]
    create_and_watch: bool,
    /// The IdP's watch asks for the final state only (`final_state_only`): no
    /// delivery updates on its stream.
    #[arg(long = "final-state-only")]
    final_state_only: bool,
    /// Fire N CreateChallenge calls within one second instead of the burst.
    #[arg(long, value_name = "N")]
    herd: Option<usize>,
    /// Create N challenges nobody answers (TTL 300 s), wait for their pushes, then read the broker's RSS.
    #[arg(long, value_name = "N")]
    live: Option<usize>,
    /// 2,000 users and 6,000 sign-ins (under a minute); fails unless lost, double, errors and wrong outcomes are 0. CI runs it.
    #[arg(long)]
    quick: bool,
    /// Each broker's server.worker_threads: 0 = tokio's default, one worker per CPU;
    /// 1 = the current-thread scheduler; N = N workers.
    #[arg(long, value_name = "N", default_value_t = 0)]
    broker_threads: u16,
    /// HTTP/2 connections the IdPs open to the broker, and as many again for the
    /// phones: fewer connections carry more streams each, whose frames can then
    /// share a write.
    #[arg(long, value_name = "N", default_value_t = 32)]
    connections: usize,
    /// The brokers' `[log] level` (default "error": nothing per call; "info" is the
    /// shipped default, under which every call opens its spans).
    #[arg(long = "broker-log-level", value_name = "FILTER")]
    broker_log_level: Option<String>,
    /// The broker on CPU 0 and this process (IdPs, phones, mock providers, Redis) on CPU 1, with taskset; needs 2 CPUs.
    #[arg(long)]
    pin: bool,
    /// Write a per-second CSV (second, sign-ins, worst create ms) to FILE for benches/chart.py.
    #[arg(long, value_name = "FILE")]
    timeline: Option<PathBuf>,
    /// Sign in at --rate for MINUTES (in place of --signins), printing the broker's
    /// RSS and store records every --sample-seconds; the JSON gains the RSS growth
    /// after the first 10 minutes (issue 19's flat-memory check).
    #[arg(long, value_name = "MINUTES")]
    soak: Option<f64>,
    /// Seconds between the samples of --soak.
    #[arg(long, value_name = "S", default_value_t = 60)]
    sample_seconds: u64,
    /// Write the samples of --soak as CSV (seconds, rss_mb, store_records,
    /// challenges_live, signins, file_mb, heap_mb, heap_resident_mb) to FILE for
    /// benches/chart.py.
    #[arg(long, value_name = "FILE")]
    soak_csv: Option<PathBuf>,
    /// Passed by `cargo bench` to harness = false benches; ignored.
    #[arg(long = "bench", hide = true)]
    _bench: bool,
}

fn millis(value: &str) -> Result<Duration, std::num::ParseIntError> {
    value.parse().map(Duration::from_millis)
}

fn parse_args() -> Args {
    let matches = Args::command().get_matches();
    let mut args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut Args::command()).exit());
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    if args.quick {
        if !given("users") {
            args.users = 2_000;
        }
        if !given("signins") {
            args.signins = 6_000;
        }
    }
    if let Some(minutes) = args.soak {
        if args.rate <= 0.0 || minutes <= 0.0 {
            Args::command().error(ErrorKind::ArgumentConflict, "--soak needs a --rate and MINUTES above 0").exit();
        }
        // Round robin over the users: each signs in every users / rate seconds, and
        // the default limit is 10 challenges per user in 10 minutes.
        if (args.users as f64) < args.rate * 60.0 {
            let message = format!(
                "--soak at --rate {} needs at least {} --users: a user may start 10 challenges in 10 minutes",
                args.rate,
                (args.rate * 60.0).ceil()
            );
            Args::command().error(ErrorKind::ArgumentConflict, message).exit();
        }
        args.signins = (args.rate * minutes * 60.0) as usize;
    }
    // Sign-ins go round robin over the users; at most 3 of a user's may be pending
    // (the default limit), and the burst may have all of them in flight at once.
    else if args.herd.is_none() && args.live.is_none() && args.signins > 3 * args.users {
        let message = format!(
            "--signins {} needs at least {} --users: a user may hold 3 pending challenges",
            args.signins,
            args.signins.div_ceil(3)
        );
        Args::command().error(ErrorKind::ArgumentConflict, message).exit();
    }
    args
}

/// A small deterministic generator (splitmix64): the same run makes the same choices.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn unit(x: u64) -> f64 {
    (mix(x) >> 11) as f64 / (1u64 << 53) as f64
}

// ---------------------------------------------------------------------------
// The mock providers: answer after a lognormal delay, report arrivals.
// ---------------------------------------------------------------------------

/// Where pushes arrive: the first push of each challenge, and who got it.
#[derive(Default)]
struct Arrivals {
    slots: Mutex<HashMap<String, Slot>>,
    delivered: AtomicU64,
    refused: AtomicU64,
}

enum Slot {
    Arrived(Instant, String),
    Waiting(oneshot::Sender<(Instant, String)>),
}

impl Arrivals {
    fn arrive(&self, challenge_id: String, token: String, at: Instant) {
        let mut slots = self.slots.lock().unwrap();
        match slots.remove(&challenge_id) {
            Some(Slot::Waiting(waiter)) => {
                let _ = waiter.send((at, token));
            }
            Some(first @ Slot::Arrived(..)) => {
                slots.insert(challenge_id, first);
            }
            None => {
                slots.insert(challenge_id, Slot::Arrived(at, token));
            }
        }
    }

    async fn wait(&self, challenge_id: &str) -> Option<(Instant, String)> {
        let receiver = {
            let mut slots = self.slots.lock().unwrap();
            match slots.remove(challenge_id) {
                Some(Slot::Arrived(at, token)) => return Some((at, token)),
                _ => {
                    let (sender, receiver) = oneshot::channel();
                    slots.insert(challenge_id.to_owned(), Slot::Waiting(sender));
                    receiver
                }
            }
        };
        tokio::time::timeout(WAIT, receiver).await.ok().and_then(Result::ok)
    }
}

#[derive(Clone)]
struct ProviderBehaviour {
    mu: f64,
    sigma: f64,
    error_5xx: f64,
    error_410: f64,
    error_429: f64,
}

impl ProviderBehaviour {
    fn new(args: &Args) -> Self {
        // Lognormal: the median is e^mu; the p99 is e^(mu + 2.326 sigma).
        let mu = args.median_ms.max(0.001).ln();
        let sigma = if args.median_ms <= 0.0 { 0.0 } else { ((args.p99_ms / args.median_ms).ln() / 2.326).max(0.0) };
        Self { mu, sigma, error_5xx: args.error_5xx, error_410: args.error_410, error_429: args.error_429 }
    }

    fn delay(&self, seed: u64) -> Duration {
        if self.mu <= 0.001f64.ln() + 1e-9 {
            return Duration::ZERO;
        }
        // Box-Muller from two uniforms.
        let (u1, u2) = (unit(seed).max(1e-12), unit(seed ^ 0x5555));
        let normal = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        Duration::from_secs_f64((self.mu + self.sigma * normal).exp() / 1000.0)
    }
}

fn response(status: u16, body: &'static str, retry_after: bool) -> hyper::Response<Full<Bytes>> {
    let mut builder = hyper::Response::builder().status(status).header("content-type", "application/json");
    if retry_after {
        builder = builder.header("retry-after", "1");
    }
    builder.body(Full::new(Bytes::from_static(body.as_bytes()))).unwrap()
}

/// One request at a mock provider (its `seed`th): after the provider's delay, maybe
/// a refusal; else the push is recorded as arrived (when it carries a challenge) and
/// accepted.
async fn answer_push(
    request: hyper::Request<hyper::body::Incoming>,
    behaviour: &ProviderBehaviour,
    seed: u64,
    arrivals: &Arrivals,
) -> hyper::Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let alert = request.headers().get("apns-push-type").is_none_or(|v| v == "alert");
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    tokio::time::sleep(behaviour.delay(seed)).await;
    let fcm = path.ends_with("messages:send");
    let roll = unit(seed ^ 0xABCD);
    if roll < behaviour.error_5xx {
        arrivals.refused.fetch_add(1, Ordering::Relaxed);
        return response(503, r#"{"reason":"ServiceUnavailable"}"#, false);
    }
    if roll < behaviour.error_5xx + behaviour.error_429 {
        arrivals.refused.fetch_add(1, Ordering::Relaxed);
        return response(429, r#"{"reason":"TooManyRequests"}"#, true);
    }
    if roll < behaviour.error_5xx + behaviour.error_429 + behaviour.error_410 {
        arrivals.refused.fetch_add(1, Ordering::Relaxed);
        return if fcm {
            response(
                404,
                r#"{"error":{"code":404,"status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#,
                false,
            )
        } else {
            response(410, r#"{"reason":"Unregistered"}"#, false)
        };
    }
    let webpush = path.starts_with("/wpush/");
    if webpush {
        if roll < behaviour.error_5xx + behaviour.error_429 + behaviour.error_410 {
            return response(410, "", false);
        }
        // The message, decrypted as the browser would; a challenge has no `state`
        // (a clear) and no `kind` (a notice).
        let auth = web_push_native::Auth::from(BROWSER.1);
        let json: serde_json::Value = web_push_native::decrypt(body.to_vec(), &BROWSER.0, &auth)
            .ok()
            .and_then(|plain| serde_json::from_slice(&plain).ok())
            .unwrap_or_default();
        if let Some(challenge_id) = json["challenge_id"].as_str().filter(|_| json.get("state").is_none()) {
            arrivals.delivered.fetch_add(1, Ordering::Relaxed);
            arrivals.arrive(challenge_id.to_owned(), path.clone(), Instant::now());
        }
        return response(201, "", false);
    }
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let (challenge_id, token, is_challenge) = if fcm {
        let message = &json["message"];
        let data = &message["data"];
        (data["challenge_id"].as_str(), message["token"].as_str(), data.get("state").is_none())
    } else {
        (json["challenge_id"].as_str(), path.strip_prefix("/3/device/"), alert)
    };
    if let (Some(challenge_id), Some(token), true) = (challenge_id, token, is_challenge) {
        arrivals.delivered.fetch_add(1, Ordering::Relaxed);
        arrivals.arrive(challenge_id.to_owned(), token.to_owned(), Instant::now());
    }
    if fcm { response(200, r#"{"name":"projects/pushmatch-test/messages/1"}"#, false) } else { response(200, "", false) }
}

/// The key pair and auth secret of every bench browser's Web Push subscription
/// (one for all: the mock push service decrypts with it).
static BROWSER: std::sync::LazyLock<(p256::SecretKey, [u8; 16])> =
    std::sync::LazyLock::new(|| (p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng), [7; 16]));

/// One mock provider (APNs or FCM, told apart by the path) over HTTP/2 and TLS; with
/// `http1`, a Web Push service (HTTP/1.1 over TLS).
async fn start_provider(ca: &TestCa, behaviour: ProviderBehaviour, arrivals: Arc<Arrivals>, http1: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config(if http1 { &[b"http/1.1"] } else { &[b"h2"] }));
    let requests = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let _ = tcp.set_nodelay(true);
            let (acceptor, behaviour, arrivals, requests) =
                (acceptor.clone(), behaviour.clone(), arrivals.clone(), requests.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let (behaviour, arrivals, requests) = (behaviour.clone(), arrivals.clone(), requests.clone());
                    async move {
                        let seed = requests.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, Infallible>(answer_push(request, &behaviour, seed, &arrivals).await)
                    }
                });
                if http1 {
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
                    return;
                }
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(1000)
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    format!("https://127.0.0.1:{}", addr.port())
}

// ---------------------------------------------------------------------------
// The broker processes.
// ---------------------------------------------------------------------------

struct Broker {
    child: tokio::process::Child,
    addr: String,
    /// Where its `/metrics` listens.
    metrics_addr: String,
}

/// A kB field of /proc/<pid>/status ("VmRSS", "VmHWM"); 0 when unreadable.
fn proc_status_kb(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0)
}

/// A process's CPU time so far (utime + stime from /proc/<pid>/stat) in seconds; 0
/// when unreadable.
fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

impl Broker {
    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Peak resident set (VmHWM) in MB and CPU seconds so far, from /proc.
    fn usage(&self) -> (f64, f64) {
        let Some(pid) = self.child.id() else { return (0.0, 0.0) };
        (proc_status_kb(pid, "VmHWM") / 1024.0, proc_cpu_seconds(pid))
    }

    /// The replica's `pushmatch_store_redis_calls_total` (0 when it has none yet).
    async fn redis_calls(&self) -> f64 {
        scrape(&self.metrics_addr, &["pushmatch_store_redis_calls_total"]).await[0]
    }
}

/// The values of unlabelled series `names` on the `/metrics` page at `addr` (0 for
/// one the page does not have).
async fn scrape(addr: &str, names: &[&str]) -> Vec<f64> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("metrics listener");
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.expect("metrics request");
    let mut response = String::new();
    socket.read_to_string(&mut response).await.expect("metrics response");
    names
        .iter()
        .map(|name| {
            response
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or(0.0)
        })
        .collect()
}

/// What the bench reads of the `redis-server` around the measured window: commands
/// executed (`INFO commandstats`, those run inside scripts included; the bench's own
/// INFO left out) and its process's CPU seconds.
struct RedisUsage {
    commands: f64,
    cpu_seconds: f64,
}

impl RedisUsage {
    async fn read(url: &str) -> Self {
        let client = redis::Client::open(url).expect("redis url");
        let mut connection = client.get_multiplexed_async_connection().await.expect("redis");
        let server: String = redis::cmd("INFO").arg("server").query_async(&mut connection).await.expect("INFO server");
        let pid: u32 = server
            .lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .and_then(|pid| pid.trim().parse().ok())
            .expect("redis-server's process_id");
        let stats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut connection).await.expect("INFO commandstats");
        let commands = stats
            .lines()
            .filter(|line| !line.starts_with("cmdstat_info:"))
            .filter_map(|line| line.split_once("calls=")?.1.split(',').next()?.parse::<f64>().ok())
            .sum();
        Self { commands, cpu_seconds: proc_cpu_seconds(pid) }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Providers {
    apns: String,
    fcm: String,
    webpush: String,
    vapid_key_path: PathBuf,
    token_uri: String,
    ca_path: String,
    apns_key_path: PathBuf,
    service_account_path: PathBuf,
}

/// The mock APNs and FCM providers, the OAuth token endpoint FCM's sender uses (kept
/// alive by the caller), and the key, service account and CA files the brokers read
/// from `dir`.
async fn start_providers(dir: &Path, behaviour: ProviderBehaviour, arrivals: &Arc<Arrivals>) -> (Providers, MockServer) {
    let ca = TestCa::new();
    let token_endpoint = MockServer::token_endpoint().await;
    let (apns_pem, _) = mock_push::apns_key();
    let apns_key_path = dir.join("AuthKey.p8");
    std::fs::write(&apns_key_path, apns_pem).unwrap();
    let service_account_path = dir.join("service-account.json");
    std::fs::write(&service_account_path, mock_push::service_account_json(&token_endpoint.token_uri())).unwrap();
    let vapid_key_path = dir.join("vapid.pem");
    let vapid = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    std::fs::write(&vapid_key_path, p256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&vapid, Default::default()).unwrap().as_bytes())
        .unwrap();
    let providers = Providers {
        apns: start_provider(&ca, behaviour.clone(), Arc::clone(arrivals), false).await,
        fcm: start_provider(&ca, behaviour.clone(), Arc::clone(arrivals), false).await,
        webpush: start_provider(&ca, behaviour, Arc::clone(arrivals), true).await,
        vapid_key_path,
        token_uri: token_endpoint.token_uri(),
        ca_path: ca.write_pem(dir),
        apns_key_path,
        service_account_path,
    };
    (providers, token_endpoint)
}

async fn start_broker(
    dir: &Path,
    index: usize,
    store: &str,
    redis_url: &str,
    providers: &Providers,
    env: &[(String, String)],
) -> Broker {
    let (port, metrics_port) = (free_port(), free_port());
    let config = broker_config(port, metrics_port, &dir.join(format!("data-{index}")), store, redis_url, providers);
    let path = dir.join(format!("broker-{index}.toml"));
    std::fs::write(&path, config).unwrap();
    let mut command = if pinned() {
        // taskset execs the broker: the child's pid is the broker's.
        let mut taskset = tokio::process::Command::new("taskset");
        taskset.args(["--cpu-list", "0", env!("CARGO_BIN_EXE_pushmatch")]);
        taskset
    } else {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pushmatch"))
    };
    // Only the file and `env` configure it, not the caller's PUSHMATCH_* variables
    // (`serve` refuses a PUSHMATCH_ variable that is not a setting).
    for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("PUSHMATCH_")) {
        command.env_remove(key);
    }
    let child = command
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the pushmatch binary");
    let addr = format!("http://127.0.0.1:{port}");
    wait_until_serving(&addr).await;
    if pinned() {
        assert_eq!(cpus_allowed(child.id().unwrap_or(0)), "0", "the broker runs on CPU 0 only");
    }
    Broker { child, addr, metrics_addr: format!("127.0.0.1:{metrics_port}") }
}

static PINNED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn pinned() -> bool {
    PINNED.get().copied().unwrap_or(false)
}

/// `--pin`: this process's threads (and those it starts later, Redis included) on
/// CPU 1; the brokers go on CPU 0 as they start (`start_broker`).
fn pin_self() {
    let cpus = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
    if cpus < 2 {
        eprintln!("--pin needs 2 CPUs; this machine offers {cpus}");
        std::process::exit(2);
    }
    let status = std::process::Command::new("taskset")
        .args(["--all-tasks", "--pid", "--cpu-list", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("run taskset (util-linux)");
    assert!(status.success(), "taskset could not pin the bench to CPU 1: {status}");
    assert_eq!(cpus_allowed(std::process::id()), "1", "the bench runs on CPU 1 only");
    PINNED.set(true).unwrap();
}

/// Where a process may run (`Cpus_allowed_list` of /proc/<pid>/status).
fn cpus_allowed(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap_or_default().trim().to_owned()
}

/// A broker's configuration file: listening on `port`, its store in `data` (or on
/// Redis), its APNs and FCM senders pointed at the mock providers.
fn broker_config(port: u16, metrics_port: u16, data: &Path, store: &str, redis_url: &str, providers: &Providers) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"
metrics_listen = "127.0.0.1:{metrics_port}"
max_concurrent_requests_per_connection = 4096

[store]
backend = "{store}"
path = "{data}"
redis_url = "{redis_url}"

[log]
level = "error"

[secrets]
key_hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

[[tenants]]
id = "bench"
display_name = "Bench"
api_key_sha256 = ["{key}"]

[push.apns]
team_id = "ABCDE12345"
key_id = "KEY1234567"
private_key_path = "{apns_key}"
topic = "nl.gors.authenticator"
endpoint = "{apns}"
ca_cert_path = "{ca}"

[push.fcm]
service_account_path = "{service_account}"
endpoint = "{fcm}"
ca_cert_path = "{ca}"

[push.webpush]
vapid_private_key_path = "{vapid}"
subject = "mailto:bench@example.com"
ca_cert_path = "{ca}"
# The mock push service is on this machine.
insecure_allow_loopback = true
"#,
        vapid = providers.vapid_key_path.display(),
        data = data.display(),
        key = api_key_digest_hex(API_KEY),
        apns_key = providers.apns_key_path.display(),
        apns = providers.apns,
        fcm = providers.fcm,
        ca = providers.ca_path,
        service_account = providers.service_account_path.display(),
    )
}

/// Waits (a minute at most) until the broker at `addr` is ready: gRPC health says SERVING.
async fn wait_until_serving(addr: &str) {
    let endpoint = Endpoint::from_shared(addr.to_owned()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Ok(channel) = endpoint.connect().await {
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                if let Ok(status) = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await
                    && status.into_inner().status() == tonic_health::pb::health_check_response::ServingStatus::Serving
                {
                    return;
                }
            }
            // The process is starting; try again shortly.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the broker serves within a minute");
}

/// A pool of HTTP/2 connections to one broker (one connection carries a limited
/// number of concurrent streams).
async fn channels(addr: &str, count: usize) -> Vec<Channel> {
    let mut pool = Vec::new();
    for _ in 0..count {
        pool.push(Endpoint::from_shared(addr.to_owned()).unwrap().tcp_nodelay(true).connect().await.expect("connect"));
    }
    pool
}

// ---------------------------------------------------------------------------
// Enrollment: users and their phones, before the clock starts.
// ---------------------------------------------------------------------------

struct Phone {
    device_id: String,
    key: PhoneKey,
    platform: pb::Platform,
}

struct Population {
    /// Per user, the indexes of its phones.
    users: Vec<Vec<usize>>,
    phones: Vec<Phone>,
    by_token: HashMap<String, usize>,
}

fn token_for(platform: pb::Platform, index: usize) -> String {
    if platform == pb::Platform::Apns {
        format!("{:064x}", mix(index as u64) as u128 * 7919 + index as u128)
    } else {
        format!("fcm-token-{index}")
    }
}

/// The Web Push subscription of the `index`th phone, at the mock push service.
fn subscription_for(webpush: &str, index: usize) -> String {
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;
    let b64 = |bytes: &[u8]| data_encoding::BASE64URL_NOPAD.encode(bytes);
    serde_json::json!({
        "endpoint": format!("{webpush}/wpush/{index}"),
        "keys": {"p256dh": b64(BROWSER.0.public_key().to_encoded_point(false).as_bytes()), "auth": b64(&BROWSER.1)},
    })
    .to_string()
}

async fn enroll(args: &Args, idp: &[Channel], phones: &[Channel], webpush: &str) -> Population {
    let share = args.webpush_share;
    let mut plan = Vec::new();
    for user in 0..args.users {
        // 70% one phone, 20% two, 10% three: about 1.4 on average.
        let roll = unit(user as u64 ^ 0xE11);
        let count = if roll < 0.7 {
            1
        } else if roll < 0.9 {
            2
        } else {
            3
        };
        for _ in 0..count {
            plan.push(user);
        }
    }
    let results = futures::stream::iter(plan.into_iter().enumerate())
        .map(|(index, user)| {
            let idp = idp[index % idp.len()].clone();
            let channel = phones[index % phones.len()].clone();
            async move {
                let platform = if unit(index as u64 ^ 0x3B) < share {
                    pb::Platform::Webpush
                } else if index % 2 == 0 {
                    pb::Platform::Apns
                } else {
                    pb::Platform::Fcm
                };
                let key = if platform == pb::Platform::Apns {
                    PhoneKey::p256(P256Encoding::Sec1Uncompressed)
                } else {
                    PhoneKey::ed25519()
                };
                let mut enrollments: IdpEnrollments =
                    EnrollmentServiceClient::with_interceptor(idp, ApiKeyInterceptor::new(API_KEY).unwrap());
                let enrollment = enrollments
                    .begin_enrollment(pb::BeginEnrollmentRequest {
                        user_id: format!("user-{user}"),
                        account_name: format!("user-{user}@bench"),
                        kind: pb::EnrollmentKind::Push.into(),
                    })
                    .await
                    .expect("begin enrollment")
                    .into_inner();
                // A Web Push phone is found by its endpoint's path, which the mock sees.
                let (token, found_by) = match platform {
                    pb::Platform::Webpush => (subscription_for(webpush, index), format!("/wpush/{index}")),
                    _ => (token_for(platform, index), token_for(platform, index)),
                };
                let mut phone = SimulatedPhone::new(channel, key.clone(), platform, token);
                phone.enroll(&enrollment.uri, "bench phone").await.expect("complete enrollment");
                (user, found_by, Phone { device_id: phone.device_id().to_owned(), key, platform })
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let mut population = Population { users: vec![Vec::new(); args.users], phones: Vec::new(), by_token: HashMap::new() };
    for (user, token, phone) in results {
        population.users[user].push(population.phones.len());
        population.by_token.insert(token, population.phones.len());
        population.phones.push(phone);
    }
    population
}

// ---------------------------------------------------------------------------
// The burst.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Intent {
    Approve,
    Deny,
    WrongNumber,
    NeverAnswer,
}

struct Recorder {
    create: Mutex<Histogram<u64>>,
    push: Mutex<Histogram<u64>>,
    respond: Mutex<Histogram<u64>>,
    notify: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    /// gRPC messages of the sign-ins, both ways (see the module's doc).
    grpc_messages: AtomicU64,
    completed: AtomicU64,
    expired: AtomicU64,
    pull_fallbacks: AtomicU64,
    lost: AtomicU64,
    double: AtomicU64,
    wrong_outcome: AtomicU64,
    /// Per second since the start: sign-ins completed, and the worst create latency.
    timeline: Mutex<BTreeMap<u64, (u64, u64)>>,
}

impl Recorder {
    fn new() -> Self {
        let histogram = || Mutex::new(Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap());
        Self {
            create: histogram(),
            push: histogram(),
            respond: histogram(),
            notify: histogram(),
            errors: Mutex::new(BTreeMap::new()),
            grpc_messages: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            pull_fallbacks: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            double: AtomicU64::new(0),
            wrong_outcome: AtomicU64::new(0),
            timeline: Mutex::new(BTreeMap::new()),
        }
    }

    fn record(histogram: &Mutex<Histogram<u64>>, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX).max(1);
        histogram.lock().unwrap().saturating_record(micros);
    }

    fn messages(&self, count: u64) {
        self.grpc_messages.fetch_add(count, Ordering::Relaxed);
    }

    fn error(&self, what: &str, status: &tonic::Status) {
        *self.errors.lock().unwrap().entry(format!("{what}:{:?}", status.code())).or_default() += 1;
    }

    fn tick(&self, start: Instant, create_latency: Duration) {
        let second = start.elapsed().as_secs();
        let mut timeline = self.timeline.lock().unwrap();
        let entry = timeline.entry(second).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(u64::try_from(create_latency.as_micros()).unwrap_or(u64::MAX));
    }
}

fn percentile_ms(histogram: &Mutex<Histogram<u64>>, q: f64) -> f64 {
    let histogram = histogram.lock().unwrap();
    if histogram.is_empty() { 0.0 } else { histogram.value_at_quantile(q) as f64 / 1000.0 }
}

struct World {
    idp: Vec<Channel>,
    phones: Vec<Channel>,
    population: Population,
    arrivals: Arc<Arrivals>,
    recorder: Recorder,
    human_delay: Duration,
    /// `--create-and-watch`.
    create_and_watch: bool,
    /// `--final-state-only`.
    final_state_only: bool,
    start: Instant,
}

fn intent_of(i: usize) -> (Intent, bool) {
    let roll = unit(i as u64 ^ 0x1D);
    let intent = if roll < 0.02 {
        Intent::Deny
    } else if roll < 0.03 {
        Intent::WrongNumber
    } else if roll < 0.06 {
        Intent::NeverAnswer
    } else {
        Intent::Approve
    };
    (intent, intent != Intent::NeverAnswer && unit(i as u64 ^ 0x2D) < 0.02)
}

/// The IdP's watcher: the first final state of the challenge and when it was seen;
/// None when the stream ended or WATCH_WAIT passed without one.
async fn watch_until_final(
    watch: &mut tonic::Streaming<pb::Challenge>,
    recorder: &Recorder,
) -> Option<(Instant, pb::ChallengeState, pb::DenyReason)> {
    tokio::time::timeout(WATCH_WAIT, async {
        while let Ok(Some(update)) = watch.message().await {
            recorder.messages(1);
            if update.state() != pb::ChallengeState::Pending {
                return Some((Instant::now(), update.state(), update.deny_reason()));
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// The phone that answers sign-in `i`: the first of the user's phones that the push
/// reached, or (push lost) the user's first phone through the pull fallback. None
/// (recorded as a wrong outcome or an error) when the pull does not show the challenge.
async fn answering_phone(
    world: &World,
    i: usize,
    user: usize,
    challenge_id: &str,
    arrival: Option<(Instant, String)>,
    scheduled: Instant,
) -> Option<SimulatedPhone> {
    let phone_index = match &arrival {
        Some((at, token)) => {
            Recorder::record(&world.recorder.push, at.saturating_duration_since(scheduled));
            world.population.by_token.get(token).copied().unwrap_or(world.population.users[user][0])
        }
        None => world.population.users[user][0],
    };
    let phone = &world.population.phones[phone_index];
    let mut device =
        SimulatedPhone::new(world.phones[i % world.phones.len()].clone(), phone.key.clone(), phone.platform, String::new());
    device.impersonate(&phone.device_id);
    if arrival.is_none() {
        world.recorder.pull_fallbacks.fetch_add(1, Ordering::Relaxed);
        let pending = device.pending().await;
        world.recorder.messages(2);
        match pending {
            Ok(pending) if pending.iter().any(|p| p.challenge_id == challenge_id) => {}
            Ok(_) => {
                world.recorder.wrong_outcome.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Err(status) => {
                world.recorder.error("pending", &status);
                return None;
            }
        }
    }
    Some(device)
}

/// What the phone sends for `intent` on a challenge showing `number`, and the final
/// state the IdP should then see.
fn answer_for(intent: Intent, number: &str) -> (pb::Decision, String, pb::ChallengeState) {
    match intent {
        Intent::Approve => (pb::Decision::Approve, number.to_owned(), pb::ChallengeState::Approved),
        Intent::WrongNumber => {
            (pb::Decision::Approve, if number == "10" { "11".into() } else { "10".into() }, pb::ChallengeState::Denied)
        }
        _ => (pb::Decision::Deny, String::new(), pb::ChallengeState::Denied),
    }
}

async fn sign_in(world: Arc<World>, i: usize, scheduled: Instant) {
    let (intent, twice) = intent_of(i);
    let user = i % world.population.users.len();
    let mut challenges: IdpChallenges = ChallengeServiceClient::with_interceptor(
        world.idp[i % world.idp.len()].clone(),
        ApiKeyInterceptor::new(API_KEY).unwrap(),
    );
    let request = pb::CreateChallengeRequest {
        user_id: format!("user-{user}"),
        context: Some(pb::SignInContext { application: "Citrix Workspace".into(), ..Default::default() }),
        // Those who never answer expire on a short TTL.
        ttl_seconds: if intent == Intent::NeverAnswer { 2 } else { 60 },
        // Fixed width, as an IdP's ids mostly are (a UUID, say): an id one digit longer from
        // sign-in 1,000,000 on moved every record into jemalloc's next size class,
        // a step of 9 MB in the soak's minutes 42 to 48 (BENCHMARKS.md, issue 19).
        request_id: format!("signin-{i:010}"),
        final_state_only: false,
    };
    let (challenge, mut watch, create_latency) = if world.create_and_watch {
        let request = pb::CreateChallengeRequest { final_state_only: world.final_state_only, ..request };
        let mut stream = match challenges.create_and_watch_challenge(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return world.recorder.error("create", &status),
        };
        let first = match stream.message().await {
            Ok(Some(first)) => first,
            Ok(None) => {
                return world.recorder.error("create", &tonic::Status::aborted("the stream ended before its first message"));
            }
            Err(status) => return world.recorder.error("create", &status),
        };
        world.recorder.messages(2);
        (first, stream, scheduled.elapsed())
    } else {
        let challenge = match challenges.create_challenge(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return world.recorder.error("create", &status),
        };
        world.recorder.messages(2);
        let create_latency = scheduled.elapsed();
        let watch = match challenges
            .watch_challenge(pb::WatchChallengeRequest {
                challenge_id: challenge.challenge_id.clone(),
                final_state_only: world.final_state_only,
            })
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => return world.recorder.error("watch", &status),
        };
        world.recorder.messages(1);
        (challenge, watch, create_latency)
    };
    Recorder::record(&world.recorder.create, create_latency);
    let watcher = tokio::spawn({
        let world = Arc::clone(&world);
        async move { watch_until_final(&mut watch, &world.recorder).await }
    });

    let arrival = if intent == Intent::NeverAnswer { None } else { world.arrivals.wait(&challenge.challenge_id).await };
    if intent == Intent::NeverAnswer {
        match watcher.await.ok().flatten() {
            Some((_, pb::ChallengeState::Expired, _)) => world.recorder.expired.fetch_add(1, Ordering::Relaxed),
            _ => world.recorder.wrong_outcome.fetch_add(1, Ordering::Relaxed),
        };
        world.recorder.tick(world.start, create_latency);
        return;
    }
    let Some(mut device) = answering_phone(&world, i, user, &challenge.challenge_id, arrival, scheduled).await else { return };
    if !world.human_delay.is_zero() {
        tokio::time::sleep(world.human_delay).await;
    }
    let (decision, number, expected) = answer_for(intent, &challenge.number);
    let respond_start = Instant::now();
    let answer = match device.respond(&challenge.challenge_id, decision, &number).await {
        Ok(answer) => answer,
        Err(status) => return world.recorder.error("respond", &status),
    };
    world.recorder.messages(2);
    Recorder::record(&world.recorder.respond, respond_start.elapsed());
    if twice && let Ok(again) = device.respond(&challenge.challenge_id, decision, &number).await {
        world.recorder.messages(2);
        if again.accepted {
            world.recorder.double.fetch_add(1, Ordering::Relaxed);
        }
    }
    match watcher.await.ok().flatten() {
        Some((at, state, _)) if answer.accepted => {
            Recorder::record(&world.recorder.notify, at.saturating_duration_since(respond_start));
            if state != expected {
                world.recorder.wrong_outcome.fetch_add(1, Ordering::Relaxed);
            }
        }
        Some(_) => {}
        None if answer.accepted => {
            world.recorder.lost.fetch_add(1, Ordering::Relaxed);
        }
        None => {}
    }
    if !answer.accepted {
        world.recorder.wrong_outcome.fetch_add(1, Ordering::Relaxed);
    }
    world.recorder.completed.fetch_add(1, Ordering::Relaxed);
    world.recorder.tick(world.start, create_latency);
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    if args.pin {
        pin_self();
    }
    let dir = tempfile::tempdir().unwrap();
    let arrivals = Arc::new(Arrivals::default());
    let (providers, _token_endpoint) = start_providers(dir.path(), ProviderBehaviour::new(&args), &arrivals).await;

    let redis = if args.store == "redis" { Some(RedisServer::start().await) } else { None };
    let redis_url = redis.as_ref().map(RedisServer::url).unwrap_or_default();
    // --live: each user may hold its share of the live challenges, and they live 300 s.
    let mut broker_env: Vec<(String, String)> = match args.live {
        Some(live) => {
            let per_user = (live / args.users.max(1) + 2).to_string();
            vec![
                ("PUSHMATCH_LIMITS__MAX_PENDING_PER_USER".into(), per_user.clone()),
                ("PUSHMATCH_LIMITS__MAX_CHALLENGES_PER_WINDOW".into(), per_user),
                ("PUSHMATCH_PUSH__QUEUE_CAPACITY".into(), "1000000".into()),
            ]
        }
        None => Vec::new(),
    };
    if args.broker_threads > 0 {
        broker_env.push(("PUSHMATCH_SERVER__WORKER_THREADS".into(), args.broker_threads.to_string()));
    }
    if let Some(level) = &args.broker_log_level {
        broker_env.push(("PUSHMATCH_LOG__LEVEL".into(), level.clone()));
    }
    let mut brokers = vec![start_broker(dir.path(), 0, &args.store, &redis_url, &providers, &broker_env).await];
    if args.store == "redis" {
        brokers.push(start_broker(dir.path(), 1, &args.store, &redis_url, &providers, &broker_env).await);
    }
    // The IdP talks to the first replica; phones to the last (the other one with Redis).
    let idp = channels(&brokers[0].addr, args.connections.max(1)).await;
    let phones = channels(&brokers[brokers.len() - 1].addr, args.connections.max(1)).await;

    // The enrolling broker's RSS and CPU before and after: the cost of an enrolled phone.
    let rss_kb = |broker: &Broker| proc_status_kb(broker.child.id().unwrap_or(0), "VmRSS");
    let (rss_before_enroll, enroll_cpu_before) = (rss_kb(&brokers[0]), brokers[0].usage().1);
    let enroll_start = Instant::now();
    let population = enroll(&args, &idp, &phones, &providers.webpush).await;
    let enroll_seconds = enroll_start.elapsed().as_secs_f64();
    let enrolled = population.phones.len() as f64;
    let enroll_figures = serde_json::json!({
        "enroll_phones_per_s": (enrolled / enroll_seconds).round(),
        "enroll_broker_cpu_us_per_phone": ((brokers[0].usage().1 - enroll_cpu_before) * 1e6 / enrolled).round(),
        "rss_after_enroll_mb": (rss_kb(&brokers[0]) / 1024.0).round(),
        "rss_per_phone_kb": ((rss_kb(&brokers[0]) - rss_before_enroll) / enrolled * 100.0).round() / 100.0,
    });
    eprintln!(
        "enrolled {} users with {} phones in {enroll_seconds:.1} s: {enroll_figures}",
        population.users.len(),
        population.phones.len(),
    );
    let cpu_before: f64 = brokers.iter().map(|b| b.usage().1).sum();
    let loadgen_cpu_before = proc_cpu_seconds(std::process::id());
    let delivered_before = arrivals.delivered.load(Ordering::Relaxed);
    let pushes_before = delivered_before + arrivals.refused.load(Ordering::Relaxed);
    let redis_before = match &redis {
        Some(server) => Some((RedisUsage::read(&server.url()).await, redis_calls(&brokers).await)),
        None => None,
    };

    let world = Arc::new(World {
        idp,
        phones,
        population,
        arrivals: Arc::clone(&arrivals),
        recorder: Recorder::new(),
        human_delay: args.human_delay,
        create_and_watch: args.create_and_watch,
        final_state_only: args.final_state_only,
        start: Instant::now(),
    });

    let mut json = serde_json::Map::new();
    if let Some(live) = args.live {
        run_live(&world, &brokers[0], live, &mut json).await;
    } else if let Some(herd) = args.herd {
        run_herd(&world, herd, &mut json).await;
    } else if args.soak.is_some() {
        let (stop, stopped) = oneshot::channel();
        let every = Duration::from_secs(args.sample_seconds.max(1));
        let sampler = tokio::spawn(sample_soak(
            Arc::clone(&world),
            brokers[0].pid(),
            brokers[0].metrics_addr.clone(),
            dir.path().join("data-0"),
            every,
            stopped,
        ));
        run_burst(&world, &args, delivered_before, &mut json).await;
        let _ = stop.send(());
        let samples = sampler.await.unwrap();
        soak_summary(&samples, args.soak_csv.as_deref(), &mut json);
    } else {
        run_burst(&world, &args, delivered_before, &mut json).await;
    }
    if let (Some(server), Some((before, calls_before))) = (&redis, redis_before) {
        let after = RedisUsage::read(&server.url()).await;
        let calls = redis_calls(&brokers).await - calls_before;
        // Per sign-in of the burst (or per challenge of --herd and --live).
        let signins = match json.get("signins").and_then(serde_json::Value::as_u64) {
            Some(0) | None => json.get("herd_served").or(json.get("live")).and_then(serde_json::Value::as_u64).unwrap_or(0),
            Some(signins) => signins,
        }
        .max(1) as f64;
        let round = |value: f64| (value * 10.0).round() / 10.0;
        json.insert("redis_calls_per_signin".into(), round(calls / signins).into());
        json.insert("redis_commands_per_signin".into(), round((after.commands - before.commands) / signins).into());
        json.insert(
            "redis_cpu_us_per_signin".into(),
            round((after.cpu_seconds - before.cpu_seconds) * 1_000_000.0 / signins).into(),
        );
        json.insert("redis_cpu_seconds".into(), round(after.cpu_seconds - before.cpu_seconds).into());
    }
    let errors: BTreeMap<String, u64> = world.recorder.errors.lock().unwrap().clone();
    json.insert("errors".into(), serde_json::to_value(&errors).unwrap());
    let usage: Vec<(f64, f64)> = brokers.iter().map(Broker::usage).collect();
    let broker_cpu = usage.iter().map(|u| u.1).sum::<f64>() - cpu_before;
    json.insert("peak_rss_mb".into(), usage.iter().map(|u| u.0).fold(0.0, f64::max).round().into());
    if let serde_json::Value::Object(figures) = enroll_figures {
        json.extend(figures);
    }
    json.insert("cpu_seconds".into(), ((broker_cpu * 10.0).round() / 10.0).into());
    let cost = SignInCost {
        signins: json.get("signins").and_then(serde_json::Value::as_u64).unwrap_or(0),
        broker_cpu_seconds: broker_cpu,
        loadgen_cpu_seconds: proc_cpu_seconds(std::process::id()) - loadgen_cpu_before,
        grpc_messages: world.recorder.grpc_messages.load(Ordering::Relaxed),
        pushes: arrivals.delivered.load(Ordering::Relaxed) + arrivals.refused.load(Ordering::Relaxed) - pushes_before,
    };
    cost.write(&mut json);
    json.insert("pinned".into(), args.pin.into());
    json.insert("connections".into(), args.connections.into());
    json.insert("store".into(), args.store.clone().into());
    json.insert("replicas".into(), brokers.len().into());
    json.insert("users".into(), args.users.into());
    json.insert("phones".into(), world.population.phones.len().into());
    json.insert("rate".into(), args.rate.into());
    json.insert("webpush_share".into(), args.webpush_share.into());
    json.insert("create_and_watch".into(), args.create_and_watch.into());
    json.insert("final_state_only".into(), args.final_state_only.into());
    let summary = serde_json::Value::Object(json);
    let failed = args.quick
        && (summary["lost"].as_u64() != Some(0)
            || summary["double"].as_u64() != Some(0)
            || !errors.is_empty()
            || summary["wrong_outcome"].as_u64().unwrap_or(0) > 0);
    drop(brokers);
    println!("{summary}");
    if failed {
        eprintln!("quick run failed: lost, double, unexpected errors or outcomes above");
        std::process::exit(1);
    }
}

/// What the sign-ins of the measured window cost, as the JSON's `*_per_signin`
/// fields (see the module's doc); none when no sign-in completed (--herd, --live).
struct SignInCost {
    signins: u64,
    broker_cpu_seconds: f64,
    loadgen_cpu_seconds: f64,
    grpc_messages: u64,
    pushes: u64,
}

impl SignInCost {
    fn write(&self, json: &mut serde_json::Map<String, serde_json::Value>) {
        if self.signins == 0 {
            return;
        }
        let per = |value: f64| ((value / self.signins as f64) * 10.0).round() / 10.0;
        let micros = |seconds: f64| (seconds * 1_000_000.0 / self.signins as f64).round() as u64;
        json.insert("broker_cpu_us_per_signin".into(), micros(self.broker_cpu_seconds).into());
        json.insert("loadgen_cpu_us_per_signin".into(), micros(self.loadgen_cpu_seconds).into());
        json.insert("grpc_messages_per_signin".into(), per(self.grpc_messages as f64).into());
        json.insert("pushes_per_signin".into(), per(self.pushes as f64).into());
        json.insert("messages_per_signin".into(), per((self.grpc_messages + self.pushes) as f64).into());
    }
}

/// `pushmatch_store_redis_calls_total` summed over the replicas.
async fn redis_calls(brokers: &[Broker]) -> f64 {
    let mut calls = 0.0;
    for broker in brokers {
        calls += broker.redis_calls().await;
    }
    calls
}

/// The burst: `--signins` sign-ins, open loop at `--rate` (or `--concurrency` at a
/// time as fast as they go), then its figures into `json`.
async fn run_burst(
    world: &Arc<World>,
    args: &Args,
    delivered_before: u64,
    json: &mut serde_json::Map<String, serde_json::Value>,
) {
    let start = Instant::now();
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    // Finished sign-ins are reaped as the loop goes, so a long --soak holds only
    // those in flight.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.signins {
        let scheduled = if args.rate > 0.0 {
            let at = start + Duration::from_secs_f64(i as f64 / args.rate);
            tokio::time::sleep_until(at.into()).await;
            at
        } else {
            Instant::now()
        };
        let permit = if args.rate > 0.0 { None } else { Some(Arc::clone(&limit).acquire_owned().await.unwrap()) };
        let world = Arc::clone(world);
        tasks.spawn(async move {
            sign_in(world, i, scheduled).await;
            drop(permit);
        });
        while let Some(done) = tasks.try_join_next() {
            done.unwrap();
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let recorder = &world.recorder;
    let completed = recorder.completed.load(Ordering::Relaxed) + recorder.expired.load(Ordering::Relaxed);
    let delivered = world.arrivals.delivered.load(Ordering::Relaxed) - delivered_before;
    json.insert("signins".into(), completed.into());
    json.insert("seconds".into(), elapsed.into());
    json.insert("signins_per_sec".into(), (completed as f64 / elapsed).round().into());
    json.insert("pushes_per_sec".into(), (delivered as f64 / elapsed).round().into());
    for (name, histogram) in
        [("create", &recorder.create), ("push", &recorder.push), ("respond", &recorder.respond), ("notify", &recorder.notify)]
    {
        json.insert(format!("{name}_p50_ms"), percentile_ms(histogram, 0.5).into());
        json.insert(format!("{name}_p99_ms"), percentile_ms(histogram, 0.99).into());
    }
    json.insert("expired".into(), recorder.expired.load(Ordering::Relaxed).into());
    json.insert("pull_fallbacks".into(), recorder.pull_fallbacks.load(Ordering::Relaxed).into());
    json.insert("wrong_outcome".into(), recorder.wrong_outcome.load(Ordering::Relaxed).into());
    json.insert("lost".into(), recorder.lost.load(Ordering::Relaxed).into());
    json.insert("double".into(), recorder.double.load(Ordering::Relaxed).into());
    json.insert("provider_refusals".into(), world.arrivals.refused.load(Ordering::Relaxed).into());
    if let Some(path) = &args.timeline {
        write_timeline(path, recorder);
    }
}

/// One sample of `--soak`.
struct SoakSample {
    /// Since the sign-ins began.
    seconds: f64,
    rss_mb: f64,
    store_records: f64,
    challenges_live: f64,
    signins: u64,
    /// The embedded store's files on disk (0 on Redis).
    file_mb: f64,
    /// What the broker holds on its heap and what its allocator keeps resident
    /// (`pushmatch_heap_*`; 0 where the binary exports neither).
    heap_mb: f64,
    heap_resident_mb: f64,
}

/// Samples the broker every `every` until `stop`: its RSS, its store's records and
/// PENDING challenges and its heap (from `/metrics`), the size of its data
/// directory and the sign-ins completed so far; prints each sample as it is taken.
async fn sample_soak(
    world: Arc<World>,
    pid: u32,
    metrics_addr: String,
    data_dir: PathBuf,
    every: Duration,
    mut stop: oneshot::Receiver<()>,
) -> Vec<SoakSample> {
    let mut samples = Vec::new();
    let mut ticks = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = &mut stop => break,
        }
        let gauges = scrape(
            &metrics_addr,
            &[
                "pushmatch_store_records",
                "pushmatch_challenges_live",
                "pushmatch_heap_allocated_bytes",
                "pushmatch_heap_resident_bytes",
            ],
        )
        .await;
        let sample = SoakSample {
            seconds: world.start.elapsed().as_secs_f64(),
            rss_mb: proc_status_kb(pid, "VmRSS") / 1024.0,
            store_records: gauges[0],
            challenges_live: gauges[1],
            signins: world.recorder.completed.load(Ordering::Relaxed) + world.recorder.expired.load(Ordering::Relaxed),
            file_mb: bytes_in(&data_dir) as f64 / 1e6,
            heap_mb: gauges[2] / (1024.0 * 1024.0),
            heap_resident_mb: gauges[3] / (1024.0 * 1024.0),
        };
        eprintln!(
            "soak {:>6.0} s: broker RSS {:.1} MB (heap {:.1}, allocator resident {:.1}), store records {}, pending {}, \
             sign-ins {}, store file {:.1} MB",
            sample.seconds,
            sample.rss_mb,
            sample.heap_mb,
            sample.heap_resident_mb,
            sample.store_records,
            sample.challenges_live,
            sample.signins,
            sample.file_mb
        );
        samples.push(sample);
        // Pushes nobody waits for (a second phone's, a never-answered sign-in's)
        // would otherwise pile up in this process over an hour.
        world.arrivals.slots.lock().unwrap().retain(|_, slot| !matches!(slot, Slot::Arrived(at, _) if at.elapsed() > 2 * WAIT));
    }
    samples
}

/// What `--soak` adds to the JSON: RSS and store records 10 minutes in and at the
/// end, and the RSS growth between (the target: under 2 %); and the CSV.
fn soak_summary(samples: &[SoakSample], csv: Option<&Path>, json: &mut serde_json::Map<String, serde_json::Value>) {
    let round = |value: f64| (value * 10.0).round() / 10.0;
    let at_10 = samples.iter().find(|s| s.seconds >= 600.0);
    let (Some(at_10), Some(end)) = (at_10, samples.last()) else {
        json.insert("soak_rss_growth_after_10min_pct".into(), serde_json::Value::Null);
        return write_soak_csv(samples, csv);
    };
    let peak = samples.iter().filter(|s| s.seconds >= at_10.seconds).map(|s| s.rss_mb).fold(0.0, f64::max);
    json.insert("soak_rss_mb_at_10min".into(), round(at_10.rss_mb).into());
    json.insert("soak_rss_mb_end".into(), round(end.rss_mb).into());
    json.insert("soak_rss_mb_peak_after_10min".into(), round(peak).into());
    json.insert("soak_rss_growth_after_10min_pct".into(), round((end.rss_mb - at_10.rss_mb) / at_10.rss_mb * 100.0).into());
    json.insert("soak_store_records_at_10min".into(), at_10.store_records.into());
    json.insert("soak_store_records_end".into(), end.store_records.into());
    json.insert("soak_heap_mb_at_10min".into(), round(at_10.heap_mb).into());
    json.insert("soak_heap_mb_end".into(), round(end.heap_mb).into());
    write_soak_csv(samples, csv);
}

/// The sum of the sizes of the files in `dir` (0 when it does not exist).
fn bytes_in(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.filter_map(|entry| entry.ok()?.metadata().ok()).map(|metadata| metadata.len()).sum()
}

fn write_soak_csv(samples: &[SoakSample], path: Option<&Path>) {
    let Some(path) = path else { return };
    let mut csv = String::from("seconds,rss_mb,store_records,challenges_live,signins,file_mb,heap_mb,heap_resident_mb\n");
    for s in samples {
        csv.push_str(&format!(
            "{:.0},{:.1},{},{},{},{:.1},{:.1},{:.1}\n",
            s.seconds, s.rss_mb, s.store_records, s.challenges_live, s.signins, s.file_mb, s.heap_mb, s.heap_resident_mb
        ));
    }
    std::fs::write(path, csv).unwrap();
}

/// The per-second CSV of `--timeline`: sign-ins completed and the worst create latency.
fn write_timeline(path: &Path, recorder: &Recorder) {
    let mut csv = String::from("second,signins,create_max_ms\n");
    for (second, (count, worst)) in recorder.timeline.lock().unwrap().iter() {
        csv.push_str(&format!("{second},{count},{:.3}\n", *worst as f64 / 1000.0));
    }
    std::fs::write(path, csv).unwrap();
}

/// Fires `count` CreateChallenge calls within one second and waits for all of
/// them: each is served or shed with RESOURCE_EXHAUSTED; anything else is an error.
async fn run_herd(world: &Arc<World>, count: usize, json: &mut serde_json::Map<String, serde_json::Value>) {
    let start = Instant::now();
    let served = Arc::new(AtomicU64::new(0));
    let shed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let at = start + Duration::from_secs_f64(i as f64 / count as f64);
        let (world, served, shed) = (Arc::clone(world), Arc::clone(&served), Arc::clone(&shed));
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let user = i % world.population.users.len();
            let mut challenges: IdpChallenges = ChallengeServiceClient::with_interceptor(
                world.idp[i % world.idp.len()].clone(),
                ApiKeyInterceptor::new(API_KEY).unwrap(),
            );
            let request = pb::CreateChallengeRequest { user_id: format!("user-{user}"), ..Default::default() };
            match challenges.create_challenge(request).await {
                Ok(_) => {
                    Recorder::record(&world.recorder.create, at.elapsed());
                    served.fetch_add(1, Ordering::Relaxed);
                }
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    shed.fetch_add(1, Ordering::Relaxed);
                }
                Err(status) => world.recorder.error("create", &status),
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let drained = start.elapsed().as_secs_f64();
    json.insert("herd".into(), count.into());
    json.insert("herd_served".into(), served.load(Ordering::Relaxed).into());
    json.insert("herd_shed".into(), shed.load(Ordering::Relaxed).into());
    json.insert("herd_drained_seconds".into(), drained.into());
    json.insert("signins".into(), 0.into());
    json.insert("signins_per_sec".into(), 0.into());
    json.insert("pushes_per_sec".into(), 0.into());
    json.insert("create_p50_ms".into(), percentile_ms(&world.recorder.create, 0.5).into());
    json.insert("create_p99_ms".into(), percentile_ms(&world.recorder.create, 0.99).into());
    json.insert("notify_p50_ms".into(), 0.into());
    json.insert("notify_p99_ms".into(), 0.into());
    json.insert("lost".into(), 0.into());
    json.insert("double".into(), 0.into());
}

/// Creates `count` challenges (TTL 300 s) that nobody answers, 256 at a time, then
/// reads the broker's resident set with all of them live.
async fn run_live(world: &Arc<World>, broker: &Broker, count: usize, json: &mut serde_json::Map<String, serde_json::Value>) {
    let start = Instant::now();
    let created = Arc::new(AtomicU64::new(0));
    let pushes_expected = Arc::new(AtomicU64::new(world.arrivals.delivered.load(Ordering::Relaxed)));
    futures::stream::iter(0..count)
        .for_each_concurrent(256, |i| {
            let (world, created, pushes_expected) = (Arc::clone(world), Arc::clone(&created), Arc::clone(&pushes_expected));
            async move {
                let user = i % world.population.users.len();
                let mut challenges: IdpChallenges = ChallengeServiceClient::with_interceptor(
                    world.idp[i % world.idp.len()].clone(),
                    ApiKeyInterceptor::new(API_KEY).unwrap(),
                );
                let request =
                    pb::CreateChallengeRequest { user_id: format!("user-{user}"), ttl_seconds: 300, ..Default::default() };
                match challenges.create_challenge(request).await {
                    Ok(_) => {
                        created.fetch_add(1, Ordering::Relaxed);
                        pushes_expected.fetch_add(world.population.users[user].len() as u64, Ordering::Relaxed);
                    }
                    Err(status) => world.recorder.error("create", &status),
                }
            }
        })
        .await;
    let rss_mb = || (proc_status_kb(broker.child.id().unwrap_or(0), "VmRSS") / 1024.0).round();
    json.insert("live".into(), created.load(Ordering::Relaxed).into());
    json.insert("live_seconds".into(), start.elapsed().as_secs_f64().into());
    json.insert("rss_at_last_create_mb".into(), rss_mb().into());
    // Then with the push queue drained (every push at the mock), so that the figure is
    // the challenges' and not a backlog's. A benchmark's progress poll, with a deadline.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    while world.arrivals.delivered.load(Ordering::Relaxed) < pushes_expected.load(Ordering::Relaxed) && Instant::now() < deadline
    {
        ticks.tick().await;
    }
    let missing = pushes_expected.load(Ordering::Relaxed).saturating_sub(world.arrivals.delivered.load(Ordering::Relaxed));
    json.insert("pushes_missing".into(), missing.into());
    json.insert("rss_with_live_mb".into(), rss_mb().into());
    for key in ["signins", "signins_per_sec", "pushes_per_sec", "notify_p50_ms", "notify_p99_ms", "lost", "double"] {
        json.insert(key.into(), 0.into());
    }
    json.insert("create_p50_ms".into(), 0.into());
    json.insert("create_p99_ms".into(), 0.into());
}
