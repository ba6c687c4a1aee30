//! Choosing an adapter and opening the device: one [`GpuContext`] per device.

use std::sync::{Arc, Mutex};

use crate::ledger::{LedgerSnapshot, MemCategory, MemoryLedger};
use crate::pipeline::PipelineCache;
use crate::pool::{BufferPool, GpuBuffer};
use crate::{Error, Result};

/// Which adapters may be used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdapterChoice {
    /// Accept a software adapter (lavapipe, WARP, SwiftShader) when no hardware GPU exists.
    /// Off by default: a user asking for a GPU must not silently get a CPU emulation.
    pub allow_software: bool,
    /// Bind at most this many bytes per storage binding even when the adapter allows more.
    /// Ops split their work into bindable chunks either way; tests force a tiny limit here
    /// (or with `LATHE_GPU_MAX_BINDING=<bytes>`) so that the splitting runs on lavapipe.
    pub max_binding: Option<u64>,
    /// Which of the equally good adapters to take (modulo their count): one rank per GPU on
    /// a node of several (a data-parallel job passes each rank's local rank). None: the first.
    pub index: Option<usize>,
}

impl AdapterChoice {
    /// Hardware only, unless `LATHE_ALLOW_SOFTWARE_GPU=1` is set in the environment; the
    /// binding limit forced by `LATHE_GPU_MAX_BINDING=<bytes>` (a positive byte count, else
    /// an error: a typo must not silently test nothing).
    pub fn from_env() -> Result<Self> {
        let allow =
            std::env::var("LATHE_ALLOW_SOFTWARE_GPU").is_ok_and(|v| v == "1" || v == "true");
        let max_binding = match std::env::var("LATHE_GPU_MAX_BINDING") {
            Err(_) => None,
            Ok(v) => match v.trim().parse::<u64>() {
                Ok(bytes) if bytes > 0 => Some(bytes),
                _ => {
                    return Err(Error::Device(format!(
                        "LATHE_GPU_MAX_BINDING={v:?}: expected a positive byte count"
                    )))
                }
            },
        };
        Ok(AdapterChoice {
            allow_software: allow,
            max_binding,
            index: None,
        })
    }

    /// Hardware first, software accepted: what tests use.
    pub fn any() -> Self {
        AdapterChoice {
            allow_software: true,
            max_binding: None,
            index: None,
        }
    }
}

/// What the device turned out to be.
#[derive(Clone, Debug)]
pub struct AdapterReport {
    /// The adapter's name ("NVIDIA H100", "llvmpipe").
    pub name: String,
    /// The wgpu backend ("Vulkan", "Metal", "Dx12").
    pub backend: String,
    /// The device type ("DiscreteGpu", "IntegratedGpu", "Cpu").
    pub device_type: String,
    /// The driver's name and version.
    pub driver: String,
    /// Whether it is a software rasterizer (lavapipe): a CPU posing as a GPU.
    pub is_software: bool,
    /// Whether shaders may use f16 arithmetic (`SHADER_F16`).
    pub shader_f16: bool,
    /// The largest buffer, in bytes.
    pub max_buffer_size: u64,
    /// The adapter's largest storage binding, in bytes.
    pub max_storage_binding_size: u64,
    /// The storage-binding size lathe uses: the adapter's, or less when forced lower.
    pub binding_limit: u64,
}

impl std::fmt::Display for AdapterReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {}, driver {}){}; shader-f16 {}; max buffer {} MiB, max storage binding {} MiB{}",
            self.name,
            self.backend,
            self.device_type,
            self.driver,
            if self.is_software { " [software]" } else { "" },
            if self.shader_f16 { "yes" } else { "no" },
            self.max_buffer_size >> 20,
            self.max_storage_binding_size >> 20,
            if self.binding_limit < self.max_storage_binding_size {
                format!(" (forced to {} bytes)", self.binding_limit)
            } else {
                String::new()
            },
        )
    }
}

/// Work encoded but not yet submitted.
pub(crate) struct Pending {
    pub encoder: Option<wgpu::CommandEncoder>,
    pub passes: u32,
}

/// The GPU device with its queue, buffer pool, memory ledger and pipeline cache.
pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    report: AdapterReport,
    limits: wgpu::Limits,
    ledger: Arc<MemoryLedger>,
    pool: BufferPool,
    pub(crate) pipelines: PipelineCache,
    pub(crate) pending: Mutex<Pending>,
    /// The first validation error wgpu reported since the last check.
    pub(crate) device_error: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuContext({})", self.report.name)
    }
}

