//! lathe-core: tensors on CPU and GPU, their ops (each with a forward and a backward on both
//! devices), reverse-mode autodiff, Adam/AdamW and safetensors IO.
//!
//! ```
//! use lathe_core::{Device, Tensor};
//! let w = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[2, 2], &Device::Cpu).unwrap().into_variable();
//! let x = Tensor::from_vec(vec![1.0f32, 1.0], &[1, 2], &Device::Cpu).unwrap();
//! let loss = x.matmul(&w).unwrap().sum_all().unwrap();
//! let grads = loss.backward().unwrap();
//! assert_eq!(grads.get(&w).unwrap().to_vec_f32().unwrap(), vec![1.0, 1.0, 1.0, 1.0]);
//! ```

pub mod backprop;
pub mod checkpoint;
pub mod device;
pub mod dtype;
mod error;
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
pub use device::Device;
pub use dtype::DType;
pub use error::{Error, Result};
pub use lathe_shaders::MemCategory;
pub use ops::rotary::RotaryTables;
pub use ops::softmax::AttentionMask;
pub use ops::unary::GeluKind;
pub use optim::{clip_grad_norm, first_diverged, Adam, AdamConfig, LrSchedule, ScheduleKind};
pub use tensor::{Tensor, TensorId};

/// Runs `f` on a worker thread of rayon's global pool and waits for it. The CPU ops
/// parallelise with rayon; started from outside the pool, each parallel loop first wakes
/// a worker (tens of microseconds), and a training or decoding step is hundreds of small
/// ops. Inside the pool they start at once. (Gradient recording state is per thread, so
/// take `no_grad` guards inside `f`.)
pub fn on_cpu_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
