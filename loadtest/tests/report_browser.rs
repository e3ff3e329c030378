//! The HTML report opens offline in a real browser and every chart is drawn: a short local run
//! writes the report, headless Chromium (Debian's `chromium` package, installed by the test
//! command) renders it, and the test reads the rendered DOM (every chart, round-number ticks on
//! both axes, axis labels with units, hover titles, the verdict cards) and screenshots: the whole
//! page (its charts span the page's width) and each chart on its own, where it counts the pixels
//! of every plotted series' colour.

use std::path::{Path, PathBuf};
use std::process::Command;

fn chromium() -> PathBuf {
    let path = PathBuf::from("/usr/bin/chromium");
    assert!(
        path.exists(),
        "/usr/bin/chromium is missing: scripts/test.sh installs Debian's chromium package"
    );
    path
}

/// Runs headless Chromium with the flags that keep it off the network.
fn headless(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .args(args)
        .output()
        .expect("run chromium")
}

/// A screenshot of `url` at `width` × `height`: `(width, height, RGB pixels)`.
fn screenshot(dir: &Path, url: &str, name: &str, width: u32, height: u32) -> (usize, Vec<[u8; 3]>) {
    let png_path = dir.join(format!("{name}.png"));
    let shot = headless(
        dir,
        &[
            &format!("--window-size={width},{height}"),
            &format!("--screenshot={}", png_path.display()),
            url,
        ],
    );
    assert!(
        png_path.exists(),
        "no screenshot of {name}: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let pixels = buf[..info.buffer_size()]
        .chunks(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    (info.width as usize, pixels)
}

fn rgb(hex: &str) -> [u8; 3] {
    let h = hex.trim_start_matches('#');
    let b = |i: usize| u8::from_str_radix(&h[i..i + 2], 16).unwrap();
    [b(0), b(2), b(4)]
}

/// The value of attribute `name` in the start tag `tag`.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    Some(&tag[at..at + tag[at..].find('"')?])
}

/// Every `(start tag, text)` of `<text>` elements with class `class` in `svg`.
fn texts<'a>(svg: &'a str, class: &str) -> Vec<(&'a str, &'a str)> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let end = t.find('>')?;
            let tag = &t[..end];
            let text = &t[end + 1..t.find("</text>")?];
            (attr(tag, "class")? == class).then_some((tag, text))
        })
        .collect()
}

/// Parses a tick label back to its value: `2.5k` is 2500.
fn label_value(s: &str) -> f64 {
    let (num, scale) = match s.strip_suffix('M') {
        Some(n) => (n, 1e6),
        None => s.strip_suffix('k').map_or((s, 1.0), |n| (n, 1e3)),
    };
    num.parse::<f64>()
        .unwrap_or_else(|_| panic!("tick label {s:?} is not a number"))
        * scale
}

/// Ticks start at 0 and step by 1, 2 or 5 times a power of ten; labels say their values.
fn assert_round_ticks(chart: &str, axis: &str, ticks: &[(&str, &str)]) {
    assert!(ticks.len() >= 3, "{chart}: {} {axis} ticks", ticks.len());
    let values: Vec<f64> = ticks
        .iter()
        .map(|(tag, _)| attr(tag, "data-value").unwrap().parse().unwrap())
        .collect();
    assert_eq!(values[0], 0.0, "{chart} {axis}: ticks start at 0");
    let step = values[1] - values[0];
    let mantissa = step / 10f64.powf(step.log10().floor());
    assert!(
        [1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 1e-6),
        "{chart} {axis}: step {step} is not 1, 2 or 5 times a power of ten"
    );
    for (i, (v, (_, label))) in values.iter().zip(ticks).enumerate() {
        assert!(
            (v - i as f64 * step).abs() < step * 1e-6,
            "{chart} {axis}: ticks {values:?} are not evenly spaced"
        );
        let shown = label_value(label);
        assert!(
            (shown - v).abs() <= step * 1e-6 + 1e-12,
            "{chart} {axis}: label {label:?} for tick {v}"
        );
    }
}

const CHARTS: [&str; 10] = [
    "calls",
    "throughput",
    "bitrate",
    "loss",
    "latency",
    "jitter",
    "relays",
    "cpu",
    "send_lag",
    "setup",
];

