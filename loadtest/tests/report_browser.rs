//! The HTML report opens offline in a real browser and its plots are drawn: a short local run
//! writes the report, headless Chromium (Debian's `chromium` package, installed by the test
//! command) renders it to a PNG, and the test counts the pixels of each plotted series.

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
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .args(args)
        .output()
        .expect("run chromium")
}

#[test]
fn html_report_plots_are_drawn_in_a_browser() {
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
    let url = format!("file://{}", html.display());

    // The DOM after rendering holds the three charts and their five series.
    let dom = headless(&dir, &["--dump-dom", &url]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    for chart in ["latency", "loss", "throughput"] {
        assert!(
            dom.contains(&format!("<svg id=\"{chart}\"")),
            "chart {chart} missing"
        );
    }
    assert_eq!(
        dom.matches("class=\"series\"").count(),
        5,
        "five plotted series"
    );

    // And they are drawn: count each series' colour in a screenshot. A legend swatch is 100
    // pixels; a drawn line across the chart is many more.
    let png = dir.join("r.png");
    let shot = headless(
        &dir,
        &[
            "--window-size=800,1700",
            &format!("--screenshot={}", png.display()),
            &url,
        ],
    );
    assert!(
        png.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(channels).collect();
    for (series, rgb) in [
        ("latency p50", [0x1f, 0x77, 0xb4]),
        ("latency p99", [0xd6, 0x27, 0x28]),
        ("lost", [0xff, 0x7f, 0x0e]),
        ("sent", [0x2c, 0xa0, 0x2c]),
        ("received", [0x94, 0x67, 0xbd]),
    ] {
        let n = pixels.iter().filter(|p| p[..3] == rgb).count();
        assert!(
            n > 300,
            "{series}: only {n} pixels of its colour: not drawn"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
