//! Adam and AdamW with the semantics of `torch.optim.Adam` / `torch.optim.AdamW`.
//!
//! Parameters are updated in place: every tensor sharing a parameter's storage (the model's
//! own handle) sees the new values. On the GPU one kernel per parameter binds the gradient
//! as input and the parameter and both moments as read-write outputs, so a step costs one
//! pass over the data and no allocation. The moments live on the parameter's device, charged
//! to `MemCategory::Optimizer` on the GPU.

use lathe_shaders::{grid_1d, MemCategory, Shader};
use rayon::prelude::*;

use crate::backprop::GradStore;
use crate::dtype::DType;
use crate::ops::{launch_rows, Arg, CPU_CHUNK};
use crate::storage::{CpuStorage, Storage};
use crate::tensor::Tensor;
use crate::{Device, Error, Result};

/// Hyper-parameters. `decoupled: false` is Adam with L2 regularisation (weight_decay * p added
/// to the gradient); `decoupled: true` is AdamW (p *= 1 - lr * weight_decay before the update).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f32,
    /// Decay rate of the first moment (mean of the gradients).
    pub beta1: f32,
    /// Decay rate of the second moment (mean of the squared gradients).
    pub beta2: f32,
    /// Added to the second moment's square root in the denominator.
    pub eps: f32,
    /// Weight decay coefficient (0: none).
    pub weight_decay: f32,
    /// AdamW's decoupled decay (true) or L2 added to the gradient (false).
    pub decoupled: bool,
}

impl Default for AdamConfig {
    /// torch.optim.Adam's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay.
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        }
    }
}

impl AdamConfig {
    /// AdamW with torch's other defaults.
    pub fn adamw(lr: f32, weight_decay: f32) -> Self {
        AdamConfig {
            lr,
            weight_decay,
            decoupled: true,
            ..AdamConfig::default()
        }
    }
}

