#!/usr/bin/env python3
"""Golden fixtures for Qwen2 (`Qwen2ForCausalLM`) in lathe-models, from transformers 5.x.

Qwen2 is Llama (RMSNorm, SwiGLU MLP, RoPE over the whole head, grouped-query attention) with
a bias on q_proj, k_proj and v_proj (o_proj and the MLP have none). The biases here are drawn
N(0, 0.5^2), far from zero, so a reader that drops them gets other logits (the script checks).

What (all under models/tests/fixtures/, from the repository root):

  models/qwen2_tiny/      Qwen2Config: vocab 40, hidden 32, 4 heads, 2 kv heads (head_dim 8),
                          intermediate 40, 2 layers, max_position_embeddings 64,
                          rope_parameters {rope_type "default", rope_theta 50000} (not the
                          default 10000), rms_norm_eps 1e-6, tie_word_embeddings True (as
                          Qwen2.5-0.5B: no lm_head.weight in model.safetensors),
                          use_sliding_window False, bos 1, eos 2. `save_pretrained`
                          (safetensors) by transformers 5.x, so config.json has 5.x's
                          `rope_parameters`, `layer_types`, `dtype` (kept as written), plus
                          golden.safetensors in scripts/golden_models.py's layout:
                            input_ids (B, T) u32, logits (B, T, V) f32, hidden (B, T, H) f32
                            (the last hidden state, after the final norm), and the left-padded
                            batch padded_input_ids, padded_attention_mask (B, T) u32,
                            padded_lengths (B,) u32, padded_logits, padded_hidden, run with HF
                            generation's positions cumsum(mask) - 1 (padding at position 1);
                            row b holds the first padded_lengths[b] tokens of input_ids row b,
                            only positions where the mask is 1 are meaningful. B = 3, T = 9,
                            lengths 9, 5, 2, pad id 0.
  models/qwen2_untied/    The same with tie_word_embeddings False (lm_head.weight saved) and
                          3 layers, plus config_v4.json: this model's config.json rewritten BY
                          HAND into transformers 4.46's layout (no 4.x venv here), for a
                          reader of older checkpoints: top-level `rope_theta` and
                          `rope_scaling: null` instead of `rope_parameters`, `torch_dtype`
                          instead of `dtype`, no `layer_types`, `sliding_window` 4096 (what
                          4.46 wrote by default even with use_sliding_window False, as real
                          Qwen2/2.5 checkpoints do; it must be ignored: 4096 > every length
                          here anyway) and transformers_version "4.46.3". Everything else is
                          config.json's. The script checks that transformers 5.x reads
                          config_v4.json to the same config and the same logits.
  generate_greedy_qwen2.json
                          Greedy generation of qwen2_tiny, in the format of
                          generate_greedy.json (scripts/golden_generate.py, whose run() and
                          settings this mirrors): {"generator", "torch", "transformers",
                          "models": {"qwen2_tiny": [case, ...]}}, each case {label, prompts,
                          max_new_tokens, min_new_tokens, eos_token_id, pad_token_id,
                          expected, min_margin}; 2 prompts, each alone ("*_single") and as
                          one left-padded batch ("*_batched", written only where it agrees
                          with the single runs), 8 new tokens, settings no_eos / eos /
                          eos_min_new (EOS = the third token the first prompt emits without
                          one, min_new_tokens 0 or 5). The model's own generation_config
                          bos/eos are cleared first, as golden_generate.py does, so only the
                          case's eos_token_id can stop a row.
  ../../../lora/tests/fixtures/qwen2/
                          LoRA golden in scripts/golden_lora.py's layout (base/, adapter/,
                          golden.safetensors, meta.json; see that script's docstring for the
                          keys) on the qwen2_tiny model (same weights): peft LoRA r 4,
                          lora_alpha 8, dropout 0, target_modules q_proj and v_proj,
                          bias "none", CAUSAL_LM, every lora_A / lora_B redrawn N(0, 0.3^2).

Every golden.safetensors carries one metadata entry, `generator`, naming this script, the seed
and the torch / transformers (/ peft) versions: safetensors writes several entries in a
random order, which would change the bytes on every run.

How to run (from the repository root; the venv lives outside the repository):
    python3 -m venv /tmp/venv-tf5
    /tmp/venv-tf5/bin/pip install torch==2.15.0 transformers==5.25.0 safetensors==0.8.0 numpy==2.4.6 peft==0.21.2
    /tmp/venv-tf5/bin/python scripts/golden_qwen2.py

Pinned versions: torch 2.15.0 (the PyPI build; the CPU is used), transformers 5.25.0,
safetensors 0.8.0, numpy 2.4.6, peft 0.21.2. The script refuses other transformers major
versions. Weights are redrawn with larger scales than transformers' init, as in
golden_models.py (matrices N(0, 0.25^2), norm weights 1 + N(0, 0.1^2)), biases N(0, 0.5^2).
The script re-executes itself with PYTHONHASHSEED=0, as golden_lora.py does (peft writes
target_modules in set order); re-running reproduces the fixtures byte for byte.
"""

