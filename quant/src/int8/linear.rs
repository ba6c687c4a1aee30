//! [`Int8Linear`]: y = x @ W^T + b through LLM.int8() (docs/REFERENCE.md §3).

use lathe_core::{DType, Device, Tensor};

use super::cpu::{self, Epilogue, Form, Path, GEMV_MAX_ROWS, GENERIC_ROWS_MAX};
use super::gpu;
use super::weight::{Int8Weight, Packed};
use crate::{Error, Result};

/// Which arithmetic of LLM.int8()'s forward a layer follows. Both decompose the same way
/// (outlier columns through a 16-bit-or-better path, the rest int8 with exact int32 sums);
/// they differ in roundings that move an int8 activation by one step now and then, an
/// error of the size of LLM.int8's own quantization noise, so a model matches a reference
/// implementation's logits tightly only under that implementation's variant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Int8Variant {
    /// lathe's own (docs/REFERENCE.md §3, the CUDA kernels' roundings on the 16-bit path):
    /// activations quantized from their f32 values, outlier columns where any
    /// |x[r, j]| >= threshold, the row absmax over the non-outlier *columns*, dequantized with
    /// acc * (SCA * SCB / 127^2), the outlier columns added as f16(x) * f16(dequant(W)).
    #[default]
    Lathe,
    /// bitsandbytes 0.50.2's CPU path (`MatMul8bitLt` in eval mode, backends/default/ops.py):
    /// activations rounded to f16 before anything else, outlier *entries* where |x_f16| is
    /// at least f16(threshold) (their columns are the outlier columns), the row absmax over
    /// the non-outlier *entries*, dequantized with (acc * (SCA * SCB)) * 6.200124e-05, plus
    /// the bias, plus x (f32) @ ((CB * SCB) * f32(1/127))^T over the outlier columns, in f32.
    /// For weights stored by bitsandbytes (transformers' 8-bit checkpoints), whose logits it
    /// reproduces.
    Bitsandbytes,
}

/// A linear layer with a frozen int8 weight.
///
/// Forward, on CPU and GPU alike, in the [`Int8Variant::Lathe`] arithmetic: (a) outlier
/// columns j with any |x[r, j]| >= threshold; (b) per row SCA\[r\] = max over the other columns
/// of |x[r, j]|, CA = round_ties_even(x * (127 / SCA\[r\])) (0 in outlier columns); (c) int32
/// acc = CA @ CB^T; (d) y = acc * SCA\[r\] * SCB\[o\] / 127^2 + sum over outliers of
/// f16(x[r, j]) * f16(dequant(W)[o, j]) (products and sums in f32) + bias. With
/// [`Int8Variant::Bitsandbytes`], (a), (b) and (d) change as its doc says. Backward, for
/// both: dx = dy @ dequant(W) (no dW; the bias gets a gradient when it is a variable).
#[derive(Clone, Debug)]
pub struct Int8Linear {
    /// The frozen (out, in) weight: int8 rows with an f32 scale each.
    pub weight: Int8Weight,
    /// The (out,) f32 bias, when the layer has one.
    pub bias: Option<Tensor>,
    /// Outlier threshold; 0 (or below) disables the decomposition (plain int8).
    pub threshold: f32,
    /// The forward's arithmetic ([`Int8Variant::Lathe`] unless set with
    /// [`Int8Linear::with_variant`]).
    pub variant: Int8Variant,
}

/// Which matmul kernel a forward uses (test and bench hook). `Auto` picks, on a GPU, GEMV
/// for at most 4 rows; on the CPU the blocked few-rows kernel on its best instruction path
/// (the GEMM form only past 32 rows on CPUs with neither AVX-512 VNNI nor AVX2). `Gemv`
/// takes the few-rows kernel on the CPU.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Form {
    Auto,
    Gemm,
    Gemv,
    /// CPU only: the few-rows kernel with AVX-512 VNNI (an error where the CPU lacks it).
    RowsVnni,
    /// CPU only: the few-rows kernel with AVX2.
    RowsAvx2,
    /// CPU only: the few-rows kernel in portable Rust.
    RowsGeneric,
}

impl Int8Form {
    /// The `Rows*` forms this CPU can run.
    pub fn cpu_row_forms() -> Vec<Int8Form> {
        [
            (Int8Form::RowsVnni, Path::Vnni),
            (Int8Form::RowsAvx2, Path::Avx2),
            (Int8Form::RowsGeneric, Path::Generic),
        ]
        .into_iter()
        .filter(|(_, p)| p.supported())
        .map(|(f, _)| f)
        .collect()
    }
}

