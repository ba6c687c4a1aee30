#!/usr/bin/env python3
"""Golden fixtures in transformers 5.x's config layout (models/tests/conformance_hf_v5.rs).

What: tiny random GPT-NeoX and Llama models built and saved with transformers 5.x, whose
config.json keeps the rotary settings in a `rope_parameters` object (`rope_type`,
`rope_theta`, `partial_rotary_factor`) instead of 4.46's top-level `rotary_pct` /
`rotary_emb_base` / `rope_theta`, and `dtype` instead of `torch_dtype`. Each goes to
models/tests/fixtures/models/NAME_v5/ (`save_pretrained`, safetensors) with
NAME_v5/golden.safetensors beside it, in the layout of scripts/golden_models.py (the 4.46.3
fixtures): `input_ids` (B, T) u32, transformers' f32 `logits` (B, T, V) and last hidden
states `hidden` (B, T, H) (after the final norm).

The rotary settings are not transformers' defaults (GPT-NeoX partial_rotary_factor 0.5, not
0.25; rope_theta 50000, not 10000), so a reader that ignores `rope_parameters` gets other
logits: the Rust test checks that too.

  - neox_parallel_half_v5: parallel residual, partial_rotary_factor 0.5, rope_theta 50000, gelu
  - neox_sequential_half_v5: sequential residual, the same rotary settings, gelu_new
  - llama_gqa_v5: 4 heads, 2 kv heads, rope_theta 50000, untied lm_head

How to run (from the repository root; the venv lives outside the repository):
    python3 -m venv /tmp/venv-tf5
    /tmp/venv-tf5/bin/pip install torch==2.15.0 transformers==5.25.0 safetensors==0.8.0 numpy==2.4.6
    /tmp/venv-tf5/bin/python scripts/golden_config_v5.py

Pinned versions: torch 2.15.0 (the PyPI build; the CPU is used), transformers 5.25.0,
safetensors 0.8.0, numpy 2.4.6. The script refuses other transformers major versions.
Weights are redrawn with larger scales than transformers' init, as in golden_models.py.
"""

import json
import os
import shutil

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "models", "tests", "fixtures", "models")

VOCAB = 32
HIDDEN = 16
INTERMEDIATE = 24
LAYERS = 2
MAX_POS = 32
THETA = 50000.0

NEOX = {
    # name: (use_parallel_residual, partial_rotary_factor, hidden_act)
    "neox_parallel_half_v5": (True, 0.5, "gelu"),
    "neox_sequential_half_v5": (False, 0.5, "gelu_new"),
}


def randomize(model, seed):
    """Redraws every parameter: matrices N(0, 0.25^2), norm weights 1 + N(0, 0.1^2), biases
    N(0, 0.1^2)."""
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


def save(model, name, seed):
    directory = os.path.join(OUT, name)
    shutil.rmtree(directory, ignore_errors=True)
    model.save_pretrained(directory, safe_serialization=True)
    # The point of these fixtures: 5.x's layout, rotary settings only in rope_parameters.
    with open(os.path.join(directory, "config.json")) as f:
        saved = json.load(f)
    rope = saved["rope_parameters"]
    assert rope["rope_type"] == "default" and rope["rope_theta"] == THETA, saved
    for legacy in ["rotary_pct", "rotary_emb_base", "rope_theta", "rope_scaling", "torch_dtype"]:
        assert legacy not in saved, f"{name}: 5.x wrote {legacy}"
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, 7), generator=gen)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    tensors = {
        "input_ids": ids.numpy().astype(np.uint32),
        "logits": out.logits.float().numpy(),
        "hidden": out.hidden_states[-1].float().numpy(),
    }
    metadata = {
        "generator": "scripts/golden_config_v5.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "seed": str(seed),
    }
    save_file(tensors, os.path.join(directory, "golden.safetensors"), metadata=metadata)
    sizes = {f: os.path.getsize(os.path.join(directory, f)) for f in sorted(os.listdir(directory))}
    print(f"{name}: {sizes}")


def main():
    assert transformers.__version__.startswith("5."), transformers.__version__
    torch.manual_seed(0)
    for seed, (name, (parallel, factor, act)) in enumerate(NEOX.items(), start=21):
        config = GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            intermediate_size=INTERMEDIATE,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": THETA,
                "partial_rotary_factor": factor,
            },
            hidden_act=act,
            use_parallel_residual=parallel,
            max_position_embeddings=MAX_POS,
            layer_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
        model = GPTNeoXForCausalLM(config).eval()
        randomize(model, seed)
        save(model, name, seed)

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=INTERMEDIATE,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
        rms_norm_eps=1e-5,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    randomize(model, 30)
    save(model, "llama_gqa_v5", 30)
    print(json.dumps({"out": OUT}))


if __name__ == "__main__":
    main()
