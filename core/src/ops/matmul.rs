//! Matrix multiplication: plain, with transposed operands, and batched.
//!
//! `a.matmul_t(b, ta, tb)` computes op(a) @ op(b) where op transposes the last two dims when
//! its flag is set. Shapes: op(a) (..., M, K), op(b) (..., K, N) with the same batch dims, or
//! b of rank 2 shared by every batch entry (a linear layer). CPU: the `gemm` crate (packed
//! SIMD kernels, rayon threads). GPU: a tiled kernel reading operands through strides, so
//! transposes cost nothing.
//!
//! b may be f16 (a frozen half-precision weight): the GPU kernel reads its packed words
//! directly (half the weight bytes, f32 arithmetic); the CPU widens it to f32 a 4 MiB panel at
//! a time for the product (the saving there is storage, not time). The output is always f32.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::dtype::DType;
use crate::ops::matmul_gpu::gpu_matmul;
use crate::ops::packed;
use crate::ops::skinny;
use crate::storage::{CpuStorage, Storage};
use crate::tensor::Tensor;
use crate::{Device, Error, Result};

/// The problem after shape checks: `batch` products of (M, K) @ (K, N).
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatmulDims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Whether b is one matrix shared by every batch entry.
    pub b_shared: bool,
}

fn dims(a: &[usize], b: &[usize], ta: bool, tb: bool) -> Result<(MatmulDims, Vec<usize>)> {
    if a.len() < 2 || b.len() < 2 {
        return Err(Error::shape(
            "matmul",
            format!("operands need rank >= 2, got {a:?} and {b:?}"),
        ));
    }
    let (ar, ac) = (a[a.len() - 2], a[a.len() - 1]);
    let (br, bc) = (b[b.len() - 2], b[b.len() - 1]);
    let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
    let (kb, n) = if tb { (bc, br) } else { (br, bc) };
    if k != kb {
        return Err(Error::shape(
            "matmul",
            format!(
                "inner dims differ: {a:?}{} @ {b:?}{}",
                if ta { "^T" } else { "" },
                if tb { "^T" } else { "" }
            ),
        ));
    }
    let batch_a = &a[..a.len() - 2];
    let batch_b = &b[..b.len() - 2];
    let b_shared = batch_b.is_empty();
    if !b_shared && batch_a != batch_b {
        return Err(Error::shape(
            "matmul",
            format!("batch dims differ: {a:?} and {b:?}"),
        ));
    }
    let batch = batch_a.iter().product();
    let mut out = batch_a.to_vec();
    out.extend([m, n]);
    Ok((
        MatmulDims {
            batch,
            m,
            n,
            k,
            b_shared,
        },
        out,
    ))
}

/// (row stride, column stride) of op(x) for a row-major (rows, cols) matrix.
pub(crate) fn op_strides(rows_cols: (usize, usize), transposed: bool) -> (usize, usize) {
    let cols = rows_cols.1;
    if transposed {
        (1, cols)
    } else {
        (cols, 1)
    }
}

/// Inner dims up to which a row-major b goes through the packed kernel in place: beyond,
/// each column block's rows lie far apart (an LM head's 49152 x 576 weight ran at 86
/// GFLOP/s this way, 135 through the gemm crate), and the gemm crate's own packing wins.
const PANEL_MAX_K: usize = 8192;

/// Rows (batch * M) from which a row-major b whose rows lie a multiple of 4 KiB apart (N a
/// multiple of 1024) goes through the gemm crate rather than in place: read in place, such
/// rows collide in the same cache sets, while with many rows the gemm crate's packing of b
/// is paid back. Measured on a 2-core Intel Xeon, in place against the gemm crate: 1024³ 105
/// vs 239 GFLOP/s. Other widths stay in place: 768 x 1536 x 576 ran at 240 vs 211, and a
/// LoRA SFT step whose 384 x 576 x 1536 backward product went to the gemm crate (242 vs 182
/// alone) was no faster.
const IN_PLACE_MAX_ROWS_ALIASED: usize = 256;

/// Threads for one product: small problems run on the calling thread.
fn parallelism(d: &MatmulDims) -> Parallelism {
    if d.m * d.n * d.k < 48 * 48 * 48 {
        Parallelism::None
    } else {
        Parallelism::Rayon(rayon::current_num_threads())
    }
}

