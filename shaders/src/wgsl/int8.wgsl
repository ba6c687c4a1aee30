// LLM.int8() (docs/REFERENCE.md §3, as bitsandbytes' Linear8bitLt): outlier columns of X,
// vector-wise (row) absmax quantization of X and of weights, the int8 GEMM (many rows) and
// GEMV (few rows) with int32 accumulation through dot4I8Packed plus the 16-bit outlier path,
// and the input gradient dX = dY @ dequant(W) read from the packed weight.
//
// int8 values are packed four per u32, little-endian: element j in byte j % 4 of word j / 4;
// rows are padded with zeros to a multiple of 4 elements (`in4` words per row).
//
// Bit-exactness with the CPU path (lathe-quant's tests compare quantized activations and int32
// accumulations exactly): WGSL's f32 `*` and `round` (ties to even) are exact operations, but
// `/` may be off by 2.5 ulp, so the two divisions that feed a rounding (127 / absmax and
// q * scale / 127) go through `div_rn`, a correctly rounded integer long division; the f32 ->
// f16 rounding of the outlier path is done on the bits (`round_f16`), not left to the driver.
//
// Two arithmetics (`Params.variant`, lathe-quant's `Int8Variant`): 0 is lathe's own; 1 is
// bitsandbytes 0.50.2's CPU one, for weights stored by bitsandbytes: the activations are
// rounded to f16 (`round_f16`, bit-exact) before the outlier test and the quantization, an
// entry |x_f16| >= f16(threshold) is an outlier (its column an outlier column), each row's
// absmax is over the non-outlier *entries*, the output is (acc * (SCA * SCB)) * 6.200124e-05
// + bias + x (f32) . (q * SCB) * f32(1/127) over the outlier columns: products only, no
// division, so nothing more is needed for the quantized values to match the CPU's.

struct Params {
    rows: u32,
    cols: u32, // in_features
    in4: u32, // packed words per row
    outs: u32, // out_features
    threshold: f32,
    has_bias: u32,
    write_acc: u32, // test hook: write the int32 accumulation (as bits) instead of y
    // Where row r of y (gemm, gemv) or of dy (backward_dx) starts: y_offset + r * y_stride.
    // A layer whose buffers exceed one binding is dispatched in blocks of rows and outputs,
    // each binding windows; a block of outputs is then a strided slice of y's rows.
    y_stride: u32,
    y_offset: u32,
    // backward_dx over a block of outputs after the first adds to dx (its accumulators start
    // from the stored value; blocks are multiples of 16 outputs, so the sum runs in the same
    // order as one pass). outlier_flags with accumulate only raises flags.
    accumulate: u32,
    variant: u32, // 0: lathe, 1: bitsandbytes
    _pad1: u32,
}

const WG: u32 = 256u;
// Rows whose absmax is below 2^-100 quantize to zeros (127 / absmax would overflow for
// subnormals); the CPU path uses the same cut.
const MIN_SCALE: f32 = 7.888609052210118e-31;
// bitsandbytes' constants as torch rounds them to f32, by their bits (no literal rounding
// left to the compiler): int8_mm_dequant's 6.200124e-05 and int8_vectorwise_dequant's
// 7.874015718698502e-3 = f32(1 / 127).
const BNB_MM_DEQUANT_BITS: u32 = 0x388206aau;
const BNB_INV_127_BITS: u32 = 0x3c010204u;

// Whether the entry `v` (f32) is an outlier of bitsandbytes' variant: |f16(v)| >= f16(t).
fn bnb_outlier(v: f32, threshold: f32) -> bool {
    return threshold > 0.0 && round_f16(abs(v)) >= round_f16(threshold);
}

