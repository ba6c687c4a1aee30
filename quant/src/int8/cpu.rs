//! The CPU kernels of LLM.int8(): the oracle for the GPU ones and the CPU fallback.
//!
//! int8 rows are kept as `i8` slices padded with zeros to a multiple of 4 elements: the same
//! bytes, on a little-endian host, as the packed u32 words of the GPU.

use half::f16;
use rayon::prelude::*;

/// Rows whose absmax is below 2^-100 quantize to zeros: 127 / absmax would overflow for
/// subnormal maxima. The WGSL kernels use the same cut.
pub(crate) const MIN_SCALE: f32 = 7.888_609e-31;

/// Rows at or below this count take the GEMV form.
pub(crate) const GEMV_MAX_ROWS: usize = 4;

/// `n` rounded up to a multiple of 4 (the padded row length).
pub(crate) fn padded(n: usize) -> usize {
    n.next_multiple_of(4)
}

/// x rounded to the nearest f16 (ties to even), as f32: the 16-bit path's operands.
pub(crate) fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// The dequantized weight value `(q * scale) / 127` (one f32 product, one f32 division).
pub(crate) fn dequant(q: i8, scale: f32) -> f32 {
    (f32::from(q) * scale) / 127.0
}

/// Row-wise absmax quantization of `x` (rows, cols): per row the max |x| over columns not
/// flagged in `skip` (flagged columns quantize to 0), `inv = 127 / max` (one division, 0 for
/// tiny maxima), `q = round_ties_even(x * inv)`. Returns the padded int8 rows and the maxima.
pub(crate) fn quantize_rows(
    x: &[f32],
    rows: usize,
    cols: usize,
    skip: Option<&[bool]>,
) -> (Vec<i8>, Vec<f32>) {
    let stride = padded(cols);
    let mut q = vec![0i8; rows * stride];
    let mut scales = vec![0f32; rows];
    let keep = |j: usize| skip.is_none_or(|s| !s[j]);
    let work = |(r, (qrow, scale)): (usize, (&mut [i8], &mut f32))| {
        let xrow = &x[r * cols..(r + 1) * cols];
        let max = xrow
            .iter()
            .enumerate()
            .filter(|(j, _)| keep(*j))
            .fold(0f32, |m, (_, v)| m.max(v.abs()));
        *scale = max;
        let inv = if max >= MIN_SCALE { 127.0 / max } else { 0.0 };
        for (j, (qv, &v)) in qrow.iter_mut().zip(xrow).enumerate() {
            *qv = if keep(j) {
                (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8
            } else {
                0
            };
        }
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

#[inline(always)]
fn dot_i8_generic(a: &[i8], b: &[i8]) -> i32 {
    // i16 products summed in 16-element i32 lanes: the shape LLVM turns into pmaddwd.
    let mut lanes = [0i32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..16 {
            lanes[l] += i32::from(i16::from(x[l]) * i16::from(y[l]));
        }
    }
    let tail: i32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum();
    lanes.iter().sum::<i32>() + tail
}

/// AVX2: 16 int8 widened to i16 and multiplied-added pairwise into 8 i32 lanes (vpmaddwd),
/// two accumulators per 32 elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_i8_avx2(a: &[i8], b: &[i8]) -> i32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc0 = _mm256_setzero_si256();
    let mut acc1 = _mm256_setzero_si256();
    let mut i = 0;
    while i + 32 <= n {
        // SAFETY: i + 32 <= n, so both 16-byte loads at i and i + 16 are in bounds.
        let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
        let a0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pa as *const __m128i));
        let b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pb as *const __m128i));
        let a1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pa.add(16) as *const __m128i));
        let b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pb.add(16) as *const __m128i));
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(a0, b0));
        acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(a1, b1));
        i += 32;
    }
    let mut lanes = [0i32; 8];
    _mm256_storeu_si256(
        lanes.as_mut_ptr() as *mut __m256i,
        _mm256_add_epi32(acc0, acc1),
    );
    lanes.iter().sum::<i32>() + dot_i8_generic(&a[i..n], &b[i..n])
}

/// sum_j a[j] * b[j] in exact int32 arithmetic (AVX2 when the CPU has it).
pub(crate) fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { dot_i8_avx2(a, b) };
        }
    }
    dot_i8_generic(a, b)
}

/// Which loop order computes the int32 products (both give identical sums).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Form {
    Gemm,
    Gemv,
}

