#!/usr/bin/env python3
"""Golden fixtures for Qwen2 loading from GGUF (models/src/gguf_model.rs).

Modelled on scripts/golden_gguf_model.py (the Llama GGUF fixtures) and scripts/golden_qwen2.py
(the Qwen2 safetensors fixtures).

What it makes (models/tests/fixtures/):
  gguf_qwen2_tied.gguf, gguf_qwen2_untied.gguf
      Tiny random transformers Qwen2s (vocab 266, hidden 32, 4 heads, 2 kv heads (head_dim 8),
      intermediate 40, 2 layers, max_position_embeddings 64, rope_theta 50000, rms eps 1e-6;
      q/k/v biases N(0, 0.5^2), matrices N(0, 0.25^2), norm weights 1 + N(0, 0.1^2)), written
      as llama.cpp's convert_hf_to_gguf.py writes `Qwen2ForCausalLM` (its `Qwen2Model`):
      general.architecture "qwen2", the `TextModel.set_gguf_parameters` keys a Qwen2 config
      gives (block_count, context_length, embedding_length, feed_forward_length, head_count,
      head_count_kv, rope.freq_base, attention.layer_norm_rms_epsilon, file_type; no
      rope.dimension_count, no vocab_size), F32 tensors renamed by gguf-py's own tensor map
      for MODEL_ARCH.QWEN2 (as the converter's `map_tensor_name`), q/k rows NOT permuted
      (`Qwen2Model.modify_tensors` only renames; only `LlamaModel` permutes), `output` absent
      when tied. The tokenizer metadata is golden_gguf_model.py's tiny byte-level BPE with
      `tokenizer.ggml.pre` "qwen2" (what the converter writes for Qwen2 vocabularies) and three
      more merges that tell Qwen2's pre-tokenizer regex from GPT-2's: "1 2" (Qwen2 splits
      digits one by one, so it never applies), ". t" (Qwen2 keeps one punctuation character
      before letters) and "Ċ Ċ" (newline runs).
  gguf_qwen2_golden.json
      Per model: input ids (B, T) and transformers' logits (B, T, V) of the HF model the GGUF
      was written from. The script checks that transformers' own GGUF loader reads each file
      back to the same logits (it has no q/k processor for qwen2, so a permuted file would
      fail), and that permuting q/k as Llama's converter does changes the logits (so the
      fixture tells the two layouts apart). Plus "tokenizer": texts and the ids transformers'
      GGUF tokenizer gives them (without special tokens), checked to differ from what the
      GPT-2 regex gives for at least one text.

How to run (the venv lives outside the repository):
    python3 -m venv /tmp/venv-gguf
    /tmp/venv-gguf/bin/pip install torch==2.15.0 transformers==5.25.0 numpy==2.4.6 gguf==0.19.0 accelerate==1.16.0
    /tmp/venv-gguf/bin/python scripts/golden_gguf_qwen2.py

Pinned versions: torch 2.15.0 (the PyPI build; the CPU is used), transformers 5.25.0,
numpy 2.4.6, gguf 0.19.0, accelerate 1.16.0 (transformers' GGUF loading requires it),
tokenizers 0.23.3 (transformers' dependency). The script refuses other transformers major
versions. Re-running reproduces the fixtures byte for byte.
"""

import json
from importlib.metadata import version
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

SEED = 20251207
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "models/tests/fixtures"

HIDDEN = 32
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 40
LAYERS = 2
MAX_POS = 64
THETA = 50000.0
EPS = 1e-6
BIAS_STD = 0.5

TEXTS = [" the 12 in", "x.the\n\n12 3", "Hello, world! 2012.\n"]


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
    """256 byte tokens, golden_gguf_model.py's merges and three more, then <|endoftext|>."""
    tokens = [bytes_to_unicode()[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "1 2", ". t", "Ċ Ċ"]
    tokens += ["".join(m.split(" ")) for m in merges]
    tokens.append("<|endoftext|>")
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL]
    return tokens, merges, types


