//! The exponentials of the softmax family, vectorized on the CPU.
//!
//! Softmax, log-softmax and cross-entropy exponentiate every logit: 19 million per SFT step
//! of SmolLM2 at 16 x 24 tokens. libm's `expf` is a scalar call (~4 ns); the kernels here take
//! `exp(x - max)` over a row in SIMD lanes. They only ever see arguments <= 0 (a row minus its
//! maximum), which is the domain of [`exp_nonpositive`]: Cody-Waite range reduction to
//! r in [-ln2/2, ln2/2], a degree-6 polynomial for e^r, and the power of two put in the
//! exponent bits. Relative error is within 2 ulp of the correctly rounded value (tested over
//! the domain against f64); below -87.33 (where exp leaves the normal range) the result is 0.
//!
//! The loops are written with 16 independent lanes so the compiler vectorizes them; on x86
//! the AVX-512 or AVX2 + FMA build of each loop is picked at run time, the baseline build
//! elsewhere. That mechanism, the `dispatched!` macro, also serves the activations, the norms
//! and dropout's mask (the workspace itself builds for baseline x86-64, i.e. SSE2).

/// Lanes per step of the row loops (one AVX-512 register, two AVX2 ones).
const LANES: usize = 16;

/// exp(x) for x <= 0 (positive x are not in the domain); -inf and x < -87.33 give 0, NaN
/// gives NaN.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in few bits and the rest (Cody-Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without SSE4.1.
    const ROUND: f32 = 12_582_912.0;
    const MIN_ARG: f32 = -87.336_55;
    let xc = if x < MIN_ARG { MIN_ARG } else { x };
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // e^r on [-ln2/2, ln2/2] (Cephes' minimax coefficients for expf).
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // 2^n with n in [-126, 0]: the biased exponent n + 127 is in [1, 127].
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = er * scale;
    if x < MIN_ARG {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// Defines `$name(args) -> ret` that runs `$body` (an `#[inline(always)]` function, inlined
/// into each build) through the widest build the CPU runs: AVX-512, AVX2 + FMA, or the
/// baseline. Used by the vectorized loops here and in `unary.rs`.
macro_rules! dispatched {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the build was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use dispatched;

#[inline(always)]
fn max_body(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let mut m = tail.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for a in acc {
        m = m.max(a);
    }
    m
}

#[inline(always)]
fn exp_shift_sum_body(row: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
            *x = exp_nonpositive(*x - m);
            *a += *x;
        }
    }
    let mut s = 0f32;
    for x in chunks.into_remainder() {
        *x = exp_nonpositive(*x - m);
        s += *x;
    }
    acc.iter().sum::<f32>() + s
}

/// The entropy pass of a row: row[i] = e_i = exp(row[i] - m) in place; returns
/// (sum e_i, sum e_i (x_i - m)), from which the entropy is ln(s) - t / s.
#[inline(always)]
fn exp_shift_sum_dot_body(row: &mut [f32], m: f32) -> (f32, f32) {
    let (mut acc, mut dot) = ([0f32; LANES], [0f32; LANES]);
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for ((a, t), x) in acc.iter_mut().zip(dot.iter_mut()).zip(c.iter_mut()) {
            let d = *x - m;
            *x = exp_nonpositive(d);
            *a += *x;
            *t += *x * d;
        }
    }
    let (mut s, mut t) = (0f32, 0f32);
    for x in chunks.into_remainder() {
        let d = *x - m;
        *x = exp_nonpositive(d);
        s += *x;
        t += *x * d;
    }
    (acc.iter().sum::<f32>() + s, dot.iter().sum::<f32>() + t)
}

#[inline(always)]
fn sum_exp_shift_body(row: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += exp_nonpositive(x - m);
        }
    }
    let s: f32 = tail.iter().map(|&x| exp_nonpositive(x - m)).sum();
    acc.iter().sum::<f32>() + s
}

#[inline(always)]
fn scale_body(row: &mut [f32], k: f32) {
    for x in row.iter_mut() {
        *x *= k;
    }
}

dispatched!(
    /// The maximum of a row, NaNs ignored as by `f32::max` (-inf when empty); a NaN then
    /// reaches the sums through `exp(NaN - m)`.
    pub(crate) fn row_max(row: &[f32]) -> f32 = max_body
);
dispatched!(
    /// row[i] = exp(row[i] - m) in place; returns the sum. `m` must be >= every element
    /// (the row's maximum).
    pub(crate) fn exp_shift_sum(row: &mut [f32], m: f32) -> f32 = exp_shift_sum_body
);
dispatched!(
    /// row[i] = exp(row[i] - m) in place; returns (sum_i exp(row[i] - m), sum_i exp(row[i]
    /// - m) (row[i] - m)) for `m` >= every element: the softmax's normaliser and what its
    /// entropy needs.
    pub(crate) fn exp_shift_sum_dot(row: &mut [f32], m: f32) -> (f32, f32) = exp_shift_sum_dot_body
);
dispatched!(
    /// sum_i exp(row[i] - m), for `m` >= every element (the row's maximum).
    pub(crate) fn sum_exp_shift(row: &[f32], m: f32) -> f32 = sum_exp_shift_body
);
dispatched!(
    /// row[i] *= k.
    pub(crate) fn scale(row: &mut [f32], k: f32) -> () = scale_body
);

/// log(sum(exp(row))) computed around the row maximum (NaN when the row holds a NaN or is
/// all -inf, -inf when empty).
pub(crate) fn row_log_sum_exp(row: &[f32]) -> f32 {
    let m = row_max(row);
    m + sum_exp_shift(row, m).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_over_the_domain() {
        let mut worst = 0;
        let mut x = 0.0f32;
        // Every 97th f32 from 0 down to the flush point, plus the ends.
        let mut bits = 0x8000_0000u32;
        while x >= -87.33 {
            let want = (x as f64).exp() as f32;
            let got = exp_nonpositive(x);
            worst = worst.max(ulps(got, want));
            bits += 97;
            x = f32::from_bits(bits);
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    #[test]
    fn row_kernels_match_scalar_loops() {
        for len in [0usize, 1, 15, 16, 17, 100, 49_157] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 1000) as f32 * 0.013 - 6.0)
                .collect();
            let want_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(row_max(&row), want_max);
            if len == 0 {
                continue;
            }
            let want_sum: f64 = row.iter().map(|&x| ((x - want_max) as f64).exp()).sum();
            let s = sum_exp_shift(&row, want_max);
            assert!((s as f64 - want_sum).abs() <= 1e-5 * want_sum, "{len}");
            let mut out = row.clone();
            let s2 = exp_shift_sum(&mut out, want_max);
            assert!((s2 as f64 - want_sum).abs() <= 1e-5 * want_sum, "{len}");
            for (o, &x) in out.iter().zip(&row) {
                assert!(ulps(*o, ((x - want_max) as f64).exp() as f32) <= 2);
            }
            let lse = row_log_sum_exp(&row) as f64;
            assert!((lse - (want_max as f64 + want_sum.ln())).abs() < 1e-5);
        }
        let mut with_nan = vec![1.0f32; 40];
        with_nan[33] = f32::NAN;
        assert_eq!(row_max(&with_nan), 1.0);
        assert!(row_log_sum_exp(&with_nan).is_nan());
        assert!(row_log_sum_exp(&[f32::NEG_INFINITY; 3]).is_nan());
        assert_eq!(row_log_sum_exp(&[]), f32::NEG_INFINITY);
    }
}
