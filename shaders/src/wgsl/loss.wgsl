// Log-softmax over the last axis of a (rows, v) matrix, fused with a gather of one entry per
// row, and their backwards. Row kernels run one workgroup of 256 threads per row: each thread
// strides over the row, then a workgroup tree reduction combines the partial results, so rows
// may be any length (shorter or much longer than the workgroup).

struct Params {
    rows: u32,
    v: u32,
    _pad0: u32,
    _pad1: u32,
}

const WG: u32 = 256u;

var<workgroup> red: array<f32, 256>;

// Max of red[0..WG] into red[0]; every thread must call it.
fn reduce_max(lid: u32) {
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            red[lid] = max(red[lid], red[lid + stride]);
        }
        workgroupBarrier();
    }
}

// Sum of red[0..WG] into red[0]; every thread must call it.
fn reduce_sum(lid: u32) {
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            red[lid] = red[lid] + red[lid + stride];
        }
        workgroupBarrier();
    }
}

// out[r] = x[r, ids[r]] - logsumexp(x[r, :]); lse[r] saved for the backward.

@group(0) @binding(0) var<storage, read> g_x: array<f32>;
@group(0) @binding(1) var<storage, read> g_ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> g_out: array<f32>;
@group(0) @binding(3) var<storage, read_write> g_lse: array<f32>;
@group(0) @binding(4) var<uniform> g_p: Params;

@compute @workgroup_size(256)
fn log_softmax_gather(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * groups.x;
    if (row >= g_p.rows) {
        return;
    }
    let base = row * g_p.v;
    var m = -3.402823e38;
    for (var j = lid; j < g_p.v; j += WG) {
        m = max(m, g_x[base + j]);
    }
    red[lid] = m;
    reduce_max(lid);
    let row_max = red[0];
    workgroupBarrier();
    var s = 0.0;
    for (var j = lid; j < g_p.v; j += WG) {
        s += exp(g_x[base + j] - row_max);
    }
    red[lid] = s;
    reduce_sum(lid);
    let lse = row_max + log(red[0]);
    if (lid == 0u) {
        g_out[row] = g_x[base + g_ids[row]] - lse;
        g_lse[row] = lse;
    }
}

// dx[r, j] = g[r] * ([j == ids[r]] - exp(x[r, j] - lse[r])), one invocation per element.

@group(0) @binding(0) var<storage, read> gb_x: array<f32>;
@group(0) @binding(1) var<storage, read> gb_ids: array<u32>;
@group(0) @binding(2) var<storage, read> gb_lse: array<f32>;
@group(0) @binding(3) var<storage, read> gb_g: array<f32>;
@group(0) @binding(4) var<storage, read_write> gb_dx: array<f32>;
@group(0) @binding(5) var<uniform> gb_p: Params;

@compute @workgroup_size(256)
fn log_softmax_gather_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i >= gb_p.rows * gb_p.v) {
        return;
    }
    let r = i / gb_p.v;
    let j = i % gb_p.v;
    var onehot = 0.0;
    if (gb_ids[r] == j) {
        onehot = 1.0;
    }
    gb_dx[i] = gb_g[r] * (onehot - exp(gb_x[i] - gb_lse[r]));
}

// y[r, :] = x[r, :] - logsumexp(x[r, :]).

@group(0) @binding(0) var<storage, read> l_x: array<f32>;
@group(0) @binding(1) var<storage, read_write> l_y: array<f32>;
@group(0) @binding(2) var<uniform> l_p: Params;

@compute @workgroup_size(256)
fn log_softmax_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * groups.x;
    if (row >= l_p.rows) {
        return;
    }
    let base = row * l_p.v;
    var m = -3.402823e38;
    for (var j = lid; j < l_p.v; j += WG) {
        m = max(m, l_x[base + j]);
    }
    red[lid] = m;
    reduce_max(lid);
    let row_max = red[0];
    workgroupBarrier();
    var s = 0.0;
    for (var j = lid; j < l_p.v; j += WG) {
        s += exp(l_x[base + j] - row_max);
    }
    red[lid] = s;
    reduce_sum(lid);
    let lse = row_max + log(red[0]);
    for (var j = lid; j < l_p.v; j += WG) {
        l_y[base + j] = l_x[base + j] - lse;
    }
}

// dx[r, :] = g[r, :] - exp(y[r, :]) * sum(g[r, :]), from the saved output y.

@group(0) @binding(0) var<storage, read> lb_y: array<f32>;
@group(0) @binding(1) var<storage, read> lb_g: array<f32>;
@group(0) @binding(2) var<storage, read_write> lb_dx: array<f32>;
@group(0) @binding(3) var<uniform> lb_p: Params;

@compute @workgroup_size(256)
fn log_softmax_rows_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * groups.x;
    if (row >= lb_p.rows) {
        return;
    }
    let base = row * lb_p.v;
    var s = 0.0;
    for (var j = lid; j < lb_p.v; j += WG) {
        s += lb_g[base + j];
    }
    red[lid] = s;
    reduce_sum(lid);
    let total = red[0];
    for (var j = lid; j < lb_p.v; j += WG) {
        lb_dx[base + j] = lb_g[base + j] - exp(lb_y[base + j]) * total;
    }
}

// Entropy of the softmax of each row: H = logsumexp(x) - sum(softmax(x) * x), computed as
// log(s) - sum(e * (x - max)) / s with e = exp(x - max), s = sum(e): no cancellation of two
// large terms. A statistic: no backward.

@group(0) @binding(0) var<storage, read> e_x: array<f32>;
@group(0) @binding(1) var<storage, read_write> e_out: array<f32>;
@group(0) @binding(2) var<uniform> e_p: Params;

@compute @workgroup_size(256)
fn entropy_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * groups.x;
    if (row >= e_p.rows) {
        return;
    }
    let base = row * e_p.v;
    var m = -3.402823e38;
    for (var j = lid; j < e_p.v; j += WG) {
        m = max(m, e_x[base + j]);
    }
    red[lid] = m;
    reduce_max(lid);
    let row_max = red[0];
    workgroupBarrier();
    var s = 0.0;
    var t = 0.0;
    for (var j = lid; j < e_p.v; j += WG) {
        let d = e_x[base + j] - row_max;
        let e = exp(d);
        s += e;
        t += e * d;
    }
    red[lid] = s;
    reduce_sum(lid);
    let total = red[0];
    workgroupBarrier();
    red[lid] = t;
    reduce_sum(lid);
    if (lid == 0u) {
        e_out[row] = log(total) - red[0] / total;
    }
}
