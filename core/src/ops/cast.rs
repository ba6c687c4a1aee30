//! dtype conversion: f32 <-> f16 and u32 -> f32.
//!
//! f32 -> f16 rounds to nearest, ties to even, on both devices: the `half` crate on the CPU,
//! WGSL `pack2x16float` on the GPU (one invocation per pair of elements, since GPU f16 tensors
//! are packed two per u32 word; an odd count pads the last word with a zero half). On normal
//! range inputs the GPU bits equal the CPU bits (tested in `core/tests/ops_layout.rs`);
//! values outside the f16 range are unspecified on the GPU (WGSL leaves them indeterminate).
//!
//! Gradients flow back through f32 <-> f16 casts by casting the gradient back to the source
//! dtype; u32 -> f32 gives the ids no gradient.

use half::f16;
use lathe_shaders::{grid_1d, GpuBuffer, GpuContext, MemCategory, Shader};
use rayon::prelude::*;

use crate::dtype::DType;
use crate::ops::{alloc_f32, launch_rows, Arg, CPU_CHUNK};
use crate::storage::{CpuStorage, Storage};
use crate::tensor::Tensor;
use crate::{Device, Error, Result};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct CastParams {
    n: u32,
    _pad: [u32; 3],
}

/// Whether `from -> to` is a supported conversion; the error names a dtype that would be.
fn check_supported(from: DType, to: DType) -> Result<()> {
    match (from, to) {
        (DType::F32, DType::F16) | (DType::F16, DType::F32) | (DType::U32, DType::F32) => Ok(()),
        // Only f32 converts to f16, and nothing converts to u32.
        (_, DType::F16) => Err(Error::DType {
            op: "to_dtype (only f32 converts to f16)",
            expected: DType::F32,
            got: from,
        }),
        _ => Err(Error::DType {
            op: "to_dtype (nothing converts to u32)",
            expected: to,
            got: from,
        }),
    }
}

/// Maps a host slice in parallel chunks.
fn par_map<A: Sync, B: Send + Default + Clone>(x: &[A], f: impl Fn(&A) -> B + Sync) -> Vec<B> {
    let mut out = vec![B::default(); x.len()];
    out.par_chunks_mut(CPU_CHUNK)
        .zip(x.par_chunks(CPU_CHUNK))
        .for_each(|(o, x)| {
            for (o, x) in o.iter_mut().zip(x) {
                *o = f(x);
            }
        });
    out
}

fn cpu_cast(t: &Tensor, to: DType) -> Result<CpuStorage> {
    let storage = t.storage();
    let Storage::Cpu(host) = &*storage else {
        unreachable!("checked by check_supported on a cpu tensor")
    };
    Ok(match (&**host, to) {
        (CpuStorage::F32(x), DType::F16) => CpuStorage::F16(par_map(x, |v| f16::from_f32(*v))),
        (CpuStorage::F16(x), DType::F32) => CpuStorage::F32(par_map(x, |v| v.to_f32())),
        (CpuStorage::U32(x), DType::F32) => CpuStorage::F32(par_map(x, |v| *v as f32)),
        _ => unreachable!("checked by check_supported on a cpu tensor"),
    })
}

/// Bytes of a GPU buffer holding `n` f16 values (two per word, at least one word).
pub(crate) fn f16_buffer_bytes(n: usize) -> u64 {
    (n.div_ceil(2).max(1) * 4) as u64
}

fn gpu_cast(
    ctx: &GpuContext,
    x: &GpuBuffer,
    n: usize,
    from: DType,
    to: DType,
) -> Result<GpuBuffer> {
    // A row is one invocation: a pair of elements for the f16 casts, one element otherwise.
    let (entry, out, per_row, x_bytes, out_bytes) = match (from, to) {
        (DType::F32, DType::F16) => (
            "f32_to_f16",
            ctx.alloc(f16_buffer_bytes(n), MemCategory::Activations)?,
            2,
            8,
            4,
        ),
        (DType::F16, DType::F32) => ("f16_to_f32", alloc_f32(ctx, n)?, 2, 4, 8),
        _ => ("u32_to_f32", alloc_f32(ctx, n)?, 1, 4, 4),
    };
    launch_rows(
        ctx,
        Shader::Copy,
        entry,
        &[Arg::Rows(x, x_bytes)],
        &[Arg::Rows(&out, out_bytes)],
        n.div_ceil(per_row),
        |first, rows| {
            let elems = (rows * per_row).min(n - first * per_row);
            let params = CastParams {
                n: elems as u32,
                _pad: [0; 3],
            };
            (params, grid_1d(rows as u64, 256))
        },
    )?;
    Ok(out)
}

pub(crate) fn to_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let from = t.dtype();
    if from == dtype {
        return Ok(t.clone());
    }
    check_supported(from, dtype)?;
    let n = t.elem_count();
    let storage = match t.device() {
        Device::Cpu => Storage::cpu(cpu_cast(t, dtype)?),
        Device::Gpu(ctx) => {
            if n > u32::MAX as usize {
                return Err(Error::shape(
                    "to_dtype",
                    format!("{n} elements are over the GPU limit of 2^32"),
                ));
            }
            let x = t.gpu_operand()?;
            Storage::Gpu(gpu_cast(ctx, &x, n, from, dtype)?)
        }
    };
    Ok(Tensor::from_op(
        storage,
        t.shape().to_vec(),
        dtype,
        t.device(),
        "to_dtype",
        &[t],
        move |_, g| match from {
            // Ids are not differentiable.
            DType::U32 => Ok(vec![None]),
            _ => Ok(vec![Some(g.to_dtype(from)?)]),
        },
    ))
}
