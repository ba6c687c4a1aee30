//! The progress display of long jobs on stderr: an `indicatif` bar (steps done of the total,
//! the command's message, time elapsed and the ETA, redrawn every second) when stderr is a
//! terminal; plain lines, at most one every few seconds, when it is a file or a pipe (CI
//! logs).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

pub struct Progress {
    label: String,
    total: usize,
    started: Instant,
    last_line: Option<Instant>,
    /// The bar on a terminal, and the step the display started from (a resumed run's
    /// earlier steps do not count towards its speed).
    bar: Option<(ProgressBar, Arc<AtomicUsize>)>,
    /// A rank other than 0 of a data-parallel job: rank 0 shows the progress.
    quiet: bool,
}

/// The ETA from the steps done since the display started: `elapsed` over the `done -
/// offset` fresh steps, times the steps left.
fn eta(elapsed: Duration, done: usize, offset: usize, total: usize) -> Duration {
    let fresh = done.saturating_sub(offset).max(1) as f64;
    let remaining = total.saturating_sub(done) as f64;
    Duration::from_secs_f64(elapsed.as_secs_f64() / fresh * remaining)
}

fn bar(label: &str, total: usize) -> (ProgressBar, Arc<AtomicUsize>) {
    let offset = Arc::new(AtomicUsize::new(0));
    let from = offset.clone();
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:28}] {pos}/{len} {since} elapsed, ETA {lathe_eta} | {wide_msg}",
    )
    .expect("a valid template")
    .progress_chars("=> ")
    .with_key(
        "since",
        |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&clock(state.elapsed()));
        },
    )
    .with_key(
        "lathe_eta",
        move |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let (done, total) = (state.pos() as usize, state.len().unwrap_or(0) as usize);
            let offset = from.load(Ordering::Relaxed);
            if done > offset {
                let _ = w.write_str(&clock(eta(state.elapsed(), done, offset, total)));
            } else {
                let _ = w.write_char('-');
            }
        },
    );
    let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr())
        .with_style(style)
        .with_prefix(label.to_string());
    bar.enable_steady_tick(Duration::from_secs(1));
    (bar, offset)
}

impl Progress {
    pub fn new(label: &str, total: usize) -> Progress {
        let writer = crate::parallel::is_writer();
        Progress {
            label: label.to_string(),
            total,
            started: Instant::now(),
            last_line: None,
            bar: (writer && std::io::stderr().is_terminal()).then(|| bar(label, total)),
            quiet: !writer,
        }
    }

    /// Shows `done` of `total` with a message; `done` counts from where this display started
    /// (a resumed run passes how many it did before in `offset`).
    pub fn update(&mut self, done: usize, offset: usize, message: &str) {
        if self.quiet {
            return;
        }
        if let Some((bar, from)) = &self.bar {
            from.store(offset, Ordering::Relaxed);
            bar.set_message(message.to_string());
            bar.set_position(done as u64);
            return;
        }
        let elapsed = self.started.elapsed();
        let line = format!(
            "{} {done}/{} {message} | {} elapsed, ETA {}",
            self.label,
            self.total,
            clock(elapsed),
            clock(eta(elapsed, done, offset, self.total))
        );
        if self
            .last_line
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
            || done == self.total
        {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
            self.last_line = Some(Instant::now());
        }
    }

    /// Stops the bar on a terminal, leaving its last state on the screen and ending its
    /// line (once; dropping the display does it too, as on an error's way out).
    pub fn finish(&self) {
        if let Some((bar, _)) = &self.bar {
            if !bar.is_finished() {
                bar.abandon();
                eprintln!();
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
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
