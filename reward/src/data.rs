//! Labelled text for reward-model training and evaluation, read by lathe-data
//! ([`lathe_data::read_labelled`]): `.jsonl` / `.json` records `{"text": "...", "label": 0 |
//! 1}`, Parquet files, Arrow IPC streams and files (HF datasets' `.arrow` files, or a
//! `save_to_disk` folder of them). With the default column names, `sentence` is read for
//! `text` (GLUE) and `class` for `label` (the `sentiment` npm package's fixtures); labels may
//! also be booleans or the strings "0"/"1", "neg"/"pos", "negative"/"positive" (any case).
//!
//! Handling of bad records (errors name the file and the record: `line N` of JSONL, `record
//! N` of a JSON array, `row N` of Parquet and Arrow, counting from 1):
//! - a blank record (empty text and a null or missing label, as the trailing entry of the
//!   sentiment fixtures) is skipped and counted in [`Loaded::skipped`];
//! - a missing or null label on a non-empty text, or a label other than 0/1, is an error;
//! - an empty (or whitespace-only) text with a label is an error;
//! - a file without any example is an error.

use std::path::Path;

use crate::{Error, Result};

/// One labelled text: label 1 is positive, 0 negative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// The text.
    pub text: String,
    /// 0 (negative) or 1 (positive).
    pub label: u32,
}

/// The examples of a file and how many blank records were skipped.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// Blank records skipped (no text and no label).
    pub skipped: usize,
}

/// The label names of a binary sentiment model trained by lathe, by id.
pub const LABELS: [&str; 2] = ["NEGATIVE", "POSITIVE"];

/// The default columns: `text` (or `sentence`) and `label` (or `class`).
pub const TEXT_COLUMN: &str = "text";
/// The default label column (see [`TEXT_COLUMN`]).
pub const LABEL_COLUMN: &str = "label";

/// Reads labelled examples from the default columns (see the module docs).
pub fn load(path: impl AsRef<Path>) -> Result<Loaded> {
    load_columns(path, TEXT_COLUMN, LABEL_COLUMN)
}

/// Reads labelled examples from the columns (or JSON fields) `text_column` and
/// `label_column`; labels must be binary.
pub fn load_columns(
    path: impl AsRef<Path>,
    text_column: &str,
    label_column: &str,
) -> Result<Loaded> {
    let path = path.as_ref();
    let read = lathe_data::read_labelled(path, text_column, label_column)?;
    let examples = read
        .examples
        .into_iter()
        .map(|e| match e.label {
            0 | 1 => Ok(Example {
                text: e.text,
                label: e.label as u32,
            }),
            other => Err(Error::File {
                path: path.display().to_string(),
                detail: format!("{}: label {other} is not binary (0 or 1)", e.at),
            }),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Loaded {
        examples,
        skipped: read.skipped,
    })
}

/// A splitmix64 generator: tiny, seedable, and easy to reproduce in Python (the golden
/// script does, for the IMDB split).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator whose stream is a function of `seed` only.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
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
