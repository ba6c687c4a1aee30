//! Data-parallel `lathe sft` under `mpirun` (feature `mpi`; `cargo xtask test` runs it with
//! Open MPI installed): two ranks train as one process with the same global batch, bit for
//! bit; Ctrl-C on one rank stops all at one step and the resumed run equals the
//! uninterrupted one; a killed rank ends the job; ranks given different settings refuse to
//! start; commands that are not data parallel refuse several ranks.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{fixture_model, scratch_in};
use lathe_core::safetensors;
use lathe_core::Device;

fn scratch(name: &str) -> PathBuf {
    scratch_in("mpi", name)
}

/// A small repetitive corpus (the one of sft_merge.rs), as a text file in `dir`.
fn corpus(dir: &Path) -> PathBuf {
    let text: String = sentences(120).iter().map(|l| format!("{l}\n")).collect();
    let path = dir.join("texts.txt");
    std::fs::write(&path, text).unwrap();
    path
}

/// `n` ten-word sentences over a few words.
fn sentences(n: usize) -> Vec<String> {
    let words = [
        "the", "film", "was", "great", "and", "the", "cast", "was", "fine",
    ];
    (0..n)
        .map(|i| {
            let line: Vec<&str> = (0..10)
                .map(|j| words[(i * 7 + j * 3) % words.len()])
                .collect();
            line.join(" ")
        })
        .collect()
}

/// Every tensor of the safetensors file `file` in `a` and in `b` (the same names, in order)
/// within `tolerance` relative L2 norm.
fn assert_tensors_close(a: &Path, b: &Path, file: &str, tolerance: f64) {
    let load = |dir: &Path| safetensors::load(&dir.join(file), &Device::Cpu).unwrap();
    let (ta, tb) = (load(a), load(b));
    assert_eq!(ta.len(), tb.len());
    for ((name, x), (other, y)) in ta.iter().zip(&tb) {
        assert_eq!(name, other);
        let (x, y) = (x.to_vec_f32().unwrap(), y.to_vec_f32().unwrap());
        let diff: f64 = x
            .iter()
            .zip(&y)
            .map(|(p, q)| f64::from(p - q).powi(2))
            .sum();
        let norm: f64 = x.iter().map(|p| f64::from(*p).powi(2)).sum();
        assert!(
            diff.sqrt() <= tolerance * norm.sqrt(),
            "{name}: relative difference {}",
            (diff / norm).sqrt()
        );
    }
}

fn relative(x: f64, y: f64) -> f64 {
    (x - y).abs() / x.abs().max(f64::MIN_POSITIVE)
}

/// `lathe sft` flags of the runs compared here: dropout on, held-out blocks, warm-up.
fn sft_args(data: &Path, out: &Path, steps: usize, grad_accum: usize) -> Vec<String> {
    [
        "sft",
        "--model",
        fixture_model().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--block-size",
        "24",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--lora-r",
        "4",
        "--lora-dropout",
        "0.1",
        "--eval-fraction",
        "0.1",
        "--eval-every",
        "5",
        "--save-every",
        "10",
        "--seed",
        "5",
        "--device",
        "cpu",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--max-steps".into(),
        steps.to_string(),
        "--grad-accum".into(),
        grad_accum.to_string(),
    ])
    .collect()
}

/// `mpirun -np <ranks> lathe <args>` (as root in CI, more ranks than cores), one CPU
/// thread per rank.
fn mpirun(ranks: usize, args: &[String]) -> Command {
    let mut command = Command::new("mpirun");
    command
        .args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(ranks.to_string())
        .args(["-x", "RAYON_NUM_THREADS=1"])
        .arg(env!("CARGO_BIN_EXE_lathe"))
        .args(args);
    command
}

fn run(mut command: Command) -> Output {
    let out = command
        .output()
        .expect("mpirun (Open MPI) must be installed");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// metrics.jsonl without the wall-clock fields.
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("elapsed_s");
            o.remove("tokens_per_s");
            // Only a job of several ranks reduces anything.
            o.remove("reduced_bytes");
            v
        })
        .collect()
}

