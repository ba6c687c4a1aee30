//! `lathe report RUN_DIR`: a self-contained HTML page of a PPO, GRPO or DPO run (inline SVG
//! plots of its curves per step: PPO's mean reward, KL, entropy and losses; GRPO's reward,
//! KL, completion length, loss and clipping; DPO's loss, implicit rewards and accuracy;
//! each with a title, axis labels, ticks, a legend and the raw values under their smoothing,
//! drawn by `plot.rs`; and tables of sampled responses), plus each plot as
//! `plot_<name>.png` and `plot_<name>.svg` files for tools and pages that take images.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Result};
use serde_json::Value;

use crate::plot::{escape, Plot};

/// One curve of a report: (file stem, title, y axis label, metric keys).
type PlotSpec = (
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
);

/// What a run's report shows: its curves, the metric its summary line follows, and the
/// sample table's columns.
struct Layout {
    algorithm: &'static str,
    plots: &'static [PlotSpec],
    /// The summary's metric, and its name in the sentence.
    headline: (&'static str, &'static str),
    kl: Option<&'static str>,
    /// samples.jsonl's (prompt, completion) keys.
    sample_keys: (&'static str, &'static str),
}

const PPO: Layout = Layout {
    algorithm: "PPO",
    plots: &[
        ("reward", "Mean reward", "reward", &["env/reward_mean"]),
        ("kl", "KL to the reference", "KL (nats)", &["objective/kl"]),
        (
            "entropy",
            "Entropy of the responses",
            "entropy (nats)",
            &["objective/entropy"],
        ),
        (
            "losses",
            "PPO losses",
            "loss",
            &["ppo/loss/total", "ppo/loss/policy", "ppo/loss/value"],
        ),
    ],
    headline: ("env/reward_mean", "Mean reward"),
    kl: Some("objective/kl"),
    sample_keys: ("query", "response"),
};

const GRPO: Layout = Layout {
    algorithm: "GRPO",
    plots: &[
        ("reward", "Mean reward", "reward", &["reward"]),
        ("kl", "KL to the reference (k3)", "KL (nats)", &["kl"]),
        (
            "length",
            "Completion length",
            "tokens",
            &["completions/mean_length"],
        ),
        (
            "losses",
            "GRPO loss and clipped share",
            "loss, share",
            &["loss", "clip_ratio/region_mean"],
        ),
    ],
    headline: ("reward", "Mean reward"),
    kl: Some("kl"),
    sample_keys: ("prompt", "completion"),
};

const DPO: Layout = Layout {
    algorithm: "DPO",
    plots: &[
        ("loss", "DPO loss", "loss", &["loss"]),
        (
            "rewards",
            "Implicit rewards",
            "reward",
            &["rewards/chosen", "rewards/rejected", "rewards/margins"],
        ),
        (
            "accuracy",
            "Preference accuracy",
            "accuracy",
            &["rewards/accuracies"],
        ),
    ],
    headline: ("rewards/margins", "Reward margin"),
    kl: None,
    sample_keys: ("prompt", "completion"),
};

/// The layout of a run from the metrics it logged.
fn layout_of(metrics: &[Value]) -> &'static Layout {
    let has = |key: &str| metrics.first().is_some_and(|m| m.get(key).is_some());
    if has("rewards/margins") {
        &DPO
    } else if has("env/reward_mean") || !has("reward") {
        &PPO
    } else {
        &GRPO
    }
}

/// (step, value) points of one metric; non-finite values (a diverged step) are left out,
/// here for the summary's means and again in the plots.
fn series(metrics: &[Value], key: &str) -> Vec<(f64, f64)> {
    metrics
        .iter()
        .filter_map(|m| Some((m["step"].as_f64()?, m[key].as_f64()?)))
        .filter(|(_, v)| v.is_finite())
        .collect()
}

