#!/usr/bin/env python3
"""Golden fixtures for lathe's DPO maths, computed by trl 1.16.0's own code (not re-derived formulas),
written to train/tests/fixtures/dpo_golden.json.

In trl 1.16.0 there is no `DPOTrainer.dpo_loss` any more: the whole loss (every loss_type), the rewards
and the logged metrics live inline in `DPOTrainer._compute_loss(self, model, inputs, return_outputs)`
(trl/trainer/dpo_trainer.py). That method is called here unbound, on a stand-in `self` that holds the
attributes it reads (beta, loss_types, loss_weights, label_smoothing, f_divergence_type, ld_alpha,
use_weighting, precompute_ref_logps, aux_loss_enabled, accelerator, model.training, _metrics,
_total_train_tokens, _tp_size), with the reference log-probs passed in `inputs` the way trl does
with precompute_ref_log_probs=True (`ref_chosen_logps` / `ref_rejected_logps`).

Part 1, "cases" (fixed sequence log-probs): the batch (B = 6 pairs) is built by trl's
`DataCollatorForPreference` from token ids whose completion lengths are recorded (the IPO loss divides by
them). The `model` passed to `_compute_loss` is a stand-in returning a trl `FusedCausalLMOutput` whose
`log_probs` (2B, T-1) are zero except one completion position per row, which holds that row's fixed
sequence log-prob (a float64 leaf with requires_grad), so trl's `per_token_logps.sum(dim=1)` gives exactly
the fixed value. `_compute_loss` returns the MEAN loss (its `per_sequence_loss` is local), so:
  - `loss`, the gradients and the metrics come from one call on the whole batch;
  - `losses` / `chosen_rewards` / `rejected_rewards` (per example) come from 6 calls on one pair each
    (loss = mean over one pair = that pair's loss; rewards/chosen metric = that pair's reward); the script
    asserts their mean equals the batch loss.
Inputs are float32-representable values stored as float64; every computation is float64.
Cases: loss_type in {sigmoid, ipo, hinge} x beta in {0.1, 0.5} x label_smoothing 0.0, plus sigmoid with
label_smoothing 0.2 (trl 1.16 ACCEPTS it but sigmoid IGNORES it: results equal label_smoothing 0.0), plus
"robust" with label_smoothing 0.2 (the loss that uses it, with exo_pair and aot*).

Part 2, "model" (real log-probs): the tiny Qwen2 at models/tests/fixtures/models/qwen2_tiny (float32,
eval), patched with trl's own `trl.trainer.utils.add_fused_lm_head(model, outputs=("log_probs",
"entropy", "mean_logits", "is_top1"))` exactly as `DPOTrainer.__init__` does; 2 pairs collated by
`DataCollatorForPreference(pad_token_id=0)` (right padding, rows [chosen..., rejected...]); the per-token
log-probs are the fused forward `model(input_ids, attention_mask, use_cache=False, labels=input_ids with
-100 outside completion_mask, fused_lm_head=True).log_probs` (B2, T-1) (position t = log p(token t+1 |
tokens <= t), zero outside the completion) and the sequence log-probs their sum over dim 1: trl's own path,
the same call `_compute_loss` makes. A plain-forward log_softmax/gather/masked-sum cross-check is asserted.
Then `_compute_loss` itself is run on that real model (sigmoid, beta 0.1, ref log-probs fixed in inputs)
and its loss and all logged metrics (entropy, logits/*, mean_token_accuracy, rewards/*, logps/*, num_tokens)
are recorded.

How to run (from the repository root):
    /tmp/venv-tf5/bin/pip install trl==1.16.0      # venv already held torch 2.15.0 (CPU),
                                                    # transformers 5.25.0, peft 0.21.2, accelerate 1.16.0;
                                                    # this pulled datasets 5.2.0 (+pandas, pyarrow), nothing downgraded
    /tmp/venv-tf5/bin/python scripts/golden_dpo.py

Pinned versions: trl 1.16.0, torch 2.15.0 (CPU), transformers 5.25.0, peft 0.21.2 (unused here),
accelerate 1.16.0, datasets 5.2.0 (recorded again in the JSON under "versions").
"""

