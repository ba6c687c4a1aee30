#!/usr/bin/env python3
"""Golden fixtures for lathe-quant's GGUF block dequantization (quant/src/gguf.rs).

What it makes: quant/tests/fixtures/gguf_blocks.safetensors, holding for each of Q8_0, Q4_0
and Q4_1 two cases, each a pair of tensors
  "<type>.<case>.raw"      U8  [n_blocks * type_size]   raw GGUF blocks
  "<type>.<case>.expected" F32 [n_blocks * 32]          gguf-py's dequantization of them
with case "random" (random raw blocks: random finite f16 scales/mins including negative,
zero, subnormal and extreme ones; int8 -128/127 and nibbles 0/15 forced in) and case
"quantized" (a random f32 vector quantized by gguf-py's own quantizer: realistic blocks).
Plus "f16.random.raw"/"f16.random.expected" for the f16 pass-through (specials included).
The safetensors __metadata__ names the generator, the seed and the numpy/gguf versions.

The expected values come from gguf-py's own `gguf.quants.dequantize(data, qtype)` (the
numpy reference that llama.cpp's converter and transformers' GGUF loader use), never from a
re-implementation here.

How to run (pinned versions; the safetensors file is written by hand, so nothing else is
needed):
    python3 -m venv /tmp/venv-gguf
    /tmp/venv-gguf/bin/pip install numpy==2.1.3 gguf==0.19.0
    /tmp/venv-gguf/bin/python scripts/golden_gguf.py
"""

import json
import struct
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from importlib.metadata import version

SEED = 20240611
OUT = Path(__file__).resolve().parent.parent / "quant/tests/fixtures/gguf_blocks.safetensors"
N_RANDOM_BLOCKS = 64
N_QUANTIZED = 1024  # elements (32 blocks) of the realistic case


def random_f16_scales(rng, n):
    """n finite f16 values as uint16 bits: mostly ordinary magnitudes, plus edge cases."""
    mags = rng.uniform(-6, 2, size=n)  # log10 magnitudes: 1e-6 .. 1e2
    vals = (10.0 ** mags) * rng.choice([-1.0, 1.0], size=n)
    bits = vals.astype(np.float16).view(np.uint16).copy()
    # Edge cases at the front: +0, -0, smallest subnormal, largest subnormal, smallest normal,
    # max finite (65504), -max finite, 1.0, -1.0, 0.5.
    edge = [0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0xBC00, 0x3800]
    bits[: len(edge)] = edge
    # Any random bit pattern that is inf/NaN (cannot happen from astype of these values, but
    # keep the promise "finite" explicit).
    assert np.all((bits & 0x7C00) != 0x7C00)
    return bits


def random_nibbles(rng, n_blocks):
    """(n_blocks, 16) packed nibble bytes; block 0 all 0x00, block 1 all 0xFF, block 2 0xF0/0x0F."""
    qs = rng.integers(0, 256, size=(n_blocks, 16), dtype=np.uint8)
    qs[0, :] = 0x00
    qs[1, :] = 0xFF
    qs[2, :8] = 0xF0
    qs[2, 8:] = 0x0F
    return qs


def raw_q8_0(rng, n_blocks):
    d = random_f16_scales(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    qs = rng.integers(-128, 128, size=(n_blocks, 32), dtype=np.int16).astype(np.int8)
    qs[:, 0] = -128
    qs[:, 31] = 127
    qs[3, :] = -128
    qs[4, :] = 127
    return np.concatenate([d, qs.view(np.uint8)], axis=1).reshape(-1)


def raw_q4_0(rng, n_blocks):
    d = random_f16_scales(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return np.concatenate([d, random_nibbles(rng, n_blocks)], axis=1).reshape(-1)


def raw_q4_1(rng, n_blocks):
    d = random_f16_scales(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    # The min gets its own random scales, rolled so zero/extreme d meet non-trivial m.
    m = np.roll(random_f16_scales(rng, n_blocks), 5).view(np.uint8).reshape(n_blocks, 2)
    return np.concatenate([d, m, random_nibbles(rng, n_blocks)], axis=1).reshape(-1)


def raw_f16(rng):
    vals = rng.standard_normal(256).astype(np.float16).view(np.uint16).copy()
    # +0, -0, subnormals, max, -max, +inf, -inf, quiet NaN
    edge = [0x0000, 0x8000, 0x0001, 0x83FF, 0x0400, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00]
    vals[: len(edge)] = edge
    return vals.view(np.uint8)


def check_bytes(raw, qtype, n_elements):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    assert raw.dtype == np.uint8 and raw.ndim == 1
    assert raw.size == n_elements // block_size * type_size


def main():
    rng = np.random.default_rng(SEED)
    tensors = {}

    raw_makers = {T.Q8_0: raw_q8_0, T.Q4_0: raw_q4_0, T.Q4_1: raw_q4_1}
    for qtype, make in raw_makers.items():
        name = qtype.name.lower()
        raw = make(rng, N_RANDOM_BLOCKS)
        check_bytes(raw, qtype, N_RANDOM_BLOCKS * 32)
        expected = gguf.quants.dequantize(raw, qtype).astype(np.float32, copy=False).reshape(-1)
        assert expected.size == N_RANDOM_BLOCKS * 32 and np.all(np.isfinite(expected))
        tensors[f"{name}.random.raw"] = raw
        tensors[f"{name}.random.expected"] = expected

        # Realistic blocks: gguf's own quantizer on a random vector with varying block scales.
        src = (rng.standard_normal(N_QUANTIZED) * np.repeat(10.0 ** rng.uniform(-3, 1, N_QUANTIZED // 32), 32))
        src = src.astype(np.float32)
        quantized = gguf.quants.quantize(src, qtype).reshape(-1)
        check_bytes(quantized, qtype, N_QUANTIZED)
        expected = gguf.quants.dequantize(quantized, qtype).astype(np.float32, copy=False).reshape(-1)
        tensors[f"{name}.quantized.raw"] = quantized
        tensors[f"{name}.quantized.expected"] = expected

    raw = raw_f16(rng)
    tensors["f16.random.raw"] = raw
    tensors["f16.random.expected"] = gguf.quants.dequantize(raw, T.F16).astype(np.float32, copy=False).reshape(-1)

    metadata = {
        "generator": "scripts/golden_gguf.py (gguf.quants.dequantize / gguf.quants.quantize)",
        "gguf": version("gguf"),
        "numpy": np.__version__,
        "seed": str(SEED),
    }
    write_safetensors(OUT, tensors, metadata)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(tensors)} tensors)")


def write_safetensors(path, tensors, metadata):
    """Minimal safetensors writer (little-endian data, 8-byte aligned header)."""
    dtypes = {np.dtype(np.uint8): "U8", np.dtype(np.float32): "F32"}
    header = {"__metadata__": metadata}
    chunks, offset = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtypes[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for c in chunks:
            f.write(c)


if __name__ == "__main__":
    main()
