//! The modules of an enrollment QR code, the same code the `qrcode` crate makes,
//! made about four times cheaper.
//!
//! A QR encoder tries the eight mask patterns and keeps the one with the lowest
//! penalty (ISO/IEC 18004 section 7.8.3: long runs, 2x2 blocks, finder-like
//! patterns, dark/light balance), so that scanners read it easily. The crate's
//! scoring builds a boxed closure for every module it looks at, and at enrollment
//! rates that scoring was most of BeginEnrollment's CPU (BENCHMARKS.md, issue 19).
//! So the crate still encodes, adds error correction and draws the eight masked
//! codes ([`qrcode::canvas::Canvas`]), and this module scores them: the same rules
//! with the same arithmetic as the crate's `compute_total_penalty_scores`, over a
//! plain grid, keeping the first mask of the lowest score as the crate does. The
//! test below holds it to that: the same modules as `QrCode` for many inputs.

use qrcode::canvas::{Canvas, MaskPattern};
use qrcode::{Color, EcLevel};

use super::error::DomainError;

/// The mask patterns in the order the crate tries them (it keeps the first of the
/// lowest score).
const PATTERNS: [MaskPattern; 8] = [
    MaskPattern::Checkerboard,
    MaskPattern::HorizontalLines,
    MaskPattern::VerticalLines,
    MaskPattern::DiagonalLines,
    MaskPattern::LargeCheckerboard,
    MaskPattern::Fields,
    MaskPattern::Diamonds,
    MaskPattern::Meadow,
];

/// A QR code (error correction `ec`, the smallest version that holds `data`) as
/// its width and its modules row by row, `true` for dark.
pub fn modules(data: &[u8], ec: EcLevel) -> Result<(usize, Vec<bool>), DomainError> {
    let failed = |e: qrcode::types::QrError| DomainError::Internal(format!("qr encoding failed: {e}"));
    let bits = qrcode::bits::encode_auto(data, ec).map_err(failed)?;
    let version = bits.version();
    let (codewords, ec_codewords) = qrcode::ec::construct_codewords(&bits.into_bytes(), version, ec).map_err(failed)?;
    let width = usize::try_from(version.width()).map_err(|_| DomainError::Internal("qr version without a width".into()))?;
    let mut unmasked = Canvas::new(version, ec);
    unmasked.draw_all_functional_patterns();
    unmasked.draw_data(&codewords, &ec_codewords);
    let mut best: Option<(u32, Vec<bool>)> = None;
    for pattern in PATTERNS {
        let mut canvas = unmasked.clone();
        canvas.apply_mask(pattern);
        let dark: Vec<bool> = canvas.into_colors().into_iter().map(|color| color == Color::Dark).collect();
        let score = penalty(&dark, width);
        if best.as_ref().is_none_or(|(lowest, _)| score < *lowest) {
            best = Some((score, dark));
        }
    }
    best.map(|(_, dark)| (width, dark)).ok_or_else(|| DomainError::Internal("no mask pattern".into()))
}

/// The crate's penalty of a masked code (without its constant offset, which does
/// not change which mask is lowest). Rows and columns are read as slices (the
/// columns from a transposed copy), so each rule is a pass over contiguous memory.
fn penalty(dark: &[bool], width: usize) -> u32 {
    let mut transposed = vec![false; dark.len()];
    for (y, row) in dark.chunks_exact(width).enumerate() {
        for (x, module) in row.iter().enumerate() {
            transposed[x * width + y] = *module;
        }
    }
    let mut score = 0;
    for line in dark.chunks_exact(width).chain(transposed.chunks_exact(width)) {
        score += runs(line) + finders(line);
    }
    // 2x2 blocks of one color.
    for (upper, lower) in dark.chunks_exact(width).zip(dark.chunks_exact(width).skip(1)) {
        for x in 0..width - 1 {
            let this = upper[x];
            // `&`, not `&&`: no branch to mispredict.
            score += 3 * u32::from((upper[x + 1] == this) & (lower[x] == this) & (lower[x + 1] == this));
        }
    }
    // Balance: how far the dark share is from half, in half-percent.
    let ratio = dark.iter().filter(|d| **d).count() * 200 / dark.len();
    score + ratio.abs_diff(100) as u32
}

/// Runs of five or more modules of one color in a line: length - 2 each.
fn runs(line: &[bool]) -> u32 {
    // Without branches: on random modules a branch per module is mispredicted half
    // the time, which cost more than the counting itself.
    let (mut score, mut run) = (0, 1_u32);
    for pair in line.windows(2) {
        let same = u32::from(pair[0] == pair[1]);
        score += (1 - same) * u32::from(run >= 5) * run.saturating_sub(2);
        run = same * run + 1;
    }
    score + u32::from(run >= 5) * run.saturating_sub(2)
}

/// Finder-like patterns (dark, light, dark x3, light, dark) in a line: 40 each
/// unless a dark module lies within four modules on each side (as the crate counts).
fn finders(line: &[bool]) -> u32 {
    const PATTERN: [bool; 7] = [true, false, true, true, true, false, true];
    let mut score = 0;
    for (start, window) in line.windows(7).enumerate() {
        if window != PATTERN {
            continue;
        }
        let before = &line[start.saturating_sub(4)..start];
        let after = &line[start + 7..(start + 11).min(line.len())];
        if !before.contains(&true) || !after.contains(&true) {
            score += 40;
        }
    }
    score
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same modules as the `qrcode` crate's own choice, so the same mask: for
    /// URIs of every length an enrollment makes, and for arbitrary bytes.
    #[test]
    fn the_same_code_as_the_crate_makes() {
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for length in (1..1_200).step_by(37) {
            let uri = format!(
                "pushmatch://enroll?v=1&server=https%3A%2F%2Fmfa.example&code={}&issuer=Gors&account={}",
                "K".repeat(length % 60 + 20),
                "a".repeat(length)
            );
            inputs.push(uri.into_bytes());
        }
        for seed in 0u8..40 {
            let bytes: Vec<u8> = (0..(seed as usize * 7 + 1)).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
            inputs.push(bytes);
        }
        for input in inputs {
            let (width, ours) = modules(&input, EcLevel::M).expect("encodes");
            let theirs = qrcode::QrCode::with_error_correction_level(&input, EcLevel::M).expect("encodes");
            assert_eq!(width, theirs.width());
            let theirs: Vec<bool> = theirs.to_colors().into_iter().map(|c| c == Color::Dark).collect();
            assert!(ours == theirs, "another mask than the crate's for {} bytes", input.len());
        }
    }
}
