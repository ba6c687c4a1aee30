//! lathe-shaders: the WGSL kernels of lathe and the wgpu runtime that launches them.
//!
//! This crate knows buffers and shapes, never tensors. Its pieces are deliberately separate:
//! - [`context`]: adapter and device choice, the one [`GpuContext`] per device;
//! - [`ledger`]: bytes allocated, current and peak, per [`MemCategory`];
//! - [`pool`]: a buffer pool that recycles storage buffers and charges the ledger;
//! - [`kernels`]: the `.wgsl` sources, one file per op family, named by [`Shader`];
//! - [`pipeline`]: compiled pipelines cached under a typed [`PipelineKey`];
//! - [`launch`]: encoding dispatches and reading results back.
#![warn(missing_docs)]

pub mod context;
pub mod kernels;
pub mod launch;
pub mod ledger;
pub mod pipeline;
pub mod pool;

pub use context::{AdapterChoice, AdapterReport, GpuContext};
pub use kernels::Shader;
pub use launch::{grid_1d, Launch, View};
pub use ledger::{LedgerSnapshot, MemCategory, MemoryLedger};
pub use pipeline::{BindingLayout, PipelineKey};
pub use pool::GpuBuffer;

/// Errors of the GPU runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Only software adapters were found and none was allowed.
    #[error(
        "no hardware GPU adapter found (adapters seen: {seen}); a software adapter such as \
         lavapipe is used only when asked for (`--allow-software-gpu` on the command line, \
         AdapterChoice::allow_software in code, or LATHE_ALLOW_SOFTWARE_GPU=1)"
    )]
    NoHardwareAdapter {
        /// The adapters found, by name.
        seen: String,
    },
    /// No adapter at all (no Vulkan, Metal or DX12 driver).
    #[error(
        "no GPU adapter at all: install a Vulkan driver (on Debian/Ubuntu: \
         `apt-get install mesa-vulkan-drivers` for the software lavapipe driver)"
    )]
    NoAdapter,
    /// The adapter refused to open a device.
    #[error("requesting the GPU device failed: {0}")]
    RequestDevice(#[from] wgpu::RequestDeviceError),
    /// An allocation larger than one buffer may be.
    #[error("buffer of {requested} bytes exceeds the device's max buffer size of {max} bytes")]
    BufferTooLarge {
        /// Bytes asked for.
        requested: u64,
        /// The device's `max_buffer_size`.
        max: u64,
    },
    #[error("binding {binding} of {shader:?}::{entry} is {size} bytes, over the device's storage-binding limit of {max} bytes")]
    /// A view bound to a kernel that spans more than the binding limit (an op that did not
    /// split its work).
    BindingTooLarge {
        /// The kernel's shader.
        shader: Shader,
        /// The kernel's entry point.
        entry: &'static str,
        /// The binding's index.
        binding: usize,
        /// The view's bytes.
        size: u64,
        /// The binding limit.
        max: u64,
    },
    #[error("binding {binding} of {shader:?}::{entry}: window of {size} bytes at offset {offset} is empty, misaligned or outside its buffer of {capacity} bytes")]
    /// A view that is empty, misaligned or past the end of its buffer.
    BadWindow {
        /// The kernel's shader.
        shader: Shader,
        /// The kernel's entry point.
        entry: &'static str,
        /// The binding's index.
        binding: usize,
        /// The view's byte offset.
        offset: u64,
        /// The view's bytes.
        size: u64,
        /// The buffer's allocated bytes.
        capacity: u64,
    },
    /// Mapping a buffer to read it back failed.
    #[error("reading a GPU buffer back failed: {0}")]
    Readback(String),
    /// An error the device reported (validation, a lost device), or a bad
    /// `LATHE_GPU_MAX_BINDING` value.
    #[error("GPU error: {0}")]
    Device(String),
}

/// The result of every fallible function of lathe-shaders.
pub type Result<T> = std::result::Result<T, Error>;
