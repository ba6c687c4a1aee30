//! Files a training run keeps in its folder, shared by SFT and PPO: JSONL logs reopened on
//! a resume, the optimizer's moments, trainer states, and checkpoint folders replaced in one
//! rename.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use lathe_core::optim::Adam;
use lathe_core::{Device, Tensor};

use crate::{invalid, Context, Error, Result};

/// The checkpoint folder's name in a run folder.
pub const CHECKPOINT: &str = "checkpoint";
/// Adam's moments in a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The log of a run's steps, one JSON record a line.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// A temporary sibling of `path` (hidden, named after it and this process).
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.{}.lathe-tmp", std::process::id()))
}

/// Writes `bytes` to `path` through a synced temporary sibling renamed over it: a failure
/// (a full disk) leaves the old file as it was and no temporary behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let temp = temp_sibling(path);
    let result = (|| -> std::io::Result<()> {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temp);
        return Err(e).context_with(|| format!("writing {}", path.display()));
    }
    Ok(())
}

/// A training run's folder, as SFT and PPO keep it: logs (`metrics.jsonl`, PPO's
/// `samples.jsonl`) with a line a step, `checkpoint/` (the adapters, `optimizer.safetensors`
/// and `trainer_state.json`, replaced in one rename), and the final files, moved in only
/// once all are written. `command` names the run in what it says on stderr ("sft").
#[derive(Clone, Debug)]
pub struct RunDir {
    out: PathBuf,
    command: &'static str,
}

impl RunDir {
    /// The run folder `out` (nothing is created until something is written); `command`
    /// names the run in messages.
    pub fn new(out: &Path, command: &'static str) -> RunDir {
        RunDir {
            out: out.to_path_buf(),
            command,
        }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.out
    }

    /// `metrics.jsonl`.
    pub fn metrics(&self) -> PathBuf {
        self.out.join(METRICS_FILE)
    }

    /// Creates the folder (once every setting of the run is accepted).
    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.out)
            .context_with(|| format!("creating {}", self.out.display()))
    }

    /// The checkpoint to resume from, if any ([`checkpoint_to_resume`]).
    pub fn checkpoint_to_resume(&self) -> Option<PathBuf> {
        checkpoint_to_resume(&self.out, CHECKPOINT, STATE_FILE, self.command)
    }

    /// The trainer state of `checkpoint` as `T`, checked for what every run's state must
    /// be (the command's own checks come between [`check_step`](RunDir::check_step) and
    /// [`check_logged`](RunDir::check_logged)).
    pub fn read_state<T: serde::de::DeserializeOwned>(&self, checkpoint: &Path) -> Result<T> {
        read_state(checkpoint)
    }

    /// A checkpoint's step is after the first step and, for a run of the same settings
    /// (`same_settings`), within its `total_steps`.
    pub fn check_step(
        &self,
        checkpoint: &Path,
        step: usize,
        same_settings: bool,
        total_steps: usize,
    ) -> Result<()> {
        if step == 0 {
            return Err(damaged_state(
                checkpoint,
                "step 0 (a checkpoint is written after a step)".into(),
            ));
        }
        // Only a run of the same settings bounds the step (another step count under
        // --resume-anyway is the resume check's to report).
        if same_settings && step > total_steps {
            return Err(damaged_state(
                checkpoint,
                format!("step {step} is beyond the run's {total_steps} steps"),
            ));
        }
        Ok(())
    }

    /// metrics.jsonl records the checkpoint's step ([`check_metrics_reach`]).
    pub fn check_logged(&self, checkpoint: &Path, step: usize) -> Result<()> {
        check_metrics_reach(&self.metrics(), step).map_err(|d| damaged_state(checkpoint, d))
    }

    /// The log `name` for appending, from step `start` on ([`reopen_jsonl`]).
    pub fn reopen_log(&self, name: &str, start: usize) -> Result<File> {
        reopen_jsonl(&self.out.join(name), start)
    }

    /// Writes `checkpoint/`: `fill` writes into a temporary folder that then replaces it
    /// ([`save_dir`]).
    pub fn save_checkpoint<E>(
        &self,
        fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
    ) -> Result<()>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        save_dir(&self.out, CHECKPOINT, fill)
    }

    /// Writes the final files ([`save_into`]).
    pub fn save_final<E>(
        &self,
        fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
    ) -> Result<()>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        save_into(&self.out, fill)
    }
}

