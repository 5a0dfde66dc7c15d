//! Dutch or English, chosen from the browser's `Accept-Language`.

use std::convert::Infallible;

use axum::extract::FromRequestParts;
use axum::http::header::ACCEPT_LANGUAGE;
use axum::http::request::Parts;
use pushmatch::pb::{ChallengeState, DenyReason};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    En,
    Nl,
}

impl Lang {
    /// The language of the highest-weighted tag that is Dutch or English;
    /// English when the header names neither.
    pub fn from_accept_language(header: &str) -> Self {
        let mut best: Option<(u16, Lang)> = None;
        for item in header.split(',') {
            let mut parts = item.split(';');
            let tag = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let weight = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .and_then(|q| q.trim().parse::<f32>().ok())
                .map_or(1000, |q| (q.clamp(0.0, 1.0) * 1000.0) as u16);
            let primary = tag.split('-').next().unwrap_or("");
            let lang = match primary {
                "nl" => Lang::Nl,
                "en" => Lang::En,
                _ => continue,
            };
            if weight > 0 && best.is_none_or(|(w, _)| weight > w) {
                best = Some((weight, lang));
            }
        }
        best.map_or(Lang::En, |(_, lang)| lang)
    }

    pub fn code(self) -> &'static str {
        match self {
            Self::En => "en",
            Self::Nl => "nl",
        }
    }

    pub fn pick(self, en: &'static str, nl: &'static str) -> &'static str {
        match self {
            Self::En => en,
            Self::Nl => nl,
        }
    }

    /// A challenge's state in words.
    pub fn outcome(self, state: ChallengeState, reason: DenyReason) -> &'static str {
        match (state, reason) {
            (ChallengeState::Approved, _) => self.pick("Notification approved", "Melding goedgekeurd"),
            (ChallengeState::Denied, DenyReason::WrongNumber) => {
                self.pick("Wrong number chosen: sign-in denied", "Verkeerd nummer gekozen: aanmelding geweigerd")
            }
            (ChallengeState::Denied, _) => self.pick("Notification denied", "Melding geweigerd"),
            (ChallengeState::Expired, _) => {
                self.pick("Notification expired: no answer in time", "Melding verlopen: niet op tijd beantwoord")
            }
            (ChallengeState::Cancelled, _) => self.pick("Sign-in cancelled", "Aanmelding geannuleerd"),
            (ChallengeState::FraudReported, _) => {
                self.pick("Reported as fraud: sign-in blocked", "Gemeld als fraude: aanmelden geblokkeerd")
            }
            (ChallengeState::Pending | ChallengeState::Unspecified, _) => {
                self.pick("Waiting for your answer in the app…", "Wachten op je antwoord in de app…")
            }
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Lang {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()).unwrap_or("");
        Ok(Self::from_accept_language(header))
    }
}

#[cfg(test)]
mod tests {
    use super::Lang;

    #[test]
    fn the_browser_language_picks_dutch_or_english() {
        assert_eq!(Lang::from_accept_language("nl-NL,nl;q=0.9,en-US;q=0.8,en;q=0.7"), Lang::Nl);
        assert_eq!(Lang::from_accept_language("en-GB,nl;q=0.5"), Lang::En);
        assert_eq!(Lang::from_accept_language("de-DE,de;q=0.9,nl;q=0.4,en;q=0.3"), Lang::Nl);
        assert_eq!(Lang::from_accept_language("fr"), Lang::En);
        assert_eq!(Lang::from_accept_language(""), Lang::En);
        assert_eq!(Lang::from_accept_language("nl;q=0, en;q=0.1"), Lang::En);
        assert_eq!(Lang::from_accept_language("en;q=0.2, NL-be;q=0.8"), Lang::Nl);
    }
}
