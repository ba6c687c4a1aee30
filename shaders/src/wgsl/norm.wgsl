// LayerNorm and RMSNorm over the last dim, forward and backward. One workgroup of 256
// invocations per row: each invocation strides over the row (rows may be shorter or longer
// than the workgroup) and partial sums meet in a workgroup-memory tree reduction. The math
// mirrors core/src/ops/norm.rs.
//
// flags: bit 0 RMSNorm (else LayerNorm), bit 1 has weight, bit 2 has bias,
//        bit 3 (backward) write g * xhat for the weight gradient.
// Absent weight/bias bindings are bound to some other buffer and never read.

struct NormParams {
    rows: u32,
    d: u32,
    eps: f32,
    flags: u32,
}

const WG: u32 = 256u;

var<workgroup> red: array<vec2<f32>, 256>;

// Sum of `v` over the workgroup; every invocation gets the total. Call from uniform control flow.
fn workgroup_sum2(lid: u32, v: vec2<f32>) -> vec2<f32> {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    // Nobody may overwrite red[0] before everyone has read it.
    workgroupBarrier();
    return total;
}

// (mean, 1/sqrt(var + eps)) of one row, with mean = 0 for RMSNorm (var is then mean(x^2)).
// Two passes (mean, then centred squares) for LayerNorm: no cancellation.
fn row_stats_fwd(lid: u32, base: u32, d: u32, rms: bool, eps: f32) -> vec2<f32> {
    var mean = 0.0;
    if (!rms) {
        var s = 0.0;
        for (var j = lid; j < d; j += WG) {
            s += nf_x[base + j];
        }
        mean = workgroup_sum2(lid, vec2<f32>(s, 0.0)).x / f32(d);
    }
    var sq = 0.0;
    for (var j = lid; j < d; j += WG) {
        let c = nf_x[base + j] - mean;
        sq += c * c;
    }
    let variance = workgroup_sum2(lid, vec2<f32>(sq, 0.0)).x / f32(d);
    return vec2<f32>(mean, 1.0 / sqrt(variance + eps));
}

fn row_stats_bwd(lid: u32, base: u32, d: u32, rms: bool, eps: f32) -> vec2<f32> {
    var mean = 0.0;
    if (!rms) {
        var s = 0.0;
        for (var j = lid; j < d; j += WG) {
            s += nb_x[base + j];
        }
        mean = workgroup_sum2(lid, vec2<f32>(s, 0.0)).x / f32(d);
    }
    var sq = 0.0;
    for (var j = lid; j < d; j += WG) {
        let c = nb_x[base + j] - mean;
        sq += c * c;
    }
    let variance = workgroup_sum2(lid, vec2<f32>(sq, 0.0)).x / f32(d);
    return vec2<f32>(mean, 1.0 / sqrt(variance + eps));
}

@group(0) @binding(0) var<storage, read> nf_x: array<f32>;
@group(0) @binding(1) var<storage, read> nf_w: array<f32>;
@group(0) @binding(2) var<storage, read> nf_b: array<f32>;
@group(0) @binding(3) var<storage, read_write> nf_y: array<f32>;
@group(0) @binding(4) var<uniform> nf_p: NormParams;

// y = (x - mean) * rstd * w + b, row by row.
@compute @workgroup_size(256)
fn norm_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * groups.x;
    if (row >= nf_p.rows) {
        return;
    }
    let d = nf_p.d;
    let base = row * d;
    let rms = (nf_p.flags & 1u) != 0u;
    let has_w = (nf_p.flags & 2u) != 0u;
    let has_b = (nf_p.flags & 4u) != 0u;
    let stats = row_stats_fwd(lid, base, d, rms, nf_p.eps);
    for (var j = lid; j < d; j += WG) {
        var y = (nf_x[base + j] - stats.x) * stats.y;
        if (has_w) {
            y = y * nf_w[j];
        }
        if (has_b) {
            y = y + nf_b[j];
        }
        nf_y[base + j] = y;
    }
}

@group(0) @binding(0) var<storage, read> nb_x: array<f32>;
@group(0) @binding(1) var<storage, read> nb_w: array<f32>;
@group(0) @binding(2) var<storage, read> nb_g: array<f32>;
@group(0) @binding(3) var<storage, read_write> nb_dx: array<f32>;
@group(0) @binding(4) var<storage, read_write> nb_gxhat: array<f32>;
@group(0) @binding(5) var<uniform> nb_p: NormParams;

// With xhat = (x - mean) * rstd and gh = g * w:
//   LayerNorm: dx = rstd * (gh - mean(gh) - xhat * mean(gh * xhat))
//   RMSNorm:   dx = rstd * (gh - xhat * mean(gh * xhat))
// and, when asked, gxhat = g * xhat (summed over rows later for the weight gradient).
@compute @workgroup_size(256)
fn norm_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * groups.x;
    if (row >= nb_p.rows) {
        return;
    }
    let d = nb_p.d;
    let base = row * d;
    let rms = (nb_p.flags & 1u) != 0u;
    let has_w = (nb_p.flags & 2u) != 0u;
    let want_gxhat = (nb_p.flags & 8u) != 0u;
    let stats = row_stats_bwd(lid, base, d, rms, nb_p.eps);
    var partial = vec2<f32>(0.0, 0.0);
    for (var j = lid; j < d; j += WG) {
        let xhat = (nb_x[base + j] - stats.x) * stats.y;
        var gh = nb_g[base + j];
        if (has_w) {
            gh = gh * nb_w[j];
        }
        partial += vec2<f32>(gh, gh * xhat);
    }
    let sums = workgroup_sum2(lid, partial) / f32(d);
    let mean_gh = select(sums.x, 0.0, rms);
    for (var j = lid; j < d; j += WG) {
        let g = nb_g[base + j];
        let xhat = (nb_x[base + j] - stats.x) * stats.y;
        var gh = g;
        if (has_w) {
            gh = gh * nb_w[j];
        }
        nb_dx[base + j] = stats.y * (gh - mean_gh - xhat * sums.y);
        if (want_gxhat) {
            nb_gxhat[base + j] = g * xhat;
        }
    }
}
