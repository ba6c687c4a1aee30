#!/usr/bin/env python3
"""Golden fixtures for lathe's GRPO maths, computed by trl 1.16.0's own GRPOTrainer methods (not
re-derived formulas), written to ppo/tests/fixtures/grpo_golden.json.

Both parts call trl methods unbound-style on a stand-in trainer made with `GRPOTrainer.__new__` (no
`__init__`, no model, no generation) that holds the attributes the method reads, set as
`GRPOTrainer.__init__` sets them from a GRPOConfig with the listed values; the accelerator is a real
single-process CPU `accelerate.Accelerator`.

Part 1, "advantages": `GRPOTrainer._generate_and_score_completions(self, inputs)` itself
(trl/trainer/grpo_trainer.py), the group-relative advantage code being inline there. The stand-in replaces
only `_generate` (returns fixed prompt/completion ids, no sampling); the real `_calculate_rewards` calls
plain-Python reward functions that return fixed rewards looked up by an `idx` dataset column. beta = 0 and
gradient_accumulation_steps % (steps_per_generation * num_iterations) == 0, so no model forward is made.
3 prompts x G = 4 completions (inputs repeated per prompt as trl's RepeatSampler yields them); group 1
has all-equal rewards. Runs:
  - one reward function, scale_rewards in {"group", "batch", "none"} (trl 1.16's values; GRPOConfig maps
    True -> "group", False -> "none"), multi_objective_aggregation "sum_then_normalize" (default);
  - two reward functions with reward_weights [1.0, 0.5], scale_rewards {"group", "batch", "none"} with
    "sum_then_normalize", and "normalize_then_sum" (GDPO; scale_rewards not used there).
Recorded: rewards_per_func (B, F), the advantages trl outputs, num_items_in_batch, and the metrics it logs
(reward, reward_std, frac_reward_zero_std, rewards/<func>/mean, rewards/<func>/std). float32 as in trl
(`_calculate_rewards` builds float32 rewards).

Part 2, "loss": `GRPOTrainer._compute_loss(self, model, inputs)` itself, with the stand-in's
`_get_per_token_logps_and_entropies` returning the fixed per_token_logps (a float64 leaf with requires_grad)
and fixed entropies. inputs hold trl's keys: prompt_ids, prompt_mask, completion_ids, completion_mask,
advantages (B,), old_per_token_logps, ref_per_token_logps, num_items_in_batch (= completion_mask.sum(), a
long tensor, as `_generate_and_score_completions` makes it with one process). B = 4, T = 5, completion
lengths [5, 3, 4, 1] (right-padded; masked positions hold finite values so masking mistakes show). Grid:
loss_type {grpo, bnpo, dr_grpo, dapo} x beta {0.0, 0.04} x (epsilon_low, epsilon_high) {(0.2, 0.2),
(0.2, 0.28)}, with importance_sampling_level "token", max_completion_length 8 (> T, so dr_grpo's constant
is visible), current_gradient_accumulation_steps 1, steps_per_generation 1, num_processes 1, train mode,
delta None, use_bias_correction_kl False, top_entropy_quantile 1.0, no entropy bonus, no vLLM.
Plus 4 "_ga2" cases (grpo/bnpo/dr_grpo/dapo, beta 0.04, eps (0.2, 0.28)) with
current_gradient_accumulation_steps 2, steps_per_generation 2 and num_items_in_batch 40 (this micro-batch's
13 tokens + 27 of another micro-batch of the same generation batch), where dapo differs from bnpo.
Recorded: the loss, d loss / d per_token_logps (B, T) and every metric the call logs (kl only when
beta != 0, entropy, clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean,
clip_ratio/low_min, clip_ratio/high_max).
Inputs are float32-representable values stored as float64; the loss part computes in float64.

How to run (from the repository root):
    /tmp/venv-tf5/bin/pip install trl==1.16.0      # venv already held torch 2.15.0 (CPU),
                                                    # transformers 5.25.0, peft 0.21.2, accelerate 1.16.0;
                                                    # this pulled datasets 5.2.0 (+pandas, pyarrow), nothing downgraded
    /tmp/venv-tf5/bin/python scripts/golden_grpo.py

Pinned versions: trl 1.16.0, torch 2.15.0 (CPU), transformers 5.25.0, peft 0.21.2 (unused here),
accelerate 1.16.0, datasets 5.2.0 (recorded again in the JSON under "versions").
"""

import json
import os
import types
from collections import defaultdict

import torch

