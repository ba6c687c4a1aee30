//! GPU dispatches into `int8.wgsl`. Everything stays on the device: the outlier list is
//! built by a kernel (flags, then a one-workgroup compaction into `[count, j...]`), and the
//! GEMM / GEMV kernels loop over that list; nothing is read back.

use lathe_core::ops::dispatch::{self as ops, Arg};
use lathe_core::Tensor;
use lathe_shaders::{grid_1d, GpuBuffer, GpuContext, MemCategory, Shader, View};

use super::cpu::{padded, Form};
use super::linear::Int8Variant;
use super::weight::{gpu_missing, Int8Weight, Packed};
use crate::{Error, Result};

/// The uniform block shared by every int8 kernel (layout of WGSL `Params`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    pub rows: u32,
    pub cols: u32,
    pub in4: u32,
    pub outs: u32,
    pub threshold: f32,
    pub has_bias: u32,
    pub write_acc: u32,
    pub y_stride: u32,
    pub y_offset: u32,
    pub accumulate: u32,
    /// 0: [`Int8Variant::Lathe`], 1: [`Int8Variant::Bitsandbytes`] (activations and output).
    pub variant: u32,
    pub _pad: u32,
}

/// Outputs per block when a weight is split over bindings: backward_dx sums 16 outputs per
/// step, so blocks of a multiple of 16 keep its summation order.
const OUT_BLOCK: usize = 16;

/// Rows of activations and outputs of the weight per dispatch, so that every window of a
/// block fits a binding; `rows_bytes` are the bytes per activation row of each buffer split
/// by rows, `out_bytes` per weight row (output feature).
fn blocks(
    ctx: &GpuContext,
    entry: &'static str,
    (rows, outs): (usize, usize),
    rows_bytes: &[usize],
    out_bytes: &[usize],
) -> Result<(usize, usize)> {
    let row_chunk = ops::rows_fitting_or_err(ctx, Shader::Int8, entry, rows_bytes, rows)?;
    let out_chunk = ops::rows_fitting_or_err(ctx, Shader::Int8, entry, out_bytes, outs)?;
    let out_chunk = if out_chunk < outs {
        (out_chunk / OUT_BLOCK * OUT_BLOCK).max(OUT_BLOCK)
    } else {
        out_chunk
    };
    Ok((row_chunk, out_chunk))
}

/// A window of `span` f32 from element `start`, and the offset of `start` inside it.
fn window<'a>(
    ctx: &GpuContext,
    buffer: &'a GpuBuffer,
    start: usize,
    span: usize,
) -> (View<'a>, u32) {
    let (view, offset) = ops::window_at(ctx, buffer, start, span, 4);
    (view, offset as u32)
}

/// The window of rows `[first, first + count)` of a buffer with `bytes` bytes per row.
fn rows_view(buffer: &GpuBuffer, first: usize, count: usize, bytes: usize) -> View<'_> {
    View::window(buffer, (first * bytes) as u64, (count * bytes) as u64)
}

fn u32_of(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::Shape {
        op: "int8",
        detail: format!("{what} = {n} does not fit the GPU kernels' u32 indices"),
    })
}

fn buffer_of(t: &Tensor) -> Result<GpuBuffer> {
    t.gpu_buffer().ok_or_else(gpu_missing)
}

/// Row-wise quantization of `x` (rows, cols) skipping columns flagged in `flags`:
/// returns (packed rows, row maxima).
fn quantize_rows(
    ctx: &GpuContext,
    x: &GpuBuffer,
    flags: &GpuBuffer,
    p: &Params,
    category: MemCategory,
) -> Result<(GpuBuffer, GpuBuffer)> {
    let rows = p.rows as usize;
    let in4 = p.in4 as usize;
    let q = ctx.alloc((rows * in4 * 4).max(4) as u64, category)?;
    let scale = ctx.alloc((rows * 4).max(4) as u64, category)?;
    ops::launch_rows(
        ctx,
        Shader::Int8,
        "quantize_rows",
        &[Arg::Rows(x, p.cols as usize * 4), Arg::Whole(flags)],
        &[Arg::Rows(&q, in4 * 4), Arg::Rows(&scale, 4)],
        rows,
        |_, n| {
            let chunk = Params {
                rows: n as u32,
                ..*p
            };
            (chunk, grid_1d(n as u64, 1))
        },
    )?;
    Ok((q, scale))
}

