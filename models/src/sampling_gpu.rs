//! Sampling on the GPU: one dispatch of `sample.wgsl` per step picks every row's token from
//! logits (B, V) that stay on the device, and only the B token ids are read back (DESIGN: no
//! readback in hot loops). The kernel computes the host sampler's definition
//! ([`crate::sampling::candidates`], [`crate::sampling::sample_row_at`]) in f32: for logits
//! whose boundaries are not within f32 rounding of each other it picks the same tokens.

use lathe_core::ops::dispatch::{launch_rows, Arg};
use lathe_core::{DType, Tensor};
use lathe_shaders::{grid_1d, GpuBuffer, GpuContext, MemCategory, Shader};

use crate::sampling::{checked_max, suppress_host, SamplingConfig};
use crate::{Error, Result};

/// What the kernel writes for a row it cannot sample (NaN or +inf, or only -inf).
const NO_TOKEN: u32 = u32::MAX;

/// The uniform block of `sample.wgsl` (layout of WGSL `SampleParams`).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    batch: u32,
    vocab: u32,
    top_k: u32,
    /// The token whose logit counts as -inf; `NO_TOKEN` = none.
    suppress: u32,
    temperature: f32,
    top_p: f32,
    greedy: u32,
    _pad: u32,
}

/// One token per row of GPU logits (B, V) (f32, or f16 widened first), drawn with
/// `uniforms[b]` in [0, 1) for row b (unused when greedy, but still one per row), the logit
/// of `suppress` taken as -inf. A row that cannot be sampled gives the host sampler's error
/// for it (only that row is read back to name the bad logit).
pub fn sample_on_device(
    logits: &Tensor,
    config: &SamplingConfig,
    uniforms: &[f32],
    suppress: Option<u32>,
) -> Result<Vec<u32>> {
    config.validate()?;
    let (batch, vocab) = check_inputs(logits, uniforms, suppress)?;
    let ctx = logits
        .device()
        .gpu_context()
        .ok_or_else(|| config_error(format!("logits on {}", logits.device().name())))?;
    if batch == 0 {
        return Ok(Vec::new());
    }
    let logits = match logits.dtype() {
        DType::F32 => logits.clone(),
        DType::F16 => logits.to_dtype(DType::F32)?,
        DType::U32 => return Err(config_error("logits of dtype U32".to_string())),
    };
    let params = Params {
        batch: batch as u32,
        vocab: vocab as u32,
        // top_k >= V filters nothing; clamping keeps it in u32.
        top_k: config.top_k.min(vocab) as u32,
        suppress: suppress.unwrap_or(NO_TOKEN),
        temperature: config.temperature,
        top_p: config.top_p,
        greedy: config.greedy as u32,
        _pad: 0,
    };
    let tokens = launch(ctx, &logits, uniforms, &params)?;
    check_tokens(&logits, tokens, vocab, suppress)
}

/// (B, V) after checking the shape, the uniforms and the suppressed token.
fn check_inputs(
    logits: &Tensor,
    uniforms: &[f32],
    suppress: Option<u32>,
) -> Result<(usize, usize)> {
    let &[batch, vocab] = logits.shape() else {
        return Err(config_error(format!(
            "logits must be (B, V), got {:?}",
            logits.shape()
        )));
    };
    if vocab == 0 {
        return Err(config_error(format!(
            "logits {:?} have no vocabulary",
            logits.shape()
        )));
    }
    if batch
        .checked_mul(vocab)
        .is_none_or(|n| n > u32::MAX as usize)
    {
        return Err(config_error(format!(
            "logits {:?} have more elements than the kernel's u32 indices reach",
            logits.shape()
        )));
    }
    if uniforms.len() != batch {
        return Err(config_error(format!(
            "{} uniforms for {batch} rows",
            uniforms.len()
        )));
    }
    if let Some((b, u)) = uniforms
        .iter()
        .enumerate()
        .find(|(_, u)| !(0.0..1.0).contains(*u))
    {
        return Err(config_error(format!(
            "the uniform of row {b} is {u}, not in [0, 1)"
        )));
    }
    if let Some(token) = suppress.filter(|&t| t as usize >= vocab) {
        return Err(config_error(format!(
            "token {token} to suppress is outside the vocabulary of {vocab}"
        )));
    }
    Ok((batch, vocab))
}

fn config_error(detail: String) -> Error {
    Error::Config(format!("GPU sampler: {detail}"))
}

/// Runs the kernel and reads back its B tokens. Scratch: the uniforms, the tokens and the
/// (B, V) probabilities.
fn launch(
    ctx: &GpuContext,
    logits: &Tensor,
    uniforms: &[f32],
    params: &Params,
) -> lathe_core::Result<Vec<u32>> {
    let logits_buffer: GpuBuffer = logits
        .gpu_buffer()
        .ok_or_else(|| lathe_shaders::Error::Device("GPU logits without a buffer".to_string()))?;
    let batch = params.batch as usize;
    let row = params.vocab as usize * 4;
    let uniforms = ctx.upload(bytemuck::cast_slice(uniforms), MemCategory::Scratch)?;
    let tokens = ctx.alloc(batch as u64 * 4, MemCategory::Scratch)?;
    let probs = ctx.alloc((batch * row) as u64, MemCategory::Scratch)?;
    // One workgroup per row; rows over a binding are sampled a window of rows at a time.
    launch_rows(
        ctx,
        Shader::Sample,
        "sample",
        &[Arg::Rows(&logits_buffer, row), Arg::Rows(&uniforms, 4)],
        &[Arg::Rows(&tokens, 4), Arg::Rows(&probs, row)],
        batch,
        |_, rows| {
            let chunk = Params {
                batch: rows as u32,
                ..*params
            };
            (chunk, grid_1d(rows as u64, 1))
        },
    )?;
    let bytes = ctx.read(&tokens)?;
    Ok(bytemuck::pod_collect_to_vec(&bytes[..batch * 4]))
}

/// The tokens, or the host sampler's error for the first row the kernel could not sample.
fn check_tokens(
    logits: &Tensor,
    tokens: Vec<u32>,
    vocab: usize,
    suppress: Option<u32>,
) -> Result<Vec<u32>> {
    let Some(b) = tokens.iter().position(|&t| t as usize >= vocab) else {
        return Ok(tokens);
    };
    if tokens[b] != NO_TOKEN {
        return Err(config_error(format!(
            "batch row {b}: the kernel picked token {}, outside the vocabulary of {vocab}",
            tokens[b]
        )));
    }
    // The error path: read back this row only, for the host's message.
    let mut row = logits.narrow(0, b, 1)?.to_vec_f32()?;
    if let Some(token) = suppress {
        suppress_host(&mut row, vocab, token);
    }
    let detail = match checked_max(&row) {
        Err(e) => e.to_string(),
        Ok(_) => "the kernel found no token to pick".to_string(),
    };
    Err(Error::Config(format!("batch row {b}: {detail}")))
}