// a / b rounded to nearest even, for finite a >= 0 (0 or normal) and normal b > 0 whose
// quotient is normal. Long division of the 24-bit significands, 25 quotient bits + sticky.
fn div_rn(a: f32, b: f32) -> f32 {
    if (a == 0.0) {
        return 0.0;
    }
    let ab = bitcast<u32>(a);
    let bb = bitcast<u32>(b);
    var ma = (ab & 0x7fffffu) | 0x800000u;
    let mb = (bb & 0x7fffffu) | 0x800000u;
    var e = i32((ab >> 23u) & 0xffu) - i32((bb >> 23u) & 0xffu);
    if (ma < mb) {
        ma = ma << 1u;
        e = e - 1;
    }
    var q = 0u;
    var rem = ma;
    for (var i = 0u; i < 25u; i++) {
        q = q << 1u;
        if (rem >= mb) {
            rem = rem - mb;
            q = q | 1u;
        }
        rem = rem << 1u;
    }
    var mant = q >> 1u;
    if ((q & 1u) != 0u && (rem != 0u || (mant & 1u) != 0u)) {
        mant = mant + 1u;
    }
    if (mant == 0x1000000u) {
        mant = 0x800000u;
        e = e + 1;
    }
    return bitcast<f32>((u32(e + 127) << 23u) | (mant & 0x7fffffu));
}

// x rounded to the nearest f16 value (ties to even), returned as f32; overflow gives inf.
fn round_f16(x: f32) -> f32 {
    if (abs(x) < 6.103515625e-5) {
        // f16 subnormals: multiples of 2^-24 (both scalings are exact).
        return round(x * 16777216.0) * 5.9604644775390625e-8;
    }
    let bits = bitcast<u32>(x);
    let r = (bits + 0xfffu + ((bits >> 13u) & 1u)) & 0xffffe000u;
    if ((r & 0x7fffffffu) > 0x477fe000u) {
        return bitcast<f32>((bits & 0x80000000u) | 0x7f800000u);
    }
    return bitcast<f32>(r);
}

// The signed int8 in byte `e` of `word`.
fn unpack_i8(word: u32, e: u32) -> i32 {
    return bitcast<i32>(word << (24u - 8u * e)) >> 24u;
}

// (q * scale) / 127 correctly rounded, q an int8 weight value: the dequantized weight.
fn dequant(q: i32, scale: f32) -> f32 {
    let a = div_rn(f32(abs(q)) * scale, 127.0);
    return select(a, -a, q < 0);
}

// Four values quantized with `inv` = 127 / absmax and packed into one word.
fn quant4(v: vec4<f32>, inv: f32) -> u32 {
    let q = vec4<i32>(clamp(round(v * inv), vec4<f32>(-127.0), vec4<f32>(127.0)));
    return (u32(q.x) & 0xffu) | ((u32(q.y) & 0xffu) << 8u) | ((u32(q.z) & 0xffu) << 16u)
        | ((u32(q.w) & 0xffu) << 24u);
}

// The outlier path's operands: f16-rounded x and dequantized weight (lathe), or x as it is
// and the weight dequantized as (q * scale) * f32(1/127) (bitsandbytes).
fn outlier_x(x: f32, variant: u32) -> f32 {
    if (variant != 0u) {
        return x;
    }
    return round_f16(x);
}

fn outlier_w(q: i32, scale: f32, variant: u32) -> f32 {
    if (variant != 0u) {
        return (f32(q) * scale) * bitcast<f32>(BNB_INV_127_BITS);
    }
    return round_f16(dequant(q, scale));
}

// y from the int32 sum `a`, the scales, the outlier sum `fo` and the bias (0 without one):
// lathe: a * (sca * scb / 127^2) + fo + bias; bitsandbytes: (a * (sca * scb)) * 6.200124e-05
// + bias + fo (int8_scaled_mm, then addmm of the outlier columns).
fn y_of(a: i32, sca: f32, scb: f32, fo: f32, bias: f32, variant: u32) -> f32 {
    if (variant != 0u) {
        return ((f32(a) * (sca * scb)) * bitcast<f32>(BNB_MM_DEQUANT_BITS) + bias) + fo;
    }
    return (f32(a) * (sca * scb / 16129.0) + fo) + bias;
}