/// Writes a trainer state into the checkpoint folder being filled.
pub fn write_state<T: serde::Serialize>(checkpoint: &Path, state: &T) -> Result<()> {
    std::fs::write(
        checkpoint.join(STATE_FILE),
        serde_json::to_string_pretty(state)?,
    )?;
    Ok(())
}

/// A JSONL log for appending. On a resume from step `start`, the lines of later steps (written
/// by the interrupted run after its checkpoint) are dropped, so the file reads as one run.
/// The kept lines are written through a temporary file renamed over the log, so a failure
/// (a full disk) leaves the log as it was; when nothing is dropped the file is only
/// reopened for appending.
pub fn reopen_jsonl(path: &Path, start: usize) -> Result<std::fs::File> {
    if start > 0 && path.is_file() {
        let text =
            std::fs::read_to_string(path).context_with(|| format!("reading {}", path.display()))?;
        let mut kept = String::new();
        let mut dropped = false;
        for line in text.lines() {
            let keep = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= start);
            if keep {
                kept.push_str(line);
                kept.push('\n');
            } else {
                dropped = true;
            }
        }
        if dropped || !text.ends_with('\n') && !text.is_empty() {
            write_atomic(path, kept.as_bytes())?;
        }
        return std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .context_with(|| format!("opening {}", path.display()));
    }
    std::fs::File::create(path).context_with(|| format!("creating {}", path.display()))
}

/// Appends one JSONL record in a single write (the line and its newline), so a crash
/// leaves at worst a torn last line, never two records interleaved.
pub fn append_jsonl(out: &mut impl Write, record: &serde_json::Value) -> Result<()> {
    let mut line = serde_json::to_vec(record)?;
    line.push(b'\n');
    out.write_all(&line)?;
    Ok(())
}

/// The records of a JSONL file, blank lines skipped. A last line that does not parse (a
/// record torn by a crash mid-write) is skipped with a warning on stderr; a bad line
/// elsewhere is an error naming it.
pub fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text =
        std::fs::read_to_string(path).context_with(|| format!("reading {}", path.display()))?;
    let (records, torn) = parse_jsonl(&text)
        .map_err(|(line, e)| Error::Invalid(format!("{} line {line}: {e}", path.display())))?;
    if let Some(line) = torn {
        eprintln!(
            "warning: {} line {line} is incomplete (a record torn by an interrupted write); \
             skipping it",
            path.display()
        );
    }
    Ok(records)
}

/// [`read_jsonl`] on text: the records, and the 1-based number of a torn last line that was
/// skipped; or the number of a bad line before the last and its parse error.
pub fn parse_jsonl(
    text: &str,
) -> std::result::Result<(Vec<serde_json::Value>, Option<usize>), (usize, serde_json::Error)> {
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l))
        .collect();
    let mut records = Vec::with_capacity(lines.len());
    for (k, &(number, line)) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(v) => records.push(v),
            Err(_) if k + 1 == lines.len() => return Ok((records, Some(number))),
            Err(e) => return Err((number, e)),
        }
    }
    Ok((records, None))
}

/// The trainer state file of an SFT or PPO checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";

/// Reads the trainer state of the checkpoint in `dir` as `T`.
pub fn read_state<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path)
        .context_with(|| format!("reading the checkpoint state {}", path.display()))?;
    serde_json::from_str(&text)
        .context_with(|| format!("parsing the checkpoint state {}", path.display()))
}

/// The error for a trainer state in `dir` that no run wrote (a hand edit, a damaged file).
pub fn damaged_state(dir: &Path, detail: String) -> Error {
    Error::Invalid(format!(
        "{}: {detail}; the checkpoint state is damaged or edited by hand. Delete {} to start \
         over",
        dir.join(STATE_FILE).display(),
        dir.display()
    ))
}

