//! The one settings pattern: defaults (the library's), under a `--config` file, under the
//! flags typed on the command line.

use clap::Parser;
use lathe_cli::commands::ppo::PpoArgs;
use lathe_cli::commands::reward::RewardTrainArgs;
use lathe_cli::commands::sft::{SftArgs, SftConfig};

#[derive(Parser)]
struct Sft {
    #[command(flatten)]
    args: SftArgs,
}

#[derive(Parser)]
struct Reward {
    #[command(flatten)]
    args: RewardTrainArgs,
}

#[derive(Parser)]
struct Ppo {
    #[command(flatten)]
    args: PpoArgs,
}

fn config_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("lathe-settings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn sft_flags_win_over_the_file_which_wins_over_the_defaults() {
    let file = config_file("sft.toml", "lr = 0.01\nbatch_size = 2\nmax_steps = 7\n");
    let parsed = Sft::try_parse_from([
        "sft",
        "--model",
        "m",
        "--data",
        "d",
        "--out",
        "o",
        "--config",
        file.to_str().unwrap(),
        "--batch-size",
        "4",
        "--gradient-checkpointing",
        "false",
        "--target-modules",
        "q_proj,v_proj",
    ])
    .unwrap();
    let config = parsed.args.settings().unwrap();
    let want = SftConfig {
        lr: 0.01,
        batch_size: 4,
        max_steps: Some(7),
        gradient_checkpointing: false,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        ..SftConfig::default()
    };
    assert_eq!(config, want);
    // No file, no flags: the library's defaults exactly.
    let bare = Sft::try_parse_from(["sft", "--model", "m", "--data", "d", "--out", "o"]).unwrap();
    assert_eq!(bare.args.settings().unwrap(), SftConfig::default());
}

#[test]
fn an_unknown_key_in_a_config_file_is_refused_with_its_name() {
    let file = config_file("bad.toml", "lr = 0.01\nlearning_rate = 0.1\n");
    let parsed = Sft::try_parse_from([
        "sft",
        "--model",
        "m",
        "--data",
        "d",
        "--out",
        "o",
        "--config",
        file.to_str().unwrap(),
    ])
    .unwrap();
    let e = format!("{:#}", parsed.args.settings().unwrap_err());
    assert!(e.contains("learning_rate"), "{e}");
}

#[test]
fn a_bare_switch_is_true_and_false_turns_it_off() {
    let on = Reward::try_parse_from([
        "reward-train",
        "--encoder",
        "e",
        "--data",
        "d",
        "--out",
        "o",
        "--lora",
        "--lora-r",
        "4",
    ])
    .unwrap();
    let settings = on.args.settings().unwrap();
    assert!(settings.lora);
    assert_eq!(settings.lora_r, 4);
    let file = config_file("reward.toml", "lora = true\nepochs = 3\n");
    let off = Reward::try_parse_from([
        "reward-train",
        "--encoder",
        "e",
        "--data",
        "d",
        "--out",
        "o",
        "--config",
        file.to_str().unwrap(),
        "--lora",
        "false",
    ])
    .unwrap();
    let settings = off.args.settings().unwrap();
    assert!(!settings.lora);
    assert_eq!(settings.epochs, 3);
    assert_eq!(
        settings.batch_size, 32,
        "the default of lathe-reward's TrainConfig"
    );
}

#[test]
fn ppo_flags_reach_both_sections_over_the_file() {
    let file = config_file(
        "ppo.toml",
        "[ppo]\nbatch_size = 8\nmini_batch_size = 2\nkl_penalty = \"abs\"\n\n[run]\nsteps = 5\n\
         query_length = { min = 3, max = 4 }\n",
    );
    let parsed = Ppo::try_parse_from([
        "ppo",
        "--model",
        "m",
        "--reward",
        "r",
        "--data",
        "d",
        "--out",
        "o",
        "--config",
        file.to_str().unwrap(),
        "--mini-batch-size",
        "4",
        "--response-length",
        "2-9",
        "--early-stopping",
        "--max-grad-norm",
        "0.5",
    ])
    .unwrap();
    let settings = parsed.args.settings().unwrap();
    assert_eq!(settings.ppo.batch_size, 8);
    assert_eq!(settings.ppo.mini_batch_size, 4);
    assert_eq!(settings.ppo.kl_penalty, lathe_ppo::math::KlPenalty::Abs);
    assert!(settings.ppo.early_stopping);
    assert_eq!(settings.ppo.max_grad_norm, Some(0.5));
    assert_eq!(settings.run.steps, 5);
    assert_eq!(
        (settings.run.query_length.min, settings.run.query_length.max),
        (3, 4)
    );
    assert_eq!(
        (
            settings.run.response_length.min,
            settings.run.response_length.max
        ),
        (2, 9)
    );
    assert_eq!(
        settings.ppo.learning_rate,
        lathe_ppo::PpoConfig::default().learning_rate
    );
    // A malformed range is a parse error naming the form.
    let e = Ppo::try_parse_from([
        "ppo",
        "--model",
        "m",
        "--reward",
        "r",
        "--data",
        "d",
        "--out",
        "o",
        "--query-length",
        "2..7",
    ])
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("MIN-MAX"), "{e}");
}
