#!/usr/bin/env python3
"""Golden fixtures for lathe-lora's peft conformance tests (lora/tests/).

What: two tiny random base models (the same recipe as scripts/golden_models.py) with a LoRA
adapter added by peft, written to lora/tests/fixtures/NAME/:
  - base/                 the base model BEFORE LoRA is added, as a HF directory
                          (config.json, model.safetensors, f32);
  - adapter/              `peft_model.save_pretrained` output (adapter_config.json,
                          adapter_model.safetensors, f32). Every lora_A and lora_B weight is
                          redrawn N(0, 0.3^2) first (peft inits B to zero, which would make
                          the adapter a no-op and hide mistakes);
  - golden.safetensors    f32 except `input_ids`/`labels` (uint32, as in golden_models.py):
      input_ids, labels   (2, 7) random ids; labels == input_ids
      logits_lora         (2, 7, V) peft model forward, eval mode
      logits_disabled     (2, 7, V) the same inside `peft_model.disable_adapter()`
      loss                ()  transformers' causal-LM loss with labels=input_ids (shift by
                              one, mean over 2*6 predictions), adapter enabled
      {KEY}.grad          gradient of `loss` for every lora parameter, KEY being its key in
                          adapter_model.safetensors (peft's parameter name without
                          `.default`), e.g.
                          base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_A.weight.grad
      merged.{MODULE}.weight  each targeted Linear's weight after `merge_and_unload()`, MODULE
                          being its name in the base model, e.g.
                          merged.gpt_neox.layers.0.attention.query_key_value.weight
      logits_merged       (2, 7, V) the merged model's logits (== logits_lora to ~1e-6)
  - meta.json             generator, versions, base and LoRA configs, scaling (alpha / r),
                          and peft's `print_trainable_parameters()` line.
Cases:
  - neox:  GPTNeoXForCausalLM (parallel residual, rotary_pct 0.25, gelu), LoRA r=4,
           lora_alpha=8, dropout 0, target_modules=["query_key_value"], bias="none", CAUSAL_LM.
  - llama: LlamaForCausalLM (4 heads, 2 kv heads, tied embeddings), LoRA r=4, lora_alpha=16,
           dropout 0, target_modules=["q_proj", "v_proj"], bias="none", CAUSAL_LM.

How to run (from the repository root):
    python3 -m venv /tmp/venv-models
    /tmp/venv-models/bin/pip install torch==2.5.1 transformers==4.46.3 safetensors numpy==2.1.3 peft==0.13.2
    /tmp/venv-models/bin/python scripts/golden_lora.py

Pinned versions: torch 2.5.1, transformers 4.46.3, peft 0.13.2, safetensors (any 0.4+),
numpy 2.1.3. The script re-executes itself with PYTHONHASHSEED=0: peft keeps target_modules
as a Python set and writes it to adapter_config.json in set order, which otherwise changes
from run to run. With that (and a single safetensors metadata entry), re-running reproduces
the fixtures byte for byte.
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
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model, get_peft_model_state_dict  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

sys.dont_write_bytecode = True  # no scripts/__pycache__ from importing golden_models
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from golden_models import (  # noqa: E402
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    MAX_POS,
    VOCAB,
    randomize,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "lora", "tests", "fixtures")

BATCH = 2
SEQ = 7
LORA_STD = 0.3


def neox_model():
    """The golden_models.py `neox_parallel_quarter_gelu` recipe."""
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        rotary_pct=0.25,
        rotary_emb_base=10000,
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
    randomize(model, 101)
    return model


def llama_model():
    """The golden_models.py `llama_gqa_tied` recipe."""
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
    randomize(model, 102)
    model.tie_weights()
    return model


CASES = {
    # name: (base model builder, LoRA config, seed)
    "neox": (
        neox_model,
        dict(r=4, lora_alpha=8, target_modules=["query_key_value"]),
        201,
    ),
    "llama": (
        llama_model,
        dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        202,
    ),
}


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


def build(name, make_model, lora_kwargs, seed):
    # Written to a scratch folder first and swapped in at the end, so the fixture folder is
    # never seen half-written.
    final = os.path.join(OUT, name)
    directory = os.path.join(tempfile.mkdtemp(prefix=f"golden_lora_{name}_"), name)
    os.makedirs(directory)

    base = make_model()
    base.save_pretrained(os.path.join(directory, "base"), safe_serialization=True)
    base_config = base.config.to_dict()

    lora_config = LoraConfig(
        lora_dropout=0.0, bias="none", task_type=TaskType.CAUSAL_LM, **lora_kwargs
    )
    peft_model = get_peft_model(base, lora_config)  # wraps `base` in place
    lora_names = redraw_lora(peft_model, seed)
    peft_model.eval()

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        peft_model.print_trainable_parameters()
    trainable_line = printed.getvalue().strip()

    adapter_dir = os.path.join(directory, "adapter")
    # save_embedding_layers=False: no embedding is targeted; "auto" would only look for a
    # base config under base_model_name_or_path ("") and warn.
    peft_model.save_pretrained(adapter_dir, save_embedding_layers=False)
    os.remove(os.path.join(adapter_dir, "README.md"))  # peft's empty model-card template
    adapter = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    assert sorted(adapter) == sorted(state)
    assert sorted(adapter) == sorted(saved_key(n) for n in lora_names), (sorted(adapter), lora_names)

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=gen)

    # Forward + loss + gradients with the adapter enabled.
    peft_model.zero_grad(set_to_none=True)
    out = peft_model(input_ids=ids, labels=ids)
    logits = out.logits
    loss = out.loss
    # The loss is the plain shifted mean cross entropy over B*(T-1) predictions.
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

    # Merge a copy so peft_model stays untouched.
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    targets = sorted(
        n
        for n, _ in merged.named_modules()
        if n.split(".")[-1] in lora_kwargs["target_modules"]
    )
    assert len(targets) == LAYERS * len(lora_kwargs["target_modules"]), targets
    for module in targets:
        tensors[f"merged.{module}.weight"] = to_np(merged.get_submodule(module).weight)
    with torch.no_grad():
        tensors["logits_merged"] = to_np(merged(input_ids=ids).logits)
    merge_err = float(np.abs(tensors["logits_merged"] - tensors["logits_lora"]).max())
    assert merge_err < 1e-5, merge_err

    # One metadata entry: safetensors writes several in random (Rust HashMap) order, which
    # would change the file's bytes on every run. The full record is in meta.json.
    metadata = {
        "generator": f"scripts/golden_lora.py seed={seed} torch={torch.__version__} "
        f"transformers={transformers.__version__} peft={peft.__version__}"
    }
    save_file(tensors, os.path.join(directory, "golden.safetensors"), metadata=metadata)

    lora_dict = lora_config.to_dict()
    lora_dict = {
        k: (sorted(v) if isinstance(v, (set, list, tuple)) else v)
        for k, v in lora_dict.items()
    }
    meta = {
        "generator": "scripts/golden_lora.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "numpy": np.__version__,
        },
        "seed": seed,
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
    os.makedirs(OUT, exist_ok=True)
    shutil.move(directory, final)
    shutil.rmtree(os.path.dirname(directory), ignore_errors=True)
    print(f"{name}: {trainable_line}; loss {loss.item():.6f}; merge err {merge_err:.2e}")


def main():
    torch.manual_seed(0)
    for name, (make_model, lora_kwargs, seed) in CASES.items():
        build(name, make_model, lora_kwargs, seed)
    print(json.dumps({"out": os.path.normpath(OUT)}))


if __name__ == "__main__":
    main()