/// The highest step metrics.jsonl records must reach the checkpoint's: each step's line is
/// written before its checkpoint.
pub fn check_metrics_reach(metrics: &Path, step: usize) -> std::result::Result<(), String> {
    let records = if metrics.is_file() {
        read_jsonl(metrics).map_err(|e| crate::error_chain(&e))?
    } else {
        Vec::new()
    };
    let last = records
        .iter()
        .filter_map(|r| r["step"].as_u64())
        .max()
        .unwrap_or(0);
    if (last as usize) < step {
        return Err(format!(
            "step {step}, but {} records steps only up to {last}",
            metrics.display()
        ));
    }
    Ok(())
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

/// The `n` (m, v) pairs [`save_moments`] wrote. A tensor the run has no parameter for is an
/// error, not dropped: it means the checkpoint belongs to another configuration.
pub fn load_moments(path: &Path, n: usize, device: &Device) -> Result<Vec<(Tensor, Tensor)>> {
    let saved = lathe_core::safetensors::load(path, device)?;
    let expected: std::collections::BTreeSet<String> = (0..n)
        .flat_map(|i| [format!("m.{i}"), format!("v.{i}")])
        .collect();
    let extra: Vec<&str> = saved
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !expected.contains(*k))
        .collect();
    if !extra.is_empty() {
        invalid!(
            "{} holds tensors this run has no parameter for: {} (the optimizer state is of \
             {n} parameters, m.0..m.{} and v.0..v.{}); the checkpoint does not belong to this \
             run's configuration",
            path.display(),
            extra.join(", "),
            n.saturating_sub(1),
            n.saturating_sub(1)
        );
    }
    let find = |key: String| {
        saved
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| Error::Invalid(format!("{} lacks {key}", path.display())))
    };
    (0..n)
        .map(|i| Ok((find(format!("m.{i}"))?, find(format!("v.{i}"))?)))
        .collect()
}

/// `<target>.old`: where [`replace_dir`] moves the folder it replaces.
pub fn old_dir(target: &Path) -> PathBuf {
    let mut old = target.as_os_str().to_owned();
    old.push(".old");
    PathBuf::from(old)
}

/// The checkpoint folder to resume from: `out/<name>` when it holds `state_file`; else
/// `out/<name>.old` when that does (a crash inside [`replace_dir`], between moving the old
/// checkpoint aside and the new one into place, leaves only that), said on stderr; else
/// none (a fresh run).
pub fn checkpoint_to_resume(
    out: &Path,
    name: &str,
    state_file: &str,
    command: &str,
) -> Option<PathBuf> {
    let current = out.join(name);
    if current.join(state_file).is_file() {
        return Some(current);
    }
    let old = old_dir(&current);
    if old.join(state_file).is_file() {
        eprintln!(
            "{command}: {} is missing or incomplete (a checkpoint save was interrupted); \
             resuming from {}",
            current.display(),
            old.display()
        );
        return Some(old);
    }
    None
}

/// Builds an output folder whole: `fill` writes into a temporary sibling of `out`, which is
/// renamed to `out` when every file is written; a failure (a full disk) removes it, so `out`
/// is either complete or absent. `out` must not exist or be an empty folder (which the
/// rename replaces): a reward model, a merged model.
pub fn build_dir<E>(
    out: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> Result<()>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    check_new_dir(out)?;
    let temp = temp_sibling(out);
    let _ = std::fs::remove_dir_all(&temp);
    let result = std::fs::create_dir_all(&temp)
        .context_with(|| format!("creating {}", temp.display()))
        .and_then(|()| fill(&temp).map_err(caller_error))
        .and_then(|()| {
            std::fs::rename(&temp, out)
                .context_with(|| format!("renaming {} to {}", temp.display(), out.display()))
        });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    result
}

/// Refuses an output folder that exists and is not an empty folder.
pub fn check_new_dir(out: &Path) -> Result<()> {
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).context_with(|| format!("--out {}", out.display())),
        Ok(m) if !m.is_dir() => invalid!("{} exists and is not a folder", out.display()),
        Ok(_) => {
            if std::fs::read_dir(out)?.next().is_some() {
                invalid!("{} exists and is not empty", out.display());
            }
            Ok(())
        }
    }
}