/// The bytes one storage binding may span: the adapter's limit, or a forced lower one. At
/// least one offset-alignment unit plus a word, so every chunked op can make progress;
/// a multiple of 4 (binding sizes must be).
fn binding_limit(limits: &wgpu::Limits, forced: Option<u64>) -> u64 {
    let adapter = limits.max_storage_buffer_binding_size;
    let floor = limits.min_storage_buffer_offset_alignment as u64 * 2;
    let limit = forced.map_or(adapter, |f| f.max(floor).min(adapter));
    limit / 4 * 4
}

fn rank(device_type: wgpu::DeviceType) -> u8 {
    match device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

impl GpuContext {
    /// Picks the best adapter (discrete, integrated, virtual, then — only when allowed — a
    /// software one) and opens a device with SHADER_F16 when the adapter has it and the
    /// adapter's own maximum limits.
    pub fn new(choice: AdapterChoice) -> Result<Arc<GpuContext>> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::PRIMARY,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
        if adapters.is_empty() {
            return Err(Error::NoAdapter);
        }
        adapters.sort_by_key(|a| rank(a.get_info().device_type));
        let seen = adapters
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
            })
            .collect::<Vec<_>>()
            .join(", ");
        // The adapters as good as the best (the GPUs of a multi-GPU node), and of them the
        // one asked for.
        let best = rank(adapters[0].get_info().device_type);
        let equals = adapters
            .iter()
            .take_while(|a| rank(a.get_info().device_type) == best)
            .count();
        let adapter = adapters.remove(choice.index.unwrap_or(0) % equals);
        let info = adapter.get_info();
        let is_software = info.device_type == wgpu::DeviceType::Cpu;
        if is_software && !choice.allow_software {
            return Err(Error::NoHardwareAdapter { seen });
        }
        let shader_f16 = adapter.features().contains(wgpu::Features::SHADER_F16);
        let mut required_features = wgpu::Features::empty();
        if shader_f16 {
            required_features |= wgpu::Features::SHADER_F16;
        }
        let limits = adapter.limits();
        let (device, queue) =
            pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
                label: Some("lathe"),
                required_features,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            }))?;
        let device_error = Arc::new(Mutex::new(None::<String>));
        {
            let sink = device_error.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
                if slot.is_none() {
                    *slot = Some(e.to_string());
                }
            }));
        }
        let report = AdapterReport {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info)
                .trim()
                .to_string(),
            is_software,
            shader_f16,
            max_buffer_size: limits.max_buffer_size,
            max_storage_binding_size: limits.max_storage_buffer_binding_size as u64,
            binding_limit: binding_limit(&limits, choice.max_binding),
        };
        let ledger = Arc::new(MemoryLedger::default());
        Ok(Arc::new(GpuContext {
            device,
            queue,
            report,
            limits,
            pool: BufferPool::new(ledger.clone()),
            ledger,
            pipelines: PipelineCache::default(),
            pending: Mutex::new(Pending {
                encoder: None,
                passes: 0,
            }),
            device_error,
        }))
    }

    /// What the device is.
    pub fn report(&self) -> &AdapterReport {
        &self.report
    }
    /// The device's limits (the adapter's, all requested).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }
    /// The most bytes one storage binding may span (see [`AdapterChoice::max_binding`]).
    /// Ops bind windows of at most this size and split their work to fit.
    pub fn binding_limit(&self) -> u64 {
        self.report.binding_limit
    }
    /// The alignment, in bytes, of a binding window's start.
    pub fn binding_alignment(&self) -> u64 {
        self.limits.min_storage_buffer_offset_alignment as u64
    }
    /// The device's memory ledger.
    pub fn ledger(&self) -> &MemoryLedger {
        &self.ledger
    }
    /// The ledger's figures now.
    pub fn ledger_snapshot(&self) -> LedgerSnapshot {
        self.ledger.snapshot()
    }
    /// Bytes kept by the pool for reuse, not charged to any category.
    pub fn pool_idle_bytes(&self) -> u64 {
        self.pool.idle_bytes()
    }
    /// Returns idle pooled buffers to the driver.
    pub fn trim_pool(&self) {
        self.pool.trim()
    }
    /// The underlying wgpu device.
    pub fn wgpu_device(&self) -> &wgpu::Device {
        &self.device
    }
    /// Pipelines compiled so far (each kernel compiles once per device).
    pub fn pipeline_count(&self) -> usize {
        self.pipelines.len()
    }

    /// A buffer of `bytes` bytes (contents unspecified), charged to `category`.
    pub fn alloc(&self, bytes: u64, category: MemCategory) -> Result<GpuBuffer> {
        let capacity = crate::pool::capacity_for(bytes, category);
        if capacity > self.limits.max_buffer_size {
            return Err(Error::BufferTooLarge {
                requested: bytes,
                max: self.limits.max_buffer_size,
            });
        }
        Ok(self.pool.alloc(&self.device, bytes, category))
    }

    /// A buffer filled with zeros.
    pub fn alloc_zeroed(&self, bytes: u64, category: MemCategory) -> Result<GpuBuffer> {
        let buffer = self.alloc(bytes, category)?;
        self.fill_zero(&buffer);
        Ok(buffer)
    }

    /// A buffer holding `data`.
    pub fn upload(&self, data: &[u8], category: MemCategory) -> Result<GpuBuffer> {
        let buffer = self.alloc(data.len() as u64, category)?;
        self.write(&buffer, 0, data);
        Ok(buffer)
    }

    /// Writes host bytes into a buffer at a byte offset (offset a multiple of 4).
    /// Pending passes are submitted first, so they see the buffer's old contents.
    pub fn write(&self, buffer: &GpuBuffer, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        // Hold the lock from the submit to the write so no other thread's passes slip between.
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        self.submit_locked(&mut pending);
        if data.len().is_multiple_of(4) {
            self.queue.write_buffer(buffer.raw(), offset, data);
        } else {
            let mut padded = data.to_vec();
            padded.resize(data.len().next_multiple_of(4), 0);
            self.queue.write_buffer(buffer.raw(), offset, &padded);
        }
    }

    /// Zeroes a whole buffer on the device (encoded in order with other work).
    pub fn fill_zero(&self, buffer: &GpuBuffer) {
        self.with_encoder(|encoder| encoder.clear_buffer(buffer.raw(), 0, None));
    }

    /// Copies `bytes` bytes between buffers on the device (offsets and size multiples of 4).
    pub fn copy(
        &self,
        src: &GpuBuffer,
        src_offset: u64,
        dst: &GpuBuffer,
        dst_offset: u64,
        bytes: u64,
    ) {
        if bytes == 0 {
            return;
        }
        self.with_encoder(|encoder| {
            encoder.copy_buffer_to_buffer(src.raw(), src_offset, dst.raw(), dst_offset, bytes)
        });
    }

    /// Reads the buffer's logical bytes back to the host, waiting for all pending work.
    pub fn read(&self, buffer: &GpuBuffer) -> Result<Vec<u8>> {
        let len = buffer.len();
        if len == 0 {
            return Ok(Vec::new());
        }
        let padded = len.next_multiple_of(4);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: padded,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.ledger.charge(MemCategory::Scratch, padded);
        self.with_encoder(|encoder| {
            encoder.copy_buffer_to_buffer(buffer.raw(), 0, &staging, 0, padded)
        });
        self.flush();
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        let result = self.wait().and_then(|_| {
            rx.recv()
                .map_err(|e| Error::Readback(e.to_string()))?
                .map_err(|e| Error::Readback(e.to_string()))?;
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| Error::Readback(e.to_string()))?;
            Ok(view[..len as usize].to_vec())
        });
        self.ledger.release(MemCategory::Scratch, padded);
        result
    }

    /// Submits pending work and waits until the device is idle; reports any validation error.
    pub fn sync(&self) -> Result<()> {
        self.flush();
        self.wait()
    }

    fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(e.to_string()))?;
        self.take_device_error()
    }

    /// The first validation error since the last check, as an error.
    pub fn take_device_error(&self) -> Result<()> {
        match self
            .device_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(message) => Err(Error::Device(message)),
            None => Ok(()),
        }
    }

    /// Submits the pending encoder, if any.
    pub fn flush(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        self.submit_locked(&mut pending);
    }

    /// Submits while the pending lock is held, so submissions from several threads keep the
    /// order in which their passes were encoded.
    fn submit_locked(&self, pending: &mut Pending) {
        pending.passes = 0;
        if let Some(encoder) = pending.encoder.take() {
            self.queue.submit([encoder.finish()]);
        }
    }

    /// Runs `f` on the pending encoder (created on demand). Submits every 64 passes so the
    /// device starts working while the host encodes more.
    pub(crate) fn with_encoder<R>(&self, f: impl FnOnce(&mut wgpu::CommandEncoder) -> R) -> R {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let encoder = pending.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        });
        let result = f(encoder);
        pending.passes += 1;
        if pending.passes >= 64 {
            self.submit_locked(&mut pending);
        }
        result
    }
}
