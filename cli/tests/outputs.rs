//! Outputs are never wrong and never destroyed: `--out` naming a directory is refused before
//! anything loads and leaves nothing; a FIFO is streamed into and a symlink written through
//! (both stay what they were); and every command that writes, run on a full disk (a small
//! tmpfs, filled), exits non-zero naming the problem, leaves no partial, empty or temporary
//! file, and keeps the earlier good output byte for byte.
//!
//! The disk-full tests mount a tmpfs, which needs root (CI runs the tests as root); where
//! the mount fails each prints that it is skipped.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use lathe_cli::commands::sft::SftConfig;
use lathe_core::Device;
use lathe_models::pretrained::{Precision, Pretrained};

mod common;
use common::{fixture_model, lathe, path, repo, snapshot, stderr, strings};

fn scratch(name: &str) -> PathBuf {
    common::scratch_in("outputs", name)
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn generate_argv(out: &Path) -> Vec<String> {
    strings(&[
        "generate",
        "--device",
        "cpu",
        "--model",
        &path(&fixture_model()),
        "--max-new-tokens",
        "3",
        "--out",
        &path(out),
        "hello world",
    ])
}

fn eval_argv(text: &Path, out: &Path) -> Vec<String> {
    strings(&[
        "eval",
        "--device",
        "cpu",
        "--model",
        &path(&fixture_model()),
        &path(text),
        "--out",
        &path(out),
    ])
}

#[test]
fn out_naming_a_directory_is_refused_up_front_and_leaves_nothing() {
    let dir = scratch("dir");
    let text = dir.join("text.txt");
    std::fs::write(&text, "the film was great and the cast was fine").unwrap();
    let target = dir.join("results");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("keep.txt"), "earlier").unwrap();
    let before = names(&dir);
    let inside = snapshot(&target);
    for argv in [generate_argv(&target), eval_argv(&text, &target)] {
        let o = lathe(&argv);
        let err = stderr(&o);
        assert!(!o.status.success(), "{err}");
        assert!(err.contains("is a directory"), "{err}");
        // Refused before the model loads.
        assert!(!err.contains("loaded "), "{err}");
        assert_eq!(names(&dir), before, "{err}");
        assert_eq!(snapshot(&target), inside);
    }
}

#[test]
fn a_fifo_is_streamed_into_and_a_symlink_written_through() {
    use std::os::unix::fs::FileTypeExt;
    let dir = scratch("special");
    let fifo = dir.join("pipe");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
    };
    let o = lathe(&generate_argv(&fifo));
    assert!(o.status.success(), "{}", stderr(&o));
    let streamed = reader.join().unwrap();
    assert!(streamed.starts_with("hello world"), "{streamed:?}");
    let kind = std::fs::symlink_metadata(&fifo).unwrap().file_type();
    assert!(kind.is_fifo(), "the FIFO was replaced: {kind:?}");

    // A symlink: the file it points to gets the output (atomically), the link stays.
    let target = dir.join("real.txt");
    std::fs::write(&target, "earlier").unwrap();
    let link = dir.join("link.txt");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let o = lathe(&generate_argv(&link));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_link(&link).unwrap(), target);
    let written = std::fs::read_to_string(&target).unwrap();
    assert_eq!(written, streamed, "the same command's output");
    assert_eq!(names(&dir), ["link.txt", "pipe", "real.txt"]);

    // A dangling link is refused, and stays as it was.
    let dangling = dir.join("dangling.txt");
    std::os::unix::fs::symlink(dir.join("missing/none.txt"), &dangling).unwrap();
    let o = lathe(&generate_argv(&dangling));
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("cannot be resolved"), "{err}");
    assert!(std::fs::symlink_metadata(&dangling)
        .unwrap()
        .file_type()
        .is_symlink());
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct FullDisk {
    dir: PathBuf,
}

