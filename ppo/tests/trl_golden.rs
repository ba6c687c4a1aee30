//! lathe-ppo against trl 0.11.4's own functions on fixed tensors (scripts/golden_ppo.py,
//! ppo/tests/fixtures): the masked statistics and whitening, per-token rewards, GAE
//! advantages and returns (three settings), the minibatch loss and its statistics, entropy,
//! and the KL controllers. Tolerance 1e-5.

use std::path::PathBuf;

use lathe_core::testing::{assert_close, Tolerance};
use lathe_core::{Device, Tensor};
use lathe_ppo::loss::{ppo_loss, RolloutBatch};
use lathe_ppo::math::{
    compute_advantages, compute_rewards, entropy_of_logits, masked_mean, masked_var, masked_whiten,
    Grid, KlController, KlPenalty,
};
use lathe_ppo::PpoConfig;

const TOL: Tolerance = Tolerance::new(1e-5, 1e-5);

struct Golden(Vec<(String, Tensor)>);

impl Golden {
    fn load() -> Golden {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ppo_golden.safetensors");
        Golden(lathe_core::safetensors::load(&path, &Device::Cpu).unwrap())
    }
    fn tensor(&self, key: &str) -> &Tensor {
        &self
            .0
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("no {key}"))
            .1
    }
    fn f32s(&self, key: &str) -> Vec<f32> {
        self.tensor(key).to_vec_f32().unwrap()
    }
    fn scalar(&self, key: &str) -> f32 {
        self.f32s(key)[0]
    }
    fn grid(&self, key: &str) -> Grid {
        let t = self.tensor(key);
        Grid::new(t.shape()[0], t.shape()[1], t.to_vec_f32().unwrap()).unwrap()
    }
}

fn close(got: f32, want: f32, what: &str) {
    assert!(
        (got - want).abs() <= 1e-5 + 1e-5 * want.abs(),
        "{what}: {got} vs trl {want}"
    );
}

#[test]
fn masked_statistics_and_whitening() {
    let g = Golden::load();
    let (x, mask) = (g.grid("wh.x"), g.grid("wh.mask"));
    close(
        masked_mean(&x, &mask),
        g.scalar("wh.masked_mean"),
        "masked_mean",
    );
    close(
        masked_var(&x, &mask, true).unwrap(),
        g.scalar("wh.masked_var"),
        "masked_var",
    );
    close(
        masked_var(&x, &mask, false).unwrap(),
        g.scalar("wh.masked_var_biased"),
        "masked_var biased",
    );
    assert_close(
        &masked_whiten(&x, &mask, true).unwrap().data,
        &g.f32s("wh.masked_whiten"),
        TOL,
    );
    assert_close(
        &masked_whiten(&x, &mask, false).unwrap().data,
        &g.f32s("wh.masked_whiten_noshift"),
        TOL,
    );
    // trl's plain `whiten` is the masked one over every element.
    let all = Grid::new(x.rows, x.cols, vec![1.0; x.data.len()]).unwrap();
    assert_close(
        &masked_whiten(&x, &all, true).unwrap().data,
        &g.f32s("wh.whiten"),
        TOL,
    );
    assert_close(
        &masked_whiten(&x, &all, false).unwrap().data,
        &g.f32s("wh.whiten_noshift"),
        TOL,
    );
}

#[test]
fn rewards_and_advantages() {
    let g = Golden::load();
    let mask = g.grid("mask");
    let (rewards, non_score, kls) = compute_rewards(
        &g.f32s("scores"),
        &g.grid("old_logprobs"),
        &g.grid("ref_logprobs"),
        &mask,
        0.2,
        KlPenalty::Kl,
    )
    .unwrap();
    assert_close(&kls.data, &g.f32s("kls"), TOL);
    assert_close(&non_score.data, &g.f32s("non_score_reward"), TOL);
    assert_close(&rewards.data, &g.f32s("rewards"), TOL);
    for (set, gamma, lam, whiten) in [
        ("g1_l095", 1.0, 0.95, false),
        ("g09_l08", 0.9, 0.8, false),
        ("g1_l095_wr", 1.0, 0.95, true),
    ] {
        let (values, advantages, returns) =
            compute_advantages(&g.grid("values"), &rewards, &mask, gamma, lam, whiten).unwrap();
        assert_close(&values.data, &g.f32s(&format!("adv_{set}.values")), TOL);
        assert_close(
            &advantages.data,
            &g.f32s(&format!("adv_{set}.advantages")),
            TOL,
        );
        assert_close(&returns.data, &g.f32s(&format!("adv_{set}.returns")), TOL);
    }
}

