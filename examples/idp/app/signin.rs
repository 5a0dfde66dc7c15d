//! The sign-in page: user name → the number → the outcome, streamed live from
//! WatchChallenge; "use a verification code instead" → VerifyTotp.

use std::convert::Infallible;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::header::USER_AGENT;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use futures::StreamExt as _;
use maud::html;
use pushmatch::pb;
use serde::Deserialize;

use super::layout::{Page, urlencode, user_form};
use super::setup::state_event;
use super::{Idp, Lang, UserQuery, call_failed};

pub async fn form(lang: Lang, Query(query): Query<UserQuery>) -> Response {
    let page = Page { lang, title: lang.pick("Sign in", "Aanmelden"), user: &query.user, refresh: None };
    page.render(
        StatusCode::OK,
        html! {
            form method="post" action="/signin" {
                p {
                    label for="user" { (lang.pick("User name", "Gebruikersnaam")) }
                    input #user name="user" type="text" autocomplete="username" required value=(query.user);
                }
                p { button #next type="submit" { (lang.pick("Next", "Volgende")) } }
            }
        },
    )
}

#[derive(Deserialize)]
pub struct SignInForm {
    user: String,
}

pub async fn start(State(idp): State<Idp>, lang: Lang, headers: HeaderMap, Form(form): Form<SignInForm>) -> Response {
    // What the app shows beside the prompt: printable ASCII of the user agent,
    // within the contract's 256 bytes.
    let user_agent: String = headers
        .get(USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(200)
        .collect();
    let context = pb::SignInContext { application: "Gors".into(), user_agent, ..Default::default() };
    create_and_show(&idp, lang, form.user.trim(), context).await
}

/// CreateChallenge, then the challenge page (a redirect, so reloading it does
/// not start another sign-in).
pub async fn create_and_show(idp: &Idp, lang: Lang, user: &str, context: pb::SignInContext) -> Response {
    let mut challenges = idp.challenges.clone();
    let request = pb::CreateChallengeRequest { user_id: user.to_owned(), context: Some(context), ..Default::default() };
    match challenges.create_challenge(request).await {
        Ok(response) => super::setup::to_challenge(&response.into_inner()),
        Err(status) => call_failed(lang, &status),
    }
}

fn state_name(state: pb::ChallengeState) -> &'static str {
    state.as_str_name().trim_start_matches("CHALLENGE_STATE_")
}

/// The number, large, and the outcome as it arrives. Without JavaScript the
/// page reloads itself every two seconds while the challenge is pending.
pub async fn challenge(State(idp): State<Idp>, lang: Lang, Path(id): Path<String>) -> Response {
    let mut challenges = idp.challenges.clone();
    let challenge = match challenges.get_challenge(pb::GetChallengeRequest { challenge_id: id }).await {
        Ok(response) => response.into_inner(),
        Err(status) => return call_failed(lang, &status),
    };
    let state = challenge.state();
    let pending = state == pb::ChallengeState::Pending;
    let id = urlencode(&challenge.challenge_id);
    let user = challenge.user_id.as_str();
    let title = lang.pick("Approve the sign-in", "Aanmelding goedkeuren");
    let page = Page { lang, title, user, refresh: pending.then_some(2) };
    page.render(
        StatusCode::OK,
        html! {
            @if pending {
                div data-while-pending {
                    p #number-label { (lang.pick("Open the notification on your phone and enter this number:", "Open de melding op je telefoon en voer dit nummer in:")) }
                    p #number .number aria-describedby="number-label" { (challenge.number) }
                }
            }
            div #status role="status" data-state=(state_name(state)) data-events=[pending.then(|| format!("/challenge/{id}/events"))] {
                p data-text { (lang.outcome(state, challenge.deny_reason())) }
            }
            @if pending {
                noscript { p { a #refresh href={ "/challenge/" (id) } { (lang.pick("Refresh", "Vernieuwen")) } } }
                form method="post" action={ "/challenge/" (id) "/code" } data-while-pending {
                    button #use-code .secondary type="submit" { (lang.pick("Use a verification code instead", "Gebruik in plaats daarvan een verificatiecode")) }
                }
            } @else {
                p { a #again href={ "/signin?user=" (urlencode(user)) } { (lang.pick("Sign in again", "Opnieuw aanmelden")) } }
            }
        },
    )
}

/// WatchChallenge as server-sent events: a `state` event for the current state,
/// then one for the final state; the stream ends with the challenge. The page
/// shows no delivery status, so the watch asks for the final state only.
pub async fn challenge_events(State(idp): State<Idp>, lang: Lang, Path(id): Path<String>) -> Response {
    let mut challenges = idp.challenges.clone();
    let stream = match challenges.watch_challenge(pb::WatchChallengeRequest { challenge_id: id, final_state_only: true }).await {
        Ok(response) => response.into_inner(),
        Err(status) => return call_failed(lang, &status),
    };
    let events = stream.map(move |item| {
        let event = match item {
            Ok(challenge) => {
                let state = challenge.state();
                let is_final = state != pb::ChallengeState::Pending;
                state_event(state_name(state), lang.outcome(state, challenge.deny_reason()), is_final, &[])
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), "WatchChallenge failed");
                let text =
                    lang.pick("The live update stopped: refresh the page.", "De live-update is gestopt: vernieuw de pagina.");
                state_event("ERROR", text, true, &[])
            }
        };
        Ok::<Event, Infallible>(event)
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// "Use a verification code instead": ends the pending challenge (so a later
/// approval cannot count), then the code form.
pub async fn code_instead(State(idp): State<Idp>, lang: Lang, Path(id): Path<String>) -> Response {
    let mut challenges = idp.challenges.clone();
    match challenges.cancel_challenge(pb::CancelChallengeRequest { challenge_id: id }).await {
        Ok(response) => {
            let challenge = response.into_inner();
            Redirect::to(&format!("/signin/code?user={}", urlencode(&challenge.user_id))).into_response()
        }
        Err(status) => call_failed(lang, &status),
    }
}

pub async fn code_form(lang: Lang, Query(query): Query<UserQuery>) -> Response {
    let title = lang.pick("Enter a verification code", "Voer een verificatiecode in");
    let user = query.user.trim();
    let page = Page { lang, title, user, refresh: None };
    if user.is_empty() {
        return page.render(StatusCode::OK, user_form(lang, "/signin/code", lang.pick("Continue", "Verder")));
    }
    page.render(StatusCode::OK, code_form_markup(lang, user, None))
}

fn code_form_markup(lang: Lang, user: &str, error: Option<&str>) -> maud::Markup {
    html! {
        @if let Some(error) = error { p #code-error role="alert" { (error) } }
        form method="post" action="/signin/code" {
            input type="hidden" name="user" value=(user);
            p {
                label for="code" { (lang.pick("The 6-digit code from your authenticator app", "De code van 6 cijfers uit je authenticator-app")) }
                input #code name="code" type="text" inputmode="numeric" autocomplete="one-time-code" pattern="[0-9]{6}" maxlength="6" required;
            }
            p { button #verify type="submit" { (lang.pick("Verify", "Controleren")) } }
        }
    }
}

#[derive(Deserialize)]
pub struct CodeForm {
    user: String,
    code: String,
}

pub async fn verify_code(State(idp): State<Idp>, lang: Lang, Form(form): Form<CodeForm>) -> Response {
    let user = form.user.trim();
    let mut challenges = idp.challenges.clone();
    let request = pb::VerifyTotpRequest { user_id: user.to_owned(), code: form.code.trim().to_owned() };
    let title = lang.pick("Enter a verification code", "Voer een verificatiecode in");
    let page = Page { lang, title, user, refresh: None };
    match challenges.verify_totp(request).await {
        Ok(response) if response.get_ref().valid => page.render(
            StatusCode::OK,
            html! { div #status role="status" data-state="APPROVED" { p data-text { (lang.pick("Code accepted: you are signed in", "Code geaccepteerd: je bent aangemeld")) } } },
        ),
        Ok(_) => {
            let error = lang.pick("That code is not right, or was used already. Try the next code.", "Die code klopt niet of is al gebruikt. Probeer de volgende code.");
            page.render(StatusCode::UNAUTHORIZED, code_form_markup(lang, user, Some(error)))
        }
        Err(status) if status.code() == tonic::Code::InvalidArgument => {
            let error = lang.pick("A code is 6 digits.", "Een code bestaat uit 6 cijfers.");
            page.render(StatusCode::BAD_REQUEST, code_form_markup(lang, user, Some(error)))
        }
        Err(status) => call_failed(lang, &status),
    }
}
