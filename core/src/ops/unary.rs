//! Unary elementwise ops: fill, affine scale (x * a + b), and the activations GELU (erf and
//! tanh forms), SiLU and ReLU with their backwards.
//!
//! The activation math is written once per device, line for line the same (see
//! `elementwise.wgsl`): erf is a rational approximation without `exp`, tanh and sigmoid use
//! `exp` of a non-positive argument only, so CPU and GPU agree to rounding and nothing
//! overflows.

use lathe_shaders::{grid_1d, GpuBuffer, GpuContext, Shader};
use rayon::prelude::*;

use crate::dtype::DType;
use crate::ops::vexp::{dispatched, exp_nonpositive};
use crate::ops::{alloc_f32, launch_rows, Arg, CPU_CHUNK};
use crate::storage::Storage;
use crate::tensor::Tensor;
use crate::{Device, Result};

/// Which GELU formula: `Erf` is the exact form (torch `gelu`), `Tanh` the approximation of
/// GPT-2 (torch `gelu(approximate="tanh")`, HF `gelu_new` / `gelu_fast`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeluKind {
    /// `x Φ(x)` with the exact erf.
    Erf,
    /// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`.
    Tanh,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AffineParams {
    n: u32,
    _pad: u32,
    mul: f32,
    add: f32,
}

/// Fills the first `n` f32 of a buffer with `value`.
pub(crate) fn gpu_fill(ctx: &GpuContext, buffer: &GpuBuffer, n: usize, value: f32) -> Result<()> {
    launch_rows(
        ctx,
        Shader::Elementwise,
        "fill",
        &[],
        &[Arg::Rows(buffer, 4)],
        n,
        |_, count| {
            let params = AffineParams {
                n: count as u32,
                _pad: 0,
                mul: 0.0,
                add: value,
            };
            (params, grid_1d(count as u64, 256))
        },
    )
}

impl Tensor {
    /// x * mul + add, elementwise.
    pub fn affine(&self, mul: f32, add: f32) -> Result<Tensor> {
        self.expect_dtype("affine", DType::F32)?;
        let n = self.elem_count();
        let storage = match self.device() {
            Device::Cpu => {
                let data = self.with_cpu_f32("affine", |x| {
                    let mut out = vec![0.0f32; n];
                    out.par_chunks_mut(CPU_CHUNK)
                        .zip(x.par_chunks(CPU_CHUNK))
                        .for_each(|(o, x)| {
                            for (o, x) in o.iter_mut().zip(x) {
                                *o = x * mul + add;
                            }
                        });
                    out
                })?;
                Tensor::cpu_f32(data, self.shape().to_vec())
            }
            Device::Gpu(ctx) => {
                let out = alloc_f32(ctx, n)?;
                let x = self.gpu_operand()?;
                launch_rows(
                    ctx,
                    Shader::Elementwise,
                    "affine",
                    &[Arg::Rows(&x, 4)],
                    &[Arg::Rows(&out, 4)],
                    n,
                    |_, count| {
                        let params = AffineParams {
                            n: count as u32,
                            _pad: 0,
                            mul,
                            add,
                        };
                        (params, grid_1d(count as u64, 256))
                    },
                )?;
                Storage::Gpu(out)
            }
        };
        Ok(Tensor::from_op(
            storage,
            self.shape().to_vec(),
            DType::F32,
            self.device(),
            "affine",
            &[self],
            move |_, g| Ok(vec![Some(g.affine(mul, 0.0)?)]),
        ))
    }

    /// x * s.
    pub fn scale(&self, s: f32) -> Result<Tensor> {
        self.affine(s, 0.0)
    }
}

/// An activation, numbered as the `kind` of the WGSL kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activation {
    GeluErf = 0,
    GeluTanh = 1,
    Silu = 2,
    Relu = 3,
    Exp = 4,
}

impl Activation {
    fn name(self) -> &'static str {
        match self {
            Activation::GeluErf => "gelu_erf",
            Activation::GeluTanh => "gelu_tanh",
            Activation::Silu => "silu",
            Activation::Relu => "relu",
            Activation::Exp => "exp",
        }
    }
}

const SQRT_1_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.3989423;
/// sqrt(2 / pi)
const SQRT_2_PI: f32 = 0.7978846;
const GELU_C: f32 = 0.044715;

