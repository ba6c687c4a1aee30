//! Dropout with a counter-based mask (torch's `nn.Dropout` semantics: zero each element with
//! probability p, scale the rest by 1 / (1 - p)).
//!
//! The mask is a pure function of (seed, element index) through an integer hash, the same on
//! the CPU and in `elementwise.wgsl`: both devices drop the same elements, nothing is stored
//! for the backward (it regenerates the mask), and a checkpointed block recomputes exactly
//! the forward it replaces.

use lathe_shaders::{grid_1d, Shader};
use rayon::prelude::*;

use crate::dtype::DType;
use crate::ops::vexp::dispatched;
use crate::ops::{alloc_f32, launch_rows, Arg, CPU_CHUNK};
use crate::storage::Storage;
use crate::tensor::Tensor;
use crate::{Device, Error, Result};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct DropoutParams {
    n: u32,
    threshold: u32,
    seed_lo: u32,
    seed_hi: u32,
    scale: f32,
    /// Flat index of the dispatch's first element (see elementwise.wgsl).
    base: u32,
    _pad: [u32; 2],
}

/// lowbias32, as `mix32` in elementwise.wgsl.
#[inline(always)]
fn mix32(v: u32) -> u32 {
    let mut x = v;
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

impl DropoutParams {
    fn new(n: usize, p: f32, seed: u64) -> DropoutParams {
        DropoutParams {
            n: n as u32,
            threshold: (p as f64 * 4_294_967_296.0).round().min(u32::MAX as f64) as u32,
            seed_lo: seed as u32,
            seed_hi: (seed >> 32) as u32,
            scale: 1.0 / (1.0 - p),
            base: 0,
            _pad: [0; 2],
        }
    }

    /// The per-call key the element hashes are salted with (computed once per call).
    fn key(&self) -> u32 {
        mix32(self.seed_lo ^ mix32(self.seed_hi ^ 0x9e37_79b9))
    }
}

/// o[j] = x[j] * scale where element `base + j` is kept, else 0. Branch-free, so the hash
/// and the select vectorize.
#[inline(always)]
fn mask_body(o: &mut [f32], x: &[f32], base: u32, key: u32, params: &DropoutParams) {
    let (threshold, scale) = (params.threshold, params.scale);
    for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
        let keep = mix32((base + j as u32) ^ key) >= threshold;
        *o = if keep { x * scale } else { 0.0 };
    }
}

dispatched!(
    /// [`mask_body`] in the widest SIMD build the CPU runs (the hash's 32-bit multiplies need
    /// more than the baseline's SSE2 to vectorize).
    fn mask_chunk(o: &mut [f32], x: &[f32], base: u32, key: u32, params: &DropoutParams) -> () =
        mask_body
);

/// x * mask * scale on either device (the forward and the backward are the same map).
fn apply(x: &Tensor, params: DropoutParams) -> Result<Storage> {
    let n = x.elem_count();
    Ok(match x.device() {
        Device::Cpu => {
            let data = x.with_cpu_f32("dropout", |x| {
                let mut out = vec![0.0f32; n];
                let key = params.key();
                out.par_chunks_mut(CPU_CHUNK)
                    .zip(x.par_chunks(CPU_CHUNK))
                    .enumerate()
                    .for_each(|(c, (o, x))| mask_chunk(o, x, (c * CPU_CHUNK) as u32, key, &params));
                out
            })?;
            Tensor::cpu_f32(data, x.shape().to_vec())
        }
        Device::Gpu(ctx) => {
            let out = alloc_f32(ctx, n)?;
            let xb = x.gpu_operand()?;
            launch_rows(
                ctx,
                Shader::Elementwise,
                "dropout",
                &[Arg::Rows(&xb, 4)],
                &[Arg::Rows(&out, 4)],
                n,
                |first, count| {
                    let params = DropoutParams {
                        n: count as u32,
                        base: first as u32,
                        ..params
                    };
                    (params, grid_1d(count as u64, 256))
                },
            )?;
            Storage::Gpu(out)
        }
    })
}

impl Tensor {
    /// Zeroes each element with probability `p` (a mask drawn from `seed`) and scales the
    /// others by 1 / (1 - p). p = 0 returns the tensor itself; p must be in [0, 1).
    pub fn dropout(&self, p: f32, seed: u64) -> Result<Tensor> {
        self.expect_dtype("dropout", DType::F32)?;
        if !(0.0..1.0).contains(&p) {
            return Err(Error::shape(
                "dropout",
                format!("probability must be in [0, 1), got {p}"),
            ));
        }
        if p == 0.0 {
            return Ok(self.clone());
        }
        if self.elem_count() > u32::MAX as usize {
            return Err(Error::shape(
                "dropout",
                "more than 2^32 elements: the mask index is 32-bit",
            ));
        }
        let params = DropoutParams::new(self.elem_count(), p, seed);
        let storage = apply(self, params)?;
        Ok(Tensor::from_op(
            storage,
            self.shape().to_vec(),
            DType::F32,
            self.device(),
            "dropout",
            &[self],
            move |_, g| {
                let dx = Tensor::from_storage(
                    apply(g, params)?,
                    g.shape().to_vec(),
                    DType::F32,
                    g.device().clone(),
                );
                Ok(vec![Some(dx)])
            },
        ))
    }
}
