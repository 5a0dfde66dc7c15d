//! Reads the enrollment URI from a picture of the QR code (the `qr_png` of
//! BeginEnrollment, or a screenshot of the setup page): png decodes the pixels,
//! rqrr finds and decodes the code.

use anyhow::Context as _;

/// The text of the one QR code in `png_bytes`.
pub fn decode_qr_png(png_bytes: &[u8]) -> anyhow::Result<String> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    // Palettes and low bit depths to 8-bit samples, 16-bit samples to 8.
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().context("not a PNG image")?;
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).context("cannot decode the PNG image")?;
    let (width, height) = (info.width as usize, info.height as usize);
    let channels = info.color_type.samples();
    let grey = |x: usize, y: usize| -> u8 {
        let at = (y * width + x) * channels;
        let Some(px) = pixels.get(at..at + channels) else { return 255 };
        let (luma, alpha) = match px {
            [g] => (u32::from(*g), 255),
            [g, a] => (u32::from(*g), u32::from(*a)),
            [r, g, b] => ((299 * u32::from(*r) + 587 * u32::from(*g) + 114 * u32::from(*b)) / 1000, 255),
            [r, g, b, a, ..] => ((299 * u32::from(*r) + 587 * u32::from(*g) + 114 * u32::from(*b)) / 1000, u32::from(*a)),
            [] => (255, 255),
        };
        // Transparent pixels read as white paper behind the code.
        u8::try_from((luma * alpha + 255 * (255 - alpha)) / 255).unwrap_or(255)
    };
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(width, height, grey);
    let grids = image.detect_grids();
    let grid = match grids.as_slice() {
        [one] => one,
        [] => anyhow::bail!("no QR code found in the image"),
        _ => anyhow::bail!("{} QR codes in the image; crop it to the enrollment code", grids.len()),
    };
    let (_, content) = grid.decode().map_err(|e| anyhow::anyhow!("the QR code does not decode: {e}"))?;
    Ok(content)
}

#[cfg(test)]
mod tests {
    use super::decode_qr_png;

    /// The server's PNG (1-bit greyscale, read as 8-bit) re-encoded as a screenshot would be:
    /// RGBA, coloured, half of it transparent.
    fn as_rgba_screenshot(grey_png: &[u8]) -> Vec<u8> {
        let mut decoder = png::Decoder::new(std::io::Cursor::new(grey_png));
        decoder.set_transformations(png::Transformations::EXPAND);
        let mut reader = decoder.read_info().expect("png");
        let mut grey = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut grey).expect("frame");
        assert_eq!(info.color_type, png::ColorType::Grayscale);
        let rgba: Vec<u8> = grey
            .iter()
            .enumerate()
            .flat_map(|(i, &g)| {
                // Light pixels of the left half transparent black (they must read as
                // the white paper behind, not as black); dark ones a dark blue.
                let transparent = g > 128 && (i % info.width as usize) < info.width as usize / 2;
                match (g > 128, transparent) {
                    (true, true) => [0, 0, 0, 0],
                    (true, false) => [255, 250, 240, 255],
                    (false, _) => [10, 20, 60, 255],
                }
            })
            .collect();
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, info.width, info.height);
        encoder.set_color(png::ColorType::Rgba);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header().expect("header").write_image_data(&rgba).expect("data");
        out
    }

    #[test]
    fn the_servers_png_and_a_colour_screenshot_of_it_decode() {
        let uri = "pushmatch://enroll?v=1&server=http%3A%2F%2F127.0.0.1%3A50051&code=00ff&issuer=Gors&account=jan";
        let grey = crate::domain::enrollment::qr_png(uri).expect("png");
        assert_eq!(decode_qr_png(&grey).expect("decodes"), uri);
        assert_eq!(decode_qr_png(&as_rgba_screenshot(&grey)).expect("decodes"), uri);
    }

    #[test]
    fn a_picture_without_a_code_or_not_a_png_is_a_clear_error() {
        let mut blank = Vec::new();
        let mut encoder = png::Encoder::new(&mut blank, 64, 64);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.write_header().expect("header").write_image_data(&[255; 64 * 64]).expect("data");
        assert_eq!(decode_qr_png(&blank).expect_err("no code").to_string(), "no QR code found in the image");
        assert_eq!(decode_qr_png(b"GIF89a").expect_err("not png").to_string(), "not a PNG image");
    }
}
