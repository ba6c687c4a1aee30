#!/usr/bin/env python3
"""Golden fixtures for lathe's PPO maths: trl 0.11.4's own functions and `PPOTrainer` methods
(imported, not re-implemented) on small seeded tensors, written to
ppo/tests/fixtures/ppo_golden.safetensors (every tensor f32; masks and token ids as f32 too)
and ppo/tests/fixtures/meta.json (keys, shapes, what each key is, the config
values used, versions).

The batch follows trl's layout: B = 4 rows of T = 10 positions of the log-prob axis
(position t holds log p(token t+1 | tokens <= t)); `mask` marks each row's response
positions [start, end) = (0, 10), (2, 8), (3, 6), (1, 2), i.e. rows with a query prefix, right
padding, a full-length row (whose last token is the last position) and a one-token response.
Every position (masked or not) holds a finite random value, so masking mistakes show.

What is computed (trl names in brackets):
  - `PPOTrainer.compute_rewards(scores, logprobs, ref_logprobs, mask)` with kl_penalty "kl",
    kl coefficient 0.2 -> `rewards`, `non_score_reward`, `kls`;
  - `PPOTrainer.compute_advantages(values, rewards, mask)` -> `adv_{set}.values` (values *
    mask), `adv_{set}.advantages` (masked-whitened, shift_mean true), `adv_{set}.returns`
    (un-whitened advantages + values) for the sets g1_l095 (gamma 1, lam 0.95), g09_l08
    (gamma 0.9, lam 0.8) and g1_l095_wr (gamma 1, lam 0.95, whiten_rewards true);
  - `PPOTrainer.loss(old_logprobs, values, logits, vpreds, logprobs, mask, advantages,
    returns)` with the g1_l095 set: `loss.pg_loss`, `loss.vf_loss_scaled` (trl returns
    vf_coef * vf_loss), and every stat under `loss_stats.<trl name>` (loss/policy,
    loss/value, loss/total, policy/entropy, policy/approxkl, policy/policykl,
    policy/clipfrac, policy/advantages_mean, policy/advantages (B, T), policy/ratio (B, T),
    returns/mean, returns/var, val/vpred, val/error, val/clipfrac, val/mean, val/var);
    `logprobs` are trl's `logprobs_from_logits(logits, tokens)`;
  - `PPOTrainer.record_step_stats` on those stats stacked as `step` stacks them ->
    `step_stats.<trl name>` (objective/kl, objective/entropy, ppo/mean_non_score_reward,
    ppo/mean_scores, ppo/std_scores, ppo/val/var_explained, ppo/<loss stats> ...);
  - `trl.core.whiten`, `masked_mean`, `masked_var`, `masked_whiten` on `wh.x` + `wh.mask`;
  - `AdaptiveKLController(0.2, 6, 10000).update(current, n_steps)` over `kl.adaptive_current`
    / `kl.adaptive_n_steps` -> `kl.adaptive_coef` (value after each update, one controller),
    `FixedKLController(0.2)` likewise -> `kl.fixed_coef`;
  - `trl.core.entropy_from_logits` on `logits` and on `ent.logits` (offset 100, std 5).
The methods are called on a PPOTrainer made without __init__ that holds what they read
(`config`, a real `PPOConfig`; `kl_ctl`, a real `AdaptiveKLController`): the same code
`PPOTrainer.step` runs, without a model, tokenizer or accelerator.

How to run (from the repository root):
    python3 -m venv /tmp/venv-trl
    /tmp/venv-trl/bin/pip install torch==2.5.1 transformers==4.46.3 peft==0.13.2 trl==0.11.4 \
        safetensors numpy==2.1.3 rich accelerate==1.1.1 datasets==3.1.0
    /tmp/venv-trl/bin/python scripts/golden_ppo.py

Pinned versions: trl 0.11.4, torch 2.5.1, transformers 4.46.3, numpy 2.1.3 (trl 0.11.4 imports
rich without declaring it; accelerate and datasets pinned to releases of trl's time).
"""

import json
import os
import warnings

import numpy as np
import torch
import transformers
import trl
from safetensors.numpy import save_file
from trl import PPOConfig, PPOTrainer
from trl.core import (
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    stack_dicts,
    whiten,
)
from trl.trainer.utils import AdaptiveKLController, FixedKLController

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "ppo", "tests", "fixtures")
NAME = "ppo_golden"