#[test]
fn two_ranks_train_as_one_process_with_the_same_global_batch() {
    let dir = scratch("equal");
    let data = corpus(&dir);
    // 4 blocks x 2 micro-batches a step: one process accumulating both, or two ranks of one.
    let (one, two) = (dir.join("one"), dir.join("two"));
    assert!(run(mpirun(1, &sft_args(&data, &one, 12, 2)))
        .status
        .success());
    assert!(run(mpirun(2, &sft_args(&data, &two, 12, 1)))
        .status
        .success());
    let (m1, m2) = (metrics(&one), metrics(&two));
    assert_eq!(m1.len(), 12);
    assert!(m1.iter().filter(|m| m.get("eval_loss").is_some()).count() >= 2);
    // The same micro-batches added in the same order: bit for bit.
    assert_eq!(m1, m2);
    assert_eq!(
        std::fs::read(one.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(two.join("adapter_model.safetensors")).unwrap()
    );
    // Two micro-batches on each rank: the sums are regrouped, equal to f32 rounding.
    let (four, two_by_two) = (dir.join("four"), dir.join("two_by_two"));
    assert!(run(mpirun(1, &sft_args(&data, &four, 12, 4)))
        .status
        .success());
    assert!(run(mpirun(2, &sft_args(&data, &two_by_two, 12, 2)))
        .status
        .success());
    for (a, b) in metrics(&four).iter().zip(metrics(&two_by_two)) {
        for key in ["loss", "grad_norm"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(relative(x, y) <= 1e-6, "{key}: {x} vs {y}");
        }
    }
    assert_tensors_close(&four, &two_by_two, "adapter_model.safetensors", 1e-6);
    // Only rank 0 wrote: one line a step.
    assert_eq!(metrics(&two).len(), 12);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pids of `parent`'s children (the ranks mpirun started on this machine).
fn children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        if after.split(' ').nth(1) == Some(&parent.to_string()) {
            out.push(pid);
        }
    }
    out
}