fn cpu_matmul(a: &[f32], b: &[f32], d: MatmulDims, ta: bool, tb: bool) -> Vec<f32> {
    let aliased_b_rows = d.n.is_multiple_of(1024) && d.batch * d.m > IN_PLACE_MAX_ROWS_ALIASED;
    if !ta && !tb && d.b_shared && d.m > skinny::MAX_ROWS && d.k <= PANEL_MAX_K && !aliased_b_rows {
        // A shared row-major b (the backward's dy @ W of a linear layer): its column blocks
        // are the packed kernel's panels as they stand.
        if let Some(out) = packed::matmul_row_major_b(a, b, d.batch * d.m, d.k, d.n) {
            return out;
        }
    }
    let mut out = vec![0.0f32; d.batch * d.m * d.n];
    let (a_rows, a_cols) = if ta { (d.k, d.m) } else { (d.m, d.k) };
    let (b_rows, b_cols) = if tb { (d.n, d.k) } else { (d.k, d.n) };
    let a_strides = op_strides((a_rows, a_cols), ta);
    let b_strides = op_strides((b_rows, b_cols), tb);
    if d.m == 0 || d.n == 0 {
        return out;
    }
    let entry = |i: usize, out_i: &mut [f32]| {
        let a_i = &a[i * d.m * d.k..(i + 1) * d.m * d.k];
        let b_i = if d.b_shared {
            b
        } else {
            &b[i * d.k * d.n..(i + 1) * d.k * d.n]
        };
        if !ta && tb && d.m <= skinny::MAX_ROWS {
            // A few rows through a (N, K) weight: no packing, the weight read once.
            out_i.copy_from_slice(&skinny::matmul_bt_rows(a_i, b_i, d.m, d.n, d.k));
            return;
        }
        // SAFETY: the slices hold exactly (m, k), (k, n) and (m, n) elements at the strides
        // given.
        unsafe {
            cpu_gemm(
                out_i,
                a_i,
                a_strides,
                b_i,
                b_strides,
                (d.m, d.n, d.k),
                false,
            )
        };
    };
    if d.batch > 1 && matches!(parallelism(&d), Parallelism::None) {
        // Many small products (attention's per-(sequence, head) scores and contexts): one
        // parallel region over the entries, each entry on one thread, rather than every
        // entry on the calling thread.
        out.par_chunks_mut(d.m * d.n)
            .enumerate()
            .for_each(|(i, out_i)| entry(i, out_i));
    } else {
        out.chunks_mut(d.m * d.n)
            .enumerate()
            .for_each(|(i, out_i)| entry(i, out_i));
    }
    out
}

/// out (m, n) row-major `=` (or `+=` when `accumulate`) a @ b, where a (m, k) and b (k, n)
/// are read through (row stride, column stride) pairs: transposes and column blocks cost
/// nothing. The packed SIMD kernels of the `gemm` crate, on rayon's threads when the product
/// is big enough.
///
/// # Safety
/// Every element `a[i * rs + p * cs]` for i < m, p < k (and likewise for b over k, n) must lie
/// inside its slice, and `out` must hold m * n elements.
pub(crate) unsafe fn cpu_gemm(
    out: &mut [f32],
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    debug_assert!(out.len() >= m * n);
    cpu_gemm_into(out, n, a, a_strides, b, b_strides, (m, n, k), accumulate)
}

/// As [`cpu_gemm`], writing row i of the product at `out[i * out_rs..]`: the product may be a
/// column block of a wider output.
///
/// # Safety
/// As [`cpu_gemm`], and `out` must hold (m - 1) * out_rs + n elements.
#[allow(clippy::too_many_arguments)]
unsafe fn cpu_gemm_into(
    out: &mut [f32],
    out_rs: usize,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    debug_assert!(out.len() >= (m - 1) * out_rs + n);
    let par = parallelism(&MatmulDims {
        batch: 1,
        m,
        n,
        k,
        b_shared: true,
    });
    gemm::gemm(
        m,
        n,
        k,
        out.as_mut_ptr(),
        1,
        out_rs as isize,
        accumulate,
        a.as_ptr(),
        a_cs as isize,
        a_rs as isize,
        b.as_ptr(),
        b_cs as isize,
        b_rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        par,
    );
}

