//! [`Int8Weight`]: a weight matrix (out, in) stored int8 row-wise with f32 absmax scales.

use std::sync::Arc;

use lathe_core::{DType, Device, MemCategory, Tensor};
use lathe_shaders::GpuBuffer;

use super::cpu;
use super::gpu;
use crate::{Error, Result};

/// Padded int8 rows and scales on the host.
pub(crate) type HostPacked = (Arc<Vec<i8>>, Arc<Vec<f32>>);

/// Where the packed values live.
#[derive(Clone, Debug)]
pub(crate) enum Packed {
    /// Padded int8 rows (the same bytes as the GPU's words on a little-endian host).
    Cpu {
        cb: Arc<Vec<i8>>,
        scb: Arc<Vec<f32>>,
    },
    /// `out * in4` u32 words (4 int8 each, little-endian) and `out` f32 scales, two buffers
    /// charged to [`MemCategory::Weights`].
    Gpu { cb: GpuBuffer, scb: GpuBuffer },
}

/// An LLM.int8() weight (docs/REFERENCE.md §3): SCB\[o\] = max_j |W[o, j]| (f32),
/// CB = round_ties_even(W * (127 / SCB\[o\])) as int8 (a zero row: scale 0, values 0), packed
/// four per u32 little-endian with rows padded to a multiple of 4 elements. About one byte
/// per parameter plus four per output row.
#[derive(Clone, Debug)]
pub struct Int8Weight {
    pub(crate) out_features: usize,
    pub(crate) in_features: usize,
    pub(crate) device: Device,
    pub(crate) packed: Packed,
}

impl Int8Weight {
    /// Quantizes `w` (out, in), f32 or f16, on its own device (a GPU weight never leaves it).
    pub fn quantize(w: &Tensor) -> Result<Int8Weight> {
        if w.rank() != 2 {
            return Err(Error::Shape {
                op: "Int8Weight::quantize",
                detail: format!("weight must be (out, in), got shape {:?}", w.shape()),
            });
        }
        if w.dtype() == DType::U32 {
            return Err(lathe_core::Error::DType {
                op: "Int8Weight::quantize",
                expected: DType::F32,
                got: DType::U32,
            }
            .into());
        }
        let (out_features, in_features) = (w.shape()[0], w.shape()[1]);
        let w = w.detach();
        let packed = match w.device() {
            Device::Cpu => {
                let values = w.to_vec_f32()?;
                let (cb, scb) = cpu::quantize_rows(&values, out_features, in_features, None);
                Packed::Cpu {
                    cb: Arc::new(cb),
                    scb: Arc::new(scb),
                }
            }
            Device::Gpu(ctx) => {
                let w32 = w.to_dtype(DType::F32)?;
                let (cb, scb) = gpu::quantize_weight(ctx, &w32, out_features, in_features)?;
                Packed::Gpu { cb, scb }
            }
        };
        Ok(Int8Weight {
            out_features,
            in_features,
            device: w.device().clone(),
            packed,
        })
    }

