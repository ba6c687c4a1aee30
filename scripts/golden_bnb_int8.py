#!/usr/bin/env python3
"""Golden fixtures for lathe-models' bitsandbytes 8-bit loading test (models/tests/bnb_int8.rs).

What: a tiny random GPT-NeoX and a tiny Llama, saved in f32, loaded back by transformers with
`BitsAndBytesConfig(load_in_8bit=True)` on the CPU (bitsandbytes quantizes every block linear
to CB int8 + SCB row scales), then saved with `save_pretrained` into
models/tests/fixtures/models/NAME_bnb8/ exactly as transformers writes an 8-bit checkpoint
(`...weight` I8 (out, in), `...SCB` F32 (out,), `...weight_format` U8 scalar 0 = "row", and
`quantization_config` in config.json). NAME_bnb8/golden.safetensors holds the input ids and
the logits of bitsandbytes' own LLM.int8 forward (Linear8bitLt on the CPU, threshold 6.0):
  - `input_ids` (B, T) u32 -> `logits` (B, T, V) f32;
  - `logits_lathe_int8` (B, T, V) f32: the same transformers model on the same stored CB/SCB,
    with every Linear8bitLt's forward replaced by a pure-torch re-implementation of lathe's
    LLM.int8 variant (`lathe_int8_forward` below, quant/src/int8/cpu.rs): NOT bitsandbytes'
    output, a reference for lathe's arithmetic, so that the test can check the loader tightly
    and attribute the whole lathe-vs-bnb difference to the two LLM.int8 variants;
  - `outlier_columns` (L,) u32: how many distinct outlier columns bnb found per quantized
    linear over the forward (the fixtures are built so that some exceed the 6.0 threshold).
The GPT-NeoX fixture also keeps one block linear dense through `llm_int8_skip_modules`
("layers.1.mlp.dense_4h_to_h"), so that path is covered; the Llama one uses the default
(only the LM head stays dense).

Outliers: some norm weights are set to 8.0 in one hidden column and one MLP up-projection row is
scaled by 8, so the inputs of the next linear exceed 6.0 in those columns for most tokens.

How to run (from the repository root; CPU only, no GPU needed):
    python3 -m venv /tmp/venv-tf5
    /tmp/venv-tf5/bin/pip install torch==2.15.0 transformers==5.25.0 bitsandbytes==0.50.2 \
        accelerate==1.16.0 safetensors==0.8.0 numpy==2.4.6
    /tmp/venv-tf5/bin/python scripts/golden_bnb_int8.py

Pinned versions: torch 2.15.0 (CPU), transformers 5.25.0, bitsandbytes 0.50.2, accelerate
1.16.0, safetensors 0.8.0, numpy 2.4.6.

bitsandbytes 0.50.2's CPU path (backends/default/ops.py) is what produced the logits: the
activations are cast to f16 before their row-wise quantization, outlier entries (|x| >= 6 in
f16) are zeroed before the row absmax and their columns zeroed after it, the int8 product is
exact (int32), dequantized as acc * SCA * SCB * 6.200124e-05 in f32, and the outlier columns
are added back as x[:, cols] (f32) @ (CB[:, cols] * SCB / 127)^T in f32.
"""

import json
import os
import shutil
import tempfile

import bitsandbytes as bnb
import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers import (
    BitsAndBytesConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "models", "tests", "fixtures", "models")

VOCAB = 40
HIDDEN = 32
HEADS = 4
INTERMEDIATE = 48
LAYERS = 2
MAX_POS = 64
OUTLIER_COL = 5
BIG = 8.0