import accelerate
import peft
import transformers
import trl
from accelerate import Accelerator
from trl import GRPOTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "ppo", "tests", "fixtures", "grpo_golden.json")

ACCEL = Accelerator(cpu=True)

# ---------------------------------------------------------------- part 1: advantages

NUM_PROMPTS, G = 3, 4
REWARDS_A = [1.0, 0.0, 0.5, 2.0,  # group 0
             0.5, 0.5, 0.5, 0.5,  # group 1: all equal (std 0)
             -1.0, 0.25, 3.0, 0.75]  # group 2
REWARDS_B = [0.0, 1.0, 1.0, 0.0,
             1.0, 0.0, 1.0, 0.0,
             0.5, 0.5, 0.0, 1.0]


def reward_a(prompts, completions, completion_ids, idx, **kwargs):
    return [REWARDS_A[i] for i in idx]


def reward_b(prompts, completions, completion_ids, idx, **kwargs):
    return [REWARDS_B[i] for i in idx]


def adv_self(reward_funcs, reward_weights, scale_rewards, aggregation):
    s = GRPOTrainer.__new__(GRPOTrainer)
    d = s.__dict__
    d["accelerator"] = ACCEL
    d["model"] = types.SimpleNamespace(training=True, is_gradient_checkpointing=False)
    d["args"] = types.SimpleNamespace(
        per_device_train_batch_size=NUM_PROMPTS * G, per_device_eval_batch_size=NUM_PROMPTS * G,
        steps_per_generation=1, gradient_accumulation_steps=1, gradient_checkpointing_kwargs=None,
        report_to=[],
    )
    d["state"] = types.SimpleNamespace(global_step=0)
    d["environment_factories"] = None
    d["environments"] = None
    d["tools"] = []
    d["_tokenizer"] = types.SimpleNamespace(pad_token_id=0)
    d["pad_to_multiple_of"] = None
    d["mask_truncated_completions"] = False
    d["num_iterations"] = 1
    d["use_vllm"] = False
    d["vllm_importance_sampling_correction"] = False
    d["beta"] = 0.0
    d["ref_model"] = None
    d["num_generations"] = G
    d["num_generations_eval"] = G
    d["multi_objective_aggregation"] = aggregation
    d["scale_rewards"] = scale_rewards
    d["reward_funcs"] = reward_funcs
    d["reward_func_names"] = [f.__name__ for f in reward_funcs]
    d["reward_processing_classes"] = [None] * len(reward_funcs)
    d["reward_weights"] = torch.tensor(reward_weights, dtype=torch.float32)
    d["_metrics"] = {"train": defaultdict(list), "eval": defaultdict(list)}
    d["_logs"] = {"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
                  "extra": defaultdict(list), "images": []}
    d["_pending_extra_logs"] = {}
    d["_pending_metrics"] = {}
    d["log_multimodal"] = False

    # the only replaced piece: generation. Fixed ids, completion lengths 1..4, prompts left-padded by trl
    def _generate(prompts):
        n = len(prompts)
        prompt_ids = [[1] + [3 + (i // G)] * (1 + i // G) for i in range(n)]
        completion_ids = [[5 + (i % 7)] * (1 + i % 4) for i in range(n)]
        completions = [f"c{i}" for i in range(n)]
        return prompt_ids, completion_ids, None, completions, None, {}, None, None

    d["_generate"] = _generate
    return s


def run_adv(reward_funcs, reward_weights, scale_rewards, aggregation):
    s = adv_self(reward_funcs, reward_weights, scale_rewards, aggregation)
    inputs = [{"prompt": f"p{i // G}", "idx": i} for i in range(NUM_PROMPTS * G)]
    out = GRPOTrainer._generate_and_score_completions(s, inputs)
    rewards_per_func = torch.tensor([[f([], [], [], idx=[i])[0] for f in reward_funcs]
                                     for i in range(NUM_PROMPTS * G)])
    assert out["advantages"].dtype == torch.float32
    return {
        "scale_rewards": scale_rewards,
        "multi_objective_aggregation": aggregation,
        "reward_funcs": [f.__name__ for f in reward_funcs],
        "reward_weights": reward_weights,
        "rewards_per_func": {"shape": list(rewards_per_func.shape), "data": rewards_per_func.flatten().tolist()},
        "advantages": out["advantages"].tolist(),
        "num_items_in_batch": int(out["num_items_in_batch"]),
        "metrics": {k: v[-1] for k, v in s._metrics["train"].items()},
    }


def part_advantages():
    runs = []
    for sr in ["group", "batch", "none"]:
        runs.append(run_adv([reward_a], [1.0], sr, "sum_then_normalize"))
    for sr in ["group", "batch", "none"]:
        runs.append(run_adv([reward_a, reward_b], [1.0, 0.5], sr, "sum_then_normalize"))
    runs.append(run_adv([reward_a, reward_b], [1.0, 0.5], "group", "normalize_then_sum"))
    for r in runs:
        r["name"] = (f"{'+'.join(r['reward_funcs'])}_{r['multi_objective_aggregation']}_{r['scale_rewards']}")
    return {"num_prompts": NUM_PROMPTS, "num_generations": G, "runs": runs}


# ---------------------------------------------------------------- part 2: loss

B, T, MAX_COMPLETION_LENGTH = 4, 5, 8
LENGTHS = [5, 3, 4, 1]


def loss_inputs():
    g = torch.Generator().manual_seed(4321)
    f32 = lambda t: t.float().double()  # noqa: E731
    per_token_logps = f32(-(0.05 + 3.0 * torch.rand(B, T, generator=g, dtype=torch.float64)))
    # log(pi/pi_old): a spread that clips on both sides, some in (log 1.2, log 1.28) where the two
    # epsilon_high settings differ
    delta = torch.tensor([[0.05, 0.21, -0.30, 0.40, -0.10],
                          [0.22, -0.25, 0.15, 0.60, -0.70],
                          [-0.05, 0.30, 0.23, -0.40, 0.10],
                          [0.24, 0.35, -0.50, 0.02, 0.80]], dtype=torch.float64)
    old_per_token_logps = f32(per_token_logps - delta)
    ref_per_token_logps = f32(per_token_logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64))
    entropies = f32(0.2 + 2.0 * torch.rand(B, T, generator=g, dtype=torch.float64))
    completion_mask = torch.tensor([[1] * n + [0] * (T - n) for n in LENGTHS], dtype=torch.long)
    advantages = torch.tensor([1.25, -0.75, 0.5, -1.5], dtype=torch.float64)
    prompt_ids = torch.tensor([[1, 4, 6]] * B)
    prompt_mask = torch.ones(B, 3, dtype=torch.long)
    completion_ids = torch.randint(3, 40, (B, T), generator=g) * completion_mask
    return dict(per_token_logps=per_token_logps, old_per_token_logps=old_per_token_logps,
                ref_per_token_logps=ref_per_token_logps, entropies=entropies, completion_mask=completion_mask,
                advantages=advantages, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                completion_ids=completion_ids)


def loss_self(loss_type, beta, eps_low, eps_high, per_token_logps, entropies, ga=1, spg=1):
    s = GRPOTrainer.__new__(GRPOTrainer)
    d = s.__dict__
    d["accelerator"] = ACCEL
    d["model"] = types.SimpleNamespace(training=True)
    d["args"] = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=spg)
    d["loss_type"] = loss_type
    d["beta"] = beta
    d["epsilon_low"] = eps_low
    d["epsilon_high"] = eps_high
    d["importance_sampling_level"] = "token"
    d["max_completion_length"] = MAX_COMPLETION_LENGTH
    d["current_gradient_accumulation_steps"] = ga
    d["top_entropy_quantile"] = 1.0
    d["off_policy_mask_threshold"] = None
    d["use_vllm"] = False
    d["vllm_importance_sampling_correction"] = False
    d["aux_loss_enabled"] = False
    d["_entropy_bonus_enabled"] = False
    d["_metrics"] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kw):
        assert logits_to_keep == T and input_ids.shape == (B, 3 + T)
        return per_token_logps, entropies, None

    d["_get_per_token_logps_and_entropies"] = _get_per_token_logps_and_entropies
    return s


