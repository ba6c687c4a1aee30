//! `lathe plan`: the predicted peak memory of a job, by category, from a model's config.json
//! or GGUF metadata (no weights read; safetensors headers tell the stored dtype), and whether
//! it fits a budget. The training and generation commands run the same check first
//! ([`ModelArgs::preflight`](crate::model_args::ModelArgs::preflight)) and refuse a run
//! that will not fit.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lathe_core::safetensors::{SafetensorsFile, StoredDType};
use lathe_models::config::ModelConfig;
use lathe_models::gguf::GgufFile;
use lathe_models::gguf_model::config_from_gguf;
use lathe_models::linear::Precision;
use lathe_models::plan::{gib, plan, Checkpoint, Job, MemoryPlan, PlanSettings};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum JobArg {
    Generate,
    /// Log-probs of whole texts (`lathe eval`).
    Score,
    Sft,
    Ppo,
    /// `lathe reward-train` on a BERT/DistilBERT encoder directory: `--batch-size` is the
    /// LoRA batch and `--lora-r 0` the head alone; the texts are `--data` (tokenized as the
    /// run will), else `--examples` texts of `--seq-len` tokens.
    Reward,
}

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// A HF model directory, its config.json (the weights need not be there) or a GGUF file.
    #[arg(long, value_name = "DIR|config.json|FILE.gguf|ORG/NAME", value_parser = crate::model_args::model_path)]
    pub model: PathBuf,
    /// Plan for a GPU's memory instead of the host's (the budget is then required: wgpu
    /// does not report an adapter's memory).
    #[arg(long)]
    pub gpu: bool,
    /// The job to plan.
    #[arg(long, value_enum, default_value = "ppo")]
    pub job: JobArg,
    /// Sequences per batch (generation, SFT; the PPO batch).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Sequences per PPO minibatch (the trained batch).
    #[arg(long, default_value_t = 4)]
    pub mini_batch_size: usize,
    /// Tokens per sequence: prompt + new tokens, or the SFT block.
    #[arg(long, default_value_t = 24)]
    pub seq_len: usize,
    /// LoRA rank (0: no adapters).
    #[arg(long, default_value_t = 16)]
    pub lora_r: usize,
    /// Modules the adapters target, comma-separated (default: the architecture's).
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Vec<String>,
    /// Keep every block's activations (no gradient checkpointing).
    #[arg(long)]
    pub no_gradient_checkpointing: bool,
    /// LLM.int8 block weights.
    #[arg(long)]
    pub load_in_8bit: bool,
    /// f16 block weights.
    #[arg(long, conflicts_with = "load_in_8bit")]
    pub f16: bool,
    /// f16 token embedding and LM head.
    #[arg(long)]
    pub embeddings_f16: bool,
    /// The memory to fit in, e.g. 24GiB, 20GB, 512MiB (default: this machine's RAM).
    #[arg(long)]
    pub budget: Option<String>,
    /// `--job reward`: the labelled training data (as `lathe reward-train --data`).
    #[arg(long, value_name = "FILE")]
    pub data: Vec<PathBuf>,
    /// `--job reward` without `--data`: how many texts.
    #[arg(long, default_value_t = 1000)]
    pub examples: usize,
}

/// The config of a model path: a directory's config.json, a config.json itself, or a GGUF
/// file's metadata (its header only).
pub fn read_config(model: &Path) -> Result<ModelConfig> {
    if is_gguf(model) {
        let file = GgufFile::open_header(model)?;
        return config_from_gguf(&file)
            .with_context(|| format!("planning from {}", model.display()));
    }
    let path = if model.is_dir() {
        model.join("config.json")
    } else {
        model.to_path_buf()
    };
    ModelConfig::from_file(&path).with_context(|| format!("planning from {}", path.display()))
}