// ---- outlier columns: flags[j] = 1 when any |x[r, j]| >= threshold (threshold > 0) ----

@group(0) @binding(0) var<storage, read> fl_x: array<f32>;
@group(0) @binding(1) var<storage, read_write> fl_flags: array<u32>;
@group(0) @binding(2) var<uniform> fl_p: Params;

@compute @workgroup_size(256)
fn outlier_flags(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let j = gid.x + gid.y * groups.x * WG;
    if (j >= fl_p.cols) {
        return;
    }
    var flag = 0u;
    if (fl_p.threshold > 0.0) {
        for (var r = 0u; r < fl_p.rows; r++) {
            let v = fl_x[r * fl_p.cols + j];
            var outlier = abs(v) >= fl_p.threshold;
            if (fl_p.variant != 0u) {
                outlier = bnb_outlier(v, fl_p.threshold);
            }
            if (outlier) {
                flag = 1u;
                break;
            }
        }
    }
    if (fl_p.accumulate == 0u || flag == 1u) {
        fl_flags[j] = flag;
    }
}

// ---- compaction (one workgroup): list = [count, j0, j1, ...] in ascending j ----

@group(0) @binding(0) var<storage, read> cp_flags: array<u32>;
@group(0) @binding(1) var<storage, read_write> cp_list: array<u32>;
@group(0) @binding(2) var<uniform> cp_p: Params;

var<workgroup> cp_scan: array<u32, 256>;

@compute @workgroup_size(256)
fn outlier_compact(@builtin(local_invocation_index) t: u32) {
    var base = 0u;
    let chunks = (cp_p.cols + WG - 1u) / WG;
    for (var c = 0u; c < chunks; c++) {
        let j = c * WG + t;
        var f = 0u;
        if (j < cp_p.cols) {
            f = cp_flags[j];
        }
        cp_scan[t] = f;
        workgroupBarrier();
        // Inclusive Hillis-Steele scan.
        for (var off = 1u; off < WG; off = off << 1u) {
            var v = cp_scan[t];
            if (t >= off) {
                v = v + cp_scan[t - off];
            }
            workgroupBarrier();
            cp_scan[t] = v;
            workgroupBarrier();
        }
        if (f == 1u) {
            cp_list[base + cp_scan[t]] = j; // 1 + (inclusive prefix - 1)
        }
        base = base + cp_scan[WG - 1u];
        workgroupBarrier();
    }
    if (t == 0u) {
        cp_list[0] = base;
    }
}

// ---- row-wise quantization (one workgroup per row) of x (rows, cols), skipping flagged
// columns (zeros there); also used for weights with an all-zero flag buffer ----

@group(0) @binding(0) var<storage, read> qr_x: array<f32>;
@group(0) @binding(1) var<storage, read> qr_flags: array<u32>;
@group(0) @binding(2) var<storage, read_write> qr_q: array<u32>;
@group(0) @binding(3) var<storage, read_write> qr_scale: array<f32>;
@group(0) @binding(4) var<uniform> qr_p: Params;

var<workgroup> qr_red: array<f32, 256>;

