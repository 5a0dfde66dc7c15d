//! Enrollment: the QR code on the setup page and the one-time code inside it.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};

use super::error::DomainError;
use super::ids::{CodeDigest, DeviceId, EnrollmentCode, EnrollmentId, TenantId, UserId};
use super::secrets::SealedSecret;
use super::time::Millis;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollmentKind {
    Push,
    Totp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollmentState {
    Pending,
    Completed,
    Expired,
}

/// An enrollment as the stores keep it. The one-time code is kept only as its
/// digest: the URI (and so the QR code) is shown once, by BeginEnrollment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    pub id: EnrollmentId,
    pub tenant: TenantId,
    pub user_id: UserId,
    pub account_name: String,
    pub kind: EnrollmentKind,
    /// PUSH: the digest of the one-time code. TOTP enrollments have no code.
    pub code_digest: Option<CodeDigest>,
    /// TOTP: the secret the QR shows, sealed, until the first code confirms it.
    #[serde(default)]
    pub totp_secret: Option<SealedSecret>,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub completed: bool,
    pub device_id: Option<DeviceId>,
}

impl Enrollment {
    pub fn state(&self, now: Millis) -> EnrollmentState {
        if self.completed {
            EnrollmentState::Completed
        } else if now >= self.expires_at {
            EnrollmentState::Expired
        } else {
            EnrollmentState::Pending
        }
    }
}

/// RFC 3986 unreserved characters stay; everything else is %-encoded.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

fn encode(component: &str) -> String {
    utf8_percent_encode(component, URI_COMPONENT).to_string()
}

/// The push enrollment URI of API.md:
/// `pushmatch://enroll?v=1&server=…&code=…&issuer=…&account=…`.
pub fn push_enrollment_uri(public_url: &str, code: &EnrollmentCode, issuer: &str, account: &str) -> String {
    format!(
        "pushmatch://enroll?v=1&server={}&code={}&issuer={}&account={}",
        encode(public_url),
        encode(code.expose()),
        encode(issuer),
        encode(account)
    )
}

/// Renders `text` as a QR code PNG: 8 pixels a module, a 4-module quiet zone,
/// error correction M (what authenticator scanners expect). One bit a pixel
/// (grayscale, 0 black, 1 white): an eighth of the bytes to filter and deflate of
/// 8-bit gray, the same picture.
pub fn qr_png(text: &str) -> Result<Vec<u8>, DomainError> {
    const SCALE: usize = 8;
    const QUIET: usize = 4;
    let (modules, dark) = super::qr::modules(text.as_bytes(), qrcode::EcLevel::M)?;
    let side = (modules + 2 * QUIET) * SCALE;
    // A row of pixels is `side` bits; SCALE is 8, so each module is one whole byte.
    let row_bytes = side / 8;
    let mut pixels = vec![0xFFu8; row_bytes * side];
    for (y, row) in dark.chunks_exact(modules).enumerate() {
        let mut line = vec![0xFFu8; row_bytes];
        for (x, _) in row.iter().enumerate().filter(|(_, dark)| **dark) {
            line[x + QUIET] = 0x00;
        }
        let top = (y + QUIET) * SCALE;
        for pixel_row in top..top + SCALE {
            pixels[pixel_row * row_bytes..(pixel_row + 1) * row_bytes].copy_from_slice(&line);
        }
    }
    let side = u32::try_from(side).map_err(|_| DomainError::Internal("qr code too large".into()))?;
    let mut png_bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut png_bytes, side, side);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::One);
    encoder
        .write_header()
        .and_then(|mut writer| writer.write_image_data(&pixels))
        .map_err(|e| DomainError::Internal(format!("png encoding failed: {e}")))?;
    Ok(png_bytes)
}

/// Renders `text` as a QR code for a terminal, two modules a character cell.
pub fn qr_terminal(text: &str) -> Result<String, DomainError> {
    let code = qrcode::QrCode::with_error_correction_level(text.as_bytes(), qrcode::EcLevel::M)
        .map_err(|e| DomainError::Internal(format!("qr encoding failed: {e}")))?;
    Ok(code
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_encodes_every_component() {
        let code = EnrollmentCode::from_request("abc123").expect("code");
        let uri = push_enrollment_uri("https://mfa.gors.nl:443/x", &code, "Gors & Co", "jan@gors.nl");
        assert_eq!(
            uri,
            "pushmatch://enroll?v=1&server=https%3A%2F%2Fmfa.gors.nl%3A443%2Fx&code=abc123&issuer=Gors%20%26%20Co&account=jan%40gors.nl"
        );
    }

    /// Decodes the PNG with an independent QR decoder (rqrr) and checks that the
    /// camera of a phone would read the URI back.
    #[test]
    fn qr_png_decodes_back_to_the_uri() {
        let code = EnrollmentCode::generate().expect("code");
        let uri = push_enrollment_uri("https://mfa.gors.nl", &code, "Gors", "jan@gors.nl");
        let png_bytes = qr_png(&uri).expect("png");
        let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
        decoder.set_transformations(png::Transformations::EXPAND);
        let mut reader = decoder.read_info().expect("png header");
        let mut pixels = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut pixels).expect("png frame");
        let (width, height) = (info.width as usize, info.height as usize);
        let mut image = rqrr::PreparedImage::prepare_from_greyscale(width, height, |x, y| pixels[y * width + x]);
        let grids = image.detect_grids();
        assert_eq!(grids.len(), 1);
        let (_, content) = grids[0].decode().expect("decodes");
        assert_eq!(content, uri);
    }

    /// The largest URI BeginEnrollment can make: an account name of 256 bytes that
    /// all need %-encoding (three characters a byte), beside a long server URL and
    /// issuer. (Too slow for the `enrollment_uris` fuzz target, so checked here.)
    #[test]
    fn the_longest_uri_the_api_allows_renders() {
        let code = EnrollmentCode::generate().expect("code");
        let account = "\u{20ac}".repeat(85) + "&";
        assert_eq!(account.len(), 256);
        let uri = push_enrollment_uri(&format!("https://{}.example", "m".repeat(100)), &code, &"ü".repeat(50), &account);
        assert!(uri.len() > 1_000, "{}", uri.len());
        let png_bytes = qr_png(&uri).expect("renders");
        assert!(png_bytes.starts_with(b"\x89PNG"));
    }

    #[test]
    fn enrollment_state_follows_expiry_and_completion() {
        let mut enrollment = Enrollment {
            id: EnrollmentId::generate().expect("id"),
            tenant: TenantId("t".into()),
            user_id: UserId::parse("u").expect("user"),
            account_name: "a".into(),
            kind: EnrollmentKind::Push,
            code_digest: Some(CodeDigest("d".into())),
            totp_secret: None,
            created_at: Millis(0),
            expires_at: Millis(600_000),
            completed: false,
            device_id: None,
        };
        assert_eq!(enrollment.state(Millis(599_999)), EnrollmentState::Pending);
        assert_eq!(enrollment.state(Millis(600_000)), EnrollmentState::Expired);
        enrollment.completed = true;
        assert_eq!(enrollment.state(Millis(900_000)), EnrollmentState::Completed);
    }
}
