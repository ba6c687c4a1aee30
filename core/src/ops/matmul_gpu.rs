//! The GPU matmul's dispatches. One dispatch covers the whole problem when every operand fits
//! a storage binding (the common case); otherwise the work is cut so that each dispatch binds
//! windows that fit: groups of batch entries when one entry fits, else blocks of (M, N, K).
//! A block of K adds to the output from the stored value (see matmul.wgsl), so a split K
//! sums in the same order as one pass and the result is the same bit for bit.

use lathe_shaders::{GpuBuffer, GpuContext, Shader, View};

use crate::dtype::DType;
use crate::ops::dispatch::{window_at, window_budget};
use crate::ops::matmul::{op_strides, MatmulDims};
use crate::ops::{alloc_f32, launch_views};
use crate::storage::Storage;
use crate::tensor::Tensor;
use crate::Result;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    a_row_stride: u32,
    a_col_stride: u32,
    a_batch_stride: u32,
    a_offset: u32,
    b_row_stride: u32,
    b_col_stride: u32,
    b_batch_stride: u32,
    b_offset: u32,
    out_row_stride: u32,
    out_batch_stride: u32,
    out_offset: u32,
    accumulate: u32,
}

/// Output tile edge of the GPU kernel (each workgroup computes a TILE x TILE block).
const TILE: usize = 64;

/// One operand as stored: per batch entry a row-major matrix read as op(x), which is
/// (op_rows, op_cols); `transposed` when the stored matrix is op(x)'s transpose.
#[derive(Clone, Copy)]
struct Operand {
    transposed: bool,
    /// Stored row length (elements).
    stored_cols: usize,
    /// Elements between batch entries (0: one matrix shared by every entry).
    batch_stride: usize,
    elem_bytes: usize,
}

impl Operand {
    /// First element of the block at op-coordinates (i0, j0).
    fn start(&self, i0: usize, j0: usize) -> usize {
        if self.transposed {
            j0 * self.stored_cols + i0
        } else {
            i0 * self.stored_cols + j0
        }
    }

    /// Elements from the first to one past the last of a (bi, bj) block.
    fn span(&self, bi: usize, bj: usize) -> usize {
        if self.transposed {
            (bj - 1) * self.stored_cols + bi
        } else {
            (bi - 1) * self.stored_cols + bj
        }
    }

    /// The block dimension whose halving shrinks the span fastest: the stored rows.
    fn outer_is_i(&self) -> bool {
        !self.transposed
    }
}

/// A window covering `span` elements of an operand from element `start`, and the block's
/// offset inside it.
fn window<'a>(
    ctx: &GpuContext,
    buffer: &'a GpuBuffer,
    op: &Operand,
    start: usize,
    span: usize,
) -> (View<'a>, u32) {
    let (view, offset) = window_at(ctx, buffer, start, span, op.elem_bytes);
    (view, offset as u32)
}

