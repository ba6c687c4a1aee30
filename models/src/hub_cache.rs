//! Models already in the local Hugging Face cache, named as on the Hub: `--model ORG/NAME`
//! (or `ORG/NAME@REVISION`) finds the snapshot `huggingface_hub` downloaded, offline.
//!
//! The cache layout (huggingface_hub's): `<cache>/models--ORG--NAME/refs/<revision>` holds a
//! commit hash, `<cache>/models--ORG--NAME/snapshots/<hash>/` the files. The cache is
//! `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//! `~/.cache/huggingface/hub`, as huggingface_hub looks for it.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The Hub cache directory this environment points at (it may not exist).
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|home| home.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

/// `spec` as a path to load: itself when it exists or does not look like a Hub name
/// (`ORG/NAME` or `ORG/NAME@REVISION`: one slash, no leading `.`, `/` or `~`); otherwise the
/// cached snapshot of that repository in [`default_cache_dir`].
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = PathBuf::from(spec);
    if path.exists() || !looks_like_repo_id(spec) {
        return Ok(path);
    }
    let cache = default_cache_dir().ok_or_else(|| Error::File {
        path: spec.to_string(),
        detail: "no such file or directory, and no Hugging Face cache to look in \
                 (set HF_HOME or HF_HUB_CACHE)"
            .into(),
    })?;
    resolve_in_cache(spec, &cache)
}

/// The snapshot of `spec` (`ORG/NAME[@REVISION]`) in the cache at `cache`: a model
/// directory, or the one `.gguf` file of a snapshot that has no config.json.
pub fn resolve_in_cache(spec: &str, cache: &Path) -> Result<PathBuf> {
    let (repo, revision) = spec.split_once('@').unwrap_or((spec, "main"));
    let not_found = |detail: String| Error::File {
        path: spec.to_string(),
        detail: format!("not a local path, and {detail}"),
    };
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    if !repo_dir.is_dir() {
        return Err(not_found(format!(
            "not in the Hugging Face cache: looked for {} (download it with \
             `huggingface-cli download {repo}`, or set HF_HOME / HF_HUB_CACHE)",
            repo_dir.display()
        )));
    }
    let reference = repo_dir.join("refs").join(revision);
    let commit = if reference.is_file() {
        std::fs::read_to_string(&reference)
            .map_err(|e| Error::File {
                path: reference.display().to_string(),
                detail: e.to_string(),
            })?
            .trim()
            .to_string()
    } else {
        // A commit hash names its snapshot directly.
        revision.to_string()
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if commit.is_empty() || commit.contains(['/', '\\']) || !snapshot.is_dir() {
        return Err(not_found(format!(
            "revision {revision:?} of {repo} is not in the cache: looked for {} and {}",
            reference.display(),
            snapshot.display()
        )));
    }
    if snapshot.join("config.json").is_file() {
        return Ok(snapshot);
    }
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(&snapshot)
        .map_err(|e| Error::File {
            path: snapshot.display().to_string(),
            detail: e.to_string(),
        })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        })
        .collect();
    ggufs.sort();
    match ggufs.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(not_found(format!(
            "the cached snapshot {} has neither config.json nor a .gguf file",
            snapshot.display()
        ))),
        many => Err(not_found(format!(
            "the cached snapshot {} has {} .gguf files and no config.json: pass one of them \
             as --model ({})",
            snapshot.display(),
            many.len(),
            many.iter()
                .filter_map(|p| p.file_name()?.to_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn looks_like_repo_id(spec: &str) -> bool {
    let repo = spec.split_once('@').map_or(spec, |(repo, _)| repo);
    let mut parts = repo.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let valid = |part: &str| {
        !part.is_empty()
            && !part.starts_with(['.', '~'])
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    valid(org) && valid(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths() {
        assert!(looks_like_repo_id("HuggingFaceTB/SmolLM2-135M"));
        assert!(looks_like_repo_id("EleutherAI/gpt-neox-20b@main"));
        for path in [
            "model", "./a/b", "/a/b", "a/b/c", "~/x", "a/", "/b", "a b/c",
        ] {
            assert!(!looks_like_repo_id(path), "{path}");
        }
    }
}