B, T, V = 4, 10, 16
SPANS = [(0, 10), (2, 8), (3, 6), (1, 2)]  # response positions [start, end) per row
QUERY_LENS = [1, 3, 4, 2]  # query lengths that put the spans there (start = len(query) - 1)
INIT_KL_COEF, KL_TARGET, KL_HORIZON = 0.2, 6.0, 10000.0
CLIPRANGE, CLIPRANGE_VALUE, VF_COEF = 0.2, 0.2, 0.1
WHITEN_EPS = 1e-8  # hard-coded in trl.core.whiten / masked_whiten
ADV_SETS = {
    # name: (gamma, lam, whiten_rewards)
    "g1_l095": (1.0, 0.95, False),
    "g09_l08": (0.9, 0.8, False),
    "g1_l095_wr": (1.0, 0.95, True),
}
KL_UPDATES = [(3.0, 256), (12.0, 256), (6.6, 128), (-1.0, 128), (5.0, 64), (100.0, 10000)]


def ppo_config(gamma=1.0, lam=0.95, whiten_rewards=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PPOConfig is deprecated in 0.11
        return PPOConfig(
            batch_size=B,
            mini_batch_size=B,
            init_kl_coef=INIT_KL_COEF,
            adap_kl_ctrl=True,
            target=KL_TARGET,
            horizon=KL_HORIZON,
            kl_penalty="kl",
            gamma=gamma,
            lam=lam,
            cliprange=CLIPRANGE,
            cliprange_value=CLIPRANGE_VALUE,
            vf_coef=VF_COEF,
            whiten_rewards=whiten_rewards,
        )


def trainer_view(config):
    """A PPOTrainer without __init__ (no model, tokenizer or accelerator) holding what
    compute_rewards / _kl_penalty / compute_advantages / loss / record_step_stats read from
    `self`: the config and the KL controller, built as __init__ builds it."""
    trainer = object.__new__(PPOTrainer)
    trainer.config = config
    trainer.kl_ctl = AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
    return trainer


def inputs():
    gen = torch.Generator().manual_seed(20240611)
    mask = torch.zeros(B, T, dtype=torch.long)  # trl's masks are integer
    for b, (start, end) in enumerate(SPANS):
        mask[b, start:end] = 1
    logits = 2.0 * torch.randn(B, T, V, generator=gen)  # (B, T, V) policy logits now
    tokens = torch.randint(0, V, (B, T), generator=gen)  # (B, T) the token each position predicts
    logprobs = logprobs_from_logits(logits, tokens)  # (B, T) current policy
    old_logprobs = logprobs + 0.15 * torch.randn(B, T, generator=gen)  # rollout policy
    ref_logprobs = old_logprobs + 0.3 * torch.randn(B, T, generator=gen)  # frozen reference
    values = torch.randn(B, T, generator=gen)  # (B, T) rollout value head output
    vpred_noise = 0.25 * torch.randn(B, T, generator=gen)
    scores = 2.0 * torch.randn(B, generator=gen)  # (B,) reward model scores
    wh_x = 3.0 + 2.0 * torch.randn(B, T, generator=gen)
    ent_logits = 100.0 + 5.0 * torch.randn(2, 3, V, generator=gen)
    return dict(
        mask=mask,
        logits=logits,
        tokens=tokens,
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        vpred_noise=vpred_noise,
        scores=scores,
        wh_x=wh_x,
        ent_logits=ent_logits,
    )


def main():
    torch.manual_seed(0)
    x = inputs()
    mask = x["mask"]
    out = {}
    desc = {}

    def put(key, value, what):
        t = torch.as_tensor(value).detach().to(torch.float32).contiguous()
        out[key] = t.numpy().copy()
        desc[key] = what

    put("mask", mask, "(B, T) 1 at response positions [start, end) of each row (SPANS)")
    put("tokens", x["tokens"], "(B, T) token id predicted at each log-prob position")
    put("logits", x["logits"], "(B, T, V) current policy logits (loss input)")
    put("logprobs", x["logprobs"], "(B, T) trl logprobs_from_logits(logits, tokens)")
    put("old_logprobs", x["old_logprobs"], "(B, T) rollout log-probs (compute_rewards' logprobs, loss' old_logprobs)")
    put("ref_logprobs", x["ref_logprobs"], "(B, T) reference model log-probs")
    put("values", x["values"], "(B, T) rollout values (compute_advantages input)")
    put("scores", x["scores"], "(B,) reward model scores")

    # Per-token rewards, with the rollout log-probs as PPOTrainer.step passes them.
    base = trainer_view(ppo_config())
    rewards, non_score_reward, kls = base.compute_rewards(
        x["scores"], x["old_logprobs"], x["ref_logprobs"], mask
    )
    put("rewards", rewards, "(B, T) compute_rewards: non_score_reward + score at the last mask-1 position")
    put("non_score_reward", non_score_reward, "(B, T) compute_rewards: -kl_coef * kls (NOT masked)")
    put("kls", kls, "(B, T) compute_rewards: logprobs - ref_logprobs (kl_penalty 'kl', NOT masked)")

    adv = {}
    for name, (gamma, lam, whiten_rewards) in ADV_SETS.items():
        view = trainer_view(ppo_config(gamma, lam, whiten_rewards))
        values_m, advantages, returns = view.compute_advantages(x["values"], rewards, mask)
        adv[name] = (values_m, advantages, returns)
        setting = f"gamma {gamma}, lam {lam}, whiten_rewards {whiten_rewards}"
        put(f"adv_{name}.values", values_m, f"(B, T) compute_advantages values * mask ({setting})")
        put(f"adv_{name}.advantages", advantages, f"(B, T) compute_advantages masked-whitened advantages ({setting})")
        put(f"adv_{name}.returns", returns, f"(B, T) compute_advantages returns = raw advantages + values ({setting})")

    # The loss on the gamma 1 / lam 0.95 set, as train_minibatch calls it.
    values_m, advantages, returns = adv["g1_l095"]
    vpreds = values_m + x["vpred_noise"]
    put("vpreds", vpreds, "(B, T) value head output now = adv_g1_l095.values + noise")
    pg_loss, vf_loss_scaled, stats = base.loss(
        x["old_logprobs"], values_m, x["logits"], vpreds, x["logprobs"], mask, advantages, returns
    )
    put("loss.pg_loss", pg_loss, "() PPOTrainer.loss first output: clipped policy loss")
    put("loss.vf_loss_scaled", vf_loss_scaled, "() PPOTrainer.loss second output: vf_coef * vf_loss")
    for k, v in stats.items():
        put(f"loss_stats.{k}", v, f"{tuple(v.shape)} PPOTrainer.loss stats['{k}']")

    # What PPOTrainer.step does with the minibatch stats (one minibatch, one epoch).
    train_stats = stack_dicts([stats])
    train_stats["policy/advantages"] = torch.flatten(train_stats["policy/advantages"]).unsqueeze(0)
    train_stats["policy/ratio"] = torch.flatten(train_stats["policy/ratio"]).unsqueeze(0)
    queries = [torch.zeros(n, dtype=torch.long) for n in QUERY_LENS]
    responses = [torch.zeros(end - start, dtype=torch.long) for start, end in SPANS]
    step_stats = base.record_step_stats(
        scores=x["scores"],
        logprobs=x["old_logprobs"],
        ref_logprobs=x["ref_logprobs"],
        non_score_reward=non_score_reward,
        train_stats=train_stats,
        kl_coef=base.kl_ctl.value,
        masks=mask,
        queries=queries,
        responses=responses,
        kls=kls,
    )
    for k, v in step_stats.items():
        v = torch.as_tensor(v)
        if v.numel() == 1 and not k.startswith("tokens/"):
            put(f"step_stats.{k}", v.reshape(()), f"() PPOTrainer.record_step_stats['{k}']")
    put("step_stats.objective/kl_dist", step_stats["objective/kl_dist"], "(B,) per-row sum of kls * mask")
    # The KL controller update step() makes after the batch: (objective/kl, batch_size).
    ctl = AdaptiveKLController(INIT_KL_COEF, KL_TARGET, KL_HORIZON)
    ctl.update(float(step_stats["objective/kl"]), B)
    put("step_stats.kl_coef_after", ctl.value, "() AdaptiveKLController(0.2, 6, 10000).update(objective/kl, B)")

    # trl.core whitening helpers.
    wx = x["wh_x"]
    put("wh.x", wx, "(B, T) input of the whitening helpers")
    put("wh.mask", mask, "(B, T) the same mask")
    put("wh.whiten", whiten(wx), "(B, T) whiten(x): all elements, unbiased var, eps 1e-8")
    put("wh.whiten_noshift", whiten(wx, shift_mean=False), "(B, T) whiten(x, shift_mean=False): mean added back")
    put("wh.masked_mean", masked_mean(wx, mask), "() masked_mean(x, mask)")
    put("wh.masked_mean_axis1", masked_mean(wx, mask, axis=1), "(B,) masked_mean(x, mask, axis=1)")
    put("wh.masked_var", masked_var(wx, mask), "() masked_var(x, mask): unbiased (n/(n-1), n = mask.sum())")
    put("wh.masked_var_biased", masked_var(wx, mask, unbiased=False), "() masked_var(x, mask, unbiased=False)")
    put("wh.masked_whiten", masked_whiten(wx, mask), "(B, T) masked_whiten(x, mask) at all positions")
    put(
        "wh.masked_whiten_noshift",
        masked_whiten(wx, mask, shift_mean=False),
        "(B, T) masked_whiten(x, mask, shift_mean=False): masked mean added back",
    )

    # KL controllers.
    adaptive = AdaptiveKLController(INIT_KL_COEF, KL_TARGET, KL_HORIZON)
    fixed = FixedKLController(INIT_KL_COEF)
    adaptive_coefs, fixed_coefs = [], []
    for current, n_steps in KL_UPDATES:
        adaptive.update(current, n_steps)
        fixed.update(current, n_steps)
        adaptive_coefs.append(float(adaptive.value))
        fixed_coefs.append(float(fixed.value))
    put("kl.adaptive_current", [c for c, _ in KL_UPDATES], "(U,) current kl passed to update")
    put("kl.adaptive_n_steps", [n for _, n in KL_UPDATES], "(U,) n_steps passed to update")
    put("kl.adaptive_coef", adaptive_coefs, "(U,) AdaptiveKLController(0.2, 6, 10000).value after each update, in sequence")
    put("kl.fixed_coef", fixed_coefs, "(U,) FixedKLController(0.2).value after each update")

    # Entropy.
    put("ent.of_logits", entropy_from_logits(x["logits"]), "(B, T) entropy_from_logits(logits)")
    put("ent.logits", x["ent_logits"], "(2, 3, V) logits 100 + 5 N(0, 1): a large common offset, peaked rows")
    put("ent.of_ent_logits", entropy_from_logits(x["ent_logits"]), "(2, 3) entropy_from_logits(ent.logits)")

    for k, v in out.items():
        assert np.all(np.isfinite(v)), k
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, NAME + ".safetensors")
    save_file(out, path, metadata={"source": "scripts/golden_ppo.py", "trl": trl.__version__})
    os.chmod(path, 0o644)  # safetensors creates it 0600
    meta = {
        "generator": "scripts/golden_ppo.py",
        "versions": {
            "trl": trl.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
        },
        "dims": {"B": B, "T": T, "V": V, "U": len(KL_UPDATES)},
        "spans": SPANS,
        "query_lens": QUERY_LENS,
        "config": {
            "init_kl_coef": INIT_KL_COEF,
            "kl_target": KL_TARGET,
            "kl_horizon": KL_HORIZON,
            "kl_penalty": "kl",
            "cliprange": CLIPRANGE,
            "cliprange_value": CLIPRANGE_VALUE,
            "vf_coef": VF_COEF,
            "ratio_threshold": base.config.ratio_threshold,
            "whiten_eps": WHITEN_EPS,
            "advantage_sets": {
                name: {"gamma": g, "lam": l, "whiten_rewards": w} for name, (g, l, w) in ADV_SETS.items()
            },
            "loss_uses_advantage_set": "g1_l095",
        },
        "kl_updates": [
            {"current": c, "n_steps": n, "adaptive_coef": a, "fixed_coef": f}
            for (c, n), a, f in zip(KL_UPDATES, adaptive_coefs, fixed_coefs)
        ],
        "dtype": "every tensor f32 (mask and token ids too)",
        "tensors": {k: {"shape": list(v.shape), "what": desc[k]} for k, v in sorted(out.items())},
    }
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes, {len(out)} tensors)")


if __name__ == "__main__":
    main()
