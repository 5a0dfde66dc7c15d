//! `pushmatch demo`: the whole flow in one process, no setup. A server on a free
//! loopback port with the embedded store in a temporary folder; the "setup page",
//! the "sign-in page" (the IdP) and a simulated phone as real gRPC clients.
//! It returns an error, and the process exits non-zero, if any step misbehaves.

use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::config::{Config, DEVELOPMENT_API_KEY};
use crate::domain::enrollment::qr_terminal;
use crate::domain::time::{Clock as _, SystemClock};
use crate::domain::totp;
use crate::pb;
use crate::pb::challenge_service_client::ChallengeServiceClient;
use crate::pb::enrollment_service_client::EnrollmentServiceClient;
use crate::phone::{P256Encoding, PhoneKey, SimulatedPhone};

/// Adds `authorization: Bearer <API key>` to every call: how an IdP authenticates.
#[derive(Clone)]
pub struct ApiKeyInterceptor(MetadataValue<Ascii>);

impl ApiKeyInterceptor {
    pub fn new(api_key: &str) -> Result<Self, Status> {
        let value = format!("Bearer {api_key}").parse().map_err(|_| Status::invalid_argument("API key is not ASCII"))?;
        Ok(Self(value))
    }
}

impl Interceptor for ApiKeyInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type IdpChallenges = ChallengeServiceClient<InterceptedService<Channel, ApiKeyInterceptor>>;
pub type IdpEnrollments = EnrollmentServiceClient<InterceptedService<Channel, ApiKeyInterceptor>>;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo setup failed: {0}")]
    Setup(String),
    #[error("step {step}: {message}")]
    Step { step: &'static str, message: String },
    #[error("step {step}: the call failed: {status}")]
    Call { step: &'static str, status: Status },
}

fn step_failed(step: &'static str, message: impl Into<String>) -> DemoError {
    DemoError::Step { step, message: message.into() }
}

fn call_failed(step: &'static str) -> impl FnOnce(Status) -> DemoError {
    move |status| DemoError::Call { step, status }
}

/// Removes the demo's store folder when the demo ends, however it ends.
struct TempFolder(PathBuf);

impl Drop for TempFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn run() -> Result<(), DemoError> {
    let mut suffix = [0u8; 8];
    crate::domain::ids::os_random(&mut suffix).map_err(|e| DemoError::Setup(e.to_string()))?;
    let folder = TempFolder(std::env::temp_dir().join(format!("pushmatch-demo-{}", hex::encode(suffix))));

    let env = [
        ("PUSHMATCH_STORE__PATH".to_owned(), folder.0.display().to_string()),
        ("PUSHMATCH_SERVER__METRICS_LISTEN".to_owned(), String::new()),
        ("PUSHMATCH_LOG__LEVEL".to_owned(), "warn".to_owned()),
    ];
    let mut config = Config::load(None, env).map_err(|e| DemoError::Setup(e.to_string()))?.config;
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| DemoError::Setup(format!("cannot listen: {e}")))?;
    let addr = listener.local_addr().map_err(|e| DemoError::Setup(e.to_string()))?;
    config.server.public_url = format!("http://{addr}");
    crate::telemetry::init(&config.log);

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::server::run(listener, config, async {
        let _ = stopped.await;
    }));

    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| DemoError::Setup(e.to_string()))?
        .connect()
        .await
        .map_err(|e| DemoError::Setup(format!("cannot reach the demo server: {e}")))?;
    let auth = ApiKeyInterceptor::new(DEVELOPMENT_API_KEY).map_err(|e| DemoError::Setup(e.to_string()))?;
    let mut enrollments = EnrollmentServiceClient::with_interceptor(channel.clone(), auth.clone());
    let mut challenges = ChallengeServiceClient::with_interceptor(channel.clone(), auth);

    let outcome = walk_through(&mut enrollments, &mut challenges, channel).await;
    let _ = stop.send(());
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return Err(DemoError::Setup(format!("the server failed: {error}"))),
        Err(error) => return Err(DemoError::Setup(format!("the server task failed: {error}"))),
    }
    outcome?;
    println!("\nEvery step behaved. That is pushmatch: run `pushmatch serve` for the real thing.");
    Ok(())
}

