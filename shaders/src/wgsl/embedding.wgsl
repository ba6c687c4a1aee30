// Embedding gather and its backward (a deterministic scatter-add).

struct EmbedParams {
    // tokens * hidden
    n: u32,
    hidden: u32,
    tokens: u32,
    // The table (or gradient) is bound as rows [first_id, first_id + ids_bound) of the whole:
    // a table over the binding limit is visited a window at a time, and an invocation whose
    // id lies outside the window leaves its output to another dispatch.
    first_id: u32,
    ids_bound: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

fn in_window(id: u32, p: EmbedParams) -> bool {
    return id >= p.first_id && id - p.first_id < p.ids_bound;
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
    let id = gather_ids[tok];
    if (in_window(id, gather_p)) {
        gather_out[i] = gather_weight[(id - gather_p.first_id) * gather_p.hidden + d];
    }
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
    let id = gather_half_ids[tok];
    if (!in_window(id, gather_half_p)) {
        return;
    }
    let e = (id - gather_half_p.first_id) * gather_half_p.hidden + d;
    let pair = unpack2x16float(gather_half_weight[e / 2u]);
    gather_half_out[i] = select(pair.x, pair.y, (e & 1u) == 1u);
}

// grad_weight[id, d] = sum of grad[j, d] over the tokens j with ids[j] == id, in increasing j
// (the CPU order, so both devices agree bit for bit). One invocation per (token i, dim d): only
// the first occurrence of each id writes, walking the chain of later tokens with the same id.
// links[i] is the next token with ids[i] (tokens = none), links[tokens + i] is 1 when token i
// is the first with its id. The output starts zeroed (rows of unused ids stay zero), and no
// two invocations write the same element: no atomics, no races. Sums continue from the
// output's value, so tokens visited a chunk at a time add in the same order as all at once.
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
    let id = scatter_ids[tok];
    if (scatter_links[scatter_p.tokens + tok] == 0u || !in_window(id, scatter_p)) {
        return;
    }
    let at = (id - scatter_p.first_id) * scatter_p.hidden + d;
    var acc = scatter_out[at];
    var j = tok;
    loop {
        acc += scatter_grad[j * scatter_p.hidden + d];
        j = scatter_links[j];
        if (j >= scatter_p.tokens) {
            break;
        }
    }
    scatter_out[at] = acc;
}
