// Embedding gather and its backward (a deterministic scatter-add).

struct EmbedParams {
    // tokens * hidden
    n: u32,
    hidden: u32,
    tokens: u32,
    _pad: u32,
}

// out[i, d] = weight[ids[i], d]; one invocation per (token, dim). Ids are validated on the host.
@group(0) @binding(0) var<storage, read> gather_weight: array<f32>;
@group(0) @binding(1) var<storage, read> gather_ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> gather_out: array<f32>;
@group(0) @binding(3) var<uniform> gather_p: EmbedParams;

@compute @workgroup_size(256)
fn embedding_gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i >= gather_p.n) {
        return;
    }
    let tok = i / gather_p.hidden;
    let d = i % gather_p.hidden;
    gather_out[i] = gather_weight[gather_ids[tok] * gather_p.hidden + d];
}

// As embedding_gather from an f16 table packed two per u32 word (element e in the low half
// of word e / 2 when e is even).
@group(0) @binding(0) var<storage, read> gather_half_weight: array<u32>;
@group(0) @binding(1) var<storage, read> gather_half_ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> gather_half_out: array<f32>;
@group(0) @binding(3) var<uniform> gather_half_p: EmbedParams;

@compute @workgroup_size(256)
fn embedding_gather_half(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i >= gather_half_p.n) {
        return;
    }
    let tok = i / gather_half_p.hidden;
    let d = i % gather_half_p.hidden;
    let e = gather_half_ids[tok] * gather_half_p.hidden + d;
    let pair = unpack2x16float(gather_half_weight[e / 2u]);
    gather_half_out[i] = select(pair.x, pair.y, (e & 1u) == 1u);
}

// grad_weight[id, d] = sum of grad[j, d] over the tokens j with ids[j] == id, in increasing j
// (the CPU order, so both devices agree bit for bit). One invocation per (token i, dim d): only
// the first occurrence of each id writes, walking the chain of later tokens with the same id.
// links[i] is the next token with ids[i] (tokens = none), links[tokens + i] is 1 when token i
// is the first with its id. The output starts zeroed (rows of unused ids stay zero), and no
// two invocations write the same element: no atomics, no races.
@group(0) @binding(0) var<storage, read> scatter_grad: array<f32>;
@group(0) @binding(1) var<storage, read> scatter_ids: array<u32>;
@group(0) @binding(2) var<storage, read> scatter_links: array<u32>;
@group(0) @binding(3) var<storage, read_write> scatter_out: array<f32>;
@group(0) @binding(4) var<uniform> scatter_p: EmbedParams;

@compute @workgroup_size(256)
fn embedding_scatter_add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * 256u;
    if (i >= scatter_p.n) {
        return;
    }
    let tok = i / scatter_p.hidden;
    let d = i % scatter_p.hidden;
    if (scatter_links[scatter_p.tokens + tok] == 0u) {
        return;
    }
    var acc = 0.0;
    var j = tok;
    loop {
        acc += scatter_grad[j * scatter_p.hidden + d];
        j = scatter_links[j];
        if (j >= scatter_p.tokens) {
            break;
        }
    }
    scatter_out[scatter_ids[tok] * scatter_p.hidden + d] = acc;
}
