//! The IdP pages: state, routes and what every page shares. Also compiled into
//! `tests/browser.rs`, which drives these pages in headless Chromium.

mod devices;
mod i18n;
mod layout;
mod setup;
mod signin;

use axum::Router;
use axum::response::Response;
use axum::routing::{get, post};
use pushmatch::demo::{ApiKeyInterceptor, IdpChallenges, IdpEnrollments};
use pushmatch::pb::challenge_service_client::ChallengeServiceClient;
use pushmatch::pb::enrollment_service_client::EnrollmentServiceClient;
use serde::Deserialize;
use std::time::Duration;
use tonic::transport::Channel;

pub use i18n::Lang;

/// The gRPC clients of one tenant (one API key), cheap to clone per request.
#[derive(Clone)]
pub struct Idp {
    enrollments: IdpEnrollments,
    challenges: IdpChallenges,
    /// How often the setup page's event stream asks GetEnrollment (there is no
    /// watch for enrollments).
    enrollment_poll: Duration,
}

impl Idp {
    pub fn new(channel: Channel, api_key: &str) -> Result<Self, tonic::Status> {
        let auth = ApiKeyInterceptor::new(api_key)?;
        Ok(Self {
            enrollments: EnrollmentServiceClient::with_interceptor(channel.clone(), auth.clone()),
            challenges: ChallengeServiceClient::with_interceptor(channel, auth),
            enrollment_poll: Duration::from_millis(500),
        })
    }
}

pub fn router(idp: Idp) -> Router {
    Router::new()
        .route("/", get(layout::home))
        .route("/static/style.css", get(layout::style))
        .route("/static/live.js", get(layout::script))
        .route("/setup", get(setup::security_info))
        .route("/setup/add", get(setup::add_method))
        .route("/setup/enroll", post(setup::begin))
        .route("/setup/enrollment/{id}", get(setup::enrollment))
        .route("/setup/enrollment/{id}/events", get(setup::enrollment_events))
        .route("/setup/try", post(setup::try_it))
        .route("/signin", get(signin::form).post(signin::start))
        .route("/challenge/{id}", get(signin::challenge))
        .route("/challenge/{id}/events", get(signin::challenge_events))
        .route("/challenge/{id}/code", post(signin::code_instead))
        .route("/signin/code", get(signin::code_form).post(signin::verify_code))
        .route("/devices", get(devices::list))
        .route("/devices/remove", post(devices::remove))
        .with_state(idp)
}

/// `?user=` on the pages that stand for a signed-in user.
#[derive(Deserialize, Default)]
pub struct UserQuery {
    #[serde(default)]
    pub user: String,
}

/// A failed gRPC call as the page says it: what the person can do, not the
/// server's internals. The status message names only the field at fault and
/// carries no secret (pushmatch's contract), so it may be logged.
pub fn call_failed(lang: Lang, status: &tonic::Status) -> Response {
    use tonic::Code;
    tracing::warn!(code = ?status.code(), message = status.message(), "pushmatch call failed");
    let (http, text) = match status.code() {
        Code::InvalidArgument => (400, lang.pick("That input is not valid.", "Die invoer is niet geldig.")),
        Code::NotFound => (404, lang.pick("Not found: it may have expired.", "Niet gevonden: misschien is het verlopen.")),
        Code::FailedPrecondition if status.message().contains("blocked") => (
            403,
            lang.pick(
                "Sign-in with notifications is blocked for this account after a report of fraud or too many wrong numbers. Contact your helpdesk.",
                "Aanmelden met meldingen is geblokkeerd voor dit account na een fraudemelding of te vaak een verkeerd nummer. Neem contact op met je helpdesk.",
            ),
        ),
        Code::FailedPrecondition if status.message().contains("no enrolled device") => (
            409,
            lang.pick(
                "This account has no authenticator app yet: add one on the security info page.",
                "Dit account heeft nog geen authenticator-app: voeg er een toe op de pagina met beveiligingsgegevens.",
            ),
        ),
        Code::FailedPrecondition => (409, lang.pick("That is no longer possible.", "Dat kan niet meer.")),
        Code::ResourceExhausted => {
            (429, lang.pick("Too many attempts: wait a few minutes.", "Te veel pogingen: wacht een paar minuten."))
        }
        Code::Unavailable => (
            503,
            lang.pick("The sign-in service cannot be reached: try again.", "De aanmeldservice is niet bereikbaar: probeer het opnieuw."),
        ),
        _ => (500, lang.pick("Something went wrong: try again.", "Er ging iets mis: probeer het opnieuw.")),
    };
    let code = axum::http::StatusCode::from_u16(http).unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    layout::message_page(lang, code, lang.pick("That did not work", "Dat lukte niet"), text)
}
