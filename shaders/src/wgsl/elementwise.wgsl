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

// ---- Activations and their backwards. kind: 0 GELU (erf), 1 GELU (tanh), 2 SiLU, 3 ReLU,
// 4 exp.
// The math below is mirrored line for line in core/src/ops/unary.rs so that both devices
// agree to rounding: WGSL has no erf, and driver tanh/exp overflow behaviour varies, so
// erf is a rational approximation (no exp at all) and tanh/sigmoid are built from exp of a
// non-positive argument (never overflows).

struct ActParams {
    n: u32,
    kind: u32,
    _pad0: u32,
    _pad1: u32,
}

const SQRT_1_2: f32 = 0.70710677;
// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.3989423;
// sqrt(2 / pi)
const SQRT_2_PI: f32 = 0.7978846;
const GELU_C: f32 = 0.044715;

// erf(x): odd rational minimax approximation on [-4, 4] (the form Eigen and XLA use for
// f32); |error| < 7e-8 before f32 rounding. Beyond |x| = 4, erf is +-1 in f32.
fn erf_approx(x_in: f32) -> f32 {
    let x = clamp(x_in, -4.0, 4.0);
    let x2 = x * x;
    var p = x2 * -2.7261424e-10 + 2.7706815e-08;
    p = x2 * p + -2.101024e-06;
    p = x2 * p + -5.6925062e-05;
    p = x2 * p + -7.3499064e-04;
    p = x2 * p + -2.9546e-03;
    p = x2 * p + -1.6096033e-02;
    p = x * p;
    var q = x2 * -1.45660715e-05 + -2.1337405e-04;
    q = x2 * q + -1.682827e-03;
    q = x2 * q + -7.3733293e-03;
    q = x2 * q + -1.4264739e-02;
    return clamp(p / q, -1.0, 1.0);
}

fn tanh_stable(u: f32) -> f32 {
    let e = exp(-2.0 * abs(u));
    let t = (1.0 - e) / (1.0 + e);
    return select(t, -t, u < 0.0);
}

fn sigmoid_stable(x: f32) -> f32 {
    let e = exp(-abs(x));
    return select(1.0 / (1.0 + e), e / (1.0 + e), x < 0.0);
}

fn act_forward(kind: u32, x: f32) -> f32 {
    switch kind {
        case 0u: { return 0.5 * x * (1.0 + erf_approx(x * SQRT_1_2)); }
        case 1u: {
            let u = SQRT_2_PI * (x + GELU_C * x * x * x);
            return 0.5 * x * (1.0 + tanh_stable(u));
        }
        case 2u: { return x * sigmoid_stable(x); }
        case 4u: { return exp(x); }
        default: { return max(x, 0.0); }
    }
}

// d act(x) / dx.
fn act_derivative(kind: u32, x: f32) -> f32 {
    switch kind {
        case 0u: {
            let cdf = 0.5 * (1.0 + erf_approx(x * SQRT_1_2));
            return cdf + x * INV_SQRT_2PI * exp(-0.5 * x * x);
        }
        case 1u: {
            let u = SQRT_2_PI * (x + GELU_C * x * x * x);
            let t = tanh_stable(u);
            let du = SQRT_2_PI * (1.0 + 3.0 * GELU_C * x * x);
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
        }
        case 2u: {
            let s = sigmoid_stable(x);
            return s * (1.0 + x * (1.0 - s));
        }
        case 4u: { return exp(x); }
        default: { return select(0.0, 1.0, x > 0.0); }
    }
}

@group(0) @binding(0) var<storage, read> act_x: array<f32>;
@group(0) @binding(1) var<storage, read_write> act_out: array<f32>;
@group(0) @binding(2) var<uniform> act_p: ActParams;

@compute @workgroup_size(256)
fn activation(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i < act_p.n) {
        act_out[i] = act_forward(act_p.kind, act_x[i]);
    }
}

@group(0) @binding(0) var<storage, read> actb_x: array<f32>;
@group(0) @binding(1) var<storage, read> actb_g: array<f32>;
@group(0) @binding(2) var<storage, read_write> actb_out: array<f32>;
@group(0) @binding(3) var<uniform> actb_p: ActParams;

// dx = g * act'(x).
@compute @workgroup_size(256)
fn activation_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i < actb_p.n) {
        actb_out[i] = actb_g[i] * act_derivative(actb_p.kind, actb_x[i]);
    }
}

// ---- Dropout with a counter-based mask: element i is kept iff hash(i, seed) >= threshold
// (threshold = round(p * 2^32)), kept values are scaled by 1 / (1 - p). The same integer hash
// runs in core/src/ops/dropout.rs, so both devices drop the same elements, and a backward
// (or a checkpointed recomputation) regenerates the mask from the seed instead of storing it.

struct DropoutParams {
    n: u32,
    threshold: u32,
    seed_lo: u32,
    seed_hi: u32,
    scale: f32,
    // Flat index of element 0 of this dispatch: a dispatch over a window of a tensor larger
    // than one binding draws the mask of the elements it covers.
    base: u32,
    _pad1: u32,
    _pad2: u32,
}

// A 32-bit integer finaliser (lowbias32): every input bit affects every output bit.
fn mix32(v: u32) -> u32 {
    var x = v;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

fn dropout_keep(i: u32, p: DropoutParams) -> bool {
    let key = mix32(p.seed_lo ^ mix32(p.seed_hi ^ 0x9e3779b9u));
    return mix32(i ^ key) >= p.threshold;
}

@group(0) @binding(0) var<storage, read> dropout_x: array<f32>;
@group(0) @binding(1) var<storage, read_write> dropout_out: array<f32>;
@group(0) @binding(2) var<uniform> dropout_p: DropoutParams;

// Forward and backward alike: out = x * scale where kept, 0 elsewhere.
@compute @workgroup_size(256)
fn dropout(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i < dropout_p.n) {
        dropout_out[i] = select(0.0, dropout_x[i] * dropout_p.scale, dropout_keep(dropout_p.base + i, dropout_p));
    }
}
