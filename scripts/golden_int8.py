#!/usr/bin/env python3
"""Golden fixtures for lathe-quant's LLM.int8() (docs/REFERENCE.md §3).

What: LLM.int8() as bitsandbytes' Linear8bitLt computes it (weight row-wise absmax int8,
vector-wise activation quantization, outlier columns >= threshold through a 16-bit path),
implemented in NumPy step by step, written with the fp32 reference X @ W^T + b to
quant/tests/fixtures/int8_golden.safetensors.

bitsandbytes itself was not used: its 0.45.x wheel needs torch (a multi-GB CUDA download
from PyPI) and its int8 matmul has no CPU path in that release. The NumPy code below follows
its definitions: SCB = absmax per row, CB = round(W * 127 / SCB), round half to even
(np.rint, as torch.round), outliers zeroed before the activation absmax, the outlier product
with both operands rounded to float16 and accumulated in float32.

Run (from the repository root):
    python3 -m venv /tmp/venv-int8
    /tmp/venv-int8/bin/pip install numpy==2.1.3 safetensors==0.4.5
    /tmp/venv-int8/bin/python scripts/golden_int8.py

Pinned: Python 3, numpy 2.1.3, safetensors 0.4.5.
"""

import os

import numpy as np
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "quant", "tests", "fixtures", "int8_golden.safetensors")
MIN_SCALE = np.float32(2.0**-100)


def quantize_rows(x, skip=None):
    """Row-wise absmax int8: (q int8, scale f32); skipped columns are 0 and not in the max."""
    x = x.astype(np.float32)
    xm = x if skip is None else np.where(skip[None, :], np.float32(0), x)
    scale = np.abs(xm).max(axis=1).astype(np.float32) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    inv = np.where(scale >= MIN_SCALE, np.float32(127) / np.maximum(scale, MIN_SCALE), np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(xm * inv[:, None]), -127, 127).astype(np.int8)
    return q, scale


def int8_linear(x, w, b, threshold):
    cb, scb = quantize_rows(w)
    if threshold > 0:
        outl = (np.abs(x) >= np.float32(threshold)).any(axis=0)
    else:
        outl = np.zeros(x.shape[1], bool)
    ca, sca = quantize_rows(x, outl)
    acc = ca.astype(np.int32) @ cb.astype(np.int32).T
    scale = (sca[:, None] * scb[None, :] / np.float32(16129)).astype(np.float32)
    y = acc.astype(np.float32) * scale
    idx = np.nonzero(outl)[0]
    if idx.size:
        xo = x[:, idx].astype(np.float16).astype(np.float32)
        wo = ((cb[:, idx].astype(np.float32) * scb[:, None]) / np.float32(127)).astype(np.float16).astype(np.float32)
        f = np.zeros((x.shape[0], w.shape[0]), np.float32)
        for k in range(idx.size):  # ascending columns, f32 accumulation (products are exact)
            f += np.outer(xo[:, k], wo[:, k]).astype(np.float32)
        y = y + f
    return (y + b[None, :]).astype(np.float32), acc, ca, sca


def case(rng, name, rows, inn, out, planted, tensors):
    x = rng.standard_normal((rows, inn)).astype(np.float32)
    for k, j in enumerate(planted):
        x[:, j] *= np.float32(20 + 40 * k / max(1, len(planted) - 1))  # ~20..60, like LLM outlier features
    w = (rng.standard_normal((out, inn)) * 0.05).astype(np.float32)
    b = (rng.standard_normal(out) * 0.1).astype(np.float32)
    y6, acc6, _, _ = int8_linear(x, w, b, 6.0)
    y0, _, _, _ = int8_linear(x, w, b, 0.0)
    ref = (x.astype(np.float64) @ w.astype(np.float64).T + b).astype(np.float32)
    # The exact product with the int8 weight: isolates the activation-side error that the
    # outlier decomposition is about (the weight's own rounding is common to both paths).
    cb, scb = quantize_rows(w)
    dq = (cb.astype(np.float32) * scb[:, None]) / np.float32(127)
    ref_dq = (x.astype(np.float64) @ dq.astype(np.float64).T + b).astype(np.float32)
    tensors.update({
        f"{name}.x": x, f"{name}.w": w, f"{name}.b": b,
        f"{name}.y_t6": y6, f"{name}.y_t0": y0, f"{name}.y_fp32": ref, f"{name}.y_dequant": ref_dq,
        f"{name}.acc_t6": acc6.astype(np.float32),  # exact: |acc| < 2^24 here
    })


def main():
    rng = np.random.default_rng(20240607)
    tensors = {}
    case(rng, "random", 13, 67, 29, [], tensors)
    case(rng, "outliers", 16, 384, 32, [5, 100, 200], tensors)
    case(rng, "gemv", 2, 130, 33, [7, 64], tensors)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    meta = {
        "generator": "scripts/golden_int8.py",
        "numpy": np.__version__,
        "safetensors": "0.4.5",
        "reference": "docs/REFERENCE.md §3 (bitsandbytes Linear8bitLt), NumPy reimplementation",
    }
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, OUT, metadata=meta)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