/// Per-step scalars shared by both devices.
#[derive(Clone, Copy)]
struct StepScalars {
    config: AdamConfig,
    /// 1 - beta1^t and 1 - beta2^t.
    bias_correction1: f32,
    bias_correction2: f32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AdamParams {
    n: u32,
    decoupled: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bias_correction1: f32,
    bias_correction2: f32,
    _pad: [u32; 3],
}

/// The first and second moments of one parameter.
struct Moments {
    m: Tensor,
    v: Tensor,
}

/// Adam / AdamW over a fixed list of parameters (variables).
pub struct Adam {
    params: Vec<Tensor>,
    state: Vec<Moments>,
    config: AdamConfig,
    step: u64,
}

/// Zeros shaped like `param` on its device (GPU bytes charged to the optimizer).
fn zeros_like_state(param: &Tensor) -> Result<Tensor> {
    let n = param.elem_count();
    let storage = match param.device() {
        Device::Cpu => Storage::cpu(CpuStorage::F32(vec![0.0; n])),
        Device::Gpu(ctx) => {
            Storage::Gpu(ctx.alloc_zeroed((n.max(1) * 4) as u64, MemCategory::Optimizer)?)
        }
    };
    Ok(Tensor::from_storage(
        storage,
        param.shape().to_vec(),
        DType::F32,
        param.device().clone(),
    ))
}

/// One element's update; returns the new (p, m, v). Mirrors optim.wgsl.
#[inline]
fn adam_element(p: f32, grad: f32, m: f32, v: f32, s: &StepScalars) -> (f32, f32, f32) {
    let c = &s.config;
    let (p, g) = if c.decoupled {
        (p * (1.0 - c.lr * c.weight_decay), grad)
    } else {
        (p, grad + c.weight_decay * p)
    };
    let m = c.beta1 * m + (1.0 - c.beta1) * g;
    let v = c.beta2 * v + (1.0 - c.beta2) * g * g;
    let m_hat = m / s.bias_correction1;
    let v_hat = v / s.bias_correction2;
    (p - c.lr * m_hat / (v_hat.sqrt() + c.eps), m, v)
}

/// The f32 vector of a CPU tensor's storage, mutably.
fn cpu_f32_mut(storage: &mut Storage) -> &mut Vec<f32> {
    match storage {
        // Copy-on-write: tensors saved for an earlier backward keep the old values.
        Storage::Cpu(host) => match std::sync::Arc::make_mut(host) {
            CpuStorage::F32(v) => v,
            _ => unreachable!("checked: a CPU f32 tensor"),
        },
        Storage::Gpu(_) => unreachable!("checked: a CPU f32 tensor"),
    }
}

fn cpu_step(param: &Tensor, grad: &Tensor, state: &Moments, s: &StepScalars) -> Result<()> {
    // The gradient is read-locked while the parameter is write-locked: a gradient that is the
    // parameter itself is detached first, so the two locks differ, and the parameter's
    // copy-on-write update leaves the gradient's values untouched.
    let grad = if grad.id() == param.id() {
        grad.detach()
    } else {
        grad.clone()
    };
    grad.with_cpu_f32("adam", |g| {
        let mut p_guard = param.storage_mut();
        let mut m_guard = state.m.storage_mut();
        let mut v_guard = state.v.storage_mut();
        let (p, m, v) = (
            cpu_f32_mut(&mut p_guard),
            cpu_f32_mut(&mut m_guard),
            cpu_f32_mut(&mut v_guard),
        );
        p.par_chunks_mut(CPU_CHUNK)
            .zip(m.par_chunks_mut(CPU_CHUNK))
            .zip(v.par_chunks_mut(CPU_CHUNK))
            .zip(g.par_chunks(CPU_CHUNK))
            .for_each(|(((p, m), v), g)| {
                for (((p, m), v), g) in p.iter_mut().zip(m).zip(v).zip(g) {
                    (*p, *m, *v) = adam_element(*p, *g, *m, *v, s);
                }
            });
    })
}

fn gpu_step(param: &Tensor, grad: &Tensor, state: &Moments, s: &StepScalars) -> Result<()> {
    let ctx = param.device().gpu_operand_context()?;
    let (p, m, v) = (
        param.gpu_operand()?,
        state.m.gpu_operand()?,
        state.v.gpu_operand()?,
    );
    // A buffer cannot be bound as input and output of one dispatch: copy an aliasing gradient.
    let mut g = grad.gpu_operand()?;
    if g.same_buffer(&p) || g.same_buffer(&m) || g.same_buffer(&v) {
        g = grad.affine(1.0, 0.0)?.gpu_operand()?;
    }
    let n = param.elem_count();
    let c = &s.config;
    launch_rows(
        ctx,
        Shader::Optim,
        "adam_step",
        &[Arg::Rows(&g, 4)],
        &[Arg::Rows(&p, 4), Arg::Rows(&m, 4), Arg::Rows(&v, 4)],
        n,
        |_, count| {
            let params = AdamParams {
                n: count as u32,
                decoupled: c.decoupled as u32,
                lr: c.lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: c.weight_decay,
                bias_correction1: s.bias_correction1,
                bias_correction2: s.bias_correction2,
                _pad: [0; 3],
            };
            (params, grid_1d(count as u64, 256))
        },
    )
}

impl Adam {
    /// An optimizer over `params`, which must be f32 variables (`into_variable`). The moments
    /// are allocated now, zeroed, on each parameter's device.
    pub fn new(params: Vec<Tensor>, config: AdamConfig) -> Result<Adam> {
        let mut state = Vec::with_capacity(params.len());
        for (i, p) in params.iter().enumerate() {
            if !p.is_variable() {
                return Err(Error::Backward(format!(
                    "Adam: parameter {i} {:?} is not a variable (make it with into_variable)",
                    p.shape()
                )));
            }
            p.expect_dtype("Adam", DType::F32)?;
            state.push(Moments {
                m: zeros_like_state(p)?,
                v: zeros_like_state(p)?,
            });
        }
        Ok(Adam {
            params,
            state,
            config,
            step: 0,
        })
    }

