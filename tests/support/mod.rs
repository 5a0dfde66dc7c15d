//! The harness for black-box tests: a real pushmatch server on 127.0.0.1:0 with a
//! manual clock and recording push providers, real tonic clients, and simulated
//! phones with real keys.

#![allow(dead_code)]

pub mod http;
pub mod mock_push;
pub mod push_providers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pushmatch::config::{Config, TenantConfig};
use pushmatch::demo::{ApiKeyInterceptor, IdpChallenges, IdpEnrollments};
use pushmatch::domain::api_key::api_key_digest_hex;
use pushmatch::domain::challenge::Platform;
use pushmatch::domain::time::ManualClock;
use pushmatch::pb;
use pushmatch::pb::challenge_service_client::ChallengeServiceClient;
use pushmatch::pb::enrollment_service_client::EnrollmentServiceClient;
use pushmatch::phone::{PhoneKey, SimulatedPhone};
use pushmatch::push::PushSender;
use pushmatch::push::dispatcher::DispatcherCounters;
use pushmatch::push::recording::RecordingPushSender;
use pushmatch::server::{Dependencies, ServerError};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

pub const KEY_A: &str = "tenant-a-api-key";
pub const KEY_B: &str = "tenant-b-api-key";
/// How long any awaited event may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub const APNS_TOKEN: &str = "a3f9c2e1d4b5a6978812ab34cd56ef78a3f9c2e1d4b5a6978812ab34cd56ef78";
pub const FCM_TOKEN: &str = "fcm-registration-token:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx";

/// Two tenants, "a" (display name "Gors") and "b", with the embedded store in `store_path`.
pub fn test_config(store_path: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.server.metrics_listen = String::new();
    config.store.path = store_path.to_owned();
    config.tenants = vec![
        TenantConfig {
            id: "a".into(),
            display_name: "Gors".into(),
            api_key_sha256: vec![api_key_digest_hex(KEY_A)],
            ..Default::default()
        },
        TenantConfig {
            id: "b".into(),
            display_name: "Other".into(),
            api_key_sha256: vec![api_key_digest_hex(KEY_B)],
            ..Default::default()
        },
    ];
    config
}

