//! GRPO's rewards and advantages, as trl 1.16's `GRPOTrainer._generate_and_score_completions`
//! computes them from the completions' rewards: the reward functions' scores weighted and
//! summed (or each normalised first), then each completion's advantage is its reward
//! relative to the other completions of its prompt (the group), scaled by the group's (or
//! the batch's) standard deviation.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What divides the advantages (trl's `scale_rewards`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRewards {
    /// The group's standard deviation (GRPO's).
    Group,
    /// The whole batch's.
    Batch,
    /// None: the advantage is the reward minus the group mean (Dr. GRPO's).
    None,
}

/// How several reward functions combine (trl's `multi_objective_aggregation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Σ_f w_f r_f, then normalised.
    SumThenNormalize,
    /// Each function normalised within its group, Σ_f w_f z_f, then normalised over the batch.
    NormalizeThenSum,
}

/// trl's epsilon under the standard deviations.
const STD_EPS: f64 = 1e-4;

/// The advantages of a batch and the statistics trl logs with them.
#[derive(Clone, Debug, PartialEq)]
pub struct Advantages {
    /// One per completion, in the batch's order (the G completions of a prompt together).
    pub advantages: Vec<f64>,
    /// (trl name, value): `reward`, `reward_std`, `frac_reward_zero_std`,
    /// `rewards/<name>/mean`, `rewards/<name>/std`.
    pub metrics: Vec<(String, f64)>,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The unbiased (n - 1) standard deviation, as torch's `std`; NaN for one value.
fn std(v: &[f64]) -> f64 {
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() as f64 - 1.0)).sqrt()
}

/// Each value minus its group's mean, divided by `scale` (group: each group's std, batch:
/// the batch's, none: 1) plus trl's 1e-4.
fn normalize(values: &[f64], g: usize, scale: ScaleRewards) -> Vec<f64> {
    let batch_std = std(values);
    values
        .chunks(g)
        .flat_map(|group| {
            let (m, s) = (mean(group), std(group));
            group.iter().map(move |r| match scale {
                ScaleRewards::Group => (r - m) / (s + STD_EPS),
                ScaleRewards::Batch => (r - m) / (batch_std + STD_EPS),
                ScaleRewards::None => r - m,
            })
        })
        .collect()
}

/// The advantages of `rewards` (one row per completion, one column per reward function
/// named in `names`, weighted by `weights`), groups of `g` consecutive completions.
pub fn group_advantages(
    rewards: &[Vec<f64>],
    names: &[String],
    weights: &[f64],
    g: usize,
    scale: ScaleRewards,
    aggregation: Aggregation,
) -> Result<Advantages> {
    let funcs = names.len();
    if g < 2 || rewards.is_empty() || !rewards.len().is_multiple_of(g) {
        return Err(Error::GrpoConfig(format!(
            "{} completions do not form groups of num_generations {g} (>= 2)",
            rewards.len()
        )));
    }
    if weights.len() != funcs || rewards.iter().any(|r| r.len() != funcs) {
        return Err(Error::Shape(format!(
            "{funcs} reward functions, {} weights, rows of {:?} scores",
            weights.len(),
            rewards.first().map(Vec::len)
        )));
    }
    let column = |f: usize| -> Vec<f64> { rewards.iter().map(|r| r[f]).collect() };
    // trl's nansum: a function that did not score a completion (NaN) counts as 0.
    let weighted: Vec<f64> = rewards
        .iter()
        .map(|r| {
            r.iter()
                .zip(weights)
                .map(|(x, w)| if x.is_nan() { 0.0 } else { w * x })
                .sum()
        })
        .collect();
    let advantages = match aggregation {
        Aggregation::SumThenNormalize => normalize(&weighted, g, scale),
        Aggregation::NormalizeThenSum => {
            let per_func: Vec<Vec<f64>> = (0..funcs)
                .map(|f| normalize(&column(f), g, ScaleRewards::Group))
                .collect();
            let summed: Vec<f64> = (0..rewards.len())
                .map(|i| (0..funcs).map(|f| weights[f] * per_func[f][i]).sum())
                .collect();
            let (m, s) = (mean(&summed), std(&summed));
            summed.iter().map(|x| (x - m) / (s + STD_EPS)).collect()
        }
    };
    // The rows whose (group or batch) reward std is zero: their advantages are all 0.
    let zero_std_rows = match scale {
        ScaleRewards::Batch => {
            if std(&weighted).abs() <= 1e-8 {
                weighted.len()
            } else {
                0
            }
        }
        ScaleRewards::Group | ScaleRewards::None => weighted
            .chunks(g)
            .filter(|group| std(group).abs() <= 1e-8)
            .map(<[f64]>::len)
            .sum(),
    };
    let mut metrics = Vec::new();
    for (f, name) in names.iter().enumerate() {
        let values: Vec<f64> = column(f).into_iter().filter(|x| !x.is_nan()).collect();
        metrics.push((format!("rewards/{name}/mean"), mean(&values)));
        metrics.push((format!("rewards/{name}/std"), std(&values)));
    }
    metrics.push(("reward".into(), mean(&weighted)));
    metrics.push(("reward_std".into(), std(&weighted)));
    metrics.push((
        "frac_reward_zero_std".into(),
        zero_std_rows as f64 / weighted.len() as f64,
    ));
    Ok(Advantages {
        advantages,
        metrics,
    })
}
