//! Where a command writes its results: stdout, or a file written through a temporary file
//! that is renamed into place when the command succeeds. A command that fails (or panics)
//! leaves neither a partial file nor its temporary behind.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

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
    },
}

impl Output {
    /// stdout when `path` is None, else a temporary file beside `path`.
    pub fn open(path: Option<&Path>) -> Result<Output> {
        let Some(path) = path else {
            return Ok(Output {
                target: Target::Stdout(std::io::stdout()),
            });
        };
        let mut temp = path.as_os_str().to_owned();
        temp.push(".tmp");
        let temp = PathBuf::from(temp);
        let file = File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
        Ok(Output {
            target: Target::File {
                writer: Some(BufWriter::new(file)),
                temp,
                path: path.to_path_buf(),
            },
        })
    }

    /// Flushes, and renames a file output into place.
    pub fn finish(mut self) -> Result<()> {
        match &mut self.target {
            Target::Stdout(out) => Ok(out.flush()?),
            Target::File { writer, temp, path } => {
                let writer = writer.take().expect("finish runs once");
                let file = writer
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .with_context(|| format!("writing {}", temp.display()))?;
                file.sync_all()?;
                std::fs::rename(&*temp, &*path)
                    .with_context(|| format!("renaming {} to {}", temp.display(), path.display()))
            }
        }
    }

    fn writer(&mut self) -> &mut dyn Write {
        match &mut self.target {
            Target::Stdout(out) => out,
            Target::File { writer, .. } => writer.as_mut().expect("written before finish"),
        }
    }
}

impl Drop for Output {
    /// An output dropped unfinished (the command failed) removes its temporary file.
    fn drop(&mut self) {
        if let Target::File {
            writer: Some(_),
            temp,
            ..
        } = &self.target
        {
            let _ = std::fs::remove_file(temp);
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
