// Unary elementwise ops, one invocation per element.

struct AffineParams {
    n: u32,
    _pad: u32,
    mul: f32,
    add: f32,
}

@group(0) @binding(0) var<storage, read_write> fill_out: array<f32>;
@group(0) @binding(1) var<uniform> fill_p: AffineParams;

@compute @workgroup_size(256)
fn fill(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i < fill_p.n) {
        fill_out[i] = fill_p.add;
    }
}

@group(0) @binding(0) var<storage, read> affine_x: array<f32>;
@group(0) @binding(1) var<storage, read_write> affine_out: array<f32>;
@group(0) @binding(2) var<uniform> affine_p: AffineParams;

@compute @workgroup_size(256)
fn affine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i < affine_p.n) {
        affine_out[i] = affine_x[i] * affine_p.mul + affine_p.add;
    }
}
