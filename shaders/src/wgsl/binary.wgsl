// Broadcasting binary ops. Operands are read through per-dimension strides of the output
// shape (0 where an operand is broadcast) from an offset, and the output written through its
// own strides from an offset: a tensor over one storage binding is computed a tile at a time,
// each operand bound as the window its tile touches. op: 0 add, 1 sub, 2 mul, 3 div.

struct Params {
    n: u32,
    rank: u32,
    op: u32,
    a_offset: u32,
    b_offset: u32,
    out_offset: u32,
    _pad0: u32,
    _pad1: u32,
    out_shape: array<vec4<u32>, 2>,
    a_strides: array<vec4<u32>, 2>,
    b_strides: array<vec4<u32>, 2>,
    out_strides: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(256)
fn binary(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i >= p.n) {
        return;
    }
    var rem = i;
    var ai = p.a_offset;
    var bi = p.b_offset;
    var oi = p.out_offset;
    for (var d = i32(p.rank) - 1; d >= 0; d--) {
        let q = u32(d) / 4u;
        let r = u32(d) % 4u;
        let size = p.out_shape[q][r];
        let idx = rem % size;
        rem = rem / size;
        ai += idx * p.a_strides[q][r];
        bi += idx * p.b_strides[q][r];
        oi += idx * p.out_strides[q][r];
    }
    let x = a[ai];
    let y = b[bi];
    var v: f32;
    switch p.op {
        case 0u: { v = x + y; }
        case 1u: { v = x - y; }
        case 2u: { v = x * y; }
        default: { v = x / y; }
    }
    out[oi] = v;
}