pub struct TestServer {
    pub addr: SocketAddr,
    /// `/metrics` and `/healthz`, when the test turned them on
    /// (`config.server.metrics_listen = "127.0.0.1:0"`).
    pub metrics_addr: Option<SocketAddr>,
    pub channel: Channel,
    pub clock: ManualClock,
    pub apns: RecordingPushSender,
    pub fcm: RecordingPushSender,
    pub push_counters: Arc<DispatcherCounters>,
    pub store_dir: Arc<tempfile::TempDir>,
    reload: Option<pushmatch::reload::ReloadHandle>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        Self::start_on(dir, ManualClock::starting_now(), adjust).await
    }

    /// Starts on an existing store folder (a restart) with the given clock.
    pub async fn start_on(store_dir: Arc<tempfile::TempDir>, clock: ManualClock, adjust: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config(store_dir.path());
        adjust(&mut config);
        config.validate().expect("test config is valid");
        Self::launch(config, store_dir, clock, None).await
    }

    /// Starts with the configuration in `file` (loaded as `serve --config` does), and
    /// reloads it when the test asks ([`TestServer::reload`]).
    pub async fn start_from_file(file: &std::path::Path) -> Self {
        let config = Config::load(Some(file), Vec::new()).expect("the test's configuration file loads").config;
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let source = pushmatch::server::ConfigSource { file: file.to_owned(), env: Vec::new() };
        Self::launch(config, dir, ManualClock::starting_now(), Some(source)).await
    }

    /// Reloads the configuration file now (a server started with
    /// [`TestServer::start_from_file`]); the error says why it was refused.
    pub async fn reload(&self) -> Result<(), String> {
        let handle = self.reload.as_ref().expect("started from a file");
        tokio::time::timeout(DEADLINE, handle.reload()).await.expect("the reload answers in time")
    }

    async fn launch(
        mut config: Config,
        store_dir: Arc<tempfile::TempDir>,
        clock: ManualClock,
        source: Option<pushmatch::server::ConfigSource>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // A test that needs the enrollment URI to name this very server sets
        // `public_url = "http://{addr}"`.
        config.server.public_url = config.server.public_url.replace("{addr}", &addr.to_string());
        let apns = RecordingPushSender::new(Platform::Apns);
        let fcm = RecordingPushSender::new(Platform::Fcm);
        let push_counters = Arc::new(DispatcherCounters::default());
        // With a [push.*] section (tests/push.rs points it at mock servers) the real
        // senders run, on the system clock: their retries, Retry-After and timeouts
        // are real time, so `clock` is not the server's clock then.
        let real_push = config.push.apns.is_some()
            || config.push.fcm.is_some()
            || config.push.webpush.is_some()
            || !config.tenant_push().is_empty();
        let (server_clock, push_senders, push_routes): (Arc<dyn pushmatch::domain::time::Clock>, Vec<Arc<dyn PushSender>>, _) =
            if real_push {
                // As `serve` builds them: routed by tenant, each tenant's own credentials
                // where it has them.
                let system: Arc<dyn pushmatch::domain::time::Clock> = Arc::new(pushmatch::domain::time::SystemClock);
                let routes = pushmatch::push::routes::PushRoutes::new(&config.push, &config.tenant_push(), Arc::clone(&system))
                    .await
                    .expect("push senders");
                (system, routes.senders(), Some(routes))
            } else {
                (Arc::new(clock.clone()), vec![Arc::new(apns.clone()) as Arc<dyn PushSender>, Arc::new(fcm.clone())], None)
            };
        let (reload, reload_requests) = match &source {
            Some(_) => {
                let (handle, requests) = pushmatch::reload::channel();
                (Some(handle), Some(requests))
            }
            None => (None, None),
        };
        let metrics_listener = match config.server.metrics_listen.as_str() {
            "" => None,
            addr => Some(TcpListener::bind(addr).await.expect("bind metrics")),
        };
        let metrics_addr = metrics_listener.as_ref().map(|listener| listener.local_addr().expect("metrics addr"));
        let dependencies = Dependencies {
            clock: server_clock,
            push_senders,
            push_counters: Arc::clone(&push_counters),
            metrics_listener,
            config_source: source,
            reload_requests,
            push_routes,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(pushmatch::server::run_with(listener, config, dependencies, async {
            let _ = stopped.await;
        }));
        let channel = Endpoint::from_shared(format!("http://{addr}")).expect("uri").connect_lazy();
        Self {
            addr,
            metrics_addr,
            channel,
            clock,
            apns,
            fcm,
            push_counters,
            store_dir,
            reload,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn challenges(&self, api_key: &str) -> IdpChallenges {
        ChallengeServiceClient::with_interceptor(self.channel.clone(), ApiKeyInterceptor::new(api_key).expect("ascii key"))
    }

    pub fn enrollments(&self, api_key: &str) -> IdpEnrollments {
        EnrollmentServiceClient::with_interceptor(self.channel.clone(), ApiKeyInterceptor::new(api_key).expect("ascii key"))
    }

    pub fn phone(&self, key: PhoneKey, platform: pb::Platform) -> SimulatedPhone {
        let token = if platform == pb::Platform::Apns { APNS_TOKEN } else { FCM_TOKEN };
        SimulatedPhone::new(self.channel.clone(), key, platform, token)
    }

    /// Begins a PUSH enrollment for `user` of the tenant whose API key is `key`.
    pub async fn begin_enrollment_as(&self, key: &str, user: &str) -> Result<pb::Enrollment, tonic::Status> {
        self.enrollments(key)
            .begin_enrollment(pb::BeginEnrollmentRequest {
                user_id: user.into(),
                account_name: format!("{user}@example.com"),
                kind: pb::EnrollmentKind::Push.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// A phone (an Ed25519 key) enrolled for `user` of `key`'s tenant, on `platform`
    /// with the push token `token`.
    pub async fn enrolled_phone_as(&self, key: &str, user: &str, platform: pb::Platform, token: &str) -> SimulatedPhone {
        let enrollment = self.begin_enrollment_as(key, user).await.expect("begin enrollment");
        let mut phone = SimulatedPhone::new(self.channel.clone(), PhoneKey::ed25519(), platform, token);
        phone.enroll(&enrollment.uri, "test phone").await.expect("complete enrollment");
        phone
    }

    /// Begins a PUSH enrollment for `user` of tenant "a" and returns its URI.
    pub async fn begin_enrollment(&self, user: &str) -> pb::Enrollment {
        self.enrollments(KEY_A)
            .begin_enrollment(pb::BeginEnrollmentRequest {
                user_id: user.into(),
                account_name: format!("{user}@gors.nl"),
                kind: pb::EnrollmentKind::Push.into(),
            })
            .await
            .expect("begin enrollment")
            .into_inner()
    }

    /// A phone enrolled for `user` of tenant "a".
    pub async fn enrolled_phone(&self, user: &str, key: PhoneKey, platform: pb::Platform) -> SimulatedPhone {
        let enrollment = self.begin_enrollment(user).await;
        let mut phone = self.phone(key, platform);
        phone.enroll(&enrollment.uri, "test phone").await.expect("complete enrollment");
        phone
    }

    /// Creates a challenge for `user` of tenant "a".
    pub async fn create_challenge(&self, user: &str) -> pb::Challenge {
        self.challenges(KEY_A)
            .create_challenge(pb::CreateChallengeRequest { user_id: user.into(), ..Default::default() })
            .await
            .expect("create challenge")
            .into_inner()
    }

    /// Opens a watch on a challenge of tenant "a".
    pub async fn watch(&self, challenge_id: &str) -> tonic::Streaming<pb::Challenge> {
        self.challenges(KEY_A)
            .watch_challenge(pb::WatchChallengeRequest { challenge_id: challenge_id.into(), ..Default::default() })
            .await
            .expect("watch")
            .into_inner()
    }

    /// Stops the server gracefully and waits for it; returns the store folder.
    pub async fn stop(mut self) -> Arc<tempfile::TempDir> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task).await.expect("server stops in time").expect("server task").expect("server ran");
        }
        Arc::clone(&self.store_dir)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Reads a watch stream until a final state, with a deadline; returns every message.
pub async fn follow_to_final(stream: &mut tonic::Streaming<pb::Challenge>) -> Vec<pb::Challenge> {
    tokio::time::timeout(DEADLINE, async {
        let mut seen = Vec::new();
        while let Some(update) = stream.message().await.expect("stream message") {
            let is_final = update.state() != pb::ChallengeState::Pending;
            seen.push(update);
            if is_final {
                assert!(stream.message().await.expect("clean end").is_none(), "the stream ends after the final state");
                return seen;
            }
        }
        panic!("the stream ended without a final state: {seen:?}");
    })
    .await
    .expect("a final state before the deadline")
}

pub fn assert_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: tonic::Code, field: &str) {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(field), "the message {:?} names {field:?}", status.message());
}