/// erf(x): the odd rational minimax approximation on [-4, 4] that Eigen and XLA use for f32
/// (|error| < 7e-8 before rounding); erf is +-1 in f32 beyond |x| = 4. Same as the WGSL.
pub fn erf_approx(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.7261424e-10 + 2.7706815e-08;
    p = x2 * p + -2.101024e-06;
    p = x2 * p + -5.6925062e-05;
    p = x2 * p + -7.3499064e-04;
    p = x2 * p + -2.9546e-03;
    p = x2 * p + -1.6096033e-02;
    p *= x;
    let mut q = x2 * -1.45660715e-05 + -2.1337405e-04;
    q = x2 * q + -1.682827e-03;
    q = x2 * q + -7.3733293e-03;
    q = x2 * q + -1.4264739e-02;
    (p / q).clamp(-1.0, 1.0)
}

#[inline(always)]
fn tanh_stable(u: f32) -> f32 {
    let e = exp_nonpositive(-2.0 * u.abs());
    let t = (1.0 - e) / (1.0 + e);
    if u < 0.0 {
        -t
    } else {
        t
    }
}

#[inline(always)]
fn sigmoid_stable(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    if x < 0.0 {
        e / (1.0 + e)
    } else {
        1.0 / (1.0 + e)
    }
}

#[inline(always)]
fn act_forward(kind: Activation, x: f32) -> f32 {
    match kind {
        Activation::GeluErf => 0.5 * x * (1.0 + erf_approx(x * SQRT_1_2)),
        Activation::GeluTanh => {
            let u = SQRT_2_PI * (x + GELU_C * x * x * x);
            0.5 * x * (1.0 + tanh_stable(u))
        }
        Activation::Silu => x * sigmoid_stable(x),
        Activation::Relu => x.max(0.0),
        Activation::Exp => x.exp(),
    }
}

