//! Generation and sampling: greedy generation against transformers' `generate` (golden
//! tokens of scripts/golden_generate.py), KV-cache generation against recomputing the whole
//! sequence each step (greedy and seeded sampling, batched prompts of different lengths, CPU
//! and GPU), the sampler's filtering and seeding, EOS handling, and bad input.

use std::path::PathBuf;

use lathe_core::testing::{gpu_with_binding_limit, test_gpu};
use lathe_core::{Device, Rng, Tensor};
use lathe_models::attention::TokenLayout;
use lathe_models::generate::{
    generate, generate_groups, generate_rows, GenerateConfig, LanguageModel,
};
use lathe_models::hf::{load_hf_dir, CausalLm};
use lathe_models::kv_cache::KvCache;
use lathe_models::sampling::{
    argmax, candidates, next_uniform, sample_row, sample_row_at, Sampler, SamplingConfig,
};
use lathe_models::Result;

/// A binding limit under the tiny models' embeddings, weights, logits and KV caches
/// (every row still fits, with the alignment steps of chunked rows).
const TINY_BINDING: u64 = 2 << 10;

const MODELS: [&str; 5] = [
    "neox_parallel_quarter_gelu",
    "neox_sequential_full_gelu_fast",
    "neox_parallel_full_gelu_new",
    "neox_sequential_quarter_gelu",
    "llama_gqa_tied",
];

/// Prompts of different lengths, batched with left padding.
fn prompts() -> Vec<Vec<u32>> {
    vec![vec![5, 11, 23, 7, 3], vec![9, 1], vec![30, 4, 17], vec![12]]
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(name: &str, device: &Device) -> CausalLm {
    load_hf_dir(&fixtures().join("models").join(name), device)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn greedy(max_new_tokens: usize) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens,
        eos_token_id: None,
        sampling: SamplingConfig::greedy(),
        ..GenerateConfig::default()
    }
}

fn sampled(max_new_tokens: usize, seed: u64) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens,
        sampling: SamplingConfig {
            temperature: 0.9,
            top_k: 20,
            top_p: 0.95,
            greedy: false,
        },
        seed,
        ..GenerateConfig::default()
    }
}

// ---- KV cache against recomputation ----

/// The cache path and the no-cache path pick the same tokens, for every model.
fn cache_matches_recompute(device: &Device, config: &GenerateConfig) {
    for name in MODELS {
        let model = load(name, device);
        let cached = generate(&model, &prompts(), config, device).unwrap();
        let no_cache = GenerateConfig {
            use_cache: false,
            ..*config
        };
        let recomputed = generate(&model, &prompts(), &no_cache, device).unwrap();
        assert_eq!(cached, recomputed, "{name} on {}", device.name());
        assert!(cached.iter().all(|row| row.len() == config.max_new_tokens));
    }
}

#[test]
fn kv_cache_greedy_matches_recompute_cpu() {
    cache_matches_recompute(&Device::Cpu, &greedy(10));
}

#[test]
fn kv_cache_greedy_matches_recompute_gpu() {
    cache_matches_recompute(&test_gpu(), &greedy(10));
}

#[test]
fn kv_cache_sampling_matches_recompute_cpu() {
    cache_matches_recompute(&Device::Cpu, &sampled(10, 7));
}

#[test]
fn kv_cache_sampling_matches_recompute_gpu() {
    cache_matches_recompute(&test_gpu(), &sampled(10, 7));
}

#[test]
fn gpu_generation_equals_cpu_generation() {
    let gpu = test_gpu();
    for name in MODELS {
        for config in [greedy(8), sampled(8, 3)] {
            let on_cpu = generate(&load(name, &Device::Cpu), &prompts(), &config, &Device::Cpu);
            let on_gpu = generate(&load(name, &gpu), &prompts(), &config, &gpu);
            assert_eq!(on_cpu.unwrap(), on_gpu.unwrap(), "{name}");
        }
    }
}