#[test]
fn html_report_charts_are_drawn_in_a_browser() {
    let dir = std::env::temp_dir().join(format!("veil-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let html = dir.join("r.html");
    let out = Command::new(env!("CARGO_BIN_EXE_veil-loadtest"))
        .args([
            "--local",
            "--calls",
            "4",
            "--duration",
            "3s",
            "--quiet",
            "--transport",
            "mixed",
        ])
        .arg("--report-html")
        .arg(&html)
        .output()
        .expect("run veil-loadtest");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(!page.contains("<script"), "the report runs no script");
    for fetch in ["src=", "href=", "@import", "url(", "http://", "https://"] {
        assert!(
            !page.contains(fetch),
            "the report loads nothing ({fetch}): it opens offline"
        );
    }
    let url = format!("file://{}", html.display());

    // The DOM after rendering: cards, the scenario, and every chart with its axes.
    let dom = headless(&dir, &["--dump-dom", &url]);
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    for card in [
        "verdict",
        "calls",
        "loss",
        "latency",
        "gap",
        "jitter",
        "generator",
    ] {
        assert!(
            dom.contains(&format!("id=\"card-{card}\"")),
            "card {card} missing"
        );
    }
    assert!(dom.contains("PASS"), "the verdict card says PASS");
    for fact in [
        "SRTP_AES128_CM_HMAC_SHA1_80",
        "mixed (even participants over QUIC",
        "local cluster in this process",
        "veil-loadtest",
    ] {
        assert!(dom.contains(fact), "the page restates the scenario: {fact}");
    }
    let mut series_colors: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for chart in CHARTS {
        let start = dom
            .find(&format!("<svg id=\"{chart}\""))
            .unwrap_or_else(|| panic!("chart {chart} missing"));
        let svg = &dom[start..start + dom[start..].find("</svg>").unwrap()];
        assert_round_ticks(chart, "x", &texts(svg, "tick x"));
        assert_round_ticks(chart, "y", &texts(svg, "tick y"));
        let x_label = texts(svg, "axis-label x");
        let y_label = texts(svg, "axis-label y");
        assert!(
            x_label.len() == 1 && (x_label[0].1.contains("(s)") || x_label[0].1.contains("(ms)")),
            "{chart}: x axis label with its unit: {x_label:?}"
        );
        assert!(
            y_label.len() == 1 && !y_label[0].1.trim().is_empty(),
            "{chart}: y axis label: {y_label:?}"
        );
        assert!(
            svg.contains("<rect class=\"hover\""),
            "{chart}: values on hover"
        );
        if chart != "setup" {
            assert!(
                svg.contains("class=\"phase ramp\"") && svg.contains("class=\"phase drain\""),
                "{chart}: ramp-up and drain shaded"
            );
        }
        let series: Vec<(String, String)> = svg
            .split("<path")
            .skip(1)
            .filter(|p| attr(p, "class") == Some("series"))
            .map(|p| {
                (
                    attr(p, "data-series").unwrap().to_string(),
                    attr(p, "stroke").unwrap().to_string(),
                )
            })
            .collect();
        assert!(!series.is_empty(), "{chart}: nothing plotted");
        let mut colors: Vec<&str> = series.iter().map(|s| s.1.as_str()).collect();
        colors.sort_unstable();
        colors.dedup();
        assert_eq!(colors.len(), series.len(), "{chart}: one colour per series");
        series_colors.push((chart.to_string(), series));
    }
    // A mixed run splits loss and latency by transport.
    let latency = &series_colors.iter().find(|c| c.0 == "latency").unwrap().1;
    for name in ["p99 at udp receivers", "p99 at quic receivers"] {
        assert!(latency.iter().any(|s| s.0 == name), "{latency:?}");
    }

    // The whole page: charts span its width (their axes run from near one edge to the other).
    let (width, pixels) = screenshot(&dir, &url, "page", 1280, 4000);
    let axis = rgb("#8c959f");
    let xs: Vec<usize> = pixels
        .iter()
        .enumerate()
        .filter(|(_, p)| **p == axis)
        .map(|(i, _)| i % width)
        .collect();
    let (min, max) = (
        xs.iter().copied().min().unwrap_or(width),
        xs.iter().copied().max().unwrap_or(0),
    );
    assert!(
        min < width * 12 / 100 && max > width * 90 / 100,
        "charts fill the page: axes span x {min}..{max} of {width}"
    );

    // Each chart on its own page (the report's own style and markup): every series is drawn.
    // A legend swatch is 100 pixels of its colour; a plotted line across the chart many more.
    let style = &page[page.find("<style>").unwrap()..page.find("</style>").unwrap() + 8];
    for (chart, series) in &series_colors {
        let start = page
            .find(&format!("<figure class=\"chart-box\"><svg id=\"{chart}\""))
            .unwrap();
        let end = start + page[start..].find("</figure>").unwrap() + 9;
        let one = dir.join(format!("chart-{chart}.html"));
        std::fs::write(
            &one,
            format!(
                "<!doctype html><html><head><meta charset=\"utf-8\">{style}\
                 <style>body{{margin:0;padding:0;max-width:none}}</style></head>\
                 <body>{}</body></html>",
                &page[start..end]
            ),
        )
        .unwrap();
        let (_, pixels) = screenshot(
            &dir,
            &format!("file://{}", one.display()),
            &format!("chart-{chart}"),
            1000,
            340,
        );
        for (name, color) in series {
            let want = rgb(color);
            let n = pixels.iter().filter(|p| **p == want).count();
            assert!(
                n > 300,
                "{chart}: series {name:?} ({color}) has only {n} pixels of its colour: not drawn"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