import json
import os
import types
from collections import defaultdict

import torch
import torch.nn.functional as F

import accelerate
import peft
import transformers
import trl
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "train", "tests", "fixtures", "dpo_golden.json")
MODEL_DIR = os.path.join(ROOT, "models", "tests", "fixtures", "models", "qwen2_tiny")


class _Accel:
    """The accelerator calls `_compute_loss` makes, for one process."""

    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def gather_for_metrics(x):
        return x


def make_self(loss_type, beta, label_smoothing):
    """A stand-in DPOTrainer `self` with the attributes `_compute_loss` reads, set as `__init__` sets
    them from a DPOConfig with these values (other fields at their defaults)."""
    s = DPOTrainer.__new__(DPOTrainer)
    d = s.__dict__
    d["beta"] = beta
    d["precompute_ref_logps"] = True
    d["loss_types"] = [loss_type]
    d["loss_weights"] = [1.0]
    d["ld_alpha"] = None
    d["f_divergence_type"] = "reverse_kl"
    d["f_alpha_divergence_coef"] = 0.5
    d["label_smoothing"] = label_smoothing
    d["use_weighting"] = False
    d["aux_loss_enabled"] = False
    d["accelerator"] = _Accel()
    d["model"] = types.SimpleNamespace(training=True)
    d["_metrics"] = {"train": defaultdict(list), "eval": defaultdict(list)}
    d["_total_train_tokens"] = 0
    d["_tp_size"] = 1
    d["args"] = types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05)
    return s


class FixedLogpsModel:
    """Stand-in policy: returns fixed per-sequence log-probs through trl's fused-head output type."""

    def __init__(self, logps, completion_mask):
        # logps: (2B,) leaf; put each row's value at its last completion position of the shifted axis
        shift = completion_mask[:, 1:]
        last = shift.size(1) - 1 - torch.argmax(shift.flip(1), dim=1)
        onehot = F.one_hot(last, shift.size(1)).to(logps.dtype)
        self.log_probs = onehot * logps[:, None]
        self.shape = shift.shape

    def __call__(self, **kwargs):
        z = torch.zeros(self.shape, dtype=self.log_probs.dtype)
        return FusedCausalLMOutput(
            log_probs=self.log_probs,
            entropy=z,
            mean_logits=z,
            is_top1=torch.zeros(self.shape, dtype=torch.bool),
        )