def part_loss():
    x = loss_inputs()
    local_items = int(x["completion_mask"].sum())
    grid = [(lt, beta, el, eh, 1, 1, local_items)
            for lt in ["grpo", "bnpo", "dr_grpo", "dapo"]
            for beta in [0.0, 0.04]
            for el, eh in [(0.2, 0.2), (0.2, 0.28)]]
    # extra: gradient accumulation 2 with steps_per_generation 2, the generation batch holding this micro-batch
    # and another one of 27 completion tokens (num_items_in_batch 40): where dapo and bnpo differ
    grid += [(lt, 0.04, 0.2, 0.28, 2, 2, local_items + 27) for lt in ["grpo", "bnpo", "dr_grpo", "dapo"]]
    cases = []
    for loss_type, beta, eps_low, eps_high, ga, spg, num_items in grid:
        ptl = x["per_token_logps"].clone().requires_grad_(True)
        s = loss_self(loss_type, beta, eps_low, eps_high, ptl, x["entropies"], ga=ga, spg=spg)
        inputs = {
            "prompt_ids": x["prompt_ids"], "prompt_mask": x["prompt_mask"],
            "completion_ids": x["completion_ids"], "completion_mask": x["completion_mask"],
            "advantages": x["advantages"],
            "old_per_token_logps": x["old_per_token_logps"],
            # as _generate_and_score_completions makes it: accelerator.gather(loss_mask.sum()).sum(), long
            "num_items_in_batch": ACCEL.gather(torch.tensor(num_items)).sum(),
        }
        if beta != 0.0:
            inputs["ref_per_token_logps"] = x["ref_per_token_logps"]
        loss = GRPOTrainer._compute_loss(s, None, inputs)
        loss.backward()
        name = f"{loss_type}_beta{beta}_eps{eps_low}-{eps_high}" + (f"_ga{ga}" if ga != 1 else "")
        cases.append({
            "name": name,
            "loss_type": loss_type, "beta": beta, "epsilon_low": eps_low, "epsilon_high": eps_high,
            "current_gradient_accumulation_steps": ga, "steps_per_generation": spg,
            "num_items_in_batch": num_items,
            "loss": loss.item(),
            "grad_per_token_logps": {"shape": [B, T], "data": ptl.grad.flatten().tolist()},
            "metrics": {k: v[-1] for k, v in s._metrics["train"].items()},
        })
    t = lambda k: {"shape": list(x[k].shape), "data": x[k].flatten().tolist()}  # noqa: E731
    return {
        "B": B, "T": T,
        "config": {"importance_sampling_level": "token", "max_completion_length": MAX_COMPLETION_LENGTH,
                   "num_processes": 1, "mode": "train",
                   "note": "current_gradient_accumulation_steps, steps_per_generation, num_items_in_batch "
                           "are per case"},
        "inputs": {k: t(k) for k in ["per_token_logps", "old_per_token_logps", "ref_per_token_logps",
                                     "entropies", "completion_mask", "advantages", "prompt_ids",
                                     "prompt_mask", "completion_ids"]},
        "cases": cases,
    }


