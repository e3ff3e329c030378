//! The run's report: a human summary, JSON, and the relays' own figures to compare against.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::CallResult;
use crate::scenario::Scenario;
use crate::stats::{Collector, latency_histogram};

/// Quantiles of a latency distribution.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Quantiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Quantiles {
    fn of(h: &Histogram<u64>, scale: f64) -> Self {
        if h.is_empty() {
            return Self {
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
                mean: 0.0,
            };
        }
        let q = |x: f64| h.value_at_quantile(x) as f64 / scale;
        Self {
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: h.max() as f64 / scale,
            mean: h.mean() / scale,
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct SecondReport {
    /// Seconds since the start.
    pub t: usize,
    /// Calls with every leg bound.
    pub calls_up: u64,
    /// RTP packets sent.
    pub sent: u64,
    /// RTP packets received.
    pub received: u64,
    /// Packets sent this second that were lost.
    pub lost: u64,
    /// Received bit rate.
    pub bitrate_bps: f64,
    /// Median one-way latency of packets received this second, µs.
    pub latency_p50_us: f64,
    /// 99th percentile, µs.
    pub latency_p99_us: f64,
}

/// A relay's own counters over the run (difference of two scrapes of its /metrics).
#[derive(Debug, Clone, Serialize, Default)]
pub struct RelayFigures {
    /// Node id (or a name for a metrics endpoint).
    pub node_id: String,
    /// Datagrams the relay received.
    pub received_packets: u64,
    /// Datagrams it forwarded (one per receiving leg).
    pub forwarded_packets: u64,
    /// Bytes it forwarded.
    pub forwarded_bytes: u64,
    /// Datagrams it dropped, all reasons.
    pub dropped_packets: u64,
}

impl RelayFigures {
    /// `self - before`.
    pub fn minus(&self, before: Option<&Self>) -> Self {
        let b = before.cloned().unwrap_or_default();
        Self {
            node_id: self.node_id.clone(),
            received_packets: self.received_packets.saturating_sub(b.received_packets),
            forwarded_packets: self.forwarded_packets.saturating_sub(b.forwarded_packets),
            forwarded_bytes: self.forwarded_bytes.saturating_sub(b.forwarded_bytes),
            dropped_packets: self.dropped_packets.saturating_sub(b.dropped_packets),
        }
    }
}

/// Sums the series of `name` in Prometheus text (all label sets).
pub fn sum_series(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A bare HTTP/1.1 GET of `path` from `addr` (`host:port`); the whole answer, headers included.
pub(crate) async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await??;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await??;
    Ok(out)
}

/// Scrapes each relay's /metrics; relays that do not answer are left out.
pub async fn scrape_relays(endpoints: &[(String, String)]) -> Vec<RelayFigures> {
    let mut out = Vec::new();
    for (node_id, addr) in endpoints {
        let addr = addr
            .trim_start_matches("http://")
            .trim_end_matches("/metrics");
        match http_get(addr, "/metrics").await {
            Ok(text) => out.push(RelayFigures {
                node_id: node_id.clone(),
                received_packets: sum_series(&text, "veil_relay_received_packets_total"),
                forwarded_packets: sum_series(&text, "veil_relay_forwarded_packets_total"),
                forwarded_bytes: sum_series(&text, "veil_relay_forwarded_bytes_total"),
                dropped_packets: sum_series(&text, "veil_relay_dropped_packets_total"),
            }),
            Err(e) => tracing::warn!(relay = %node_id, error = %e, "cannot scrape relay metrics"),
        }
    }
    out
}

/// The report of one run. The keys are stable: scripts and tests read them.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What was run.
    pub scenario: Scenario,
    /// Wall-clock length of the run, seconds.
    pub wall_secs: f64,
    /// Calls that ran (allocated, bound and finished).
    pub calls: u64,
    /// Calls that failed to set up.
    pub calls_failed: u64,
    /// Participants over all calls that ran.
    pub participants: u64,
    /// RTP packets sent.
    pub packets_sent: u64,
    /// RTP packet deliveries due: each packet, to each other participant of its call.
    pub packets_expected: u64,
    /// RTP packets received (distinct).
    pub packets_received: u64,
    /// Deliveries due that never happened.
    pub packets_lost: u64,
    /// `packets_lost / packets_expected`.
    pub loss_ratio: f64,
    /// Copies of packets received more than once.
    pub packets_duplicated: u64,
    /// Packets received after a later packet of the same stream.
    pub packets_reordered: u64,
    /// Datagrams that failed SRTP or SRTCP authentication, or came from no sender of the call.
    pub decrypt_failures: u64,
    /// Datagrams that came from anywhere but the participant's relay.
    pub foreign_datagrams: u64,
    /// RTCP sender reports sent.
    pub rtcp_sent: u64,
    /// RTCP sender reports received and decrypted.
    pub rtcp_received: u64,
    /// Bytes of SRTP sent.
    pub bytes_sent: u64,
    /// Bytes of SRTP received.
    pub bytes_received: u64,
    /// Mean received bit rate over the media period.
    pub bitrate_bps: f64,
    /// One-way latency, µs.
    pub latency_us: Quantiles,
    /// Mean RFC 3550 interarrival jitter over all streams, ms.
    pub jitter_ms: f64,
    /// Largest jitter of any stream, ms.
    pub jitter_ms_max: f64,
    /// AllocateSession latency, ms.
    pub allocation_latency_ms: Quantiles,
    /// Leg bind latency (both rounds), ms.
    pub bind_latency_ms: Quantiles,
    /// Second by second.
    pub timeline: Vec<SecondReport>,
    /// The relays' own counts over the run.
    pub relays: Vec<RelayFigures>,
    /// Sum of the relays' forwarded packets.
    pub relay_forwarded_packets: u64,
}

impl Report {
    /// Builds the report from what the run collected.
    pub fn build(
        scenario: &Scenario,
        c: &Collector,
        calls: &[CallResult],
        relays: Vec<RelayFigures>,
        wall: Duration,
    ) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let seconds = c.seconds();
        let mut latency = latency_histogram();
        for s in &seconds {
            latency.add(&s.latency).expect("same bounds");
        }
        let mut alloc = latency_histogram();
        let mut binds = latency_histogram();
        let (mut jitter_sum, mut jitter_n, mut jitter_max) = (0.0, 0u64, 0.0f64);
        let (mut reordered, mut participants, mut foreign) = (0, 0, 0);
        for call in calls {
            alloc.saturating_record(call.allocation.as_micros() as u64);
            for b in &call.binds {
                binds.saturating_record(b.as_micros() as u64);
            }
            participants += call.sent.len() as u64;
            foreign += call.foreign;
            for rx in &call.received {
                for st in rx.values() {
                    reordered += st.reordered;
                    if st.unique > 1 {
                        jitter_sum += st.jitter;
                        jitter_n += 1;
                        jitter_max = jitter_max.max(st.jitter);
                    }
                }
            }
        }
        let expected = c.expected.load(Relaxed);
        let received = c.received.load(Relaxed);
        let lost: u64 = seconds.iter().map(|s| s.lost).sum();
        let media_secs = scenario.duration.as_secs_f64() + scenario.ramp_time().as_secs_f64();
        let bytes_received = c.bytes_received.load(Relaxed);
        let relay_forwarded_packets = relays.iter().map(|r| r.forwarded_packets).sum();
        Self {
            scenario: scenario.clone(),
            wall_secs: wall.as_secs_f64(),
            calls: calls.len() as u64,
            calls_failed: c.calls_failed.load(Relaxed),
            participants,
            packets_sent: c.sent.load(Relaxed),
            packets_expected: expected,
            packets_received: received,
            packets_lost: lost,
            loss_ratio: if expected > 0 {
                lost as f64 / expected as f64
            } else {
                0.0
            },
            packets_duplicated: c.duplicates.load(Relaxed),
            packets_reordered: reordered,
            decrypt_failures: c.decrypt_failures.load(Relaxed),
            foreign_datagrams: foreign,
            rtcp_sent: c.rtcp_sent.load(Relaxed),
            rtcp_received: c.rtcp_received.load(Relaxed),
            bytes_sent: c.bytes_sent.load(Relaxed),
            bytes_received,
            bitrate_bps: bytes_received as f64 * 8.0 / media_secs.max(1e-3),
            latency_us: Quantiles::of(&latency, 1.0),
            jitter_ms: if jitter_n > 0 {
                jitter_sum / jitter_n as f64 * 1000.0
            } else {
                0.0
            },
            jitter_ms_max: jitter_max * 1000.0,
            allocation_latency_ms: Quantiles::of(&alloc, 1000.0),
            bind_latency_ms: Quantiles::of(&binds, 1000.0),
            timeline: seconds
                .iter()
                .enumerate()
                .map(|(t, s)| SecondReport {
                    t,
                    calls_up: s.calls_up,
                    sent: s.sent,
                    received: s.received,
                    lost: s.lost,
                    bitrate_bps: s.bytes as f64 * 8.0,
                    latency_p50_us: if s.latency.is_empty() {
                        0.0
                    } else {
                        s.latency.value_at_quantile(0.5) as f64
                    },
                    latency_p99_us: if s.latency.is_empty() {
                        0.0
                    } else {
                        s.latency.value_at_quantile(0.99) as f64
                    },
                })
                .collect(),
            relays,
            relay_forwarded_packets,
        }
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let mut o = String::new();
        let s = &self.scenario;
        let mix: Vec<String> = s
            .mix
            .iter()
            .map(|(p, w)| format!("{}={w}", p.as_str()))
            .collect();
        o += &format!(
            "Veil load test: {} calls of {} participants ({}), {:?} SRTP, {} s at full load, {:.1} s wall\n",
            self.calls,
            s.participants,
            mix.join(","),
            s.srtp,
            s.duration.as_secs(),
            self.wall_secs
        );
        if self.calls_failed > 0 {
            o += &format!("  FAILED calls:        {}\n", self.calls_failed);
        }
        o += &format!(
            "  packets:             {} sent, {} due, {} received, {} lost ({:.4}%), {} duplicated, {} reordered\n",
            self.packets_sent,
            self.packets_expected,
            self.packets_received,
            self.packets_lost,
            self.loss_ratio * 100.0,
            self.packets_duplicated,
            self.packets_reordered
        );
        o += &format!(
            "  SRTP:                {} decrypt/auth failures; {} of {} RTCP sender reports received\n",
            self.decrypt_failures, self.rtcp_received, self.rtcp_sent
        );
        o += &format!(
            "  one-way latency:     p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs\n",
            self.latency_us.p50,
            self.latency_us.p90,
            self.latency_us.p99,
            self.latency_us.p999,
            self.latency_us.max
        );
        o += &format!(
            "  jitter (RFC 3550):   mean {:.3} ms, max {:.3} ms\n",
            self.jitter_ms, self.jitter_ms_max
        );
        o += &format!(
            "  allocation:          p50 {:.2} ms, p99 {:.2} ms;  bind: p50 {:.2} ms, p99 {:.2} ms\n",
            self.allocation_latency_ms.p50,
            self.allocation_latency_ms.p99,
            self.bind_latency_ms.p50,
            self.bind_latency_ms.p99
        );
        o += &format!(
            "  received bit rate:   {:.2} Mbit/s\n",
            self.bitrate_bps / 1e6
        );
        for r in &self.relays {
            o += &format!(
                "  relay {}: received {} datagrams, forwarded {} ({} bytes of SRTP it cannot decrypt), dropped {}\n",
                r.node_id,
                r.received_packets,
                r.forwarded_packets,
                r.forwarded_bytes,
                r.dropped_packets
            );
        }
        o += &format!(
            "  privacy:             {} datagrams came from anywhere but a relay; participants only ever saw relay addresses\n",
            self.foreign_datagrams
        );
        o
    }
}

