// Tiled f32 matmul: out[b] = op(A)[b] @ op(B)[b], with op(A) (M, K) and op(B) (K, N) read
// through row/column strides (a transpose is just swapped strides) and per-batch strides
// (0 shares one B across the batch). Each 16x16 workgroup computes a 64x64 output tile, each
// thread a 4x4 block, staging 16-deep slices of A and B in workgroup memory.
//
// Operands larger than one binding are bound as windows: `*_offset` is where the block starts
// inside its window, the output is written with its own row and batch strides, and with
// `accumulate` set a block of the K dimension adds to the output (its accumulators start
// from the stored value, so a split K sums in the same order as one pass).
//
// Entry points: `matmul` (B f32) and `matmul_half_b` (B f16, packed two per u32 word, low
// half first: a frozen f16 weight read at half the bytes; arithmetic stays f32). B is bound
// as raw u32 words in both, so both entries share one body and one binding layout.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    a_row_stride: u32,
    a_col_stride: u32,
    a_batch_stride: u32,
    a_offset: u32,
    b_row_stride: u32,
    b_col_stride: u32,
    b_batch_stride: u32,
    b_offset: u32,
    out_row_stride: u32,
    out_batch_stride: u32,
    out_offset: u32,
    accumulate: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

const TILE: u32 = 64u;
const DEPTH: u32 = 16u;

var<workgroup> a_tile: array<array<f32, 64>, 16>; // [depth][row]
var<workgroup> b_tile: array<array<f32, 64>, 16>; // [depth][col]

/// Element i of B: an f32 word, or half i % 2 of word i / 2.
fn load_b(i: u32, half_b: bool) -> f32 {
    if (half_b) {
        let pair = unpack2x16float(b[i / 2u]);
        return select(pair.x, pair.y, (i & 1u) == 1u);
    }
    return bitcast<f32>(b[i]);
}

@compute @workgroup_size(16, 16, 1)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    matmul_tile(wid, lid, false);
}

@compute @workgroup_size(16, 16, 1)
fn matmul_half_b(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    matmul_tile(wid, lid, true);
}

fn matmul_tile(wid: vec3<u32>, lid: vec3<u32>, half_b: bool) {
    let batch = wid.z;
    let row0 = wid.y * TILE;
    let col0 = wid.x * TILE;
    let a_base = p.a_offset + batch * p.a_batch_stride;
    let b_base = p.b_offset + batch * p.b_batch_stride;
    let out_base = p.out_offset + batch * p.out_batch_stride;
    let flat = lid.y * 16u + lid.x; // 0..256

    var acc: array<array<f32, 4>, 4>;
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            let r = row0 + lid.y * 4u + i;
            let c = col0 + lid.x * 4u + j;
            var start = 0.0;
            if (p.accumulate != 0u && r < p.m && c < p.n) {
                start = out[out_base + r * p.out_row_stride + c];
            }
            acc[i][j] = start;
        }
    }

    for (var k0 = 0u; k0 < p.k; k0 += DEPTH) {
        // 64 x 16 = 1024 values of each operand, 4 per thread.
        for (var s = 0u; s < 4u; s++) {
            let e = flat + s * 256u;
            let r = e / DEPTH;
            let d = e % DEPTH;
            let ar = row0 + r;
            let ak = k0 + d;
            var av = 0.0;
            if (ar < p.m && ak < p.k) {
                av = a[a_base + ar * p.a_row_stride + ak * p.a_col_stride];
            }
            a_tile[d][r] = av;
            let bc = col0 + r;
            var bv = 0.0;
            if (bc < p.n && ak < p.k) {
                bv = load_b(b_base + ak * p.b_row_stride + bc * p.b_col_stride, half_b);
            }
            b_tile[d][r] = bv;
        }
        workgroupBarrier();
        for (var d = 0u; d < DEPTH; d++) {
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                av[i] = a_tile[d][lid.y * 4u + i];
                bv[i] = b_tile[d][lid.x * 4u + i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i][j] = fma(av[i], bv[j], acc[i][j]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        let r = row0 + lid.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let c = col0 + lid.x * 4u + j;
            if (r < p.m && c < p.n) {
                out[out_base + r * p.out_row_stride + c] = acc[i][j];
            }
        }
    }
}
