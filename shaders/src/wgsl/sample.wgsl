// Picking the next token of each row of logits (B, V) on the device, so that generation reads
// back B token ids instead of B * V logits. One workgroup of 256 invocations per row; rows
// may be shorter or longer than the workgroup. The definition is the host's
// (models/src/sampling.rs, in f64 there):
//
// - greedy: argmax, the first index on ties.
// - p_i = exp((l_i - max) / T); a token is "kept" only if its p is > 0.
// - top-k (0 < k < V): keep tokens whose logit >= the k-th largest logit (ties kept).
// - top-p (< 1): with total = the sum of p over the tokens kept so far, keep token i iff
//   mass(p_j > p_i, j kept) < top_p * total.
// - the draw: target = u * sum(kept p); the token is the first kept token in id order whose
//   running sum (in id order) exceeds target, or the last kept token if rounding runs past
//   the end.
//
// No sorting: both thresholds are found by bisection over order-preserving u32 keys, each
// round a workgroup reduction over the row. The token `suppress` (0xffffffff = none) counts
// as a logit of -inf. A row holding NaN or +inf, or only -inf, gets 0xffffffff: the host
// turns that into the host sampler's error.

struct SampleParams {
    batch: u32,
    vocab: u32,
    top_k: u32,
    suppress: u32,
    temperature: f32,
    top_p: f32,
    greedy: u32,
    _pad: u32,
}

const WG: u32 = 256u;
const NONE: u32 = 0xffffffffu;
// key_of(-inf): every finite logit's key is above it, NaN (negative sign) keys below it.
const NEG_INF_KEY: u32 = 0x007fffffu;
// key_of(+inf): +inf and NaN (positive sign) keys are at or above it.
const POS_INF_KEY: u32 = 0xff800000u;

@group(0) @binding(0) var<storage, read> sm_logits: array<f32>;
@group(0) @binding(1) var<storage, read> sm_uniforms: array<f32>;
@group(0) @binding(2) var<storage, read_write> sm_tokens: array<u32>;
// (B, V) scratch: p of every token, 0 where not kept after top-k.
@group(0) @binding(3) var<storage, read_write> sm_probs: array<f32>;
@group(0) @binding(4) var<uniform> sm_p: SampleParams;

var<workgroup> wg_a: array<u32, 256>;
var<workgroup> wg_b: array<u32, 256>;
var<workgroup> wg_f: array<f32, 256>;

// The order-preserving key of an f32: a < b (as floats) iff key(a) < key(b); -0 == +0.
fn key_of(x: f32) -> u32 {
    var bits = bitcast<u32>(x);
    if (bits == 0x80000000u) {
        bits = 0u;
    }
    if ((bits & 0x80000000u) != 0u) {
        return ~bits;
    }
    return bits | 0x80000000u;
}

fn value_of(key: u32) -> f32 {
    if ((key & 0x80000000u) != 0u) {
        return bitcast<f32>(key & 0x7fffffffu);
    }
    return bitcast<f32>(~key);
}

// The key of token i of the row starting at `base`, the suppressed token as -inf.
fn row_key(base: u32, i: u32) -> u32 {
    if (i == sm_p.suppress) {
        return NEG_INF_KEY;
    }
    return key_of(sm_logits[base + i]);
}

// exp(x) for x <= 0 to a few ulp for any x: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2,
// so the builtin exp only sees small arguments (its error bound grows with |x|).
fn exp_nonpositive(x: f32) -> f32 {
    if (x < -104.0) {
        return 0.0;
    }
    let n = round(x * 1.44269504);
    let r = (x - n * 0.693145752) - n * 1.42860677e-6;
    return ldexp(exp(r), i32(n));
}

// Kahan summation state: (sum, compensation).
fn kahan_add(acc: vec2<f32>, x: f32) -> vec2<f32> {
    let y = x - acc.y;
    let t = acc.x + y;
    return vec2<f32>(t, (t - acc.x) - y);
}

