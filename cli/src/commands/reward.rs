//! `lathe reward-train` (train a sentiment reward model on an encoder) and `lathe score`
//! (score texts with one).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lathe_reward::plan::Stored;
use lathe_reward::run::{train_into_on_ranks, TestSet};
use lathe_reward::train::prepare;
use lathe_reward::{data, LoadOptions, LoraSettings, Pooling, RewardModel, TrainConfig};

use crate::config_file::{read_toml, settings};
use crate::device::{self, DeviceArg};
use crate::model_args::PreflightArgs;
use crate::texts::read_texts;

#[derive(clap::Args, Debug)]
pub struct RewardTrainArgs {
    /// The encoder: a HF BERT or DistilBERT directory (config.json, model.safetensors,
    /// tokenizer.json), e.g. all-MiniLM-L6-v2.
    #[arg(long, value_name = "DIR")]
    pub encoder: PathBuf,
    /// Labelled text: .jsonl / .json records {"text", "label": 0|1} ("class" also read),
    /// Parquet, or Arrow (.arrow: HF datasets' files, or a save_to_disk folder) with
    /// text/sentence and label columns (see --text-field, --label-field). Repeatable.
    #[arg(long, value_name = "FILE", required = true)]
    pub data: Vec<PathBuf>,
    /// Where to write the reward model (must not exist, or be empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Labelled files to report accuracy on after training (not used for training).
    #[arg(long, value_name = "FILE")]
    pub test_data: Vec<PathBuf>,
    #[command(flatten)]
    pub settings: RewardSettings,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Accept a software GPU adapter (lavapipe).
    #[arg(long)]
    pub allow_software_gpu: bool,
    #[command(flatten)]
    pub preflight: PreflightArgs,
    /// A TOML file of the training settings (the flag names with underscores: epochs,
    /// batch_size, lr, weight_decay, val_fraction, patience, seed, pooling, lora, lora_r,
    /// lora_alpha, lora_targets, lora_lr, lora_epochs, lora_batch_size, text_field,
    /// label_field); flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

settings! {
    /// reward-train's settings (flags and `--config` keys); unset ones are lathe-reward's
    /// `TrainConfig::default()`'s.
    pub struct RewardSettings => RewardTrainSettings {
        /// Head-stage epochs (the encoder runs once; epochs over cached states are cheap).
        epochs: usize,
        batch_size: usize,
        /// Head learning rate (AdamW).
        lr: f32,
        weight_decay: f32,
        /// Fraction of the data held out for loss/accuracy per epoch and early stopping.
        val_fraction: f32,
        /// Epochs without a better held-out loss before stopping (0: never); the LoRA stage
        /// uses at most 2.
        patience: usize,
        seed: u64,
        /// Pooling of the head: mean (over the text's tokens) or first (`[CLS]`).
        pooling: String,
        /// Also train LoRA adapters on the encoder (after the head stage), merged on save.
        #[arg(num_args = 0..=1, default_missing_value = "true")]
        lora: bool,
        lora_r: usize,
        lora_alpha: f64,
        /// Comma-separated module names (default: query,value for BERT; q_lin,v_lin for
        /// DistilBERT).
        #[arg(value_delimiter = ',')]
        lora_targets: Vec<String>,
        lora_lr: f32,
        lora_epochs: usize,
        lora_batch_size: usize,
        /// The text column (JSON field) of --data and --test-data; with the default, text,
        /// a sentence column is read too.
        text_field: String,
        /// The label column (JSON field); with the default, label, a class field is read
        /// too.
        label_field: String,
    }
}

/// The training settings in full, as train_report.json records them: lathe-reward's
/// `TrainConfig` in the flags' terms.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RewardTrainSettings {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub val_fraction: f32,
    pub patience: usize,
    pub seed: u64,
    pub pooling: String,
    pub lora: bool,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_targets: Vec<String>,
    pub lora_lr: f32,
    pub lora_epochs: usize,
    pub lora_batch_size: usize,
    #[serde(default = "default_text_field")]
    pub text_field: String,
    #[serde(default = "default_label_field")]
    pub label_field: String,
}

fn default_text_field() -> String {
    data::TEXT_COLUMN.into()
}

fn default_label_field() -> String {
    data::LABEL_COLUMN.into()
}

impl Default for RewardTrainSettings {
    /// `TrainConfig::default()`, LoRA's settings `LoraSettings::default()` (off).
    fn default() -> Self {
        let (config, lora) = (TrainConfig::default(), LoraSettings::default());
        RewardTrainSettings {
            epochs: config.epochs,
            batch_size: config.batch_size,
            lr: config.lr,
            weight_decay: config.weight_decay,
            val_fraction: config.val_fraction,
            patience: config.patience,
            seed: config.seed,
            pooling: config.pooling.name().into(),
            lora: config.lora.is_some(),
            lora_r: lora.r,
            lora_alpha: lora.alpha,
            lora_targets: lora.targets,
            lora_lr: lora.lr,
            lora_epochs: lora.epochs,
            lora_batch_size: lora.batch_size,
            text_field: default_text_field(),
            label_field: default_label_field(),
        }
    }
}

