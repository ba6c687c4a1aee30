//! Row-wise absmax quantization to int8, outlier columns, and bitsandbytes' quantization of
//! the activations.

use rayon::prelude::*;

use super::{padded, round_f16, MIN_SCALE};

/// Row-wise absmax quantization of `x` (rows, cols): per row the max |x| over columns not
/// flagged in `skip` (flagged columns quantize to 0), `inv = 127 / max` (one division, 0 for
/// tiny maxima), `q = round_ties_even(x * inv)`. Returns the padded int8 rows and the maxima.
pub(crate) fn quantize_rows(
    x: &[f32],
    rows: usize,
    cols: usize,
    skip: Option<&[bool]>,
) -> (Vec<i8>, Vec<f32>) {
    quantize_rows_over(x, rows, cols, skip, MaxOver::Kept)
}

/// Which entries of a row its absmax is taken over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MaxOver {
    /// The columns not skipped (lathe's variant).
    Kept,
    /// Every column (bitsandbytes' variant: its caller has zeroed the outlier entries, so
    /// this is the max over the non-outlier *entries*, skipped columns included).
    All,
}

/// [`quantize_rows`] with the absmax taken over `over`; skipped columns quantize to 0
/// either way.
pub(crate) fn quantize_rows_over(
    x: &[f32],
    rows: usize,
    cols: usize,
    skip: Option<&[bool]>,
    over: MaxOver,
) -> (Vec<i8>, Vec<f32>) {
    let stride = padded(cols);
    let mut q = vec![0i8; rows * stride];
    let mut scales = vec![0f32; rows];
    let work = |(r, (qrow, scale)): (usize, (&mut [i8], &mut f32))| {
        *scale = quantize_row(&x[r * cols..(r + 1) * cols], skip, over, &mut qrow[..cols]);
    };
    if rows * cols >= 1 << 14 {
        q.par_chunks_mut(stride.max(1))
            .zip(scales.par_iter_mut())
            .enumerate()
            .for_each(work);
    } else {
        q.chunks_mut(stride.max(1))
            .zip(scales.iter_mut())
            .enumerate()
            .for_each(work);
    }
    (q, scales)
}

/// As [`quantize_rows`] (no skipped columns), with row `r` written as f32 into a scratch
/// row by `fill(r, row)`: a weight stored in 16 bits (or in a file's bytes) is quantized
/// without ever holding it whole in f32. The same values give the same bytes.
pub(crate) fn quantize_rows_with(
    rows: usize,
    cols: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> (Vec<i8>, Vec<f32>) {
    let stride = padded(cols);
    let mut q = vec![0i8; rows * stride];
    let mut scales = vec![0f32; rows];
    q.par_chunks_mut(stride.max(1))
        .zip(scales.par_iter_mut())
        .enumerate()
        .for_each_init(
            || vec![0f32; cols],
            |row, (r, (qrow, scale))| {
                fill(r, row);
                *scale = quantize_row(row, None, MaxOver::Kept, &mut qrow[..cols]);
            },
        );
    (q, scales)
}

/// One row of [`quantize_rows`]; returns its absmax. AVX2 when the CPU has it (the same
/// code, wider vectors).
fn quantize_row(x: &[f32], skip: Option<&[bool]>, over: MaxOver, q: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { quantize_row_avx2(x, skip, over, q) };
        }
    }
    quantize_row_body(x, skip, over, q)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(x: &[f32], skip: Option<&[bool]>, over: MaxOver, q: &mut [i8]) -> f32 {
    quantize_row_body(x, skip, over, q)
}

/// 1.5 * 2^23: for |y| <= 2^22, `(y + ROUND_MAGIC) - ROUND_MAGIC` is `round_ties_even(y)`
/// (the sum lands in [2^23, 2^24) where the f32 step is 1, and the hardware rounds it to
/// nearest, ties to even; ROUND_MAGIC is even so the parity is y's). The sum's low mantissa
/// bits are then that integer plus `ROUND_BITS`' mantissa.
const ROUND_MAGIC: f32 = 12_582_912.0;
const ROUND_BITS: i32 = 0x4B40_0000;

/// The scalar definition, written so that it vectorizes: `round_ties_even` alone compiles
/// to a libm `rintf` call per element without SSE4.1, and `f32::max` folds to a serial chain.
/// Bit-identical to `(x * inv).round_ties_even().clamp(-127, 127) as i8` (NaN -> 0) with the
/// max of |x| (NaN ignored) over the kept columns.
#[inline(always)]
fn quantize_row_body(x: &[f32], skip: Option<&[bool]>, over: MaxOver, q: &mut [i8]) -> f32 {
    match (skip, over) {
        (None, _) => quantize_kept(x, |_| true, |_| true, q),
        (Some(s), MaxOver::Kept) => {
            let s = &s[..x.len()];
            quantize_kept(x, |j| !s[j], |j| !s[j], q)
        }
        (Some(s), MaxOver::All) => {
            let s = &s[..x.len()];
            quantize_kept(x, |_| true, |j| !s[j], q)
        }
    }
}

