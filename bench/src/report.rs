//! Tables: one line per load step as it completes, and the side-by-side summary.

use std::fmt::Write;

use crate::udpgen::Measured;

/// One load step of one configuration.
#[derive(Debug, Clone)]
pub struct Step {
    /// The forwarder: `direct`, `floor`, `veil-udp`, `veil-quic` or `coturn`.
    pub config: String,
    /// Datagram size, bytes.
    pub size: usize,
    /// Datagrams per send (1, or the frame size of the video-burst case).
    pub burst: usize,
    /// How many times it ran (more than once when other processes competed for the CPUs).
    pub attempts: usize,
    /// What it measured.
    pub m: Measured,
}

fn opt(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.prec$}"),
        _ => "-".into(),
    }
}

fn rate(r: Option<u64>) -> String {
    match r {
        Some(r) => format!("{}k", r / 1000),
        None => "max".into(),
    }
}

/// The header of the per-step table.
pub fn step_header() -> String {
    format!(
        "{:<11} {:>5} {:>5} {:>7} {:>9} {:>9} {:>8} {:>7} {:>7} {:>8} {:>8} {:>9}  note",
        "config",
        "size",
        "burst",
        "target",
        "offered",
        "delivered",
        "loss%",
        "cpu%",
        "us/pkt",
        "p50(us)",
        "p99(us)",
        "noise%r/g"
    )
}

/// One line of the per-step table.
pub fn step_line(s: &Step) -> String {
    let m = &s.m;
    let mut note = String::new();
    if m.generator_limited() {
        note.push_str("generator-limited ");
    }
    if m.noisy() {
        note.push_str("NOISY ");
    }
    if s.attempts > 1 {
        let _ = write!(note, "(attempt {}) ", s.attempts);
    }
    if m.passed() {
        note.push_str("ok");
    }
    let noise = format!(
        "{}/{}",
        opt(m.noise().map(|n| n * 100.0), 0),
        opt(m.gen_noise().map(|n| n * 100.0), 0)
    );
    format!(
        "{:<11} {:>5} {:>5} {:>7} {:>8.1}k {:>8.1}k {:>8.3} {:>7} {:>7} {:>8} {:>8} {:>9}  {}",
        s.config,
        s.size,
        s.burst,
        rate(m.target_pps),
        m.offered_pps / 1000.0,
        m.delivered_pps / 1000.0,
        m.loss() * 100.0,
        opt(m.relay_util().map(|u| u * 100.0), 1),
        opt(m.cpu_us_per_pkt(), 2),
        opt(Some(m.p50_us), 0),
        opt(Some(m.p99_us), 0),
        noise,
        note.trim_end()
    )
}

/// What the summary says of one configuration at one size.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// CPU µs per packet at the reference rate.
    pub us_per_pkt_ref: Option<f64>,
    /// CPU µs per packet when offered as much as the generator could send.
    pub us_per_pkt_max: Option<f64>,
    /// Highest rate offered with under 0.1% loss, pps.
    pub best_pps: Option<f64>,
    /// Delivered rate when offered as much as the generator could send, pps.
    pub max_delivered: Option<f64>,
    /// Latency at the reference rate, µs.
    pub p50_ref: Option<f64>,
    /// Latency at the reference rate, µs.
    pub p99_ref: Option<f64>,
}