def collate(prompt_lens, chosen_lens, rejected_lens, seed):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for p, c, r in zip(prompt_lens, chosen_lens, rejected_lens):
        ids = lambda n: torch.randint(3, 40, (n,), generator=g).tolist()  # noqa: E731
        examples.append({"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)})
    return examples, DataCollatorForPreference(pad_token_id=0)(examples)


def run_case(loss_type, beta, ls, pc, pr, rc, rr, batch):
    """One `_compute_loss` call; returns (loss, grad_pc, grad_pr, metrics)."""
    s = make_self(loss_type, beta, ls)
    pc = pc.detach().clone().requires_grad_(True)
    pr = pr.detach().clone().requires_grad_(True)
    model = FixedLogpsModel(torch.cat([pc, pr]), batch["completion_mask"])
    inputs = dict(batch)
    inputs["ref_chosen_logps"] = rc
    inputs["ref_rejected_logps"] = rr
    loss = DPOTrainer._compute_loss(s, model, inputs, False)
    loss.backward()
    metrics = {k: v[-1] for k, v in s._metrics["train"].items()}
    return loss.item(), pc.grad.tolist(), pr.grad.tolist(), metrics


def part_cases():
    B = 6
    g = torch.Generator().manual_seed(1234)
    f32 = lambda t: t.float().double()  # noqa: E731  (values exactly representable in f32)
    ref_chosen = f32(-5.0 - 35.0 * torch.rand(B, generator=g, dtype=torch.float64))
    ref_rejected = f32(-5.0 - 35.0 * torch.rand(B, generator=g, dtype=torch.float64))
    policy_chosen = f32(ref_chosen + 4.0 * torch.randn(B, generator=g, dtype=torch.float64))
    policy_rejected = f32(ref_rejected + 4.0 * torch.randn(B, generator=g, dtype=torch.float64))
    policy_chosen = policy_chosen.clamp(max=-0.5)
    policy_rejected = policy_rejected.clamp(max=-0.5)

    prompt_lens = [2, 3, 1, 4, 2, 3]
    chosen_lens = [3, 5, 2, 7, 4, 1]
    rejected_lens = [4, 2, 6, 3, 5, 8]
    _, batch = collate(prompt_lens, chosen_lens, rejected_lens, seed=7)
    singles = [collate([p], [c], [r], seed=100 + i)[1]
               for i, (p, c, r) in enumerate(zip(prompt_lens, chosen_lens, rejected_lens))]

    specs = []
    for lt in ["sigmoid", "ipo", "hinge"]:
        for beta in [0.1, 0.5]:
            specs.append((lt, beta, 0.0))
            if lt == "sigmoid":
                specs.append((lt, beta, 0.2))
    for beta in [0.1, 0.5]:
        specs.append(("robust", beta, 0.2))

    cases = []
    for lt, beta, ls in specs:
        loss, gpc, gpr, metrics = run_case(lt, beta, ls, policy_chosen, policy_rejected,
                                           ref_chosen, ref_rejected, batch)
        losses, cr, rr_ = [], [], []
        for i in range(B):
            sl = slice(i, i + 1)
            li, _, _, mi = run_case(lt, beta, ls, policy_chosen[sl], policy_rejected[sl],
                                    ref_chosen[sl], ref_rejected[sl], singles[i])
            losses.append(li)
            cr.append(mi["rewards/chosen"])
            rr_.append(mi["rewards/rejected"])
        assert abs(sum(losses) / B - loss) < 1e-12 * max(1.0, abs(loss)), (lt, beta, ls)
        keep = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"]
        cases.append({
            "name": f"{lt}_beta{beta}_ls{ls}",
            "loss_type": lt, "beta": beta, "label_smoothing": ls,
            "loss": loss,
            "losses": losses,
            "chosen_rewards": cr,
            "rejected_rewards": rr_,
            "grad_policy_chosen_logps": gpc,
            "grad_policy_rejected_logps": gpr,
            "metrics": {k: metrics[k] for k in keep},
        })
    # sigmoid ignores label_smoothing in trl 1.16: say so in the fixture, and check it
    for beta in [0.1, 0.5]:
        a = next(c for c in cases if c["name"] == f"sigmoid_beta{beta}_ls0.0")
        b = next(c for c in cases if c["name"] == f"sigmoid_beta{beta}_ls0.2")
        assert a["losses"] == b["losses"] and a["grad_policy_chosen_logps"] == b["grad_policy_chosen_logps"]

    cm = batch["completion_mask"]
    inputs = {
        "B": B,
        "policy_chosen_logps": policy_chosen.tolist(),
        "policy_rejected_logps": policy_rejected.tolist(),
        "ref_chosen_logps": ref_chosen.tolist(),
        "ref_rejected_logps": ref_rejected.tolist(),
        "chosen_completion_lengths": cm[:B].sum(1).tolist(),
        "rejected_completion_lengths": cm[B:].sum(1).tolist(),
    }
    assert inputs["chosen_completion_lengths"] == chosen_lens
    assert inputs["rejected_completion_lengths"] == rejected_lens
    return inputs, cases


def part_model():
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    examples = [
        {"prompt_ids": [1, 5, 9, 13], "chosen_ids": [7, 21, 33, 2], "rejected_ids": [30, 11, 2]},
        {"prompt_ids": [1, 17, 4], "chosen_ids": [25, 8, 2], "rejected_ids": [14, 36, 19, 27, 2]},
    ]
    batch = DataCollatorForPreference(pad_token_id=0)(examples)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    labels=labels, fused_lm_head=True)
        per_token = out.log_probs[:, -(batch["input_ids"].size(1) - 1):]
        logps = per_token.sum(dim=1)
        # cross-check: plain forward, log_softmax, gather next tokens, sum over completion tokens
        logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        manual = (lp * batch["completion_mask"][:, 1:]).sum(1)
    assert torch.allclose(logps.double(), manual, atol=1e-4), (logps, manual)
    chosen, rejected = logps.chunk(2)

    # end-to-end: trl's _compute_loss on the real model, sigmoid, beta 0.1, ref log-probs in inputs
    ref_chosen = torch.tensor([-16.5, -12.25])
    ref_rejected = torch.tensor([-13.0, -19.75])
    s = make_self("sigmoid", 0.1, 0.0)
    inputs = dict(batch)
    inputs["ref_chosen_logps"] = ref_chosen
    inputs["ref_rejected_logps"] = ref_rejected
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(s, model, inputs, False)
    metrics = {k: v[-1] for k, v in s._metrics["train"].items()}

    return {
        "model_dir": "models/tests/fixtures/models/qwen2_tiny",
        "dtype": "float32",
        "pad_token_id": 0,
        "examples": examples,
        "input_ids": {"shape": list(batch["input_ids"].shape), "data": batch["input_ids"].flatten().tolist()},
        "attention_mask": {"shape": list(batch["attention_mask"].shape),
                           "data": batch["attention_mask"].flatten().tolist()},
        "completion_mask": {"shape": list(batch["completion_mask"].shape),
                            "data": batch["completion_mask"].flatten().tolist()},
        "per_token_logps": {"shape": list(per_token.shape), "data": per_token.flatten().tolist()},
        "chosen_logps": chosen.tolist(),
        "rejected_logps": rejected.tolist(),
        "compute_loss": {
            "loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0,
            "ref_chosen_logps": ref_chosen.tolist(),
            "ref_rejected_logps": ref_rejected.tolist(),
            "loss": loss.item(),
            "metrics": metrics,
        },
    }


def main():
    torch.manual_seed(0)
    inputs, cases = part_cases()
    model = part_model()
    doc = {
        "generator": "scripts/golden_dpo.py",
        "versions": {
            "trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__,
        },
        "source": "trl/trainer/dpo_trainer.py: DPOTrainer._compute_loss (loss, rewards, metrics, inline), "
                  "DataCollatorForPreference; trl/trainer/utils.py: add_fused_lm_head",
        "notes": [
            "dtype float64 for the cases (inputs exactly representable in float32); float32 for the model part",
            "loss = mean over pairs of per-pair loss; grads are d(mean loss)/d(policy logps)",
            "rewards = beta * (policy - ref) logps, detached; rewards/accuracies = mean(chosen_r > rejected_r) "
            "(strict >); rewards/margins = mean(chosen_r - rejected_r); logps/* = mean policy logps",
            "sigmoid: -logsigmoid(beta*d), d = (pc - rc) - (pr - rr); label_smoothing IGNORED by sigmoid in trl 1.16",
            "hinge: relu(1 - beta*d)",
            "ipo: (pc-rc)/len_c - (pr-rr)/len_r = d_avg; loss (d_avg - 1/(2*beta))^2, len = completion token "
            "count (clamp min 1): IPO is length-normalised in trl 1.16",
            "robust: (-(1-ls)*logsigmoid(beta*d) + ls*logsigmoid(-beta*d)) / (1 - 2*ls)",
            "model.per_token_logps: (2B, T-1), row-major, rows [chosen0, chosen1, rejected0, rejected1], "
            "position t = log p(input_ids[t+1] | <= t), 0 where completion_mask[t+1] == 0",
        ],
        "inputs": inputs,
        "cases": cases,
        "model": model,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes, {len(cases)} cases)")


if __name__ == "__main__":
    main()