/// What a forward computed on the way (test hook): quantized activations (rows, in)
/// unpadded, their scales, the outlier columns and the int32 accumulations (rows, out).
#[doc(hidden)]
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Trace {
    pub ca: Vec<i8>,
    pub sca: Vec<f32>,
    pub outliers: Vec<u32>,
    pub acc: Vec<i32>,
    pub y: Vec<f32>,
}

impl Int8Linear {
    /// The threshold transformers uses for `load_in_8bit`.
    pub const DEFAULT_THRESHOLD: f32 = 6.0;

    /// A layer over an already quantized weight. The bias (out) must be f32 on the weight's
    /// device.
    pub fn new(weight: Int8Weight, bias: Option<Tensor>, threshold: f32) -> Result<Int8Linear> {
        if let Some(b) = &bias {
            b.expect_dtype("Int8Linear::new", DType::F32)?;
            if b.shape() != [weight.out_features] {
                return Err(Error::Shape {
                    op: "Int8Linear::new",
                    detail: format!(
                        "bias of shape {:?} for {} output features",
                        b.shape(),
                        weight.out_features
                    ),
                });
            }
            if b.device() != weight.device() {
                return Err(lathe_core::Error::DeviceMismatch {
                    op: "Int8Linear::new",
                    a: weight.device().name(),
                    b: b.device().name(),
                }
                .into());
            }
        }
        Ok(Int8Linear {
            weight,
            bias,
            threshold,
            variant: Int8Variant::Lathe,
        })
    }

    /// This layer computing its forward in the `variant` arithmetic.
    pub fn with_variant(self, variant: Int8Variant) -> Int8Linear {
        Int8Linear { variant, ..self }
    }

    /// Quantizes a dense weight (out, in) and wraps it.
    pub fn from_dense(w: &Tensor, bias: Option<Tensor>, threshold: f32) -> Result<Int8Linear> {
        Int8Linear::new(Int8Weight::quantize(w)?, bias, threshold)
    }

    /// The device the weight is on.
    pub fn device(&self) -> &Device {
        self.weight.device()
    }

