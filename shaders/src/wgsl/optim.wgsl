// One Adam / AdamW step, in place, one invocation per parameter element (torch.optim.Adam
// and torch.optim.AdamW semantics):
//   decoupled (AdamW): p = p * (1 - lr * wd);  g = grad
//   coupled (Adam):    g = grad + wd * p
//   m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g^2
//   p = p - lr * (m / bc1) / (sqrt(v / bc2) + eps),  bc = 1 - beta^t

struct Params {
    n: u32,
    decoupled: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bias_correction1: f32,
    bias_correction2: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> grad: array<f32>;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read_write> m: array<f32>;
@group(0) @binding(3) var<storage, read_write> v: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

@compute @workgroup_size(256)
fn adam_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i >= p.n) {
        return;
    }
    var w = param[i];
    var g = grad[i];
    if (p.decoupled != 0u) {
        w = w * (1.0 - p.lr * p.weight_decay);
    } else {
        g = g + p.weight_decay * w;
    }
    let mi = p.beta1 * m[i] + (1.0 - p.beta1) * g;
    let vi = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    let m_hat = mi / p.bias_correction1;
    let v_hat = vi / p.bias_correction2;
    param[i] = w - p.lr * m_hat / (sqrt(v_hat) + p.eps);
}
