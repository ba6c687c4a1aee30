//! Reading texts from a data file, through lathe-data ([`lathe_data::read_texts`]): plain
//! text (one per non-empty line), JSONL or JSON (objects give the value of a named field,
//! strings are texts), Parquet, Arrow IPC (HF datasets' files, or a `save_to_disk` folder).
//! Every error names the file and the line, record or row.

use std::path::Path;

use anyhow::Result;

/// The texts of `path`; `field` is the column (JSON key) read.
pub fn read_texts(path: &Path, field: &str) -> Result<Vec<String>> {
    Ok(lathe_data::read_texts(path, field)?)
}