#[test]
fn generation_with_tensors_over_a_binding_equals_cpu_generation() {
    // 2 KiB bindings: the embedding, the LM head, the logits the sampler reads and the KV
    // caches are all split over windows.
    let small = gpu_with_binding_limit(TINY_BINDING);
    for name in MODELS {
        for config in [greedy(8), sampled(8, 3)] {
            let on_cpu = generate(&load(name, &Device::Cpu), &prompts(), &config, &Device::Cpu);
            let on_gpu = generate(&load(name, &small), &prompts(), &config, &small);
            assert_eq!(on_cpu.unwrap(), on_gpu.unwrap(), "{name}");
        }
    }
}

// ---- groups of samples sharing their prompt's prefill (GRPO) ----

/// A model that records the (B, T) of every forward it runs.
struct Recording<'a> {
    model: &'a CausalLm,
    shapes: std::sync::Mutex<Vec<Vec<usize>>>,
}

impl LanguageModel for Recording<'_> {
    fn forward(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.shapes.lock().unwrap().push(ids.shape().to_vec());
        LanguageModel::forward(self.model, ids, layout, cache)
    }
    fn forward_last(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.shapes.lock().unwrap().push(ids.shape().to_vec());
        LanguageModel::forward_last(self.model, ids, layout, cache)
    }
    fn vocab_size(&self) -> usize {
        LanguageModel::vocab_size(self.model)
    }
    fn num_layers(&self) -> usize {
        LanguageModel::num_layers(self.model)
    }
    fn max_positions(&self) -> usize {
        LanguageModel::max_positions(self.model)
    }
}

/// G samples per prompt from one prefill of the P prompts equal, token for token, the
/// samples of the prompts each repeated G times (prompts of different lengths, rows that
/// finish at EOS at different steps), and the prefill runs P rows, not P x G.
fn groups_equal_repeated_prompts(device: &Device) {
    const G: usize = 3;
    let mut with_eos = sampled(8, 5);
    with_eos.eos_token_id = Some(3);
    for name in MODELS {
        let model = load(name, device);
        for config in [sampled(8, 11), with_eos, greedy(6)] {
            let recording = Recording {
                model: &model,
                shapes: Default::default(),
            };
            let grouped = generate_groups(&recording, &prompts(), G, &config, device).unwrap();
            let repeated: Vec<Vec<u32>> = prompts()
                .into_iter()
                .flat_map(|p| std::iter::repeat_n(p, G))
                .collect();
            let expected = generate(&model, &repeated, &config, device).unwrap();
            assert_eq!(grouped, expected, "{name} on {}", device.name());
            let shapes = recording.shapes.into_inner().unwrap();
            let (p, longest) = (prompts().len(), 5);
            assert_eq!(
                shapes[0],
                [p, longest],
                "{name}: the prefill runs the P prompts"
            );
            // Decoding runs the P x G rows still going, one token each (rows that emitted EOS
            // are dropped).
            let going = shapes[1..].iter().map(|s| s[0]);
            assert!(
                shapes[1..].iter().all(|s| s[1] == 1 && s[0] <= p * G)
                    && going.clone().zip(going.skip(1)).all(|(a, b)| b <= a),
                "{name}: decoding runs at most P x G rows of one token: {shapes:?}"
            );
            if config.eos_token_id.is_none() {
                assert!(
                    shapes[1..].iter().all(|s| s[0] == p * G),
                    "{name}: {shapes:?}"
                );
            }
        }
    }
}

#[test]
fn groups_of_samples_share_the_prefill_cpu() {
    groups_equal_repeated_prompts(&Device::Cpu);
}

#[test]
fn groups_of_samples_share_the_prefill_gpu() {
    groups_equal_repeated_prompts(&test_gpu());
    // The repeated caches and logits split over binding windows.
    groups_equal_repeated_prompts(&gpu_with_binding_limit(TINY_BINDING));
}

// ---- finished rows stop being computed ----