/// d act(x) / dx.
#[inline(always)]
fn act_derivative(kind: Activation, x: f32) -> f32 {
    match kind {
        Activation::GeluErf => {
            let cdf = 0.5 * (1.0 + erf_approx(x * SQRT_1_2));
            cdf + x * INV_SQRT_2PI * exp_nonpositive(-0.5 * x * x)
        }
        Activation::GeluTanh => {
            let u = SQRT_2_PI * (x + GELU_C * x * x * x);
            let t = tanh_stable(u);
            let du = SQRT_2_PI * (1.0 + 3.0 * GELU_C * x * x);
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
        }
        Activation::Silu => {
            let s = sigmoid_stable(x);
            s * (1.0 + x * (1.0 - s))
        }
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Exp => x.exp(),
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ActParams {
    n: u32,
    kind: u32,
    _pad0: u32,
    _pad1: u32,
}

impl ActParams {
    fn new(n: usize, kind: Activation) -> ActParams {
        ActParams {
            n: n as u32,
            kind: kind as u32,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// o = act(x) over one chunk, the activation chosen outside the loop so each arm is its own
/// loop the compiler vectorizes.
#[inline(always)]
fn act_forward_body(kind: Activation, o: &mut [f32], x: &[f32]) {
    macro_rules! each {
        ($($k:ident),*) => {
            match kind {
                $(Activation::$k => {
                    for (o, &x) in o.iter_mut().zip(x) {
                        *o = act_forward(Activation::$k, x);
                    }
                })*
            }
        };
    }
    each!(GeluErf, GeluTanh, Silu, Relu, Exp)
}

/// o = g * act'(x) over one chunk (as [`act_forward_body`]).
#[inline(always)]
fn act_backward_body(kind: Activation, o: &mut [f32], x: &[f32], g: &[f32]) {
    macro_rules! each {
        ($($k:ident),*) => {
            match kind {
                $(Activation::$k => {
                    for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                        *o = g * act_derivative(Activation::$k, x);
                    }
                })*
            }
        };
    }
    each!(GeluErf, GeluTanh, Silu, Relu, Exp)
}

dispatched!(
    /// [`act_forward_body`] in the widest SIMD build the CPU runs.
    fn act_forward_chunk(kind: Activation, o: &mut [f32], x: &[f32]) -> () = act_forward_body
);
dispatched!(
    /// [`act_backward_body`] in the widest SIMD build the CPU runs.
    fn act_backward_chunk(kind: Activation, o: &mut [f32], x: &[f32], g: &[f32]) -> () =
        act_backward_body
);

/// act(x), or g * act'(x) when `g` is given, on the CPU in rayon chunks.
fn cpu_act(kind: Activation, x: &[f32], g: Option<&[f32]>) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let chunks = out.par_chunks_mut(CPU_CHUNK).zip(x.par_chunks(CPU_CHUNK));
    match g {
        Some(g) => chunks
            .zip(g.par_chunks(CPU_CHUNK))
            .for_each(|((o, x), g)| act_backward_chunk(kind, o, x, g)),
        None => chunks.for_each(|(o, x)| act_forward_chunk(kind, o, x)),
    }
    out
}

/// The activation's forward (no history): y = act(x).
fn activation_forward(x: &Tensor, kind: Activation) -> Result<Storage> {
    let n = x.elem_count();
    match x.device() {
        Device::Cpu => {
            let data = x.with_cpu_f32(kind.name(), |x| cpu_act(kind, x, None))?;
            Ok(Tensor::cpu_f32(data, x.shape().to_vec()))
        }
        Device::Gpu(ctx) => {
            let out = alloc_f32(ctx, n)?;
            let xb = x.gpu_operand()?;
            launch_rows(
                ctx,
                Shader::Elementwise,
                "activation",
                &[Arg::Rows(&xb, 4)],
                &[Arg::Rows(&out, 4)],
                n,
                |_, count| (ActParams::new(count, kind), grid_1d(count as u64, 256)),
            )?;
            Ok(Storage::Gpu(out))
        }
    }
}

/// The activation's backward (no history): dx = g * act'(x).
fn activation_backward(x: &Tensor, g: &Tensor, kind: Activation) -> Result<Tensor> {
    let n = x.elem_count();
    let storage = match x.device() {
        Device::Cpu => {
            let data = x.with_cpu_f32(kind.name(), |x| {
                g.with_cpu_f32(kind.name(), |g| cpu_act(kind, x, Some(g)))
            })??;
            Tensor::cpu_f32(data, x.shape().to_vec())
        }
        Device::Gpu(ctx) => {
            let out = alloc_f32(ctx, n)?;
            let (xb, gb) = (x.gpu_operand()?, g.gpu_operand()?);
            launch_rows(
                ctx,
                Shader::Elementwise,
                "activation_backward",
                &[Arg::Rows(&xb, 4), Arg::Rows(&gb, 4)],
                &[Arg::Rows(&out, 4)],
                n,
                |_, count| (ActParams::new(count, kind), grid_1d(count as u64, 256)),
            )?;
            Storage::Gpu(out)
        }
    };
    Ok(Tensor::from_storage(
        storage,
        x.shape().to_vec(),
        DType::F32,
        x.device().clone(),
    ))
}

impl Tensor {
    fn activation(&self, kind: Activation) -> Result<Tensor> {
        self.expect_dtype(kind.name(), DType::F32)?;
        let storage = activation_forward(self, kind)?;
        let saved = self.detach();
        Ok(Tensor::from_op(
            storage,
            self.shape().to_vec(),
            DType::F32,
            self.device(),
            kind.name(),
            &[self],
            move |_, g| Ok(vec![Some(activation_backward(&saved, g, kind)?)]),
        ))
    }

    /// GELU, elementwise: x * Phi(x) (`Erf`), or its tanh approximation (`Tanh`).
    pub fn gelu(&self, kind: GeluKind) -> Result<Tensor> {
        self.activation(match kind {
            GeluKind::Erf => Activation::GeluErf,
            GeluKind::Tanh => Activation::GeluTanh,
        })
    }

    /// SiLU (swish), elementwise: x * sigmoid(x).
    pub fn silu(&self) -> Result<Tensor> {
        self.activation(Activation::Silu)
    }

    /// ReLU, elementwise: max(x, 0) (gradient 0 at 0).
    pub fn relu(&self) -> Result<Tensor> {
        self.activation(Activation::Relu)
    }

    /// e^x, elementwise (the GPU's `exp` may differ from the host's in the last bits).
    pub fn exp(&self) -> Result<Tensor> {
        self.activation(Activation::Exp)
    }

    /// min(max(x, lo), hi), elementwise, as relu compositions: the gradient is 1 strictly
    /// inside (lo, hi) and 0 outside, as torch.clamp's.
    pub fn clamp(&self, lo: f32, hi: f32) -> Result<Tensor> {
        // lo + relu(x - lo) - relu(x - hi)
        let above_lo = self.affine(1.0, -lo)?.relu()?;
        let above_hi = self.affine(1.0, -hi)?.relu()?;
        above_lo.sub(&above_hi)?.affine(1.0, lo)
    }

    /// max(a, b), elementwise (same shapes): b + relu(a - b); on ties the gradient goes to b.
    pub fn maximum(&self, other: &Tensor) -> Result<Tensor> {
        self.sub(other)?.relu()?.add(other)
    }
}