fn sum_u32(lid: u32, x: u32) -> u32 {
    wg_a[lid] = x;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            wg_a[lid] += wg_a[lid + s];
        }
        workgroupBarrier();
    }
    let total = workgroupUniformLoad(&wg_a[0]);
    workgroupBarrier();
    return total;
}

fn min_u32(lid: u32, x: u32) -> u32 {
    wg_a[lid] = x;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            wg_a[lid] = min(wg_a[lid], wg_a[lid + s]);
        }
        workgroupBarrier();
    }
    let total = workgroupUniformLoad(&wg_a[0]);
    workgroupBarrier();
    return total;
}

fn max_u32(lid: u32, x: u32) -> u32 {
    wg_a[lid] = x;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            wg_a[lid] = max(wg_a[lid], wg_a[lid + s]);
        }
        workgroupBarrier();
    }
    let total = workgroupUniformLoad(&wg_a[0]);
    workgroupBarrier();
    return total;
}

fn sum_f32(lid: u32, x: f32) -> f32 {
    wg_f[lid] = x;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            wg_f[lid] += wg_f[lid + s];
        }
        workgroupBarrier();
    }
    let total = workgroupUniformLoad(&wg_f[0]);
    workgroupBarrier();
    return total;
}

// The largest key of the row and its first index: (key, index).
fn argmax_key(lid: u32, key: u32, index: u32) -> vec2<u32> {
    wg_a[lid] = key;
    wg_b[lid] = index;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            let k = wg_a[lid + s];
            let i = wg_b[lid + s];
            if (k > wg_a[lid] || (k == wg_a[lid] && i < wg_b[lid])) {
                wg_a[lid] = k;
                wg_b[lid] = i;
            }
        }
        workgroupBarrier();
    }
    let best = vec2<u32>(workgroupUniformLoad(&wg_a[0]), workgroupUniformLoad(&wg_b[0]));
    workgroupBarrier();
    return best;
}

// The inclusive prefix sums of one value per invocation (Hillis-Steele), in wg_f.
fn scan_f32(lid: u32, x: f32) {
    wg_f[lid] = x;
    workgroupBarrier();
    for (var offset = 1u; offset < WG; offset = offset << 1u) {
        var add = 0.0;
        if (lid >= offset) {
            add = wg_f[lid - offset];
        }
        workgroupBarrier();
        wg_f[lid] += add;
        workgroupBarrier();
    }
}

// The key of the k-th largest logit: the largest key K with count(key >= K) >= k, bit by bit.
fn top_k_threshold(lid: u32, base: u32, vocab: u32, k: u32) -> u32 {
    var threshold = 0u;
    for (var bit = 31i; bit >= 0i; bit--) {
        let candidate = threshold | (1u << u32(bit));
        var count = 0u;
        for (var i = lid; i < vocab; i += WG) {
            count += select(0u, 1u, row_key(base, i) >= candidate);
        }
        if (sum_u32(lid, count) >= k) {
            threshold = candidate;
        }
    }
    return threshold;
}

// The sum of p over tokens whose p is above `bits` (p >= 0, so its bits order as its values).
fn mass_above(lid: u32, base: u32, vocab: u32, bits: u32) -> f32 {
    var acc = vec2<f32>(0.0, 0.0);
    for (var i = lid; i < vocab; i += WG) {
        let p = sm_probs[base + i];
        if (bitcast<u32>(p) > bits) {
            acc = kahan_add(acc, p);
        }
    }
    return sum_f32(lid, acc.x - acc.y);
}

// The smallest bits of p a token needs to survive top-p: token i is kept iff
// mass(p_j > p_i) < top_p * total, and that mass does not grow with p_i.
fn top_p_threshold(lid: u32, base: u32, vocab: u32, total: f32) -> u32 {
    let limit = sm_p.top_p * total;
    if (total < limit) {
        return 1u;
    }
    // The largest bits C with mass_above(C) >= limit (mass_above(0) = total >= limit).
    var c = 0u;
    for (var bit = 30i; bit >= 0i; bit--) {
        let candidate = c | (1u << u32(bit));
        if (mass_above(lid, base, vocab, candidate) >= limit) {
            c = candidate;
        }
    }
    return c + 1u;
}