@compute @workgroup_size(256)
fn quantize_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let r = wid.x + wid.y * groups.x;
    if (r >= qr_p.rows) {
        return;
    }
    let base = r * qr_p.cols;
    let bnb = qr_p.variant != 0u;
    var m = 0.0;
    for (var j = t; j < qr_p.cols; j += WG) {
        if (bnb) {
            // bitsandbytes: f16 values, the max over the entries that are not outliers.
            let v = round_f16(qr_x[base + j]);
            if (!bnb_outlier(v, qr_p.threshold)) {
                m = max(m, abs(v));
            }
        } else if (qr_flags[j] == 0u) {
            m = max(m, abs(qr_x[base + j]));
        }
    }
    qr_red[t] = m;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (t < s) {
            qr_red[t] = max(qr_red[t], qr_red[t + s]);
        }
        workgroupBarrier();
    }
    let scale = qr_red[0];
    var inv = 0.0;
    if (scale >= MIN_SCALE) {
        inv = div_rn(127.0, scale);
    }
    for (var w = t; w < qr_p.in4; w += WG) {
        var v = vec4<f32>(0.0);
        for (var e = 0u; e < 4u; e++) {
            let j = w * 4u + e;
            if (j < qr_p.cols && qr_flags[j] == 0u) {
                v[e] = qr_x[base + j];
                if (bnb) {
                    v[e] = round_f16(v[e]);
                }
            }
        }
        qr_q[r * qr_p.in4 + w] = quant4(v, inv);
    }
    if (t == 0u) {
        qr_scale[r] = scale;
    }
}

// ---- int8 GEMM: y (rows, outs) = acc * sca[r] * scb[o] / 127^2 + outlier part + bias.
// Each 16x16 workgroup computes a 64x64 tile, each thread 4x4, staging 16 words (64 int8)
// of CA and CB per step; then the outlier columns 16 at a time, as f16-rounded f32. ----

@group(0) @binding(0) var<storage, read> mm_ca: array<u32>;
@group(0) @binding(1) var<storage, read> mm_sca: array<f32>;
@group(0) @binding(2) var<storage, read> mm_cb: array<u32>;
@group(0) @binding(3) var<storage, read> mm_scb: array<f32>;
@group(0) @binding(4) var<storage, read> mm_x: array<f32>;
@group(0) @binding(5) var<storage, read> mm_list: array<u32>;
@group(0) @binding(6) var<storage, read> mm_bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> mm_y: array<f32>;
@group(0) @binding(8) var<uniform> mm_p: Params;

const TILE: u32 = 64u;
const KW: u32 = 16u;

var<workgroup> mm_a: array<u32, 1024>; // [row][KW words]
var<workgroup> mm_b: array<u32, 1024>; // [out][KW words]
var<workgroup> mm_xo: array<f32, 1024>; // [row][16 outliers]
var<workgroup> mm_wo: array<f32, 1024>; // [out][16 outliers]
var<workgroup> mm_count: u32;