/// Quantizes the entries `keep` accepts (0 elsewhere) with the absmax of those `in_max`
/// accepts.
#[inline(always)]
fn quantize_kept(
    x: &[f32],
    in_max: impl Fn(usize) -> bool,
    keep: impl Fn(usize) -> bool,
    q: &mut [i8],
) -> f32 {
    // The max as 16 independent lanes; `a > m` ignores NaN like `f32::max` (m is never NaN),
    // and the max of a set does not depend on the order.
    let mut lanes = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for (c, chunk) in (&mut chunks).enumerate() {
        for l in 0..16 {
            let a = if in_max(c * 16 + l) {
                chunk[l].abs()
            } else {
                0.0
            };
            lanes[l] = if a > lanes[l] { a } else { lanes[l] };
        }
    }
    let body = x.len() - chunks.remainder().len();
    for (l, &v) in chunks.remainder().iter().enumerate() {
        let a = if in_max(body + l) { v.abs() } else { 0.0 };
        lanes[l] = if a > lanes[l] { a } else { lanes[l] };
    }
    let max = lanes.iter().fold(0f32, |m, &a| if a > m { a } else { m });
    let inv = if max >= MIN_SCALE { 127.0 / max } else { 0.0 };
    for (j, (qv, &v)) in q.iter_mut().zip(x).enumerate() {
        let y = v * inv;
        // Clamped before rounding (the same as after), NaN kept.
        let y = y.clamp(-127.0, 127.0);
        let n = ((y + ROUND_MAGIC).to_bits() as i32).wrapping_sub(ROUND_BITS) as i8;
        *qv = if keep(j) && !y.is_nan() { n } else { 0 };
    }
    max
}

/// Columns j with any |x[r, j]| >= threshold, ascending (none when threshold <= 0).
pub(crate) fn outlier_columns(x: &[f32], rows: usize, cols: usize, threshold: f32) -> Vec<u32> {
    if threshold <= 0.0 {
        return Vec::new();
    }
    let mut flags = vec![false; cols];
    for row in x.chunks(cols.max(1)).take(rows) {
        for (f, v) in flags.iter_mut().zip(row) {
            *f |= v.abs() >= threshold;
        }
    }
    (0..cols as u32).filter(|&j| flags[j as usize]).collect()
}

/// bitsandbytes 0.50.2's `int8_vectorwise_quant` of the activations (backends/default/ops.py,
/// which `MatMul8bitLt` calls on `A.to(float16)`): x is rounded to f16 first; with a
/// threshold > 0 the entries with |x_f16| >= f16(threshold) are outliers (torch compares an
/// f16 tensor with the threshold converted to f16) and the columns holding one are the
/// outlier columns; each row's absmax is over the *other entries* (the small entries of an
/// outlier column count) and the row is quantized as lathe does (`127 / absmax` in f32,
/// round ties to even; nonzero f16 magnitudes are never below 2^-24, so [`MIN_SCALE`] only
/// catches rows of zeros, where bnb's 0 * inf = NaN casts to 0 as well); then the outlier columns
/// are zeroed. bnb zeroes them only when rows > 1, but with one row every entry of an
/// outlier column is itself an outlier, already zeroed before the quantization, so the
/// result is the same. Returns (outlier columns ascending, padded int8 rows, row absmaxes).
pub(crate) fn bnb_quantize_activations(
    x: &[f32],
    rows: usize,
    cols: usize,
    threshold: f32,
) -> (Vec<u32>, Vec<i8>, Vec<f32>) {
    let n = rows * cols;
    let mut xh = vec![0f32; n];
    let round = |(d, &v): (&mut f32, &f32)| *d = round_f16(v);
    if n >= 1 << 14 {
        xh.par_iter_mut().zip(&x[..n]).for_each(round);
    } else {
        xh.iter_mut().zip(&x[..n]).for_each(round);
    }
    let mut skip = vec![false; cols];
    if threshold > 0.0 {
        let t = round_f16(threshold);
        for row in xh.chunks_mut(cols.max(1)).take(rows) {
            for (s, v) in skip.iter_mut().zip(row.iter_mut()) {
                if v.abs() >= t {
                    *s = true;
                    *v = 0.0;
                }
            }
        }
    }
    let outliers = (0..cols as u32).filter(|&j| skip[j as usize]).collect();
    let (ca, sca) = quantize_rows_over(&xh, rows, cols, Some(&skip), MaxOver::All);
    (outliers, ca, sca)
}
