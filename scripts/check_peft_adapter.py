#!/usr/bin/env python3
"""Checks that a LoRA adapter (e.g. one lathe saved) loads in peft and gives the expected logits.

Loads the base model (a HF directory) with transformers in f32, the adapter directory
(adapter_config.json + adapter_model.safetensors) with `PeftModel.from_pretrained`, runs one
forward pass in eval mode on the given ids and writes the logits as JSON to stdout:
    {"input_ids": [[...]], "shape": [B, T, V], "logits": [[[...]]], "max_abs_diff": x | null}
With --logits FILE.safetensors, it also prints `max |logits - given|` to stderr (the tensor
named by --key, default "logits"; its shape must equal (B, T, V) or (T, V) when B == 1), and
with --tol it exits with status 1 when that difference is above the tolerance.

How to run (from the repository root):
    /tmp/venv-models/bin/python scripts/check_peft_adapter.py \
        --base lora/tests/fixtures/neox/base --adapter lora/tests/fixtures/neox/adapter \
        --input-ids '1,2,3;4,5,6' \
        [--logits lora/tests/fixtures/neox/golden.safetensors --key logits_lora --tol 1e-5]
--input-ids is one row of comma-separated ids, or several rows of equal length separated by ';'
(a batch; no padding or attention mask).

peft 0.13.2 loads adapter weights with strict=False and says nothing about keys it did not
use, so a misnamed key would silently leave that LoRA weight at its init. This script
therefore also compares every tensor of adapter_model.safetensors with what peft loaded and
exits with status 1 on unused, missing or differing keys.

Pinned versions: torch 2.5.1, transformers 4.46.3, peft 0.13.2 (see scripts/golden_lora.py).
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM


def parse_ids(text):
    rows = [[int(x) for x in row.split(",") if x.strip()] for row in text.split(";") if row.strip()]
    if not rows or any(len(r) != len(rows[0]) for r in rows) or not rows[0]:
        sys.exit(f"--input-ids: need one or more non-empty rows of equal length, got {text!r}")
    return torch.tensor(rows, dtype=torch.long)  # (B, T)


def check_loaded(model, adapter_dir):
    """Every tensor in the adapter file must be what peft loaded, and vice versa."""
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.exists(path):
        print(f"note: {path} not found; key check skipped", file=sys.stderr)
        return True
    saved = load_file(path)
    loaded = {
        k: v.detach().float().numpy()
        for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()
    }
    unused = sorted(set(saved) - set(loaded))
    missing = sorted(set(loaded) - set(saved))
    differ = sorted(
        k
        for k in set(saved) & set(loaded)
        if saved[k].shape != loaded[k].shape
        or not np.array_equal(saved[k].astype(np.float32), loaded[k])
    )
    for label, keys in [("unused by peft", unused), ("missing", missing), ("differ", differ)]:
        if keys:
            print(f"FAIL: adapter keys {label}: {keys}", file=sys.stderr)
    ok = not (unused or missing or differ)
    if ok:
        print(f"adapter: all {len(saved)} tensors loaded by peft", file=sys.stderr)
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="base model HF directory")
    parser.add_argument("--adapter", required=True, help="peft adapter directory")
    parser.add_argument("--input-ids", required=True, help="e.g. 1,2,3 or 1,2,3;4,5,6")
    parser.add_argument("--logits", help="safetensors file holding logits to compare with")
    parser.add_argument("--key", default="logits", help="tensor name in --logits")
    parser.add_argument("--tol", type=float, help="exit 1 when max |diff| exceeds this")
    args = parser.parse_args()

    ids = parse_ids(args.input_ids)
    base = AutoModelForCausalLM.from_pretrained(
        args.base, torch_dtype=torch.float32, attn_implementation="eager"
    )
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    keys_ok = check_loaded(model, args.adapter)
    vocab = base.config.vocab_size
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        sys.exit(f"--input-ids: ids must be in [0, {vocab})")
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().numpy()  # (B, T, V)

    diff = None
    if args.logits:
        tensors = load_file(args.logits)
        if args.key not in tensors:
            sys.exit(f"{args.logits} has no tensor {args.key!r}; it has {sorted(tensors)}")
        given = tensors[args.key].astype(np.float32)
        if given.ndim == 2 and logits.shape[0] == 1:
            given = given[None]
        if given.shape != logits.shape:
            sys.exit(f"shape mismatch: peft logits {logits.shape}, {args.key} {given.shape}")
        diff = float(np.abs(logits - given).max())
        print(f"max |logits - {args.key}| = {diff:.3e}", file=sys.stderr)

    json.dump(
        {
            "input_ids": ids.tolist(),
            "shape": list(logits.shape),
            "logits": logits.tolist(),
            "max_abs_diff": diff,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")
    if args.tol is not None and diff is not None and diff > args.tol:
        print(f"FAIL: {diff:.3e} > tol {args.tol:.3e}", file=sys.stderr)
        sys.exit(1)
    if not keys_ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
