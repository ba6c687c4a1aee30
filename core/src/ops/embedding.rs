//! Embedding lookup: rows of a (V, H) weight gathered by u32 ids of any shape.
//!
//! Ids are validated on the host on both devices: GPU ids are read back (they are small, one
//! u32 per token), so an out-of-range id is `Error::IndexOutOfRange` instead of a silent
//! out-of-bounds read. The host copy is kept for the backward.
//!
//! Backward to the weight is a scatter-add made deterministic: one GPU invocation per
//! (token i, dim d); only the first token with each id writes, and it sums the gradients of
//! every token with that id in increasing token order (the CPU order, so both devices agree
//! bit for bit). Rather than scanning all tokens for matches (O(N^2 H)), each first occurrence
//! walks a chain of "next token with the same id" links built on the host from the ids in
//! O(N), so the whole backward is O(N H) work. Rows of unused ids are zero. Ids get no
//! gradient.

use std::collections::HashMap;

use lathe_shaders::{grid_1d, GpuContext, MemCategory, Shader, View};

use crate::dtype::DType;
use crate::ops::{alloc_f32, launch_views, rows_fitting_or_err};
use crate::storage::{CpuStorage, Storage};
use crate::tensor::Tensor;
use crate::{Device, Error, Result};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct EmbedParams {
    n: u32,
    hidden: u32,
    tokens: u32,
    first_id: u32,
    ids_bound: u32,
    _pad: [u32; 3],
}

/// The GPU side of a gather or scatter: tokens a chunk at a time (their ids, links and rows
/// of the (tokens, H) side in windows that fit a binding), and for each chunk the (V, H)
/// table a window of rows at a time; each dispatch only touches ids inside its window.
/// With everything bindable this is one dispatch. `dispatch(tokens, table_window, params)`
/// launches one pair of windows.
fn visit_windows(
    ctx: &GpuContext,
    entry: &'static str,
    token_row_bytes: &[usize],
    table_row_bytes: usize,
    (tokens, vocab, hidden): (usize, usize, usize),
    mut dispatch: impl FnMut(std::ops::Range<usize>, (u64, u64), EmbedParams) -> Result<()>,
) -> Result<()> {
    let token_chunk = rows_fitting_or_err(ctx, Shader::Embedding, entry, token_row_bytes, tokens)?;
    let table_chunk =
        rows_fitting_or_err(ctx, Shader::Embedding, entry, &[table_row_bytes], vocab)?;
    for t0 in (0..tokens.max(1)).step_by(token_chunk) {
        let tn = token_chunk.min(tokens.saturating_sub(t0));
        for v0 in (0..vocab).step_by(table_chunk) {
            let vn = table_chunk.min(vocab - v0);
            let params = EmbedParams {
                n: (tn * hidden) as u32,
                hidden: hidden as u32,
                tokens: tn as u32,
                first_id: v0 as u32,
                ids_bound: vn as u32,
                _pad: [0; 3],
            };
            let table = ((v0 * table_row_bytes) as u64, (vn * table_row_bytes) as u64);
            dispatch(t0..t0 + tn, table, params)?;
        }
    }
    Ok(())
}

/// links[i]: the next token with ids[i] (N when none); links[N + i]: 1 when token i is the
/// first with its id.
fn chain_links(ids: &[u32]) -> Vec<u32> {
    let n = ids.len();
    let mut links = vec![n as u32; n];
    links.resize(2 * n, 0);
    let mut last: HashMap<u32, usize> = HashMap::new();
    for (i, &id) in ids.iter().enumerate() {
        match last.insert(id, i) {
            Some(previous) => links[previous] = i as u32,
            None => links[n + i] = 1,
        }
    }
    links
}

fn cpu_gather(weight: &[f32], ids: &[u32], hidden: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(ids.len() * hidden);
    for &id in ids {
        let row = id as usize * hidden;
        out.extend_from_slice(&weight[row..row + hidden]);
    }
    out
}

/// As [`cpu_gather`] from an f16 table (rows widened exactly).
fn cpu_gather_half(weight: &[half::f16], ids: &[u32], hidden: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(ids.len() * hidden);
    for &id in ids {
        let row = id as usize * hidden;
        out.extend(weight[row..row + hidden].iter().map(|x| x.to_f32()));
    }
    out
}

fn cpu_scatter_add(grad: &[f32], ids: &[u32], vocab: usize, hidden: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; vocab * hidden];
    for (i, &id) in ids.iter().enumerate() {
        let row = id as usize * hidden;
        for (o, g) in out[row..row + hidden]
            .iter_mut()
            .zip(&grad[i * hidden..(i + 1) * hidden])
        {
            *o += g;
        }
    }
    out
}

