//! Where a tensor lives.

use std::sync::{Arc, OnceLock};

use lathe_shaders::{AdapterChoice, GpuContext};

use crate::Result;

/// The storage-binding limit of [`Device::small_binding_test_gpu`], in bytes.
pub const SMALL_BINDING: u64 = 16 << 10;

/// A compute device: the host CPU, or one GPU context.
#[derive(Clone, Debug)]
pub enum Device {
    Cpu,
    Gpu(Arc<GpuContext>),
}

impl PartialEq for Device {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Gpu(a), Device::Gpu(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Device {
    /// Opens a GPU with the given adapter choice (a new context each call).
    pub fn gpu(choice: AdapterChoice) -> Result<Device> {
        Ok(Device::Gpu(GpuContext::new(choice)?))
    }

    /// One process-wide GPU context that accepts a software adapter: what tests and
    /// benchmarks share so that pipelines compile once. Fails when there is no adapter at all.
    pub fn shared_test_gpu() -> Result<Device> {
        static CONTEXT: OnceLock<std::result::Result<Arc<GpuContext>, String>> = OnceLock::new();
        match CONTEXT
            .get_or_init(|| GpuContext::new(AdapterChoice::any()).map_err(|e| e.to_string()))
        {
            Ok(ctx) => Ok(Device::Gpu(ctx.clone())),
            Err(e) => Err(crate::Error::Gpu(lathe_shaders::Error::Device(e.clone()))),
        }
    }

    /// As [`Device::shared_test_gpu`], with storage bindings forced down to `SMALL_BINDING`
    /// bytes: every tensor of ten thousand elements exceeds one binding, so tests on lavapipe
    /// run the splitting that big models need on a real GPU (see `ops::dispatch`).
    pub fn small_binding_test_gpu() -> Result<Device> {
        static CONTEXT: OnceLock<std::result::Result<Arc<GpuContext>, String>> = OnceLock::new();
        let choice = AdapterChoice {
            max_binding: Some(SMALL_BINDING),
            ..AdapterChoice::any()
        };
        match CONTEXT.get_or_init(|| GpuContext::new(choice).map_err(|e| e.to_string())) {
            Ok(ctx) => Ok(Device::Gpu(ctx.clone())),
            Err(e) => Err(crate::Error::Gpu(lathe_shaders::Error::Device(e.clone()))),
        }
    }

    pub fn is_gpu(&self) -> bool {
        matches!(self, Device::Gpu(_))
    }

    pub fn gpu_context(&self) -> Option<&Arc<GpuContext>> {
        match self {
            Device::Gpu(ctx) => Some(ctx),
            Device::Cpu => None,
        }
    }

    /// Waits for all queued GPU work (a no-op on the CPU). Benchmarks call this before timing.
    pub fn sync(&self) -> Result<()> {
        if let Device::Gpu(ctx) = self {
            ctx.sync()?;
        }
        Ok(())
    }

    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".to_string(),
            Device::Gpu(ctx) => format!("gpu:{}", ctx.report().name),
        }
    }
}