/// Rows that finish (their own token limit, or EOS) are dropped from the batch, and every
/// row's tokens equal, token for token, those of the whole batch decoded to the end: the
/// limited rows are the unlimited ones cut, the EOS rows the never-stopping ones cut after
/// their first EOS. The model runs only the rows still going.
fn finished_rows_stop_being_computed(device: &Device) {
    let pad = GenerateConfig::default().pad_token_id;
    let limits = [3, 7, 1, 5];
    for name in MODELS {
        let model = load(name, device);
        for config in [sampled(7, 13), greedy(7)] {
            let whole = generate(&model, &prompts(), &config, device).unwrap();
            let recording = Recording {
                model: &model,
                shapes: Default::default(),
            };
            let limited =
                generate_rows(&recording, &prompts(), 0, Some(&limits), &config, device).unwrap();
            for (b, (got, all)) in limited.iter().zip(&whole).enumerate() {
                let mut want = all[..limits[b]].to_vec();
                want.resize(7, pad);
                assert_eq!(got, &want, "{name} row {b} on {}", device.name());
            }
            // After token s (s = 1..), the rows whose limit is above s go on.
            let rows: Vec<usize> = recording.shapes.into_inner().unwrap()[1..]
                .iter()
                .map(|s| s[0])
                .collect();
            let going: Vec<usize> = (1..7)
                .map(|s| limits.iter().filter(|&&l| l > s).count())
                .collect();
            assert_eq!(rows, going, "{name}: rows per decoding step");
        }
        // EOS: the rows that emit it stop; the others' tokens are unchanged.
        let mut never_stop = sampled(7, 21);
        never_stop.eos_token_id = Some(3);
        never_stop.stop_at_eos = false;
        let stopping = GenerateConfig {
            stop_at_eos: true,
            ..never_stop
        };
        let all = generate(&model, &prompts(), &never_stop, device).unwrap();
        let got = generate(&model, &prompts(), &stopping, device).unwrap();
        let cut: Vec<Vec<u32>> = all
            .iter()
            .map(|row| match row.iter().position(|&t| t == 3) {
                Some(at) => row[..=at].to_vec(),
                None => row.clone(),
            })
            .collect();
        let steps = cut.iter().map(Vec::len).max().unwrap();
        for (b, (got, cut)) in got.iter().zip(&cut).enumerate() {
            let mut want = cut.clone();
            want.resize(steps, pad);
            assert_eq!(got, &want, "{name} row {b} with EOS on {}", device.name());
        }
    }
}

#[test]
fn finished_rows_stop_being_computed_cpu() {
    finished_rows_stop_being_computed(&Device::Cpu);
}

#[test]
fn finished_rows_stop_being_computed_gpu() {
    finished_rows_stop_being_computed(&test_gpu());
}

#[test]
fn row_limits_must_match_the_prompts() {
    let model = load(MODELS[0], &Device::Cpu);
    let err = generate_rows(
        &model,
        &prompts(),
        0,
        Some(&[1, 2]),
        &greedy(3),
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("2 row limits for 4 prompts"),
        "{err}"
    );
}

// ---- transformers goldens ----

struct GoldenCase {
    label: String,
    prompts: Vec<Vec<u32>>,
    config: GenerateConfig,
    expected: Vec<Vec<u32>>,
}

/// The cases of `name` in a greedy golden file (scripts/golden_generate.py's layout).
fn golden_cases_in(file: &str, name: &str) -> Vec<GoldenCase> {
    let path = fixtures().join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids =
        |v: &serde_json::Value| -> Vec<Vec<u32>> { serde_json::from_value(v.clone()).unwrap() };
    let count = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
    doc["models"][name]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| GoldenCase {
            label: case["label"].as_str().unwrap().to_string(),
            prompts: ids(&case["prompts"]),
            config: GenerateConfig {
                max_new_tokens: count(&case["max_new_tokens"]),
                min_new_tokens: count(&case["min_new_tokens"]),
                eos_token_id: case["eos_token_id"].as_u64().map(|id| id as u32),
                stop_at_eos: true,
                pad_token_id: case["pad_token_id"].as_u64().unwrap() as u32,
                sampling: SamplingConfig::greedy(),
                seed: 0,
                use_cache: true,
            },
            expected: ids(&case["expected"]),
        })
        .collect()
}

fn golden_cases(name: &str) -> Vec<GoldenCase> {
    golden_cases_in("generate_greedy.json", name)
}