import contextlib
import copy
import io
import json
import os
import shutil
import sys
import tempfile

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURES = os.path.join(ROOT, "models", "tests", "fixtures")
MODELS = os.path.join(FIXTURES, "models")
GENERATE_OUT = os.path.join(FIXTURES, "generate_greedy_qwen2.json")
LORA_OUT = os.path.join(ROOT, "lora", "tests", "fixtures")

VOCAB = 40
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 40
MAX_POS = 64
THETA = 50000.0
EPS = 1e-6
BIAS_STD = 0.5

# name: (layers, tie_word_embeddings, seed)
QWEN2 = {
    "qwen2_tiny": (2, True, 41),
    "qwen2_untied": (3, False, 42),
}

# Greedy generation (scripts/golden_generate.py's recipe).
PROMPTS = [[5, 11, 23, 7, 3], [30, 4, 17]]
PAD = 0
MIN_MARGIN = 3e-4
# (label, max_new_tokens, min_new_tokens, eos_token_id)
SETTINGS = [
    ("no_eos", 8, 0, None),
    ("eos", 8, 0, "third"),
    ("eos_min_new", 8, 5, "third"),
]

# LoRA (scripts/golden_lora.py's recipe).
LORA_NAME = "qwen2"
LORA_KWARGS = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
LORA_SEED = 203
LORA_STD = 0.3
LORA_BATCH = 2
LORA_SEQ = 7


def qwen2_config(layers, tied, rope_theta=THETA):
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=INTERMEDIATE,
        hidden_act="silu",
        max_position_embeddings=MAX_POS,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=EPS,
        tie_word_embeddings=tied,
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )


def randomize(model, seed):
    """Redraws every parameter: matrices N(0, 0.25^2), norm weights 1 + N(0, 0.1^2), biases
    N(0, BIAS_STD^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias") or p.dim() == 1:
                p.copy_(BIAS_STD * noise)
            else:
                p.copy_(0.25 * noise)


def build_model(name):
    layers, tied, seed = QWEN2[name]
    model = Qwen2ForCausalLM(qwen2_config(layers, tied)).eval()
    randomize(model, seed)
    if tied:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert sorted({n.split(".")[-2] for n in biases}) == ["k_proj", "q_proj", "v_proj"], biases
    return model


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


def max_diff(a, b):
    return float(np.abs(a - b).max())


def v4_config(saved):
    """config.json (5.x layout) -> what transformers 4.46.3 would have written."""
    v4 = {k: v for k, v in saved.items() if k not in ("rope_parameters", "layer_types", "dtype")}
    rope = saved["rope_parameters"]
    assert rope == {"rope_type": "default", "rope_theta": THETA}, rope
    v4["rope_theta"] = rope["rope_theta"]
    v4["rope_scaling"] = None
    v4["torch_dtype"] = saved["dtype"]
    assert saved["sliding_window"] is None and saved["use_sliding_window"] is False
    v4["sliding_window"] = 4096
    v4["transformers_version"] = "4.46.3"
    return dict(sorted(v4.items()))


def save(model, name):
    layers, tied, seed = QWEN2[name]
    directory = os.path.join(MODELS, name)
    shutil.rmtree(directory, ignore_errors=True)
    model.save_pretrained(directory, safe_serialization=True)
    with open(os.path.join(directory, "config.json")) as f:
        saved = json.load(f)
    # 5.x's layout: rotary settings only in rope_parameters, dtype not torch_dtype.
    assert saved["rope_parameters"] == {"rope_type": "default", "rope_theta": THETA}, saved
    assert saved["layer_types"] == ["full_attention"] * layers, saved
    assert saved["architectures"] == ["Qwen2ForCausalLM"] and saved["dtype"] == "float32"
    assert saved["tie_word_embeddings"] is tied
    for legacy in ["rope_theta", "rope_scaling", "torch_dtype"]:
        assert legacy not in saved, f"{name}: 5.x wrote {legacy}"
    weights = load_file(os.path.join(directory, "model.safetensors"))
    assert ("lm_head.weight" in weights) is (not tied), sorted(weights)

    ids, padded, mask, lengths = inputs(seed)
    logits, hidden = run(model, ids)
    padded_logits, padded_hidden = run(model, padded, mask)
    # Same tokens, same logits, padded or not.
    for b, n in enumerate(lengths):
        err = max_diff(padded_logits[b, 9 - n :], logits[b, :n])
        assert err < 1e-4, (name, b, err)

    # The goldens must be able to fail: other logits without the q/k/v biases, or with
    # the default rope_theta.
    no_bias = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in no_bias.named_parameters():
            if n.endswith("bias"):
                p.zero_()
    no_bias_diff = max_diff(run(no_bias, ids)[0], logits)
    default_theta = Qwen2ForCausalLM(qwen2_config(layers, tied, rope_theta=10000.0)).eval()
    default_theta.load_state_dict(model.state_dict())
    theta_diff = max_diff(run(default_theta, ids)[0], logits)
    assert no_bias_diff > 0.1 and theta_diff > 1e-2, (no_bias_diff, theta_diff)
    print(f"{name}: logits without biases differ by {no_bias_diff:.3g}, "
          f"with rope_theta 10000 by {theta_diff:.3g}")

    # Reloaded from disk by transformers: the same logits.
    reloaded = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    assert max_diff(run(reloaded, ids)[0], logits) < 1e-6

    if not tied:
        v4 = v4_config(saved)
        with open(os.path.join(directory, "config_v4.json"), "w") as f:
            json.dump(v4, f, indent=2, sort_keys=True)
            f.write("\n")
        # transformers 5.x reads the 4.x layout to the same rotary settings and logits.
        old = Qwen2Config.from_dict(v4)
        assert old.rope_parameters == saved["rope_parameters"], old.rope_parameters
        assert old.sliding_window is None and old.layer_types == saved["layer_types"]
        old._attn_implementation = "eager"
        from_v4 = Qwen2ForCausalLM(old).eval()
        from_v4.load_state_dict(model.state_dict())
        assert max_diff(run(from_v4, ids)[0], logits) < 1e-6

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
        "generator": f"scripts/golden_qwen2.py seed={seed} torch={torch.__version__} "
        f"transformers={transformers.__version__} numpy={np.__version__}"
    }
    save_file(tensors, os.path.join(directory, "golden.safetensors"), metadata=metadata)
    sizes = {f: os.path.getsize(os.path.join(directory, f)) for f in sorted(os.listdir(directory))}
    print(f"{name}: {sizes}")


# ---- greedy generation (scripts/golden_generate.py) ----


def generate(model, prompts, max_new, min_new, eos):
    seq = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (seq - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (seq - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        eos_token_id=eos,
        pad_token_id=PAD,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[:, seq:].tolist()
    margin = float("inf")
    for step, scores in enumerate(out.scores):
        for b in range(len(prompts)):
            if step > 0 and eos is not None and eos in new[b][:step]:
                continue  # finished: the token is padding whatever the scores
            top = torch.topk(scores[b], 2).values
            margin = min(margin, float(top[0] - top[1]))
    return new, margin


def greedy_golden(name):
    model = AutoModelForCausalLM.from_pretrained(
        os.path.join(MODELS, name), attn_implementation="eager"
    ).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    first, _ = generate(model, PROMPTS[:1], 8, 0, None)
    third = first[0][2]
    cases = []
    for label, max_new, min_new, eos in SETTINGS:
        eos_id = third if eos == "third" else eos
        singles = []
        for p in PROMPTS:
            new, margin = generate(model, [p], max_new, min_new, eos_id)
            assert margin > MIN_MARGIN, (name, label, p, margin)
            singles.append(new[0])
            cases.append(
                dict(label=f"{label}_single", prompts=[p], max_new_tokens=max_new,
                     min_new_tokens=min_new, eos_token_id=eos_id, pad_token_id=PAD,
                     expected=new, min_margin=margin)
            )
        batched, margin = generate(model, PROMPTS, max_new, min_new, eos_id)
        width = len(batched[0])
        padded = [s + [PAD] * (width - len(s)) for s in singles]
        agrees = padded == batched
        print(f"{name} {label}: {batched}; batched agrees with singles: {agrees}, "
              f"margin {margin:.3g}")
        if agrees:
            assert margin > MIN_MARGIN, (name, label, margin)
            cases.append(
                dict(label=f"{label}_batched", prompts=PROMPTS, max_new_tokens=max_new,
                     min_new_tokens=min_new, eos_token_id=eos_id, pad_token_id=PAD,
                     expected=batched, min_margin=margin)
            )
    assert any(c["label"].endswith("_batched") for c in cases), "no batched case"
    doc = dict(
        generator="scripts/golden_qwen2.py",
        torch=torch.__version__,
        transformers=transformers.__version__,
        models={name: cases},
    )
    with open(GENERATE_OUT, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {GENERATE_OUT}")


# ---- LoRA (scripts/golden_lora.py) ----


def redraw_lora(peft_model, seed):
    """Every lora_A / lora_B weight <- N(0, LORA_STD^2), in sorted name order."""
    gen = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(LORA_STD * torch.randn(p.shape, generator=gen))
                names.append(name)
    assert names, "no LoRA parameters found"
    return names


def saved_key(param_name):
    """peft's in-memory parameter name -> its key in adapter_model.safetensors."""
    return param_name.replace(".default.", ".")


