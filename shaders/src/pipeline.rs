//! Compiled pipelines, cached once per device under a typed key. Bind-group layouts are
//! explicit and shared between all kernels with the same binding shape.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::kernels::Shader;

/// The binding shape of a kernel: `inputs` read-only storage buffers, then `outputs`
/// read-write storage buffers, then a uniform block when `uniform` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BindingLayout {
    /// Read-only storage buffers.
    pub inputs: u8,
    /// Read-write storage buffers.
    pub outputs: u8,
    /// Whether a uniform block follows.
    pub uniform: bool,
}

/// What identifies a compiled pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    /// The shader module.
    pub shader: Shader,
    /// The entry point.
    pub entry: &'static str,
    /// The binding shape.
    pub layout: BindingLayout,
}

/// Shader modules, bind-group layouts and pipelines, each created once.
#[derive(Default)]
pub struct PipelineCache {
    modules: Mutex<HashMap<Shader, Arc<wgpu::ShaderModule>>>,
    layouts: Mutex<HashMap<BindingLayout, Arc<(wgpu::BindGroupLayout, wgpu::PipelineLayout)>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
}

impl PipelineCache {
    /// The bind-group and pipeline layouts of `layout`, created on first use.
    pub fn bind_group_layout(
        &self,
        device: &wgpu::Device,
        layout: BindingLayout,
    ) -> Arc<(wgpu::BindGroupLayout, wgpu::PipelineLayout)> {
        let mut layouts = self.layouts.lock().unwrap_or_else(|e| e.into_inner());
        layouts
            .entry(layout)
            .or_insert_with(|| {
                let storage = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
                    binding,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                };
                let n_storage = (layout.inputs + layout.outputs) as u32;
                let mut entries: Vec<_> = (0..n_storage)
                    .map(|b| storage(b, b < layout.inputs as u32))
                    .collect();
                if layout.uniform {
                    entries.push(wgpu::BindGroupLayoutEntry {
                        binding: n_storage,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: wgpu::BindingType::Buffer {
                            ty: wgpu::BufferBindingType::Uniform,
                            has_dynamic_offset: false,
                            min_binding_size: None,
                        },
                        count: None,
                    });
                }
                let bind = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: None,
                    entries: &entries,
                });
                let pipeline = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: None,
                    bind_group_layouts: &[Some(&bind)],
                    immediate_size: 0,
                });
                Arc::new((bind, pipeline))
            })
            .clone()
    }

    /// The compute pipeline of `key`, compiled on first use.
    pub fn pipeline(&self, device: &wgpu::Device, key: PipelineKey) -> Arc<wgpu::ComputePipeline> {
        if let Some(p) = self
            .pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return p.clone();
        }
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            modules
                .entry(key.shader)
                .or_insert_with(|| {
                    Arc::new(device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(key.shader.file_name()),
                        source: wgpu::ShaderSource::Wgsl(key.shader.source().into()),
                    }))
                })
                .clone()
        };
        let layouts = self.bind_group_layout(device, key.layout);
        let pipeline = Arc::new(
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key.entry),
                layout: Some(&layouts.1),
                module: &module,
                entry_point: Some(key.entry),
                compilation_options: Default::default(),
                cache: None,
            }),
        );
        self.pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, pipeline.clone());
        pipeline
    }

    /// Number of compiled pipelines (for reports and tests).
    pub fn len(&self) -> usize {
        self.pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Whether no pipeline is compiled yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