/// Writes a checkpoint folder: `fill` writes into `out/<name>.tmp`, which then replaces
/// `out/<name>` ([`replace_dir`]). When `fill` fails (a full disk) the temporary folder is
/// removed and the previous checkpoint stays as it was.
pub fn save_dir<E>(
    out: &Path,
    name: &str,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> Result<()>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let temp = out.join(format!("{name}.tmp"));
    let _ = std::fs::remove_dir_all(&temp);
    let result = std::fs::create_dir_all(&temp)
        .context_with(|| format!("creating {}", temp.display()))
        .and_then(|()| fill(&temp).map_err(caller_error))
        .and_then(|()| replace_dir(&temp, &out.join(name)));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    result.context_with(|| format!("saving {}", out.join(name).display()))
}

/// Writes a run's final files: `fill` writes them into a temporary folder inside `out`, and
/// only when all are written are they renamed into `out` one by one (renames need no
/// space). A failure (a full disk) removes the temporary folder and leaves `out`'s earlier
/// files as they were, with no partial file or temporary left.
pub fn save_into<E>(
    out: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> Result<()>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let temp = out.join(".final.lathe-tmp");
    let _ = std::fs::remove_dir_all(&temp);
    let result = std::fs::create_dir_all(&temp)
        .context_with(|| format!("creating {}", temp.display()))
        .and_then(|()| fill(&temp).map_err(caller_error))
        .and_then(|()| {
            let mut names: Vec<_> = std::fs::read_dir(&temp)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .collect();
            // run.json last: it marks the run finished.
            names.sort_by_key(|n| n == "run.json");
            for name in names {
                std::fs::rename(temp.join(&name), out.join(&name)).context_with(|| {
                    format!("moving {} into {}", name.to_string_lossy(), out.display())
                })?;
            }
            Ok(())
        });
    let _ = std::fs::remove_dir_all(&temp);
    result.context_with(|| format!("saving the results in {}", out.display()))
}

/// A fill closure's error: a lathe-train error stays itself, any other is carried whole
/// (its message and causes).
fn caller_error<E: Into<Box<dyn std::error::Error + Send + Sync>>>(e: E) -> Error {
    match e.into().downcast::<Error>() {
        Ok(e) => *e,
        Err(other) => Error::Other(other),
    }
}

/// Moves the complete folder `temp` to `target`, replacing what was there, so a crash leaves
/// either the old folder or the new one (at worst as `<target>.old`, which a resume then
/// uses: [`checkpoint_to_resume`]). A `<target>.old` is removed only once `target` exists to
/// take its place, so at every moment one complete folder is on disk.
pub fn replace_dir(temp: &Path, target: &Path) -> Result<()> {
    let old = old_dir(target);
    if target.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(target, &old)
            .context_with(|| format!("moving {} aside", target.display()))?;
    }
    std::fs::rename(temp, target)
        .context_with(|| format!("renaming {} to {}", temp.display(), target.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_skipped_and_a_bad_middle_line_is_an_error() {
        let whole = "{\"step\": 1}\n\n{\"step\": 2}\n";
        let (records, torn) = parse_jsonl(whole).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(torn, None);

        let torn_text = "{\"step\": 1}\n{\"step\": 2}\n{\"step\": 3, \"lo";
        let (records, torn) = parse_jsonl(torn_text).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1]["step"], 2);
        assert_eq!(torn, Some(3));

        let bad_middle = "{\"step\": 1}\n{\"st\n{\"step\": 3}\n";
        let (line, _) = parse_jsonl(bad_middle).unwrap_err();
        assert_eq!(line, 2);

        // Through the file reader, and records written by append_jsonl read back.
        let dir = std::env::temp_dir().join(format!("lathe-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let mut file = std::fs::File::create(&path).unwrap();
        for step in 1..=3 {
            append_jsonl(&mut file, &serde_json::json!({ "step": step })).unwrap();
        }
        file.write_all(b"{\"step\": 4, \"loss\": 0.").unwrap();
        drop(file);
        let records = read_jsonl(&path).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[2]["step"], 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
