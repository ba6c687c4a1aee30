//! What a checkpoint must match to be resumed: fingerprints of the run's inputs (the model,
//! the data, PPO's reward model) and its settings, stored in the trainer state and compared
//! on resume. A mismatch is refused with a message naming what differs; `--resume-anyway`
//! turns it into a warning, except for the LoRA settings that shape the adapters (a
//! checkpoint of other shapes cannot be continued at all).
//!
//! Fingerprints of files: a file up to [`FULL_HASH_LIMIT`] is hashed whole (sha256); a bigger
//! one by its size, its first and last MiB and 64 KiB at 16 evenly spaced offsets. Hashing a
//! 20B model's 40 GB whole would add minutes to every resume; a fine-tuned or re-quantized
//! model differs in essentially every weight, so the samples catch it, and a header change
//! (shapes, dtypes, metadata) is in the first MiB. What the sampled hash misses is a change
//! confined to bytes between the samples, which no tool that produces models makes.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{invalid, Context, Result};

/// Files up to this size are hashed whole.
pub const FULL_HASH_LIMIT: u64 = 64 << 20;

/// Fingerprints of a run's inputs as stored in its checkpoint. `None`: not known when the
/// checkpoint was written (a library caller that did not give it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Fingerprints {
    /// The base model's files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The training data as the trainer saw it (token ids, prompts or pairs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The reward model (PPO only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<String>,
}

/// What a caller knows of a run's inputs beyond what the trainer sees itself, and whether a
/// mismatch on resume is only warned about.
#[derive(Clone, Debug, Default)]
pub struct ResumeOptions {
    /// [`model_fingerprint`] of the model the run loaded.
    pub model: Option<String>,
    /// [`path_fingerprint`] of PPO's reward model.
    pub reward: Option<String>,
    /// `--resume-anyway`.
    pub anyway: bool,
}

fn hex(hasher: Sha256) -> String {
    format!("{:x}", hasher.finalize())
}

/// sha256 of `bytes`.
pub fn bytes_fingerprint(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    hex(h)
}

fn hash_file(path: &Path, h: &mut Sha256) -> Result<()> {
    let mut file =
        std::fs::File::open(path).context_with(|| format!("reading {}", path.display()))?;
    let size = file.metadata()?.len();
    h.update(size.to_le_bytes());
    if size <= FULL_HASH_LIMIT {
        std::io::copy(&mut file, h).context_with(|| format!("reading {}", path.display()))?;
        return Ok(());
    }
    let mut read_at = |offset: u64, len: u64, h: &mut Sha256| -> Result<()> {
        file.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; len as usize];
        file.read_exact(&mut buf)
            .context_with(|| format!("reading {}", path.display()))?;
        h.update(&buf);
        Ok(())
    };
    const MIB: u64 = 1 << 20;
    read_at(0, MIB, h)?;
    for k in 1..=16u64 {
        let offset = (size - 64 * 1024) / 17 * k;
        read_at(offset, 64 * 1024, h)?;
    }
    read_at(size - MIB, MIB, h)
}

/// A file's fingerprint, or a folder's: its regular files (hidden ones, such as temporary
/// files, left out) by name and content, in name order.
pub fn path_fingerprint(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .context_with(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for file in files {
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            hash_file(&file, &mut h)?;
        }
    } else {
        hash_file(path, &mut h)?;
    }
    Ok(hex(h))
}

/// The fingerprint of a model as a run uses it: its files and the precision it was loaded
/// in (an int8 model trains differently from the f32 one), plus an adapter merged into it.
pub fn model_fingerprint(model: &Path, precision: &str, adapter: Option<&Path>) -> Result<String> {
    let mut h = Sha256::new();
    h.update(path_fingerprint(model)?.as_bytes());
    h.update(precision.as_bytes());
    if let Some(adapter) = adapter {
        h.update(b"adapter");
        h.update(path_fingerprint(adapter)?.as_bytes());
    }
    Ok(hex(h))
}

/// The settings keys whose difference no `--resume-anyway` overrides: they shape the
/// adapters the checkpoint holds.
pub const LOCKED_KEYS: &[&str] = &["lora_r", "lora_alpha", "lora_dropout", "target_modules"];