/// Token for token, single prompts and left-padded batches, with and without EOS and
/// min_new_tokens, both with and without the cache: the 4.46 goldens, and Qwen2's from
/// transformers 5.x (scripts/golden_qwen2.py).
fn greedy_matches_transformers(device: &Device) {
    let models = MODELS
        .iter()
        .map(|name| (*name, golden_cases(name)))
        .chain([(
            "qwen2_tiny",
            golden_cases_in("generate_greedy_qwen2.json", "qwen2_tiny"),
        )]);
    for (name, cases) in models {
        let model = load(name, device);
        assert!(cases.iter().any(|c| c.label.ends_with("batched")), "{name}");
        for case in cases {
            for use_cache in [true, false] {
                let config = GenerateConfig {
                    use_cache,
                    ..case.config
                };
                let got = generate(&model, &case.prompts, &config, device).unwrap();
                assert_eq!(
                    got,
                    case.expected,
                    "{name} {} (cache {use_cache}) on {}",
                    case.label,
                    device.name()
                );
            }
        }
    }
}

#[test]
fn greedy_matches_transformers_cpu() {
    greedy_matches_transformers(&Device::Cpu);
}

#[test]
fn greedy_matches_transformers_gpu() {
    greedy_matches_transformers(&test_gpu());
}

// ---- the sampler ----

const LOGITS: [f32; 6] = [0.5, 2.0, -1.0, 1.9, 0.0, -3.0];

fn config(temperature: f32, top_k: usize, top_p: f32) -> SamplingConfig {
    SamplingConfig {
        temperature,
        top_k,
        top_p,
        greedy: false,
    }
}

fn draws(logits: &[f32], config: &SamplingConfig, seed: u64, n: usize) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| sample_row(logits, config, &mut rng).unwrap())
        .collect()
}

#[test]
fn argmax_takes_the_first_maximum() {
    assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    assert_eq!(argmax(&[f32::NEG_INFINITY, -5.0]), 1);
    let mut rng = Rng::new(0);
    let row = [0.0, 7.0, 7.0];
    assert_eq!(
        sample_row(&row, &SamplingConfig::greedy(), &mut rng).unwrap(),
        1
    );
}

#[test]
fn top_k_one_is_greedy() {
    for seed in 0..20 {
        assert_eq!(draws(&LOGITS, &config(1.0, 1, 1.0), seed, 5), vec![1; 5]);
        assert_eq!(draws(&LOGITS, &config(3.0, 1, 0.5), seed, 5), vec![1; 5]);
    }
}

#[test]
fn top_k_keeps_the_k_largest() {
    let kept: Vec<u32> = candidates(&LOGITS, &config(1.0, 3, 1.0))
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    // Candidates come in token-id order (the draw walks them in that order).
    assert_eq!(kept, [0, 1, 3]);
    // Ties with the k-th largest stay, as in transformers.
    let tied = [1.0, 2.0, 1.0, 0.0];
    let kept: Vec<u32> = candidates(&tied, &config(1.0, 2, 1.0))
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(kept, [0, 1, 2]);
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    // Probabilities 0.5, 0.25, 0.15, 0.1 (logits are their logs).
    let probs = [0.1f32, 0.5, 0.15, 0.25];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let kept = |top_p: f32| -> Vec<u32> {
        candidates(&logits, &config(1.0, 0, top_p))
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect()
    };
    assert_eq!(kept(0.3), [1]);
    assert_eq!(kept(0.5), [1]);
    assert_eq!(kept(0.6), [1, 3]);
    assert_eq!(kept(0.75), [1, 3]);
    assert_eq!(kept(0.8), [1, 2, 3]);
    assert_eq!(kept(0.95), [0, 1, 2, 3]);
    assert_eq!(kept(1.0), [0, 1, 2, 3]);
    // Always at least one token.
    assert_eq!(kept(1e-6), [1]);
    // The draws stay inside the kept set and reach both of its tokens.
    let picks = draws(&logits, &config(1.0, 0, 0.6), 5, 200);
    assert!(picks.iter().all(|t| [1, 3].contains(t)));
    assert!(picks.contains(&1) && picks.contains(&3));
    // A threshold rule: tokens tied with the last one needed all stay (probabilities 0.4,
    // 0.2, 0.2, 0.2 and top_p 0.5: the mass above 0.2 is 0.4 < 0.5).
    let tied: Vec<f32> = [0.2f32, 0.4, 0.2, 0.2].iter().map(|p| p.ln()).collect();
    let kept: Vec<u32> = candidates(&tied, &config(1.0, 0, 0.5))
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(kept, [0, 1, 2, 3]);
}

