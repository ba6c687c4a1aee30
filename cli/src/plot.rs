//! Line plots of a run's metrics per step, drawn by `plotters` as PNG (pure-Rust bitmap
//! backend, encoded by the `png` crate) and as SVG (for the HTML report), both from one
//! drawing: a title, axis labels ("step" and the metric), unique tick values, a legend, and
//! each metric as its raw values (a faint line) under their smoothing (a strong line), the
//! exponential moving average with debiasing that TensorBoard shows.
//!
//! Text is measured and (in the PNG) rasterized through plotters' `ab_glyph` backend with
//! DejaVu Sans registered from the bytes the `dejavu` crate embeds: no system fonts,
//! fontconfig or freetype. The SVG names the family `sans-serif`, the browser's own.

use std::ops::Range;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// The smoothing weight (TensorBoard's slider; 0.6 is its default, 0.8 shows the trend of a
/// noisy RL curve): each smoothed value keeps 0.8 of the one before.
pub const SMOOTHING: f64 = 0.8;

/// The SVG's size in CSS pixels; the PNG is the same drawing at `PNG_SCALE` times the pixels.
pub const SVG_SIZE: (u32, u32) = (640, 340);
pub const PNG_SCALE: u32 = 2;

/// Values past this magnitude are clamped so that a range of them stays a finite number.
const LARGEST: f64 = 1e300;

/// One chart: its title, the y axis label, and each metric's (key, (step, value) points).
pub struct Plot<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    pub series: &'a [(&'a str, Vec<(f64, f64)>)],
}

const FONT: &str = "sans-serif";

/// Strong colours of the series (tab10's blue, red, green, orange, purple, brown); the raw
/// lines are the same colours, faint.
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];
const RAW_OPACITY: f64 = 0.3;

fn register_fonts() {
    static FONTS: Once = Once::new();
    FONTS.call_once(|| {
        // The bytes are DejaVu Sans 2.37; a failure would be a broken crate, and shows as
        // a drawing error (no font for the family) rather than a panic here.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

/// TensorBoard's smoothing: an exponential moving average started at 0 and divided by
/// `1 - weight^n` (debiasing), so the first smoothed value is the first raw value.
pub fn smooth(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let mut last = 0.0;
    let mut decay = 1.0;
    points
        .iter()
        .map(|&(x, y)| {
            last = last * weight + (1.0 - weight) * y;
            decay *= weight;
            (x, last / (1.0 - decay))
        })
        .collect()
}

/// At most `max` "nice" tick values (1, 2 or 5 times a power of ten apart) in `lo..=hi`;
/// with `integer`, at least 1 apart, so that whole steps give each label once ("1 2 3",
/// never "1 1 2 2 3").
pub fn nice_ticks(lo: f64, hi: f64, max: usize, integer: bool) -> Vec<f64> {
    let span = hi - lo;
    if !(span > 0.0 && span.is_finite()) {
        return vec![lo];
    }
    let raw = span / (max.max(2) - 1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let mut step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude);
    if integer {
        step = step.max(1.0);
    }
    let first = (lo / step - 1e-9).ceil();
    (0..=max)
        .map(|k| (first + k as f64) * step)
        .take_while(|&t| t <= hi + step * 1e-9)
        .map(|t| if t.abs() < step * 1e-9 { 0.0 } else { t })
        .collect()
}

/// A tick's label with just the digits that tell ticks `step` apart, on an axis whose
/// largest tick magnitude is `largest` (which picks plain or exponent notation for all).
fn tick_label(v: f64, step: f64, largest: f64) -> String {
    let big = largest.max(step);
    if !(1e-3..1e6).contains(&big) {
        if v == 0.0 {
            return "0".to_string();
        }
        let digits = (big.log10().floor() - step.log10().floor()).clamp(0.0, 15.0) as usize;
        format!("{v:.digits$e}")
    } else {
        let digits = (-step.log10().floor()).clamp(0.0, 15.0) as usize;
        format!("{v:.digits$}")
    }
}

/// The labels of `ticks`, each with the same notation and digits.
fn tick_labels(ticks: &[f64]) -> impl Fn(&f64) -> String {
    let step = match ticks {
        [a, b, ..] => b - a,
        _ => 1.0,
    };
    let largest = ticks.iter().fold(0.0f64, |m, t| m.max(t.abs()));
    move |v| tick_label(*v, step, largest)
}

/// A linear axis over `lo..hi` whose labelled ticks are exactly `ticks` (no light grid
/// lines between them).
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, (from, to): (i32, i32)) -> i32 {
        let t = (v - self.lo) / (self.hi - self.lo);
        (from as f64 + t * (to - from) as f64 + 1e-3).floor() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.lo..self.hi
    }
}

/// The finite points of a series, in order; non-finite ones (NaN, inf from a diverged
/// step or a torn log) are skipped rather than drawn, and huge ones clamped.
fn finite(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    points
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .map(|&(x, y)| (x.clamp(-LARGEST, LARGEST), y.clamp(-LARGEST, LARGEST)))
        .collect()
}

/// The plotted x and y ranges: the steps as they are (widened around a single one), the
/// values with a margin (widened around a flat line).
fn ranges(series: &[Vec<(f64, f64)>]) -> ((f64, f64), (f64, f64)) {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in series.iter().flatten() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return ((0.0, 1.0), (0.0, 1.0));
    }
    let widen = |lo: f64, hi: f64, least: f64| {
        let pad = least.max(lo.abs().max(hi.abs()) * 1e-6);
        (lo - pad, hi + pad)
    };
    let (x0, x1) = if x1 - x0 < 1.0 {
        widen(x0, x1, 1.0)
    } else {
        (x0, x1)
    };
    let span = y1 - y0;
    let (y0, y1) = if span <= y0.abs().max(y1.abs()) * 1e-9 {
        widen(y0, y1, 0.5)
    } else {
        (y0 - span * 0.06, y1 + span * 0.06)
    };
    ((x0, x1), (y0, y1))
}

