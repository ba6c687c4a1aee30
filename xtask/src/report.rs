//! The bench report: the figures as JSON (for tools) and as Markdown (for people).

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::peer::PeerResult;

/// Timings of one backend. GFLOP/s = 2*M*N*K / best time.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    pub runs: usize,
    pub best_s: f64,
    pub median_s: f64,
    pub gflops: f64,
}

impl Measurement {
    pub fn from_times(m: usize, n: usize, k: usize, mut times: Vec<Duration>) -> Self {
        times.sort();
        let best_s = times[0].as_secs_f64();
        let median_s = times[times.len() / 2].as_secs_f64();
        Measurement {
            runs: times.len(),
            best_s,
            median_s,
            gflops: 2.0 * (m * n * k) as f64 / best_s / 1e9,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LedgerRow {
    pub category: String,
    pub current_bytes: u64,
    pub peak_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct GpuSection {
    /// The adapter report as `AdapterReport`'s Display prints it.
    pub adapter: String,
    pub adapter_name: String,
    pub is_software: bool,
    pub measurement: Measurement,
    /// max |gpu - cpu| / max |cpu| of the product: proof the timed kernel computes it.
    pub max_rel_diff_vs_cpu: f64,
    pub ledger_rows: Vec<LedgerRow>,
    pub ledger_total_current_bytes: u64,
    pub ledger_total_peak_bytes: u64,
    /// The ledger as `LedgerSnapshot`'s Display prints it.
    pub ledger: String,
    pub pool_idle_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PeerSection {
    pub result: Option<PeerResult>,
    /// Why there is no peer figure, or which interpreter and BLAS produced it.
    pub note: String,
}

impl PeerSection {
    pub fn skipped(note: &str) -> Self {
        PeerSection {
            result: None,
            note: note.to_string(),
        }
    }

    pub fn measured(result: PeerResult) -> Self {
        let mut note = format!(
            "{}.matmul {} via {} (Python {}), {} threads; OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset for this run",
            result.library, result.version, result.interpreter, result.python, result.threads
        );
        if result.library == "numpy" {
            note.push_str("; torch not installed, so numpy is the peer");
        }
        if let Some(blas) = result.blas_summary() {
            let _ = write!(note, "; BLAS kernel: {blas}");
        }
        PeerSection {
            result: Some(result),
            note,
        }
    }
}

/// lathe throughput divided by the peer's (> 1: lathe is faster).
#[derive(Clone, Debug, Serialize)]
pub struct Ratios {
    pub cpu_over_peer: Option<f64>,
    pub gpu_over_peer: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub op: &'static str,
    pub size: [usize; 3],
    pub cpu_threads: usize,
    pub cpu: Measurement,
    pub gpu: Option<GpuSection>,
    pub peer: PeerSection,
    pub ratios: Ratios,
}

impl Report {
    pub fn new(
        size: [usize; 3],
        cpu_threads: usize,
        cpu: Measurement,
        gpu: Option<GpuSection>,
        peer: PeerSection,
    ) -> Self {
        let peer_gflops = peer.result.as_ref().map(|p| p.gflops);
        let ratios = Ratios {
            cpu_over_peer: peer_gflops.map(|p| cpu.gflops / p),
            gpu_over_peer: peer_gflops
                .zip(gpu.as_ref())
                .map(|(p, g)| g.measurement.gflops / p),
        };
        Report {
            op: "f32 matmul",
            size,
            cpu_threads,
            cpu,
            gpu,
            peer,
            ratios,
        }
    }

    pub fn markdown(&self) -> String {
        let [m, n, k] = self.size;
        let runs = self.cpu.runs;
        let mut s = String::new();
        let _ = writeln!(s, "# lathe matmul benchmark\n");
        let _ = writeln!(
            s,
            "{} {m}x{n}x{k} (M x N x K), {} CPU threads; best of {runs} runs after warm-up; \
             GFLOP/s = 2*M*N*K / best time. GPU times exclude the upload and include `sync()`.\n",
            self.op, self.cpu_threads
        );
        let _ = writeln!(
            s,
            "| backend | GFLOP/s | best ms | median ms | lathe / peer |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        let ratio = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.3}"));
        row(
            &mut s,
            &format!("lathe CPU (gemm, {} threads)", self.cpu_threads),
            &self.cpu,
            &ratio(self.ratios.cpu_over_peer),
        );
        match &self.gpu {
            Some(g) => row(
                &mut s,
                &format!(
                    "lathe GPU: {}{}",
                    g.adapter_name,
                    if g.is_software {
                        " [software adapter]"
                    } else {
                        ""
                    }
                ),
                &g.measurement,
                &ratio(self.ratios.gpu_over_peer),
            ),
            None => {
                let _ = writeln!(s, "| lathe GPU: no adapter | - | - | - | - |");
            }
        }
        if let Some(p) = &self.peer.result {
            let _ = writeln!(
                s,
                "| peer: {} {} ({} threads) | {:.1} | {:.2} | {:.2} | 1 |",
                p.library,
                p.version,
                p.threads,
                p.gflops,
                p.best_s * 1e3,
                p.median_s * 1e3
            );
        }
        let _ = writeln!(s, "\nPeer: {}", self.peer.note);
        if let Some(g) = &self.gpu {
            let _ = writeln!(s, "\n## GPU adapter\n\n{}\n", g.adapter);
            let _ = writeln!(
                s,
                "GPU result vs CPU result: max |gpu - cpu| / max |cpu| = {:.2e}\n",
                g.max_rel_diff_vs_cpu
            );
            let _ = writeln!(
                s,
                "## GPU memory ledger after the run\n\n```text\n{}\n```\n\nPool idle (recycled, uncharged): {} bytes",
                g.ledger, g.pool_idle_bytes
            );
        }
        s
    }
}

fn row(s: &mut String, name: &str, m: &Measurement, ratio: &str) {
    let _ = writeln!(
        s,
        "| {name} | {:.1} | {:.2} | {:.2} | {ratio} |",
        m.gflops,
        m.best_s * 1e3,
        m.median_s * 1e3
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gflops_uses_the_best_time() {
        let times = vec![Duration::from_millis(20), Duration::from_millis(10)];
        let m = Measurement::from_times(1000, 1000, 1000, times);
        assert_eq!(m.best_s, 0.01);
        assert!((m.gflops - 200.0).abs() < 1e-9);
    }

    #[test]
    fn report_without_gpu_or_peer_has_no_ratios() {
        let cpu = Measurement::from_times(2, 2, 2, vec![Duration::from_micros(1)]);
        let report = Report::new([2, 2, 2], 2, cpu, None, PeerSection::skipped("none"));
        assert!(report.ratios.cpu_over_peer.is_none());
        let md = report.markdown();
        assert!(md.contains("no adapter"), "{md}");
        assert!(md.contains("Peer: none"), "{md}");
    }
}
