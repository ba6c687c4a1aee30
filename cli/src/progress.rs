//! A one-line progress display on stderr for long jobs: redrawn in place on a terminal,
//! printed as plain lines (at most one every few seconds) when stderr is a file or a pipe.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    total: usize,
    started: Instant,
    last_line: Option<Instant>,
    terminal: bool,
}

impl Progress {
    pub fn new(label: &str, total: usize) -> Progress {
        Progress {
            label: label.to_string(),
            total,
            started: Instant::now(),
            last_line: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// Shows `done` of `total` with a message; `done` counts from where this display started
    /// (a resumed run passes how many it did before in `offset`).
    pub fn update(&mut self, done: usize, offset: usize, message: &str) {
        let elapsed = self.started.elapsed();
        let fresh = done.saturating_sub(offset).max(1) as f64;
        let remaining = self.total.saturating_sub(done) as f64;
        let eta = Duration::from_secs_f64(elapsed.as_secs_f64() / fresh * remaining);
        let line = format!(
            "{} {done}/{} {message} | {} elapsed, ETA {}",
            self.label,
            self.total,
            clock(elapsed),
            clock(eta)
        );
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
        } else if self
            .last_line
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
            || done == self.total
        {
            let _ = writeln!(err, "{line}");
            self.last_line = Some(Instant::now());
        }
    }

    /// Ends the line on a terminal.
    pub fn finish(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}

/// 75 s -> "1m15s".
pub fn clock(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// The flag a training command's loop reads after each step: Ctrl-C sets it (the command
/// then saves a checkpoint and exits), a second Ctrl-C kills the process as usual.
/// `command` names the run in the message.
pub fn stop_on_ctrl_c(command: &'static str) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\n{command}: Ctrl-C: finishing this step, then saving (Ctrl-C again to quit now)"
        );
    });
    stop
}