/// One legend entry: a line sample in `style` and its label.
struct Entry {
    label: String,
    style: ShapeStyle,
}

/// The legend entries: each metric's smoothed line, then what the faint lines are.
fn legend(plot: &Plot, scale: u32) -> Vec<Entry> {
    let mut entries: Vec<Entry> = plot
        .series
        .iter()
        .enumerate()
        .map(|(i, (key, _))| Entry {
            label: if plot.series.len() == 1 {
                format!("{key}, smoothed (EMA {SMOOTHING})")
            } else {
                key.to_string()
            },
            style: COLORS[i % COLORS.len()].stroke_width(2 * scale),
        })
        .collect();
    let (label, color) = match plot.series {
        [(key, _)] => (format!("{key}, raw"), COLORS[0].mix(RAW_OPACITY)),
        _ => (
            format!("raw values (faint); smoothed: EMA {SMOOTHING}"),
            RGBColor(90, 90, 90).mix(RAW_OPACITY + 0.1),
        ),
    };
    entries.push(Entry {
        label,
        style: color.stroke_width(scale),
    });
    entries
}

/// Lays the entries out in centred rows of at most `width` pixels: each entry's (row,
/// x offset in the row), and each row's width.
fn legend_rows(widths: &[u32], gap: u32, width: u32) -> (Vec<(usize, u32)>, Vec<u32>) {
    let mut at = Vec::with_capacity(widths.len());
    let mut rows = vec![0u32];
    for &w in widths {
        let row = rows.len() - 1;
        if rows[row] > 0 && rows[row] + gap + w > width {
            rows.push(0);
        }
        let row = rows.len() - 1;
        if rows[row] > 0 {
            rows[row] += gap;
        }
        at.push((row, rows[row]));
        rows[row] += w;
    }
    (at, rows)
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, plot: &Plot, scale: u32) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let fail = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the plot: {e:?}");
    let s = scale as f64;
    let px = |v: u32| (v * scale) as i32;
    let raw: Vec<Vec<(f64, f64)>> = plot.series.iter().map(|(_, p)| finite(p)).collect();
    let smoothed: Vec<Vec<(f64, f64)>> = raw.iter().map(|p| smooth(p, SMOOTHING)).collect();
    let ((x0, x1), (y0, y1)) = ranges(&raw);
    let x_ticks = nice_ticks(x0, x1, 7, true);
    let y_ticks = nice_ticks(y0, y1, 6, false);
    let (x_fmt, y_fmt) = (tick_labels(&x_ticks), tick_labels(&y_ticks));
    let y_labels: Vec<String> = y_ticks.iter().map(&y_fmt).collect();

    let label_style = (FONT, 14.0 * s).into_font().color(&RGBColor(60, 60, 60));
    let desc_style = (FONT, 15.0 * s).into_font().color(&BLACK);
    let legend_style = (FONT, 13.0 * s).into_font().color(&RGBColor(40, 40, 40));
    let width = |text: &str, style: &TextStyle| root.estimate_text_size(text, style);
    let widest = y_labels
        .iter()
        .map(|t| width(t, &label_style).map(|(w, _)| w))
        .try_fold(0, |m, w| w.map(|w| m.max(w)))
        .map_err(fail)?;

    // Title, then a row (or rows) of legend entries, then the chart: the legend never
    // covers a line.
    root.fill(&WHITE).map_err(fail)?;
    let (title_area, below_title) = root.split_vertically(34 * scale);
    let (title_w, _) = title_area.dim_in_pixel();
    title_area
        .draw(&Text::new(
            plot.title,
            ((title_w / 2) as i32, px(10)),
            (FONT, 21.0 * s, FontStyle::Bold)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Top)),
        ))
        .map_err(fail)?;
    let entries = legend(plot, scale);
    let sample = 24 * scale;
    let entry_widths: Vec<u32> = entries
        .iter()
        .map(|e| width(&e.label, &legend_style).map(|(w, _)| sample + 6 * scale + w))
        .collect::<Result<_, _>>()
        .map_err(fail)?;
    let (area_w, _) = below_title.dim_in_pixel();
    let (at, rows) = legend_rows(&entry_widths, 18 * scale, area_w - 40 * scale);
    let row_h = 18 * scale;
    let (legend_area, chart_area) =
        below_title.split_vertically(rows.len() as u32 * row_h + 6 * scale);

    let mut chart = ChartBuilder::on(&chart_area)
        .margin_top(6 * scale)
        .margin_right(18 * scale)
        .margin_left(6 * scale)
        .margin_bottom(4 * scale)
        .x_label_area_size(44 * scale)
        .y_label_area_size(widest + 34 * scale)
        .build_cartesian_2d(
            Axis {
                lo: x0,
                hi: x1,
                ticks: x_ticks,
            },
            Axis {
                lo: y0,
                hi: y1,
                ticks: y_ticks,
            },
        )
        .map_err(fail)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(plot.y_label)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style(label_style)
        .axis_desc_style(desc_style)
        .bold_line_style(RGBColor(225, 225, 225).stroke_width(scale))
        .axis_style(RGBColor(110, 110, 110).stroke_width(scale))
        .set_all_tick_mark_size(4 * scale)
        .draw()
        .map_err(fail)?;

    if raw.iter().all(Vec::is_empty) {
        let (w, h) = chart_area.dim_in_pixel();
        chart_area
            .draw(&Text::new(
                "no finite values",
                ((w / 2) as i32, (h / 2) as i32),
                (FONT, 16.0 * s)
                    .into_font()
                    .color(&RGBColor(120, 120, 120))
                    .pos(Pos::new(HPos::Center, VPos::Center)),
            ))
            .map_err(fail)?;
    }
    for (i, points) in raw.iter().enumerate() {
        let color = COLORS[i % COLORS.len()].mix(RAW_OPACITY);
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(scale),
            ))
            .map_err(fail)?;
    }
    for (i, points) in smoothed.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2 * scale),
            ))
            .map_err(fail)?;
        if let [only] = points.as_slice() {
            chart
                .draw_series([Circle::new(*only, 3 * scale, color.filled())])
                .map_err(fail)?;
        }
    }

    // The legend, drawn last (the SVG's first polylines of a colour are the series').
    let (legend_w, _) = legend_area.dim_in_pixel();
    for (entry, (row, x)) in entries.iter().zip(&at) {
        let left = (legend_w.saturating_sub(rows[*row]) / 2 + x) as i32;
        let mid = (*row as u32 * row_h + row_h / 2 + 2 * scale) as i32;
        legend_area
            .draw(&PathElement::new(
                [(left, mid), (left + sample as i32, mid)],
                entry.style,
            ))
            .map_err(fail)?;
        legend_area
            .draw(&Text::new(
                entry.label.as_str(),
                (left + sample as i32 + px(6), mid),
                legend_style.pos(Pos::new(HPos::Left, VPos::Center)),
            ))
            .map_err(fail)?;
    }
    root.present().map_err(fail)
}

