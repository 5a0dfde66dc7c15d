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