async fn walk_through(
    enrollments: &mut IdpEnrollments,
    challenges: &mut IdpChallenges,
    channel: Channel,
) -> Result<(), DemoError> {
    println!("pushmatch demo: number matching for multi-factor sign-in\n");
    let (mut phone, completed) = enroll_a_phone(enrollments, channel).await?;
    sign_in_three_ways(challenges, &mut phone).await?;
    totp_fallback(challenges, &completed).await
}

/// Steps 1 to 3: the setup page shows a QR code, the phone scans it and enrolls,
/// the setup page sees the enrollment completed.
async fn enroll_a_phone(
    enrollments: &mut IdpEnrollments,
    channel: Channel,
) -> Result<(SimulatedPhone, pb::CompleteEnrollmentResponse), DemoError> {
    // 1. The setup page begins an enrollment and shows the QR code.
    let step = "1 begin enrollment";
    let enrollment = enrollments
        .begin_enrollment(pb::BeginEnrollmentRequest {
            user_id: "jan".into(),
            account_name: "jan@gors.nl".into(),
            kind: pb::EnrollmentKind::Push.into(),
        })
        .await
        .map_err(call_failed(step))?
        .into_inner();
    println!("1. The setup page asks for an enrollment and shows this QR code:\n");
    println!("{}", qr_terminal(&enrollment.uri).map_err(|e| step_failed(step, e.to_string()))?);
    println!("   ({} byte PNG for web pages; the URI carries a one-time code, valid 10 minutes)\n", enrollment.qr_png.len());

    // 2-3. The phone scans it and completes the enrollment with a fresh P-256 key.
    let step = "2 complete enrollment";
    let mut phone = SimulatedPhone::new(
        channel,
        PhoneKey::p256(P256Encoding::Sec1Uncompressed),
        pb::Platform::Apns,
        "a3f9c2e1d4b5a6978812ab34cd56ef78a3f9c2e1d4b5a6978812ab34cd56ef78",
    );
    let completed = phone.enroll(&enrollment.uri, "Jan's iPhone").await.map_err(call_failed(step))?;
    println!(
        "2. Jan's phone scans it, makes a P-256 key pair and enrolls: device {} for {} at {}",
        completed.device_id, completed.account_name, completed.issuer
    );

    // 4. The setup page sees the enrollment completed.
    let step = "3 enrollment completed";
    let state = enrollments
        .get_enrollment(pb::GetEnrollmentRequest { enrollment_id: enrollment.enrollment_id.clone() })
        .await
        .map_err(call_failed(step))?
        .into_inner()
        .state();
    if state != pb::EnrollmentState::Completed {
        return Err(step_failed(step, format!("the enrollment reads {state:?}")));
    }
    println!("3. The setup page sees the enrollment COMPLETED: \"let's try it out\"\n");
    Ok((phone, completed))
}

/// A sign-in approved with the right number, one denied for a wrong number, and
/// one the user denied.
async fn sign_in_three_ways(challenges: &mut IdpChallenges, phone: &mut SimulatedPhone) -> Result<(), DemoError> {
    // 5-7. A sign-in: the right number approves.
    let (number, final_state) = sign_in(challenges, phone, Answer::TypeTheNumber).await?;
    if final_state != (pb::ChallengeState::Approved, pb::DenyReason::Unspecified) {
        return Err(step_failed("sign-in", format!("expected APPROVED, the watcher saw {final_state:?}")));
    }
    println!(
        "   The sign-in page showed {number}; Jan typed it and approved. The IdP's stream: APPROVED (Melding goedgekeurd)\n"
    );

    // A wrong number denies at once: one try, no guessing.
    let (_, final_state) = sign_in(challenges, phone, Answer::TypeAnotherNumber).await?;
    if final_state != (pb::ChallengeState::Denied, pb::DenyReason::WrongNumber) {
        return Err(step_failed("wrong number", format!("expected DENIED / WRONG_NUMBER, the watcher saw {final_state:?}")));
    }
    println!("   Jan typed a different number: the IdP's stream: DENIED / WRONG_NUMBER (one try, no guessing)\n");

    // A plain deny.
    let (_, final_state) = sign_in(challenges, phone, Answer::Deny).await?;
    if final_state != (pb::ChallengeState::Denied, pb::DenyReason::UserDenied) {
        return Err(step_failed("deny", format!("expected DENIED / USER_DENIED, the watcher saw {final_state:?}")));
    }
    println!("   Jan did not recognise the third sign-in and denied it: the IdP's stream: DENIED / USER_DENIED\n");
    Ok(())
}