@compute @workgroup_size(256)
fn sample(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_id) local: vec3<u32>,
) {
    let row = wid.x + wid.y * groups.x;
    if (row >= sm_p.batch) {
        return;
    }
    let lid = local.x;
    let vocab = sm_p.vocab;
    let base = row * vocab;

    // The largest key (first index on ties) and whether the row holds NaN or +inf.
    var best_key = 0u;
    var best_index = NONE;
    var bad = 0u;
    for (var i = lid; i < vocab; i += WG) {
        let key = row_key(base, i);
        if (key >= POS_INF_KEY || key < NEG_INF_KEY) {
            bad = 1u;
        } else if (best_index == NONE || key > best_key) {
            best_key = key;
            best_index = i;
        }
    }
    let best = argmax_key(lid, select(best_key, 0u, best_index == NONE), best_index);
    if (max_u32(lid, bad) != 0u || best.x <= NEG_INF_KEY) {
        if (lid == 0u) {
            sm_tokens[row] = NONE;
        }
        return;
    }
    if (sm_p.greedy != 0u) {
        if (lid == 0u) {
            sm_tokens[row] = best.y;
        }
        return;
    }

    // p of every token that survives top-k (0 for the others).
    var k_threshold = 0u;
    if (sm_p.top_k > 0u && sm_p.top_k < vocab) {
        k_threshold = top_k_threshold(lid, base, vocab, sm_p.top_k);
    }
    let max_logit = value_of(best.x);
    var acc = vec2<f32>(0.0, 0.0);
    for (var i = lid; i < vocab; i += WG) {
        let key = row_key(base, i);
        var p = 0.0;
        if (key >= k_threshold && key > NEG_INF_KEY) {
            p = exp_nonpositive((value_of(key) - max_logit) / sm_p.temperature);
        }
        sm_probs[base + i] = p;
        acc = kahan_add(acc, p);
    }
    let total = sum_f32(lid, acc.x - acc.y);

    // Top-p: the smallest bits of p that stay (1 = every p > 0).
    var p_threshold = 1u;
    if (sm_p.top_p < 1.0) {
        p_threshold = top_p_threshold(lid, base, vocab, total);
    }

    // The draw in id order: chunk sums, a scan, then the chunk owning the target walks.
    let chunk = (vocab + WG - 1u) / WG;
    let start = min(lid * chunk, vocab);
    let end = min(start + chunk, vocab);
    var own = vec2<f32>(0.0, 0.0);
    var last_kept = NONE;
    for (var i = start; i < end; i++) {
        let p = sm_probs[base + i];
        if (bitcast<u32>(p) >= p_threshold) {
            own = kahan_add(own, p);
            last_kept = i;
        }
    }
    let own_sum = own.x - own.y;
    scan_f32(lid, own_sum);
    let inclusive = wg_f[lid];
    var exclusive = 0.0;
    if (lid > 0u) {
        exclusive = wg_f[lid - 1u];
    }
    let kept_total = workgroupUniformLoad(&wg_f[WG - 1u]);
    workgroupBarrier();
    let goal = sm_uniforms[row] * kept_total;
    // The first chunk whose inclusive prefix exceeds the goal.
    let owns = own_sum > 0.0 && inclusive > goal;
    let owner = min_u32(lid, select(NONE, lid, owns));
    if (owner == NONE) {
        // Rounding ran past the end: the last kept token of the row.
        let last = max_u32(lid, select(0u, last_kept + 1u, last_kept != NONE));
        if (lid == 0u) {
            sm_tokens[row] = last - 1u;
        }
        return;
    }
    if (lid == owner) {
        let local_goal = goal - exclusive;
        var running = vec2<f32>(0.0, 0.0);
        var token = last_kept;
        for (var i = start; i < end; i++) {
            let p = sm_probs[base + i];
            if (bitcast<u32>(p) >= p_threshold) {
                running = kahan_add(running, p);
                if (running.x - running.y > local_goal) {
                    token = i;
                    break;
                }
            }
        }
        sm_tokens[row] = token;
    }
}
