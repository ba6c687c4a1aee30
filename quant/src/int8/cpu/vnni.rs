//! The AVX-512 VNNI path of the few-rows int8 products.

use std::arch::x86_64::*;

use super::gemm::{reduce8, row_blocks, store_pair, Columns};

/// Columns first..first + n of `out` = w (n, stride) @ x^T. `x`: rows + 1 prepared
/// rows of `k` bytes (the first one all ones), taken in panels of at most
/// [`super::gemm::PANEL_BYTES`].
///
/// # Safety
/// The CPU has AVX-512F, AVX-512 VNNI and AVX2; the task owns those columns.
#[target_feature(enable = "avx512f,avx512vnni,avx2")]
pub(super) unsafe fn weight_rows(
    x: &[u8],
    rows: usize,
    k: usize,
    w: &[i8],
    stride: usize,
    first: usize,
    out: Columns,
) {
    let n = w.len() / stride;
    // 128 * sum(w) per weight row, from the ones row of the first panel.
    let mut correction = vec![0i32; n];
    let max_panel = (super::gemm::PANEL_BYTES / k).max(6);
    let mut sums = vec![0i32; 2 * max_panel];
    for (p0, len) in row_blocks(rows + 1, max_panel) {
        // Prepared row p0 + q is x row p0 + q - 1 (row 0: the ones).
        let skip = usize::from(p0 == 0);
        for o in (0..n).step_by(2) {
            let w0 = &w[o * stride..(o + 1) * stride];
            // A lone last row is paired with itself.
            let w1 = if o + 1 < n {
                &w[(o + 1) * stride..(o + 2) * stride]
            } else {
                w0
            };
            let (s0, s1) = sums.split_at_mut(max_panel);
            super::gemm::prefetch(w.as_ptr().wrapping_add((o + 2) * stride), 2 * stride);
            for (i, r) in row_blocks(len, 6) {
                // SAFETY: x holds rows + 1 rows of k >= stride bytes; the block's rows
                // p0 + i.. p0 + i + r are among them.
                unsafe { block(&x[(p0 + i) * k..], k, w0, w1, r, &mut s0[i..], &mut s1[i..]) };
            }
            for (j, s) in [s0, s1].into_iter().enumerate().take(n - o) {
                if skip == 1 {
                    correction[o + j] = s[0].wrapping_mul(128);
                }
                // x . w = (x + 128) . w - 128 * sum(w), in wrapping i32 like the lanes.
                let s = &mut s[skip..len];
                for v in s.iter_mut() {
                    *v = v.wrapping_sub(correction[o + j]);
                }
                // SAFETY: the task owns this column (the caller's contract).
                unsafe { out.write(first + o + j, (p0 + skip) - 1, s) };
            }
        }
    }
}

/// Dispatches a block of `r` (1..=6) x rows to its monomorphized kernel.
#[target_feature(enable = "avx512f,avx512vnni,avx2")]
#[inline]
unsafe fn block(
    x: &[u8],
    k: usize,
    w0: &[i8],
    w1: &[i8],
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
            4 => block_n::<4>(x, k, w0, w1, out0, out1),
            5 => block_n::<5>(x, k, w0, w1, out0, out1),
            _ => block_n::<6>(x, k, w0, w1, out0, out1),
        }
    }
}

/// R x rows (u8, `k` bytes apart in `x`) by weight rows w0 and w1 (i8, `stride` bytes, a
/// multiple of 4): 2R accumulators of 16 i32 lanes; the tail of the weight rows is
/// loaded with a dword mask (zeros past the row).
#[target_feature(enable = "avx512f,avx512vnni,avx2")]
#[inline]
unsafe fn block_n<const R: usize>(
    x: &[u8],
    k: usize,
    w0: &[i8],
    w1: &[i8],
    out0: &mut [i32],
    out1: &mut [i32],
) {
    let stride = w0.len();
    // The bounds every load below relies on (one compare per block, not per load).
    assert!(x.len() >= R * k && k >= stride.next_multiple_of(64) && w1.len() == stride);
    let full = stride / 64;
    let mask: __mmask16 = ((1u32 << ((stride % 64) / 4)) - 1) as __mmask16;
    let xp = x.as_ptr();
    let (p0, p1) = (w0.as_ptr(), w1.as_ptr());
    let mut a0 = [_mm512_setzero_si512(); R];
    let mut a1 = [_mm512_setzero_si512(); R];
    for c in 0..full {
        let at = c * 64;
        // SAFETY: at + 64 <= stride: inside both weight rows; inside each x row (k bytes).
        unsafe {
            let u = _mm512_loadu_si512(p0.add(at).cast());
            let v = _mm512_loadu_si512(p1.add(at).cast());
            for r in 0..R {
                let xv = _mm512_loadu_si512(xp.add(r * k + at).cast());
                a0[r] = _mm512_dpbusd_epi32(a0[r], xv, u);
                a1[r] = _mm512_dpbusd_epi32(a1[r], xv, v);
            }
        }
    }
    if mask != 0 {
        let at = full * 64;
        // SAFETY: the masked loads touch only the dwords before `stride`; each x row
        // holds k >= at + 64 bytes (the assert above).
        unsafe {
            let u = _mm512_maskz_loadu_epi32(mask, p0.add(at).cast());
            let v = _mm512_maskz_loadu_epi32(mask, p1.add(at).cast());
            for r in 0..R {
                let xv = _mm512_loadu_si512(xp.add(r * k + at).cast());
                a0[r] = _mm512_dpbusd_epi32(a0[r], xv, u);
                a1[r] = _mm512_dpbusd_epi32(a1[r], xv, v);
            }
        }
    }
    let fold =
        |v: __m512i| _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v));
    let zero = _mm256_setzero_si256();
    for first in (0..R).step_by(4) {
        let r = (R - first).min(4);
        let mut v = [zero; 8];
        for j in 0..r {
            v[j] = fold(a0[first + j]);
            v[4 + j] = fold(a1[first + j]);
        }
        store_pair(reduce8(v), r, &mut out0[first..], &mut out1[first..]);
    }
}
