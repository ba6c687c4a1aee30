//! lathe-shaders: the WGSL kernels of lathe and the wgpu runtime that launches them.
//!
//! This crate knows buffers and shapes, never tensors. Its pieces are deliberately separate:
//! - [`context`]: adapter and device choice, the one [`GpuContext`] per device;
//! - [`ledger`]: bytes allocated, current and peak, per [`MemCategory`];
//! - [`pool`]: a buffer pool that recycles storage buffers and charges the ledger;
//! - [`kernels`]: the `.wgsl` sources, one file per op family, named by [`Shader`];
//! - [`pipeline`]: compiled pipelines cached under a typed [`PipelineKey`];
//! - [`launch`]: encoding dispatches and reading results back.

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
    #[error(
        "no hardware GPU adapter found (adapters seen: {seen}); a software adapter such as \
         lavapipe is used only when asked for (`--allow-software-gpu` on the command line, \
         AdapterChoice::allow_software in code, or LATHE_ALLOW_SOFTWARE_GPU=1)"
    )]
    NoHardwareAdapter { seen: String },
    #[error(
        "no GPU adapter at all: install a Vulkan driver (on Debian/Ubuntu: \
         `apt-get install mesa-vulkan-drivers` for the software lavapipe driver)"
    )]
    NoAdapter,
    #[error("requesting the GPU device failed: {0}")]
    RequestDevice(#[from] wgpu::RequestDeviceError),
    #[error("buffer of {requested} bytes exceeds the device's max buffer size of {max} bytes")]
    BufferTooLarge { requested: u64, max: u64 },
    #[error("binding {binding} of {shader:?}::{entry} is {size} bytes, over the device's storage-binding limit of {max} bytes")]
    BindingTooLarge {
        shader: Shader,
        entry: &'static str,
        binding: usize,
        size: u64,
        max: u64,
    },
    #[error("binding {binding} of {shader:?}::{entry}: window of {size} bytes at offset {offset} is empty, misaligned or outside its buffer of {capacity} bytes")]
    BadWindow {
        shader: Shader,
        entry: &'static str,
        binding: usize,
        offset: u64,
        size: u64,
        capacity: u64,
    },
    #[error("reading a GPU buffer back failed: {0}")]
    Readback(String),
    #[error("GPU error: {0}")]
    Device(String),
}

/// The result of every fallible function of lathe-shaders.
pub type Result<T> = std::result::Result<T, Error>;