pub(crate) fn gpu_matmul(
    a: &Tensor,
    b: &Tensor,
    d: MatmulDims,
    ta: bool,
    tb: bool,
) -> Result<Storage> {
    let ctx = a.device().gpu_operand_context()?;
    let out = alloc_f32(ctx, d.batch * d.m * d.n)?;
    let (ab, bb) = (a.gpu_operand()?, b.gpu_operand()?);
    let entry = match b.dtype() {
        DType::F16 => "matmul_half_b",
        _ => "matmul",
    };
    let operands = [
        Operand {
            transposed: ta,
            stored_cols: if ta { d.m } else { d.k },
            batch_stride: d.m * d.k,
            elem_bytes: 4,
        },
        Operand {
            transposed: tb,
            stored_cols: if tb { d.k } else { d.n },
            batch_stride: if d.b_shared { 0 } else { d.k * d.n },
            elem_bytes: if b.dtype() == DType::F16 { 2 } else { 4 },
        },
        Operand {
            transposed: false,
            stored_cols: d.n,
            batch_stride: d.m * d.n,
            elem_bytes: 4,
        },
    ];
    let (a_rs, a_cs) = op_strides((if ta { d.k } else { d.m }, operands[0].stored_cols), ta);
    let (b_rs, b_cs) = op_strides((if tb { d.n } else { d.k }, operands[1].stored_cols), tb);
    let params = |(m, n, k): (usize, usize, usize), batch: usize, offsets: [u32; 3], accumulate| {
        MatmulParams {
            m: m as u32,
            n: n as u32,
            k: k as u32,
            batch: batch as u32,
            a_row_stride: a_rs as u32,
            a_col_stride: a_cs as u32,
            a_batch_stride: operands[0].batch_stride as u32,
            a_offset: offsets[0],
            b_row_stride: b_rs as u32,
            b_col_stride: b_cs as u32,
            b_batch_stride: operands[1].batch_stride as u32,
            b_offset: offsets[1],
            out_row_stride: d.n as u32,
            out_batch_stride: operands[2].batch_stride as u32,
            out_offset: offsets[2],
            accumulate: accumulate as u32,
        }
    };
    let grid = |m: usize, n: usize, batch: usize| {
        [
            n.div_ceil(TILE) as u32,
            m.div_ceil(TILE) as u32,
            batch as u32,
        ]
    };
    if d.batch * d.m * d.n == 0 {
        return Ok(Storage::Gpu(out));
    }
    let buffers = [&ab, &bb, &out];
    let limit = ctx.binding_limit();
    if buffers.iter().all(|b| View::whole(b).size <= limit) {
        let views = buffers.map(View::whole);
        let p = params((d.m, d.n, d.k), d.batch, [0; 3], false);
        launch_views(
            ctx,
            Shader::Matmul,
            entry,
            &views,
            2,
            &p,
            grid(d.m, d.n, d.batch),
        )?;
        return Ok(Storage::Gpu(out));
    }

    let budget = |op: &Operand| window_budget(ctx, op.elem_bytes);
    // (i, j) extents of each operand's block for a block (bm, bn, bk) of the problem.
    let extents = |(bm, bn, bk): (usize, usize, usize)| [(bm, bk), (bk, bn), (bm, bn)];
    let full = (d.m, d.n, d.k.max(1));

    // Whole batch entries, as many per dispatch as fit.
    let group = (1..=d.batch).rev().find(|&g| {
        operands
            .iter()
            .zip(extents(full))
            .all(|(op, (bi, bj))| (g - 1) * op.batch_stride + op.span(bi, bj) <= budget(op))
    });
    if let Some(g) = group {
        for b0 in (0..d.batch).step_by(g) {
            let count = g.min(d.batch - b0);
            let mut views = Vec::with_capacity(3);
            let mut offsets = [0u32; 3];
            for (x, ((op, (bi, bj)), buffer)) in
                operands.iter().zip(extents(full)).zip(buffers).enumerate()
            {
                let span = (count - 1) * op.batch_stride + op.span(bi, bj);
                let (view, offset) = window(ctx, buffer, op, b0 * op.batch_stride, span);
                views.push(view);
                offsets[x] = offset;
            }
            let p = params((d.m, d.n, d.k), count, offsets, false);
            launch_views(
                ctx,
                Shader::Matmul,
                entry,
                &views,
                2,
                &p,
                grid(d.m, d.n, count),
            )?;
        }
        return Ok(Storage::Gpu(out));
    }

    // Blocks of one entry: halve the dimension that spreads the worst operand widest.
    let mut block = full;
    loop {
        let worst = operands
            .iter()
            .zip(extents(block))
            .enumerate()
            .filter(|(_, (op, (bi, bj)))| op.span(*bi, *bj) > budget(op))
            .max_by_key(|(_, (op, (bi, bj)))| op.span(*bi, *bj) * op.elem_bytes);
        let Some((x, (op, (bi, bj)))) = worst else {
            break;
        };
        let halve_i = (op.outer_is_i() && bi > 1) || bj == 1;
        // Operand x's (i, j) are: A (m, k), B (k, n), out (m, n).
        let dim = match (x, halve_i) {
            (0, true) | (2, true) => &mut block.0,
            (1, false) | (2, false) => &mut block.1,
            _ => &mut block.2,
        };
        *dim = dim.div_ceil(2);
    }
    let (bm, bn, bk) = block;
    for batch in 0..d.batch {
        for m0 in (0..d.m).step_by(bm) {
            for n0 in (0..d.n).step_by(bn) {
                for k0 in (0..d.k.max(1)).step_by(bk) {
                    let (m, n, k) = (bm.min(d.m - m0), bn.min(d.n - n0), bk.min(d.k - k0));
                    let starts = [(m0, k0), (k0, n0), (m0, n0)];
                    let mut views = Vec::with_capacity(3);
                    let mut offsets = [0u32; 3];
                    for (x, ((op, (bi, bj)), buffer)) in operands
                        .iter()
                        .zip(extents((m, n, k.max(1))))
                        .zip(buffers)
                        .enumerate()
                    {
                        let start = batch * op.batch_stride + op.start(starts[x].0, starts[x].1);
                        let (view, offset) = window(ctx, buffer, op, start, op.span(bi, bj));
                        views.push(view);
                        offsets[x] = offset;
                    }
                    let p = params((m, n, k), 1, offsets, k0 > 0);
                    launch_views(ctx, Shader::Matmul, entry, &views, 2, &p, grid(m, n, 1))?;
                }
            }
        }
    }
    Ok(Storage::Gpu(out))
}