impl FullDisk {
    /// Mounts a tmpfs of `kib` KiB at a fresh folder, or None (printed) where mounting is
    /// not allowed.
    fn mount(name: &str, kib: usize) -> Option<FullDisk> {
        let dir = scratch(&format!("tmpfs-{name}"));
        let result = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(&dir)
            .output();
        match result {
            Ok(o) if o.status.success() => Some(FullDisk { dir }),
            Ok(o) => {
                println!(
                    "SKIPPED {name}: cannot mount a tmpfs (the disk-full tests need root): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                eprintln!("SKIPPED {name}: cannot mount a tmpfs");
                None
            }
            Err(e) => {
                println!("SKIPPED {name}: cannot run mount: {e}");
                eprintln!("SKIPPED {name}: cannot run mount: {e}");
                None
            }
        }
    }

    /// Takes every free byte with a filler file (checked: one more byte does not fit).
    fn fill(&self) {
        let mut filler = std::fs::File::create(self.dir.join(".filler")).unwrap();
        for chunk in [1 << 16, 1 << 12, 1] {
            let bytes = vec![0u8; chunk];
            while filler.write_all(&bytes).is_ok() {}
        }
        let _ = filler.flush();
        assert!(
            std::fs::write(self.dir.join(".probe"), b"x").is_err(),
            "the tmpfs is not full"
        );
        let _ = std::fs::remove_file(self.dir.join(".probe"));
    }

    /// Everything on the disk but the filler.
    fn contents(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut all = snapshot(&self.dir);
        all.remove(Path::new(".filler"));
        all
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `argv` on the full disk: non-zero, a message naming the full disk, and the disk's
/// contents exactly as before.
fn fails_cleanly(disk: &FullDisk, argv: &[String]) -> String {
    let before = disk.contents();
    let o = lathe(argv);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "{argv:?} succeeded on a full disk: {err}"
    );
    assert!(err.contains("No space left on device"), "{argv:?}: {err}");
    assert!(
        disk.contents() == before,
        "{argv:?} changed the disk: before {:?}, after {:?}\n{err}",
        before.keys().collect::<Vec<_>>(),
        disk.contents().keys().collect::<Vec<_>>()
    );
    err
}

#[test]
fn generate_and_eval_on_a_full_disk_keep_the_earlier_output() {
    let Some(disk) = FullDisk::mount("generate", 256) else {
        return;
    };
    let text = scratch("eval-text").join("text.txt");
    std::fs::write(&text, "the film was great and the cast was fine").unwrap();
    let out = disk.dir.join("out.txt");
    std::fs::write(&out, "the earlier good output\n").unwrap();
    disk.fill();
    fails_cleanly(&disk, &generate_argv(&out));
    fails_cleanly(&disk, &eval_argv(&text, &out));
}

fn sft_texts(dir: &Path) -> PathBuf {
    let words = ["the", "film", "was", "great", "and", "cast", "fine"];
    let lines: Vec<String> = (0..60)
        .map(|i| {
            (0..10)
                .map(|j| words[(i * 5 + j * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let data = dir.join("texts.txt");
    std::fs::write(&data, lines.join("\n")).unwrap();
    data
}

fn sft_config(steps: usize) -> SftConfig {
    SftConfig {
        block_size: 16,
        batch_size: 2,
        lora_r: 2,
        lora_alpha: 4.0,
        max_steps: Some(steps),
        save_every: 1,
        ..SftConfig::default()
    }
}

/// A 2-step SFT run into `out` (a library run, as the CLI's with the defaults).
fn sft_adapter(data: &Path, out: &Path, steps: usize, stop_after: Option<usize>) {
    let mut pretrained = Pretrained::load(&fixture_model(), &Device::Cpu, Precision::F32).unwrap();
    let texts = lathe_cli::texts::read_texts(data, "text").unwrap();
    let config = sft_config(steps);
    let blocks =
        lathe_cli::commands::sft::pack(&texts, &pretrained.tokenizer, 16, config.eval_fraction)
            .unwrap();
    lathe_cli::commands::sft::train_until(
        &mut pretrained.model,
        &blocks,
        &config,
        out,
        &Device::Cpu,
        stop_after,
    )
    .unwrap();
}

/// SFT resumed on a full disk: the step's checkpoint cannot be saved; the error says so, the
/// checkpoint of the step before stays byte for byte, no temporary folder, adapter or
/// run.json appears, and metrics.jsonl keeps its earlier lines (a log of the steps run: the
/// failed step's line may follow them).
#[test]
fn sft_on_a_full_disk_keeps_the_last_checkpoint() {
    let Some(disk) = FullDisk::mount("sft", 1024) else {
        return;
    };
    let data = sft_texts(&scratch("sft-data"));
    let out = disk.dir.join("run");
    sft_adapter(&data, &out, 3, Some(2));
    let checkpoint = snapshot(&out.join("checkpoint"));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    disk.fill();
    let o = lathe(&strings(&[
        "sft",
        "--device",
        "cpu",
        "--model",
        &path(&fixture_model()),
        "--data",
        &path(&data),
        "--block-size",
        "16",
        "--batch-size",
        "2",
        "--lora-r",
        "2",
        "--lora-alpha",
        "4",
        "--max-steps",
        "3",
        "--save-every",
        "1",
        "--out",
        &path(&out),
    ]));
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("resuming at step 2"), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(snapshot(&out.join("checkpoint")), checkpoint, "{err}");
    assert_eq!(names(&out), ["checkpoint", "metrics.jsonl"], "{err}");
    let after = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(after.starts_with(&metrics), "{after}");
}

const PPO_TOML: &str = "[ppo]\nbatch_size = 4\nmini_batch_size = 2\nppo_epochs = 1\n\
    learning_rate = 1e-3\n\n[run]\nsteps = 2\nsave_every = 1\nlora_r = 2\nlora_alpha = 4.0\n\
    query_length = { min = 2, max = 3 }\nresponse_length = { min = 2, max = 3 }\n";

#[test]
fn ppo_on_a_full_disk_keeps_the_last_checkpoint() {
    let Some(disk) = FullDisk::mount("ppo", 1024) else {
        return;
    };
    let dir = scratch("ppo-data");
    let data = dir.join("texts.txt");
    std::fs::write(
        &data,
        "The film was great\nA slow, boring plot\nActors did well here\nI loved it\n",
    )
    .unwrap();
    let config = dir.join("ppo.toml");
    std::fs::write(&config, PPO_TOML).unwrap();
    let out = disk.dir.join("run");
    // Step 1 of 2 through the library (the reward: the text's length).
    let file: lathe_cli::commands::ppo::PpoFile = toml::from_str(PPO_TOML).unwrap();
    let pretrained = Pretrained::load(&fixture_model(), &Device::Cpu, Precision::F32).unwrap();
    let texts = lathe_cli::texts::read_texts(&data, "text").unwrap();
    let mut reward = |texts: &[String]| -> lathe_ppo::Result<Vec<f32>> {
        Ok(texts.iter().map(|t| t.len() as f32 / 10.0).collect())
    };
    let prompts = lathe_ppo::Prompts::cut_from_texts(&pretrained.tokenizer, &texts).unwrap();
    lathe_cli::commands::ppo::train(
        pretrained.model,
        &pretrained.tokenizer,
        prompts,
        &mut reward,
        &file,
        &out,
        &Device::Cpu,
        &AtomicBool::new(false),
        Some(1),
    )
    .unwrap();
    let checkpoint = snapshot(&out.join("checkpoint"));
    disk.fill();
    let o = lathe(&strings(&[
        "ppo",
        "--device",
        "cpu",
        "--model",
        &path(&fixture_model()),
        "--reward",
        &path(&repo("reward/tests/fixtures/tiny_distilbert")),
        "--data",
        &path(&data),
        "--config",
        &path(&config),
        "--out",
        &path(&out),
    ]));
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("ppo: resuming at step 1 of 2"), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(snapshot(&out.join("checkpoint")), checkpoint, "{err}");
    assert_eq!(
        names(&out),
        ["checkpoint", "metrics.jsonl", "samples.jsonl"],
        "{err}"
    );
}

/// merge and reward-train on a full disk: nothing appears (not their folder, not a
/// temporary one), and what the disk held stays.
#[test]
fn merge_and_reward_train_on_a_full_disk_leave_nothing() {
    let Some(disk) = FullDisk::mount("merge", 256) else {
        return;
    };
    let work = scratch("merge-work");
    let data = sft_texts(&work);
    let adapter = work.join("sft");
    sft_adapter(&data, &adapter, 1, None);
    std::fs::write(disk.dir.join("earlier.txt"), "an earlier good output").unwrap();
    disk.fill();
    fails_cleanly(
        &disk,
        &strings(&[
            "merge",
            "--model",
            &path(&fixture_model()),
            "--adapter",
            &path(&adapter),
            "--out",
            &path(&disk.dir.join("merged")),
        ]),
    );
    let mut lines = String::new();
    for i in 0..20 {
        let (word, label) = if i % 2 == 0 { ("good", 1) } else { ("bad", 0) };
        lines += &format!("{{\"text\": \"the movie was {word}\", \"label\": {label}}}\n");
    }
    let labelled = work.join("labelled.jsonl");
    std::fs::write(&labelled, lines).unwrap();
    fails_cleanly(
        &disk,
        &strings(&[
            "reward-train",
            "--encoder",
            &path(&repo("reward/tests/fixtures/tiny_bert")),
            "--data",
            &path(&labelled),
            "--epochs",
            "2",
            "--out",
            &path(&disk.dir.join("reward")),
        ]),
    );
}

/// `lathe report` on a full disk: the earlier report and plots stay, no temporary is left.
#[test]
fn report_on_a_full_disk_keeps_the_earlier_report() {
    let Some(disk) = FullDisk::mount("report", 512) else {
        return;
    };
    let run = disk.dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let mut metrics = String::new();
    let mut samples = String::new();
    for step in 1..=3 {
        metrics += &format!(
            "{{\"step\": {step}, \"env/reward_mean\": {}, \"objective/kl\": 0.1}}\n",
            step as f64 / 10.0
        );
        samples += &format!(
            "{{\"step\": {step}, \"query\": \"a\", \"response\": \"b\", \"reward\": 0.5}}\n"
        );
    }
    std::fs::write(run.join("metrics.jsonl"), metrics).unwrap();
    std::fs::write(run.join("samples.jsonl"), samples).unwrap();
    let argv = strings(&["report", &path(&run)]);
    let first = lathe(&argv);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(run.join("report.html").is_file());
    disk.fill();
    fails_cleanly(&disk, &argv);
}
