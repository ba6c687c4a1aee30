"""The supervised fine-tuning peer of `cargo xtask bench`: one LoRA training step of
transformers + peft on the CPU (forward, backward, AdamW step, zero_grad) with the same GGUF
model, batch, sequence length and LoRA settings as lathe's run.

Setup: SmolLM2-135M-Instruct from the GGUF file, dequantized to f32; peft LoRA r 16, alpha 32,
dropout 0.05, bias "none", on q_proj and v_proj; AdamW (torch defaults, lr 2e-4) over the
adapter parameters only; causal-LM loss (transformers shifts the labels) on seeded random
token ids of shape (batch, seq) with labels = ids, the same batch every step. The model is in
train mode (LoRA dropout active). The GGUF file has no separate output matrix, so lm_head is
tied to the token embedding (transformers 4.46.3 would leave it random). With
`--gradient-checkpointing` each decoder layer is recomputed in the backward (non-reentrant
checkpointing).

Pinned venv (what the figures in the issue notes used):
    python3 -m venv /tmp/venv-models
    /tmp/venv-models/bin/pip install torch==2.5.1 transformers==4.46.3 peft==0.13.2 \
        gguf==0.19.0 accelerate
Usage:
    python scripts/peer_sft.py --model FILE.gguf --batch 16 --seq 24 --threads 2 \
        --steps 5 --warmup 1 [--gradient-checkpointing]
Prints one JSON object: versions, settings, per-step best and median seconds, tokens/s
(batch * seq / best step) and peak RSS (of the whole process, and of the training steps
alone where the kernel lets the peak be reset).
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

from peer_common import load_gguf_causal_lm, reset_peak_rss, rss_mib


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a .gguf file")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=24)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tied = load_gguf_causal_lm(args.model)
    load_s = time.perf_counter() - start
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        bias="none",
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=2e-4)

    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)  # (B, T)
    rss_after_load = rss_mib("VmRSS")
    peak_load = rss_mib("VmHWM")
    peak_reset = reset_peak_rss()

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    losses = []
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = step()
        elapsed = time.perf_counter() - t0
        losses.append(loss)
        if i >= args.warmup:
            times.append(elapsed)

    best = min(times)
    # After a reset, ru_maxrss may follow the reset too, so the whole-process peak is the
    # larger of the load-time peak and the training peak.
    peak_train = rss_mib("VmHWM") if peak_reset else None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(
        json.dumps(
            {
                "library": "transformers+peft",
                "version": transformers.__version__,
                "peft": peft.__version__,
                "torch": torch.__version__,
                "python": sys.version.split()[0],
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "seq": args.seq,
                "gradient_checkpointing": args.gradient_checkpointing,
                "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "v_proj"]},
                "tied_lm_head": tied,
                "trainable_params": trainable,
                "optimizer": "AdamW lr 2e-4",
                "load_s": load_s,
                "warmup_steps": args.warmup,
                "steps": args.steps,
                "step_times_s": times,
                "best_s": best,
                "median_s": statistics.median(times),
                "tokens_per_s": args.batch * args.seq / best,
                "losses": losses,
                "rss_after_load_mib": rss_after_load,
                "peak_rss_load_mib": peak_load,
                "peak_rss_train_mib": peak_train,
                "peak_rss_process_mib": max(v for v in (peak_load, peak_train, maxrss) if v),
            }
        )
    )


if __name__ == "__main__":
    main()
