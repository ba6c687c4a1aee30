//! GPU dispatches into `int8.wgsl`. Everything stays on the device: the outlier list is
//! built by a kernel (flags, then a one-workgroup compaction into `[count, j...]`), and the
//! GEMM / GEMV kernels loop over that list; nothing is read back.

use lathe_core::Tensor;
use lathe_shaders::{grid_1d, GpuBuffer, GpuContext, Launch, MemCategory, Shader};

use super::cpu::{padded, Form};
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
    pub _pad: u32,
}

fn launch(
    ctx: &GpuContext,
    entry: &'static str,
    inputs: &[&GpuBuffer],
    outputs: &[&GpuBuffer],
    params: &Params,
    workgroups: [u32; 3],
) -> Result<()> {
    ctx.launch(&Launch {
        shader: Shader::Int8,
        entry,
        inputs,
        outputs,
        params: bytemuck::bytes_of(params),
        workgroups,
    })?;
    Ok(())
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
    let rows = p.rows as u64;
    let q = ctx.alloc((rows * p.in4 as u64 * 4).max(4), category)?;
    let scale = ctx.alloc((rows * 4).max(4), category)?;
    launch(
        ctx,
        "quantize_rows",
        &[x, flags],
        &[&q, &scale],
        p,
        grid_1d(rows, 1),
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
    threshold: f32,
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
        _pad: 0,
    };
    let xb = buffer_of(x)?;
    let cols = weight.in_features as u64;
    // (a) outlier columns, compacted into [count, j...].
    let flags = ctx.alloc(cols.max(1) * 4, MemCategory::Scratch)?;
    launch(
        ctx,
        "outlier_flags",
        &[&xb],
        &[&flags],
        &p,
        grid_1d(cols, 256),
    )?;
    let list = ctx.alloc((cols + 1) * 4, MemCategory::Scratch)?;
    launch(ctx, "outlier_compact", &[&flags], &[&list], &p, [1, 1, 1])?;
    // (b) vector-wise quantization without the outlier columns.
    let (ca, sca) = quantize_rows(ctx, &xb, &flags, &p, MemCategory::Scratch)?;
    // (c, d) int32 products, scaling, 16-bit outlier path, bias.
    let y = ctx.alloc(
        (rows * weight.out_features).max(1) as u64 * 4,
        MemCategory::Activations,
    )?;
    let bias_ref = bias_buffer.as_ref().unwrap_or(scb);
    let inputs = [&ca, &sca, cb, scb, &xb, &list, bias_ref];
    let (entry, grid) = match form {
        Form::Gemm => (
            "gemm",
            [
                weight.out_features.div_ceil(64).max(1) as u32,
                rows.div_ceil(64).max(1) as u32,
                1,
            ],
        ),
        Form::Gemv => ("gemv", grid_1d(weight.out_features as u64, 1)),
    };
    if rows > 0 && weight.out_features > 0 {
        launch(ctx, entry, &inputs, &[&y], &p, grid)?;
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
    let grid = [
        weight.in_features.div_ceil(64).max(1) as u32,
        rows.div_ceil(64).max(1) as u32,
        1,
    ];
    if rows > 0 && weight.in_features > 0 {
        launch(
            ctx,
            "backward_dx",
            &[&buffer_of(dy)?, cb, scb],
            &[&dx],
            &p,
            grid,
        )?;
    }
    Ok(dx)
}