def randomize(model, seed):
    """Redraws every parameter as scripts/golden_models.py does (matrices N(0, 0.25^2), norm
    weights 1 + N(0, 0.1^2), biases N(0, 0.1^2)), then plants the outliers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias") or p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.25 * noise)
        for name, p in model.named_parameters():
            # A large column of every input norm: the attention input exceeds 6 there.
            if ("input_layernorm" in name or "post_attention_layernorm" in name) and name.endswith(
                "weight"
            ):
                p[OUTLIER_COL] = BIG
            # One large row of the MLP's first projection: the second's input exceeds 6 there.
            if name.endswith("dense_h_to_4h.weight") or name.endswith("up_proj.weight"):
                p[3] *= BIG


def lathe_int8_forward(self, x):
    """lathe's LLM.int8 (quant/src/int8/cpu.rs) in torch, on bnb's CB (self.weight) and SCB:
    outlier columns = any |x| >= t (f32); SCA = row absmax over the other *columns* (f32 x,
    no f16 cast); CA = round_ties_even(x * (127 / SCA)); acc exact; y = sum over outlier
    columns in ascending order of f16(x) * f16(CB * SCB / 127), then + acc * (SCA * SCB /
    16129), then + bias, all in f32. bnb 0.50.2 instead casts x to f16 before quantizing,
    zeroes outlier *entries* before the absmax, dequantizes with * 6.200124e-05 and adds the
    outlier columns in f32."""
    cb = self.weight.data
    scb = getattr(self.weight, "SCB", None)
    scb = self.state.SCB if scb is None else scb
    threshold = self.state.threshold
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    if threshold > 0:
        cols = (x2.abs() >= threshold).any(dim=0).nonzero().view(-1)
    else:
        cols = torch.empty(0, dtype=torch.long)
    xm = x2.clone()
    xm[:, cols] = 0
    sca = xm.abs().amax(dim=1)
    inv = torch.where(sca >= 7.888609e-31, 127.0 / sca, torch.zeros_like(sca))
    ca = torch.round(xm * inv[:, None]).clamp(-127, 127)
    acc = (ca.double() @ cb.double().t()).float()  # exact: |acc| < 2^24 here
    y = torch.zeros(x2.shape[0], cb.shape[0])
    if len(cols):
        w = ((cb[:, cols].float() * scb[:, None]) / 127.0).half().float()
        xo = x2[:, cols].half().float()
        for k in range(len(cols)):
            y = y + xo[:, k : k + 1] * w[:, k][None, :]
    y = y + acc * (sca[:, None] * scb[None, :] / 16129.0)
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*shape[:-1], cb.shape[0])


def bnb_int8_forward(self, x):
    """bitsandbytes 0.50.2's eval-mode CPU forward (Linear8bitLt -> MatMul8bitLt ->
    int8_vectorwise_quant, int8_mixed_scaled_mm) written out in plain torch: the definition
    lathe's `Int8Variant::Bitsandbytes` follows (quant/src/int8/cpu.rs, int8.wgsl). x is cast
    to f16; entries with |x_f16| >= threshold (compared in f16) are outliers, zeroed before
    the row absmax; SCA = row absmax (f32); CA = round(x_f16 * (127 / SCA)) with the outlier
    columns zeroed; y = (acc * (SCA * SCB)) * 6.200124e-05 + bias, then addmm of x[:, cols]
    (f32) with (CB[:, cols] * SCB) * 7.874015718698502e-3. `build` checks that it gives
    bnb's logits bit for bit; lathe sums the outlier products in column order where torch's
    addmm has its BLAS' order (a few f32 ulps apart)."""
    cb = self.weight.data
    scb = getattr(self.weight, "SCB", None)
    scb = self.state.SCB if scb is None else scb
    threshold = self.state.threshold
    shape = x.shape
    a = x.reshape(-1, shape[-1]).float()
    ah = a.half()
    if threshold > 0:
        entries = ah.abs() >= threshold
        cols = entries.any(dim=0).nonzero().view(-1)
        ah = ah.masked_fill(entries, 0)
    else:
        cols = torch.empty(0, dtype=torch.long)
    sca = ah.abs().amax(dim=1).float()
    ca = torch.round(ah * (127.0 / sca[:, None])).to(torch.int8)
    ca[:, cols] = 0
    acc = (ca.double() @ cb.double().t()).to(torch.int32)  # exact, as torch._int_mm
    y = acc * (sca[:, None] * scb[None, :]) * 6.200124e-05
    if self.bias is not None:
        y += self.bias
    if len(cols):
        w = cb[:, cols] * scb.view(-1, 1) * 7.874015718698502e-3
        y = y.addmm(a[:, cols], w.t())
    return y.reshape(*shape[:-1], cb.shape[0])