#[test]
fn the_draw_walks_the_kept_tokens_in_id_order() {
    // p = 0.1, 0.5, 0.15, 0.25 in id order: u picks the first token whose running sum in id
    // order exceeds u, whatever the tokens' ranks.
    let probs = [0.1f32, 0.5, 0.15, 0.25];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let pick = |u: f32| sample_row_at(&logits, &SamplingConfig::default(), u).unwrap();
    assert_eq!(pick(0.0), 0);
    assert_eq!(pick(0.05), 0);
    assert_eq!(pick(0.3), 1);
    assert_eq!(pick(0.55), 1);
    assert_eq!(pick(0.7), 2);
    assert_eq!(pick(0.8), 3);
    assert_eq!(pick(0.9999), 3);
    // top_k 2 keeps tokens 1 and 3 (mass 0.75): u = 0.5 walks to 0.375 of token 1's 0.5.
    let top2 = config(1.0, 2, 1.0);
    assert_eq!(sample_row_at(&logits, &top2, 0.5).unwrap(), 1);
    assert_eq!(sample_row_at(&logits, &top2, 0.7).unwrap(), 3);
    // sample_row draws its uniform from the row's stream: next_uniform, one per call.
    let mut a = Rng::new(3);
    let mut b = Rng::new(3);
    for _ in 0..10 {
        let u = next_uniform(&mut b);
        assert_eq!(
            sample_row(&logits, &SamplingConfig::default(), &mut a).unwrap(),
            sample_row_at(&logits, &SamplingConfig::default(), u).unwrap()
        );
    }
    // Greedy uses no random number.
    sample_row(&logits, &SamplingConfig::greedy(), &mut a).unwrap();
    assert_eq!(a.next_u64(), b.next_u64());
}

#[test]
fn sampling_frequencies_follow_the_distribution() {
    let probs = [0.1f32, 0.5, 0.15, 0.25];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let n = 20_000;
    let picks = draws(&logits, &SamplingConfig::default(), 11, n);
    for (token, p) in probs.iter().enumerate() {
        let freq = picks.iter().filter(|&&t| t as usize == token).count() as f32 / n as f32;
        assert!((freq - p).abs() < 0.02, "token {token}: {freq} vs {p}");
    }
}

#[test]
fn tiny_temperature_is_greedy() {
    for seed in 0..20 {
        assert_eq!(draws(&LOGITS, &config(1e-4, 0, 1.0), seed, 10), vec![1; 10]);
        assert_eq!(
            draws(&LOGITS, &config(1e-30, 0, 1.0), seed, 10),
            vec![1; 10]
        );
    }
}

