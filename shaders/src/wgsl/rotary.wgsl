// Rotary position embedding, split-half ("rotate_half") form as in HF GPT-NeoX / Llama, on the
// first 2 * half dims of each head of x (B, heads, T, head_dim); the other dims pass through.
// With c = cos[pos, k], s = sign * sin[pos, k] (tables (max_positions, half)):
//   out[k]        = x[k] * c - x[k + half] * s
//   out[k + half] = x[k + half] * c + x[k] * s
// sign = -1 rotates by -theta: the backward (the transpose of the rotation).
// One invocation per element; pos = positions[b, t] (u32 (B, T)).

struct RotaryParams {
    n: u32,
    head_dim: u32,
    half: u32,
    seq: u32,
    heads: u32,
    sign: f32,
    // Index of this dispatch's first head row (B * heads * T rows in all): x and out may be
    // bound as a window of rows, positions and tables whole.
    first_row: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> positions: array<u32>;
@group(0) @binding(2) var<storage, read> cos_table: array<f32>;
@group(0) @binding(3) var<storage, read> sin_table: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<uniform> p: RotaryParams;

@compute @workgroup_size(256)
fn rotary(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i >= p.n) {
        return;
    }
    let row = i / p.head_dim;
    let d = i % p.head_dim;
    if (d >= 2u * p.half) {
        out[i] = x[i];
        return;
    }
    let t = (p.first_row + row) % p.seq;
    let b = (p.first_row + row) / (p.seq * p.heads);
    let pos = positions[b * p.seq + t];
    if (d < p.half) {
        let c = cos_table[pos * p.half + d];
        let s = p.sign * sin_table[pos * p.half + d];
        out[i] = x[i] * c - x[i + p.half] * s;
    } else {
        let k = d - p.half;
        let c = cos_table[pos * p.half + k];
        let s = p.sign * sin_table[pos * p.half + k];
        out[i] = x[i] * c + x[i - p.half] * s;
    }
}