def main():
    torch.manual_seed(0)
    doc = {
        "generator": "scripts/golden_grpo.py",
        "versions": {
            "trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__,
        },
        "source": "trl/trainer/grpo_trainer.py: GRPOTrainer._generate_and_score_completions (advantages, "
                  "with the real _calculate_rewards; only _generate stubbed) and GRPOTrainer._compute_loss",
        "notes": [
            "advantages (sum_then_normalize): r = nansum_f(w_f * r_f); A = r - mean_group(r); "
            "group: A /= (std_group(r) + 1e-4); batch: A /= (std_all(r) + 1e-4); none: no division. "
            "std is UNBIASED (Bessel, n-1). float32.",
            "advantages (normalize_then_sum): per function z_f = (r_f - mean_group) / (std_group + 1e-4); "
            "s = sum_f w_f z_f; A = (s - mean_all(s)) / (std_all(s) + 1e-4)",
            "frac_reward_zero_std: fraction of ROWS whose std (group or batch, per scale_rewards) isclose 0; "
            "reward / reward_std: mean / unbiased std of the weighted sum over the batch",
            "loss: ratio = exp(logp - old); per_token = -min(ratio*A, clamp(ratio, 1-eps_low, 1+eps_high)*A) "
            "+ beta * (exp(ref - logp) - (ref - logp) - 1)",
            "grpo: mean_b(sum_t(l*m)/clamp(sum_t m, 1)); bnpo: sum(l*m)/clamp(sum m, 1); "
            "dr_grpo: sum(l*m)/(B*max_completion_length); dapo: sum(l*m)/(num_items_in_batch/num_processes "
            "* grad_accum/steps_per_generation); (grpo/bnpo/dr_grpo then / grad_accum in train mode)",
            "metrics: kl and clip_ratio/*_mean are masked means over all tokens of the batch; "
            "clip_ratio/low_min = min over rows of the row's masked mean of is_low_clipped, "
            "clip_ratio/high_max = max over rows; is_low_clipped = ratio < 1-eps_low AND A < 0; "
            "is_high_clipped = ratio > 1+eps_high AND A > 0; entropy = masked mean of the entropies",
            "tensors are row-major lists with their shapes",
        ],
        "advantages": part_advantages(),
        "loss": part_loss(),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