def count_outliers(model):
    """Hooks every Linear8bitLt: the distinct columns of its inputs with |x| >= threshold
    (in f16, as bnb tests them)."""
    counts = {}

    def hook(name, threshold):
        def f(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float16)
            cols = (x.abs() >= threshold).any(dim=0).nonzero().view(-1).tolist()
            counts.setdefault(name, set()).update(cols)

        return f

    handles = [
        m.register_forward_pre_hook(hook(n, m.state.threshold))
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear8bitLt)
    ]
    return counts, handles


def build(name, model, seed, skip):
    directory = os.path.join(OUT, name)
    shutil.rmtree(directory, ignore_errors=True)
    with tempfile.TemporaryDirectory() as f32_dir:
        model.save_pretrained(f32_dir, safe_serialization=True)
        quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        q = type(model).from_pretrained(
            f32_dir, quantization_config=quant, device_map="cpu", dtype=torch.float32
        ).eval()
    q.save_pretrained(directory, safe_serialization=True)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 7), generator=gen)
    counts, handles = count_outliers(q)
    with torch.no_grad():
        logits = q(input_ids=ids).logits.float().numpy()
    for h in handles:
        h.remove()
    outliers = [len(counts.get(n, ())) for n in sorted(counts)]
    bnb_forward = bnb.nn.Linear8bitLt.forward
    bnb.nn.Linear8bitLt.forward = lathe_int8_forward
    try:
        with torch.no_grad():
            lathe_logits = q(input_ids=ids).logits.float().numpy()
        bnb.nn.Linear8bitLt.forward = bnb_int8_forward
        with torch.no_grad():
            rederived = q(input_ids=ids).logits.float().numpy()
    finally:
        bnb.nn.Linear8bitLt.forward = bnb_forward
    # The definition lathe's bitsandbytes variant follows is bnb's arithmetic, bit for bit.
    assert np.array_equal(rederived, logits), float(np.abs(rederived - logits).max())
    gap = float(np.abs(lathe_logits - logits).max())
    assert sum(outliers) > 0, "no activation reached the outlier threshold"
    tensors = {
        "input_ids": ids.numpy().astype(np.uint32),
        "logits": logits,
        "logits_lathe_int8": lathe_logits,
        "outlier_columns": np.array(outliers, dtype=np.uint32),
    }
    metadata = {
        "generator": "scripts/golden_bnb_int8.py",
        "logits": "bitsandbytes Linear8bitLt forward on the CPU (threshold 6.0)",
        "logits_lathe_int8": "pure-torch re-implementation of lathe's LLM.int8 variant, not bnb",
        "max_abs_lathe_int8_minus_bnb": repr(gap),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bnb.__version__,
        "numpy": np.__version__,
        "seed": str(seed),
        "outlier_modules": json.dumps(sorted(counts)),
    }
    save_file(tensors, os.path.join(directory, "golden.safetensors"), metadata=metadata)
    files = {f: os.path.getsize(os.path.join(directory, f)) for f in sorted(os.listdir(directory))}
    print(f"{name}: {files} outlier columns per linear {dict(zip(sorted(counts), outliers))}")
    print(f"{name}: max |logits| {np.abs(logits).max():.3f}, max |lathe variant - bnb| {gap:.3e}")


def main():
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        rotary_pct=0.25,
        hidden_act="gelu",
        use_parallel_residual=True,
        max_position_embeddings=MAX_POS,
        layer_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    model = GPTNeoXForCausalLM(config).eval()
    randomize(model, 21)
    # transformers 5 names the GPT-NeoX head module "lm_head" (saved as "embed_out").
    build("neox_bnb8", model, 21, ["lm_head", "layers.1.mlp.dense_4h_to_h"])

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        intermediate_size=INTERMEDIATE,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    randomize(model, 22)
    build("llama_bnb8", model, 22, None)
    print(json.dumps({"out": OUT}))


if __name__ == "__main__":
    main()
