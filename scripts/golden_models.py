#!/usr/bin/env python3
"""Golden fixtures for lathe-models' conformance tests (models/tests/conformance_*.rs).

What: tiny random GPT-NeoX and Llama models built with transformers (seeded), saved with
`save_pretrained(safe_serialization=True)` into models/tests/fixtures/models/NAME/, plus
NAME/golden.safetensors holding input ids and transformers' f32 logits and last hidden
states (after the final norm), for
  - a full batch `input_ids` (B, T) -> `logits` (B, T, V), `hidden` (B, T, H);
  - a left-padded batch `padded_input_ids` + `padded_attention_mask` (B, T) with HF
    generation's positions (cumsum(mask) - 1) -> `padded_logits`, `padded_hidden`; row b
    holds the first `padded_lengths[b]` tokens of `input_ids` row b. Only positions where the
    mask is 1 are meaningful.
The models cover: GPT-NeoX parallel and sequential residuals, rotary_pct 0.25 and 1.0,
hidden_act "gelu" and "gelu_fast" (one of them saved as a sharded checkpoint), and Llama with
grouped-query attention (4 heads, 2 kv heads) and tied embeddings.

How to run (from the repository root):
    python3 -m venv /tmp/venv-models
    /tmp/venv-models/bin/pip install torch==2.5.1 transformers==4.46.3 safetensors numpy==2.1.3
    /tmp/venv-models/bin/python scripts/golden_models.py

Pinned versions: torch 2.5.1, transformers 4.46.3, safetensors (any 0.4+), numpy 2.1.3.
Weights are redrawn with larger scales than transformers' init (std 0.02 would make every
logit nearly equal and hide mistakes).
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

VOCAB = 40
HIDDEN = 32
HEADS = 4
INTERMEDIATE = 40
LAYERS = 2
MAX_POS = 64

NEOX = {
    # name: (use_parallel_residual, rotary_pct, hidden_act, rotary_emb_base, sharded)
    "neox_parallel_quarter_gelu": (True, 0.25, "gelu", 10000, True),
    "neox_sequential_full_gelu_fast": (False, 1.0, "gelu_fast", 10000, False),
    "neox_parallel_full_gelu_new": (True, 1.0, "gelu_new", 20000, False),
    "neox_sequential_quarter_gelu": (False, 0.25, "gelu", 10000, False),
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


def inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (3, 9), generator=gen)
    lengths = [9, 5, 2]
    padded = torch.zeros_like(ids)  # pad id 0
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        padded[b, 9 - n :] = ids[b, :n]
        mask[b, 9 - n :] = 1
    return ids, padded, mask, lengths


def run(model, ids, mask=None):
    with torch.no_grad():
        if mask is None:
            out = model(input_ids=ids, output_hidden_states=True)
        else:
            # What generation passes: positions count real tokens; padding gets position 1.
            positions = mask.long().cumsum(-1) - 1
            positions.masked_fill_(mask == 0, 1)
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                output_hidden_states=True,
            )
    return out.logits.float().numpy(), out.hidden_states[-1].float().numpy()


def save(model, name, seed, shard):
    directory = os.path.join(OUT, name)
    shutil.rmtree(directory, ignore_errors=True)
    kwargs = {"max_shard_size": "60KB"} if shard else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    ids, padded, mask, lengths = inputs(seed)
    logits, hidden = run(model, ids)
    padded_logits, padded_hidden = run(model, padded, mask)
    tensors = {
        "input_ids": ids.numpy().astype(np.uint32),
        "logits": logits,
        "hidden": hidden,
        "padded_input_ids": padded.numpy().astype(np.uint32),
        "padded_attention_mask": mask.numpy().astype(np.uint32),
        "padded_lengths": np.array(lengths, dtype=np.uint32),
        "padded_logits": padded_logits,
        "padded_hidden": padded_hidden,
    }
    metadata = {
        "generator": "scripts/golden_models.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "seed": str(seed),
    }
    save_file(tensors, os.path.join(directory, "golden.safetensors"), metadata=metadata)
    files = sorted(os.listdir(directory))
    print(f"{name}: {files}")


def main():
    torch.manual_seed(0)
    for seed, (name, (parallel, pct, act, base, shard)) in enumerate(NEOX.items(), start=1):
        config = GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            rotary_pct=pct,
            rotary_emb_base=base,
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
        save(model, name, seed, shard)

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
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    randomize(model, 10)
    model.tie_weights()
    save(model, "llama_gqa_tied", 10, False)
    print(json.dumps({"out": OUT}))


if __name__ == "__main__":
    main()
