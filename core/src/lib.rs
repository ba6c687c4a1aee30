//! lathe-core: tensors on CPU and GPU, their ops (each with a forward and a backward on both
//! devices), reverse-mode autodiff, Adam/AdamW and safetensors IO.
//!
//! - `Tensor` (contiguous row-major; f32, f16, u32) on `Device::Cpu` or `Device::Gpu`.
//! - `ops/`, one file per op family, each with its CPU kernel, GPU dispatch and backward:
//!   `dispatch.rs` launches a kernel over buffers larger than one storage binding (chunks of
//!   rows, or strided tiles, each binding the windows it touches); `matmul_gpu.rs` cuts a
//!   matmul into batch groups or (M, N, K) blocks that fit; `skinny.rs` is the CPU product of
//!   a few rows with a weight (decoding); `matmul.rs` widens an f16 second operand a 4 MiB
//!   panel at a time; `dropout.rs` is counter-based (the same mask on both devices,
//!   replayable); `linear_loss.rs` is the LM head's loss without its logits (row chunks
//!   through one reused buffer on the CPU); `vexp.rs` a vectorized exp and `dispatched!`,
//!   which runs a hot loop in the widest SIMD build the CPU has.
//! - `collective.rs`: the processes of a data-parallel job (`Collective`: `Solo`, or MPI
//!   in lathe-train), gradients summed over them in rank order.
//! - `backprop.rs` (reverse-mode autodiff), `checkpoint.rs` (gradient checkpointing),
//!   `optim.rs` (Adam/AdamW with state restore, global-norm clipping, LR schedules),
//!   `safetensors.rs` (`SafetensorsFile` reads the header at open, then one tensor at a
//!   time; saving writes each tensor's bytes as it goes, through a temp file), `testing.rs`
//!   (test helpers: tolerances, the test GPU, forced binding limits, a counting allocator).
//!
//! ```
//! use lathe_core::{Device, Tensor};
//! let w = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[2, 2], &Device::Cpu).unwrap().into_variable();
//! let x = Tensor::from_vec(vec![1.0f32, 1.0], &[1, 2], &Device::Cpu).unwrap();
//! let loss = x.matmul(&w).unwrap().sum_all().unwrap();
//! let grads = loss.backward().unwrap();
//! assert_eq!(grads.get(&w).unwrap().to_vec_f32().unwrap(), vec![1.0, 1.0, 1.0, 1.0]);
//! ```
#![warn(missing_docs)]

pub mod backprop;
pub mod checkpoint;
pub mod collective;
pub mod device;
pub mod dtype;
mod error;
pub mod flops;
pub mod ops;
pub mod optim;
pub mod safetensors;
pub mod seed;
pub mod shape;
pub mod storage;
pub mod tensor;
pub mod testing;

pub use backprop::{no_grad, GradStore, NoGradGuard};
pub use checkpoint::checkpoint;
pub use collective::{Collective, Solo};
pub use device::Device;
pub use dtype::DType;
pub use error::{Error, Result};
pub use lathe_shaders::MemCategory;
pub use ops::rotary::RotaryTables;
pub use ops::softmax::AttentionMask;
pub use ops::unary::GeluKind;
pub use optim::{clip_grad_norm, first_diverged, Adam, AdamConfig, LrSchedule, ScheduleKind};
pub use seed::Rng;
pub use tensor::{Tensor, TensorId};

/// Runs `f` on a worker thread of rayon's global pool and waits for it. The CPU ops
/// parallelise with rayon; started from outside the pool, each parallel loop first wakes
/// a worker (tens of microseconds), and a training or decoding step is hundreds of small
/// ops. Inside the pool they start at once. (Gradient recording state is per thread, so
/// take `no_grad` guards inside `f`.)
pub fn on_cpu_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