/// f32 elements of an f16 weight widened at a time by [`cpu_matmul_half_b`] (4 MiB).
const HALF_PANEL_ELEMS: usize = 1 << 20;

/// a (M, K) @ op(b) for one f16 matrix b shared by the batch (a half-precision weight),
/// without widening b whole: a panel of b's rows is widened to f32 at a time (at most
/// [`HALF_PANEL_ELEMS`]), so an LM head of GPT-NeoX-20B (1.2 GB in f32) costs 4 MiB of
/// scratch. With b (N, K) stored (`tb`), each panel is a block of output columns; with b
/// (K, N), each panel is a slice of the inner dim, accumulated. Same products as the
/// widened weight, summed in panel order.
fn cpu_matmul_half_b(a: &[f32], b: &[half::f16], d: MatmulDims, tb: bool) -> Vec<f32> {
    let rows = d.batch * d.m;
    let mut out = vec![0.0f32; rows * d.n];
    if rows == 0 || d.n == 0 {
        return out;
    }
    let (b_rows, b_cols) = if tb { (d.n, d.k) } else { (d.k, d.n) };
    let panel_rows = (HALF_PANEL_ELEMS / b_cols.max(1)).clamp(1, b_rows.max(1));
    let mut panel = vec![0.0f32; panel_rows * b_cols];
    for start in (0..b_rows).step_by(panel_rows) {
        let len = panel_rows.min(b_rows - start);
        let widened = &mut panel[..len * b_cols];
        for (w, h) in widened
            .iter_mut()
            .zip(&b[start * b_cols..(start + len) * b_cols])
        {
            *w = h.to_f32();
        }
        if tb && rows <= skinny::MAX_ROWS {
            // Decoding: a few rows through the panel, no packing.
            let block = skinny::matmul_bt_rows(a, widened, rows, len, d.k);
            for (dst, src) in out.chunks_mut(d.n).zip(block.chunks(len)) {
                dst[start..start + len].copy_from_slice(src);
            }
        } else if tb {
            // SAFETY: a is (rows, K) row-major, the panel (len, K) read transposed, and the
            // output block starts at column `start` of rows of d.n with len <= d.n - start.
            unsafe {
                cpu_gemm_into(
                    &mut out[start..],
                    d.n,
                    a,
                    (d.k, 1),
                    widened,
                    (1, d.k),
                    (rows, len, d.k),
                    false,
                )
            };
        } else {
            // SAFETY: columns start..start+len of a (rows, K) times the panel (len, N).
            unsafe {
                cpu_gemm_into(
                    &mut out,
                    d.n,
                    &a[start..],
                    (d.k, 1),
                    widened,
                    (d.n, 1),
                    (rows, d.n, len),
                    true,
                )
            };
        }
    }
    out
}

/// `out (m, n) += a (m, k) @ b (k, n)` on the CPU with the same packed SIMD kernels as
/// [`Tensor::matmul`], all row-major; `a` is read with row stride `a_row_stride` (>= k), so it
/// may be a column block of a wider matrix. For kernels outside core that build an f32
/// operand in pieces (the int8 input gradient dequantizes its weight one row block at a time).
pub fn cpu_matmul_accumulate(
    out: &mut [f32],
    a: &[f32],
    a_row_stride: usize,
    b: &[f32],
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    let needed_a = if m == 0 {
        0
    } else {
        (m - 1) * a_row_stride + k
    };
    if a_row_stride < k || a.len() < needed_a || b.len() < k * n || out.len() < m * n {
        return Err(Error::shape(
            "cpu_matmul_accumulate",
            format!(
                "({m}, {k}) @ ({k}, {n}) with a row stride {a_row_stride}: got a {}, b {}, out {}",
                a.len(),
                b.len(),
                out.len()
            ),
        ));
    }
    if k == 0 {
        return Ok(());
    }
    // SAFETY: the checks above keep every strided read inside `a`, `b` and `out`.
    unsafe { cpu_gemm(out, a, (a_row_stride, 1), b, (n, 1), (m, n, k), true) };
    Ok(())
}

impl Tensor {
    /// a @ b.
    pub fn matmul(&self, b: &Tensor) -> Result<Tensor> {
        self.matmul_t(b, false, false)
    }