/// One line of a plot.
struct Series<'a> {
    name: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG line chart, drawn here so the report needs no script and no network.
fn svg_chart(id: &str, title: &str, unit: &str, series: &[Series<'_>]) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 260.0, 64.0, 16.0, 28.0, 36.0);
    let xmax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let ymax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let ymax = if ymax <= 0.0 { 1.0 } else { ymax * 1.1 };
    let x = |v: f64| left + v / xmax * (w - left - right);
    let y = |v: f64| top + (1.0 - v / ymax) * (h - top - bottom);
    let mut o = format!(
        "<svg id=\"{id}\" class=\"chart\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"{t}\">\
         <text x=\"{left}\" y=\"18\" class=\"title\">{t}</text>",
        t = escape(title)
    );
    for i in 0..=4 {
        let v = ymax * i as f64 / 4.0;
        let yy = y(v);
        o += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" class=\"grid\"/><text x=\"{}\" y=\"{:.1}\" class=\"tick\" text-anchor=\"end\">{}</text>",
            w - right,
            left - 6.0,
            yy + 4.0,
            fmt_tick(v)
        );
    }
    o += &format!(
        "<text x=\"{}\" y=\"{}\" class=\"tick\" text-anchor=\"middle\">time (s) — {}</text>",
        (left + w - right) / 2.0,
        h - 8.0,
        escape(unit)
    );
    for (i, s) in series.iter().enumerate() {
        if s.points.is_empty() {
            continue;
        }
        let d: Vec<String> = s
            .points
            .iter()
            .enumerate()
            .map(|(k, (px, py))| {
                format!(
                    "{}{:.1},{:.1}",
                    if k == 0 { 'M' } else { 'L' },
                    x(*px),
                    y(*py)
                )
            })
            .collect();
        o += &format!(
            "<path class=\"series\" data-series=\"{n}\" d=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2.5\"{dash}/>\
             <rect x=\"{:.1}\" y=\"8\" width=\"10\" height=\"10\" fill=\"{c}\"/><text x=\"{:.1}\" y=\"17\" class=\"tick\">{n}</text>",
            d.join(" "),
            w - 220.0 + i as f64 * 100.0,
            w - 206.0 + i as f64 * 100.0,
            n = escape(s.name),
            c = s.color,
            // Later series are dashed, so that one that coincides with an earlier one (received
            // on top of sent) leaves both visible.
            dash = if i > 0 {
                " stroke-dasharray=\"7 5\""
            } else {
                ""
            }
        );
    }
    o + "</svg>"
}