    /// Quantizes a host weight (out, in) given row by row: `fill(r, row)` writes row `r` as
    /// f32 (from f16, bf16 or a file's bytes), so the weight is never whole in f32. The result
    /// lives on the host; equal to [`Int8Weight::quantize`] of the same values.
    pub fn quantize_rows(
        out_features: usize,
        in_features: usize,
        fill: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Int8Weight {
        let (cb, scb) = cpu::quantize_rows_with(out_features, in_features, fill);
        Int8Weight {
            out_features,
            in_features,
            device: Device::Cpu,
            packed: Packed::Cpu {
                cb: Arc::new(cb),
                scb: Arc::new(scb),
            },
        }
    }

    /// A weight from bitsandbytes' stored form: int8 values CB (out, in) row-major and the
    /// row scales SCB (out), as `Int8Params` saves them (`weight` and `SCB`). Nothing is
    /// requantized; the values are only padded to lathe's row layout. On the host.
    pub fn from_parts(
        out_features: usize,
        in_features: usize,
        values: &[i8],
        scales: Vec<f32>,
    ) -> Result<Int8Weight> {
        let expected = out_features.checked_mul(in_features);
        if expected != Some(values.len()) || scales.len() != out_features {
            return Err(Error::Shape {
                op: "Int8Weight::from_parts",
                detail: format!(
                    "{} values and {} scales for a ({out_features}, {in_features}) weight",
                    values.len(),
                    scales.len()
                ),
            });
        }
        if let Some(bad) = scales.iter().find(|s| !s.is_finite() || **s < 0.0) {
            return Err(Error::Shape {
                op: "Int8Weight::from_parts",
                detail: format!("row scale {bad} is not a finite absmax >= 0"),
            });
        }
        let stride = cpu::padded(in_features);
        let mut cb = vec![0i8; out_features * stride];
        if in_features > 0 {
            for (dst, src) in cb.chunks_mut(stride).zip(values.chunks(in_features)) {
                dst[..in_features].copy_from_slice(src);
            }
        }
        Ok(Int8Weight {
            out_features,
            in_features,
            device: Device::Cpu,
            packed: Packed::Cpu {
                cb: Arc::new(cb),
                scb: Arc::new(scales),
            },
        })
    }

    /// Rows of the weight (output features).
    pub fn out_features(&self) -> usize {
        self.out_features
    }
    /// Columns of the weight (input features).
    pub fn in_features(&self) -> usize {
        self.in_features
    }
    /// The device the packed weight and its scales live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Packed u32 words per row.
    pub(crate) fn in4(&self) -> usize {
        cpu::padded(self.in_features) / 4
    }

    /// Bytes of the packed values and scales (not counting allocator rounding).
    pub fn bytes(&self) -> u64 {
        (self.out_features * (self.in4() * 4 + 4)) as u64
    }

    /// The padded int8 rows and the scales on the host (downloads a GPU weight).
    pub(crate) fn host(&self) -> Result<HostPacked> {
        match &self.packed {
            Packed::Cpu { cb, scb } => Ok((cb.clone(), scb.clone())),
            Packed::Gpu { cb, scb } => {
                let ctx = self.device.gpu_context().ok_or_else(gpu_missing)?;
                let words = ctx.read(cb)?;
                let n = self.out_features * self.in4() * 4;
                let values = words[..n].iter().map(|&b| b as i8).collect();
                let scales = bytemuck::pod_collect_to_vec(&ctx.read(scb)?[..self.out_features * 4]);
                Ok((Arc::new(values), Arc::new(scales)))
            }
        }
    }

    /// The int8 values (out, in) without padding, on the host: for tests and inspection.
    pub fn values(&self) -> Result<Vec<i8>> {
        let (cb, _) = self.host()?;
        let stride = cpu::padded(self.in_features);
        Ok((0..self.out_features)
            .flat_map(|o| {
                cb[o * stride..o * stride + self.in_features]
                    .iter()
                    .copied()
            })
            .collect())
    }

    /// The scales SCB (out) on the host.
    pub fn scales(&self) -> Result<Vec<f32>> {
        Ok(self.host()?.1.to_vec())
    }

    /// CB * SCB / 127 as an f32 tensor (out, in) on the weight's device (computed on the host).
    pub fn dequantize(&self) -> Result<Tensor> {
        let (cb, scb) = self.host()?;
        let stride = cpu::padded(self.in_features);
        let data: Vec<f32> = (0..self.out_features)
            .flat_map(|o| {
                let (cb, scale) = (&cb, scb[o]);
                (0..self.in_features).map(move |j| cpu::dequant(cb[o * stride + j], scale))
            })
            .collect();
        Ok(Tensor::from_vec(
            data,
            &[self.out_features, self.in_features],
            &self.device,
        )?)
    }

    /// A copy on `device` (GPU bytes charged to [`MemCategory::Weights`]).
    pub fn to_device(&self, device: &Device) -> Result<Int8Weight> {
        if device == &self.device {
            return Ok(self.clone());
        }
        let (cb, scb) = self.host()?;
        let packed = match device {
            Device::Cpu => Packed::Cpu { cb, scb },
            Device::Gpu(ctx) => Packed::Gpu {
                cb: ctx.upload(&i8_bytes(&cb), MemCategory::Weights)?,
                scb: ctx.upload(bytemuck::cast_slice(&scb), MemCategory::Weights)?,
            },
        };
        Ok(Int8Weight {
            out_features: self.out_features,
            in_features: self.in_features,
            device: device.clone(),
            packed,
        })
    }
}

/// int8 values as little-endian packed bytes (element j in byte j of the stream).
pub(crate) fn i8_bytes(v: &[i8]) -> Vec<u8> {
    v.iter().map(|&x| x as u8).collect()
}

pub(crate) fn gpu_missing() -> Error {
    Error::Gpu(lathe_shaders::Error::Device(
        "a GPU int8 weight without a GPU context".into(),
    ))
}