def to_np(t):
    return t.detach().float().cpu().numpy().copy()


def lora_golden(name, base_model_name):
    import peft
    from peft import LoraConfig, TaskType, get_peft_model, get_peft_model_state_dict

    seed = LORA_SEED
    layers = QWEN2[base_model_name][0]
    final = os.path.join(LORA_OUT, name)
    directory = os.path.join(tempfile.mkdtemp(prefix=f"golden_qwen2_lora_{name}_"), name)
    os.makedirs(directory)

    base = build_model(base_model_name)
    base.save_pretrained(os.path.join(directory, "base"), safe_serialization=True)
    base_config = base.config.to_dict()

    lora_config = LoraConfig(
        lora_dropout=0.0, bias="none", task_type=TaskType.CAUSAL_LM, **LORA_KWARGS
    )
    peft_model = get_peft_model(base, lora_config)  # wraps `base` in place
    lora_names = redraw_lora(peft_model, seed)
    peft_model.eval()

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        peft_model.print_trainable_parameters()
    trainable_line = printed.getvalue().strip()

    adapter_dir = os.path.join(directory, "adapter")
    peft_model.save_pretrained(adapter_dir, save_embedding_layers=False)
    readme = os.path.join(adapter_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)  # peft's empty model-card template
    adapter = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    assert sorted(adapter) == sorted(state)
    assert sorted(adapter) == sorted(saved_key(n) for n in lora_names), (sorted(adapter), lora_names)

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (LORA_BATCH, LORA_SEQ), generator=gen)

    peft_model.zero_grad(set_to_none=True)
    out = peft_model(input_ids=ids, labels=ids)
    logits = out.logits
    loss = out.loss
    manual = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1)
    )
    assert torch.allclose(loss, manual, atol=1e-6), (loss.item(), manual.item())
    loss.backward()
    params = dict(peft_model.named_parameters())
    trainable = sorted(n for n, p in params.items() if p.requires_grad)
    assert trainable == sorted(lora_names), (trainable, lora_names)

    tensors = {
        "input_ids": ids.numpy().astype(np.uint32),
        "labels": ids.numpy().astype(np.uint32),
        "logits_lora": to_np(logits),
        "loss": to_np(loss),
    }
    for n in lora_names:
        tensors[saved_key(n) + ".grad"] = to_np(params[n].grad)

    with torch.no_grad():
        with peft_model.disable_adapter():
            tensors["logits_disabled"] = to_np(peft_model(input_ids=ids).logits)
        again = to_np(peft_model(input_ids=ids).logits)
    assert np.array_equal(again, tensors["logits_lora"]), "adapter not re-enabled"
    assert np.abs(tensors["logits_lora"] - tensors["logits_disabled"]).max() > 1e-2

    # The disabled adapter is the base model: the same logits as a fresh qwen2_tiny.
    fresh = build_model(base_model_name)
    with torch.no_grad():
        fresh_logits = to_np(fresh(input_ids=ids).logits)
    assert max_diff(fresh_logits, tensors["logits_disabled"]) < 1e-6

    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    targets = sorted(
        n
        for n, _ in merged.named_modules()
        if n.split(".")[-1] in LORA_KWARGS["target_modules"]
    )
    assert len(targets) == layers * len(LORA_KWARGS["target_modules"]), targets
    for module in targets:
        tensors[f"merged.{module}.weight"] = to_np(merged.get_submodule(module).weight)
    with torch.no_grad():
        tensors["logits_merged"] = to_np(merged(input_ids=ids).logits)
    merge_err = max_diff(tensors["logits_merged"], tensors["logits_lora"])
    assert merge_err < 1e-5, merge_err

    metadata = {
        "generator": f"scripts/golden_qwen2.py seed={seed} torch={torch.__version__} "
        f"transformers={transformers.__version__} peft={peft.__version__}"
    }
    save_file(tensors, os.path.join(directory, "golden.safetensors"), metadata=metadata)

    lora_dict = lora_config.to_dict()
    lora_dict = {
        k: (sorted(v) if isinstance(v, (set, list, tuple)) else v)
        for k, v in lora_dict.items()
    }
    meta = {
        "generator": "scripts/golden_qwen2.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "numpy": np.__version__,
        },
        "seed": seed,
        "base_model": f"models/tests/fixtures/models/{base_model_name} (the same weights)",
        "lora_init": f"every lora_A/lora_B weight redrawn N(0, {LORA_STD}^2)",
        "base_config": base_config,
        "lora_config": lora_dict,
        "scaling": lora_config.lora_alpha / lora_config.r,
        "print_trainable_parameters": trainable_line,
        "loss": float(loss.item()),
        "max_abs_logits_merged_minus_lora": merge_err,
        "golden_keys": {k: [str(v.dtype), list(v.shape)] for k, v in sorted(tensors.items())},
    }
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=str)
        f.write("\n")

    shutil.rmtree(final, ignore_errors=True)
    os.makedirs(LORA_OUT, exist_ok=True)
    shutil.move(directory, final)
    shutil.rmtree(os.path.dirname(directory), ignore_errors=True)
    print(f"lora {name}: {trainable_line}; loss {loss.item():.6f}; merge err {merge_err:.2e}")


def main():
    assert transformers.__version__.startswith("5."), transformers.__version__
    torch.manual_seed(0)
    for name in QWEN2:
        save(build_model(name), name)
    greedy_golden("qwen2_tiny")
    lora_golden(LORA_NAME, "qwen2_tiny")
    print(json.dumps({"out": [MODELS, GENERATE_OUT, os.path.join(LORA_OUT, LORA_NAME)]}))


if __name__ == "__main__":
    main()