def permute(weights, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py, LlamaModel.permute: what Qwen2Model does NOT do."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_tensors(model, config):
    """HF state dict -> (GGUF name, numpy f32), names from gguf-py's MODEL_ARCH.QWEN2 map."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    out = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # not in a tied checkpoint's safetensors, so not in the GGUF
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        out.append((new, t.detach().float().numpy().copy()))
    return out


def write_gguf(path, model, config):
    tokens, merges, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("lathe tiny qwen2")
    # TextModel.set_gguf_parameters, in its order, for the keys a Qwen2 config has.
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_pad_token_id(len(tokens) - 1)
    w.add_add_bos_token(False)
    for name, data in gguf_tensors(model, config):
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def randomize(model, seed):
    """Matrices N(0, 0.25^2), norm weights 1 + N(0, 0.1^2), biases N(0, BIAS_STD^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(BIAS_STD * noise)
            else:
                p.copy_(0.25 * noise)


def case(name, tied, seed, gen):
    tokens, _, _ = tiny_vocab()
    config = Qwen2Config(
        vocab_size=len(tokens),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=INTERMEDIATE,
        hidden_act="silu",
        max_position_embeddings=MAX_POS,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
        rms_norm_eps=EPS,
        tie_word_embeddings=tied,
        use_sliding_window=False,
        attn_implementation="eager",
    )
    model = Qwen2ForCausalLM(config).eval()
    randomize(model, seed)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    path = FIXTURES / f"gguf_qwen2_{name}.gguf"
    write_gguf(path, model, config)
    ids = torch.tensor(gen.integers(0, len(tokens), size=(2, 7)), dtype=torch.long)
    with torch.no_grad():
        logits = model(ids).logits.float()
        # transformers' own GGUF loader must read the file back to the same model.
        back = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
        assert back.config.tie_word_embeddings == tied, name
        diff = (back(ids).logits.float() - logits).abs().max().item()
        # Llama's q/k permutation applied to this model gives other logits.
        permuted = Qwen2ForCausalLM(config).eval()
        permuted.load_state_dict(model.state_dict())
        for layer in permuted.model.layers:
            attn = layer.self_attn
            for proj, kv in ((attn.q_proj, HEADS), (attn.k_proj, KV_HEADS)):
                proj.weight.copy_(permute(proj.weight, kv, kv))
                proj.bias.copy_(permute(proj.bias, kv, kv))
        permuted_diff = (permuted(ids).logits.float() - logits).abs().max().item()
    assert diff < 1e-5, f"{name}: transformers' GGUF loader differs by {diff}"
    assert permuted_diff > 0.1, f"{name}: permuting q/k changes the logits by {permuted_diff}"
    size = path.stat().st_size
    assert size < 200_000, f"{path}: {size} bytes"
    print(
        f"{name}: {size} bytes, GGUF round trip max |diff| {diff:.2e}, "
        f"q/k permuted max |diff| {permuted_diff:.2f}"
    )
    return {
        "file": path.name,
        "tied": tied,
        "input_ids": ids.tolist(),
        "logits_shape": list(logits.shape),
        "logits": [float(f"{x:.9g}") for x in logits.flatten().tolist()],
    }


def gpt2_regex_ids(texts):
    """The ids the GPT-2 regex (ByteLevel's own) would give, to show the cases discriminate."""
    tokens, merges, _ = tiny_vocab()
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return [tok.encode(t).ids for t in texts]


def tokenizer_golden():
    path = FIXTURES / "gguf_qwen2_tied.gguf"
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # The Qwen2 split regex, as transformers sets it for tokenizer.ggml.pre "qwen2".
    split = tok.backend_tokenizer.pre_tokenizer.__getstate__()
    assert b"Split" in split and b"\\\\p{N}|" in split, split
    ids = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    gpt2 = gpt2_regex_ids(TEXTS)
    assert any(a != b for a, b in zip(ids, gpt2)), "the texts do not tell the regexes apart"
    for text, a, b in zip(TEXTS, ids, gpt2):
        print(f"{text!r}: qwen2 {a}, gpt-2 regex {b}")
    return {"texts": TEXTS, "ids": ids}


def main():
    assert transformers.__version__.startswith("5."), transformers.__version__
    versions = {
        p: version(p) for p in ["torch", "transformers", "gguf", "numpy", "tokenizers"]
    }
    gen = np.random.default_rng(SEED)
    golden = {
        "generator": "scripts/golden_gguf_qwen2.py",
        "seed": SEED,
        "versions": versions,
        "models": [case("tied", True, SEED + 1, gen), case("untied", False, SEED + 2, gen)],
        "tokenizer": tokenizer_golden(),
    }
    (FIXTURES / "gguf_qwen2_golden.json").write_text(json.dumps(golden) + "\n")


if __name__ == "__main__":
    main()
