// Reductions along one axis of a tensor viewed as (outer, axis, inner): one invocation per
// (outer, inner) output walks the axis.

struct Params {
    outer: u32,
    axis: u32,
    inner: u32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(256)
fn sum_axis(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i >= p.outer * p.inner) {
        return;
    }
    let o = i / p.inner;
    let j = i % p.inner;
    var acc = 0.0;
    for (var a = 0u; a < p.axis; a++) {
        acc += x[(o * p.axis + a) * p.inner + j];
    }
    out[i] = acc;
}