@compute @workgroup_size(16, 16)
fn gemm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row0 = wid.y * TILE;
    let out0 = wid.x * TILE;
    let in4 = mm_p.in4;
    var acc: array<i32, 16>; // [i * 4 + j]: row row0 + lid.y + 16 i, out out0 + lid.x + 16 j
    for (var k0 = 0u; k0 < in4; k0 += KW) {
        for (var s = 0u; s < 4u; s++) {
            let e = t + s * WG;
            let rr = e / KW;
            let kw = k0 + e % KW;
            var av = 0u;
            if (row0 + rr < mm_p.rows && kw < in4) {
                av = mm_ca[(row0 + rr) * in4 + kw];
            }
            mm_a[e] = av;
            var bv = 0u;
            if (out0 + rr < mm_p.outs && kw < in4) {
                bv = mm_cb[(out0 + rr) * in4 + kw];
            }
            mm_b[e] = bv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KW; kk++) {
            var a: array<u32, 4>;
            var b: array<u32, 4>;
            for (var i = 0u; i < 4u; i++) {
                a[i] = mm_a[(lid.y + 16u * i) * KW + kk];
                b[i] = mm_b[(lid.x + 16u * i) * KW + kk];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] += dot4I8Packed(a[i], b[j]);
                }
            }
        }
        workgroupBarrier();
    }

    // The 16-bit path over the outlier columns.
    if (t == 0u) {
        mm_count = mm_list[0];
    }
    let count = workgroupUniformLoad(&mm_count);
    var fo: array<f32, 16>;
    for (var k0 = 0u; k0 < count; k0 += 16u) {
        for (var s = 0u; s < 4u; s++) {
            let e = t + s * WG;
            let rr = e / 16u;
            let k = k0 + e % 16u;
            var xv = 0.0;
            var wv = 0.0;
            if (k < count) {
                let j = mm_list[1u + k];
                if (row0 + rr < mm_p.rows) {
                    xv = outlier_x(mm_x[(row0 + rr) * mm_p.cols + j], mm_p.variant);
                }
                let o = out0 + rr;
                if (o < mm_p.outs) {
                    let q = unpack_i8(mm_cb[o * in4 + j / 4u], j % 4u);
                    wv = outlier_w(q, mm_scb[o], mm_p.variant);
                }
            }
            mm_xo[e] = xv;
            mm_wo[e] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk++) {
            for (var i = 0u; i < 4u; i++) {
                let xv = mm_xo[(lid.y + 16u * i) * 16u + kk];
                for (var j = 0u; j < 4u; j++) {
                    fo[i * 4u + j] += xv * mm_wo[(lid.x + 16u * j) * 16u + kk];
                }
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        let r = row0 + lid.y + 16u * i;
        if (r >= mm_p.rows) {
            continue;
        }
        for (var j = 0u; j < 4u; j++) {
            let o = out0 + lid.x + 16u * j;
            if (o >= mm_p.outs) {
                continue;
            }
            let a = acc[i * 4u + j];
            var bias = 0.0;
            if (mm_p.has_bias != 0u) {
                bias = mm_bias[o];
            }
            var y = y_of(a, mm_sca[r], mm_scb[o], fo[i * 4u + j], bias, mm_p.variant);
            if (mm_p.write_acc != 0u) {
                y = bitcast<f32>(a);
            }
            mm_y[mm_p.y_offset + r * mm_p.y_stride + o] = y;
        }
    }
}

// ---- int8 GEMV for a few rows (at most 4): one 64-thread workgroup per output feature
// streams that weight row (coalesced) and reduces in workgroup memory. ----

@group(0) @binding(0) var<storage, read> gv_ca: array<u32>;
@group(0) @binding(1) var<storage, read> gv_sca: array<f32>;
@group(0) @binding(2) var<storage, read> gv_cb: array<u32>;
@group(0) @binding(3) var<storage, read> gv_scb: array<f32>;
@group(0) @binding(4) var<storage, read> gv_x: array<f32>;
@group(0) @binding(5) var<storage, read> gv_list: array<u32>;
@group(0) @binding(6) var<storage, read> gv_bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> gv_y: array<f32>;
@group(0) @binding(8) var<uniform> gv_p: Params;

const GV: u32 = 64u;

var<workgroup> gv_acc: array<vec4<i32>, 64>;
var<workgroup> gv_f: array<vec4<f32>, 64>;

@compute @workgroup_size(64)
fn gemv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let o = wid.x + wid.y * groups.x;
    if (o >= gv_p.outs) {
        return;
    }
    let in4 = gv_p.in4;
    let rows = min(gv_p.rows, 4u);
    let wbase = o * in4;
    var acc = vec4<i32>(0);
    for (var w = t; w < in4; w += GV) {
        let b = gv_cb[wbase + w];
        for (var r = 0u; r < rows; r++) {
            acc[r] += dot4I8Packed(gv_ca[r * in4 + w], b);
        }
    }
    var f = vec4<f32>(0.0);
    let count = gv_list[0];
    for (var k = t; k < count; k += GV) {
        let j = gv_list[1u + k];
        let wv = outlier_w(unpack_i8(gv_cb[wbase + j / 4u], j % 4u), gv_scb[o], gv_p.variant);
        for (var r = 0u; r < rows; r++) {
            f[r] += outlier_x(gv_x[r * gv_p.cols + j], gv_p.variant) * wv;
        }
    }
    gv_acc[t] = acc;
    gv_f[t] = f;
    workgroupBarrier();
    for (var s = GV / 2u; s > 0u; s = s >> 1u) {
        if (t < s) {
            gv_acc[t] += gv_acc[t + s];
            gv_f[t] += gv_f[t + s];
        }
        workgroupBarrier();
    }
    if (t < rows) {
        let a = gv_acc[0][t];
        var bias = 0.0;
        if (gv_p.has_bias != 0u) {
            bias = gv_bias[o];
        }
        var y = y_of(a, gv_sca[t], gv_scb[o], gv_f[0][t], bias, gv_p.variant);
        if (gv_p.write_acc != 0u) {
            y = bitcast<f32>(a);
        }
        gv_y[gv_p.y_offset + t * gv_p.y_stride + o] = y;
    }
}

