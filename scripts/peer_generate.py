"""The generation peer of `cargo xtask bench`: transformers' batched greedy `generate` on the
CPU with the same GGUF model, prompts, batch sizes and new-token counts as lathe's run.

Pinned venv (what the figures in the issue notes used):
    python3 -m venv /tmp/venv-models
    /tmp/venv-models/bin/pip install torch==2.5.1 transformers==4.46.3 gguf==0.19.0 accelerate
Usage:
    python scripts/peer_generate.py --model FILE.gguf --prompts prompts.json \
        --cases 1x32,16x16 --threads 2 --runs 3
Prints one JSON object: per case the best and median seconds and tokens/s.
"""

import argparse
import json
import os
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a .gguf file")
    ap.add_argument("--prompts", required=True, help="a JSON array of prompt strings")
    ap.add_argument("--cases", default="1x32,16x16", help="BATCHxNEW_TOKENS,...")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    directory, name = os.path.split(os.path.abspath(args.model))
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, torch_dtype=torch.float32
    )
    model.eval()
    load_s = time.perf_counter() - start
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = json.load(open(args.prompts))

    cases = []
    for case in args.cases.split(","):
        batch, new = (int(v) for v in case.split("x"))
        batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
        enc = tokenizer(batch_prompts, return_tensors="pt", padding=True)
        times = []
        with torch.no_grad():
            # One untimed run: allocator and thread pool warm-up, as lathe's warm-up run.
            for run in range(args.runs + 1):
                t0 = time.perf_counter()
                out = model.generate(
                    **enc,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                if run > 0:
                    times.append(time.perf_counter() - t0)
        assert out.shape[1] - enc["input_ids"].shape[1] == new
        best = min(times)
        cases.append(
            {
                "batch": batch,
                "new_tokens": new,
                "best_s": best,
                "median_s": statistics.median(times),
                "tokens_per_s": batch * new / best,
            }
        )
    print(
        json.dumps(
            {
                "library": "transformers",
                "version": transformers.__version__,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "load_s": load_s,
                "python": sys.version.split()[0],
                "cases": cases,
            }
        )
    )


if __name__ == "__main__":
    main()
