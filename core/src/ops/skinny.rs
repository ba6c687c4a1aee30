//! CPU product of a few rows with a transposed weight: out (M, N) = x (M, K) @ w (N, K)^T for
//! small M — decoding (one token per sequence) and short batches through a linear layer.
//!
//! A general GEMM packs w into panels before multiplying; with a handful of rows that packing
//! costs as much as the product and the weight is read twice. Here each weight row is read
//! once, straight from memory, and dotted with every x row while it is in L1 (the x rows stay
//! in L1/L2: M * K * 4 bytes). Threads split the weight rows.

use rayon::prelude::*;

/// Rows of x up to which [`matmul_bt_rows`] beats the packed GEMM (measured on SmolLM2's
/// shapes: at 64 rows the two are level).
pub(crate) const MAX_ROWS: usize = 32;

/// Weight rows per rayon task: enough work to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 32;

/// out (m, n) = x (m, k) @ w (n, k)^T, both row-major.
pub(crate) fn matmul_bt_rows(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    debug_assert!(x.len() >= m * k && w.len() >= n * k);
    // Computed as out^T (n, m): each task owns whole weight rows, so it writes one
    // contiguous block; transposed at the end (m * n values, cheap next to the product).
    let mut by_weight_row = vec![0.0f32; n * m];
    if m == 0 || n == 0 {
        return by_weight_row;
    }
    let task = |(t, block): (usize, &mut [f32])| {
        let first = t * ROWS_PER_TASK;
        let rows = block.len() / m;
        let mut j = 0;
        // Two weight rows at a time: each x load feeds two FMAs.
        while j + 2 <= rows {
            let (out0, out1) = block[j * m..(j + 2) * m].split_at_mut(m);
            let w0 = &w[(first + j) * k..(first + j + 1) * k];
            let w1 = &w[(first + j + 1) * k..(first + j + 2) * k];
            dot_rows_pair(x, w0, w1, m, k, out0, out1);
            j += 2;
        }
        if j < rows {
            let row = &w[(first + j) * k..(first + j + 1) * k];
            dot_rows(x, row, m, k, &mut block[j * m..(j + 1) * m]);
        }
    };
    if n * m * k < 1 << 16 {
        by_weight_row
            .chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(task);
    } else {
        by_weight_row
            .par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(task);
    }
    if m == 1 {
        return by_weight_row;
    }
    let mut out = vec![0.0f32; m * n];
    for (j, column) in by_weight_row.chunks(m).enumerate() {
        for (i, &v) in column.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}

/// out[i] = x[i] . row for each of the m rows of x (k values each).
fn dot_rows(x: &[f32], row: &[f32], m: usize, k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { dot_rows_avx2(x, row, m, k, out) };
            return;
        }
    }
    for (i, o) in out.iter_mut().enumerate().take(m) {
        *o = dot_generic(&x[i * k..(i + 1) * k], row);
    }
}

/// out0[i] = x[i] . w0 and out1[i] = x[i] . w1 for the m rows of x.
fn dot_rows_pair(
    x: &[f32],
    w0: &[f32],
    w1: &[f32],
    m: usize,
    k: usize,
    out0: &mut [f32],
    out1: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { dot_rows_pair_avx2(x, w0, w1, m, k, out0, out1) };
            return;
        }
    }
    dot_rows(x, w0, m, k, out0);
    dot_rows(x, w1, m, k, out1);
}

/// Eight partial sums so the loop vectorises without reassociating one long sum.
fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] = x[l].mul_add(y[l], lanes[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// AVX2 + FMA: 4 x rows by 2 weight rows, 8 accumulators; per 8 columns 6 loads feed 8
/// FMAs (the one-row kernel needs 5 loads for 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_pair_avx2(
    x: &[f32],
    w0: &[f32],
    w1: &[f32],
    m: usize,
    k: usize,
    out0: &mut [f32],
    out1: &mut [f32],
) {
    use std::arch::x86_64::*;
    let body = k - k % 8;
    let hsum = |v: __m256| {
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 f32, the width of one unaligned 256-bit store.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes.iter().sum::<f32>()
    };
    let tail = |i: usize, w: &[f32]| -> f32 {
        x[i * k + body..(i + 1) * k]
            .iter()
            .zip(&w[body..])
            .map(|(a, b)| a * b)
            .sum()
    };
    let mut i = 0;
    while i + 4 <= m {
        let xs = [
            x[i * k..].as_ptr(),
            x[(i + 1) * k..].as_ptr(),
            x[(i + 2) * k..].as_ptr(),
            x[(i + 3) * k..].as_ptr(),
        ];
        let mut acc0 = [_mm256_setzero_ps(); 4];
        let mut acc1 = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        while c < body {
            // SAFETY: c + 8 <= body <= k, inside both weight rows and the 4 x rows.
            unsafe {
                let a = _mm256_loadu_ps(w0.as_ptr().add(c));
                let b = _mm256_loadu_ps(w1.as_ptr().add(c));
                for r in 0..4 {
                    let xv = _mm256_loadu_ps(xs[r].add(c));
                    acc0[r] = _mm256_fmadd_ps(xv, a, acc0[r]);
                    acc1[r] = _mm256_fmadd_ps(xv, b, acc1[r]);
                }
            }
            c += 8;
        }
        for r in 0..4 {
            out0[i + r] = hsum(acc0[r]) + tail(i + r, w0);
            out1[i + r] = hsum(acc1[r]) + tail(i + r, w1);
        }
        i += 4;
    }
    if i < m {
        // SAFETY: the caller checked AVX2 and FMA.
        unsafe {
            dot_rows_avx2(&x[i * k..], w0, m - i, k, &mut out0[i..]);
            dot_rows_avx2(&x[i * k..], w1, m - i, k, &mut out1[i..]);
        }
    }
}

/// AVX2 + FMA: four x rows at a time share each 8-wide load of the weight row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2(x: &[f32], row: &[f32], m: usize, k: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let body = k - k % 8;
    let hsum = |v: __m256| {
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 f32, the width of one unaligned 256-bit store.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes.iter().sum::<f32>()
    };
    let tail = |i: usize| -> f32 {
        x[i * k + body..(i + 1) * k]
            .iter()
            .zip(&row[body..])
            .map(|(a, b)| a * b)
            .sum()
    };
    let mut i = 0;
    while i + 4 <= m {
        let xs = [
            x[i * k..].as_ptr(),
            x[(i + 1) * k..].as_ptr(),
            x[(i + 2) * k..].as_ptr(),
            x[(i + 3) * k..].as_ptr(),
        ];
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        while c < body {
            // SAFETY: c + 8 <= body <= k, inside the weight row and each of the 4 x rows.
            unsafe {
                let wv = _mm256_loadu_ps(row.as_ptr().add(c));
                for r in 0..4 {
                    acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xs[r].add(c)), wv, acc[r]);
                }
            }
            c += 8;
        }
        for r in 0..4 {
            out[i + r] = hsum(acc[r]) + tail(i + r);
        }
        i += 4;
    }
    while i < m {
        let xr = x[i * k..].as_ptr();
        let mut acc = _mm256_setzero_ps();
        let mut c = 0;
        while c < body {
            // SAFETY: c + 8 <= body <= k, inside the weight row and x row i.
            unsafe {
                acc = _mm256_fmadd_ps(
                    _mm256_loadu_ps(xr.add(c)),
                    _mm256_loadu_ps(row.as_ptr().add(c)),
                    acc,
                );
            }
            c += 8;
        }
        out[i] = hsum(acc) + tail(i);
        i += 1;
    }
}
