//! The security-info page: the user's sign-in methods, "add sign-in method" →
//! authenticator app → the QR code, a live wait for the phone (GetEnrollment
//! until COMPLETED), then "try it".

use std::convert::Infallible;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine as _;
use futures::Stream;
use maud::html;
use pushmatch::pb;
use serde::Deserialize;

use super::layout::{Page, urlencode, user_form};
use super::{Idp, Lang, UserQuery, call_failed, devices};

pub async fn security_info(State(idp): State<Idp>, lang: Lang, Query(query): Query<UserQuery>) -> Response {
    let title = lang.pick("Security info", "Beveiligingsgegevens");
    let user = query.user.trim();
    let page = Page { lang, title, user, refresh: None };
    if user.is_empty() {
        return page.render(StatusCode::OK, user_form(lang, "/setup", lang.pick("Continue", "Verder")));
    }
    let mut enrollments = idp.enrollments.clone();
    let devices = match enrollments.list_devices(pb::ListDevicesRequest { user_id: user.to_owned() }).await {
        Ok(response) => response.into_inner().devices,
        Err(status) => return call_failed(lang, &status),
    };
    page.render(
        StatusCode::OK,
        html! {
            p { (lang.pick("These are the methods you use to prove it's you.", "Dit zijn de methoden waarmee je bewijst dat jij het bent.")) }
            h2 { (lang.pick("Sign-in methods", "Aanmeldmethoden")) }
            @if devices.is_empty() {
                p #no-methods { (lang.pick("No sign-in methods yet.", "Nog geen aanmeldmethoden.")) }
            } @else {
                ul #methods {
                    @for device in &devices {
                        li { (lang.pick("Authenticator app", "Authenticator-app")) ": " (device.display_name) " (" (devices::push_state(lang, device)) ")" }
                    }
                }
            }
            form method="get" action="/setup/add" {
                input type="hidden" name="user" value=(user);
                button #add-method type="submit" { (lang.pick("+ Add sign-in method", "+ Aanmeldmethode toevoegen")) }
            }
        },
    )
}

pub async fn add_method(lang: Lang, Query(query): Query<UserQuery>) -> Response {
    let user = query.user.trim();
    let title = lang.pick("Add a method", "Een methode toevoegen");
    let page = Page { lang, title, user, refresh: None };
    if user.is_empty() {
        return page.render(StatusCode::OK, user_form(lang, "/setup/add", lang.pick("Continue", "Verder")));
    }
    page.render(
        StatusCode::OK,
        html! {
            p { (lang.pick("Which method would you like to add?", "Welke methode wil je toevoegen?")) }
            form method="post" action="/setup/enroll" {
                input type="hidden" name="user" value=(user);
                button #authenticator-app type="submit" { (lang.pick("Authenticator app", "Authenticator-app")) }
            }
        },
    )
}

#[derive(Deserialize)]
pub struct UserForm {
    user: String,
}

/// BeginEnrollment, and the page with its QR code. The QR (and the link under
/// "can't scan?") is what the person must see; it is never logged.
pub async fn begin(State(idp): State<Idp>, lang: Lang, Form(form): Form<UserForm>) -> Response {
    let user = form.user.trim();
    let mut enrollments = idp.enrollments.clone();
    let request = pb::BeginEnrollmentRequest {
        user_id: user.to_owned(),
        account_name: user.to_owned(),
        kind: pb::EnrollmentKind::Push.into(),
    };
    let enrollment = match enrollments.begin_enrollment(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return call_failed(lang, &status),
    };
    let qr = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&enrollment.qr_png));
    let events = format!("/setup/enrollment/{}/events", urlencode(&enrollment.enrollment_id));
    let check = format!("/setup/enrollment/{}", urlencode(&enrollment.enrollment_id));
    let title = lang.pick("Set up your authenticator app", "Je authenticator-app instellen");
    let page = Page { lang, title, user, refresh: None };
    page.render(
        StatusCode::OK,
        html! {
            div data-while-pending {
                p { (lang.pick("Open the pushmatch app on your phone and scan this QR code.", "Open de pushmatch-app op je telefoon en scan deze QR-code.")) }
                img #qr .qr src=(qr) alt=(lang.pick("QR code to scan with the app", "QR-code om te scannen met de app"));
                details {
                    summary { (lang.pick("Can't scan the image?", "Lukt scannen niet?")) }
                    p { (lang.pick("Enter this link in the app:", "Voer deze link in de app in:")) }
                    p { code #enrollment-uri { (enrollment.uri) } }
                }
            }
            div #status role="status" data-events=(events) data-state="PENDING" {
                p data-text { (lang.pick("Waiting for your phone…", "Wachten op je telefoon…")) }
            }
            noscript { p { a href=(check) { (lang.pick("I have scanned the code: continue", "Ik heb de code gescand: verder")) } } }
            (try_it_form(lang, user, true))
        },
    )
}