/// Waits until `out/metrics.jsonl` has `lines` lines (the job is well under way), then
/// sends `signal` to one of `job`'s ranks; returns the job's exit status and how long it
/// took to end after the signal.
fn signal_a_rank(
    mut job: Child,
    out: &Path,
    lines: usize,
    signal: &str,
) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        let logged = std::fs::read_to_string(out.join("metrics.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if logged >= lines {
            break;
        }
        assert!(
            job.try_wait().unwrap().is_none(),
            "the job ended before it logged {lines} steps"
        );
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ranks = children(job.id());
    assert_eq!(ranks.len(), 2, "mpirun's children: {ranks:?}");
    // The shell's own kill: no procps needed.
    let killed = Command::new("sh")
        .args(["-c", &format!("kill {signal} {}", ranks[1])])
        .status()
        .unwrap();
    assert!(killed.success());
    let signalled = Instant::now();
    loop {
        if let Some(status) = job.try_wait().unwrap() {
            return (status, signalled.elapsed());
        }
        if signalled.elapsed() > Duration::from_secs(60) {
            let _ = job.kill();
            panic!("the job was still running 60 s after a rank got {signal}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn checkpoint_step(out: &Path) -> u64 {
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoint/trainer_state.json")).unwrap(),
    )
    .unwrap();
    state["step"].as_u64().unwrap()
}

const LONG_RUN: usize = 4000;

#[test]
fn ctrl_c_on_one_rank_stops_all_and_the_resumed_run_equals_the_uninterrupted_one() {
    let dir = scratch("resume");
    let data = corpus(&dir);
    let (whole, resumed) = (dir.join("whole"), dir.join("resumed"));
    assert!(run(mpirun(2, &sft_args(&data, &whole, LONG_RUN, 1)))
        .status
        .success());
    let job = mpirun(2, &sft_args(&data, &resumed, LONG_RUN, 1))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (status, _) = signal_a_rank(job, &resumed, 30, "-INT");
    // Both ranks saved and exited 130, as one process does on Ctrl-C.
    assert_eq!(status.code(), Some(130), "{status:?}");
    let stopped_at = checkpoint_step(&resumed);
    assert!(stopped_at >= 30 && (stopped_at as usize) < LONG_RUN);
    assert!(!resumed.join("adapter_model.safetensors").exists());
    let out = run(mpirun(2, &sft_args(&data, &resumed, LONG_RUN, 1)));
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("resuming at step {stopped_at}"))
    );
    assert_eq!(metrics(&whole), metrics(&resumed));
    assert_eq!(
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(resumed.join("adapter_model.safetensors")).unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_rank_ends_the_job_and_the_last_checkpoint_is_intact() {
    let dir = scratch("killed");
    let data = corpus(&dir);
    let out = dir.join("run");
    let job = mpirun(2, &sft_args(&data, &out, LONG_RUN, 1))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (status, took) = signal_a_rank(job, &out, 30, "-KILL");
    assert!(!status.success());
    eprintln!("the job ended {took:?} after a rank was killed");
    // The checkpoint on disk is a whole one, and a rerun resumes from it.
    let step = checkpoint_step(&out);
    assert!(step >= 10 && (step as usize) < LONG_RUN);
    let rerun = run(mpirun(2, &sft_args(&data, &out, step as usize + 10, 1)));
    // Another --max-steps is another schedule: refused as a different run, naming it.
    assert!(!rerun.status.success());
    assert!(String::from_utf8_lossy(&rerun.stderr).contains("max_steps"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ranks_given_different_settings_refuse_to_start() {
    let dir = scratch("differ");
    let data = corpus(&dir);
    let out = dir.join("run");
    let mine = sft_args(&data, &out, 12, 1);
    let mut theirs = mine.clone();
    let at = theirs.iter().position(|a| a == "--lr").unwrap();
    theirs[at + 1] = "1e-3".into();
    let mut command = Command::new("mpirun");
    command
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "1"])
        .arg(env!("CARGO_BIN_EXE_lathe"))
        .args(&mine)
        .args([":", "-np", "1"])
        .arg(env!("CARGO_BIN_EXE_lathe"))
        .args(&theirs);
    let result = run(command);
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("settings of rank 1 and rank 0 differ: lr 0.003 (rank 0) vs 0.001"),
        "{stderr}"
    );
    assert!(!out.exists(), "nothing is written by a refused job");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn commands_that_are_not_data_parallel_refuse_several_ranks() {
    let result = run(mpirun(
        2,
        &[
            "generate".to_string(),
            "--model".into(),
            fixture_model().to_str().unwrap().into(),
            "the film".into(),
        ],
    ));
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr)
        .contains("lathe generate does not run data parallel"));
}

/// Labelled sentences for the tiny BERT encoder, as JSONL in `dir`.
fn labelled(dir: &Path) -> PathBuf {
    let (pos, neg) = (
        ["good", "great", "excellent", "wonderful", "loved"],
        ["bad", "terrible", "awful", "boring", "hated"],
    );
    let lines: String = (0..60)
        .map(|i| {
            let (word, label) = if i % 2 == 0 {
                (pos[i / 2 % 5], 1)
            } else {
                (neg[i / 2 % 5], 0)
            };
            format!("{{\"text\": \"the movie was {word}\", \"label\": {label}}}\n")
        })
        .collect();
    let path = dir.join("labelled.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

fn reward_args(data: &Path, out: &Path) -> Vec<String> {
    let encoder = common::repo("reward/tests/fixtures/tiny_bert");
    [
        "reward-train",
        "--encoder",
        encoder.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--test-data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "5",
        "--lora",
        "--lora-epochs",
        "3",
        "--lora-r",
        "2",
        "--lora-batch-size",
        "8",
        "--device",
        "cpu",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn reward_training_on_two_ranks_equals_one_process() {
    let dir = scratch("reward");
    let data = labelled(&dir);
    let (one, two) = (dir.join("one"), dir.join("two"));
    assert!(run(mpirun(1, &reward_args(&data, &one))).status.success());
    assert!(run(mpirun(2, &reward_args(&data, &two))).status.success());
    let epochs = |out: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (e1, e2) = (epochs(&one), epochs(&two));
    assert_eq!(e1.len(), 8, "5 head epochs, 3 LoRA epochs");
    assert_eq!(e1.len(), e2.len());
    for (a, b) in e1.iter().zip(&e2) {
        for key in ["train_loss", "train_accuracy", "val_loss", "val_accuracy"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            if a["stage"] == "head" {
                // Pooled states computed batch by batch as one process does: the same bits.
                assert_eq!(x, y, "{key} of head epoch {}", a["epoch"]);
            } else {
                assert!(relative(x, y) <= 1e-6, "{key}: {x} vs {y}");
            }
        }
    }
    assert_tensors_close(&one, &two, "model.safetensors", 1e-6);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `lathe ppo` on the tiny model with the tiny DistilBERT reward model: 8 samples a step,
/// backward batches of 2 minibatches of 2 (one minibatch per rank on 2 ranks).
fn ppo_args(dir: &Path, out: &Path, steps: usize) -> Vec<String> {
    let data = dir.join("prompts.jsonl");
    let records: String = sentences(40)
        .iter()
        .map(|line| serde_json::json!({ "text": line }).to_string() + "\n")
        .collect();
    std::fs::write(&data, records).unwrap();
    let config = dir.join("ppo.toml");
    std::fs::write(
        &config,
        "[ppo]\nbatch_size = 8\nmini_batch_size = 2\ngradient_accumulation_steps = 2\n\
         ppo_epochs = 2\nlearning_rate = 1e-3\nseed = 4\n\n\
         [run]\nsave_every = 2\nlora_r = 4\nlora_alpha = 8.0\n\
         query_length = { min = 2, max = 4 }\nresponse_length = { min = 2, max = 5 }\n",
    )
    .unwrap();
    let reward = common::repo("reward/tests/fixtures/tiny_distilbert");
    [
        "ppo",
        "--device",
        "cpu",
        "--model",
        fixture_model().to_str().unwrap(),
        "--reward",
        reward.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["--steps".to_string(), steps.to_string()])
    .collect()
}

/// metrics.jsonl of a PPO run without its timings.
fn ppo_metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut()
                .unwrap()
                .retain(|k, _| !k.starts_with("time/"));
            v
        })
        .collect()
}

#[test]
fn ppo_on_two_ranks_equals_one_process() {
    let dir = scratch("ppo");
    let (one, two) = (dir.join("one"), dir.join("two"));
    assert!(run(mpirun(1, &ppo_args(&dir, &one, 4))).status.success());
    assert!(run(mpirun(2, &ppo_args(&dir, &two, 4))).status.success());
    // Each rank generated half of every step's samples, with those rows' sampling streams;
    // everything the step computes over the batch is computed over all 8 on every rank.
    assert_eq!(
        std::fs::read_to_string(one.join("samples.jsonl")).unwrap(),
        std::fs::read_to_string(two.join("samples.jsonl")).unwrap()
    );
    let (m1, m2) = (ppo_metrics(&one), ppo_metrics(&two));
    assert_eq!(m1.len(), 4);
    assert!(m1[0].get("ppo/loss/total").is_some());
    // One minibatch per rank per backward batch: the bits of one process.
    assert_eq!(m1, m2);
    for file in ["adapter_model.safetensors", "value_head.safetensors"] {
        assert_eq!(
            std::fs::read(one.join(file)).unwrap(),
            std::fs::read(two.join(file)).unwrap(),
            "{file}"
        );
    }
    assert!(two.join("report.html").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_interrupted_ppo_job_resumes_as_the_uninterrupted_one() {
    let dir = scratch("ppo-resume");
    let (whole, resumed) = (dir.join("whole"), dir.join("resumed"));
    let steps = 300;
    assert!(run(mpirun(2, &ppo_args(&dir, &whole, steps)))
        .status
        .success());
    let job = mpirun(2, &ppo_args(&dir, &resumed, steps))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (status, _) = signal_a_rank(job, &resumed, 6, "-INT");
    assert_eq!(status.code(), Some(130), "{status:?}");
    let stopped_at = checkpoint_step(&resumed);
    assert!(stopped_at >= 6 && (stopped_at as usize) < steps);
    assert!(run(mpirun(2, &ppo_args(&dir, &resumed, steps)))
        .status
        .success());
    assert_eq!(ppo_metrics(&whole), ppo_metrics(&resumed));
    assert_eq!(
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(resumed.join("adapter_model.safetensors")).unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
