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

// Max along the axis, with the index of its first occurrence (what the backward routes the
// gradient to). NaN wins, as in torch.

@group(0) @binding(0) var<storage, read> max_x: array<f32>;
@group(0) @binding(1) var<storage, read_write> max_out: array<f32>;
@group(0) @binding(2) var<storage, read_write> max_idx: array<u32>;
@group(0) @binding(3) var<uniform> max_p: Params;

@compute @workgroup_size(256)
fn max_axis(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i >= max_p.outer * max_p.inner) {
        return;
    }
    let o = i / max_p.inner;
    let j = i % max_p.inner;
    let base = o * max_p.axis * max_p.inner + j;
    var best = max_x[base];
    var best_a = 0u;
    for (var a = 1u; a < max_p.axis; a++) {
        let v = max_x[base + a * max_p.inner];
        if (v > best || (v != v && best == best)) {
            best = v;
            best_a = a;
        }
    }
    max_out[i] = best;
    max_idx[i] = best_a;
}

// Max backward: dx[o, a, j] = g[o, j] where a is the saved argmax, else 0. One invocation per
// input element.

@group(0) @binding(0) var<storage, read> maxb_g: array<f32>;
@group(0) @binding(1) var<storage, read> maxb_idx: array<u32>;
@group(0) @binding(2) var<storage, read_write> maxb_dx: array<f32>;
@group(0) @binding(3) var<uniform> maxb_p: Params;

@compute @workgroup_size(256)
fn max_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i >= maxb_p.outer * maxb_p.axis * maxb_p.inner) {
        return;
    }
    let j = i % maxb_p.inner;
    let a = (i / maxb_p.inner) % maxb_p.axis;
    let o = i / (maxb_p.inner * maxb_p.axis);
    let r = o * maxb_p.inner + j;
    var v = 0.0;
    if (maxb_idx[r] == a) {
        v = maxb_g[r];
    }
    maxb_dx[i] = v;
}