// ---- input gradient: dx (rows, cols) = dy (rows, outs) @ dequant(W) (outs, cols), f32,
// the weight read packed (no dequantized copy). 64x64 tiles of dx, 16 outputs per step. ----

@group(0) @binding(0) var<storage, read> bw_dy: array<f32>;
@group(0) @binding(1) var<storage, read> bw_cb: array<u32>;
@group(0) @binding(2) var<storage, read> bw_scb: array<f32>;
@group(0) @binding(3) var<storage, read_write> bw_dx: array<f32>;
@group(0) @binding(4) var<uniform> bw_p: Params;

var<workgroup> bw_g: array<f32, 1024>; // [row][16 outs]
var<workgroup> bw_w: array<f32, 1024>; // [16 outs][64 cols]

@compute @workgroup_size(16, 16)
fn backward_dx(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row0 = wid.y * TILE;
    let col0 = wid.x * TILE;
    let in4 = bw_p.in4;
    var acc: array<f32, 16>; // [i * 4 + j]: row row0 + lid.y + 16 i, col col0 + lid.x + 16 j
    if (bw_p.accumulate != 0u) {
        for (var i = 0u; i < 4u; i++) {
            let r = row0 + lid.y + 16u * i;
            for (var j = 0u; j < 4u; j++) {
                let c = col0 + lid.x + 16u * j;
                if (r < bw_p.rows && c < bw_p.cols) {
                    acc[i * 4u + j] = bw_dx[r * bw_p.cols + c];
                }
            }
        }
    }
    for (var o0 = 0u; o0 < bw_p.outs; o0 += 16u) {
        for (var s = 0u; s < 4u; s++) {
            let e = t + s * WG;
            let rr = e / 16u;
            let o = o0 + e % 16u;
            var g = 0.0;
            if (row0 + rr < bw_p.rows && o < bw_p.outs) {
                g = bw_dy[bw_p.y_offset + (row0 + rr) * bw_p.y_stride + o];
            }
            bw_g[e] = g;
        }
        {
            // 16 outs x 16 words: one word (4 columns) per thread.
            let oo = t / 16u;
            let w = t % 16u;
            let o = o0 + oo;
            let word_index = col0 / 4u + w;
            var word = 0u;
            var scale = 0.0;
            if (o < bw_p.outs && word_index < in4) {
                word = bw_cb[o * in4 + word_index];
                scale = bw_scb[o];
            }
            for (var e = 0u; e < 4u; e++) {
                bw_w[oo * 64u + w * 4u + e] = f32(unpack_i8(word, e)) * scale / 127.0;
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk++) {
            for (var i = 0u; i < 4u; i++) {
                let g = bw_g[(lid.y + 16u * i) * 16u + kk];
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] = fma(g, bw_w[kk * 64u + lid.x + 16u * j], acc[i * 4u + j]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let r = row0 + lid.y + 16u * i;
        for (var j = 0u; j < 4u; j++) {
            let c = col0 + lid.x + 16u * j;
            if (r < bw_p.rows && c < bw_p.cols) {
                bw_dx[r * bw_p.cols + c] = acc[i * 4u + j];
            }
        }
    }
}
