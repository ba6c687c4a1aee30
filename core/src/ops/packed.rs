//! Frozen weights packed once for the CPU forward product: out (M, N) = x (M, K) @ Wᵀ, with
//! W (N, K) as torch's `nn.Linear` stores it.
//!
//! The gemm crate computes a row-major product as its transpose, W @ xᵀ, so W is its left
//! operand read down columns: it packs the whole weight into row panels on every call. For a
//! frozen weight those are the same panels every forward (a profile of a PPO step put 17% of
//! the CPU time in that packing, and SmolLM2's products at 68 rows run at 28-72 GFLOP/s with
//! W (N, K) against 94-158 with W stored (K, N)). Here W is packed once, at load, into panels
//! of [`NR`] output columns, each (K, NR) contiguous, and an AVX-512 kernel multiplies `MR`
//! (12) rows of x by a panel, K in blocks of at most `KC` (768) so that a panel's block stays
//! in L2 while the row tiles go by and each output is stored once or twice.
//!
//! The panels are a second copy of the weight ([`PackedWeight::bytes`]; the memory plan and
//! the bench count it). The backward's input gradient dy @ W needs none: W's column blocks,
//! read in place at W's row stride, are panels for the same kernel
//! (`matmul_row_major_b`). Without AVX-512 nothing is packed and the gemm crate does it all.

use rayon::prelude::*;

/// Output columns per panel: two 16-lane vectors.
pub const NR: usize = 32;
/// Rows of x per tile: 2 x 12 accumulators, 2 panel loads and 12 broadcasts per k step.
const MR: usize = 12;
/// Inner-dim block: a panel's block (KC x NR floats, 96 KiB) stays in L2 for every row tile.
const KC: usize = 768;
/// Panel rows fetched ahead of use by the first row tile over a panel block. Measured on
/// 68-row products cycling through 400 MiB of SmolLM2-shaped weights (cold, as a model's
/// weights are), runs interleaved with and without: packed +15-25%, read in place +20-40%;
/// products whose weights are in cache unchanged; a PPO step 6.1 -> 5.5-5.7 s.
const PREFETCH_ROWS: usize = 16;
/// Products under this many multiply-adds run on the calling thread.
const SERIAL_MAX_WORK: usize = 1 << 18;

/// A frozen (N, K) weight in panels of [`NR`] columns: `panels[(j * K + p) * NR + c]` =
/// `W[j * NR + c][p]`, zero where `j * NR + c >= N`.
#[derive(Debug)]
pub struct PackedWeight {
    n: usize,
    k: usize,
    panels: Vec<f32>,
}

impl PackedWeight {
    /// W (n, k) row-major in panels, or `None` where this CPU has no kernel for them
    /// (no AVX-512): the product then stays with the gemm crate.
    pub(crate) fn pack(w: &[f32], n: usize, k: usize) -> Option<PackedWeight> {
        if !kernel_available() || n == 0 || k == 0 || w.len() != n * k {
            return None;
        }
        let panel_len = k * NR;
        let mut panels = vec![0f32; n.div_ceil(NR) * panel_len];
        panels
            .par_chunks_mut(panel_len)
            .enumerate()
            .for_each(|(j, panel)| {
                let first = j * NR;
                for c in 0..NR.min(n - first) {
                    let row = &w[(first + c) * k..(first + c + 1) * k];
                    for (p, &v) in row.iter().enumerate() {
                        panel[p * NR + c] = v;
                    }
                }
            });
        Some(PackedWeight { n, k, panels })
    }

    /// Output columns N.
    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Inner dim K.
    pub fn in_features(&self) -> usize {
        self.k
    }

    /// Bytes the panels hold (N rounded up to a whole panel).
    pub fn bytes(&self) -> usize {
        self.panels.len() * std::mem::size_of::<f32>()
    }

