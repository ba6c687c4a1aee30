//! The AVX2 path of the few-rows int8 products.

use std::arch::x86_64::*;

use super::gemm::{reduce8, row_blocks, store_pair, Columns};

/// Columns first..first + n of `out` = w (n, stride) @ x^T. `x`: rows of `k` i16 (zero
/// padded).
///
/// # Safety
/// The CPU has AVX2; the task owns those columns.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn weight_rows(
    x: &[i16],
    rows: usize,
    k: usize,
    w: &[i8],
    stride: usize,
    first: usize,
    out: Columns,
) {
    let n = w.len() / stride;
    // The pair of weight rows widened to i16 (zero padded to k).
    let mut wide = vec![0i16; 2 * k];
    let max_panel = (super::gemm::PANEL_BYTES / (2 * k)).max(4);
    let mut sums = vec![0i32; 2 * max_panel];
    for (p0, len) in row_blocks(rows, max_panel) {
        for o in (0..n).step_by(2) {
            let pair = (n - o).min(2);
            super::gemm::prefetch(w.as_ptr().wrapping_add((o + 2) * stride), 2 * stride);
            for (j, dst) in wide.chunks_mut(k).enumerate() {
                let src = &w[(o + j.min(pair - 1)) * stride..][..stride];
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = i16::from(s);
                }
            }
            let (w0, w1) = wide.split_at(k);
            let (s0, s1) = sums.split_at_mut(max_panel);
            for (i, r) in row_blocks(len, 4) {
                // SAFETY: x holds `rows` rows of k i16; p0 + i + r <= rows.
                unsafe { block(&x[(p0 + i) * k..], k, w0, w1, r, &mut s0[i..], &mut s1[i..]) };
            }
            for (j, s) in [s0, s1].into_iter().enumerate().take(pair) {
                // SAFETY: the task owns this column (the caller's contract).
                unsafe { out.write(first + o + j, p0, &s[..len]) };
            }
        }
    }
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block(
    x: &[i16],
    k: usize,
    w0: &[i16],
    w1: &[i16],
    r: usize,
    out0: &mut [i32],
    out1: &mut [i32],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match r {
            1 => block_n::<1>(x, k, w0, w1, out0, out1),
            2 => block_n::<2>(x, k, w0, w1, out0, out1),
            3 => block_n::<3>(x, k, w0, w1, out0, out1),
            _ => block_n::<4>(x, k, w0, w1, out0, out1),
        }
    }
}

/// R x rows by 2 widened weight rows, all of `k` i16 (a multiple of 16): 2R
/// accumulators of 8 i32 lanes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block_n<const R: usize>(
    x: &[i16],
    k: usize,
    w0: &[i16],
    w1: &[i16],
    out0: &mut [i32],
    out1: &mut [i32],
) {
    // The bounds every load below relies on.
    assert!(x.len() >= R * k && k.is_multiple_of(16) && w0.len() >= k && w1.len() >= k);
    let xp = x.as_ptr();
    let (p0, p1) = (w0.as_ptr(), w1.as_ptr());
    let mut a0 = [_mm256_setzero_si256(); R];
    let mut a1 = [_mm256_setzero_si256(); R];
    for at in (0..k).step_by(16) {
        // SAFETY: at + 16 <= k: inside the widened weight rows and each x row.
        unsafe {
            let u = _mm256_loadu_si256(p0.add(at).cast());
            let v = _mm256_loadu_si256(p1.add(at).cast());
            for r in 0..R {
                let xv = _mm256_loadu_si256(xp.add(r * k + at).cast());
                a0[r] = _mm256_add_epi32(a0[r], _mm256_madd_epi16(xv, u));
                a1[r] = _mm256_add_epi32(a1[r], _mm256_madd_epi16(xv, v));
            }
        }
    }
    let mut v = [_mm256_setzero_si256(); 8];
    v[..R].copy_from_slice(&a0);
    v[4..4 + R].copy_from_slice(&a1);
    store_pair(reduce8(v), R, out0, out1);
}
