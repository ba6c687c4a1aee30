//! The work behind a section's timed steps, against this run's f32 GEMM peak: the
//! matrix-product FLOPs `lathe_core::flops` counted during the best step, the GFLOP/s that
//! makes, and its fraction of the peak, so that a reader can tell a slow box from a slow
//! program.

use std::fmt::Write as _;

use serde::Serialize;

/// FLOPs counted so far (read before a timed region; [`gflop_since`] after it).
pub fn flops_now() -> u64 {
    lathe_core::flops::counted()
}

/// GFLOP counted since `before` (a [`flops_now`] reading).
pub fn gflop_since(before: u64) -> f64 {
    lathe_core::flops::counted().saturating_sub(before) as f64 / 1e9
}

/// (seconds, GFLOP counted) of each timed run of a case.
pub type Runs = Vec<(f64, f64)>;

/// One case's best step: its seconds and the GFLOP counted during it.
#[derive(Clone, Debug, Serialize)]
pub struct Work {
    /// The case, as the section's table names it (device and settings).
    pub case: String,
    /// Whether it ran on the CPU (the GEMM peak is the CPU's).
    pub cpu: bool,
    pub seconds: f64,
    pub gflop: f64,
}

impl Work {
    /// The best (fastest) of `runs` (seconds, GFLOP) pairs.
    pub fn best(case: String, cpu: bool, runs: &[(f64, f64)]) -> Option<Work> {
        let &(seconds, gflop) = runs.iter().min_by(|a, b| a.0.total_cmp(&b.0))?;
        Some(Work {
            case,
            cpu,
            seconds,
            gflop,
        })
    }
}

/// The section's work table: per case (the first column, headed `first_column`), GFLOP of
/// the best step, GFLOP/s and (CPU cases) the fraction of this run's 1024³ f32 GEMM peak.
pub fn markdown(what: &str, first_column: &str, work: &[Work], peak_gflops: f64) -> String {
    let mut s = String::new();
    if work.is_empty() {
        return s;
    }
    let _ = writeln!(
        s,
        "\n{what} (matrix-product FLOPs counted by `lathe_core::flops`; this run's f32 GEMM peak, 1024³: {peak_gflops:.0} GFLOP/s):\n"
    );
    let _ = writeln!(s, "| {first_column} | s | GFLOP | GFLOP/s | of peak |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    for w in work {
        let rate = w.gflop / w.seconds.max(1e-9);
        let of_peak = if w.cpu {
            format!("{:.0}%", 100.0 * rate / peak_gflops.max(1e-9))
        } else {
            "-".into()
        };
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.1} | {rate:.0} | {of_peak} |",
            w.case, w.seconds, w.gflop
        );
    }
    s
}