    /// y (..., out) for x (..., in) f32, recording the backward when x or the bias tracks
    /// gradients.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Int8Form::Auto)
    }

    /// [`Self::forward`] with the matmul kernel chosen by the caller.
    #[doc(hidden)]
    pub fn forward_with(&self, x: &Tensor, form: Int8Form) -> Result<Tensor> {
        let (rows, out_shape) = self.check_input(x)?;
        let (cols, outs) = (self.weight.in_features, self.weight.out_features);
        lathe_core::flops::add_product(rows, outs, cols);
        let y = match self.device() {
            Device::Cpu => {
                let (y, _) = self.cpu_forward(x, rows, form, false)?;
                Tensor::from_vec(y, &out_shape, &Device::Cpu)?
            }
            Device::Gpu(_) => {
                let form = resolve(form, rows)?;
                let bias = self.bias.as_ref().map(Tensor::detach);
                let f = gpu::forward(
                    &self.weight,
                    x,
                    rows,
                    (self.threshold, self.variant),
                    bias.as_ref(),
                    form,
                    false,
                )?;
                Tensor::from_gpu_buffer(f.y, &out_shape, DType::F32, self.device())?
            }
        };
        Ok(self.record_backward(y, x, rows))
    }

    /// The forward's intermediates, read back to the host (test hook).
    #[doc(hidden)]
    pub fn trace(&self, x: &Tensor, form: Int8Form) -> Result<Int8Trace> {
        let (rows, _) = self.check_input(x)?;
        let (cols, outs) = (self.weight.in_features, self.weight.out_features);
        match self.device() {
            Device::Cpu => Ok(self
                .cpu_forward(x, rows, form, true)?
                .1
                .expect("a trace was asked for")),
            Device::Gpu(ctx) => {
                let form = resolve(form, rows)?;
                let bias = self.bias.as_ref().map(Tensor::detach);
                let run = |acc: bool| {
                    gpu::forward(
                        &self.weight,
                        x,
                        rows,
                        (self.threshold, self.variant),
                        bias.as_ref(),
                        form,
                        acc,
                    )
                };
                let f = run(false)?;
                let acc_run = run(true)?;
                let words = ctx.read(&f.ca)?;
                let in4 = self.weight.in4();
                let ca = (0..rows)
                    .flat_map(|r| (0..cols).map(move |j| (r, j)))
                    .map(|(r, j)| words[r * in4 * 4 + j] as i8)
                    .collect();
                let sca = bytemuck::pod_collect_to_vec(&ctx.read(&f.sca)?[..rows * 4]);
                let list: Vec<u32> = bytemuck::pod_collect_to_vec(&ctx.read(&f.list)?);
                let outliers = list[1..1 + list[0] as usize].to_vec();
                let acc = bytemuck::pod_collect_to_vec(&ctx.read(&acc_run.y)?[..rows * outs * 4]);
                let y = bytemuck::pod_collect_to_vec(&ctx.read(&f.y)?[..rows * outs * 4]);
                Ok(Int8Trace {
                    ca,
                    sca,
                    outliers,
                    acc,
                    y,
                })
            }
        }
    }

    /// Checks x against the layer: returns the row count and the output shape.
    fn check_input(&self, x: &Tensor) -> Result<(usize, Vec<usize>)> {
        x.expect_dtype("Int8Linear::forward", DType::F32)?;
        if x.device() != self.device() {
            return Err(lathe_core::Error::DeviceMismatch {
                op: "Int8Linear::forward",
                a: x.device().name(),
                b: self.device().name(),
            }
            .into());
        }
        let inn = self.weight.in_features;
        if x.rank() == 0 || x.shape()[x.rank() - 1] != inn {
            return Err(Error::Shape {
                op: "Int8Linear::forward",
                detail: format!(
                    "input of shape {:?} for a layer with {inn} input features (expected (..., {inn}))",
                    x.shape()
                ),
            });
        }
        let rows = x.elem_count() / inn.max(1);
        let mut out_shape = x.shape().to_vec();
        *out_shape.last_mut().expect("rank >= 1") = self.weight.out_features;
        Ok((rows, out_shape))
    }

    /// The CPU forward: y, and the trace when asked for (not built otherwise: copies).
    fn cpu_forward(
        &self,
        x: &Tensor,
        rows: usize,
        form: Int8Form,
        traced: bool,
    ) -> Result<(Vec<f32>, Option<Int8Trace>)> {
        let kernel = resolve_cpu(form, rows)?;
        let (cols, outs) = (self.weight.in_features, self.weight.out_features);
        let Packed::Cpu { cb, scb } = &self.weight.packed else {
            return Err(super::weight::gpu_missing());
        };
        let xv = x.to_vec_f32()?;
        let (outliers, ca, sca) = match self.variant {
            Int8Variant::Lathe => {
                let outliers = cpu::outlier_columns(&xv, rows, cols, self.threshold);
                let mut skip = vec![false; cols];
                for &j in &outliers {
                    skip[j as usize] = true;
                }
                let (ca, sca) = cpu::quantize_rows(&xv, rows, cols, Some(&skip));
                (outliers, ca, sca)
            }
            Int8Variant::Bitsandbytes => {
                cpu::bnb_quantize_activations(&xv, rows, cols, self.threshold)
            }
        };
        let stride = cpu::padded(cols);
        let acc = match kernel {
            CpuKernel::Gemm => cpu::int8_matmul(&ca, cb, rows, outs, stride, Form::Gemm),
            CpuKernel::Rows(path) => cpu::int8_matmul_rows(&ca, cb, rows, outs, stride, path),
        };
        let bias = self.bias.as_ref().map(Tensor::to_vec_f32).transpose()?;
        let epilogue = Epilogue {
            x: &xv,
            cols,
            sca: &sca,
            cb,
            scb,
            stride,
            outliers: &outliers,
            bias: bias.as_deref(),
        };
        let y = match self.variant {
            Int8Variant::Lathe => cpu::epilogue(&acc, rows, outs, &epilogue),
            Int8Variant::Bitsandbytes => cpu::epilogue_bnb(&acc, rows, outs, &epilogue),
        };
        let trace = traced.then(|| Int8Trace {
            ca: (0..rows)
                .flat_map(|r| ca[r * stride..r * stride + cols].iter().copied())
                .collect(),
            sca,
            outliers,
            acc,
            y: y.clone(),
        });
        Ok((y, trace))
    }

    /// Records dx = dy @ dequant(W) and the bias gradient sum_rows(dy).
    fn record_backward(&self, y: Tensor, x: &Tensor, rows: usize) -> Tensor {
        let weight = self.weight.clone();
        let x_shape = x.shape().to_vec();
        let outs = weight.out_features;
        let mut inputs = vec![x];
        if let Some(b) = &self.bias {
            inputs.push(b);
        }
        let has_bias = self.bias.is_some();
        y.with_backward("int8_linear", &inputs, move |_, g| {
            lathe_core::flops::add_product(rows, weight.in_features, outs);
            let dx = input_grad(&weight, g, rows)
                .and_then(|dx| Ok(dx.reshape(&x_shape)?))
                .map_err(|e| lathe_core::Error::Backward(format!("int8_linear: {e}")))?;
            let mut grads = vec![Some(dx)];
            if has_bias {
                grads.push(Some(g.reshape(&[rows, outs])?.sum(0)?));
            }
            Ok(grads)
        })
    }
}

