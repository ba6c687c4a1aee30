//! Labelled text for reward-model training and evaluation.
//!
//! Files: `.jsonl` (one JSON object per line) or `.json` (an array of objects), each object
//! `{"text": "...", "label": 0 | 1}`. `class` is accepted for `label` (the `sentiment` npm
//! package's fixtures use it); labels may also be booleans or the strings "0"/"1",
//! "neg"/"pos", "negative"/"positive" (any case). `.arrow` files are Arrow IPC streams
//! (HF datasets' cache files) with a `sentence` or `text` utf8 column and a `label` integer
//! column.
//!
//! Handling of bad records (errors name the file and the record, counting from 1):
//! - a blank record (empty text and a null or missing label, as the trailing entry of the
//!   sentiment fixtures) is skipped and counted in [`Loaded::skipped`];
//! - a missing or null label on a non-empty text, or a label other than 0/1, is an error;
//! - an empty (or whitespace-only) text with a label is an error;
//! - a file without any example is an error.

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// One labelled text: label 1 is positive, 0 negative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub text: String,
    pub label: u32,
}

/// The examples of a file and how many blank records were skipped.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub examples: Vec<Example>,
    pub skipped: usize,
}

/// The label names of a binary sentiment model trained by lathe, by id.
pub const LABELS: [&str; 2] = ["NEGATIVE", "POSITIVE"];

fn parse_label(value: &Value) -> std::result::Result<Option<u32>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(u32::from(*b))),
        Value::Number(n) => match n.as_f64() {
            Some(0.0) => Ok(Some(0)),
            Some(1.0) => Ok(Some(1)),
            _ => Err(format!("label {n} is not binary (0 or 1)")),
        },
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "0" | "neg" | "negative" => Ok(Some(0)),
            "1" | "pos" | "positive" => Ok(Some(1)),
            _ => Err(format!(
                "label {s:?} is not binary (0/1, neg/pos, negative/positive)"
            )),
        },
        other => Err(format!("label {other} is not binary (0 or 1)")),
    }
}

/// One record -> an example, `None` for a blank record.
fn parse_record(value: &Value) -> std::result::Result<Option<Example>, String> {
    let Value::Object(obj) = value else {
        return Err("not a JSON object with \"text\" and \"label\"".into());
    };
    let text = match obj.get("text") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => return Err(format!("\"text\" is not a string: {other}")),
    };
    let label_value = obj.get("label").or_else(|| obj.get("class"));
    let label = match label_value {
        None => None,
        Some(v) => parse_label(v)?,
    };
    match (text.trim().is_empty(), label) {
        (true, None) => Ok(None),
        (true, Some(_)) => Err("empty text".into()),
        (false, None) => Err("missing label (\"label\" or \"class\", 0 or 1)".into()),
        (false, Some(label)) => Ok(Some(Example { text, label })),
    }
}

/// Reads labelled examples from a `.json`, `.jsonl` or `.arrow` file (see the module docs).
pub fn load(path: impl AsRef<Path>) -> Result<Loaded> {
    let path = path.as_ref();
    let label = path.display().to_string();
    if path.extension().and_then(|e| e.to_str()) == Some("arrow") {
        let examples = crate::arrow::read_labelled(path)?;
        return finish(
            label,
            Loaded {
                examples,
                skipped: 0,
            },
        );
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::File {
        path: label.clone(),
        detail: format!("cannot read: {e}"),
    })?;
    let records: Vec<(usize, Value)> = if text.trim_start().starts_with('[') {
        let value: Value = serde_json::from_str(&text).map_err(|e| Error::File {
            path: label.clone(),
            detail: format!("invalid JSON: {e}"),
        })?;
        let Value::Array(items) = value else {
            unreachable!("starts with [")
        };
        items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i + 1, v))
            .collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str(line)
                    .map(|v| (i + 1, v))
                    .map_err(|e| Error::Data {
                        path: label.clone(),
                        record: i + 1,
                        detail: format!("invalid JSON: {e}"),
                    })
            })
            .collect::<Result<_>>()?
    };
    let mut loaded = Loaded {
        examples: Vec::with_capacity(records.len()),
        skipped: 0,
    };
    for (record, value) in records {
        match parse_record(&value) {
            Ok(Some(example)) => loaded.examples.push(example),
            Ok(None) => loaded.skipped += 1,
            Err(detail) => {
                return Err(Error::Data {
                    path: label,
                    record,
                    detail,
                })
            }
        }
    }
    finish(label, loaded)
}

fn finish(path: String, loaded: Loaded) -> Result<Loaded> {
    if loaded.examples.is_empty() {
        return Err(Error::File {
            path,
            detail: "no labelled examples".into(),
        });
    }
    Ok(loaded)
}

/// A splitmix64 generator: tiny, seedable, and easy to reproduce in Python (the golden
/// script does, for the IMDB split).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Shuffles in place (Fisher-Yates from the end, j = next % (i + 1)).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// A seeded permutation of 0..n.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed).shuffle(&mut perm);
    perm
}

/// The seed of the fixed IMDB split of the accuracy check.
pub const IMDB_SPLIT_SEED: u64 = 20240501;

/// The accuracy check's split of the 1000 labelled IMDB sentences: permutation(n,
/// [`IMDB_SPLIT_SEED`]); the first n - 200 are for training, the last 200 the test set.
pub fn imdb_split(examples: &[Example]) -> (Vec<Example>, Vec<Example>) {
    let perm = permutation(examples.len(), IMDB_SPLIT_SEED);
    let cut = examples.len().saturating_sub(200);
    let pick = |idx: &[usize]| idx.iter().map(|&i| examples[i].clone()).collect();
    (pick(&perm[..cut]), pick(&perm[cut..]))
}

/// Splits `examples` into (train, held-out): a seeded shuffle, the last
/// `round(fraction * n)` (at least 1 when fraction > 0 and n > 1) held out.
pub fn holdout_split(
    examples: &[Example],
    fraction: f32,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::Config(format!(
            "held-out fraction must be in [0, 1), got {fraction}"
        )));
    }
    let n = examples.len();
    let mut held = (fraction as f64 * n as f64).round() as usize;
    if fraction > 0.0 && n > 1 {
        held = held.clamp(1, n - 1);
    }
    let perm = permutation(n, seed);
    let pick = |idx: &[usize]| idx.iter().map(|&i| examples[i].clone()).collect();
    Ok((pick(&perm[..n - held]), pick(&perm[n - held..])))
}