fn is_gguf(model: &Path) -> bool {
    model.is_file()
        && model
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// How the model at `model` is stored, for the plan of its loading: a GGUF file's size; the
/// element size of a directory's first 2-D weight (from the shard headers only); f16 for a
/// config.json alone.
pub fn checkpoint_of(model: &Path) -> Result<Checkpoint> {
    if is_gguf(model) {
        let file_bytes = std::fs::metadata(model)?.len();
        return Ok(Checkpoint::Gguf { file_bytes });
    }
    if !model.is_dir() {
        return Ok(Checkpoint::Safetensors { elem_bytes: 2 });
    }
    let mut shards: Vec<_> = std::fs::read_dir(model)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    shards.sort();
    for shard in shards {
        let file = SafetensorsFile::open(&shard)
            .with_context(|| format!("reading the header of {}", shard.display()))?;
        // A matrix of weights: integer buffers such as BERT's (1, 512) `position_ids` and
        // bitsandbytes' byte markers do not say how the weights are stored.
        let weight = file.names().find_map(|name| {
            file.info(name)
                .filter(|(_, shape)| shape.len() == 2)
                .and_then(|(dtype, _)| match dtype {
                    StoredDType::F32 => Some(4),
                    StoredDType::F16 | StoredDType::BF16 => Some(2),
                    StoredDType::I8 => Some(1),
                    StoredDType::U32 | StoredDType::U8 | StoredDType::Other => None,
                })
        });
        let Some(elem_bytes) = weight else {
            continue;
        };
        return Ok(Checkpoint::Safetensors { elem_bytes });
    }
    Ok(Checkpoint::Safetensors { elem_bytes: 2 })
}

/// The architecture's default LoRA targets (as `lathe sft` and `lathe ppo` pick them).
pub fn default_targets(config: &ModelConfig) -> Vec<String> {
    config
        .default_lora_targets()
        .iter()
        .map(|t| t.to_string())
        .collect()
}

/// A size with an optional unit: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (of 1024).
pub fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a size (e.g. 24GiB)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        other => bail!("{text:?}: unknown unit {other:?} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"),
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes <= 0.0 || bytes > 1e18 {
        bail!("{text:?}: a budget must be a positive size below 1 EB");
    }
    Ok(bytes as u64)
}

/// This machine's RAM (MemTotal of /proc/meminfo), when it can be read.
pub fn machine_ram() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The plan as a table with its total.
pub fn render(plan: &MemoryPlan) -> String {
    let mut out = String::new();
    for (name, bytes) in plan.rows() {
        out.push_str(&format!("  {name:<12} {:>12}\n", gib(bytes)));
    }
    let peak = if plan.loading > plan.working_set() {
        "loading peaks above the run"
    } else {
        "the run peaks above loading"
    };
    out.push_str(&format!(
        "  {:<12} {:>12}   (extra while loading; {peak})\n",
        "loading",
        gib(plan.loading)
    ));
    out.push_str(&format!("  {:<12} {:>12}\n", "total", gib(plan.total())));
    out
}

/// One line on what the plan predicts, which commands print before loading (the bench parses
/// its byte count to compare with the measured peak).
pub fn summary(plan: &MemoryPlan, budget: u64) -> String {
    let data = if plan.data > 0 {
        format!("data {}, ", gib(plan.data))
    } else {
        String::new()
    };
    format!(
        "memory plan: {} peak ({} bytes; held once loaded {} bytes: weights {}, {data}loading \
         {}, run {}), budget {}",
        gib(plan.total()),
        plan.total(),
        plan.runtime + plan.weights + plan.data,
        gib(plan.weights),
        gib(plan.loading),
        gib(plan.working_set()),
        gib(budget)
    )
}

/// What to change when a language-model job does not fit, most effective first.
pub fn advice(settings: &PlanSettings) -> Vec<&'static str> {
    let mut advice = Vec::new();
    if !matches!(settings.precision, Precision::Int8 { .. }) {
        advice.push("--load-in-8bit (about a quarter of the f32 weights)");
    }
    if !settings.embeddings_f16 {
        advice.push("--embeddings-f16");
    }
    if matches!(settings.job, Job::Sft | Job::Ppo | Job::Dpo) && !settings.gradient_checkpointing {
        advice.push("gradient checkpointing");
    }
    advice.push("a smaller batch or shorter sequences");
    advice
}

/// Refuses (before anything loads) a job whose predicted peak exceeds `budget`, with the
/// plan's table and `advice` (what to change).
pub fn check_fits(plan: &MemoryPlan, budget: u64, advice: &[&str]) -> Result<()> {
    if plan.total() <= budget {
        return Ok(());
    }
    bail!(
        "this run needs about {} and the budget is {}:\n{}change: {} (or --no-preflight to try \
         anyway)",
        gib(plan.total()),
        gib(budget),
        render(plan),
        advice.join(", ")
    )
}

/// The budget of `lathe plan`: `--budget`, else this machine's RAM (a GPU's must be given).
fn plan_budget(args: &PlanArgs) -> Result<u64> {
    match (&args.budget, args.gpu) {
        (Some(text), _) => parse_bytes(text),
        (None, true) => bail!("--gpu needs --budget (the GPU's memory, e.g. 24GiB)"),
        (None, false) => machine_ram().context("this machine's RAM is unknown: give --budget"),
    }
}

/// Prints the plan's table and whether it fits.
fn print_fit(plan: &MemoryPlan, budget: u64, advice: &[&str]) {
    print!("{}", render(plan));
    match check_fits(plan, budget, advice) {
        Ok(()) => println!("fits in {}", gib(budget)),
        Err(e) => println!("does not fit: {e}"),
    }
}