/// The weight gradient (V, H) from the output gradient (..., H) on its device.
fn scatter_add(
    grad: &Tensor,
    ids: &Tensor,
    host_ids: &[u32],
    vocab: usize,
    hidden: usize,
) -> Result<Tensor> {
    let storage = match grad.device() {
        Device::Cpu => {
            let data =
                grad.with_cpu_f32("embedding", |g| cpu_scatter_add(g, host_ids, vocab, hidden))?;
            Tensor::cpu_f32(data, vec![vocab, hidden])
        }
        Device::Gpu(ctx) => {
            let out =
                ctx.alloc_zeroed((vocab * hidden).max(1) as u64 * 4, MemCategory::Activations)?;
            let (g, i) = (grad.gpu_operand()?, ids.gpu_operand()?);
            let entry = "embedding_scatter_add";
            let row = hidden * 4;
            let sizes = (host_ids.len(), vocab, hidden);
            visit_windows(
                ctx,
                entry,
                &[row, 4, 8],
                row,
                sizes,
                |toks, table, params| {
                    // Links are per chunk of tokens, indexed from the chunk's first token.
                    let mut links = chain_links(&host_ids[toks.clone()]);
                    // Never bind an empty buffer (no tokens: the kernel reads nothing).
                    links.resize(links.len().max(1), 0);
                    let links = ctx.upload(bytemuck::cast_slice(&links), MemCategory::Scratch)?;
                    let views = [
                        View::window(&g, (toks.start * row) as u64, (toks.len() * row) as u64),
                        View::window(&i, toks.start as u64 * 4, toks.len() as u64 * 4),
                        View::whole(&links),
                        View::window(&out, table.0, table.1),
                    ];
                    let grid = grid_1d(params.n as u64, 256);
                    launch_views(ctx, Shader::Embedding, entry, &views, 3, &params, grid)
                },
            )?;
            Storage::Gpu(out)
        }
    };
    Ok(Tensor::from_storage(
        storage,
        vec![vocab, hidden],
        DType::F32,
        grad.device().clone(),
    ))
}

impl Tensor {
    /// Rows of `weight` (V, H) f32 or f16 (rows widened to f32) at `ids` (u32, any shape): output (ids.shape..., H).
    /// An id >= V is `Error::IndexOutOfRange`. Gradients flow to the weight only.
    pub fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
        ids.expect_dtype("embedding", DType::U32)?;
        // GPU ids are read back to validate them: one u32 per token, cheap next to the model.
        Tensor::embedding_with_host_ids(weight, ids, ids.to_vec_u32()?)
    }

    /// [`Tensor::embedding`] given the host copy of `ids`' values, so GPU ids are not read
    /// back (a wait for the queue): for index tensors built on the host and used many times,
    /// such as a packed layout's gathers, run in every layer. `host_ids` must hold exactly
    /// the values of `ids` (their count is checked; the values are what the backward uses).
    pub fn embedding_with_host_ids(
        weight: &Tensor,
        ids: &Tensor,
        host_ids: Vec<u32>,
    ) -> Result<Tensor> {
        if weight.dtype() != DType::F16 {
            weight.expect_dtype("embedding", DType::F32)?;
        }
        ids.expect_dtype("embedding", DType::U32)?;
        weight.expect_same_device("embedding", ids)?;
        let [vocab, hidden] = *weight.shape() else {
            return Err(Error::shape(
                "embedding",
                format!("weight must be (V, H), got {:?}", weight.shape()),
            ));
        };
        if host_ids.len() != ids.shape().iter().product::<usize>() {
            return Err(Error::shape(
                "embedding",
                format!(
                    "{} host ids for ids of shape {:?}",
                    host_ids.len(),
                    ids.shape()
                ),
            ));
        }
        if let Some(&bad) = host_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::IndexOutOfRange {
                op: "embedding",
                index: bad as usize,
                size: vocab,
            });
        }
        let mut out_shape = ids.shape().to_vec();
        out_shape.push(hidden);
        let n = host_ids.len() * hidden;
        let storage = match weight.device() {
            Device::Cpu => {
                let data = match &*weight.storage() {
                    Storage::Cpu(s) => match &**s {
                        CpuStorage::F16(w) => cpu_gather_half(w, &host_ids, hidden),
                        _ => weight
                            .with_cpu_f32("embedding", |w| cpu_gather(w, &host_ids, hidden))?,
                    },
                    Storage::Gpu(_) => unreachable!("a CPU tensor has CPU storage"),
                };
                Tensor::cpu_f32(data, out_shape.clone())
            }
            Device::Gpu(ctx) => {
                if n > u32::MAX as usize {
                    return Err(Error::shape(
                        "embedding",
                        format!("{n} output elements are over the GPU limit of 2^32"),
                    ));
                }
                let out = alloc_f32(ctx, n)?;
                let (w, i) = (weight.gpu_operand()?, ids.gpu_operand()?);
                let (entry, table_row) = match weight.dtype() {
                    DType::F16 => ("embedding_gather_half", hidden * 2),
                    _ => ("embedding_gather", hidden * 4),
                };
                let row = hidden * 4;
                let sizes = (host_ids.len(), vocab, hidden);
                visit_windows(
                    ctx,
                    entry,
                    &[4, row],
                    table_row,
                    sizes,
                    |toks, table, params| {
                        let views = [
                            View::window(&w, table.0, table.1),
                            View::window(&i, toks.start as u64 * 4, toks.len() as u64 * 4),
                            View::window(
                                &out,
                                (toks.start * row) as u64,
                                (toks.len() * row) as u64,
                            ),
                        ];
                        let grid = grid_1d(params.n as u64, 256);
                        launch_views(ctx, Shader::Embedding, entry, &views, 2, &params, grid)
                    },
                )?;
                Storage::Gpu(out)
            }
        };
        let saved_ids = ids.detach();
        let weight_dtype = weight.dtype();
        Ok(Tensor::from_op(
            storage,
            out_shape,
            DType::F32,
            weight.device(),
            "embedding",
            &[weight, ids],
            move |_, g| {
                let gw = scatter_add(g, &saved_ids, &host_ids, vocab, hidden)?;
                let gw = match weight_dtype {
                    DType::F32 => gw,
                    other => gw.to_dtype(other)?,
                };
                Ok(vec![Some(gw), None])
            },
        ))
    }
}
