//! Files a training run keeps in its folder, shared by `lathe sft` and `lathe ppo`:
//! JSONL logs reopened on a resume, the optimizer's moments, and checkpoint folders
//! replaced in one rename.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use lathe_core::optim::Adam;
use lathe_core::{Device, Tensor};

/// A JSONL log for appending. On a resume from step `start`, the lines of later steps (written
/// by the interrupted run after its checkpoint) are dropped, so the file reads as one run.
pub fn reopen_jsonl(path: &Path, start: usize) -> Result<std::fs::File> {
    let kept: Vec<String> = if start > 0 && path.is_file() {
        std::fs::read_to_string(path)?
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= start)
            })
            .map(str::to_string)
            .collect()
    } else {
        Vec::new()
    };
    let mut file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    for line in kept {
        writeln!(file, "{line}")?;
    }
    Ok(file)
}

/// Adam's (m, v) of every parameter as `m.{i}` / `v.{i}` in a safetensors file.
pub fn save_moments(adam: &Adam, path: &Path) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for i in 0..adam.params().len() {
        let (m, v) = adam.moments(i).expect("one state per parameter");
        tensors.push((format!("m.{i}"), m.detach()));
        tensors.push((format!("v.{i}"), v.detach()));
    }
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    lathe_core::safetensors::save(path, &named, None)?;
    Ok(())
}

/// The `n` (m, v) pairs [`save_moments`] wrote.
pub fn load_moments(path: &Path, n: usize, device: &Device) -> Result<Vec<(Tensor, Tensor)>> {
    let saved = lathe_core::safetensors::load(path, device)?;
    let find = |key: String| {
        saved
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, t)| t.clone())
            .with_context(|| format!("{} lacks {key}", path.display()))
    };
    (0..n)
        .map(|i| Ok((find(format!("m.{i}"))?, find(format!("v.{i}"))?)))
        .collect()
}

/// Moves the complete folder `temp` to `target`, replacing what was there, so a crash leaves
/// either the old folder or the new one (at worst as `<target>.old`).
pub fn replace_dir(temp: &Path, target: &Path) -> Result<()> {
    let mut old = target.as_os_str().to_owned();
    old.push(".old");
    let old = std::path::PathBuf::from(old);
    let _ = std::fs::remove_dir_all(&old);
    if target.exists() {
        std::fs::rename(target, &old)
            .with_context(|| format!("moving {} aside", target.display()))?;
    }
    std::fs::rename(temp, target)
        .with_context(|| format!("renaming {} to {}", temp.display(), target.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}
