//! The WGSL sources, one file per op family, named by a typed enum.
//!
//! Binding convention shared by every kernel (see [`crate::BindingLayout`]): in group 0, the
//! read-only storage inputs come first (bindings 0..n), then the read-write outputs, then one
//! uniform block of parameters if the kernel has any. Large 1-D dispatches are split over x and
//! y (see [`crate::grid_1d`]); kernels recover the flat index as
//! `gid.x + gid.y * num_workgroups.x * WORKGROUP`.

/// One WGSL file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shader {
    /// Tiled matmul, plain / transposed operands / batched.
    Matmul,
    /// Broadcasting binary ops: add, sub, mul, div.
    Binary,
    /// Unary elementwise ops and their backwards: GELU (erf, tanh), SiLU, scale, fill.
    Elementwise,
    /// Reductions along one axis: sum, max (with argmax), and max's backward.
    Reduce,
    /// LayerNorm and RMSNorm, forward and backward.
    Norm,
    /// Softmax over the last axis with causal and padding masks, forward and backward.
    Softmax,
    /// Rotary position embedding on the first k dims of each head (split-half form).
    Rotary,
    /// Embedding gather and its backward (scatter-add).
    Embedding,
    /// Strided copies (transpose, slice, concat, split) and dtype casts.
    Copy,
    /// Fused log-softmax + gather, cross-entropy with ignore index.
    Loss,
    /// Adam and AdamW steps.
    Optim,
    /// LLM.int8(): activation quantization, outlier columns, int8 GEMM/GEMV, dequantized
    /// input gradient.
    Int8,
    /// Next-token sampling, one workgroup per row: greedy, temperature, top-k, top-p and a
    /// seeded draw in token-id order.
    Sample,
}

impl Shader {
    /// Every shader, in declaration order.
    pub const ALL: [Shader; 13] = [
        Shader::Matmul,
        Shader::Binary,
        Shader::Elementwise,
        Shader::Reduce,
        Shader::Norm,
        Shader::Softmax,
        Shader::Rotary,
        Shader::Embedding,
        Shader::Copy,
        Shader::Loss,
        Shader::Optim,
        Shader::Int8,
        Shader::Sample,
    ];

    /// The WGSL file's name under `src/wgsl/` ("matmul.wgsl").
    pub fn file_name(self) -> &'static str {
        match self {
            Shader::Matmul => "matmul.wgsl",
            Shader::Binary => "binary.wgsl",
            Shader::Elementwise => "elementwise.wgsl",
            Shader::Reduce => "reduce.wgsl",
            Shader::Norm => "norm.wgsl",
            Shader::Softmax => "softmax.wgsl",
            Shader::Rotary => "rotary.wgsl",
            Shader::Embedding => "embedding.wgsl",
            Shader::Copy => "copy.wgsl",
            Shader::Loss => "loss.wgsl",
            Shader::Optim => "optim.wgsl",
            Shader::Int8 => "int8.wgsl",
            Shader::Sample => "sample.wgsl",
        }
    }

    /// The WGSL source, embedded at build time.
    pub fn source(self) -> &'static str {
        match self {
            Shader::Matmul => include_str!("wgsl/matmul.wgsl"),
            Shader::Binary => include_str!("wgsl/binary.wgsl"),
            Shader::Elementwise => include_str!("wgsl/elementwise.wgsl"),
            Shader::Reduce => include_str!("wgsl/reduce.wgsl"),
            Shader::Norm => include_str!("wgsl/norm.wgsl"),
            Shader::Softmax => include_str!("wgsl/softmax.wgsl"),
            Shader::Rotary => include_str!("wgsl/rotary.wgsl"),
            Shader::Embedding => include_str!("wgsl/embedding.wgsl"),
            Shader::Copy => include_str!("wgsl/copy.wgsl"),
            Shader::Loss => include_str!("wgsl/loss.wgsl"),
            Shader::Optim => include_str!("wgsl/optim.wgsl"),
            Shader::Int8 => include_str!("wgsl/int8.wgsl"),
            Shader::Sample => include_str!("wgsl/sample.wgsl"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Shader;

    /// Every shader parses and validates with naga, as wgpu will when it compiles it.
    #[test]
    fn every_shader_validates_with_naga() {
        for shader in Shader::ALL {
            let module = naga::front::wgsl::parse_str(shader.source()).unwrap_or_else(|e| {
                panic!(
                    "{}: {}",
                    shader.file_name(),
                    e.emit_to_string(shader.source())
                )
            });
            let mut validator = naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::all(),
            );
            if let Err(e) = validator.validate(&module) {
                panic!(
                    "{}: {}",
                    shader.file_name(),
                    e.emit_to_string(shader.source())
                );
            }
            assert!(
                !module.entry_points.is_empty(),
                "{} has no entry point",
                shader.file_name()
            );
        }
    }
}