/// CB and SCB of a GPU f32 weight (out, in), charged to [`MemCategory::Weights`].
pub(crate) fn quantize_weight(
    ctx: &GpuContext,
    w: &Tensor,
    out: usize,
    inn: usize,
) -> Result<(GpuBuffer, GpuBuffer)> {
    let p = Params {
        rows: u32_of(out, "out_features")?,
        cols: u32_of(inn, "in_features")?,
        in4: u32_of(padded(inn) / 4, "in_features")?,
        ..Params::default()
    };
    let no_flags = ctx.alloc_zeroed((inn.max(1) * 4) as u64, MemCategory::Scratch)?;
    quantize_rows(ctx, &buffer_of(w)?, &no_flags, &p, MemCategory::Weights)
}

/// The forward's intermediate buffers (kept for the test hook).
pub(crate) struct Forward {
    pub y: GpuBuffer,
    pub ca: GpuBuffer,
    pub sca: GpuBuffer,
    pub list: GpuBuffer,
}

/// y (rows, out) for x (rows, in) on the GPU. `write_acc` makes the matmul kernel write the
/// int32 accumulations (as bits) instead of y.
pub(crate) fn forward(
    weight: &Int8Weight,
    x: &Tensor,
    rows: usize,
    (threshold, variant): (f32, Int8Variant),
    bias: Option<&Tensor>,
    form: Form,
    write_acc: bool,
) -> Result<Forward> {
    let ctx = weight.device.gpu_context().ok_or_else(gpu_missing)?;
    let Packed::Gpu { cb, scb } = &weight.packed else {
        return Err(gpu_missing());
    };
    let bias_buffer = bias.map(buffer_of).transpose()?;
    let p = Params {
        rows: u32_of(rows, "rows")?,
        cols: u32_of(weight.in_features, "in_features")?,
        in4: u32_of(weight.in4(), "in_features")?,
        outs: u32_of(weight.out_features, "out_features")?,
        threshold,
        has_bias: bias.is_some() as u32,
        write_acc: write_acc as u32,
        variant: match variant {
            Int8Variant::Lathe => 0,
            Int8Variant::Bitsandbytes => 1,
        },
        ..Params::default()
    };
    let xb = buffer_of(x)?;
    let cols = weight.in_features;
    // (a) outlier columns, compacted into [count, j...]; a column is an outlier when any row
    // of any block of rows flags it.
    let flags = ctx.alloc_zeroed(cols.max(1) as u64 * 4, MemCategory::Scratch)?;
    ops::launch_rows(
        ctx,
        Shader::Int8,
        "outlier_flags",
        &[Arg::Rows(&xb, cols * 4)],
        &[Arg::Whole(&flags)],
        rows,
        |first, n| {
            let chunk = Params {
                rows: n as u32,
                accumulate: (first > 0) as u32,
                ..p
            };
            (chunk, grid_1d(cols as u64, 256))
        },
    )?;
    let list = ctx.alloc((cols as u64 + 1) * 4, MemCategory::Scratch)?;
    let compact = [View::whole(&flags), View::whole(&list)];
    ops::launch_views(
        ctx,
        Shader::Int8,
        "outlier_compact",
        &compact,
        1,
        &p,
        [1, 1, 1],
    )?;
    // (b) vector-wise quantization without the outlier columns.
    let (ca, sca) = quantize_rows(ctx, &xb, &flags, &p, MemCategory::Scratch)?;
    // (c, d) int32 products, scaling, 16-bit outlier path, bias: blocks of rows and of
    // output features whose windows fit a binding (one block when everything does).
    let outs = weight.out_features;
    let y = ctx.alloc((rows * outs).max(1) as u64 * 4, MemCategory::Activations)?;
    if rows == 0 || outs == 0 {
        return Ok(Forward { y, ca, sca, list });
    }
    let in4 = weight.in4();
    let entry = match form {
        Form::Gemm => "gemm",
        Form::Gemv => "gemv",
    };
    let (row_chunk, out_chunk) = blocks(
        ctx,
        entry,
        (rows, outs),
        &[in4 * 4, 4, cols * 4, outs * 4],
        &[in4 * 4, 4, 4],
    )?;
    // An absent bias is bound to the scales and never read.
    let bias = bias_buffer.as_ref().unwrap_or(scb);
    for r0 in (0..rows).step_by(row_chunk) {
        let rn = row_chunk.min(rows - r0);
        for o0 in (0..outs).step_by(out_chunk) {
            let on = out_chunk.min(outs - o0);
            let (y_view, y_offset) = window(ctx, &y, r0 * outs + o0, (rn - 1) * outs + on);
            let views = [
                rows_view(&ca, r0, rn, in4 * 4),
                rows_view(&sca, r0, rn, 4),
                rows_view(cb, o0, on, in4 * 4),
                rows_view(scb, o0, on, 4),
                rows_view(&xb, r0, rn, cols * 4),
                View::whole(&list),
                rows_view(bias, o0, on, 4),
                y_view,
            ];
            let block = Params {
                rows: rn as u32,
                outs: on as u32,
                y_stride: outs as u32,
                y_offset,
                ..p
            };
            let grid = match form {
                Form::Gemm => [on.div_ceil(64) as u32, rn.div_ceil(64) as u32, 1],
                Form::Gemv => grid_1d(on as u64, 1),
            };
            ops::launch_views(ctx, Shader::Int8, entry, &views, 7, &block, grid)?;
        }
    }
    Ok(Forward { y, ca, sca, list })
}