#[test]
fn minibatch_loss_and_statistics() {
    let g = Golden::load();
    let mask = g.grid("mask");
    let (values, advantages, returns) = (
        g.grid("adv_g1_l095.values"),
        g.grid("adv_g1_l095.advantages"),
        g.grid("adv_g1_l095.returns"),
    );
    let old = g.grid("old_logprobs");
    let batch = RolloutBatch {
        old_logprobs: &old,
        values: &values,
        advantages: &advantages,
        returns: &returns,
        mask: &mask,
    };
    // Entropy of the policy's logits, per position.
    let logits = g.f32s("logits");
    let v = g.tensor("logits").shape()[2];
    let entropy = Grid::new(
        mask.rows,
        mask.cols,
        logits.chunks(v).map(entropy_of_logits).collect(),
    )
    .unwrap();
    assert_close(&entropy.data, &g.f32s("ent.of_logits"), TOL);
    let big = g.f32s("ent.logits");
    let big_entropy: Vec<f32> = big.chunks(v).map(entropy_of_logits).collect();
    assert_close(&big_entropy, &g.f32s("ent.of_ent_logits"), TOL);

    let config = PpoConfig::default();
    let logprobs = g.tensor("logprobs").clone().into_variable();
    let vpreds = g.tensor("vpreds").clone().into_variable();
    let (loss, stats) = ppo_loss(&config, &batch, &logprobs, &vpreds, &entropy).unwrap();
    close(stats.loss_policy, g.scalar("loss.pg_loss"), "pg_loss");
    close(
        config.vf_coef * stats.loss_value,
        g.scalar("loss.vf_loss_scaled"),
        "vf_loss",
    );
    close(
        loss.to_scalar().unwrap(),
        g.scalar("loss_stats.loss/total"),
        "total",
    );
    for (name, got) in [
        ("loss/policy", stats.loss_policy),
        ("loss/value", stats.loss_value),
        ("loss/total", stats.loss_total),
        ("policy/entropy", stats.policy_entropy),
        ("policy/approxkl", stats.policy_approxkl),
        ("policy/policykl", stats.policy_policykl),
        ("policy/clipfrac", stats.policy_clipfrac),
        ("policy/advantages_mean", stats.policy_advantages_mean),
        ("returns/mean", stats.returns_mean),
        ("returns/var", stats.returns_var),
        ("val/vpred", stats.val_vpred),
        ("val/error", stats.val_error),
        ("val/clipfrac", stats.val_clipfrac),
        ("val/mean", stats.val_mean),
        ("val/var", stats.val_var),
    ] {
        close(got, g.scalar(&format!("loss_stats.{name}")), name);
    }
    // The loss back-propagates into both the log-probs and the value predictions.
    let grads = loss.backward().unwrap();
    assert!(grads.get(&logprobs).is_some() && grads.get(&vpreds).is_some());
}

#[test]
fn kl_controllers() {
    let g = Golden::load();
    let currents = g.f32s("kl.adaptive_current");
    let steps = g.f32s("kl.adaptive_n_steps");
    let want_adaptive = g.f32s("kl.adaptive_coef");
    let want_fixed = g.f32s("kl.fixed_coef");
    let mut adaptive = KlController::Adaptive {
        value: 0.2,
        target: 6.0,
        horizon: 10000.0,
    };
    let mut fixed = KlController::Fixed { value: 0.2 };
    for i in 0..currents.len() {
        adaptive.update(currents[i], steps[i] as usize);
        fixed.update(currents[i], steps[i] as usize);
        close(adaptive.value(), want_adaptive[i], "adaptive kl coef");
        close(fixed.value(), want_fixed[i], "fixed kl coef");
    }
}

/// trl's `record_step_stats` over one minibatch (the golden's loss) and its KL update.
#[test]
fn step_statistics() {
    use lathe_ppo::trainer::{record_step_stats, StepRecord};
    let g = Golden::load();
    let mask = g.grid("mask");
    let (_, non_score, kls) = compute_rewards(
        &g.f32s("scores"),
        &g.grid("old_logprobs"),
        &g.grid("ref_logprobs"),
        &mask,
        0.2,
        KlPenalty::Kl,
    )
    .unwrap();
    let (values, advantages, returns) = (
        g.grid("adv_g1_l095.values"),
        g.grid("adv_g1_l095.advantages"),
        g.grid("adv_g1_l095.returns"),
    );
    let old = g.grid("old_logprobs");
    let batch = RolloutBatch {
        old_logprobs: &old,
        values: &values,
        advantages: &advantages,
        returns: &returns,
        mask: &mask,
    };
    let logits = g.f32s("logits");
    let entropy = Grid::new(
        mask.rows,
        mask.cols,
        logits.chunks(16).map(entropy_of_logits).collect(),
    )
    .unwrap();
    let (_, loss_stats) = ppo_loss(
        &PpoConfig::default(),
        &batch,
        &g.tensor("logprobs").clone(),
        &g.tensor("vpreds").clone(),
        &entropy,
    )
    .unwrap();
    let scores = g.f32s("scores");
    let stats = record_step_stats(&StepRecord {
        scores: &scores,
        logprobs: &old,
        kls: &kls,
        non_score: &non_score,
        mask: &mask,
        kl_coef: 0.2,
        query_lens: vec![1, 3, 4, 2],
        response_lens: vec![10, 6, 3, 1],
        minibatches: std::slice::from_ref(&loss_stats),
    });
    for name in [
        "objective/kl",
        "objective/entropy",
        "objective/kl_coef",
        "ppo/mean_non_score_reward",
        "ppo/mean_scores",
        "ppo/std_scores",
        "ppo/loss/policy",
        "ppo/loss/total",
        "ppo/loss/value",
        "ppo/policy/advantages_mean",
        "ppo/policy/approxkl",
        "ppo/policy/clipfrac",
        "ppo/policy/entropy",
        "ppo/policy/policykl",
        "ppo/returns/mean",
        "ppo/returns/var",
        "ppo/val/clipfrac",
        "ppo/val/error",
        "ppo/val/mean",
        "ppo/val/var",
        "ppo/val/vpred",
        "ppo/val/var_explained",
    ] {
        close(stats[name], g.scalar(&format!("step_stats.{name}")), name);
    }
    let mut kl = KlController::Adaptive {
        value: 0.2,
        target: 6.0,
        horizon: 10000.0,
    };
    kl.update(stats["objective/kl"], 4);
    close(
        kl.value(),
        g.scalar("step_stats.kl_coef_after"),
        "kl coef after the step",
    );
}
