//! My devices: each device with its push state; remove one.

use axum::Form;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use pushmatch::pb;
use serde::Deserialize;

use super::layout::{Page, urlencode, user_form};
use super::{Idp, Lang, call_failed};

pub fn push_state(lang: Lang, device: &pb::Device) -> &'static str {
    match (device.platform(), device.push_enabled) {
        (pb::Platform::Unspecified, _) => lang.pick("codes only", "alleen codes"),
        (_, true) => lang.pick("notifications on", "meldingen aan"),
        (_, false) => {
            lang.pick("notifications off: the phone no longer takes them", "meldingen uit: de telefoon neemt ze niet meer aan")
        }
    }
}

fn platform(device: &pb::Device) -> &'static str {
    match device.platform() {
        pb::Platform::Apns => "iOS",
        pb::Platform::Fcm => "Android",
        pb::Platform::Webpush => "Web Push",
        pb::Platform::Unspecified => "TOTP",
    }
}

fn date(at: Option<&prost_types::Timestamp>) -> String {
    // Days since the epoch as a calendar date (UTC), without a date crate.
    let Some(at) = at.filter(|t| t.seconds > 0) else { return "–".into() };
    let days = at.seconds.div_euclid(86_400);
    let (z, era_day) = (days + 719_468, (days + 719_468).rem_euclid(146_097));
    let era = z.div_euclid(146_097);
    let year_of_era = (era_day - era_day / 1460 + era_day / 36_524 - era_day / 146_096) / 365;
    let day_of_year = era_day - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[derive(Deserialize, Default)]
pub struct ListQuery {
    #[serde(default)]
    user: String,
    #[serde(default)]
    removed: bool,
}

pub async fn list(State(idp): State<Idp>, lang: Lang, Query(query): Query<ListQuery>) -> Response {
    let user = query.user.trim();
    let page = Page { lang, title: lang.pick("My devices", "Mijn apparaten"), user, refresh: None };
    if user.is_empty() {
        return page.render(StatusCode::OK, user_form(lang, "/devices", lang.pick("Show my devices", "Toon mijn apparaten")));
    }
    let mut enrollments = idp.enrollments.clone();
    let devices = match enrollments.list_devices(pb::ListDevicesRequest { user_id: user.to_owned() }).await {
        Ok(response) => response.into_inner().devices,
        Err(status) => return call_failed(lang, &status),
    };
    page.render(
        StatusCode::OK,
        html! {
            @if query.removed { p #removed role="status" { (lang.pick("The device was removed.", "Het apparaat is verwijderd.")) } }
            @if devices.is_empty() {
                p #no-devices { (lang.pick("No devices.", "Geen apparaten.")) }
            } @else {
                table #devices {
                    caption { (lang.pick("Your devices", "Je apparaten")) }
                    thead { tr {
                        th scope="col" { (lang.pick("Name", "Naam")) }
                        th scope="col" { (lang.pick("Kind", "Soort")) }
                        th scope="col" { (lang.pick("Notifications", "Meldingen")) }
                        th scope="col" { (lang.pick("Added", "Toegevoegd")) }
                        th scope="col" { (lang.pick("Last used", "Laatst gebruikt")) }
                        th scope="col" { span { (lang.pick("Remove", "Verwijderen")) } }
                    } }
                    tbody {
                        @for device in &devices {
                            tr data-device=(device.device_id) {
                                td { (device.display_name) }
                                td { (platform(device)) }
                                td .push-state { (push_state(lang, device)) }
                                td { (date(device.enrolled_at.as_ref())) }
                                td { (date(device.last_used_at.as_ref())) }
                                td {
                                    form method="post" action="/devices/remove" {
                                        input type="hidden" name="user" value=(user);
                                        input type="hidden" name="device_id" value=(device.device_id);
                                        button .secondary type="submit" aria-label={ (lang.pick("Remove", "Verwijder")) " " (device.display_name) } {
                                            (lang.pick("Remove", "Verwijderen"))
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

#[derive(Deserialize)]
pub struct RemoveForm {
    user: String,
    device_id: String,
}

/// RemoveDevice, after checking the device is this user's: RemoveDevice takes
/// any device of the tenant, so the IdP must not let one user remove another's.
pub async fn remove(State(idp): State<Idp>, lang: Lang, Form(form): Form<RemoveForm>) -> Response {
    let user = form.user.trim();
    let mut enrollments = idp.enrollments.clone();
    let devices = match enrollments.list_devices(pb::ListDevicesRequest { user_id: user.to_owned() }).await {
        Ok(response) => response.into_inner().devices,
        Err(status) => return call_failed(lang, &status),
    };
    if !devices.iter().any(|d| d.device_id == form.device_id) {
        return super::layout::message_page(
            lang,
            StatusCode::NOT_FOUND,
            lang.pick("That did not work", "Dat lukte niet"),
            lang.pick("That device is not one of yours.", "Dat apparaat is niet van jou."),
        );
    }
    match enrollments.remove_device(pb::RemoveDeviceRequest { device_id: form.device_id }).await {
        Ok(_) => Redirect::to(&format!("/devices?user={}&removed=true", urlencode(user))).into_response(),
        Err(status) => call_failed(lang, &status),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_read_as_the_calendar_says() {
        let at = |seconds| prost_types::Timestamp { seconds, nanos: 0 };
        assert_eq!(super::date(Some(&at(0))), "–");
        assert_eq!(super::date(Some(&at(951_782_400))), "2000-02-29");
        assert_eq!(super::date(Some(&at(1_796_342_400))), "2026-12-04");
        assert_eq!(super::date(None), "–");
    }
}