    /// op(a) @ op(b), where op transposes the last two dims when its flag is set.
    ///
    /// a is f32; b is f32 or f16 (a half-precision weight); the result is f32. b's gradient
    /// has b's dtype.
    pub fn matmul_t(&self, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
        self.expect_dtype("matmul", DType::F32)?;
        if b.dtype() != DType::F16 {
            b.expect_dtype("matmul", DType::F32)?;
        }
        self.expect_same_device("matmul", b)?;
        let (d, out_shape) = dims(self.shape(), b.shape(), ta, tb)?;
        // A shared b is one 2-D product: (batch*M, K) @ (K, N). That keeps b's gradient a
        // single matmul instead of a sum over the batch.
        if d.b_shared && self.rank() > 2 {
            let a2 = match (ta, d.batch) {
                (false, _) => self.reshape(&[d.batch * d.m, d.k])?,
                (true, 1) => self.reshape(&[d.k, d.m])?,
                (true, _) => {
                    return Err(Error::shape(
                        "matmul",
                        "a transposed batched a with a shared b is not supported",
                    ))
                }
            };
            return a2.matmul_t(b, ta, tb)?.reshape(&out_shape);
        }
        crate::flops::add_product(d.batch * d.m, d.n, d.k);
        let storage = match self.device() {
            Device::Cpu if b.dtype() == DType::F16 && d.b_shared && !ta => {
                let data = self.with_cpu_f32("matmul", |av| match &*b.storage() {
                    Storage::Cpu(s) => match &**s {
                        CpuStorage::F16(bv) => Ok(cpu_matmul_half_b(av, bv, d, tb)),
                        _ => Err(Error::shape("matmul", "an f16 tensor without f16 storage")),
                    },
                    Storage::Gpu(_) => Err(Error::shape("matmul", "a CPU tensor on the GPU")),
                })??;
                Tensor::cpu_f32(data, out_shape.clone())
            }
            Device::Cpu
                if !ta && tb && d.b_shared && d.m > skinny::MAX_ROWS && b.packed().is_some() =>
            {
                // A frozen weight packed at load: its panels, not a fresh packing per call.
                let packed = b.packed().expect("checked above");
                let data = self.with_cpu_f32("matmul", |av| packed.matmul(av, d.m))?;
                Tensor::cpu_f32(data, out_shape.clone())
            }
            Device::Cpu => {
                let widened;
                let b32 = if b.dtype() == DType::F16 {
                    widened = b.detach().to_dtype(DType::F32)?;
                    &widened
                } else {
                    b
                };
                let data = self.with_cpu_f32("matmul", |av| {
                    b32.with_cpu_f32("matmul", |bv| cpu_matmul(av, bv, d, ta, tb))
                })??;
                Tensor::cpu_f32(data, out_shape.clone())
            }
            Device::Gpu(_) => gpu_matmul(self, b, d, ta, tb)?,
        };
        let (a_saved, b_saved) = (self.detach(), b.detach());
        // A frozen operand (a base weight under LoRA) needs no gradient: skipping it saves a
        // whole matmul per linear layer in the backward.
        let (need_a, need_b) = (self.tracks_grad(), b.tracks_grad());
        Ok(Tensor::from_op(
            storage,
            out_shape,
            DType::F32,
            self.device(),
            "matmul",
            &[self, b],
            move |_, g| {
                let (a, b) = (&a_saved, &b_saved);
                // C = A'B' with A' = op(A), B' = op(B): dA' = dC B'^T, dB' = A'^T dC.
                let da = if !need_a {
                    None
                } else {
                    Some(match (ta, tb) {
                        (false, false) => g.matmul_t(b, false, true)?,
                        (false, true) => g.matmul_t(b, false, false)?,
                        (true, false) => b.matmul_t(g, false, true)?,
                        (true, true) => b.matmul_t(g, true, true)?,
                    })
                };
                if !need_b {
                    return Ok(vec![da, None]);
                }
                let db = match (ta, tb) {
                    (false, false) => a.matmul_t(g, true, false)?,
                    (true, false) => a.matmul_t(g, false, false)?,
                    (false, true) => g.matmul_t(a, true, false)?,
                    (true, true) => g.matmul_t(a, true, true)?,
                };
                let db = if b.dtype() == DType::F32 {
                    db
                } else {
                    db.to_dtype(b.dtype())?
                };
                Ok(vec![da, Some(db)])
            },
        ))
    }
}
