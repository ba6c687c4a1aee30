// Softmax over the last dim with causal and key-range (padding) masks, and its backward.
// One workgroup of 256 invocations per row; rows may be shorter or longer than that. The math
// mirrors core/src/ops/softmax.rs.
//
// Rows are (batch, rows_per_batch) with rows_per_batch = heads * tq; a row's query index is
// row % tq. Its visible keys form one interval [lo, hi): lo = start of the batch's key range,
// hi = min(end of the range, tk - tq + i + 1 when causal). Masked entries are exactly 0 and a
// row with no visible key is all zeros.

struct SoftmaxParams {
    rows: u32,
    tk: u32,
    tq: u32,
    rows_per_batch: u32,
    causal: u32,
    // Index of this dispatch's row 0 in the whole softmax (rows over the binding limit are
    // dispatched a window at a time; the masks depend on the global row).
    first_row: u32,
    _pad1: u32,
    _pad2: u32,
}

const WG: u32 = 256u;
// Below every finite f32 logit: the identity of the max reduction.
const NEG_BIG: f32 = -3.4028235e38;

var<workgroup> red: array<f32, 256>;

fn workgroup_max(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

fn workgroup_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

@group(0) @binding(0) var<storage, read> sf_x: array<f32>;
@group(0) @binding(1) var<storage, read> sf_ranges: array<u32>;
@group(0) @binding(2) var<storage, read_write> sf_y: array<f32>;
@group(0) @binding(3) var<uniform> sf_p: SoftmaxParams;

@compute @workgroup_size(256)
fn softmax_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * groups.x;
    if (row >= sf_p.rows) {
        return;
    }
    let tk = sf_p.tk;
    let base = row * tk;
    let b = (sf_p.first_row + row) / sf_p.rows_per_batch;
    let i = (sf_p.first_row + row) % sf_p.tq;
    let lo = sf_ranges[2u * b];
    var hi = sf_ranges[2u * b + 1u];
    if (sf_p.causal != 0u) {
        // Query i sits at absolute position tk - tq + i and sees keys up to it: j + tq <= tk + i.
        hi = min(hi, select(0u, tk + i + 1u - sf_p.tq, tk + i + 1u >= sf_p.tq));
    }
    var m = NEG_BIG;
    for (var j = lo + lid; j < hi; j += WG) {
        m = max(m, sf_x[base + j]);
    }
    m = workgroup_max(lid, m);
    var s = 0.0;
    for (var j = lo + lid; j < hi; j += WG) {
        s += exp(sf_x[base + j] - m);
    }
    s = workgroup_sum(lid, s);
    let inv = select(0.0, 1.0 / s, s > 0.0);
    for (var j = lid; j < tk; j += WG) {
        var y = 0.0;
        if (j >= lo && j < hi) {
            y = exp(sf_x[base + j] - m) * inv;
        }
        sf_y[base + j] = y;
    }
}

@group(0) @binding(0) var<storage, read> sb_y: array<f32>;
@group(0) @binding(1) var<storage, read> sb_g: array<f32>;
@group(0) @binding(2) var<storage, read_write> sb_dx: array<f32>;
@group(0) @binding(3) var<uniform> sb_p: SoftmaxParams;

// dx = y * (g - sum(g * y)) per row; masked entries have y = 0 and so get 0.
@compute @workgroup_size(256)
fn softmax_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * groups.x;
    if (row >= sb_p.rows) {
        return;
    }
    let tk = sb_p.tk;
    let base = row * tk;
    var s = 0.0;
    for (var j = lid; j < tk; j += WG) {
        s += sb_g[base + j] * sb_y[base + j];
    }
    s = workgroup_sum(lid, s);
    for (var j = lid; j < tk; j += WG) {
        let y = sb_y[base + j];
        sb_dx[base + j] = select(y * (sb_g[base + j] - s), 0.0, y == 0.0);
    }
}