/// Compares a checkpoint's inputs and settings with this run's; `checkpoint` names it in
/// the messages. Differences are an error naming each, or with `anyway` a warning.
pub fn check(
    command: &str,
    checkpoint: &Path,
    stored: Option<&Fingerprints>,
    now: &Fingerprints,
    stored_settings: &serde_json::Value,
    settings: &serde_json::Value,
    anyway: bool,
) -> Result<()> {
    let mut differences = Vec::new();
    let mut locked = Vec::new();
    match stored {
        None => differences.push(
            "the checkpoint records no fingerprints of its inputs (written by an older lathe), \
             so they cannot be checked"
                .to_string(),
        ),
        Some(stored) => {
            for (what, then, now) in [
                (
                    "the model (--model, its precision or --adapter)",
                    &stored.model,
                    &now.model,
                ),
                (
                    "the training data (--data, --text-field or the tokenizer)",
                    &stored.data,
                    &now.data,
                ),
                ("the reward model (--reward)", &stored.reward, &now.reward),
            ] {
                match (then, now) {
                    (Some(a), Some(b)) if a != b => differences.push(format!(
                        "{what} differs (fingerprint {} in the checkpoint, {} now)",
                        &a[..a.len().min(12)],
                        &b[..b.len().min(12)]
                    )),
                    // Not recorded (a library caller that did not know it wrote the
                    // checkpoint) or not known now: nothing to compare.
                    _ => {}
                }
            }
        }
    }
    let mut keys = Vec::new();
    diff_settings("", stored_settings, settings, &mut keys);
    for (key, then, now) in keys {
        let leaf = key.rsplit('.').next().unwrap_or(&key).to_string();
        let line = format!("setting {key}: {then} in the checkpoint, {now} now");
        if LOCKED_KEYS.contains(&leaf.as_str()) {
            locked.push(line);
        } else {
            differences.push(line);
        }
    }
    if !locked.is_empty() {
        invalid!(
            "{} holds a checkpoint of a run with another config whose adapters have other \
             shapes, which cannot be continued (not even with --resume-anyway):\n  {}\nuse \
             another --out, or delete the checkpoint to start over",
            checkpoint.display(),
            locked
                .iter()
                .chain(&differences)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
    if differences.is_empty() {
        return Ok(());
    }
    let list = differences.join("\n  ");
    if anyway {
        eprintln!(
            "{command}: warning: resuming {} anyway (--resume-anyway) although:\n  {list}",
            checkpoint.display()
        );
        return Ok(());
    }
    let config = if differences.iter().any(|d| d.starts_with("setting ")) {
        " with another config"
    } else {
        ""
    };
    invalid!(
        "{} holds a checkpoint of a run{config} that does not match this one:\n  {list}\nuse \
         another --out, delete the checkpoint to start over, or pass --resume-anyway to \
         continue it regardless",
        checkpoint.display()
    )
}

/// A setting's value as the user wrote it: the settings hold f32s, which JSON widens
/// (0.0002 reads 0.00019999999494757503), so a float that is an f32 prints as one.
fn show(v: &serde_json::Value) -> String {
    match v.as_f64() {
        Some(x) if v.is_f64() && (x as f32) as f64 == x => format!("{}", x as f32),
        _ => v.to_string(),
    }
}

/// The leaves where two JSON values differ, as (dotted key, old, new).
fn diff_settings(
    prefix: &str,
    a: &serde_json::Value,
    b: &serde_json::Value,
    out: &mut Vec<(String, String, String)>,
) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                diff_settings(
                    &key,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if a != b => out.push((prefix.to_string(), show(a), show(b))),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_differences_are_named_and_lora_shapes_are_locked() {
        let fp = Fingerprints {
            model: Some("aa".into()),
            data: Some("bb".into()),
            reward: None,
        };
        let a = serde_json::json!({"lr": 0.1, "lora_r": 2, "run": {"steps": 3}});
        let same = check("sft", Path::new("c"), Some(&fp), &fp, &a, &a, false);
        assert!(same.is_ok());
        let b = serde_json::json!({"lr": 0.2, "lora_r": 2, "run": {"steps": 3}});
        let err = check("sft", Path::new("c"), Some(&fp), &fp, &a, &b, false).unwrap_err();
        assert!(err.to_string().contains("setting lr: 0.1"), "{err}");
        assert!(check("sft", Path::new("c"), Some(&fp), &fp, &a, &b, true).is_ok());
        let c = serde_json::json!({"lr": 0.1, "lora_r": 4, "run": {"steps": 5}});
        let err = check("sft", Path::new("c"), Some(&fp), &fp, &a, &c, true).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("setting lora_r: 2") && text.contains("run.steps"),
            "{text}"
        );
        let other = Fingerprints {
            data: Some("cc".into()),
            ..fp.clone()
        };
        let err = check("sft", Path::new("c"), Some(&fp), &other, &a, &a, false).unwrap_err();
        assert!(err.to_string().contains("the training data"), "{err}");
        let err = check("sft", Path::new("c"), None, &fp, &a, &a, false).unwrap_err();
        assert!(err.to_string().contains("older lathe"), "{err}");
    }

    #[test]
    fn a_big_file_is_sampled_and_still_sees_a_change() {
        let dir = std::env::temp_dir().join(format!("lathe-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("big.bin");
        let mut bytes = vec![7u8; (FULL_HASH_LIMIT + (3 << 20)) as usize];
        std::fs::write(&path, &bytes).unwrap();
        let before = path_fingerprint(&path).unwrap();
        // A change in the middle third, where a sample lies (offset k of 17).
        let at = (bytes.len() - 64 * 1024) / 17 * 8 + 10;
        bytes[at] = 8;
        std::fs::write(&path, &bytes).unwrap();
        assert_ne!(path_fingerprint(&path).unwrap(), before);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
