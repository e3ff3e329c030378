//! The HTML report: one self-contained page (inline CSS and SVG drawn here; no script, no
//! network), so that it opens offline in any browser and can be attached to a release.
//!
//! It opens with the verdict and the figures a reader looks for first, as cards; then the
//! scenario, the checks, where loss happened, and one chart per aspect of the run over time
//! (calls up, packets, bit rate, loss, latency, jitter, each relay's forwarding, the generator's
//! CPU and wake-up lag) with the ramp-up and drain phases shaded, and the distribution of
//! allocation and bind latency. Axes carry round-number ticks and their units; hovering a
//! second shows its values (SVG `<title>`).

use std::fmt::Write as _;

use crate::report::{Phases, Report, SecondReport};
use crate::stats::LegTransport;

/// Width of a chart in SVG units; the page scales it to its own width.
const W: f64 = 1000.0;
/// Height of a chart.
const H: f64 = 300.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 52.0;
/// Length of one dash of a dashed series.
const DASH: f64 = 7.0;

/// Series colours: distinct within any one chart.
const BLUE: &str = "#1f77b4";
const RED: &str = "#d62728";
const GREEN: &str = "#2ca02c";
const PURPLE: &str = "#9467bd";
const ORANGE: &str = "#ff7f0e";
const BROWN: &str = "#8c564b";
const TEAL: &str = "#17becf";
const PINK: &str = "#e377c2";
const OLIVE: &str = "#bcbd22";
const RELAY_COLORS: [&str; 6] = [BLUE, GREEN, PURPLE, ORANGE, BROWN, TEAL];

/// One line of a chart. `NaN` values are gaps (nothing measured there).
#[derive(Debug, Clone)]
struct Series {
    name: String,
    color: &'static str,
    points: Vec<(f64, f64)>,
    dashed: bool,
}

impl Series {
    fn new(name: impl Into<String>, color: &'static str, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            color,
            points,
            dashed: false,
        }
    }

    fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }

    fn has_values(&self) -> bool {
        self.points.iter().any(|p| p.1.is_finite())
    }
}

/// A chart to draw.
struct Chart<'a> {
    id: &'a str,
    title: &'a str,
    /// X axis label, unit included.
    x_label: &'a str,
    /// Y axis label, unit included.
    y_label: &'a str,
    /// Unit appended to values on hover.
    unit: &'a str,
    series: Vec<Series>,
    /// Shade these (time charts).
    phases: Option<Phases>,
    /// Fixed top of the y axis (percentages).
    y_max: Option<f64>,
}

