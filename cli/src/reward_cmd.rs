//! `lathe reward-train` (train a sentiment reward model on an encoder) and `lathe score`
//! (score texts with one).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lathe_reward::plan::Stored;
use lathe_reward::train::{evaluate, prepare, train_prepared};
use lathe_reward::{data, LoadOptions, LoraSettings, Pooling, RewardModel, TrainConfig};

use crate::config_file::{flags_win, read_toml};
use crate::device::{self, DeviceArg};
use crate::model_args::PreflightArgs;
use crate::texts::read_texts;

#[derive(clap::Args, Debug)]
pub struct RewardTrainArgs {
    /// The encoder: a HF BERT or DistilBERT directory (config.json, model.safetensors,
    /// tokenizer.json), e.g. all-MiniLM-L6-v2.
    #[arg(long, value_name = "DIR")]
    pub encoder: PathBuf,
    /// Labelled text: .jsonl / .json records {"text", "label": 0|1} ("class" also read), or
    /// an Arrow IPC stream (.arrow) with sentence/text and label columns. Repeatable.
    #[arg(long, value_name = "FILE", required = true)]
    pub data: Vec<PathBuf>,
    /// Where to write the reward model (must not exist, or be empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Labelled files to report accuracy on after training (not used for training).
    #[arg(long, value_name = "FILE")]
    pub test_data: Vec<PathBuf>,
    /// Head-stage epochs (the encoder runs once; epochs over cached states are cheap).
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Head learning rate (AdamW).
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f32,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f32,
    /// Fraction of the data held out for loss/accuracy per epoch and early stopping.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f32,
    /// Epochs without a better held-out loss before stopping (0: never); the LoRA stage
    /// uses at most 2.
    #[arg(long, default_value_t = 10)]
    pub patience: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Pooling of the head: mean (over the text's tokens) or first ([CLS]).
    #[arg(long, default_value = "mean")]
    pub pooling: String,
    /// Also train LoRA adapters on the encoder (after the head stage), merged on save.
    #[arg(long)]
    pub lora: bool,
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// Comma-separated module names (default: query,value for BERT; q_lin,v_lin for
    /// DistilBERT).
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Vec<String>,
    #[arg(long, default_value_t = 5e-4)]
    pub lora_lr: f32,
    #[arg(long, default_value_t = 3)]
    pub lora_epochs: usize,
    #[arg(long, default_value_t = 16)]
    pub lora_batch_size: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Accept a software GPU adapter (lavapipe).
    #[arg(long)]
    pub allow_software_gpu: bool,
    #[command(flatten)]
    pub preflight: PreflightArgs,
    /// A TOML file of the training settings (the flag names with underscores: epochs,
    /// batch_size, lr, weight_decay, val_fraction, patience, seed, pooling, lora, lora_r,
    /// lora_alpha, lora_targets, lora_lr, lora_epochs, lora_batch_size); flags given on the
    /// command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The training settings of `lathe reward-train --config FILE.toml` (defaults as the flags').
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
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
}

impl Default for RewardTrainSettings {
    fn default() -> Self {
        RewardTrainSettings {
            epochs: 100,
            batch_size: 32,
            lr: 3e-3,
            weight_decay: 0.01,
            val_fraction: 0.1,
            patience: 10,
            seed: 0,
            pooling: "mean".into(),
            lora: false,
            lora_r: 8,
            lora_alpha: 16.0,
            lora_targets: Vec::new(),
            lora_lr: 5e-4,
            lora_epochs: 3,
            lora_batch_size: 16,
        }
    }
}

impl RewardTrainArgs {
    /// The `--config` file's settings with the flags given on the command line on top, or
    /// the flags alone.
    pub fn settings(&self, matches: Option<&clap::ArgMatches>) -> Result<RewardTrainSettings> {
        let flags = RewardTrainSettings {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            weight_decay: self.weight_decay,
            val_fraction: self.val_fraction,
            patience: self.patience,
            seed: self.seed,
            pooling: self.pooling.clone(),
            lora: self.lora,
            lora_r: self.lora_r,
            lora_alpha: self.lora_alpha,
            lora_targets: self.lora_targets.clone(),
            lora_lr: self.lora_lr,
            lora_epochs: self.lora_epochs,
            lora_batch_size: self.lora_batch_size,
        };
        let Some(path) = &self.config else {
            return Ok(flags);
        };
        let mut settings: RewardTrainSettings = read_toml(path, "reward-train config")?;
        flags_win!(
            matches,
            settings,
            flags,
            epochs,
            batch_size,
            lr,
            weight_decay,
            val_fraction,
            patience,
            seed,
            pooling,
            lora,
            lora_r,
            lora_alpha,
            lora_targets,
            lora_lr,
            lora_epochs,
            lora_batch_size
        );
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
    /// A file of texts: plain text (one per line), .jsonl or .json.
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
    /// One JSON object per line ({"score", "text"}) instead of "score<TAB>text".
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    #[arg(long)]
    pub allow_software_gpu: bool,
}

fn load_all(paths: &[PathBuf]) -> Result<Vec<data::Example>> {
    let mut all = Vec::new();
    for path in paths {
        let loaded = data::load(path)?;
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

/// Plans the training's memory from the tokenized data and the encoder's config, and refuses
/// it when it will not fit the budget (`--budget`, else this machine's RAM on the CPU).
fn preflight(
    args: &RewardTrainArgs,
    prepared: &lathe_reward::train::Prepared,
    tests: &[(PathBuf, Vec<data::Example>)],
) -> Result<()> {
    if args.preflight.budget(args.device)?.is_none() {
        return Ok(());
    }
    let test_texts: Vec<&str> = tests
        .iter()
        .flat_map(|(_, examples)| examples.iter().map(|e| e.text.as_str()))
        .collect();
    let elem_bytes = match crate::plan_cmd::checkpoint_of(&args.encoder)? {
        lathe_models::plan::Checkpoint::Safetensors { elem_bytes } => elem_bytes,
        lathe_models::plan::Checkpoint::Gguf { .. } => 4,
    };
    let stored = Stored {
        elem_bytes,
        on_gpu: args.device == DeviceArg::Gpu,
    };
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
    args.preflight
        .check(&plan, args.device, &advice)
        .with_context(|| format!("memory plan of training on {}", args.encoder.display()))
}

/// Trains, saves, writes metrics.jsonl and train_report.json into `--out`. `matches` are
/// the subcommand's parsed flags (to tell given flags from defaults with `--config`).
pub fn run_train(args: &RewardTrainArgs, matches: Option<&clap::ArgMatches>) -> Result<()> {
    check_out(&args.out)?;
    let settings = args.settings(matches)?;
    let config = train_config(&settings)?;
    let examples = load_all(&args.data)?;
    let tests = args
        .test_data
        .iter()
        .map(|p| Ok((p.clone(), load_all(std::slice::from_ref(p))?)))
        .collect::<Result<Vec<_>>>()?;
    // The data is tokenized before the encoder loads, so the plan knows every batch's length.
    let prepared = prepare(&args.encoder, &examples, &config)
        .with_context(|| format!("preparing to train on {}", args.encoder.display()))?;
    preflight(args, &prepared, &tests)?;
    let device = device::open(args.device, args.allow_software_gpu)?;
    let mut lines = Vec::new();
    let mut on_epoch = |s: &lathe_reward::EpochStats| {
        eprintln!(
            "{} epoch {:3}: train loss {:.4} acc {:.4} | held-out loss {:.4} acc {:.4} ({:.1}s)",
            s.stage, s.epoch, s.train_loss, s.train_accuracy, s.val_loss, s.val_accuracy, s.seconds
        );
        lines.push(s.to_json());
    };
    let (model, report) = train_prepared(prepared, &device, &mut on_epoch)
        .with_context(|| format!("training on {}", args.encoder.display()))?;
    let mut test_results = serde_json::Map::new();
    for (path, examples) in &tests {
        let eval = evaluate(&model, examples)?;
        eprintln!(
            "test {}: accuracy {:.4}, loss {:.4} ({} examples)",
            path.display(),
            eval.accuracy,
            eval.loss,
            eval.examples
        );
        test_results.insert(
            path.display().to_string(),
            serde_json::json!({"accuracy": eval.accuracy, "loss": eval.loss, "examples": eval.examples}),
        );
    }
    let summary = serde_json::json!({
        "encoder": args.encoder.display().to_string(),
        "train_examples": report.train_examples,
        "val_examples": report.val_examples,
        "truncated": report.truncated,
        "best_head_epoch": report.best_head_epoch,
        "best_lora_epoch": report.best_lora_epoch,
        "lora_layers": report.lora_layers,
        "stopped_early": report.stopped_early,
        "test": test_results,
        "settings": settings,
    });
    // Every file goes into a temporary folder renamed to --out once all are written: the
    // folder is a whole reward model or nothing.
    crate::output::build_dir(&args.out, |dir| {
        model.save(dir)?;
        let mut metrics = std::fs::File::create(dir.join("metrics.jsonl"))?;
        for line in &lines {
            crate::run_files::append_jsonl(&mut metrics, line)?;
        }
        metrics.sync_all()?;
        std::fs::write(
            dir.join("train_report.json"),
            serde_json::to_string_pretty(&summary)?,
        )?;
        Ok(())
    })
    .with_context(|| format!("writing the reward model to {}", args.out.display()))?;
    eprintln!(
        "saved the reward model to {} (best head epoch {}{})",
        args.out.display(),
        report.best_head_epoch,
        report
            .best_lora_epoch
            .map(|e| format!(", best LoRA epoch {e}"))
            .unwrap_or_default()
    );
    Ok(())
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