/// The `--help` text after the flags: the defaults, as a `--config` file would set them.
pub fn defaults_help() -> String {
    crate::config_file::defaults_help(&RewardTrainSettings::default())
}

impl RewardTrainArgs {
    /// The defaults, under the `--config` file's settings, under the flags.
    pub fn settings(&self) -> Result<RewardTrainSettings> {
        let file: RewardSettings = match &self.config {
            Some(path) => read_toml(path, "reward-train config")?,
            None => RewardSettings::default(),
        };
        let mut settings = RewardTrainSettings::default();
        self.settings.clone().over(file).apply_to(&mut settings);
        Ok(settings)
    }
}

#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    /// The reward model directory (from `lathe reward-train`, or a HF
    /// DistilBertForSequenceClassification directory with tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub reward: PathBuf,
    /// Texts to score.
    pub texts: Vec<String>,
    /// A file of texts: plain text (one per line), .jsonl, .json, Parquet or Arrow (with
    /// --field).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The JSON field holding the text.
    #[arg(long, default_value = "text")]
    pub field: String,
    /// The label whose raw logit is the reward (default: the positive one).
    #[arg(long)]
    pub label: Option<String>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// One JSON object per line ({"score", "text"}) instead of `score<TAB>text`.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    #[arg(long)]
    pub allow_software_gpu: bool,
}

fn load_all(paths: &[PathBuf], settings: &RewardTrainSettings) -> Result<Vec<data::Example>> {
    let mut all = Vec::new();
    for path in paths {
        let loaded = data::load_columns(path, &settings.text_field, &settings.label_field)?;
        eprintln!(
            "{}: {} examples{}",
            path.display(),
            loaded.examples.len(),
            if loaded.skipped > 0 {
                format!(" ({} blank records skipped)", loaded.skipped)
            } else {
                String::new()
            }
        );
        all.extend(loaded.examples);
    }
    Ok(all)
}

fn check_out(out: &Path) -> Result<()> {
    crate::output::check_new_dir(out)
}

pub fn train_config(args: &RewardTrainSettings) -> Result<TrainConfig> {
    Ok(TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        weight_decay: args.weight_decay,
        val_fraction: args.val_fraction,
        patience: args.patience,
        seed: args.seed,
        pooling: Pooling::parse(&args.pooling)?,
        lora: args.lora.then(|| LoraSettings {
            r: args.lora_r,
            alpha: args.lora_alpha,
            targets: args.lora_targets.clone(),
            lr: args.lora_lr,
            epochs: args.lora_epochs,
            batch_size: args.lora_batch_size,
        }),
    })
}

/// What reward training reads: the encoder and the labelled files.
#[derive(Clone, Debug)]
pub struct RewardInputs {
    /// A HF BERT or DistilBERT directory.
    pub encoder: PathBuf,
    /// Labelled files to train on.
    pub data: Vec<PathBuf>,
    /// Labelled files to report accuracy on after training.
    pub test_data: Vec<PathBuf>,
}

/// A reward training ready to run: the settings checked, the data read and tokenized, the
/// encoder not yet loaded (so its memory can be planned first).
pub struct RewardJob {
    inputs: RewardInputs,
    settings: RewardTrainSettings,
    prepared: lathe_reward::train::Prepared,
    tests: Vec<(PathBuf, Vec<data::Example>)>,
}

impl RewardJob {
    /// Reads and tokenizes the data of `inputs` for `settings`.
    pub fn prepare(inputs: &RewardInputs, settings: &RewardTrainSettings) -> Result<RewardJob> {
        let config = train_config(settings)?;
        let examples = load_all(&inputs.data, settings)?;
        let tests = inputs
            .test_data
            .iter()
            .map(|p| Ok((p.clone(), load_all(std::slice::from_ref(p), settings)?)))
            .collect::<Result<Vec<_>>>()?;
        // The data is tokenized before the encoder loads, so the plan knows every batch's
        // length.
        let prepared = prepare(&inputs.encoder, &examples, &config)
            .with_context(|| format!("preparing to train on {}", inputs.encoder.display()))?;
        Ok(RewardJob {
            inputs: inputs.clone(),
            settings: settings.clone(),
            prepared,
            tests,
        })
    }

