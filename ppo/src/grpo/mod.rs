//! GRPO (Shao et al., DeepSeekMath) as trl 1.16's `GRPOTrainer`: G completions per prompt,
//! rewards from reward functions, group-relative advantages, the clipped surrogate with a
//! k3 KL term to the reference (the same model with its adapters off), and no value head.
//!
//! - [`advantages`]: rewards to advantages (`scale_rewards`, several weighted functions).
//! - [`loss`]: the per-token loss and its gradient (`loss_type` grpo, bnpo, dr_grpo, dapo).
//! - [`trainer`]: [`GrpoTrainer::step`]: generate G completions per prompt, score, advantages,
//!   `num_iterations` optimizer steps over the batch.
//! - [`run`]: [`GrpoRun`], the trainer in a run folder (metrics, samples, checkpoints at
//!   generation-batch boundaries, exact resume).

pub mod advantages;
pub mod loss;
pub mod run;
pub mod trainer;

pub use advantages::{group_advantages, Advantages, Aggregation, ScaleRewards};
pub use loss::{grpo_loss, GrpoLoss, GrpoLossOutput, LossSettings, TokenBatch};
pub use run::{GrpoRun, GrpoSummary};
pub use trainer::{GrpoConfig, GrpoStepStats, GrpoTrainer, REWARD_FUNCS};

/// `FromStr` for a settings enum by its serde name ("dr_grpo", "group"), for flags.
macro_rules! from_serde_name {
    ($ty:ty, $key:literal, $names:literal) => {
        impl std::str::FromStr for $ty {
            type Err = crate::Error;

            fn from_str(name: &str) -> crate::Result<$ty> {
                serde_json::from_value(serde_json::Value::String(name.into())).map_err(|_| {
                    crate::Error::GrpoConfig(format!(
                        concat!($key, " {:?} is not one of ", $names),
                        name
                    ))
                })
            }
        }
    };
}

from_serde_name!(GrpoLoss, "loss_type", "grpo, bnpo, dr_grpo, dapo");
from_serde_name!(ScaleRewards, "scale_rewards", "group, batch, none");
from_serde_name!(
    Aggregation,
    "multi_objective_aggregation",
    "sum_then_normalize, normalize_then_sum"
);