/// dx (rows, in) = dy @ dequant(W) on the weight's device. REFERENCE §3 says bitsandbytes
/// does this as a 16-bit matmul; we accumulate in f32 with f32 dequantized weights, the more
/// precise choice (and the one the tests hold to 1e-5 against `dy @ W.dequantize()`).
///
/// The same for both [`Int8Variant`]s: bitsandbytes 0.50.2's `MatMul8bitLt.backward`
/// (autograd/_functions.py) computes grad_A = grad_output.to(A.dtype) @ (CB.to(A.dtype) *
/// (SCB * (1 / 127))), in the input's dtype, f32 for an f32 model: the same product with
/// each weight dequantized as q * (scale * f32(1/127)) rather than (q * scale) / 127, at
/// most an ulp apart, below the f32 GEMM's own summation-order rounding, which no two
/// BLAS share anyway. (Its training-mode CPU forward is another matter: `bnb.matmul` takes
/// `MatMul8bitFp`, a dense f32 matmul with the dequantized weight, when the module is in
/// training mode on the CPU; the `Bitsandbytes` variant is its eval-mode `MatMul8bitLt`.)
fn input_grad(weight: &Int8Weight, dy: &Tensor, rows: usize) -> Result<Tensor> {
    let shape = [rows, weight.in_features];
    match &weight.packed {
        Packed::Cpu { cb, scb } => {
            let g = dy.to_vec_f32()?;
            let dx = cpu::backward_dx(
                &g,
                cb,
                scb,
                rows,
                weight.out_features,
                weight.in_features,
                cpu::padded(weight.in_features),
            )?;
            Ok(Tensor::from_vec(dx, &shape, &Device::Cpu)?)
        }
        Packed::Gpu { .. } => {
            let dx = gpu::backward_dx(weight, dy, rows)?;
            Ok(Tensor::from_gpu_buffer(
                dx,
                &shape,
                DType::F32,
                weight.device(),
            )?)
        }
    }
}

/// The GPU kernel of a form.
fn resolve(form: Int8Form, rows: usize) -> Result<Form> {
    match form {
        Int8Form::Auto if rows <= GEMV_MAX_ROWS => Ok(Form::Gemv),
        Int8Form::Auto | Int8Form::Gemm => Ok(Form::Gemm),
        Int8Form::Gemv if rows <= GEMV_MAX_ROWS => Ok(Form::Gemv),
        Int8Form::Gemv => Err(gemv_rows(rows)),
        Int8Form::RowsVnni | Int8Form::RowsAvx2 | Int8Form::RowsGeneric => Err(Error::Shape {
            op: "Int8Linear::forward",
            detail: format!("the {form:?} form runs on the CPU only"),
        }),
    }
}

/// The CPU's matmul kernels.
#[derive(Clone, Copy, Debug)]
enum CpuKernel {
    Gemm,
    Rows(Path),
}

/// The CPU kernel of a form (the crossover measured with `benches/int8.rs`).
fn resolve_cpu(form: Int8Form, rows: usize) -> Result<CpuKernel> {
    let path = |path: Path| {
        if path.supported() {
            Ok(CpuKernel::Rows(path))
        } else {
            Err(Error::Shape {
                op: "Int8Linear::forward",
                detail: format!("this CPU lacks the instructions of the {form:?} form"),
            })
        }
    };
    match form {
        Int8Form::Auto if Path::best() != Path::Generic || rows <= GENERIC_ROWS_MAX => {
            Ok(CpuKernel::Rows(Path::best()))
        }
        Int8Form::Auto | Int8Form::Gemm => Ok(CpuKernel::Gemm),
        Int8Form::Gemv if rows <= GEMV_MAX_ROWS => Ok(CpuKernel::Rows(Path::best())),
        Int8Form::Gemv => Err(gemv_rows(rows)),
        Int8Form::RowsVnni => path(Path::Vnni),
        Int8Form::RowsAvx2 => path(Path::Avx2),
        Int8Form::RowsGeneric => path(Path::Generic),
    }
}

fn gemv_rows(rows: usize) -> Error {
    Error::Shape {
        op: "Int8Linear::forward",
        detail: format!("the GEMV form takes at most {GEMV_MAX_ROWS} rows, got {rows}"),
    }
}
