//! Reading texts from a file: plain text (one per non-empty line), JSONL (one object or
//! string per line) or JSON (an array of objects or strings). Objects give the value of a
//! named field. Every error names the file and the line or entry.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The texts of `path`; `field` is the key read from JSON objects (a string entry is taken
/// as it is).
pub fn read_texts(path: &Path, field: &str) -> Result<Vec<String>> {
    let content =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let texts = match extension.as_str() {
        "jsonl" => content
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                let value: Value = serde_json::from_str(line).with_context(|| {
                    format!("{} line {}: not valid JSON", path.display(), i + 1)
                })?;
                text_of(&value, field).with_context(|| format!("{} line {}", path.display(), i + 1))
            })
            .collect::<Result<Vec<_>>>()?,
        "json" => {
            let value: Value = serde_json::from_str(&content)
                .with_context(|| format!("{}: not valid JSON", path.display()))?;
            let Value::Array(entries) = value else {
                bail!(
                    "{}: expected a JSON array of texts or objects",
                    path.display()
                );
            };
            entries
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    text_of(v, field).with_context(|| format!("{} entry {i}", path.display()))
                })
                .collect::<Result<Vec<_>>>()?
        }
        _ => content
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(str::to_string)
            .collect(),
    };
    if texts.is_empty() {
        bail!("{}: no texts in the file", path.display());
    }
    Ok(texts)
}

fn text_of(value: &Value, field: &str) -> Result<String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Object(map) => match map.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => bail!("field {field:?} is not a string: {other}"),
            None => bail!(
                "no field {field:?} (keys: {})",
                map.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        },
        other => bail!("expected a string or an object with a {field:?} field, got {other}"),
    }
}