    /// x (m, K) @ Wᵀ -> (m, N), both row-major. The output is never zero-filled.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(m * self.n);
        // SAFETY: `out` has room for m x n values, all of which `write` stores.
        unsafe {
            self.write(x, m, out.as_mut_ptr());
            out.set_len(m * self.n);
        }
        out
    }

    /// out (m, N) = x (m, K) @ Wᵀ into the first m * N values of `out` (a reused buffer).
    pub(crate) fn matmul_into(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert!(out.len() >= m * self.n, "packed matmul: short output");
        // SAFETY: checked just above.
        unsafe { self.write(x, m, out.as_mut_ptr()) };
    }

    /// Stores every one of the m x N outputs at `out` (row-major): the first K block stores,
    /// the rest accumulate, so `out` may point at uninitialised memory.
    ///
    /// # Safety
    /// `out` is valid for m * N writes.
    unsafe fn write(&self, x: &[f32], m: usize, out: *mut f32) {
        let panels = Panels {
            base: self.panels.as_ptr(),
            panel_step: self.k * NR,
            row_stride: NR,
            n: self.n,
            k: self.k,
        };
        // SAFETY: the panels hold ceil(n / NR) blocks of k rows of NR; `out` as the caller
        // says.
        unsafe { panels.product(x, m, out) }
    }
}

/// out (m, N) = x (m, K) @ b (K, N) for a row-major b read in place, through the packed
/// kernel: b's column block j (its K rows of [`NR`] values at stride N) is a panel as it
/// stands. For a frozen weight W (N', K') the backward's input gradient dy @ W is this
/// product with b = W, so it needs no second copy; `None` where this CPU has no kernel.
pub(crate) fn matmul_row_major_b(
    x: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    if !kernel_available() || k == 0 || n == 0 || x.len() < m * k || b.len() < k * n {
        return None;
    }
    let panels = Panels {
        base: b.as_ptr(),
        panel_step: NR,
        row_stride: n,
        n,
        k,
    };
    let mut out = Vec::with_capacity(m * n);
    // SAFETY: b holds k rows of n; the kernel masks the loads of the last, partial column
    // block; `out` has room for m * n values, all of which the product stores.
    unsafe {
        panels.product(x, m, out.as_mut_ptr());
        out.set_len(m * n);
    }
    Some(out)
}

/// Where the kernel finds its panels: panel j's row p (NR values, the last panel's first
/// `n % NR` valid) starts at `base + j * panel_step + p * row_stride`.
struct Panels {
    base: *const f32,
    panel_step: usize,
    row_stride: usize,
    n: usize,
    k: usize,
}

// SAFETY: the panels are only read, by tasks that each write their own block of out.
unsafe impl Sync for Panels {}

impl Panels {
    /// out (m, n) = x (m, k) @ the panels, every output stored.
    ///
    /// # Safety
    /// The panels' rows are readable as described (the valid columns of each), `out` is
    /// valid for m * n writes, the CPU has the kernel.
    unsafe fn product(&self, x: &[f32], m: usize, out: *mut f32) {
        let (n, k) = (self.n, self.k);
        assert!(
            x.len() >= m * k,
            "packed matmul: x holds {} < {m} x {k}",
            x.len()
        );
        if m == 0 {
            return;
        }
        let n_panels = n.div_ceil(NR);
        let row_tiles = m.div_ceil(MR);
        // Tasks: panel groups x row groups, about four per thread so that uneven shares
        // balance; each task owns whole output blocks (disjoint rows x columns).
        let threads = if m * n * k <= SERIAL_MAX_WORK {
            1
        } else {
            rayon::current_num_threads()
        };
        let target = threads * 4;
        let panels_per = n_panels.div_ceil(n_panels.min(target));
        let panel_groups = n_panels.div_ceil(panels_per);
        let tiles_per = row_tiles.div_ceil(target.div_ceil(panel_groups).min(row_tiles));
        let row_groups = row_tiles.div_ceil(tiles_per);
        let out_ptr = SharedOut(out);
        let task = |t: usize| {
            let (g, h) = (t / row_groups, t % row_groups);
            let panels = g * panels_per..((g + 1) * panels_per).min(n_panels);
            let rows = h * tiles_per * MR..((h + 1) * tiles_per * MR).min(m);
            // SAFETY: tasks cover disjoint (rows, panels) blocks of out, every pointer below
            // stays inside x (m, k), the panels and out (m, n).
            unsafe { self.block(x, rows, panels, &out_ptr) };
        };
        let tasks = panel_groups * row_groups;
        if threads == 1 {
            (0..tasks).for_each(task);
        } else {
            (0..tasks).into_par_iter().for_each(task);
        }
    }