/// Escapes text for HTML and SVG.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round tick step (1, 2 or 5 times a power of ten) giving about `target` intervals over
/// `0..=max`.
pub fn nice_step(max: f64, target: usize) -> f64 {
    let raw = max / target.max(1) as f64;
    if !(raw > 0.0 && raw.is_finite()) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Ticks from 0 to the first round number at or above `max`: `(top, step, ticks)`.
pub fn ticks(max: f64, target: usize) -> (f64, f64, Vec<f64>) {
    let max = if max > 0.0 && max.is_finite() {
        max
    } else {
        1.0
    };
    let step = nice_step(max, target);
    let n = (max / step - 1e-9).ceil().max(1.0) as usize;
    let ticks = (0..=n).map(|i| i as f64 * step).collect();
    (n as f64 * step, step, ticks)
}

/// A tick label: `v` with as many decimals as `step` needs, in k or M when the axis is large.
pub fn tick_label(v: f64, step: f64, top: f64) -> String {
    let (scale, suffix) = if top >= 1e6 {
        (1e6, "M")
    } else if top >= 1e4 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    let decimals = (-(step / scale).log10().floor()).max(0.0) as usize;
    if v == 0.0 {
        return "0".into();
    }
    format!("{:.*}{suffix}", decimals, v / scale)
}

/// A value for hover text: three significant digits, thousands separated.
fn value(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    if a >= 100.0 {
        let s = format!("{:.0}", v);
        let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn svg_chart(c: &Chart<'_>) -> String {
    let series: Vec<&Series> = c.series.iter().filter(|s| s.has_values()).collect();
    let finite = |s: &&Series| {
        s.points
            .iter()
            .filter(|p| p.1.is_finite())
            .copied()
            .collect::<Vec<_>>()
    };
    let xmax_data = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .chain(c.phases.map(|p| p.drain_end_s))
        .fold(0.0, f64::max);
    let ymax_data = series
        .iter()
        .flat_map(finite)
        .map(|p| p.1)
        .fold(0.0, f64::max);
    let (xtop, xstep, xticks) = ticks(xmax_data, 10);
    let (ytop, ystep, yticks) = match c.y_max {
        Some(top) => {
            let step = nice_step(top, 5);
            let n = (top / step).round() as usize;
            (top, step, (0..=n).map(|i| i as f64 * step).collect())
        }
        None => ticks(ymax_data * 1.05, 5),
    };
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |v: f64| LEFT + v / xtop * pw;
    let y = |v: f64| TOP + (1.0 - (v / ytop).min(1.0)) * ph;
    let mut o = String::new();
    let _ = write!(
        o,
        "<figure class=\"chart-box\"><svg id=\"{id}\" class=\"chart\" viewBox=\"0 0 {W} {H}\" \
         preserveAspectRatio=\"xMidYMid meet\" role=\"img\" aria-label=\"{t}\">\
         <title>{t}</title><text x=\"{LEFT}\" y=\"22\" class=\"title\">{t}</text>",
        id = c.id,
        t = escape(c.title)
    );
    // Phases first, under everything.
    if let Some(p) = c.phases {
        for (class, label, a, b) in [
            ("phase ramp", "ramp-up", 0.0, p.ramp_up_end_s),
            ("phase drain", "drain", p.full_load_end_s, p.drain_end_s),
        ] {
            if b > a {
                let _ = write!(
                    o,
                    "<rect class=\"{class}\" x=\"{:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{ph}\">\
                     <title>{label}: {a:.1} s to {b:.1} s</title></rect>\
                     <text class=\"phase-label\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
                    x(a),
                    x(b) - x(a),
                    (x(a) + x(b)) / 2.0,
                    TOP + 14.0
                );
            }
        }
    }
    // Grid, ticks and axis labels.
    for v in &yticks {
        let yy = y(*v);
        let _ = write!(
            o,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\"/>\
             <text class=\"tick y\" data-value=\"{v}\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 8.0,
            yy + 4.0,
            tick_label(*v, ystep, ytop)
        );
    }
    for v in &xticks {
        let xx = x(*v);
        let _ = write!(
            o,
            "<line class=\"grid\" x1=\"{xx:.1}\" x2=\"{xx:.1}\" y1=\"{TOP}\" y2=\"{:.1}\"/>\
             <text class=\"tick x\" data-value=\"{v}\" x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            TOP + ph,
            TOP + ph + 18.0,
            tick_label(*v, xstep, xtop)
        );
    }
    let _ = write!(
        o,
        "<line class=\"axis\" x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{b:.1}\" shape-rendering=\"crispEdges\"/>\
         <line class=\"axis\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{b:.1}\" y2=\"{b:.1}\" shape-rendering=\"crispEdges\"/>\
         <text class=\"axis-label x\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
         <text class=\"axis-label y\" transform=\"translate(18 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        W - RIGHT,
        LEFT + pw / 2.0,
        H - 10.0,
        escape(c.x_label),
        TOP + ph / 2.0,
        escape(c.y_label),
        b = TOP + ph,
    );
    if series.is_empty() {
        let _ = write!(
            o,
            "<text class=\"empty\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">n/a: nothing was measured</text>",
            LEFT + pw / 2.0,
            TOP + ph / 2.0
        );
    }
    // Series, then the legend, right-aligned on the title's line. Dashed series take turns
    // along one period, each drawing its own stretch, so that lines that coincide (nothing
    // lost, on every transport) all stay visible over the solid one beneath them.
    let dashed = series.iter().filter(|s| s.dashed).count();
    let period = DASH * (dashed as f64 + 1.0);
    let mut turn = 0.0;
    for s in &series {
        let mut d = String::new();
        let mut pen_down = false;
        for (px, py) in &s.points {
            if !py.is_finite() {
                pen_down = false;
                continue;
            }
            let _ = write!(
                d,
                "{}{:.1},{:.1} ",
                if pen_down { 'L' } else { 'M' },
                x(*px),
                y(*py)
            );
            pen_down = true;
        }
        let _ = write!(
            o,
            "<path class=\"series\" data-series=\"{n}\" d=\"{}\" fill=\"none\" stroke=\"{c}\" \
             stroke-width=\"3\" stroke-linejoin=\"round\"{dash}><title>{n}</title></path>",
            d.trim_end(),
            n = escape(&s.name),
            c = s.color,
            dash = if s.dashed {
                turn += 1.0;
                format!(
                    " stroke-dasharray=\"{DASH} {}\" stroke-dashoffset=\"{}\"",
                    period - DASH,
                    period - turn * DASH
                )
            } else {
                String::new()
            }
        );
        // A lone point would draw nothing: mark it.
        let pts = finite(s);
        if pts.len() == 1 {
            let _ = write!(
                o,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"5\" fill=\"{}\"/>",
                x(pts[0].0),
                y(pts[0].1),
                s.color
            );
        }
    }
    let widths: Vec<f64> = series
        .iter()
        .map(|s| 22.0 + 7.0 * s.name.chars().count() as f64 + 14.0)
        .collect();
    let mut lx = W - RIGHT - widths.iter().sum::<f64>();
    for (s, w) in series.iter().zip(&widths) {
        let _ = write!(
            o,
            "<g class=\"legend\"><rect x=\"{lx:.1}\" y=\"13\" width=\"10\" height=\"10\" fill=\"{c}\"/>\
             <text x=\"{:.1}\" y=\"22\" class=\"legend-text\">{n}</text></g>",
            lx + 15.0,
            c = s.color,
            n = escape(&s.name)
        );
        lx += w;
    }
    // Hover: a transparent column per x, titled with every series' value there.
    let mut xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let every = xs.len().div_ceil(600).max(1);
    let is_time = c.phases.is_some();
    for (k, xv) in xs.iter().enumerate().step_by(every) {
        let left = if k == 0 {
            x(*xv)
        } else {
            (x(xs[k - 1]) + x(*xv)) / 2.0
        };
        let right = xs
            .get(k + every)
            .or(xs.get(k + 1))
            .map_or(x(*xv), |n| (x(*xv) + x(*n)) / 2.0);
        let mut tip = if is_time {
            // Time points sit in the middle of their second.
            format!("{:.0} s to {:.0} s", xv - 0.5, xv + 0.5)
        } else {
            format!("{} {}", value(*xv), c.x_label)
        };
        for s in &series {
            if let Some(p) = s.points.iter().find(|p| p.0 == *xv) {
                let _ = write!(tip, "\n{}: {} {}", s.name, value(p.1), c.unit);
            }
        }
        let _ = write!(
            o,
            "<rect class=\"hover\" x=\"{left:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{ph}\"><title>{}</title></rect>",
            (right - left).max(1.0),
            escape(tip.trim_end())
        );
    }
    o + "</svg></figure>"
}

fn timeline(r: &Report, f: impl Fn(&SecondReport) -> Option<f64>) -> Vec<(f64, f64)> {
    r.timeline
        .iter()
        .map(|s| (s.t as f64 + 0.5, f(s).unwrap_or(f64::NAN)))
        .collect()
}

fn transport_color(t: LegTransport) -> &'static str {
    match t {
        LegTransport::Udp => BROWN,
        LegTransport::Quic => TEAL,
    }
}

fn charts(r: &Report) -> Vec<String> {
    let phases = Some(r.phases);
    let time = "time since start (s)";
    let mixed = r.by_transport.len() > 1;
    let mut out = Vec::new();
    let mut chart = |id: &str,
                     title: &str,
                     y_label: &str,
                     unit: &str,
                     series: Vec<Series>,
                     y_max: Option<f64>| {
        out.push(svg_chart(&Chart {
            id,
            title,
            x_label: time,
            y_label,
            unit,
            series,
            phases,
            y_max,
        }));
    };
    chart(
        "calls",
        "Calls up (every leg bound)",
        "calls",
        "calls",
        vec![Series::new(
            "calls up",
            BLUE,
            timeline(r, |s| Some(s.calls_up as f64)),
        )],
        None,
    );
    chart(
        "throughput",
        "RTP packets per second",
        "packets/s",
        "packets/s",
        vec![
            Series::new("sent", GREEN, timeline(r, |s| Some(s.sent as f64))),
            Series::new("received", PURPLE, timeline(r, |s| Some(s.received as f64))).dashed(),
        ],
        None,
    );
    chart(
        "bitrate",
        "Bit rate (SRTP)",
        "bit rate (Mbit/s)",
        "Mbit/s",
        vec![
            Series::new(
                "sent",
                GREEN,
                timeline(r, |s| Some(s.sent_bitrate_bps / 1e6)),
            ),
            Series::new(
                "received",
                PURPLE,
                timeline(r, |s| Some(s.bitrate_bps / 1e6)),
            )
            .dashed(),
        ],
        None,
    );
    let mut loss = vec![Series::new(
        "lost (all)",
        ORANGE,
        timeline(r, |s| Some(s.lost as f64)),
    )];
    let mut latency = vec![
        Series::new(
            "p50",
            BLUE,
            timeline(r, |s| s.latency_p50_us.map(|u| u / 1000.0)),
        ),
        Series::new(
            "p99",
            RED,
            timeline(r, |s| s.latency_p99_us.map(|u| u / 1000.0)),
        ),
    ];
    if mixed {
        for t in &r.by_transport {
            let tr = t.transport;
            let pick =
                move |s: &SecondReport| s.by_transport.iter().find(|b| b.transport == tr).cloned();
            loss.push(
                Series::new(
                    format!("lost at {} receivers", tr.as_str()),
                    transport_color(tr),
                    timeline(r, |s| pick(s).map(|b| b.lost as f64)),
                )
                .dashed(),
            );
            latency.push(
                Series::new(
                    format!("p99 at {} receivers", tr.as_str()),
                    transport_color(tr),
                    timeline(r, |s| {
                        pick(s).and_then(|b| b.latency_p99_us).map(|u| u / 1000.0)
                    }),
                )
                .dashed(),
            );
        }
    }
    chart(
        "loss",
        "Lost packets, by the second they were sent",
        "packets",
        "packets",
        loss,
        None,
    );
    chart(
        "latency",
        "One-way latency",
        "latency (ms)",
        "ms",
        latency,
        None,
    );
    chart(
        "jitter",
        "Interarrival jitter (RFC 3550), mean over streams",
        "jitter (ms)",
        "ms",
        vec![Series::new("jitter", PINK, timeline(r, |s| s.jitter_ms))],
        None,
    );
    let mut names: Vec<&str> = r
        .timeline
        .iter()
        .flat_map(|s| s.relays.iter().map(|x| x.node_id.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    if !names.is_empty() {
        let mut series: Vec<Series> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                Series::new(
                    format!("{n} forwarded"),
                    RELAY_COLORS[i % RELAY_COLORS.len()],
                    timeline(r, |s| {
                        s.relays
                            .iter()
                            .find(|x| x.node_id == *n)
                            .map(|x| x.forwarded as f64)
                    }),
                )
            })
            .collect();
        series.push(
            Series::new(
                "dropped (all relays)",
                RED,
                timeline(r, |s| {
                    (!s.relays.is_empty()).then(|| s.relays.iter().map(|x| x.dropped as f64).sum())
                }),
            )
            .dashed(),
        );
        chart(
            "relays",
            "Each relay's forwarding, from its own metrics",
            "datagrams/s",
            "datagrams/s",
            series,
            None,
        );
    }
    chart(
        "cpu",
        "CPU of this machine",
        "CPU (% of all CPUs)",
        "%",
        vec![
            Series::new(
                "machine busy",
                RED,
                timeline(r, |s| s.cpu_busy.map(|c| c * 100.0)),
            ),
            Series::new(
                "this process",
                BLUE,
                timeline(r, |s| s.cpu_process.map(|c| c * 100.0)),
            ),
        ],
        Some(100.0),
    );
    chart(
        "send_lag",
        "How late senders woke for their frames (p99)",
        "lag (ms)",
        "ms",
        vec![Series::new(
            "send lag p99",
            OLIVE,
            timeline(r, |s| s.send_lag_p99_ms),
        )],
        None,
    );
    let pct = |v: &[(f64, f64)]| v.iter().map(|(ms, q)| (*ms, q * 100.0)).collect::<Vec<_>>();
    out.push(svg_chart(&Chart {
        id: "setup",
        title: "Allocation and bind latency (cumulative)",
        x_label: "latency (ms)",
        y_label: "calls or legs at or below (%)",
        unit: "%",
        series: vec![
            Series::new("AllocateSession", BLUE, pct(&r.allocation_latency_cdf)),
            Series::new("leg bind", GREEN, pct(&r.bind_latency_cdf)),
        ],
        phases: None,
        y_max: Some(100.0),
    }));
    out
}

/// `n/a` for what was not measured.
fn or_na(v: Option<String>) -> String {
    v.unwrap_or_else(|| "n/a".into())
}

fn card(id: &str, class: &str, label: &str, value: &str, note: &str) -> String {
    format!(
        "<div class=\"card {class}\" id=\"card-{id}\"><div class=\"label\">{}</div>\
         <div class=\"value\">{}</div><div class=\"note\">{}</div></div>",
        escape(label),
        escape(value),
        escape(note)
    )
}

fn cards(r: &Report) -> String {
    let v = &r.verdict;
    let mark = if r.generator.limited { "*" } else { "" };
    let crossed: Vec<String> = v
        .crossed()
        .map(|c| format!("{} {} > {}", c.check, c.measured, c.limit))
        .collect();
    let check_class = |name: &str| match v.checks.iter().find(|c| c.check == name) {
        Some(c) if !c.passed => "fail",
        Some(_) => "pass",
        None => "",
    };
    let failures: Vec<String> = r
        .call_failures
        .iter()
        .map(|(k, n)| format!("{k} ×{n}"))
        .collect();
    let mut o = String::from("<section class=\"cards\">");
    o += &card(
        "verdict",
        if v.passed { "pass" } else { "fail" },
        "verdict",
        if v.passed { "PASS" } else { "FAIL" },
        &if v.passed {
            format!("{} checks within their limits", v.checks.len())
        } else {
            format!(
                "exit {}: {}",
                crate::gate::EXIT_THRESHOLD,
                crossed.join("; ")
            )
        },
    );
    o += &card(
        "calls",
        check_class("failed_calls"),
        "calls",
        &format!("{} / {}", r.calls, r.scenario.calls),
        &if failures.is_empty() {
            "ran media; none failed".to_string()
        } else {
            format!("{} failed: {}", r.calls_failed, failures.join(", "))
        },
    );
    o += &card(
        "loss",
        check_class("loss"),
        "loss",
        &or_na(r.loss_ratio.map(|l| format!("{:.3}%{mark}", l * 100.0))),
        &format!(
            "{} of {} deliveries due",
            r.packets_lost, r.packets_expected
        ),
    );
    o += &card(
        "latency",
        check_class("latency_p99"),
        "one-way latency p99",
        &or_na(
            r.latency_us
                .as_ref()
                .map(|q| format!("{:.2} ms{mark}", q.p99 / 1000.0)),
        ),
        &or_na(
            r.latency_us
                .as_ref()
                .map(|q| format!("p50 {:.2} ms, max {:.1} ms", q.p50 / 1000.0, q.max / 1000.0)),
        ),
    );
    o += &card(
        "gap",
        check_class("media_gap"),
        "longest media gap",
        &or_na(r.media_gap_ms.map(|g| format!("{:.0} ms{mark}", g.max))),
        &or_na(
            r.media_gap_ms
                .map(|g| format!("per participant: p50 {:.0} ms, p99 {:.0} ms", g.p50, g.p99)),
        ),
    );
    o += &card(
        "jitter",
        "",
        "jitter (RFC 3550)",
        &or_na(r.jitter_ms.map(|j| format!("{j:.2} ms{mark}"))),
        &or_na(
            r.jitter_ms_max
                .map(|j| format!("mean over streams; max {j:.2} ms")),
        ),
    );
    o += &card(
        "bitrate",
        "",
        "received bit rate",
        &or_na(r.bitrate_bps.map(|b| format!("{:.2} Mbit/s", b / 1e6))),
        &format!("{} participants", r.participants),
    );
    o += &card(
        "generator",
        if r.generator.limited { "warn" } else { "pass" },
        "generator",
        if r.generator.limited {
            "bottleneck"
        } else {
            "kept up"
        },
        &if r.generator.limited {
            r.generator.reasons.join("; ")
        } else {
            or_na(
                r.generator
                    .cpu_busy
                    .map(|c| format!("CPUs {:.0}% busy at full load", c * 100.0)),
            )
        },
    );
    o + "</section>"
}

fn table(rows: &[(&str, String)]) -> String {
    let mut o = String::from("<table>");
    for (k, v) in rows {
        let _ = write!(o, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v));
    }
    o + "</table>"
}

fn scenario_table(r: &Report) -> String {
    let s = &r.scenario;
    let mix: Vec<String> = s
        .mix
        .iter()
        .map(|(p, w)| format!("{}={w}", p.as_str()))
        .collect();
    table(&[
        ("target", r.target.clone()),
        (
            "calls",
            format!("{} calls of {} participants", s.calls, s.participants),
        ),
        ("transport", s.transport.describe().to_string()),
        ("failover", s.failover.describe().to_string()),
        ("SRTP profile", s.srtp.rfc_name().to_string()),
        ("media profiles", mix.join(", ")),
        (
            "ramp-up",
            format!(
                "{} calls/s ({:.1} s), then {} s at full load, {:.0} s drain",
                s.ramp_up_per_sec,
                r.phases.ramp_up_end_s,
                s.duration.as_secs(),
                r.phases.drain_end_s - r.phases.full_load_end_s
            ),
        ),
        (
            "participant addresses",
            format!("{} local addresses", s.client_ips.len()),
        ),
        ("started", r.started_at.clone()),
        ("wall time", format!("{:.1} s", r.wall_secs)),
        ("veil-loadtest", r.version.clone()),
    ])
}

fn checks_table(r: &Report) -> String {
    let mut o = String::from(
        "<table class=\"checks\"><tr><th>check</th><th>limit</th><th>measured</th><th>result</th></tr>",
    );
    for c in &r.verdict.checks {
        let _ = write!(
            o,
            "<tr class=\"{}\"><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if c.passed { "pass" } else { "fail" },
            escape(c.check),
            c.flag
                .map_or(String::new(), |f| format!(" <code>{}</code>", escape(f))),
            escape(&c.limit),
            escape(&c.measured),
            if c.passed { "pass" } else { "FAIL" }
        );
    }
    o + "</table>"
}

fn loss_table(r: &Report) -> String {
    let b = &r.loss_breakdown;
    let n = |v: Option<u64>| v.map_or("n/a".to_string(), |v| v.to_string());
    let mut rows = vec![
        (
            "generator, sending (its sockets refused)",
            b.sender_send_errors.to_string(),
        ),
        (
            "relays' input (sent, neither forwarded nor dropped; estimate)",
            b.relay_input.map_or("n/a".into(), |v| format!("≈ {v}")),
        ),
        (
            "relays' sockets (kernel: receive buffer full)",
            b.relay_socket_drops
                .map_or("n/a (relays not on this host)".into(), |v| {
                    format!(
                        "{v} (UDP {}, QUIC {})",
                        n(b.relay_udp_socket_drops),
                        n(b.relay_quic_socket_drops)
                    )
                }),
        ),
        ("relays (dropped, every reason)", n(b.relay_dropped)),
        ("relays (failed to send)", n(b.relay_send_errors)),
        (
            "after the relays (forwarded, never read by a participant)",
            n(b.after_relay),
        ),
        (
            "participants' sockets (kernel: receive buffer full)",
            n(b.receiver_socket_drops),
        ),
        (
            "generator, receiving (read too late to keep)",
            b.receiver_queue_overflows.to_string(),
        ),
    ];
    if let Some(k) = &r.kernel_udp {
        rows.push((
            "kernel UDP on this host (RcvbufErrors / SndbufErrors / InErrors)",
            format!(
                "{} / {} / {}",
                k.rcvbuf_errors, k.sndbuf_errors, k.in_errors
            ),
        ));
    }
    let mut o = format!(
        "<p>{} RTP deliveries lost{}. Counts below are datagrams (RTP and RTCP).</p>",
        b.deliveries_lost,
        b.dominant
            .as_ref()
            .map_or(String::new(), |d| format!("; most in {}", escape(d)))
    );
    o += &table(&rows);
    o
}

/// The HTML report: self-contained (inline CSS and SVG; no script, no network), so it opens
/// offline in any browser.
pub fn render(r: &Report) -> String {
    let json = serde_json::to_string_pretty(r).expect("report serialises");
    let mut body = String::new();
    let _ = write!(
        body,
        "<header><h1>Veil load test report</h1><p class=\"sub\">veil-loadtest {} · started {} · \
         {:.1} s wall · {}</p></header>",
        escape(&r.version),
        escape(&r.started_at),
        r.wall_secs,
        escape(&r.target)
    );
    body += &cards(r);
    if r.generator.limited {
        let _ = write!(
            body,
            "<p class=\"warning\" id=\"generator-warning\"><b>The generator was a bottleneck:</b> \
             {}. Figures marked * describe this machine as much as the relay.</p>",
            escape(&r.generator.reasons.join("; "))
        );
    }
    body += "<div class=\"columns\"><section><h2>Scenario</h2>";
    body += &scenario_table(r);
    body += "</section><section><h2>Checks</h2>";
    body += &checks_table(r);
    body += "<h2>Where loss happened</h2>";
    body += &loss_table(r);
    body += "</section></div><h2>Over time</h2><p class=\"legend-note\">Shaded: \
             <span class=\"swatch ramp\"></span> ramp-up (calls starting), \
             <span class=\"swatch drain\"></span> drain (senders stopped, packets in flight \
             arriving). Hover a second for its values.</p>";
    for c in charts(r) {
        body += &c;
    }
    let _ = write!(
        body,
        "<h2>Summary</h2><pre id=\"summary\">{}</pre>\
         <details><summary>JSON report</summary><pre>{}</pre></details>",
        escape(&r.summary()),
        escape(&json)
    );
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Veil load test report: {verdict}, {started}</title><style>{STYLE}</style></head>\
         <body>{body}</body></html>\n",
        verdict = if r.verdict.passed { "PASS" } else { "FAIL" },
        started = escape(&r.started_at),
    )
}