/// The plot as PNG bytes, `SVG_SIZE` times `PNG_SCALE` pixels, 8-bit RGB.
pub fn png(plot: &Plot) -> Result<Vec<u8>> {
    register_fonts();
    let (w, h) = (SVG_SIZE.0 * PNG_SCALE, SVG_SIZE.1 * PNG_SCALE);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw(&root, plot, PNG_SCALE)?;
    }
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&rgb)?;
    writer.finish()?;
    Ok(out)
}

/// The plot as an SVG document of `SVG_SIZE`, its text in the page's sans-serif font; the
/// root is `<svg class="plot" role="img">` with the title as its accessible name, and each
/// metric's lines carry `data-key="<metric>"` (`class="series"` the smoothed one,
/// `class="raw"` the raw one).
pub fn svg(plot: &Plot) -> Result<String> {
    register_fonts();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SVG_SIZE).into_drawing_area();
        draw(&root, plot, 1)?;
    }
    let title = escape(plot.title);
    svg = svg.replacen(
        "<svg ",
        &format!("<svg class=\"plot\" role=\"img\" aria-label=\"{title}\" "),
        1,
    );
    if let Some(end) = svg.find(">\n") {
        svg.insert_str(end + 2, &format!("<title>{title}</title>\n"));
    }
    // Each series' lines are the first polylines of its colour: raw (faint), then smoothed.
    for (i, (key, _)) in plot.series.iter().enumerate().take(COLORS.len()) {
        let RGBColor(r, g, b) = COLORS[i];
        let stroke = format!("stroke=\"#{r:02X}{g:02X}{b:02X}\"");
        for (class, strong) in [("raw", false), ("series", true)] {
            let found = svg
                .match_indices("<polyline ")
                .map(|(at, _)| at)
                .find(|&at| {
                    let tag = &svg[at..svg[at..].find("/>").map_or(svg.len(), |e| at + e)];
                    tag.contains(&stroke) && tag.contains("opacity=\"1\"") == strong
                });
            if let Some(at) = found {
                let attrs = format!("class=\"{class}\" data-key=\"{}\" ", escape(key));
                svg.insert_str(at + "<polyline ".len(), &attrs);
            }
        }
    }
    Ok(svg)
}

/// Text for HTML and SVG attributes and content.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_debiased() {
        let s = smooth(&[(1.0, 2.0), (2.0, 4.0)], 0.6);
        assert!((s[0].1 - 2.0).abs() < 1e-12, "the first value is itself");
        // (0.6 * 0.4 * 2 + 0.4 * 4) / (1 - 0.36)
        assert!((s[1].1 - 3.25).abs() < 1e-12);
    }

    #[test]
    fn ticks() {
        assert_eq!(nice_ticks(1.0, 3.0, 7, true), vec![1.0, 2.0, 3.0]);
        assert_eq!(
            nice_ticks(1.0, 100.0, 7, true),
            vec![20.0, 40.0, 60.0, 80.0, 100.0]
        );
        assert_eq!(nice_ticks(-0.1, 0.5, 6, false), vec![0.0, 0.2, 0.4]);
        let ticks = nice_ticks(0.1, 0.1003, 6, false);
        let labels: Vec<String> = ticks.iter().map(tick_labels(&ticks)).collect();
        let mut unique = labels.clone();
        unique.dedup();
        assert_eq!(labels, unique);
    }
}