    /// Rows `rows` of out for the panels `panels`, K block by K block.
    ///
    /// # Safety
    /// As [`Panels::product`]; no other thread writes these rows x panel columns of out
    /// meanwhile.
    unsafe fn block(
        &self,
        x: &[f32],
        rows: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
        out: &SharedOut,
    ) {
        let (n, k) = (self.n, self.k);
        // K in equal blocks of at most KC.
        let block_len = k.div_ceil(k.div_ceil(KC));
        for p0 in (0..k).step_by(block_len) {
            let kc = block_len.min(k - p0);
            for j in panels.clone() {
                let panel = self
                    .base
                    .wrapping_add(j * self.panel_step + p0 * self.row_stride);
                let cols = NR.min(n - j * NR);
                let mut i = rows.start;
                while i < rows.end {
                    let r = MR.min(rows.end - i);
                    let xt = x[i * k + p0..].as_ptr();
                    // SAFETY: row i < m, column j * NR < n of out.
                    let ot = unsafe { out.0.add(i * n + j * NR) };
                    let tile = Tile {
                        x: xt,
                        x_rs: k,
                        panel,
                        panel_rs: self.row_stride,
                        kc,
                        out: ot,
                        out_rs: n,
                        cols,
                        accumulate: p0 > 0,
                        // Only the first row tile over a panel block reads it from memory
                        // (a frozen weight is cold: a model's weights do not fit the cache);
                        // the others find it in cache.
                        prefetch: i == rows.start,
                    };
                    // SAFETY: r rows of x from row i at stride k (kc values each from
                    // column p0), kc panel rows with `cols` valid values, r output rows of
                    // n from column j * NR holding `cols` values.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        tile_avx512_dispatch(r, &tile)
                    };
                    i += r;
                }
            }
        }
    }
}

/// One tile's operands: R rows of x (kc values each, at stride x_rs), kc panel rows (at
/// stride panel_rs, `cols` of NR valid), R output rows (at stride out_rs).
struct Tile {
    x: *const f32,
    x_rs: usize,
    panel: *const f32,
    panel_rs: usize,
    kc: usize,
    out: *mut f32,
    out_rs: usize,
    cols: usize,
    accumulate: bool,
    /// Fetch the panel's rows [`PREFETCH_ROWS`] ahead of use.
    prefetch: bool,
}

/// The output pointer shared by the tasks, each writing its own block.
struct SharedOut(*mut f32);
// SAFETY: the tasks of `matmul_into` write disjoint blocks through it.
unsafe impl Sync for SharedOut {}

/// Whether this CPU runs the packed kernel.
pub fn kernel_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`tile_avx512`] for `r` (1..=MR) rows.
///
/// # Safety
/// As [`tile_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512_dispatch(r: usize, tile: &Tile) {
    macro_rules! rows {
        ($($n:literal)*) => {
            match (r, tile.prefetch) {
                $(
                    ($n, false) => unsafe { tile_avx512::<$n, false>(tile) },
                    ($n, true) => unsafe { tile_avx512::<$n, true>(tile) },
                )*
                _ => unreachable!("a tile has 1..=MR rows"),
            }
        };
    }
    rows!(1 2 3 4 5 6 7 8 9 10 11 12)
}