/// Writes `report.html`, `plot_<name>.png` and `plot_<name>.svg` into the run directory.
pub fn write_report(run_dir: &Path) -> Result<()> {
    let metrics_path = run_dir.join("metrics.jsonl");
    if !metrics_path.is_file() {
        bail!(
            "{}: no metrics.jsonl (is this a `lathe ppo`, `grpo` or `dpo` run directory?)",
            run_dir.display()
        );
    }
    let metrics = crate::run_files::read_jsonl(&metrics_path)?;
    let samples = if run_dir.join("samples.jsonl").is_file() {
        crate::run_files::read_jsonl(&run_dir.join("samples.jsonl"))?
    } else {
        Vec::new()
    };
    let layout = layout_of(&metrics);
    let algorithm = layout.algorithm;
    let mut html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>lathe {algorithm} report</title>"
    );
    html.push_str(
        "<style>body{font-family:sans-serif;max-width:1340px;margin:1em auto;padding:0 1em}\
         .plots{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}\
         figcaption{font-size:12px;text-align:right}table{border-collapse:collapse;width:100%;margin:1em 0}\
         td,th{border:1px solid #ccc;padding:4px 6px;font-size:13px;vertical-align:top}th{background:#f4f4f4}\
         </style></head><body>\n",
    );
    let _ = writeln!(
        html,
        "<h1>{algorithm} run: {}</h1>",
        escape(&run_dir.display().to_string())
    );
    let first_last = |key: &str| {
        let s = series(&metrics, key);
        let n = s.len();
        let k = n.min(5);
        let mean = |p: &[(f64, f64)]| p.iter().map(|x| x.1).sum::<f64>() / p.len().max(1) as f64;
        (n > 0).then(|| (mean(&s[..k]), mean(&s[n - k..])))
    };
    let (key, name) = layout.headline;
    if let Some((r0, r1)) = first_last(key) {
        let kl = layout
            .kl
            .and_then(first_last)
            .map(|(_, kl)| format!("; KL to the reference over the last 5 steps {kl:.3}"))
            .unwrap_or_default();
        let _ = writeln!(
            html,
            "<p id=\"summary\">{} steps. {name} of the first 5 steps {r0:.3}, of the last 5 {r1:.3} \
             ({:+.3}){kl}.</p>",
            metrics.len(),
            r1 - r0
        );
    }
    html.push_str("<div class=\"plots\">\n");
    for &(stem, title, y_label, keys) in layout.plots {
        let curves: Vec<(&str, Vec<(f64, f64)>)> =
            keys.iter().map(|&k| (k, series(&metrics, k))).collect();
        let plot = Plot {
            title,
            y_label,
            series: &curves,
        };
        let svg = crate::plot::svg(&plot)?;
        crate::output::write_atomic(&run_dir.join(format!("plot_{stem}.svg")), svg.as_bytes())?;
        let png = crate::plot::png(&plot)?;
        crate::output::write_atomic(&run_dir.join(format!("plot_{stem}.png")), &png)?;
        let _ = writeln!(
            html,
            "<figure>{svg}<figcaption><a href=\"plot_{stem}.png\">PNG</a> \
             <a href=\"plot_{stem}.svg\">SVG</a></figcaption></figure>"
        );
    }
    html.push_str("</div>\n");
    let last_step = samples.iter().filter_map(|s| s["step"].as_u64()).max();
    for (label, step) in [("first", Some(1)), ("last", last_step)] {
        let Some(step) = step else { continue };
        let rows: Vec<&Value> = samples
            .iter()
            .filter(|s| s["step"].as_u64() == Some(step))
            .take(16)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(
            html,
            "<h2>Samples of the {label} step ({step})</h2><table class=\"samples\"><tr><th>{}</th><th>{}</th><th>reward</th></tr>",
            layout.sample_keys.0,
            layout.sample_keys.1
        );
        for r in rows {
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{:.3}</td></tr>",
                escape(r[layout.sample_keys.0].as_str().unwrap_or("")),
                escape(r[layout.sample_keys.1].as_str().unwrap_or("")),
                r["reward"].as_f64().unwrap_or(f64::NAN)
            );
        }
        html.push_str("</table>\n");
    }
    html.push_str("</body></html>\n");
    // Through a synced temporary file: a full disk leaves the earlier report, never a
    // truncated one or the temporary.
    crate::output::write_atomic(&run_dir.join("report.html"), html.as_bytes())
}
