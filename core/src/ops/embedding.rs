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

use lathe_shaders::{grid_1d, MemCategory, Shader};

use crate::dtype::DType;
use crate::ops::{alloc_f32, launch};
use crate::storage::{CpuStorage, Storage};
use crate::tensor::Tensor;
use crate::{Device, Error, Result};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct EmbedParams {
    n: u32,
    hidden: u32,
    tokens: u32,
    _pad: u32,
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
            let mut links = chain_links(host_ids);
            // Never bind an empty buffer (no tokens: the kernel reads nothing).
            links.resize(links.len().max(1), 0);
            let links = ctx.upload(bytemuck::cast_slice(&links), MemCategory::Scratch)?;
            let n = host_ids.len() * hidden;
            let params = EmbedParams {
                n: n as u32,
                hidden: hidden as u32,
                tokens: host_ids.len() as u32,
                _pad: 0,
            };
            let (g, i) = (
                grad.gpu_buffer().expect("gpu"),
                ids.gpu_buffer().expect("gpu"),
            );
            launch(
                ctx,
                Shader::Embedding,
                "embedding_scatter_add",
                &[&g, &i, &links],
                &[&out],
                &params,
                grid_1d(n as u64, 256),
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
        // GPU ids are read back to validate them: one u32 per token, cheap next to the model.
        let host_ids = ids.to_vec_u32()?;
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
                let params = EmbedParams {
                    n: n as u32,
                    hidden: hidden as u32,
                    tokens: host_ids.len() as u32,
                    _pad: 0,
                };
                let (w, i) = (
                    weight.gpu_buffer().expect("gpu"),
                    ids.gpu_buffer().expect("gpu"),
                );
                let entry = match weight.dtype() {
                    DType::F16 => "embedding_gather_half",
                    _ => "embedding_gather",
                };
                launch(
                    ctx,
                    Shader::Embedding,
                    entry,
                    &[&w, &i],
                    &[&out],
                    &params,
                    grid_1d(n as u64, 256),
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