/// out[r][c] (+)= Σ_p x[r][p] panel[p][c] for R rows, kc inner values, the first `cols`
/// columns (<= NR) read and stored (masked: a panel read in place may end at its matrix's
/// last column). Accumulators: R x 2 vectors, held in registers (R <= 12 keeps 24 + 3 of
/// the 32).
///
/// # Safety
/// AVX-512F; the tile's pointers are valid for the extents [`Tile`] describes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile_avx512<const R: usize, const PREFETCH: bool>(t: &Tile) {
    use std::arch::x86_64::*;
    let mask = |lanes: usize| -> __mmask16 {
        match lanes {
            0 => 0,
            l if l >= 16 => u16::MAX,
            l => (1u16 << l) - 1,
        }
    };
    let (m0, m1) = (mask(t.cols), mask(t.cols.saturating_sub(16)));
    let mut lo = [_mm512_setzero_ps(); R];
    let mut hi = [_mm512_setzero_ps(); R];
    // SAFETY (whole body): every read and write stays inside the extents the caller gave.
    unsafe {
        for p in 0..t.kc {
            let row = t.panel.add(p * t.panel_rs);
            if PREFETCH {
                // A hint: an address past the panels' end faults nothing.
                let ahead = row.wrapping_add(PREFETCH_ROWS * t.panel_rs) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            }
            let w0 = _mm512_maskz_loadu_ps(m0, row);
            let w1 = _mm512_maskz_loadu_ps(m1, row.add(16));
            for r in 0..R {
                let xb = _mm512_set1_ps(*t.x.add(r * t.x_rs + p));
                lo[r] = _mm512_fmadd_ps(xb, w0, lo[r]);
                hi[r] = _mm512_fmadd_ps(xb, w1, hi[r]);
            }
        }
        for r in 0..R {
            let o = t.out.add(r * t.out_rs);
            let (mut a0, mut a1) = (lo[r], hi[r]);
            if t.accumulate {
                a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(m0, o));
                a1 = _mm512_add_ps(a1, _mm512_maskz_loadu_ps(m1, o.add(16)));
            }
            _mm512_mask_storeu_ps(o, m0, a0);
            _mm512_mask_storeu_ps(o.add(16), m1, a1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The worst ratio, over the product, of |got - x Wᵀ| (f64 dot products) to the
    /// rounding bound of any order of summing k products in f32: γ_k Σ_p |x_p w_p|, with
    /// γ_k = k u / (1 - k u), u = 2⁻²⁴. Above 1 is a wrong result.
    fn worst_error(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Option<f64> {
        let packed = PackedWeight::pack(w, n, k)?;
        Some(worst_error_of(&packed.matmul(x, m), x, w, m, n, k))
    }

    /// [`worst_error`] of a product already computed.
    fn worst_error_of(got: &[f32], x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> f64 {
        let u = f64::from(f32::EPSILON) / 2.0;
        let gamma = k as f64 * u / (1.0 - k as f64 * u);
        let mut worst = 0f64;
        for i in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64);
                let exact: f64 = terms.clone().sum();
                let magnitude: f64 = terms.map(f64::abs).sum();
                let error = (got[i * n + j] as f64 - exact).abs();
                worst = worst.max(error / (gamma * magnitude + f64::MIN_POSITIVE));
            }
        }
        worst
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                (h >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Odd shapes (row tails of every length, partial panels, K across blocks), through
        /// the packed panels and through b = Wᵀ read in place (masked last column block).
        #[test]
        fn any_shape_matches_the_f64_oracle(
            m in 1usize..40,
            n in 1usize..100,
            k in 1usize..300,
            seed in 0u32..1000,
        ) {
            let (x, w) = (values(m * k, seed), values(n * k, seed ^ 0x5555));
            if let Some(worst) = worst_error(&x, &w, m, n, k) {
                prop_assert!(worst <= 1.0, "{m}x{n}x{k}: {worst} times the bound");
            }
            // b (k, n) = wᵀ, row-major.
            let b: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            if let Some(got) = matmul_row_major_b(&x, &b, m, k, n) {
                let worst = worst_error_of(&got, &x, &w, m, n, k);
                prop_assert!(worst <= 1.0, "row-major b {m}x{n}x{k}: {worst} times the bound");
            }
        }
    }

    /// A product big enough for the threaded split, with row groups and panel groups.
    #[test]
    fn threaded_shapes_match_the_f64_oracle() {
        for (m, n, k) in [(68, 576, 192), (300, 70, 130), (13, 1000, 64)] {
            let (x, w) = (values(m * k, 1), values(n * k, 2));
            if let Some(worst) = worst_error(&x, &w, m, n, k) {
                assert!(worst <= 1.0, "{m}x{n}x{k}: {worst} times the bound");
            }
        }
    }

    #[test]
    fn packing_refuses_a_short_weight() {
        assert!(PackedWeight::pack(&[1.0; 5], 2, 3).is_none());
    }
}
