//! A reward model's training as a run: train ([`crate::train::train_prepared`]), measure
//! on held-out test files, and write the output folder whole (lathe-train's
//! [`build_dir`]): the reward model (`config.json`, `model.safetensors`, `tokenizer.json`),
//! `metrics.jsonl` (a line per epoch) and `train_report.json`. The folder is a complete
//! reward model or absent; training takes minutes, so it has no checkpoints to resume.

use std::path::Path;

use lathe_core::collective::check_same_inputs;
use lathe_core::{Collective, Device, Solo};
use lathe_train::run_dir::{append_jsonl, build_dir};
use serde_json::json;

use crate::train::{evaluate_on_ranks, train_prepared_on_ranks, Evaluation, Prepared};
use crate::{EpochStats, Example, Result, RewardModel, TrainReport};

/// Labelled examples to measure the trained model on, under a name (their file's path).
pub type TestSet = (String, Vec<Example>);

/// What a finished reward training did.
#[derive(Debug)]
pub struct RewardRun {
    /// The trained model (best epochs' weights).
    pub model: RewardModel,
    /// What training did, epoch by epoch.
    pub report: TrainReport,
    /// Per test set (in order): its name and the model's loss and accuracy on it.
    pub tests: Vec<(String, Evaluation)>,
}

/// Trains `prepared` on `device` (`on_epoch` sees every epoch's figures), evaluates on
/// `tests`, and writes the run into `out` (which must not exist, or be empty).
/// `settings` is recorded in train_report.json as given (the caller's view of them).
pub fn train_into(
    out: &Path,
    prepared: Prepared,
    tests: &[TestSet],
    settings: serde_json::Value,
    device: &Device,
    on_epoch: &mut dyn FnMut(&EpochStats),
) -> Result<RewardRun> {
    train_into_on_ranks(out, prepared, tests, settings, device, on_epoch, &Solo)
}

/// [`train_into`] as one of the ranks of `collective`
/// ([`crate::train::train_prepared_on_ranks`]): every rank must be given the same settings,
/// encoder and data (checked: a rank that differs from rank 0 is refused, naming what
/// differs); only rank 0 writes `out`.
pub fn train_into_on_ranks(
    out: &Path,
    prepared: Prepared,
    tests: &[TestSet],
    settings: serde_json::Value,
    device: &Device,
    on_epoch: &mut dyn FnMut(&EpochStats),
    collective: &dyn Collective,
) -> Result<RewardRun> {
    lathe_train::run_dir::check_new_dir(out)?;
    let encoder = prepared.dir.display().to_string();
    check_same_inputs(
        collective,
        &[
            ("settings", settings.to_string()),
            ("encoder", encoder.clone()),
            ("data", prepared.fingerprint()),
            ("output folder", out.display().to_string()),
        ],
    )?;
    let (model, report) = train_prepared_on_ranks(prepared, device, on_epoch, collective)?;
    let tests = tests
        .iter()
        .map(|(name, examples)| {
            Ok((
                name.clone(),
                evaluate_on_ranks(&model, examples, collective)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let test_json: serde_json::Map<String, serde_json::Value> = tests
        .iter()
        .map(|(name, e)| {
            let figures = json!({"accuracy": e.accuracy, "loss": e.loss, "examples": e.examples});
            (name.clone(), figures)
        })
        .collect();
    let summary = json!({
        "encoder": encoder,
        "train_examples": report.train_examples,
        "val_examples": report.val_examples,
        "truncated": report.truncated,
        "best_head_epoch": report.best_head_epoch,
        "best_lora_epoch": report.best_lora_epoch,
        "lora_layers": report.lora_layers,
        "stopped_early": report.stopped_early,
        "test": test_json,
        "settings": settings,
    });
    if !collective.is_writer() {
        return Ok(RewardRun {
            model,
            report,
            tests,
        });
    }
    build_dir(out, |dir| -> Result<()> {
        model.save(dir)?;
        let mut metrics = std::fs::File::create(dir.join("metrics.jsonl"))?;
        for epoch in &report.epochs {
            append_jsonl(&mut metrics, &epoch.to_json())?;
        }
        metrics.sync_all()?;
        let text = serde_json::to_string_pretty(&summary).map_err(lathe_train::Error::from)?;
        std::fs::write(dir.join("train_report.json"), text)?;
        Ok(())
    })?;
    Ok(RewardRun {
        model,
        report,
        tests,
    })
}
