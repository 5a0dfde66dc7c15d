//! The page shell every page shares, the home page, and the static style and
//! script. The script only opens the live update (server-sent events); every
//! page works without it.

use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, VARY};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::Lang;

/// Scripts and styles from this origin only; the QR code is a `data:` image.
const CSP: &str = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'";

pub struct Page<'a> {
    pub lang: Lang,
    pub title: &'a str,
    /// The user the page is about, for the navigation links.
    pub user: &'a str,
    /// Without JavaScript, reload the page after this many seconds.
    pub refresh: Option<u32>,
}

impl Page<'_> {
    pub fn render(&self, status: StatusCode, body: Markup) -> Response {
        let lang = self.lang;
        let user_query = if self.user.is_empty() { String::new() } else { format!("?user={}", urlencode(self.user)) };
        let markup = html! {
            (DOCTYPE)
            html lang=(lang.code()) {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (self.title) " · Gors" }
                    link rel="stylesheet" href="/static/style.css";
                    @if let Some(seconds) = self.refresh {
                        noscript { meta http-equiv="refresh" content=(seconds); }
                    }
                    script src="/static/live.js" defer {}
                }
                body {
                    header {
                        p.brand { "Gors" }
                        nav aria-label=(lang.pick("Main", "Hoofdmenu")) {
                            ul {
                                li { a href={ "/setup" (user_query) } { (lang.pick("Security info", "Beveiligingsgegevens")) } }
                                li { a href={ "/signin" (user_query) } { (lang.pick("Sign in", "Aanmelden")) } }
                                li { a href={ "/devices" (user_query) } { (lang.pick("My devices", "Mijn apparaten")) } }
                            }
                        }
                    }
                    main {
                        h1 { (self.title) }
                        (body)
                    }
                }
            }
        };
        let mut response = (status, markup.into_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
        headers.insert(VARY, HeaderValue::from_static("Accept-Language"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
        response
    }
}

pub fn urlencode(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A page with one message, for errors and plain outcomes.
pub fn message_page(lang: Lang, status: StatusCode, title: &str, text: &str) -> Response {
    let page = Page { lang, title, user: "", refresh: None };
    page.render(
        status,
        html! { p #message role="alert" { (text) } p { a href="/" { (lang.pick("Back to start", "Terug naar het begin")) } } },
    )
}

/// A form asking for the user name; `action` is where it goes (GET).
pub fn user_form(lang: Lang, action: &str, button: &str) -> Markup {
    html! {
        form method="get" action=(action) {
            p {
                label for="user" { (lang.pick("User name", "Gebruikersnaam")) }
                input #user name="user" type="text" autocomplete="username" required;
            }
            p { button type="submit" { (button) } }
        }
    }
}

pub async fn home(lang: Lang) -> Response {
    let page = Page { lang, title: lang.pick("Gors account", "Gors-account"), user: "", refresh: None };
    page.render(
        StatusCode::OK,
        html! {
            p { (lang.pick(
                "Reference pages for pushmatch: set up the authenticator app, sign in with a number, manage your devices.",
                "Voorbeeldpagina's voor pushmatch: stel de authenticator-app in, meld je aan met een nummer, beheer je apparaten.",
            )) }
            h2 { (lang.pick("Security info", "Beveiligingsgegevens")) }
            (user_form(lang, "/setup", lang.pick("Show my sign-in methods", "Toon mijn aanmeldmethoden")))
            p { a href="/signin" { (lang.pick("Sign in", "Aanmelden")) } " · " a href="/devices" { (lang.pick("My devices", "Mijn apparaten")) } }
        },
    )
}

pub async fn style() -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

pub async fn script() -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT)
}

const STYLE: &str = r#"body { font: 1.05rem/1.5 system-ui, sans-serif; margin: 0; color: #1b1b1b; background: #fafafa; }
header { background: #0b4f6c; color: #fff; padding: .5rem 1.5rem; display: flex; gap: 2rem; align-items: center; }
header a { color: #fff; } .brand { font-weight: bold; margin: 0; }
nav ul { list-style: none; display: flex; gap: 1.2rem; margin: 0; padding: 0; }
main { max-width: 40rem; margin: 1.5rem auto; padding: 0 1.5rem; }
a:focus, button:focus, input:focus, summary:focus { outline: 3px solid #f0a500; outline-offset: 2px; }
button { font: inherit; padding: .5rem 1.2rem; border-radius: .3rem; border: 1px solid #0b4f6c; background: #0b4f6c; color: #fff; cursor: pointer; }
button.secondary { background: #fff; color: #0b4f6c; }
input { font: inherit; padding: .4rem; display: block; margin-top: .2rem; }
.number { font-size: 4.5rem; font-weight: bold; letter-spacing: .15em; margin: .5rem 0; }
.qr { image-rendering: pixelated; width: 220px; height: 220px; border: 1px solid #ccc; }
[role=status] { font-size: 1.3rem; font-weight: 600; padding: .6rem 1rem; border-left: .4rem solid #888; background: #fff; }
[data-state=APPROVED], [data-state=COMPLETED], .ok { border-left-color: #2e7d32; }
[data-state=DENIED], [data-state=EXPIRED], [data-state=FRAUD_REPORTED], [data-state=CANCELLED] { border-left-color: #c62828; }
table { border-collapse: collapse; width: 100%; } th, td { text-align: left; padding: .4rem; border-bottom: 1px solid #ddd; }
code { word-break: break-all; }
"#;

const SCRIPT: &str = r#""use strict";
// Live updates: each [data-events] region follows its server-sent event stream.
// Without JavaScript the page offers a refresh link (and reloads itself) instead.
for (const region of document.querySelectorAll("[data-events]")) {
  const source = new EventSource(region.dataset.events);
  source.addEventListener("state", (event) => {
    const update = JSON.parse(event.data);
    region.dataset.state = update.state;
    region.querySelector("[data-text]").textContent = update.text;
    if (update.final) {
      source.close();
      for (const id of update.show || []) {
        const element = document.getElementById(id);
        if (element) element.hidden = false;
      }
      for (const element of document.querySelectorAll("[data-while-pending]")) element.hidden = true;
    }
  });
}
"#;
