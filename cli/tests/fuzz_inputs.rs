//! Bounded fuzzing in CI of the CLI's readers of user files: `--config FILE.toml`
//! (`read_toml` into the SFT, PPO and reward-train settings, then their checks), `--texts`
//! files (`read_texts`: plain, JSON, JSONL) and the JSONL logs of a run folder
//! (`parse_jsonl`, and `lathe report` over them). Inputs are random text and structured
//! mutations of valid files (truncation, flipped bytes, values replaced by huge, negative or
//! deeply nested ones). Every input must give `Ok` or `Err`, never a panic, and one read may
//! allocate at most `lathe_core::testing::parse_alloc_bound(input length)` (16 MiB + 64 x
//! the input) on the calling thread (`lathe report`'s output, a page and four fixed-size
//! PNGs, is in the 16 MiB). `cargo +nightly fuzz run toml_config|texts|jsonl_report` (fuzz/)
//! runs them unbounded.

use std::path::PathBuf;

use lathe_cli::commands::ppo::PpoFile;
use lathe_cli::commands::reward::RewardTrainSettings;
use lathe_cli::commands::sft::SftConfig;
use lathe_cli::config_file::read_toml;
use lathe_cli::run_files::parse_jsonl;
use lathe_cli::texts::read_texts;
use lathe_core::testing::{parse_alloc_bound, peak_alloc_during, CountingAlloc};
use proptest::prelude::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// A directory of this test thread, holding `name` = `bytes`; the file's path.
fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "lathe-fuzz-cli-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn within_bound(what: &str, len: usize, peak: usize) -> Result<(), TestCaseError> {
    let bound = parse_alloc_bound(len);
    prop_assert!(
        peak <= bound,
        "{what} of {len} bytes allocated {peak} > {bound}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// TOML

const PPO_TOML: &str = "[ppo]
learning_rate = 5e-4
batch_size = 16
mini_batch_size = 4
ppo_epochs = 4
init_kl_coef = 0.2
adap_kl_ctrl = true

[run]
steps = 100
query_length = { min = 2, max = 7 }
response_length = { min = 4, max = 15 }
lora_r = 16
";

/// Every settings type read from `text`, with its checks; whether any accepted it.
fn read_all_toml(text: &[u8]) -> Result<bool, TestCaseError> {
    let path = write("config.toml", text);
    let (any, peak) = peak_alloc_during(|| {
        let sft = read_toml::<SftConfig>(&path, "SFT config").map(|c| c.validate().is_ok());
        let ppo = read_toml::<PpoFile>(&path, "PPO config").map(|c| c.validate().is_ok());
        let reward = read_toml::<RewardTrainSettings>(&path, "reward-train config");
        sft.is_ok() || ppo.is_ok() || reward.is_ok()
    });
    within_bound("TOML", text.len(), peak)?;
    Ok(any)
}

fn odd_toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("18446744073709551616".to_string()),
        Just("9223372036854775807".to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("1e308".to_string()),
        Just("nan".to_string()),
        Just("-inf".to_string()),
        Just("\"text\"".to_string()),
        Just("{ min = 7, max = 2 }".to_string()),
        Just("{ min = 18446744073709551615, max = 18446744073709551615 }".to_string()),
        Just("[1, 2]".to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
        (1usize..64).prop_map(|d| format!("{}1{}", "[".repeat(d), "]".repeat(d))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn toml_random_text(text in "[\\[\\]{}=a-z_0-9.\" \\n,-]{0,200}") {
        read_all_toml(text.as_bytes())?;
    }

    #[test]
    fn toml_truncated_and_flipped(cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(), xor in 1u8..=255) {
        prop_assert!(read_all_toml(PPO_TOML.as_bytes())?);
        read_all_toml(&PPO_TOML.as_bytes()[..cut.index(PPO_TOML.len())])?;
        let mut bytes = PPO_TOML.as_bytes().to_vec();
        let i = flip.index(bytes.len());
        bytes[i] ^= xor;
        read_all_toml(&bytes)?;
    }

    #[test]
    fn toml_odd_values(line in any::<prop::sample::Index>(), value in odd_toml_value()) {
        let mut lines: Vec<String> = PPO_TOML.lines().map(str::to_string).collect();
        let with_values: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].contains(" = ")).collect();
        let i = with_values[line.index(with_values.len())];
        let key = lines[i].split(" = ").next().unwrap().to_string();
        lines[i] = format!("{key} = {value}");
        read_all_toml(lines.join("\n").as_bytes())?;
    }
}

#[test]
fn deeply_nested_toml_is_an_error() {
    // A recursive-descent parser without a depth limit would overflow the stack here.
    for depth in [1000, 100_000] {
        let text = format!("steps = {}1{}", "[".repeat(depth), "]".repeat(depth));
        let path = write("deep.toml", text.as_bytes());
        assert!(read_toml::<PpoFile>(&path, "PPO config").is_err());
        let text = format!("a = {}", "{ b = ".repeat(depth) + "1" + &" }".repeat(depth));
        let path = write("deep.toml", text.as_bytes());
        assert!(read_toml::<PpoFile>(&path, "PPO config").is_err());
    }
}

// ---------------------------------------------------------------------------------------
// Text files

fn read_any_texts(ext: &str, bytes: &[u8]) -> Result<bool, TestCaseError> {
    let path = write(&format!("texts.{ext}"), bytes);
    let (read, peak) = peak_alloc_during(|| read_texts(&path, "text"));
    within_bound("texts", bytes.len(), peak)?;
    if let Err(e) = &read {
        prop_assert!(
            format!("{e:#}").contains("texts."),
            "error without the file: {e:#}"
        );
    }
    Ok(read.is_ok())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn texts_random(bytes in prop::collection::vec(any::<u8>(), 0..200),
                    json in "[\\[\\]{}\":,a-z \\n]{0,200}",
                    ext in prop::sample::select(vec!["txt", "json", "jsonl", ""])) {
        read_any_texts(ext, &bytes)?;
        read_any_texts(ext, json.as_bytes())?;
    }

    #[test]
    fn texts_truncated_and_flipped(cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(),
                                   xor in 1u8..=255, ext in prop::sample::select(vec!["txt", "json", "jsonl"])) {
        let valid = match ext {
            "json" => "[\"one text\", {\"text\": \"two\"}]",
            "jsonl" => "{\"text\": \"one\"}\n\"two\"\n",
            _ => "one text\n\ntwo\n",
        };
        prop_assert!(read_any_texts(ext, valid.as_bytes())?);
        read_any_texts(ext, &valid.as_bytes()[..cut.index(valid.len())])?;
        let mut bytes = valid.as_bytes().to_vec();
        let i = flip.index(bytes.len());
        bytes[i] ^= xor;
        read_any_texts(ext, &bytes)?;
    }
}

// ---------------------------------------------------------------------------------------
// Run-folder JSONL and `lathe report`

/// `parse_jsonl` of `metrics`, then `lathe report` over a folder with these logs.
fn report(metrics: &[u8], samples: &[u8]) -> Result<(), TestCaseError> {
    let dir = write("metrics.jsonl", metrics)
        .parent()
        .unwrap()
        .to_path_buf();
    write("samples.jsonl", samples);
    let len = metrics.len() + samples.len();
    let ((), peak) = peak_alloc_during(|| {
        if let Ok(text) = std::str::from_utf8(metrics) {
            let _ = parse_jsonl(text);
        }
        let _ = lathe_cli::report::write_report(&dir);
    });
    within_bound("run logs", len, peak)
}

fn metric_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1e308".to_string()),
        Just("-1e308".to_string()),
        Just("5e-324".to_string()),
        Just("0".to_string()),
        Just("18446744073709551615".to_string()),
        Just("null".to_string()),
        Just("\"x\"".to_string()),
        (-1000.0f64..1000.0).prop_map(|v| v.to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn report_random_logs(metrics in "[\\[\\]{}\":,a-z0-9 \\n]{0,200}", samples in "[{}\":,a-z0-9 \\n]{0,100}") {
        report(metrics.as_bytes(), samples.as_bytes())?;
    }

    #[test]
    fn report_extreme_metrics(rows in prop::collection::vec((prop_oneof![Just(0u64), Just(1), Just(u64::MAX), 2u64..50], metric_value(), metric_value()), 0..12),
                              cut in 0usize..8) {
        let metrics: String = rows
            .iter()
            .map(|(step, reward, kl)| {
                format!(
                    "{{\"step\": {step}, \"env/reward_mean\": {reward}, \"objective/kl\": {kl}, \
                     \"objective/entropy\": {reward}, \"ppo/loss/total\": {kl}, \
                     \"ppo/loss/policy\": {reward}, \"ppo/loss/value\": {kl}}}\n"
                )
            })
            .collect();
        // A torn last line, as a crash mid-write leaves.
        let metrics = &metrics.as_bytes()[..metrics.len().saturating_sub(cut)];
        let samples: String = rows
            .iter()
            .map(|(step, reward, _)| format!("{{\"step\": {step}, \"query\": \"<q>\", \"response\": \"&\", \"reward\": {reward}}}\n"))
            .collect();
        report(metrics, samples.as_bytes())?;
    }
}
