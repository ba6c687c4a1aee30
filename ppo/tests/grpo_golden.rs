//! GRPO's advantages and loss against trl 1.16 (`scripts/golden_grpo.py`: trl's own
//! `GRPOTrainer._generate_and_score_completions` and `_compute_loss` on fixed tensors):
//! every `scale_rewards`, two weighted reward functions and both aggregations; every
//! `loss_type` with and without the KL term, symmetric and DAPO's asymmetric clipping, with
//! gradient accumulation; the loss, its gradient and trl's logged statistics.

use lathe_ppo::grpo::{
    group_advantages, grpo_loss, Aggregation, GrpoLoss, LossSettings, ScaleRewards, TokenBatch,
};
use serde_json::Value;

fn golden() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/grpo_golden.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    let v = if v.get("data").is_some() {
        &v["data"]
    } else {
        v
    };
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// trl works in float32; lathe's host math in f64.
const TOL: f64 = 2e-6;

fn close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= TOL * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs trl {w}"
        );
    }
}

#[test]
fn advantages_match_trl_for_every_scaling_and_aggregation() {
    let g = golden();
    let a = &g["advantages"];
    let group = a["num_generations"].as_u64().unwrap() as usize;
    let runs = a["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 7);
    for run in runs {
        let name = run["name"].as_str().unwrap();
        let names: Vec<String> = run["reward_funcs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect();
        let per_func = floats(&run["rewards_per_func"]);
        let rewards: Vec<Vec<f64>> = per_func.chunks(names.len()).map(<[f64]>::to_vec).collect();
        let scale = match run["scale_rewards"].as_str().unwrap() {
            "group" => ScaleRewards::Group,
            "batch" => ScaleRewards::Batch,
            _ => ScaleRewards::None,
        };
        let aggregation = match run["multi_objective_aggregation"].as_str().unwrap() {
            "sum_then_normalize" => Aggregation::SumThenNormalize,
            _ => Aggregation::NormalizeThenSum,
        };
        let out = group_advantages(
            &rewards,
            &names,
            &floats(&run["reward_weights"]),
            group,
            scale,
            aggregation,
        )
        .unwrap();
        close(name, &out.advantages, &floats(&run["advantages"]));
        let want = run["metrics"].as_object().unwrap();
        assert_eq!(out.metrics.len(), want.len(), "{name}: {:?}", out.metrics);
        for (key, value) in &out.metrics {
            close(
                &format!("{name} {key}"),
                &[*value],
                &[want[key].as_f64().unwrap()],
            );
        }
    }
}

#[test]
fn the_loss_its_gradient_and_statistics_match_trl() {
    let g = golden();
    let l = &g["loss"];
    let (b, t) = (
        l["B"].as_u64().unwrap() as usize,
        l["T"].as_u64().unwrap() as usize,
    );
    let inputs = &l["inputs"];
    let (logps, old, reference) = (
        floats(&inputs["per_token_logps"]),
        floats(&inputs["old_per_token_logps"]),
        floats(&inputs["ref_per_token_logps"]),
    );
    let (mask, advantages) = (
        floats(&inputs["completion_mask"]),
        floats(&inputs["advantages"]),
    );
    let max_completion_length = l["config"]["max_completion_length"].as_u64().unwrap() as usize;
    let cases = l["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 20);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let settings = LossSettings {
            loss_type: match case["loss_type"].as_str().unwrap() {
                "grpo" => GrpoLoss::Grpo,
                "bnpo" => GrpoLoss::Bnpo,
                "dr_grpo" => GrpoLoss::DrGrpo,
                _ => GrpoLoss::Dapo,
            },
            beta: case["beta"].as_f64().unwrap(),
            epsilon_low: case["epsilon_low"].as_f64().unwrap(),
            epsilon_high: case["epsilon_high"].as_f64().unwrap(),
            max_completion_length,
            gradient_accumulation_steps: case["current_gradient_accumulation_steps"]
                .as_u64()
                .unwrap() as usize,
            steps_per_generation: case["steps_per_generation"].as_u64().unwrap() as usize,
            num_items_in_batch: case["num_items_in_batch"].as_u64().unwrap() as usize,
        };
        let out = grpo_loss(
            TokenBatch {
                rows: b,
                cols: t,
                logps: &logps,
                old_logps: &old,
                ref_logps: &reference,
                mask: &mask,
                advantages: &advantages,
            },
            &settings,
        );
        close(name, &[out.loss], &[case["loss"].as_f64().unwrap()]);
        close(
            &format!("{name} grad"),
            &out.grad,
            &floats(&case["grad_per_token_logps"]),
        );
        // trl also logs the entropy, which lathe does not compute (no entropies here).
        let want = case["metrics"].as_object().unwrap();
        assert_eq!(
            out.metrics.len(),
            want.len() - 1,
            "{name}: {:?}",
            out.metrics
        );
        for (key, value) in &out.metrics {
            close(
                &format!("{name} {key}"),
                &[*value],
                &[want[*key].as_f64().unwrap()],
            );
        }
    }
}

#[test]
fn groups_of_fewer_than_two_or_a_ragged_batch_are_refused() {
    let names = vec!["r".to_string()];
    let rows = vec![vec![1.0]; 6];
    for (g, n) in [(1, 6), (4, 6)] {
        let e = group_advantages(
            &rows[..n],
            &names,
            &[1.0],
            g,
            ScaleRewards::Group,
            Aggregation::SumThenNormalize,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("num_generations"), "{e}");
    }
}