    /// One update of every parameter that has a gradient in `grads` (the others are skipped,
    /// their moments untouched). The step count t (for the bias corrections) is shared, as
    /// in torch when every parameter gets a gradient each step.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        // Validate everything first so a bad gradient leaves every parameter untouched.
        let mut work = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p) else { continue };
            g.expect_dtype("Adam", DType::F32)?;
            p.expect_same_device("Adam", g)?;
            if g.shape() != p.shape() {
                return Err(Error::shape(
                    "Adam",
                    format!(
                        "gradient {:?} does not match parameter {i} {:?}",
                        g.shape(),
                        p.shape()
                    ),
                ));
            }
            work.push((i, g));
        }
        self.step += 1;
        let t = self.step as f64;
        let c = self.config;
        let scalars = StepScalars {
            config: c,
            bias_correction1: (1.0 - (c.beta1 as f64).powf(t)) as f32,
            bias_correction2: (1.0 - (c.beta2 as f64).powf(t)) as f32,
        };
        let _no_grad = crate::no_grad();
        for (i, g) in work {
            let (p, state) = (&self.params[i], &self.state[i]);
            match p.device() {
                Device::Cpu => cpu_step(p, g, state, &scalars)?,
                Device::Gpu(_) => gpu_step(p, g, state, &scalars)?,
            }
        }
        Ok(())
    }

    /// Steps taken so far (t of the bias corrections).
    pub fn step_count(&self) -> u64 {
        self.step
    }
    /// The hyper-parameters (`lr` as last set).
    pub fn config(&self) -> &AdamConfig {
        &self.config
    }
    /// Changes the learning rate (schedules).
    pub fn set_lr(&mut self, lr: f32) {
        self.config.lr = lr;
    }
    /// The parameters it updates, in the order of [`moments`](Self::moments).
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }
    /// The first and second moments of parameter `i`.
    pub fn moments(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        self.state.get(i).map(|s| (&s.m, &s.v))
    }

    /// Restores a saved state (a resumed run): the step count and every parameter's (m, v),
    /// in parameter order, each shaped like its parameter. Nothing changes on an error.
    pub fn restore(&mut self, step: u64, moments: Vec<(Tensor, Tensor)>) -> Result<()> {
        if moments.len() != self.params.len() {
            return Err(Error::Backward(format!(
                "Adam::restore: {} moment pairs for {} parameters",
                moments.len(),
                self.params.len()
            )));
        }
        let mut state = Vec::with_capacity(moments.len());
        for (i, ((m, v), p)) in moments.into_iter().zip(&self.params).enumerate() {
            if m.shape() != p.shape() || v.shape() != p.shape() {
                return Err(Error::shape(
                    "Adam::restore",
                    format!(
                        "moments {:?} / {:?} do not match parameter {i} {:?}",
                        m.shape(),
                        v.shape(),
                        p.shape()
                    ),
                ));
            }
            let place = |t: Tensor| -> Result<Tensor> {
                let t = t.to_dtype(DType::F32)?.detach();
                Ok(match p.device() {
                    Device::Cpu => t.to_device(p.device())?,
                    Device::Gpu(_) => t.to_device_as(p.device(), MemCategory::Optimizer)?,
                })
            };
            state.push(Moments {
                m: place(m)?,
                v: place(v)?,
            });
        }
        self.state = state;
        self.step = step;
        Ok(())
    }
}

/// The largest magnitude a trainable value may reach, sqrt(f32::MAX) (about 1.8e19): beyond
/// it the value's square overflows, so norms, variances and the next forward turn into
/// inf/NaN (or, through a normalization, into silent zeros). A parameter past it has
/// diverged as surely as a NaN one.
pub const DIVERGED_MAGNITUDE: f32 = 1.844_674_4e19;

/// The index of the first tensor of `tensors` holding a NaN, an infinity or a value beyond
/// [`DIVERGED_MAGNITUDE`] (None: all fine). Reads each tensor back to the host: meant for
/// the small trainable tensors (LoRA adapters, heads) a trainer checks after every
/// optimizer step.
pub fn first_diverged(tensors: &[Tensor]) -> Result<Option<usize>> {
    let _no_grad = crate::no_grad();
    for (i, t) in tensors.iter().enumerate() {
        if t.to_vec_f32()?
            .iter()
            .any(|x| x.is_nan() || x.abs() > DIVERGED_MAGNITUDE)
        {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// Scales the gradients of `params` in `grads` so that their global L2 norm is at most
/// `max_norm` (torch's `clip_grad_norm_`: coefficient max_norm / (norm + 1e-6), applied only
/// when below 1). Returns the norm before clipping. Parameters without a gradient are skipped.
pub fn clip_grad_norm(grads: &mut GradStore, params: &[Tensor], max_norm: f32) -> Result<f32> {
    let _no_grad = crate::no_grad();
    let mut sum_sq = 0.0f64;
    for p in params {
        if let Some(g) = grads.get(p) {
            let g = g.to_dtype(DType::F32)?;
            sum_sq += g.mul(&g)?.sum_all()?.to_scalar()? as f64;
        }
    }
    let norm = sum_sq.sqrt() as f32;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for p in params {
            if let Some(g) = grads.remove(p) {
                grads.insert(p, g.affine(coef, 0.0)?);
            }
        }
    }
    Ok(norm)
}

/// The learning rate at each optimizer step: linear warm-up from 0, then constant, linear
/// decay to 0 or cosine decay to 0 at `total_steps` (transformers'
/// `get_{constant,linear,cosine}_schedule_with_warmup`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    /// The rate at the end of warm-up.
    pub peak: f32,
    /// Steps of linear warm-up from 0 to `peak`.
    pub warmup_steps: usize,
    /// The run's steps: linear and cosine decay reach 0 here.
    pub total_steps: usize,
    /// What follows the warm-up.
    pub kind: ScheduleKind,
}

/// The shape of an [`LrSchedule`] after its warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    /// `peak` until the end.
    Constant,
    /// Linear decay from `peak` to 0.
    Linear,
    /// Half a cosine from `peak` to 0.
    Cosine,
}

impl LrSchedule {
    /// The rate for step `step` (0-based: the rate the first update uses is `lr(0)`).
    pub fn lr(&self, step: usize) -> f32 {
        if step < self.warmup_steps {
            return self.peak * step as f32 / self.warmup_steps.max(1) as f32;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => 1.0 - progress,
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        (self.peak as f64 * factor.max(0.0)) as f32
    }
}
