//! Encoding one kernel dispatch.

use crate::context::GpuContext;
use crate::kernels::Shader;
use crate::pipeline::{BindingLayout, PipelineKey};
use crate::pool::GpuBuffer;
use crate::{Error, Result};
use wgpu::util::DeviceExt;

/// A buffer as one binding sees it: the whole buffer, or a window of it. A kernel indexes
/// from the window's start, so an op splits a tensor larger than the binding limit into
/// windows and dispatches once per window without the kernel knowing.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    /// The buffer viewed.
    pub buffer: &'a GpuBuffer,
    /// Byte offset of the window: a multiple of [`GpuContext::binding_alignment`].
    pub offset: u64,
    /// Bytes in the window: a multiple of 4.
    pub size: u64,
}

impl<'a> View<'a> {
    /// The buffer's logical bytes (rounded to a word), not its pooled capacity: a tensor that
    /// fits the binding limit binds even when its size class would not.
    pub fn whole(buffer: &'a GpuBuffer) -> View<'a> {
        let size = buffer
            .len()
            .max(4)
            .next_multiple_of(4)
            .min(buffer.capacity());
        View {
            buffer,
            offset: 0,
            size,
        }
    }

    /// `size` bytes from `offset` (the size rounded up to a word, within the buffer).
    pub fn window(buffer: &'a GpuBuffer, offset: u64, size: u64) -> View<'a> {
        let size = size
            .max(4)
            .next_multiple_of(4)
            .min(buffer.capacity().saturating_sub(offset));
        View {
            buffer,
            offset,
            size,
        }
    }
}

impl<'a> From<&'a GpuBuffer> for View<'a> {
    fn from(buffer: &'a GpuBuffer) -> View<'a> {
        View::whole(buffer)
    }
}

/// One dispatch: buffers in binding order (inputs read-only, then outputs read-write), the
/// uniform parameter bytes (empty: no uniform binding) and the workgroup grid.
pub struct Launch<'a> {
    /// The shader module.
    pub shader: Shader,
    /// The entry point's name in it.
    pub entry: &'static str,
    /// Read-only storage bindings, from binding 0.
    pub inputs: &'a [View<'a>],
    /// Read-write storage bindings, after the inputs.
    pub outputs: &'a [View<'a>],
    /// The uniform block's bytes (empty: no uniform binding).
    pub params: &'a [u8],
    /// Workgroups in x, y, z (each at most [`MAX_GROUPS_PER_DIM`]).
    pub workgroups: [u32; 3],
}

/// Largest workgroup count per grid dimension that every adapter accepts.
pub const MAX_GROUPS_PER_DIM: u32 = 65_535;

/// A grid covering `n` invocations in workgroups of `workgroup` threads, split over x and y
/// when more than 65,535 groups are needed. Kernels recompute the flat index as
/// `gid.x + gid.y * num_workgroups.x * workgroup` and bounds-check it.
pub fn grid_1d(n: u64, workgroup: u32) -> [u32; 3] {
    let groups = n.div_ceil(workgroup as u64).max(1);
    if groups <= MAX_GROUPS_PER_DIM as u64 {
        [groups as u32, 1, 1]
    } else {
        let y = groups.div_ceil(MAX_GROUPS_PER_DIM as u64);
        let x = groups.div_ceil(y);
        [x as u32, y as u32, 1]
    }
}

impl GpuContext {
    /// Encodes one dispatch into the pending command encoder.
    pub fn launch(&self, launch: &Launch<'_>) -> Result<()> {
        if launch.workgroups.contains(&0) {
            return Ok(());
        }
        let max_binding = self.binding_limit();
        let alignment = self.binding_alignment();
        for (binding, view) in launch.inputs.iter().chain(launch.outputs).enumerate() {
            if view.size > max_binding {
                return Err(Error::BindingTooLarge {
                    shader: launch.shader,
                    entry: launch.entry,
                    binding,
                    size: view.size,
                    max: max_binding,
                });
            }
            let in_bounds = view
                .offset
                .checked_add(view.size)
                .is_some_and(|end| end <= view.buffer.capacity());
            if !in_bounds
                || view.size == 0
                || !view.offset.is_multiple_of(alignment)
                || !view.size.is_multiple_of(4)
            {
                return Err(Error::BadWindow {
                    shader: launch.shader,
                    entry: launch.entry,
                    binding,
                    offset: view.offset,
                    size: view.size,
                    capacity: view.buffer.capacity(),
                });
            }
        }
        let layout = BindingLayout {
            inputs: launch.inputs.len() as u8,
            outputs: launch.outputs.len() as u8,
            uniform: !launch.params.is_empty(),
        };
        let key = PipelineKey {
            shader: launch.shader,
            entry: launch.entry,
            layout,
        };
        let pipeline = self.pipelines.pipeline(&self.device, key);
        let layouts = self.pipelines.bind_group_layout(&self.device, layout);
        let uniform = (!launch.params.is_empty()).then(|| {
            let mut bytes = launch.params.to_vec();
            bytes.resize(bytes.len().next_multiple_of(16), 0);
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("params"),
                    contents: &bytes,
                    usage: wgpu::BufferUsages::UNIFORM,
                })
        });
        let mut entries: Vec<wgpu::BindGroupEntry> = launch
            .inputs
            .iter()
            .chain(launch.outputs)
            .enumerate()
            .map(|(i, view)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: view.buffer.raw(),
                    offset: view.offset,
                    size: std::num::NonZeroU64::new(view.size),
                }),
            })
            .collect();
        if let Some(u) = &uniform {
            entries.push(wgpu::BindGroupEntry {
                binding: entries.len() as u32,
                resource: u.as_entire_binding(),
            });
        }
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(launch.entry),
            layout: &layouts.0,
            entries: &entries,
        });
        let [x, y, z] = launch.workgroups;
        self.with_encoder(|encoder| {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(launch.entry),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(x, y, z);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_covers_every_invocation_within_limits() {
        for n in [
            1u64,
            63,
            64,
            65,
            65_535 * 64,
            65_535 * 64 + 1,
            10_000_000_000 / 64,
        ] {
            let [x, y, _] = grid_1d(n, 64);
            assert!(x <= MAX_GROUPS_PER_DIM && y <= MAX_GROUPS_PER_DIM);
            assert!(x as u64 * y as u64 * 64 >= n, "{n}");
        }
    }
}