    /// Trains on `device`, evaluates on the test files, and writes the reward model,
    /// metrics.jsonl and train_report.json into `out` (whole or not at all):
    /// `lathe_reward::run::train_into_on_ranks` on this job's ranks, with progress on stderr (rank 0).
    pub fn train(self, device: &lathe_core::Device, out: &Path) -> Result<()> {
        let tests: Vec<TestSet> = self
            .tests
            .into_iter()
            .map(|(path, examples)| (path.display().to_string(), examples))
            .collect();
        let collective = crate::parallel::collective();
        let writer = collective.is_writer();
        let mut on_epoch = |s: &lathe_reward::EpochStats| {
            if !writer {
                return;
            }
            eprintln!(
                "{} epoch {:3}: train loss {:.4} acc {:.4} | held-out loss {:.4} acc {:.4} ({:.1}s)",
                s.stage, s.epoch, s.train_loss, s.train_accuracy, s.val_loss, s.val_accuracy, s.seconds
            );
        };
        let settings = serde_json::to_value(&self.settings)?;
        let run = train_into_on_ranks(
            out,
            self.prepared,
            &tests,
            settings,
            device,
            &mut on_epoch,
            &*collective,
        )
        .with_context(|| {
            format!(
                "training on {} into {}",
                self.inputs.encoder.display(),
                out.display()
            )
        })?;
        if !writer {
            return Ok(());
        }
        for (name, eval) in &run.tests {
            eprintln!(
                "test {name}: accuracy {:.4}, loss {:.4} ({} examples)",
                eval.accuracy, eval.loss, eval.examples
            );
        }
        eprintln!(
            "saved the reward model to {} (best head epoch {}{})",
            out.display(),
            run.report.best_head_epoch,
            run.report
                .best_lora_epoch
                .map(|e| format!(", best LoRA epoch {e}"))
                .unwrap_or_default()
        );
        Ok(())
    }

    /// Plans the training's memory from the tokenized data and the encoder's config, and
    /// refuses it when it will not fit `budget` on `device`.
    fn preflight(&self, args: &PreflightArgs, device: DeviceArg) -> Result<()> {
        if args.budget(device)?.is_none() {
            return Ok(());
        }
        let test_texts: Vec<&str> = self
            .tests
            .iter()
            .flat_map(|(_, examples)| examples.iter().map(|e| e.text.as_str()))
            .collect();
        let elem_bytes = match crate::commands::plan::checkpoint_of(&self.inputs.encoder)? {
            lathe_models::plan::Checkpoint::Safetensors { elem_bytes } => elem_bytes,
            lathe_models::plan::Checkpoint::Gguf { .. } => 4,
        };
        let stored = Stored {
            elem_bytes,
            on_gpu: device == DeviceArg::Gpu,
        };
        let prepared = &self.prepared;
        let mut plan = prepared.memory_plan(prepared.token_lengths(&test_texts)?, stored);
        if !stored.on_gpu {
            let test_bytes: u64 = test_texts.iter().map(|t| t.len() as u64 + 32).sum();
            plan.data = plan.data.saturating_add(test_bytes);
        }
        let mut advice = Vec::new();
        if prepared.train_config().lora.is_some() {
            advice.push("a smaller --lora-batch-size, or no --lora (the head alone)");
        }
        advice.push("less data, or shorter texts");
        args.check(&plan, device, &advice).with_context(|| {
            format!(
                "memory plan of training on {}",
                self.inputs.encoder.display()
            )
        })
    }
}

/// `lathe reward-train`: trains, saves, writes metrics.jsonl and train_report.json into
/// `--out`.
pub fn run_train(args: &RewardTrainArgs) -> Result<()> {
    check_out(&args.out)?;
    let inputs = RewardInputs {
        encoder: args.encoder.clone(),
        data: args.data.clone(),
        test_data: args.test_data.clone(),
    };
    let job = RewardJob::prepare(&inputs, &args.settings()?)?;
    job.preflight(&args.preflight, args.device)?;
    let device = device::open(args.device, args.allow_software_gpu)?;
    job.train(&device, &args.out)
}

/// Scores the texts of the arguments and/or `--file`; writes one line per text to `out`.
pub fn score(args: &ScoreArgs, out: &mut dyn Write) -> Result<()> {
    let mut texts = args.texts.clone();
    if let Some(file) = &args.file {
        texts.extend(read_texts(file, &args.field)?);
    }
    if texts.is_empty() {
        bail!("no texts to score: give them as arguments or with --file");
    }
    let device = device::open(args.device, args.allow_software_gpu)?;
    let options = LoadOptions {
        reward_label: args.label.clone(),
        batch_size: args.batch_size,
    };
    let model = RewardModel::load_with(&args.reward, &device, &options)
        .with_context(|| format!("loading the reward model {}", args.reward.display()))?;
    let start = Instant::now();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let scores = model.score_texts(&refs)?;
    let seconds = start.elapsed().as_secs_f64();
    for (text, score) in texts.iter().zip(&scores) {
        if args.json {
            writeln!(out, "{}", serde_json::json!({"score": score, "text": text}))?;
        } else {
            writeln!(out, "{score:.6}\t{}", text.replace(['\n', '\t'], " "))?;
        }
    }
    eprintln!(
        "scored {} texts ({} logit) on {} in {:.3}s: {:.1} texts/s",
        texts.len(),
        model.reward_label(),
        device.name(),
        seconds,
        texts.len() as f64 / seconds.max(1e-9)
    );
    Ok(())
}

pub fn run_score(args: &ScoreArgs) -> Result<()> {
    score(args, &mut std::io::stdout().lock())
}
