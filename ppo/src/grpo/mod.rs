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