#[test]
fn same_seed_same_tokens_different_seeds_differ() {
    let flat = [0.0f32; 40];
    let cfg = SamplingConfig::default();
    assert_eq!(draws(&flat, &cfg, 42, 64), draws(&flat, &cfg, 42, 64));
    assert_ne!(draws(&flat, &cfg, 42, 64), draws(&flat, &cfg, 43, 64));
    // The generator is fixed: these numbers are the same on every platform.
    let mut rng = Rng::new(0);
    let first: Vec<u64> = (0..2).map(|_| rng.next_u64()).collect();
    assert_eq!(first, [11091344671253066420, 13793997310169335082]);

    // Through generation, on a model.
    let model = load("llama_gqa_tied", &Device::Cpu);
    let run = |seed| generate(&model, &prompts(), &sampled(10, seed), &Device::Cpu).unwrap();
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn batched_sampler_rows_are_independent_streams() {
    let flat = vec![0.0f32; 3 * 40];
    let mut a = Sampler::new(SamplingConfig::default(), 9, 3).unwrap();
    let mut b = Sampler::new(SamplingConfig::default(), 9, 3).unwrap();
    let rows_a: Vec<Vec<u32>> = (0..16).map(|_| a.sample_host(&flat, 40).unwrap()).collect();
    let rows_b: Vec<Vec<u32>> = (0..16).map(|_| b.sample_host(&flat, 40).unwrap()).collect();
    assert_eq!(rows_a, rows_b);
    let column = |rows: &[Vec<u32>], r: usize| rows.iter().map(|x| x[r]).collect::<Vec<_>>();
    assert_ne!(column(&rows_a, 0), column(&rows_a, 1));
    // A (B, V) tensor samples as its host values do.
    let mut c = Sampler::new(SamplingConfig::default(), 9, 3).unwrap();
    let tensor = Tensor::from_vec(flat.clone(), &[3, 40], &Device::Cpu).unwrap();
    assert_eq!(c.sample(&tensor).unwrap(), rows_a[0]);
}

// ---- EOS handling, with a scripted model ----

/// A model whose next token is scripted per prompt and step: the logits put 10 on the
/// scripted token and 5 on token 1 (the runner-up), so suppressing a scripted EOS gives 1.
/// Prompt `[7, s]` follows script s (rows are told by their prompt, not their place in the
/// batch, which changes as finished rows leave it).
struct Scripted {
    script: Vec<Vec<u32>>,
    vocab: usize,
}

impl LanguageModel for Scripted {
    fn forward(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        _: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let &[b, t] = ids.shape() else { unreachable!() };
        // Step index = generated tokens so far = the last position minus the prompt's.
        let positions = layout.positions().to_vec_u32().unwrap();
        let (device, ids) = (ids.device().clone(), ids.to_vec_u32().unwrap());
        let mut logits = vec![0.0f32; b * t * self.vocab];
        for row in 0..b {
            let step = positions[row * t + t - 1] as usize + 1 - 2; // prompts have 2 tokens
            let at = (row * t + t - 1) * self.vocab;
            logits[at + 1] = 5.0;
            let script = &self.script[ids[row * t + 1] as usize];
            logits[at + script[step.min(script.len() - 1)] as usize] = 10.0;
        }
        Ok(Tensor::from_vec(logits, &[b, t, self.vocab], &device)?)
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn num_layers(&self) -> usize {
        1
    }
    fn max_positions(&self) -> usize {
        64
    }
}

const EOS: u32 = 2;
const PAD: u32 = 0;

fn scripted_run(stop_at_eos: bool, min_new_tokens: usize, max_new_tokens: usize) -> Vec<Vec<u32>> {
    let config = GenerateConfig {
        max_new_tokens,
        min_new_tokens,
        eos_token_id: Some(EOS),
        stop_at_eos,
        pad_token_id: PAD,
        sampling: SamplingConfig::greedy(),
        seed: 0,
        use_cache: false,
    };
    scripted_run_on(&Device::Cpu, &config)
}

fn scripted_run_on(device: &Device, config: &GenerateConfig) -> Vec<Vec<u32>> {
    let model = Scripted {
        script: vec![
            vec![4, EOS, 5, 6, 7, 8],
            vec![5, 6, 7, EOS, 8, 9],
            vec![3, 3, 3, 3, 3, 3],
        ],
        vocab: 10,
    };
    let prompts: Vec<Vec<u32>> = (0..3).map(|s| vec![7, s]).collect();
    generate(&model, &prompts, config, device).unwrap()
}

#[test]
fn stop_at_eos_pads_finished_rows() {
    assert_eq!(
        scripted_run(true, 0, 6),
        [
            vec![4, EOS, PAD, PAD, PAD, PAD],
            vec![5, 6, 7, EOS, PAD, PAD],
            vec![3, 3, 3, 3, 3, 3]
        ]
    );
}

#[test]
fn generation_ends_when_every_row_has_finished() {
    let model = Scripted {
        script: vec![vec![4, EOS, 5, 6], vec![EOS, 6, 7, 8]],
        vocab: 10,
    };
    let config = GenerateConfig {
        max_new_tokens: 8,
        eos_token_id: Some(EOS),
        sampling: SamplingConfig::greedy(),
        use_cache: false,
        ..GenerateConfig::default()
    };
    let got = generate(&model, &[vec![7, 0], vec![7, 1]], &config, &Device::Cpu).unwrap();
    assert_eq!(got, [vec![4, EOS], vec![EOS, PAD]]);
}

#[test]
fn never_stop_at_eos_runs_every_row_to_max() {
    assert_eq!(
        scripted_run(false, 0, 6),
        [
            vec![4, EOS, 5, 6, 7, 8],
            vec![5, 6, 7, EOS, 8, 9],
            vec![3, 3, 3, 3, 3, 3]
        ]
    );
}

#[test]
fn min_new_tokens_suppresses_eos() {
    // EOS is replaced by the runner-up (token 1) until 3 tokens are out.
    assert_eq!(
        scripted_run(true, 3, 6),
        [
            vec![4, 1, 5, 6, 7, 8],
            vec![5, 6, 7, EOS, PAD, PAD],
            vec![3, 3, 3, 3, 3, 3]
        ]
    );
    assert_eq!(
        scripted_run(false, 5, 6),
        [
            vec![4, 1, 5, 6, 7, 8],
            vec![5, 6, 7, 1, 8, 9],
            vec![3, 3, 3, 3, 3, 3]
        ]
    );
}

#[test]
fn eos_suppression_on_the_gpu_equals_the_cpu() {
    // On a GPU the kernel suppresses EOS; greedy and sampled (the scripted logits leave EOS
    // or the runner-up within reach at temperature 4).
    let gpu = test_gpu();
    for sampling in [SamplingConfig::greedy(), config(4.0, 3, 1.0)] {
        for (stop_at_eos, min_new_tokens) in [(true, 0), (true, 3), (false, 5)] {
            for seed in 0..4 {
                let config = GenerateConfig {
                    max_new_tokens: 6,
                    min_new_tokens,
                    eos_token_id: Some(EOS),
                    stop_at_eos,
                    pad_token_id: PAD,
                    sampling,
                    seed,
                    use_cache: false,
                };
                let on_cpu = scripted_run_on(&Device::Cpu, &config);
                assert_eq!(scripted_run_on(&gpu, &config), on_cpu, "{config:?}");
                if min_new_tokens > 0 {
                    let early = on_cpu.iter().flat_map(|row| &row[..min_new_tokens]);
                    assert!(early.into_iter().all(|&t| t != EOS), "{on_cpu:?}");
                }
            }
        }
    }
}

// ---- bad input ----

fn generate_err(prompts: &[Vec<u32>], config: &GenerateConfig) -> String {
    let model = load("llama_gqa_tied", &Device::Cpu);
    match generate(&model, prompts, config, &Device::Cpu) {
        Ok(tokens) => panic!("generated {tokens:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn rejects_no_prompts_and_empty_prompts() {
    let err = generate_err(&[], &greedy(4));
    assert!(err.contains("no prompts"), "{err}");
    let err = generate_err(&[vec![1, 2], vec![]], &greedy(4));
    assert!(err.contains("prompt 1 is empty"), "{err}");
}

#[test]
fn rejects_token_ids_outside_the_vocabulary() {
    let err = generate_err(&[vec![1, 2], vec![3, 40]], &greedy(4));
    assert!(
        err.contains("prompt 1 token 1 is id 40, outside the vocabulary of 40"),
        "{err}"
    );
    let bad_pad = GenerateConfig {
        pad_token_id: 99,
        ..greedy(4)
    };
    let err = generate_err(&[vec![1]], &bad_pad);
    assert!(err.contains("pad_token_id 99"), "{err}");
    let bad_eos = GenerateConfig {
        eos_token_id: Some(40),
        ..greedy(4)
    };
    let err = generate_err(&[vec![1]], &bad_eos);
    assert!(err.contains("eos_token_id 40"), "{err}");
}

#[test]
fn rejects_bad_lengths_and_sampling_settings() {
    let err = generate_err(&[vec![1; 60]], &greedy(10));
    assert!(err.contains("exceeds the model's 64 positions"), "{err}");
    let min_over_max = GenerateConfig {
        min_new_tokens: 5,
        ..greedy(4)
    };
    let err = generate_err(&[vec![1]], &min_over_max);
    assert!(
        err.contains("min_new_tokens 5 exceeds max_new_tokens 4"),
        "{err}"
    );
    let cold = GenerateConfig {
        sampling: config(0.0, 0, 1.0),
        ..greedy(4)
    };
    let err = generate_err(&[vec![1]], &cold);
    assert!(err.contains("temperature must be positive"), "{err}");
    let err = generate_err(
        &[vec![1]],
        &GenerateConfig {
            sampling: config(1.0, 0, 0.0),
            ..greedy(4)
        },
    );
    assert!(err.contains("top_p must be in (0, 1]"), "{err}");
}

#[test]
fn sampler_rejects_nan_and_all_masked_rows() {
    let mut rng = Rng::new(0);
    let err = sample_row(&[0.0, f32::NAN], &SamplingConfig::default(), &mut rng).unwrap_err();
    assert!(err.to_string().contains("logit 1 is NaN"), "{err}");
    let masked = [f32::NEG_INFINITY; 3];
    let err = sample_row(&masked, &SamplingConfig::greedy(), &mut rng).unwrap_err();
    assert!(
        err.to_string()
            .contains("every one of the 3 logits is -inf"),
        "{err}"
    );
    let mut sampler = Sampler::new(SamplingConfig::default(), 0, 2).unwrap();
    let err = sampler.sample_host(&[0.0; 7], 4).unwrap_err();
    assert!(
        err.to_string().contains("sampler for 2 rows got 7 logits"),
        "{err}"
    );
}

#[test]
fn zero_new_tokens_is_empty_rows() {
    let model = load("llama_gqa_tied", &Device::Cpu);
    let got = generate(&model, &prompts(), &greedy(0), &Device::Cpu).unwrap();
    assert_eq!(got, vec![Vec::<u32>::new(); 4]);
}

#[test]
fn padding_token_value_does_not_matter() {
    // The left padding is masked out, so its ids cannot change the tokens (EOS off: the pad
    // id only fills the padding here).
    let model = load("neox_parallel_quarter_gelu", &Device::Cpu);
    for use_cache in [true, false] {
        let run = |pad_token_id| {
            let config = GenerateConfig {
                pad_token_id,
                use_cache,
                ..sampled(8, 5)
            };
            generate(&model, &prompts(), &config, &Device::Cpu).unwrap()
        };
        assert_eq!(run(0), run(37), "cache {use_cache}");
    }
}

/// A padded embedding (more rows than tokenizer ids, as GPT-NeoX-20B): ids the tokenizer
/// cannot decode are never sampled, on either device; without the limit they are.
#[test]
fn ids_past_the_tokenizer_are_never_sampled_on_either_device() {
    let hot = SamplingConfig {
        temperature: 50.0,
        top_k: 0,
        top_p: 1.0,
        greedy: false,
    };
    for device in [Device::Cpu, test_gpu()] {
        let mut model = load("neox_parallel_quarter_gelu", &device);
        let config = |seed| GenerateConfig {
            max_new_tokens: 12,
            eos_token_id: None,
            sampling: hot,
            seed,
            ..GenerateConfig::default()
        };
        let all = |model: &CausalLm| -> Vec<u32> {
            (0..4)
                .flat_map(|seed| generate(model, &prompts(), &config(seed), &device).unwrap())
                .flatten()
                .collect()
        };
        // Near-uniform sampling over 40 ids: 192 draws reach past 25 almost surely.
        assert!(all(&model).iter().any(|&id| id >= 25), "{}", device.name());
        model.limit_sampling_to(Some(25));
        assert_eq!(model.sample_vocab(), 25);
        let limited = all(&model);
        assert!(
            limited.iter().all(|&id| id < 25),
            "{}: {limited:?}",
            device.name()
        );
        assert!(
            limited.iter().any(|&id| id >= 20),
            "still sampled up to the limit"
        );
    }
}
