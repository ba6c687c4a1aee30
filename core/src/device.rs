//! Where a tensor lives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use lathe_shaders::{AdapterChoice, GpuContext};

use crate::{Error, Result};

/// A compute device: the host CPU, or one GPU context.
#[derive(Clone, Debug)]
pub enum Device {
    /// The host CPU.
    Cpu,
    /// A GPU through wgpu; clones share the context.
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

    /// As [`Device::shared_test_gpu`], with storage bindings forced down to `bytes` (one
    /// process-wide context per limit): tensors over that size run the splitting over
    /// windows that big models need on a real GPU (see `ops::dispatch`).
    pub fn test_gpu_with_binding_limit(bytes: u64) -> Result<Device> {
        type Contexts = Mutex<HashMap<u64, Arc<GpuContext>>>;
        static CONTEXTS: OnceLock<Contexts> = OnceLock::new();
        let mut contexts = CONTEXTS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(ctx) = contexts.get(&bytes) {
            return Ok(Device::Gpu(ctx.clone()));
        }
        let choice = AdapterChoice {
            max_binding: Some(bytes),
            ..AdapterChoice::any()
        };
        let ctx = GpuContext::new(choice)?;
        contexts.insert(bytes, ctx.clone());
        Ok(Device::Gpu(ctx))
    }

    /// Whether this is a GPU.
    pub fn is_gpu(&self) -> bool {
        matches!(self, Device::Gpu(_))
    }

    /// The GPU context; `None` on the CPU.
    pub fn gpu_context(&self) -> Option<&Arc<GpuContext>> {
        match self {
            Device::Gpu(ctx) => Some(ctx),
            Device::Cpu => None,
        }
    }

    /// The GPU context of a device a GPU kernel runs on: an error (not a panic) on the CPU.
    pub fn gpu_operand_context(&self) -> Result<&Arc<GpuContext>> {
        self.gpu_context().ok_or_else(|| Error::DeviceMismatch {
            op: "gpu kernel",
            a: self.name(),
            b: "a GPU".into(),
        })
    }

    /// Waits for all queued GPU work (a no-op on the CPU). Benchmarks call this before timing.
    pub fn sync(&self) -> Result<()> {
        if let Device::Gpu(ctx) = self {
            ctx.sync()?;
        }
        Ok(())
    }

    /// "cpu", or "gpu:" and the adapter's name, for messages.
    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".to_string(),
            Device::Gpu(ctx) => format!("gpu:{}", ctx.report().name),
        }
    }
}