/// acc (rows, outs) = CA @ CB^T in int32, both operands padded rows of `stride` int8.
pub(crate) fn int8_matmul(
    ca: &[i8],
    cb: &[i8],
    rows: usize,
    outs: usize,
    stride: usize,
    form: Form,
) -> Vec<i32> {
    let mut acc = vec![0i32; rows * outs];
    if rows == 0 || outs == 0 {
        return acc;
    }
    match form {
        Form::Gemm => {
            // Blocks of 16 rows: each weight row is streamed once per block.
            const BLOCK: usize = 16;
            acc.par_chunks_mut(BLOCK * outs)
                .enumerate()
                .for_each(|(b, chunk)| {
                    let r0 = b * BLOCK;
                    let n = chunk.len() / outs;
                    for o in 0..outs {
                        let w = &cb[o * stride..(o + 1) * stride];
                        for i in 0..n {
                            let a = &ca[(r0 + i) * stride..(r0 + i + 1) * stride];
                            chunk[i * outs + o] = dot_i8(a, w);
                        }
                    }
                });
        }
        Form::Gemv => {
            // Output features in parallel, weight rows streamed once; transposed after.
            const OCHUNK: usize = 64;
            let mut by_out = vec![0i32; outs * rows];
            by_out
                .par_chunks_mut(OCHUNK * rows)
                .enumerate()
                .for_each(|(c, chunk)| {
                    for (k, slot) in chunk.chunks_mut(rows).enumerate() {
                        let o = c * OCHUNK + k;
                        let w = &cb[o * stride..(o + 1) * stride];
                        for (r, s) in slot.iter_mut().enumerate() {
                            *s = dot_i8(&ca[r * stride..(r + 1) * stride], w);
                        }
                    }
                });
            for o in 0..outs {
                for r in 0..rows {
                    acc[r * outs + o] = by_out[o * rows + r];
                }
            }
        }
    }
    acc
}

/// Inputs of the output stage.
pub(crate) struct Epilogue<'a> {
    pub x: &'a [f32],
    pub cols: usize,
    pub sca: &'a [f32],
    pub cb: &'a [i8],
    pub scb: &'a [f32],
    pub stride: usize,
    pub outliers: &'a [u32],
    pub bias: Option<&'a [f32]>,
}

/// y[r, o] = acc * (SCA[r] * SCB[o] / 127^2) + sum over outliers of f16(x) * f16(dequant(w))
/// (products exact in f32, summed in ascending column order) + bias[o].
pub(crate) fn epilogue(acc: &[i32], rows: usize, outs: usize, e: &Epilogue<'_>) -> Vec<f32> {
    let n_out = e.outliers.len();
    // (outs, n_out): the f16-rounded dequantized weights of the outlier columns.
    let wo: Vec<f32> = (0..outs)
        .flat_map(|o| {
            e.outliers
                .iter()
                .map(move |&j| round_f16(dequant(e.cb[o * e.stride + j as usize], e.scb[o])))
        })
        .collect();
    let mut y = vec![0f32; rows * outs];
    y.par_chunks_mut(outs.max(1))
        .enumerate()
        .for_each(|(r, yrow)| {
            let xo: Vec<f32> = e
                .outliers
                .iter()
                .map(|&j| round_f16(e.x[r * e.cols + j as usize]))
                .collect();
            for (o, yv) in yrow.iter_mut().enumerate() {
                let mut f = 0f32;
                for (xv, wv) in xo.iter().zip(&wo[o * n_out..(o + 1) * n_out]) {
                    f += xv * wv;
                }
                let mut v = acc[r * outs + o] as f32 * (e.sca[r] * e.scb[o] / 16129.0) + f;
                if let Some(b) = e.bias {
                    v += b[o];
                }
                *yv = v;
            }
        });
    y
}

/// dx (rows, cols) = dy (rows, outs) @ dequant(W), accumulated in f32. Row blocks in
/// parallel; each weight row is dequantized once per block into a small buffer (never the
/// whole weight).
pub(crate) fn backward_dx(
    dy: &[f32],
    cb: &[i8],
    scb: &[f32],
    rows: usize,
    outs: usize,
    cols: usize,
    stride: usize,
) -> Vec<f32> {
    const BLOCK: usize = 16;
    let mut dx = vec![0f32; rows * cols];
    if cols == 0 {
        return dx;
    }
    dx.par_chunks_mut(BLOCK * cols)
        .enumerate()
        .for_each(|(b, chunk)| {
            let r0 = b * BLOCK;
            let mut w = vec![0f32; cols];
            for o in 0..outs {
                for (wv, &q) in w.iter_mut().zip(&cb[o * stride..o * stride + cols]) {
                    *wv = dequant(q, scb[o]);
                }
                for (i, dxrow) in chunk.chunks_mut(cols).enumerate() {
                    let g = dy[(r0 + i) * outs + o];
                    if g != 0.0 {
                        for (d, wv) in dxrow.iter_mut().zip(&w) {
                            *d += g * wv;
                        }
                    }
                }
            }
        });
    dx
}
