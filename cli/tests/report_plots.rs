//! `lathe report`'s plots: the PNG decodes to the documented size with its title drawn, the
//! SVG carries the title, axis labels and legend, the step ticks of a short run are each
//! shown once, and runs of one step or with non-finite or huge values plot without a panic.

use std::path::{Path, PathBuf};

use lathe_cli::plot::{self, nice_ticks, Plot, PNG_SCALE, SVG_SIZE};
use lathe_cli::report::write_report;

/// A fresh run folder of this test with `metrics` as its metrics.jsonl.
fn run_dir(name: &str, metrics: &[String]) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("lathe-report-plots-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("metrics.jsonl"), metrics.join("\n") + "\n").unwrap();
    dir
}

/// A PPO metrics line of `step`.
fn ppo_line(step: usize, reward: &str, loss: &str) -> String {
    format!(
        "{{\"step\": {step}, \"env/reward_mean\": {reward}, \"objective/kl\": 0.1, \
         \"objective/entropy\": 2.5, \"ppo/loss/total\": {loss}, \"ppo/loss/policy\": -0.1, \
         \"ppo/loss/value\": 0.4}}"
    )
}

fn three_steps(name: &str) -> PathBuf {
    let dir = run_dir(
        name,
        &[
            ppo_line(1, "0.1", "0.5"),
            ppo_line(2, "0.3", "0.45"),
            ppo_line(3, "0.2", "0.4"),
        ],
    );
    write_report(&dir).unwrap();
    dir
}

/// (width, height, RGB bytes) of a PNG file.
fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// The text contents of an SVG's `<text>` elements whose opening tag contains `attr`.
fn texts(svg: &str, attr: &str) -> Vec<String> {
    svg.split("<text ")
        .skip(1)
        .filter_map(|t| {
            let (tag, rest) = t.split_once('>')?;
            tag.contains(attr)
                .then(|| rest.split('<').next().unwrap_or("").trim().to_string())
        })
        .collect()
}

#[test]
fn the_png_has_its_size_a_title_and_the_curve() {
    let dir = three_steps("png");
    for stem in ["reward", "kl", "entropy", "losses"] {
        let (w, h, rgb) = decode(&dir.join(format!("plot_{stem}.png")));
        assert_eq!((w, h), (SVG_SIZE.0 * PNG_SCALE, SVG_SIZE.1 * PNG_SCALE));
        let pixel = |x: u32, y: u32| {
            let i = ((y * w + x) * 3) as usize;
            [rgb[i], rgb[i + 1], rgb[i + 2]]
        };
        // The title: dark pixels in the top band's middle half, on a white background.
        assert_eq!(pixel(2, 2), [255, 255, 255]);
        let title_ink = (0..30 * PNG_SCALE)
            .flat_map(|y| (w / 4..3 * w / 4).map(move |x| (x, y)))
            .filter(|&(x, y)| pixel(x, y).iter().all(|&c| c < 100))
            .count();
        assert!(title_ink > 200, "{stem}: {title_ink} title pixels");
        // The first series' smoothed line, in its strong colour.
        assert!(
            rgb.chunks(3).any(|p| p == [31, 119, 180]),
            "{stem}: no curve"
        );
    }
}