/// Summarises the steps of `config` at `size` and `burst`; `reference` is the rate at which CPU
/// per packet and latency are compared.
pub fn summarise(
    steps: &[Step],
    config: &str,
    size: usize,
    burst: usize,
    reference: u64,
) -> Summary {
    let mine: Vec<&Step> = steps
        .iter()
        .filter(|s| s.config == config && s.size == size && s.burst == burst)
        .collect();
    let at_ref = mine.iter().find(|s| s.m.target_pps == Some(reference));
    let at_max = mine.iter().find(|s| s.m.target_pps.is_none());
    let best = mine
        .iter()
        .filter(|s| s.m.passed())
        .map(|s| match s.m.target_pps {
            Some(t) => t as f64,
            None => s.m.offered_pps,
        })
        .fold(None, |acc: Option<f64>, v| {
            Some(acc.map_or(v, |a| a.max(v)))
        });
    Summary {
        us_per_pkt_ref: at_ref.and_then(|s| s.m.cpu_us_per_pkt()),
        us_per_pkt_max: at_max.and_then(|s| s.m.cpu_us_per_pkt()),
        best_pps: best,
        max_delivered: at_max.map(|s| s.m.delivered_pps),
        p50_ref: at_ref.map(|s| s.m.p50_us),
        p99_ref: at_ref.map(|s| s.m.p99_us),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

/// The side-by-side table: per size, one line per configuration, and the ratios of each Veil
/// configuration to the floor and to coturn (`veil-turn` to `coturn-turn`).
pub fn summary_table(
    steps: &[Step],
    configs: &[String],
    sizes: &[usize],
    burst: usize,
    reference: u64,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<11} {:>5} {:>11} {:>11} {:>13} {:>13} {:>9} {:>9}",
        "config",
        "size",
        format!("us/pkt@{}k", reference / 1000),
        "us/pkt@max",
        "best<0.1%",
        "max-deliv",
        format!("p50@{}k", reference / 1000),
        format!("p99@{}k", reference / 1000),
    );
    for &size in sizes {
        for c in configs {
            let s = summarise(steps, c, size, burst, reference);
            let _ = writeln!(
                out,
                "{:<11} {:>5} {:>11} {:>11} {:>12}k {:>12}k {:>9} {:>9}",
                c,
                size,
                opt(s.us_per_pkt_ref, 2),
                opt(s.us_per_pkt_max, 2),
                opt(s.best_pps.map(|v| v / 1000.0), 0),
                opt(s.max_delivered.map(|v| v / 1000.0), 0),
                opt(s.p50_ref, 0),
                opt(s.p99_ref, 0),
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "ratios (CPU per packet: lower is better for veil; rates: higher is better)"
    );
    let _ = writeln!(
        out,
        "{:<22} {:>5} {:>11} {:>11} {:>10} {:>10}",
        "",
        "size",
        format!("us/pkt@{}k", reference / 1000),
        "us/pkt@max",
        "best",
        "max-deliv"
    );
    for &size in sizes {
        for veil in configs.iter().filter(|c| c.starts_with("veil")) {
            // TURN to TURN is compared with coturn doing the same (ChannelData both ways);
            // Veil's own protocol with coturn relaying to a plain UDP peer.
            let coturn = if veil == "veil-turn" {
                "coturn-turn"
            } else {
                "coturn"
            };
            for base in configs
                .iter()
                .filter(|c| c.as_str() == "floor" || c.as_str() == coturn)
            {
                let v = summarise(steps, veil, size, burst, reference);
                let b = summarise(steps, base, size, burst, reference);
                let _ = writeln!(
                    out,
                    "{:<22} {:>5} {:>11} {:>11} {:>10} {:>10}",
                    format!("{veil}/{base}"),
                    size,
                    ratio(v.us_per_pkt_ref, b.us_per_pkt_ref),
                    ratio(v.us_per_pkt_max, b.us_per_pkt_max),
                    ratio(v.best_pps, b.best_pps),
                    ratio(v.max_delivered, b.max_delivered),
                );
            }
        }
    }
    out
}

/// Every step as JSON, for the record.
pub fn to_json(steps: &[Step]) -> serde_json::Value {
    serde_json::Value::Array(
        steps
            .iter()
            .map(|s| {
                let m = &s.m;
                serde_json::json!({
                    "config": s.config,
                    "size": s.size,
                    "burst": s.burst,
                    "target_pps": m.target_pps,
                    "offered_pps": m.offered_pps,
                    "delivered_pps": m.delivered_pps,
                    "sent": m.sent,
                    "received": m.received,
                    "loss": m.loss(),
                    "window_s": m.window.as_secs_f64(),
                    "relay_cpu_s": m.relay_cpu.map(|c| c.as_secs_f64()),
                    "relay_cpu_us_per_pkt": m.cpu_us_per_pkt(),
                    "relay_core_noise": m.noise(),
                    "generator_core_noise": m.gen_noise(),
                    "attempts": s.attempts,
                    "p50_us": m.p50_us,
                    "p99_us": m.p99_us,
                    "passed": m.passed(),
                    "generator_limited": m.generator_limited(),
                })
            })
            .collect(),
    )
}
