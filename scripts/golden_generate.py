#!/usr/bin/env python3
"""Golden greedy generations for lathe-models' generation tests (models/tests/generate.rs).

What: for each tiny fixture model of scripts/golden_models.py
(models/tests/fixtures/models/NAME/), transformers' `generate(do_sample=False)` of
  - each prompt alone, and
  - all prompts as one left-padded batch (attention_mask 0 on the padding),
with max_new_tokens, min_new_tokens, eos_token_id and pad_token_id as recorded per case.
Written to models/tests/fixtures/generate_greedy.json: per model, per case the prompts, the
settings and `expected`, transformers' `sequences[:, prompt_len:]` (rows that finished early
padded with pad_token_id), plus `min_margin`, the smallest gap between the chosen token's
logit and the runner-up over all steps (a near tie would make the golden fragile: the script
fails below MIN_MARGIN). The batched case is written only where transformers' batched run
agrees with its own single-prompt runs (it does on these models; the script checks).

How to run (from the repository root, after scripts/golden_models.py):
    /tmp/venv-models/bin/python scripts/golden_generate.py

Pinned versions: torch 2.5.1, transformers 4.46.3 (the venv of scripts/golden_models.py).
"""

import json
import os

import torch
import transformers
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = os.path.join(ROOT, "models", "tests", "fixtures", "models")
OUT = os.path.join(ROOT, "models", "tests", "fixtures", "generate_greedy.json")

NAMES = [
    "neox_parallel_quarter_gelu",
    "neox_sequential_full_gelu_fast",
    "neox_parallel_full_gelu_new",
    "neox_sequential_quarter_gelu",
    "llama_gqa_tied",
]
PROMPTS = [[5, 11, 23, 7, 3], [9, 1], [30, 4, 17], [12]]
PAD = 0
# Our logits match transformers to 1e-4 (conformance_models.rs), a pair of them to 2e-4.
MIN_MARGIN = 3e-4
# (label, max_new_tokens, min_new_tokens, eos_token_id)
SETTINGS = [
    ("no_eos", 12, 0, None),
    # EOS = the token the first prompt emits third without it, so rows stop early.
    ("eos", 12, 0, "third"),
    ("eos_min_new", 12, 6, "third"),
]


def run(model, prompts, max_new, min_new, eos):
    seq = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (seq - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (seq - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        eos_token_id=eos if eos is not None else None,
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


def main():
    torch.manual_seed(0)
    cases = {}
    for name in NAMES:
        model = AutoModelForCausalLM.from_pretrained(os.path.join(MODELS, name))
        model.eval()
        model.generation_config.eos_token_id = None
        model.generation_config.bos_token_id = None
        first, _ = run(model, PROMPTS[:1], 12, 0, None)
        third = first[0][2]
        model_cases = []
        for label, max_new, min_new, eos in SETTINGS:
            eos_id = third if eos == "third" else eos
            singles = []
            for p in PROMPTS:
                new, margin = run(model, [p], max_new, min_new, eos_id)
                assert margin > MIN_MARGIN, (name, label, p, margin)
                singles.append(new[0])
                model_cases.append(
                    dict(label=f"{label}_single", prompts=[p], max_new_tokens=max_new,
                         min_new_tokens=min_new, eos_token_id=eos_id, pad_token_id=PAD,
                         expected=new, min_margin=margin)
                )
            batched, margin = run(model, PROMPTS, max_new, min_new, eos_id)
            # Singles stop at their own EOS; the batch pads them to the longest row.
            width = len(batched[0])
            padded = [s + [PAD] * (width - len(s)) for s in singles]
            agrees = padded == batched
            print(f"{name} {label}: batched agrees with singles: {agrees}, margin {margin:.3g}")
            if agrees:
                assert margin > MIN_MARGIN, (name, label, margin)
                model_cases.append(
                    dict(label=f"{label}_batched", prompts=PROMPTS, max_new_tokens=max_new,
                         min_new_tokens=min_new, eos_token_id=eos_id, pad_token_id=PAD,
                         expected=batched, min_margin=margin)
                )
        cases[name] = model_cases
    doc = dict(
        generator="scripts/golden_generate.py",
        torch=torch.__version__,
        transformers=transformers.__version__,
        models=cases,
    )
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