#[test]
fn the_svg_has_title_axis_labels_and_legend() {
    let dir = three_steps("svg");
    let svg = std::fs::read_to_string(dir.join("plot_losses.svg")).unwrap();
    assert!(svg.starts_with("<svg class=\"plot\""), "{}", &svg[..80]);
    assert!(svg.contains("<title>PPO losses</title>"));
    let all = texts(&svg, "");
    for text in [
        "PPO losses",
        "step",
        "loss",
        "ppo/loss/total",
        "ppo/loss/policy",
        "ppo/loss/value",
    ] {
        assert!(all.iter().any(|t| t == text), "no {text:?} in {all:?}");
    }
    assert!(all.iter().any(|t| t.starts_with("raw values")), "{all:?}");
    for key in ["ppo/loss/total", "ppo/loss/policy", "ppo/loss/value"] {
        assert!(svg.contains(&format!("class=\"series\" data-key=\"{key}\"")));
        assert!(svg.contains(&format!("class=\"raw\" data-key=\"{key}\"")));
    }
    // One series: its legend names the smoothed and the raw line.
    let reward = std::fs::read_to_string(dir.join("plot_reward.svg")).unwrap();
    let legend = texts(&reward, "text-anchor=\"start\"");
    assert!(
        legend
            .iter()
            .any(|t| t.starts_with("env/reward_mean, smoothed")),
        "{legend:?}"
    );
    assert!(
        legend.iter().any(|t| t == "env/reward_mean, raw"),
        "{legend:?}"
    );
    // The page inlines each plot and links its files.
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert_eq!(html.matches("<svg class=\"plot\"").count(), 4);
    for stem in ["reward", "kl", "entropy", "losses"] {
        assert!(dir.join(format!("plot_{stem}.svg")).is_file());
        assert!(html.contains(&format!("href=\"plot_{stem}.png\"")));
        assert!(html.contains(&format!("href=\"plot_{stem}.svg\"")));
    }
}

#[test]
fn step_ticks_are_unique_whole_steps() {
    let dir = three_steps("ticks");
    let svg = std::fs::read_to_string(dir.join("plot_reward.svg")).unwrap();
    // The x tick labels: centred under the axis, below it (the title is bold).
    let ticks: Vec<String> = texts(&svg, "text-anchor=\"middle\"")
        .into_iter()
        .filter(|t| t.parse::<f64>().is_ok())
        .collect();
    assert_eq!(ticks, ["1", "2", "3"]);
    for n in 1..=400usize {
        let ticks = nice_ticks(1.0, n as f64, 7, true);
        assert!(!ticks.is_empty() && ticks.len() <= 7, "{n}: {ticks:?}");
        assert!(ticks.iter().all(|t| t.fract() == 0.0), "{n}: {ticks:?}");
        assert!(ticks.windows(2).all(|p| p[0] < p[1]), "{n}: {ticks:?}");
    }
}

#[test]
fn one_step_and_non_finite_values_plot_without_a_panic() {
    // One step: each plot is a single point.
    let dir = run_dir("one", &[ppo_line(1, "0.3", "0.5")]);
    write_report(&dir).unwrap();
    let (w, _, _) = decode(&dir.join("plot_reward.png"));
    assert_eq!(w, SVG_SIZE.0 * PNG_SCALE);
    let svg = std::fs::read_to_string(dir.join("plot_reward.svg")).unwrap();
    assert!(svg.contains("<circle"), "the single point is marked");

    // Huge values, missing ones and strings: what JSON can carry.
    let dir = run_dir(
        "huge",
        &[
            ppo_line(1, "1e308", "-1e308"),
            ppo_line(2, "null", "\"x\""),
            ppo_line(18446744073709551615, "-1e308", "5e-324"),
        ],
    );
    write_report(&dir).unwrap();
    decode(&dir.join("plot_losses.png"));

    // NaN and infinities (a diverged step) reach the plots only through the API; they are
    // skipped, not drawn: the raw line has the one finite point left.
    let series = [(
        "loss",
        vec![
            (1.0, f64::NAN),
            (2.0, f64::INFINITY),
            (3.0, 0.5),
            (f64::NAN, 1.0),
            (4.0, f64::NEG_INFINITY),
        ],
    )];
    let plot = Plot {
        title: "Diverged",
        y_label: "loss",
        series: &series,
    };
    plot::png(&plot).unwrap();
    let svg = plot::svg(&plot).unwrap();
    let raw = svg.split("class=\"raw\"").nth(1).unwrap();
    let points = raw
        .split("points=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    assert_eq!(points.split_whitespace().count(), 1, "{points}");

    // Nothing finite at all: an empty chart saying so.
    let series = [("loss", vec![(1.0, f64::NAN)]), ("kl", Vec::new())];
    let svg = plot::svg(&Plot {
        title: "Empty",
        y_label: "loss",
        series: &series,
    })
    .unwrap();
    assert!(svg.contains("no finite values"));
}