fn try_it_form(lang: Lang, user: &str, hidden: bool) -> maud::Markup {
    html! {
        form #try-it method="post" action="/setup/try" hidden[hidden] {
            p { (lang.pick("Let's try it out: we send a notification to your phone.", "Laten we het uitproberen: we sturen een melding naar je telefoon.")) }
            input type="hidden" name="user" value=(user);
            button #try-it-button type="submit" { (lang.pick("Try it", "Probeer het")) }
        }
    }
}

fn enrollment_text(lang: Lang, state: pb::EnrollmentState) -> &'static str {
    match state {
        pb::EnrollmentState::Completed => lang.pick("Your authenticator app is set up.", "Je authenticator-app is ingesteld."),
        pb::EnrollmentState::Expired => {
            lang.pick("This QR code has expired: add the method again.", "Deze QR-code is verlopen: voeg de methode opnieuw toe.")
        }
        _ => lang.pick("Waiting for your phone…", "Wachten op je telefoon…"),
    }
}

/// Without JavaScript: the enrollment's state, reloading itself while pending.
pub async fn enrollment(State(idp): State<Idp>, lang: Lang, Path(id): Path<String>) -> Response {
    let mut enrollments = idp.enrollments.clone();
    let enrollment = match enrollments.get_enrollment(pb::GetEnrollmentRequest { enrollment_id: id }).await {
        Ok(response) => response.into_inner(),
        Err(status) => return call_failed(lang, &status),
    };
    let state = enrollment.state();
    let pending = state == pb::EnrollmentState::Pending;
    let title = lang.pick("Set up your authenticator app", "Je authenticator-app instellen");
    let user = enrollment.user_id.as_str();
    let page = Page { lang, title, user, refresh: pending.then_some(3) };
    let here = format!("/setup/enrollment/{}", urlencode(&enrollment.enrollment_id));
    page.render(
        StatusCode::OK,
        html! {
            div #status role="status" data-state=(state.as_str_name().trim_start_matches("ENROLLMENT_STATE_")) {
                p data-text { (enrollment_text(lang, state)) }
            }
            @if pending { p { a href=(here) { (lang.pick("Refresh", "Vernieuwen")) } } }
            @if state == pb::EnrollmentState::Completed { (try_it_form(lang, user, false)) }
            @if state == pb::EnrollmentState::Expired { p { a href={ "/setup/add?user=" (urlencode(user)) } { (lang.pick("Add the method again", "Methode opnieuw toevoegen")) } } }
        },
    )
}

/// The live wait: asks GetEnrollment every `enrollment_poll` and sends an event
/// when the state changes; ends after COMPLETED or EXPIRED.
pub async fn enrollment_events(State(idp): State<Idp>, lang: Lang, Path(id): Path<String>) -> Response {
    Sse::new(enrollment_stream(idp, lang, id)).keep_alive(KeepAlive::default()).into_response()
}

fn enrollment_stream(idp: Idp, lang: Lang, id: String) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut ticks = tokio::time::interval(idp.enrollment_poll);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = (idp.enrollments.clone(), ticks, None::<pb::EnrollmentState>, false);
    futures::stream::unfold(start, move |(mut client, mut ticks, mut last, done)| {
        let (id, lang) = (id.clone(), lang);
        async move {
            if done {
                return None;
            }
            loop {
                ticks.tick().await;
                let state = match client.get_enrollment(pb::GetEnrollmentRequest { enrollment_id: id.clone() }).await {
                    Ok(response) => response.into_inner().state(),
                    Err(status) => {
                        tracing::warn!(code = ?status.code(), "GetEnrollment failed");
                        let text = super::i18n::Lang::pick(
                            lang,
                            "Checking failed: refresh the page.",
                            "Controleren mislukt: vernieuw de pagina.",
                        );
                        let event = state_event("ERROR", text, true, &[]);
                        return Some((Ok(event), (client, ticks, last, true)));
                    }
                };
                if last == Some(state) {
                    continue;
                }
                last = Some(state);
                let done = state != pb::EnrollmentState::Pending;
                let show: &[&str] = if state == pb::EnrollmentState::Completed { &["try-it"] } else { &[] };
                let name = state.as_str_name().trim_start_matches("ENROLLMENT_STATE_");
                let event = state_event(name, enrollment_text(lang, state), done, show);
                return Some((Ok(event), (client, ticks, last, done)));
            }
        }
    })
}

/// One `state` event as the page's script reads it.
pub fn state_event(state: &str, text: &str, is_final: bool, show: &[&str]) -> Event {
    let data = serde_json::json!({ "state": state, "text": text, "final": is_final, "show": show });
    Event::default().event("state").data(data.to_string())
}

/// "Try it": a challenge for the user, then the challenge page.
pub async fn try_it(State(idp): State<Idp>, lang: Lang, Form(form): Form<UserForm>) -> Response {
    let context = pb::SignInContext {
        application: lang.pick("Security info: try it", "Beveiligingsgegevens: uitproberen").to_owned(),
        ..Default::default()
    };
    super::signin::create_and_show(&idp, lang, form.user.trim(), context).await
}

pub fn to_challenge(challenge: &pb::Challenge) -> Response {
    Redirect::to(&format!("/challenge/{}", urlencode(&challenge.challenge_id))).into_response()
}