/// dx (rows, in) = dy (rows, out) @ dequant(W), from the packed weight.
pub(crate) fn backward_dx(weight: &Int8Weight, dy: &Tensor, rows: usize) -> Result<GpuBuffer> {
    let ctx = weight.device.gpu_context().ok_or_else(gpu_missing)?;
    let Packed::Gpu { cb, scb } = &weight.packed else {
        return Err(gpu_missing());
    };
    let p = Params {
        rows: u32_of(rows, "rows")?,
        cols: u32_of(weight.in_features, "in_features")?,
        in4: u32_of(weight.in4(), "in_features")?,
        outs: u32_of(weight.out_features, "out_features")?,
        ..Params::default()
    };
    let dx = ctx.alloc(
        (rows * weight.in_features).max(1) as u64 * 4,
        MemCategory::Activations,
    )?;
    let (outs, cols, in4) = (weight.out_features, weight.in_features, weight.in4());
    if rows == 0 || cols == 0 {
        return Ok(dx);
    }
    if outs == 0 {
        ctx.fill_zero(&dx);
        return Ok(dx);
    }
    let dy = buffer_of(dy)?;
    let entry = "backward_dx";
    let (row_chunk, out_chunk) = blocks(
        ctx,
        entry,
        (rows, outs),
        &[outs * 4, cols * 4],
        &[in4 * 4, 4],
    )?;
    for r0 in (0..rows).step_by(row_chunk) {
        let rn = row_chunk.min(rows - r0);
        for o0 in (0..outs).step_by(out_chunk) {
            let on = out_chunk.min(outs - o0);
            let (dy_view, y_offset) = window(ctx, &dy, r0 * outs + o0, (rn - 1) * outs + on);
            let views = [
                dy_view,
                rows_view(cb, o0, on, in4 * 4),
                rows_view(scb, o0, on, 4),
                rows_view(&dx, r0, rn, cols * 4),
            ];
            let block = Params {
                rows: rn as u32,
                outs: on as u32,
                y_stride: outs as u32,
                y_offset,
                accumulate: (o0 > 0) as u32,
                ..p
            };
            let grid = [cols.div_ceil(64) as u32, rn.div_ceil(64) as u32, 1];
            ops::launch_views(ctx, Shader::Int8, entry, &views, 3, &block, grid)?;
        }
    }
    Ok(dx)
}
