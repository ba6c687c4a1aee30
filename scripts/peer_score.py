"""The reward-scoring peer of `cargo xtask bench`: transformers runs all-MiniLM-L6-v2 on the
same 128 IMDB sentences in batches of 16 (tokenize with padding, forward, masked mean pool,
a linear head), on the CPU with the same thread count: the work of lathe's `RewardModel`
scoring with a head on mean-pooled states.

Pinned venv: /tmp/venv-models (torch 2.5.1, transformers 4.46.3).
Usage:
    python scripts/peer_score.py --encoder DIR --texts texts.json --threads 2 --runs 3
Prints one JSON object: versions, threads, best and median seconds, texts/s at the best.
"""

import argparse
import json
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--texts", required=True, help="a JSON array of strings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.encoder)
    model = AutoModel.from_pretrained(args.encoder, torch_dtype=torch.float32).eval()
    head = torch.nn.Linear(model.config.hidden_size, 2)
    texts = json.load(open(args.texts))

    def score_all():
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), 16):
                enc = tokenizer(texts[i : i + 16], padding=True, truncation=True, return_tensors="pt")
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1)
                out.extend(head(pooled)[:, 1].tolist())
        return out

    score_all()  # warm-up
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        score_all()
        times.append(time.perf_counter() - t0)
    best = min(times)
    print(
        json.dumps(
            {
                "library": "transformers",
                "version": transformers.__version__,
                "torch": torch.__version__,
                "python": sys.version.split()[0],
                "threads": torch.get_num_threads(),
                "texts": len(texts),
                "best_s": best,
                "median_s": statistics.median(times),
                "texts_per_s": len(texts) / best,
            }
        )
    )


if __name__ == "__main__":
    main()