const STYLE: &str = "\
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;padding:20px 24px;color:#1f2328;max-width:1400px}\
h1{font-size:22px;margin:0 0 2px}h2{font-size:16px;margin:22px 0 8px}.sub{color:#59636e;margin:0 0 14px}\
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:10px;margin:8px 0 12px}\
.card{border:1px solid #d0d7de;border-left-width:6px;border-radius:6px;padding:10px 12px;background:#fff}\
.card .label{color:#59636e;font-size:12px;text-transform:uppercase;letter-spacing:.04em}\
.card .value{font-size:24px;font-weight:650;margin:2px 0}.card .note{color:#59636e;font-size:12px}\
.card.pass{border-left-color:#1a7f37}.card.fail{border-left-color:#cf222e}.card.fail .value{color:#cf222e}\
.card.warn{border-left-color:#bf8700}.card.warn .value{color:#9a6700}\
.warning{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px 12px}\
.columns{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:0 28px}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:3px 10px 3px 0;border-bottom:1px solid #eaeef2;vertical-align:top}\
th{color:#59636e;font-weight:500}tr.fail td{color:#cf222e;font-weight:600}\
.chart-box{margin:10px 0;border:1px solid #d0d7de;border-radius:6px;background:#fff;padding:4px}\
.chart{display:block;width:100%;height:auto}.title{font-weight:600;font-size:15px;fill:#1f2328}\
.tick{font-size:12px;fill:#59636e}.axis-label{font-size:13px;fill:#1f2328}.legend-text{font-size:12px;fill:#1f2328}\
.grid{stroke:#eaeef2}.axis{stroke:#8c959f}.phase.ramp{fill:#ddf4ff;fill-opacity:.55}.phase.drain{fill:#fff1e5;fill-opacity:.8}\
.phase-label{font-size:11px;fill:#59636e}.hover{fill:transparent}.hover:hover{fill:#000;fill-opacity:.05}\
.empty{font-size:14px;fill:#8c959f}.legend-note{color:#59636e}\
.swatch{display:inline-block;width:12px;height:12px;vertical-align:-2px;border:1px solid #d0d7de}\
.swatch.ramp{background:#ddf4ff}.swatch.drain{background:#fff1e5}\
pre{background:#f6f8fa;padding:12px;overflow:auto;white-space:pre-wrap;font-size:12px}code{font-size:12px}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_numbers_from_zero() {
        let (top, step, t) = ticks(37.0, 5);
        assert_eq!((top, step), (40.0, 10.0));
        assert_eq!(t, vec![0.0, 10.0, 20.0, 30.0, 40.0]);
        let (top, step, _) = ticks(0.0123, 5);
        assert_eq!(step, 0.005);
        assert!((top - 0.015).abs() < 1e-12);
        let (top, step, _) = ticks(23_456.0, 5);
        assert_eq!((top, step), (25_000.0, 5_000.0));
        let (top, _, t) = ticks(0.0, 5);
        assert_eq!((top, t.len()), (1.0, 6));
        // Exactly on a tick: no empty interval above it.
        assert_eq!(ticks(20.0, 10).0, 20.0);
    }

    #[test]
    fn tick_labels_use_the_step_and_a_suffix() {
        assert_eq!(tick_label(5000.0, 5000.0, 25_000.0), "5k");
        assert_eq!(tick_label(2_500_000.0, 500_000.0, 3e6), "2.5M");
        assert_eq!(tick_label(0.015, 0.005, 0.015), "0.015");
        assert_eq!(tick_label(0.0, 0.005, 0.015), "0");
        assert_eq!(tick_label(30.0, 10.0, 40.0), "30");
    }

    #[test]
    fn hover_values_read_well() {
        assert_eq!(value(1_234_567.0), "1,234,567");
        assert_eq!(value(-1234.0), "-1,234");
        assert_eq!(value(12.345), "12.3");
        assert_eq!(value(0.01234), "0.012");
        assert_eq!(value(f64::NAN), "n/a");
    }

    #[test]
    fn a_chart_breaks_its_line_where_nothing_was_measured() {
        let svg = svg_chart(&Chart {
            id: "t",
            title: "T",
            x_label: "time since start (s)",
            y_label: "latency (ms)",
            unit: "ms",
            series: vec![
                Series::new(
                    "p99",
                    RED,
                    vec![(0.5, 1.0), (1.5, f64::NAN), (2.5, 3.0), (3.5, 2.0)],
                ),
                Series::new("never", BLUE, vec![(0.5, f64::NAN)]),
            ],
            phases: Some(Phases {
                ramp_up_end_s: 1.0,
                full_load_end_s: 3.0,
                drain_end_s: 4.0,
            }),
            y_max: None,
        });
        assert_eq!(
            svg.matches("class=\"series\"").count(),
            1,
            "an empty series is left out"
        );
        let d = svg
            .split(" d=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(d.matches('M').count(), 2, "{d}");
        assert!(
            svg.contains("<title>2 s to 3 s\np99: 3.00 ms</title>"),
            "{svg}"
        );
        assert!(svg.contains("class=\"phase ramp\"") && svg.contains("class=\"phase drain\""));
    }
}
