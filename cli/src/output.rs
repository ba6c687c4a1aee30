//! Where a command writes its results: stdout, or a file written through a temporary file
//! that is renamed into place when the command succeeds. A command that fails (or panics)
//! leaves neither a partial file nor its temporary behind.
//!
//! What `--out` names decides how it is written (never by replacing something that is not
//! a regular file with one):
//! - nothing, or a regular file: a temporary sibling renamed over it at the end;
//! - a symlink: written through to the file it points to, atomically (the temporary file
//!   beside the resolved target, renamed over the target), so the link stays a link;
//! - a FIFO or a character device (`/dev/null`, `/dev/stdout`): streamed into directly, as a
//!   shell redirection would (there is no file to replace, so nothing to make atomic);
//! - a directory, a block device, a socket: refused before any work is done.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub struct Output {
    target: Target,
}

enum Target {
    Stdout(std::io::Stdout),
    File {
        /// None once finished.
        writer: Option<BufWriter<File>>,
        temp: PathBuf,
        path: PathBuf,
        /// Set once renamed into place: the temporary file no longer exists.
        done: bool,
    },
    /// A FIFO or character device written in place.
    Stream(BufWriter<File>),
}

/// How a path given as `--out FILE` is to be written.
#[derive(Debug, PartialEq, Eq)]
pub enum FileTarget {
    /// Through a temporary file renamed over this path (the path itself, or a symlink's
    /// resolved target).
    Atomic(PathBuf),
    /// Opened and written directly (a FIFO or character device).
    Stream(PathBuf),
}

/// Decides how `path` can be written, refusing what cannot be: commands call it before any
/// expensive work (loading a model), so a bad `--out` costs nothing and leaves nothing.
pub fn file_target(path: &Path) -> Result<FileTarget> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            if let Some(parent) = parent {
                if !parent.is_dir() {
                    bail!(
                        "--out {}: the folder {} does not exist",
                        path.display(),
                        parent.display()
                    );
                }
            }
            return Ok(FileTarget::Atomic(path.to_path_buf()));
        }
        Err(e) => return Err(e).with_context(|| format!("--out {}", path.display())),
    };
    let kind = meta.file_type();
    if kind.is_symlink() {
        let resolved = std::fs::canonicalize(path).with_context(|| {
            format!(
                "--out {} is a symlink whose target cannot be resolved (a dangling link is \
                 not written through)",
                path.display()
            )
        })?;
        // The resolved path is no symlink: this decides by what the link points to.
        return file_target(&resolved);
    }
    if kind.is_file() {
        return Ok(FileTarget::Atomic(path.to_path_buf()));
    }
    if kind.is_fifo() || kind.is_char_device() {
        return Ok(FileTarget::Stream(path.to_path_buf()));
    }
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    bail!(
        "--out {} is {what}: give a file path (a regular file is replaced atomically; a \
         FIFO or character device is written directly)",
        path.display()
    )
}

/// A temporary sibling of `path` whose name no user file is likely to have, so that
/// writing never clobbers a neighbour (`out.txt.tmp` might be the user's).
pub use lathe_train::run_dir::temp_sibling;

/// Writes `bytes` to `path` through a synced temporary sibling renamed over it: a failure
/// (a full disk) leaves the old file as it was and no temporary behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(lathe_train::run_dir::write_atomic(path, bytes)?)
}

/// Builds an output folder whole (lathe-train's [`lathe_train::run_dir::build_dir`]).
pub fn build_dir(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    lathe_train::run_dir::build_dir(out, |dir| fill(dir).map_err(anyhow_error))?;
    Ok(())
}

/// Refuses an output folder that exists and is not an empty folder.
pub fn check_new_dir(out: &Path) -> Result<()> {
    Ok(lathe_train::run_dir::check_new_dir(out)?)
}

/// An anyhow error as a boxed error that keeps its chain in its message.
fn anyhow_error(e: anyhow::Error) -> Box<dyn std::error::Error + Send + Sync> {
    format!("{e:#}").into()
}

impl Output {
    /// stdout when `path` is None, else the file as [`file_target`] decides.
    pub fn open(path: Option<&Path>) -> Result<Output> {
        let Some(path) = path else {
            return Ok(Output {
                target: Target::Stdout(std::io::stdout()),
            });
        };
        match file_target(path)? {
            FileTarget::Stream(p) => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .with_context(|| format!("opening {}", p.display()))?;
                Ok(Output {
                    target: Target::Stream(BufWriter::new(file)),
                })
            }
            FileTarget::Atomic(path) => {
                let temp = temp_sibling(&path);
                let file =
                    File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
                Ok(Output {
                    target: Target::File {
                        writer: Some(BufWriter::new(file)),
                        temp,
                        path,
                        done: false,
                    },
                })
            }
        }
    }

    /// Flushes, and renames a file output into place.
    pub fn finish(mut self) -> Result<()> {
        match &mut self.target {
            Target::Stdout(out) => Ok(out.flush()?),
            Target::Stream(out) => out.flush().context("writing --out"),
            Target::File {
                writer,
                temp,
                path,
                done,
            } => {
                let writer = writer.take().expect("finish runs once");
                let file = writer
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .with_context(|| format!("writing {}", path.display()))?;
                file.sync_all()
                    .with_context(|| format!("writing {}", path.display()))?;
                std::fs::rename(&*temp, &*path).with_context(|| {
                    format!("renaming {} to {}", temp.display(), path.display())
                })?;
                *done = true;
                Ok(())
            }
        }
    }

    fn writer(&mut self) -> &mut dyn Write {
        match &mut self.target {
            Target::Stdout(out) => out,
            Target::Stream(out) => out,
            Target::File { writer, .. } => writer.as_mut().expect("written before finish"),
        }
    }
}

impl Drop for Output {
    /// An output dropped unfinished (the command failed, or the final rename did) removes
    /// its temporary file.
    fn drop(&mut self) {
        if let Target::File {
            writer,
            temp,
            done: false,
            ..
        } = &mut self.target
        {
            // Close the file first, without flushing a buffer nobody will read.
            if let Some(w) = writer.take() {
                let (file, _) = w.into_parts();
                drop(file);
            }
            let _ = std::fs::remove_file(&*temp);
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer().flush()
    }
}
