// Strided copies of 4-byte elements (f32 and u32 alike: the bits are copied) and dtype casts.
//
// strided_copy: for every index idx of the copy shape (rank <= 8),
//   dst[dst_offset + sum_k idx_k * dst_strides_k] = src[src_offset + sum_k idx_k * src_strides_k].
// permute, narrow, cat, split and narrow's backward (pad_narrow) are all this one kernel with
// different shapes, strides and offsets. One invocation per copied element.

struct CopyParams {
    n: u32,
    rank: u32,
    src_offset: u32,
    dst_offset: u32,
    shape: array<vec4<u32>, 2>,
    src_strides: array<vec4<u32>, 2>,
    dst_strides: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<storage, read> copy_src: array<u32>;
@group(0) @binding(1) var<storage, read_write> copy_dst: array<u32>;
@group(0) @binding(2) var<uniform> copy_p: CopyParams;

@compute @workgroup_size(256)
fn strided_copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i >= copy_p.n) {
        return;
    }
    var rem = i;
    var si = copy_p.src_offset;
    var di = copy_p.dst_offset;
    for (var d = i32(copy_p.rank) - 1; d >= 0; d--) {
        let q = u32(d) / 4u;
        let r = u32(d) % 4u;
        let size = copy_p.shape[q][r];
        let idx = rem % size;
        rem = rem / size;
        si += idx * copy_p.src_strides[q][r];
        di += idx * copy_p.dst_strides[q][r];
    }
    copy_dst[di] = copy_src[si];
}

// Casts. n is the element count; f16 buffers hold two values per u32 word (low half first),
// an odd count padded with a zero half.

struct CastParams {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// f32 -> f16, one invocation per pair of elements (one output word).
@group(0) @binding(0) var<storage, read> f32_to_f16_x: array<f32>;
@group(0) @binding(1) var<storage, read_write> f32_to_f16_out: array<u32>;
@group(0) @binding(2) var<uniform> f32_to_f16_p: CastParams;

@compute @workgroup_size(256)
fn f32_to_f16(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let w = gid.x + gid.y * groups.x * 256u;
    let first = 2u * w;
    if (first >= f32_to_f16_p.n) {
        return;
    }
    var hi = 0.0;
    if (first + 1u < f32_to_f16_p.n) {
        hi = f32_to_f16_x[first + 1u];
    }
    f32_to_f16_out[w] = pack2x16float(vec2<f32>(f32_to_f16_x[first], hi));
}

// f16 -> f32, one invocation per pair of elements (one input word).
@group(0) @binding(0) var<storage, read> f16_to_f32_x: array<u32>;
@group(0) @binding(1) var<storage, read_write> f16_to_f32_out: array<f32>;
@group(0) @binding(2) var<uniform> f16_to_f32_p: CastParams;

@compute @workgroup_size(256)
fn f16_to_f32(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let w = gid.x + gid.y * groups.x * 256u;
    let first = 2u * w;
    if (first >= f16_to_f32_p.n) {
        return;
    }
    let v = unpack2x16float(f16_to_f32_x[w]);
    f16_to_f32_out[first] = v.x;
    if (first + 1u < f16_to_f32_p.n) {
        f16_to_f32_out[first + 1u] = v.y;
    }
}

// u32 -> f32 (token ids, counts), one invocation per element.
@group(0) @binding(0) var<storage, read> u32_to_f32_x: array<u32>;
@group(0) @binding(1) var<storage, read_write> u32_to_f32_out: array<f32>;
@group(0) @binding(2) var<uniform> u32_to_f32_p: CastParams;

@compute @workgroup_size(256)
fn u32_to_f32(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i < u32_to_f32_p.n) {
        u32_to_f32_out[i] = f32(u32_to_f32_x[i]);
    }
}