/// `lathe plan --job reward`: reward-model training on an encoder directory.
fn run_reward(args: &PlanArgs) -> Result<()> {
    use lathe_reward::plan::{training_plan, DataShape, Stored};
    use lathe_reward::{EncoderConfig, LoraSettings, TrainConfig};

    let dir = if args.model.is_file() {
        args.model.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        args.model.clone()
    };
    if args.batch_size == 0 || args.seq_len == 0 || args.examples < 2 {
        bail!("--batch-size and --seq-len must be at least 1, --examples at least 2");
    }
    let config = TrainConfig {
        lora: (args.lora_r > 0).then(|| LoraSettings {
            r: args.lora_r,
            targets: args.target_modules.clone(),
            batch_size: args.batch_size,
            ..LoraSettings::default()
        }),
        ..TrainConfig::default()
    };
    let stored = Stored {
        elem_bytes: match checkpoint_of(&dir)? {
            Checkpoint::Safetensors { elem_bytes } => elem_bytes,
            Checkpoint::Gguf { .. } => 4,
        },
        on_gpu: args.gpu,
    };
    let (encoder, plan) = if args.data.is_empty() {
        let encoder = EncoderConfig::from_dir(&dir)?;
        let t = args.seq_len.min(encoder.max_positions);
        let held = (config.val_fraction as f64 * args.examples as f64).round() as usize;
        let data = DataShape {
            train_lengths: vec![t; args.examples - held],
            val_lengths: vec![t; held],
            test_lengths: Vec::new(),
            text_bytes: (args.examples * t * 5) as u64,
        };
        let plan = training_plan(&encoder, &config, &data, stored);
        (encoder, plan)
    } else {
        let mut examples = Vec::new();
        for path in &args.data {
            examples.extend(lathe_reward::data::load(path)?.examples);
        }
        let prepared = lathe_reward::train::prepare(&dir, &examples, &config)?;
        let plan = prepared.memory_plan(Vec::new(), stored);
        (prepared.encoder_config().clone(), plan)
    };
    println!(
        "{} ({:?}, {} layers, hidden {}), reward-train, LoRA r {} batch {}:",
        dir.display(),
        encoder.architecture,
        encoder.layers,
        encoder.hidden,
        args.lora_r,
        args.batch_size
    );
    let advice = [
        "a smaller --lora-batch-size, or no --lora",
        "less data, or shorter texts",
    ];
    print_fit(&plan, plan_budget(args)?, &advice);
    Ok(())
}

pub fn run(args: &PlanArgs) -> Result<()> {
    let job = match args.job {
        JobArg::Generate => Job::Generate,
        JobArg::Score => Job::Score,
        JobArg::Sft => Job::Sft,
        JobArg::Ppo => Job::Ppo,
        JobArg::Reward => return run_reward(args),
    };
    let config = read_config(&args.model)?;
    let precision = match (args.load_in_8bit, args.f16) {
        (true, _) => Precision::Int8 { threshold: 6.0 },
        (false, true) => Precision::F16,
        (false, false) => Precision::F32,
    };
    if args.batch_size == 0 || args.mini_batch_size == 0 || args.seq_len == 0 {
        bail!("--batch-size, --mini-batch-size and --seq-len must be at least 1");
    }
    let settings = PlanSettings {
        job,
        precision,
        embeddings_f16: args.embeddings_f16,
        batch: args.batch_size,
        train_batch: if job == Job::Ppo {
            args.mini_batch_size
        } else {
            args.batch_size
        },
        seq_len: args.seq_len,
        lora_r: if matches!(job, Job::Generate | Job::Score) {
            0
        } else {
            args.lora_r
        },
        lora_targets: if args.target_modules.is_empty() {
            default_targets(&config)
        } else {
            args.target_modules.clone()
        },
        gradient_checkpointing: !args.no_gradient_checkpointing,
        checkpoint: checkpoint_of(&args.model)?,
        on_gpu: args.gpu,
    };
    let plan = plan(&config, &settings);
    println!(
        "{} ({}, {} layers, hidden {}), {:?}, {:?}, batch {}, {} tokens, LoRA r {}:",
        args.model.display(),
        config.model_type(),
        config.num_hidden_layers(),
        config.hidden_size(),
        job,
        precision,
        settings.batch,
        settings.seq_len,
        settings.lora_r
    );
    print_fit(&plan, plan_budget(args)?, &advice(&settings));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_their_units_and_bad_ones_are_refused() {
        assert_eq!(parse_bytes("24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_bytes("20GB").unwrap(), 20_000_000_000);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5KiB").unwrap(), 1536);
        assert_eq!(parse_bytes("100").unwrap(), 100);
        for bad in ["", "GiB", "-3GiB", "12 parsecs", "0", "1e30GB", "nan"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
    }
}