/// The offline fallback: no network on the phone, so the user types the app's code.
async fn totp_fallback(challenges: &mut IdpChallenges, completed: &pb::CompleteEnrollmentResponse) -> Result<(), DemoError> {
    let step = "8 TOTP fallback";
    let now = SystemClock.now();
    let code = totp::code_for_step(&completed.totp_secret, totp::step_at(now));
    let verdict = challenges
        .verify_totp(pb::VerifyTotpRequest { user_id: "jan".into(), code: code.clone() })
        .await
        .map_err(call_failed(step))?
        .into_inner();
    if !verdict.valid || verdict.device_id != completed.device_id {
        return Err(step_failed(step, "the app's current code was not accepted"));
    }
    let replay = challenges
        .verify_totp(pb::VerifyTotpRequest { user_id: "jan".into(), code })
        .await
        .map_err(call_failed(step))?
        .into_inner();
    if replay.valid {
        return Err(step_failed(step, "the same code was accepted twice"));
    }
    println!("8. No network on the phone: Jan chooses \"use a verification code\" and types the app's 6-digit code.");
    println!("   VerifyTotp: valid (device {}); the same code again: not valid (each code works once)", verdict.device_id);
    Ok(())
}

enum Answer {
    TypeTheNumber,
    TypeAnotherNumber,
    Deny,
}

/// One sign-in: the IdP creates a challenge and watches it; the phone finds it by
/// the pull fallback and answers. Returns the number and the watcher's final state.
async fn sign_in(
    challenges: &mut IdpChallenges,
    phone: &mut SimulatedPhone,
    answer: Answer,
) -> Result<(String, (pb::ChallengeState, pb::DenyReason)), DemoError> {
    let step = "4 create challenge";
    let challenge = challenges
        .create_challenge(pb::CreateChallengeRequest {
            user_id: "jan".into(),
            context: Some(pb::SignInContext {
                application: "Citrix Workspace".into(),
                ip_address: "192.0.2.10".into(),
                location: "Rotterdam, NL".into(),
                user_agent: "Firefox on Windows".into(),
            }),
            ..Default::default()
        })
        .await
        .map_err(call_failed(step))?
        .into_inner();
    println!("4. Jan signs in to Citrix Workspace. The sign-in page shows:   [ {} ]", challenge.number);
    let mut watch = challenges
        .watch_challenge(pb::WatchChallengeRequest { challenge_id: challenge.challenge_id.clone(), ..Default::default() })
        .await
        .map_err(call_failed(step))?
        .into_inner();

    let step = "5 the phone finds the challenge";
    let pending = phone.pending().await.map_err(call_failed(step))?;
    let shown = pending
        .iter()
        .find(|p| p.challenge_id == challenge.challenge_id)
        .ok_or_else(|| step_failed(step, "the challenge is not among the pending ones"))?;
    let context = shown.context.clone().unwrap_or_default();
    println!(
        "5. The phone (pull fallback; no push provider in the demo) shows: \"{} from {}, {}: type the number\"",
        context.application, context.location, context.ip_address
    );

    let step = "6 the phone answers";
    let (decision, typed) = match answer {
        Answer::TypeTheNumber => (pb::Decision::Approve, challenge.number.clone()),
        Answer::TypeAnotherNumber => {
            let wrong = if challenge.number == "10" { "11" } else { "10" };
            (pb::Decision::Approve, wrong.to_owned())
        }
        Answer::Deny => (pb::Decision::Deny, String::new()),
    };
    let response = phone.respond(&challenge.challenge_id, decision, &typed).await.map_err(call_failed(step))?;
    if !response.accepted {
        return Err(step_failed(step, "the answer was not accepted"));
    }

    let step = "7 the IdP's watcher";
    let final_state = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(update) = watch.message().await.map_err(call_failed(step))? {
            if update.state() != pb::ChallengeState::Pending {
                return Ok((update.state(), update.deny_reason()));
            }
        }
        Err(step_failed(step, "the stream ended without a final state"))
    })
    .await
    .map_err(|_| step_failed(step, "no final state within 10 s"))??;
    Ok((challenge.number, final_state))
}
