//! `lathe report RUN_DIR`: a self-contained HTML page of a PPO, GRPO or DPO run (inline SVG
//! plots of its curves per step: PPO's mean reward, KL, entropy and losses; GRPO's reward,
//! KL, completion length, loss and clipping; DPO's loss, implicit rewards and accuracy;
//! with axes and values, and tables of sampled responses), plus the same curves as PNG
//! files for tools that take images.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Result};
use serde_json::Value;

use crate::png::plot_bounds;

/// What a run's report shows: its curves (file stem, title, metric keys), the metric its
/// summary line follows, and the sample table's columns.
struct Layout {
    algorithm: &'static str,
    plots: &'static [(&'static str, &'static str, &'static [&'static str])],
    /// The summary's metric, and its name in the sentence.
    headline: (&'static str, &'static str),
    kl: Option<&'static str>,
    /// samples.jsonl's (prompt, completion) keys.
    sample_keys: (&'static str, &'static str),
}

const PPO: Layout = Layout {
    algorithm: "PPO",
    plots: &[
        ("reward", "Mean reward", &["env/reward_mean"]),
        ("kl", "KL to the reference", &["objective/kl"]),
        (
            "entropy",
            "Entropy of the responses (nats)",
            &["objective/entropy"],
        ),
        (
            "losses",
            "PPO losses",
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
        ("reward", "Mean reward", &["reward"]),
        ("kl", "KL to the reference (k3)", &["kl"]),
        (
            "length",
            "Completion length (tokens)",
            &["completions/mean_length"],
        ),
        (
            "losses",
            "GRPO loss and clipped share",
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
        ("loss", "DPO loss", &["loss"]),
        (
            "rewards",
            "Implicit rewards",
            &["rewards/chosen", "rewards/rejected", "rewards/margins"],
        ),
        ("accuracy", "Preference accuracy", &["rewards/accuracies"]),
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

const COLORS: [(u8, u8, u8); 3] = [(31, 119, 180), (214, 39, 40), (44, 160, 44)];

/// (step, value) points of one metric.
fn series(metrics: &[Value], key: &str) -> Vec<(f64, f64)> {
    metrics
        .iter()
        .filter_map(|m| Some((m["step"].as_f64()?, m[key].as_f64()?)))
        .filter(|(_, v)| v.is_finite())
        .collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One SVG line chart with axes, tick values and a legend.
fn svg_plot(title: &str, keys: &[&str], all: &[Vec<(f64, f64)>]) -> String {
    let (w, h, left, right, top, bottom) = (640.0, 300.0, 64.0, 24.0, 28.0, 36.0);
    let (x0, x1, y0, y1) = plot_bounds(all);
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let sy = |y: f64| top + (y1 - y) / (y1 - y0) * (h - top - bottom);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{t}"><title>{t}</title><text x="{left}" y="18" font-size="14" font-family="sans-serif">{t}</text>"#,
        t = escape(title)
    );
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end" font-family="sans-serif">{}</text>"##,
            w - right,
            left - 6.0,
            sy(y) + 4.0,
            format_tick(y),
            py = sy(y)
        );
    }
    for i in 0..=4 {
        let x = x0 + (x1 - x0) * i as f64 / 4.0;
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle" font-family="sans-serif">{}</text>"#,
            sx(x),
            h - bottom + 16.0,
            // Steps are whole numbers.
            x.round()
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle" font-family="sans-serif">step</text>"#,
        (left + w - right) / 2.0,
        h - 4.0
    );
    for (i, (key, points)) in keys.iter().zip(all).enumerate() {
        let (r, g, b) = COLORS[i % COLORS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline class="series" data-key="{k}" fill="none" stroke="rgb({r},{g},{b})" stroke-width="2" points="{}"/><text x="{}" y="{}" font-size="11" fill="rgb({r},{g},{b})" font-family="sans-serif">{k}</text>"#,
            path.join(" "),
            w - right - 180.0,
            18.0 + 13.0 * i as f64,
            k = escape(key)
        );
    }
    s.push_str("</svg>");
    s
}

fn format_tick(v: f64) -> String {
    if v.abs() >= 1000.0 || (v != 0.0 && v.abs() < 0.01) {
        format!("{v:.2e}")
    } else {
        format!("{v:.3}")
    }
}

/// Writes `report.html` and `plot_<name>.png` into the run directory.
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
         .plots{display:flex;flex-wrap:wrap;gap:12px}table{border-collapse:collapse;width:100%;margin:1em 0}\
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
    for &(stem, title, keys) in layout.plots {
        let all: Vec<Vec<(f64, f64)>> = keys.iter().map(|k| series(&metrics, k)).collect();
        html.push_str(&svg_plot(title, keys, &all));
        html.push('\n');
        let png = crate::png::plot_png(&all, 640, 300);
        crate::output::write_atomic(&run_dir.join(format!("plot_{stem}.png")), &png)?;
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