fn fmt_tick(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The HTML report: self-contained (inline CSS and SVG; no script, no network), so it opens
/// offline in any browser.
pub fn html(r: &Report) -> String {
    let t = |f: &dyn Fn(&SecondReport) -> f64| {
        r.timeline
            .iter()
            .map(|s| (s.t as f64, f(s)))
            .collect::<Vec<_>>()
    };
    let latency = svg_chart(
        "latency",
        "One-way latency",
        "µs",
        &[
            Series {
                name: "p50",
                color: "#1f77b4",
                points: t(&|s| s.latency_p50_us),
            },
            Series {
                name: "p99",
                color: "#d62728",
                points: t(&|s| s.latency_p99_us),
            },
        ],
    );
    let loss = svg_chart(
        "loss",
        "Loss (packets sent each second that never arrived)",
        "packets",
        &[Series {
            name: "lost",
            color: "#ff7f0e",
            points: t(&|s| s.lost as f64),
        }],
    );
    let throughput = svg_chart(
        "throughput",
        "Throughput",
        "packets/s",
        &[
            Series {
                name: "sent",
                color: "#2ca02c",
                points: t(&|s| s.sent as f64),
            },
            Series {
                name: "received",
                color: "#9467bd",
                points: t(&|s| s.received as f64),
            },
        ],
    );
    let json = serde_json::to_string_pretty(r).expect("report serialises");
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Veil load test report</title>\
         <style>body{{font:14px system-ui,sans-serif;margin:24px;color:#222}}h1{{font-size:20px}}\
         .chart{{display:block;margin:12px 0;border:1px solid #ddd;background:#fff}}.title{{font-weight:600;font-size:13px}}\
         .tick{{font-size:11px;fill:#555}}.grid{{stroke:#eee}}pre{{background:#f6f6f6;padding:12px;overflow:auto;white-space:pre-wrap}}\
         table{{border-collapse:collapse}}td{{padding:2px 12px 2px 0}}</style></head><body>\
         <h1>Veil load test report</h1><pre id=\"summary\">{}</pre>{latency}{loss}{throughput}\
         <details><summary>JSON report</summary><pre>{}</pre></details></body></html>\n",
        escape(&r.summary()),
        escape(&json)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_series_across_labels_only_for_the_named_metric() {
        let text = "# HELP x\nveil_relay_forwarded_packets_total{transport=\"udp\"} 10\n\
                    veil_relay_forwarded_packets_total{transport=\"quic\"} 5\n\
                    veil_relay_forwarded_packets_total_other 99\nveil_relay_forwarded_bytes_total 7\n";
        assert_eq!(sum_series(text, "veil_relay_forwarded_packets_total"), 15);
        assert_eq!(sum_series(text, "veil_relay_forwarded_bytes_total"), 7);
        assert_eq!(sum_series(text, "nothing"), 0);
    }
}
