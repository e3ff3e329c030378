//! The run's report: a human summary, JSON, and the relays' own figures to compare against.
//!
//! Figures that a run could not measure are `None` (JSON `null`, "n/a" in the summary), never
//! a zero that looks measured. Loss is attributed to where it happened (the generator's sending
//! sockets, the relay's input, the relay, the participants' receiving sockets) from the relays'
//! metrics and the kernel's counters, and figures measured while the generator itself was the
//! bottleneck are marked as such.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::CallResult;
use crate::gate::{self, Thresholds, Verdict};
use crate::host::UdpCounters;
use crate::scenario::Scenario;
use crate::stats::{Collector, LegTransport, latency_histogram};

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
    /// The quantiles of `h`, divided by `scale`; `None` for an empty histogram.
    fn of(h: &Histogram<u64>, scale: f64) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let q = |x: f64| h.value_at_quantile(x) as f64 / scale;
        Some(Self {
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: h.max() as f64 / scale,
            mean: h.mean() / scale,
        })
    }
}

/// Median, 99th percentile and largest of a set of values.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Spread {
    /// Median.
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` if there are none.
    pub fn of(mut values: Vec<f64>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let rank =
            |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        Some(Self {
            p50: rank(0.5),
            p99: rank(0.99),
            max: values[values.len() - 1],
        })
    }
}

/// The cumulative distribution of a histogram, as `(value / scale, fraction at or below)`
/// points for a plot; empty for an empty histogram.
fn cdf(h: &Histogram<u64>, scale: f64) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut points = vec![(h.min() as f64 / scale, 0.0)];
    for i in 1..=50 {
        let q = i as f64 / 50.0;
        points.push((h.value_at_quantile(q) as f64 / scale, q));
    }
    points
}

/// One second of the run. Figures nothing was measured for are `null`.
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
    /// Sent bit rate (SRTP, as sent).
    pub sent_bitrate_bps: f64,
    /// Median one-way latency of packets received this second, µs.
    pub latency_p50_us: Option<f64>,
    /// 99th percentile, µs.
    pub latency_p99_us: Option<f64>,
    /// Mean RFC 3550 jitter of the streams, over the packets received this second, ms.
    pub jitter_ms: Option<f64>,
    /// 99th percentile of how late senders woke for their frames this second, ms.
    pub send_lag_p99_ms: Option<f64>,
    /// Fraction of the machine's CPUs busy this second (everything on the host).
    pub cpu_busy: Option<f64>,
    /// Fraction of the machine's CPUs this process used (with `--local`, cluster included).
    pub cpu_process: Option<f64>,
    /// By the receiving participant's transport (only transports the run used).
    pub by_transport: Vec<TransportSecondReport>,
    /// Each relay's forwarded and dropped datagrams this second, from its metrics.
    pub relays: Vec<RelaySecondReport>,
}

/// One second, for participants on one transport.
#[derive(Debug, Clone, Serialize)]
pub struct TransportSecondReport {
    /// The receiving participants' transport.
    pub transport: LegTransport,
    /// RTP packets they received.
    pub received: u64,
    /// Packets due at them, sent this second, never received.
    pub lost: u64,
    /// 99th percentile one-way latency of what they received this second, µs.
    pub latency_p99_us: Option<f64>,
}

/// One second of one relay.
#[derive(Debug, Clone, Serialize)]
pub struct RelaySecondReport {
    /// Node id.
    pub node_id: String,
    /// Datagrams it forwarded.
    pub forwarded: u64,
    /// Datagrams it dropped.
    pub dropped: u64,
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
    /// Datagrams it failed to send (socket or QUIC send buffer full, connection gone).
    pub send_errors: u64,
    /// Bind requests it handled, every result (they are among `received_packets`).
    pub binds: u64,
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
            send_errors: self.send_errors.saturating_sub(b.send_errors),
            binds: self.binds.saturating_sub(b.binds),
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
                send_errors: sum_series(&text, "veil_relay_send_errors_total"),
                binds: sum_series(&text, "veil_relay_binds_total"),
            }),
            Err(e) => tracing::warn!(relay = %node_id, error = %e, "cannot scrape relay metrics"),
        }
    }
    out
}

/// What a run observed besides the collector and its calls, for [`Report::build`].
#[derive(Debug, Clone)]
pub struct RunFacts {
    /// The relays' own counts over the run.
    pub relays: Vec<RelayFigures>,
    /// Whether relay metrics were asked for at all.
    pub relays_scraped: bool,
    /// Wall-clock length.
    pub wall: Duration,
    /// Start, RFC 3339 (UTC).
    pub started_at: String,
    /// What was driven.
    pub target: String,
    /// Change of this host's kernel UDP counters over the run.
    pub kernel: Option<UdpCounters>,
    /// Datagrams the relays' UDP and QUIC sockets (by [`LegTransport::index`]) dropped over
    /// the run, where they are on this host.
    pub relay_socket_drops: [Option<u64>; 2],
    /// CPUs of this machine.
    pub cores: usize,
    /// The cluster ran in this process.
    pub local: bool,
}

/// The run's phases, seconds since its start.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Phases {
    /// Calls are started (one after another, at the ramp-up rate) until then.
    pub ramp_up_end_s: f64,
    /// Senders stop then.
    pub full_load_end_s: f64,
    /// Receivers stop listening then, packets in flight having drained.
    pub drain_end_s: f64,
}

/// What the participants on one transport received.
#[derive(Debug, Clone, Serialize)]
pub struct TransportFigures {
    /// Their transport.
    pub transport: LegTransport,
    /// Participants on it.
    pub participants: u64,
    /// RTP deliveries due at them.
    pub packets_expected: u64,
    /// Of those, received.
    pub packets_received: u64,
    /// Of those, never received.
    pub packets_lost: u64,
    /// `packets_lost / packets_expected`; `None` if nothing was due.
    pub loss_ratio: Option<f64>,
    /// One-way latency of what they received, µs.
    pub latency_us: Option<Quantiles>,
    /// Mean RFC 3550 jitter of the streams they received, ms.
    pub jitter_ms: Option<f64>,
    /// The longest interruption each of them saw, ms.
    pub media_gap_ms: Option<Spread>,
    /// Datagrams their sockets dropped (receive buffer full).
    pub socket_drops: Option<u64>,
}

/// Where datagrams were lost, stage by stage. Counts are datagrams (RTP and RTCP); in calls of
/// more than two, one datagram lost before the relay is one delivery lost per other participant.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LossBreakdown {
    /// RTP deliveries due that never happened: what this explains.
    pub deliveries_lost: u64,
    /// Datagrams the generator tried to send and its sockets refused.
    pub sender_send_errors: u64,
    /// Datagrams the generator sent that its relays neither forwarded nor dropped: sent, less
    /// the relays' forwarded copies divided by the copies each datagram makes (participants
    /// less one), less their drops. An estimate: exact for a relay that serves only this run's
    /// calls, hiding loss on one that also forwards other traffic. `None` without relay metrics.
    pub relay_input: Option<u64>,
    /// Datagrams the relays' own sockets dropped (receive buffer full), from this host's socket
    /// table; `None` when the relays are not on this host.
    pub relay_socket_drops: Option<u64>,
    /// Of those, dropped by their UDP media sockets.
    pub relay_udp_socket_drops: Option<u64>,
    /// Of those, dropped by their QUIC sockets.
    pub relay_quic_socket_drops: Option<u64>,
    /// Datagrams the relays dropped, every reason, from their metrics.
    pub relay_dropped: Option<u64>,
    /// Datagrams the relays failed to send, from their metrics.
    pub relay_send_errors: Option<u64>,
    /// Copies the relays forwarded that no participant's socket read: forwarded less what the
    /// participants' sockets read. `None` without relay metrics.
    pub after_relay: Option<u64>,
    /// Datagrams the participants' sockets dropped (receive buffer full), from this host's
    /// socket table.
    pub receiver_socket_drops: Option<u64>,
    /// Datagrams a participant's client read and dropped because the generator did not take
    /// them in time (its queue was full).
    pub receiver_queue_overflows: u64,
    /// The stage that lost the most, when any lost anything.
    pub dominant: Option<String>,
}

/// Whether the generator (this process, and this machine) kept up with its own schedule.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GeneratorFigures {
    /// CPUs of this machine.
    pub cores: usize,
    /// Mean fraction of the machine's CPUs busy at full load (everything on the host).
    pub cpu_busy: Option<f64>,
    /// Mean fraction of the machine's CPUs this process used at full load (with `--local`, the
    /// cluster runs in it too).
    pub cpu_process: Option<f64>,
    /// How late senders woke for their frames, ms.
    pub send_lag_ms: Option<Spread>,
    /// The generator was a bottleneck: the figures describe this machine as much as the relay.
    pub limited: bool,
    /// Why it counts as a bottleneck.
    pub reasons: Vec<String>,
}

/// CPU busy at full load from which the machine counts as saturated.
pub const CPU_SATURATED: f64 = 0.90;
/// Senders' 99th-percentile wake-up lag from which the generator counts as behind schedule.
pub const SEND_LAG_LIMIT_MS: f64 = 5.0;

/// The report of one run. The keys are stable: scripts and tests read them. A figure nothing was
/// measured for is `null`, never a zero.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `veil-loadtest` version.
    pub version: String,
    /// When the run started, RFC 3339 (UTC).
    pub started_at: String,
    /// What was driven.
    pub target: String,
    /// What was run.
    pub scenario: Scenario,
    /// Wall-clock length of the run, seconds.
    pub wall_secs: f64,
    /// Ramp-up, full load and drain.
    pub phases: Phases,
    /// Pass or fail, and why.
    pub verdict: Verdict,
    /// Calls that ran media (allocated and every leg bound).
    pub calls: u64,
    /// Calls that failed: to set up, during media (a leg ended early) or to release.
    pub calls_failed: u64,
    /// Failed calls by kind: the stage and the error's class, such as `allocate_unavailable`,
    /// `bind_unreachable`, `bind_refused_relay_full`, `media_leg_ended`, `release_not_found`.
    pub call_failures: BTreeMap<String, u64>,
    /// The first error of each kind, as the failing call saw it.
    pub call_failure_examples: BTreeMap<String, String>,
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
    /// `packets_lost / packets_expected`; `null` if nothing was due.
    pub loss_ratio: Option<f64>,
    /// Copies of packets received more than once.
    pub packets_duplicated: u64,
    /// Packets received after a later packet of the same stream.
    pub packets_reordered: u64,
    /// Datagrams that failed SRTP or SRTCP authentication, or came from no sender of the call.
    pub decrypt_failures: u64,
    /// Datagrams that came from anywhere but the participant's relay.
    pub foreign_datagrams: u64,
    /// Times a participant's leg moved to another relay of its session (a failover, or a
    /// switch to its hot standby); 0 while every relay stays up.
    pub leg_failovers: u64,
    /// RTCP sender reports sent.
    pub rtcp_sent: u64,
    /// RTCP sender reports received and decrypted.
    pub rtcp_received: u64,
    /// Bytes of SRTP sent.
    pub bytes_sent: u64,
    /// Bytes of SRTP received.
    pub bytes_received: u64,
    /// Mean received bit rate over the media period; `null` if nothing was due.
    pub bitrate_bps: Option<f64>,
    /// One-way latency, µs.
    pub latency_us: Option<Quantiles>,
    /// Mean RFC 3550 interarrival jitter over all streams, ms.
    pub jitter_ms: Option<f64>,
    /// Largest jitter of any stream, ms.
    pub jitter_ms_max: Option<f64>,
    /// The longest media interruption each participant saw (over the streams it received: the
    /// longest time between two arrivals, or before the first or after the last while the
    /// sender sent), ms.
    pub media_gap_ms: Option<Spread>,
    /// AllocateSession latency, ms.
    pub allocation_latency_ms: Option<Quantiles>,
    /// Leg bind latency (both rounds), ms.
    pub bind_latency_ms: Option<Quantiles>,
    /// Cumulative distribution of allocation latency: `(ms, fraction of calls at or below)`.
    pub allocation_latency_cdf: Vec<(f64, f64)>,
    /// Cumulative distribution of bind latency: `(ms, fraction of legs at or below)`.
    pub bind_latency_cdf: Vec<(f64, f64)>,
    /// What participants received, by their transport.
    pub by_transport: Vec<TransportFigures>,
    /// Where loss happened.
    pub loss_breakdown: LossBreakdown,
    /// Change of this host's kernel UDP counters over the run (IPv4 and IPv6).
    pub kernel_udp: Option<UdpCounters>,
    /// Whether the generator kept up.
    pub generator: GeneratorFigures,
    /// Second by second.
    pub timeline: Vec<SecondReport>,
    /// The relays' own counts over the run.
    pub relays: Vec<RelayFigures>,
    /// Sum of the relays' forwarded packets.
    pub relay_forwarded_packets: u64,
    /// Media datagrams the participants' sockets read from their relays.
    pub participant_datagrams_read: u64,
    /// Participants who joined calls in progress and left them (`--churn`); `null` without.
    /// Their media is counted here, not in the figures above.
    pub churn: Option<ChurnFigures>,
}

/// What the joiners of a run (`--churn`) did and saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChurnFigures {
    /// Joiners scheduled, over the calls that ran.
    pub joins_planned: u64,
    /// Joiners whose leg bound (AddParticipant, then the bind).
    pub joined: u64,
    /// Joiners that failed: to join, during media, or to leave (RemoveParticipant).
    pub failed: u64,
    /// Failures by kind (`join_unavailable`, `join_bind_unreachable`, `join_leg_ended`,
    /// `leave_not_found`, ...).
    pub failures: BTreeMap<String, u64>,
    /// The first error of each kind.
    pub failure_examples: BTreeMap<String, String>,
    /// From AddParticipant to the new leg bound, ms.
    pub join_latency_ms: Option<Spread>,
    /// Deliveries due to and from joiners: the call's packets sent while a joiner was in it
    /// (whole seconds), to the joiner; the joiner's packets, to each of the call's participants.
    pub packets_due: u64,
    /// Of those, never received.
    pub packets_lost: u64,
    /// `packets_lost / packets_due`; `null` if nothing was due.
    pub loss_ratio: Option<f64>,
}

/// Mean of `values`, `None` for none.
fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0u64), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn add(a: &mut Option<u64>, v: Option<u64>) {
    if let Some(v) = v {
        *a.get_or_insert(0) += v;
    }
}

impl Report {
    /// Builds the report from what the run collected, judged against the default thresholds.
    pub fn build(
        scenario: &Scenario,
        c: &Collector,
        calls: &[CallResult],
        facts: RunFacts,
    ) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let seconds = c.seconds();
        let mut latency = latency_histogram();
        for s in &seconds {
            latency.add(&s.latency).expect("same bounds");
        }
        let mut alloc = latency_histogram();
        let mut binds = latency_histogram();
        let (mut jitter_sum, mut jitter_n, mut jitter_max) = (0.0, 0u64, None::<f64>);
        let (mut reordered, mut participants, mut foreign, mut failovers) = (0, 0, 0, 0);
        let (mut datagrams_read, mut queue_overflows) = (0u64, 0u64);
        let mut gaps = Vec::new();

        #[derive(Default)]
        struct PerTransport {
            participants: u64,
            expected: u64,
            received: u64,
            jitter_sum: f64,
            jitter_n: u64,
            gaps: Vec<f64>,
            socket_drops: Option<u64>,
        }
        let mut per: [PerTransport; 2] = Default::default();
        for call in calls {
            alloc.saturating_record(call.allocation.as_micros() as u64);
            for b in &call.binds {
                binds.saturating_record(b.as_micros() as u64);
            }
            participants += call.sent.len() as u64;
            foreign += call.foreign;
            failovers += call.failovers;
            datagrams_read += call.datagrams_read;
            queue_overflows += call.queue_overflows;
            for (r, rx) in call.received.iter().enumerate() {
                let t = &mut per[call.transports[r].index()];
                t.participants += 1;
                add(&mut t.socket_drops, call.socket_drops[r]);
                let mut longest: Option<f64> = None;
                for (k, tx) in call.sent.iter().enumerate() {
                    if k == r {
                        continue;
                    }
                    t.expected += tx.sent;
                    let st = rx.get(&tx.ssrc);
                    if let Some(st) = st {
                        t.received += st.unique;
                        reordered += st.reordered;
                        if st.unique > 1 {
                            jitter_sum += st.jitter;
                            jitter_n += 1;
                            t.jitter_sum += st.jitter;
                            t.jitter_n += 1;
                            jitter_max = Some(jitter_max.unwrap_or(0.0).max(st.jitter));
                        }
                    }
                    if let Some(first) = tx.first_sent_s {
                        let gap = st.map_or((tx.last_sent_s - first).max(0.0), |st| {
                            st.longest_gap(first, tx.last_sent_s)
                        });
                        longest = Some(longest.unwrap_or(0.0).max(gap));
                    }
                }
                if let Some(g) = longest {
                    gaps.push(g * 1000.0);
                    t.gaps.push(g * 1000.0);
                }
            }
        }
        let expected = c.expected.load(Relaxed);
        let received = c.received.load(Relaxed);
        let lost: u64 = seconds.iter().map(|s| s.lost).sum();
        let ramp = scenario.ramp_time().as_secs_f64();
        let phases = Phases {
            ramp_up_end_s: ramp,
            full_load_end_s: ramp + scenario.duration.as_secs_f64(),
            drain_end_s: ramp + scenario.duration.as_secs_f64() + crate::GRACE.as_secs_f64(),
        };
        let media_secs = phases.full_load_end_s;
        let bytes_received = c.bytes_received.load(Relaxed);
        let relay_forwarded_packets: u64 = facts.relays.iter().map(|r| r.forwarded_packets).sum();
        let ratio = |lost: u64, due: u64| (due > 0).then(|| lost as f64 / due as f64);

        let by_latency = c
            .latency_by_transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let used: Vec<LegTransport> = LegTransport::ALL
            .into_iter()
            .filter(|t| per[t.index()].participants > 0)
            .collect();
        let by_transport = used
            .iter()
            .map(|&tr| {
                let t = &per[tr.index()];
                let lost = t.expected.saturating_sub(t.received);
                TransportFigures {
                    transport: tr,
                    participants: t.participants,
                    packets_expected: t.expected,
                    packets_received: t.received,
                    packets_lost: lost,
                    loss_ratio: ratio(lost, t.expected),
                    latency_us: Quantiles::of(&by_latency[tr.index()], 1.0),
                    jitter_ms: (t.jitter_n > 0).then(|| t.jitter_sum / t.jitter_n as f64 * 1000.0),
                    media_gap_ms: Spread::of(t.gaps.clone()),
                    socket_drops: t.socket_drops,
                }
            })
            .collect();

        // Where loss happened.
        let mut receiver_socket_drops = None;
        for t in &per {
            add(&mut receiver_socket_drops, t.socket_drops);
        }
        let send_errors = c.send_errors.load(Relaxed);
        let rtcp_sent = c.rtcp_sent.load(Relaxed);
        let packets_sent = c.sent.load(Relaxed);
        let with_relays = facts.relays_scraped && !facts.relays.is_empty();
        let relay_sum = |f: fn(&RelayFigures) -> u64| -> Option<u64> {
            with_relays.then(|| facts.relays.iter().map(f).sum())
        };
        let relay_dropped = relay_sum(|r| r.dropped_packets);
        let relay_send_errors = relay_sum(|r| r.send_errors);
        // Each datagram a relay takes in for a full call becomes one copy per other participant.
        let fanout = scenario.participants.saturating_sub(1).max(1) as u64;
        let relay_input = relay_dropped.map(|dropped| {
            (packets_sent + rtcp_sent)
                .saturating_sub(relay_forwarded_packets.div_ceil(fanout))
                .saturating_sub(dropped)
        });
        let mut breakdown = LossBreakdown {
            deliveries_lost: lost,
            sender_send_errors: send_errors,
            relay_input,
            relay_socket_drops: match facts.relay_socket_drops {
                [None, None] => None,
                [u, q] => Some(u.unwrap_or(0) + q.unwrap_or(0)),
            },
            relay_udp_socket_drops: facts.relay_socket_drops[LegTransport::Udp.index()],
            relay_quic_socket_drops: facts.relay_socket_drops[LegTransport::Quic.index()],
            relay_dropped,
            relay_send_errors,
            after_relay: with_relays
                .then_some(relay_forwarded_packets)
                .map(|f: u64| f.saturating_sub(datagrams_read)),
            receiver_socket_drops,
            receiver_queue_overflows: queue_overflows,
            dominant: None,
        };
        breakdown.dominant = [
            ("the generator's sending sockets", send_errors),
            (
                "the relays' input",
                breakdown
                    .relay_socket_drops
                    .max(breakdown.relay_input)
                    .unwrap_or(0),
            ),
            (
                "the relays",
                relay_dropped.unwrap_or(0) + relay_send_errors.unwrap_or(0),
            ),
            (
                "between the relays and the participants' sockets",
                breakdown
                    .after_relay
                    .max(receiver_socket_drops)
                    .unwrap_or(0),
            ),
            ("the generator reading too late", queue_overflows),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .max_by_key(|(_, n)| *n)
        .filter(|_| lost > 0)
        .map(|(stage, _)| stage.to_string());

        // Whether the generator kept up.
        let full: Vec<&crate::stats::Second> = seconds
            .iter()
            .enumerate()
            .filter(|(t, _)| *t as f64 >= ramp.ceil() && (*t + 1) as f64 <= phases.full_load_end_s)
            .map(|(_, s)| s)
            .collect();
        let cpu_seconds: Vec<(f64, f64)> = if full.iter().any(|s| s.cpu.is_some()) {
            full.iter().filter_map(|s| s.cpu).collect()
        } else {
            seconds.iter().filter_map(|s| s.cpu).collect()
        };
        let cpu_busy = mean(cpu_seconds.iter().map(|c| c.0));
        let cpu_process = mean(cpu_seconds.iter().map(|c| c.1));
        let mut lag = crate::stats::coarse_histogram();
        for s in &seconds {
            lag.add(&s.send_lag).expect("same bounds");
        }
        let send_lag_ms = (!lag.is_empty()).then(|| Spread {
            p50: lag.value_at_quantile(0.5) as f64 / 1000.0,
            p99: lag.value_at_quantile(0.99) as f64 / 1000.0,
            max: lag.max() as f64 / 1000.0,
        });
        let mut reasons = Vec::new();
        if let Some(busy) = cpu_busy.filter(|b| *b >= CPU_SATURATED) {
            reasons.push(format!(
                "this machine's {} CPUs were {:.0}% busy at full load (this process{}: {:.0}%)",
                facts.cores,
                busy * 100.0,
                if facts.local {
                    ", generator and in-process cluster together"
                } else {
                    ""
                },
                cpu_process.unwrap_or(0.0) * 100.0
            ));
        }
        if let Some(l) = send_lag_ms.filter(|l| l.p99 > SEND_LAG_LIMIT_MS) {
            reasons.push(format!(
                "senders woke {:.1} ms late for their frames (p99; limit {SEND_LAG_LIMIT_MS} ms)",
                l.p99
            ));
        }
        if let Some(d) = receiver_socket_drops.filter(|d| *d > 0) {
            reasons.push(format!(
                "the participants' own sockets dropped {d} datagrams (receive buffers full)"
            ));
        }
        if queue_overflows > 0 {
            reasons.push(format!(
                "the generator read {queue_overflows} datagrams too late to keep them"
            ));
        }
        let sndbuf = facts.kernel.map_or(0, |k| k.sndbuf_errors);
        if send_errors > 0 || sndbuf > 0 {
            reasons.push(format!(
                "the generator's sockets refused {send_errors} datagrams (kernel SndbufErrors \
                 on this host: {sndbuf})"
            ));
        }
        let generator = GeneratorFigures {
            cores: facts.cores,
            cpu_busy,
            cpu_process,
            send_lag_ms,
            limited: !reasons.is_empty(),
            reasons,
        };

        let failures = c.failures.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut report = Self {
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: facts.started_at,
            target: facts.target,
            scenario: scenario.clone(),
            wall_secs: facts.wall.as_secs_f64(),
            phases,
            verdict: Verdict {
                passed: false,
                thresholds: Thresholds::default(),
                checks: Vec::new(),
            },
            calls: calls.len() as u64,
            calls_failed: c.calls_failed(),
            call_failures: failures.iter().map(|(k, (n, _))| (k.clone(), *n)).collect(),
            call_failure_examples: failures
                .iter()
                .map(|(k, (_, e))| (k.clone(), e.clone()))
                .collect(),
            participants,
            packets_sent,
            packets_expected: expected,
            packets_received: received,
            packets_lost: lost,
            loss_ratio: ratio(lost, expected),
            packets_duplicated: c.duplicates.load(Relaxed),
            packets_reordered: reordered,
            decrypt_failures: c.decrypt_failures.load(Relaxed),
            foreign_datagrams: foreign,
            leg_failovers: failovers,
            rtcp_sent,
            rtcp_received: c.rtcp_received.load(Relaxed),
            bytes_sent: c.bytes_sent.load(Relaxed),
            bytes_received,
            bitrate_bps: (expected > 0).then(|| bytes_received as f64 * 8.0 / media_secs.max(1e-3)),
            latency_us: Quantiles::of(&latency, 1.0),
            jitter_ms: (jitter_n > 0).then(|| jitter_sum / jitter_n as f64 * 1000.0),
            jitter_ms_max: jitter_max.map(|j| j * 1000.0),
            media_gap_ms: Spread::of(gaps),
            allocation_latency_ms: Quantiles::of(&alloc, 1000.0),
            bind_latency_ms: Quantiles::of(&binds, 1000.0),
            allocation_latency_cdf: cdf(&alloc, 1000.0),
            bind_latency_cdf: cdf(&binds, 1000.0),
            by_transport,
            loss_breakdown: breakdown,
            kernel_udp: facts.kernel,
            generator,
            timeline: seconds
                .iter()
                .enumerate()
                .map(|(t, s)| {
                    let q = |h: &Histogram<u64>, x: f64| {
                        (!h.is_empty()).then(|| h.value_at_quantile(x) as f64)
                    };
                    SecondReport {
                        t,
                        calls_up: s.calls_up,
                        sent: s.sent,
                        received: s.received,
                        lost: s.lost,
                        bitrate_bps: s.bytes as f64 * 8.0,
                        sent_bitrate_bps: s.bytes_sent as f64 * 8.0,
                        latency_p50_us: q(&s.latency, 0.5),
                        latency_p99_us: q(&s.latency, 0.99),
                        jitter_ms: (s.jitter_n > 0)
                            .then(|| s.jitter_sum / s.jitter_n as f64 * 1000.0),
                        send_lag_p99_ms: q(&s.send_lag, 0.99).map(|us| us / 1000.0),
                        cpu_busy: s.cpu.map(|c| c.0),
                        cpu_process: s.cpu.map(|c| c.1),
                        by_transport: used
                            .iter()
                            .map(|&tr| {
                                let b = &s.by_transport[tr.index()];
                                TransportSecondReport {
                                    transport: tr,
                                    received: b.received,
                                    lost: b.lost,
                                    latency_p99_us: q(&b.latency, 0.99),
                                }
                            })
                            .collect(),
                        relays: s
                            .relays
                            .iter()
                            .map(|(n, f, d)| RelaySecondReport {
                                node_id: n.clone(),
                                forwarded: *f,
                                dropped: *d,
                            })
                            .collect(),
                    }
                })
                .collect(),
            relays: facts.relays,
            relay_forwarded_packets,
            participant_datagrams_read: datagrams_read,
            churn: None,
        };
        report.judge(&Thresholds::default());
        report
    }

    /// Judges the report against `t`, replacing its verdict.
    pub fn judge(&mut self, t: &Thresholds) {
        self.verdict = gate::judge(self, t);
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let mut o = String::new();
        let s = &self.scenario;
        // Figures measured while the generator was the bottleneck carry a mark.
        let m = if self.generator.limited { "*" } else { "" };
        let mix: Vec<String> = s
            .mix
            .iter()
            .map(|(p, w)| format!("{}={w}", p.as_str()))
            .collect();
        o += &format!(
            "Veil load test {}, started {}, {:.1} s wall\n",
            self.version, self.started_at, self.wall_secs
        );
        o += &format!("  target:            {}\n", self.target);
        o += &format!(
            "  scenario:          {} calls of {} participants; transport {}; failover {}; {}; \
             profiles {}; ramp-up {} calls/s ({:.1} s), then {} s at full load\n",
            s.calls,
            s.participants,
            s.transport.describe(),
            s.failover.describe(),
            s.srtp.rfc_name(),
            mix.join(","),
            s.ramp_up_per_sec,
            self.phases.ramp_up_end_s,
            s.duration.as_secs(),
        );
        if self.verdict.passed {
            o += "  verdict:           PASS (every check within its limit)\n";
        } else {
            let crossed: Vec<String> = self
                .verdict
                .crossed()
                .map(|c| {
                    format!(
                        "{} {} over the limit {}{}",
                        c.check,
                        c.measured,
                        c.limit,
                        c.flag.map_or(String::new(), |f| format!(" ({f})"))
                    )
                })
                .collect();
            o += &format!(
                "  verdict:           FAIL (exit {}): {}\n",
                gate::EXIT_THRESHOLD,
                crossed.join("; ")
            );
        }
        let kinds: Vec<String> = self
            .call_failures
            .iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect();
        o += &format!(
            "  calls:             {} started, {} ran media, {} failed{}\n",
            s.calls,
            self.calls,
            self.calls_failed,
            if kinds.is_empty() {
                String::new()
            } else {
                format!(": {}", kinds.join(", "))
            }
        );
        for (kind, error) in &self.call_failure_examples {
            o += &format!("    first {kind}: {error}\n");
        }
        o += &format!(
            "  packets:           {} sent, {} due, {} received, {} lost ({}), {} duplicated, {} reordered\n",
            self.packets_sent,
            self.packets_expected,
            self.packets_received,
            self.packets_lost,
            pct(self.loss_ratio, m),
            self.packets_duplicated,
            self.packets_reordered
        );
        if let Some(ch) = &self.churn {
            o += &format!(
                "  churn:             {} of {} joiners joined and left ({} failed), join {}; \
                 to and from joiners {} due, {} lost ({})\n",
                ch.joined,
                ch.joins_planned,
                ch.failed,
                ch.join_latency_ms.map_or(NA.to_string(), |l| format!(
                    "p50 {:.1} ms, p99 {:.1} ms",
                    l.p50, l.p99
                )),
                ch.packets_due,
                ch.packets_lost,
                pct(ch.loss_ratio, m),
            );
        }
        o += &format!(
            "  SRTP:              {} decrypt/auth failures; {} of {} RTCP sender reports received\n",
            self.decrypt_failures, self.rtcp_received, self.rtcp_sent
        );
        o += &format!(
            "  one-way latency:   {}\n",
            self.latency_us.as_ref().map_or(NA.to_string(), |q| format!(
                "p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs{m}, p99.9 {:.0} µs, max {:.0} µs",
                q.p50, q.p90, q.p99, q.p999, q.max
            ))
        );
        o += &format!(
            "  jitter (RFC 3550): {}\n",
            match (self.jitter_ms, self.jitter_ms_max) {
                (Some(j), Some(x)) => format!("mean {j:.3} ms{m}, max {x:.3} ms"),
                _ => NA.to_string(),
            }
        );
        o += &format!(
            "  media gap:         {}\n",
            self.media_gap_ms.map_or(NA.to_string(), |g| format!(
                "the longest interruption each participant saw: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms{m}",
                g.p50, g.p99, g.max
            ))
        );
        o += &format!(
            "  allocation:        {};  bind: {}\n",
            ms_pair(self.allocation_latency_ms.as_ref()),
            ms_pair(self.bind_latency_ms.as_ref()),
        );
        o += &format!(
            "  received bit rate: {}\n",
            self.bitrate_bps
                .map_or(NA.to_string(), |b| format!("{:.2} Mbit/s", b / 1e6))
        );
        if self.by_transport.len() > 1 || s.transport == crate::scenario::TransportMode::Mixed {
            o += "  by transport (of the receiving participant):\n";
            for t in &self.by_transport {
                o += &format!(
                    "    {:<5} {} participants: loss {} ({} of {}), latency {}, jitter {}, longest gap {}, socket drops {}\n",
                    format!("{}:", t.transport.as_str()),
                    t.participants,
                    pct(t.loss_ratio, m),
                    t.packets_lost,
                    t.packets_expected,
                    t.latency_us.as_ref().map_or(NA.to_string(), |q| format!(
                        "p50 {:.0} µs, p99 {:.0} µs{m}",
                        q.p50, q.p99
                    )),
                    t.jitter_ms.map_or(NA.to_string(), |j| format!("{j:.3} ms")),
                    t.media_gap_ms.map_or(NA.to_string(), |g| format!(
                        "p99 {:.1} ms, max {:.1} ms",
                        g.p99, g.max
                    )),
                    count(t.socket_drops),
                );
            }
        }
        let b = &self.loss_breakdown;
        o += "  where loss happened (datagrams, RTP and RTCP):\n";
        o += &format!(
            "    generator, sending:    {} refused by its sockets\n",
            b.sender_send_errors
        );
        o += &format!(
            "    relays' input:         {} sent that no relay forwarded or dropped (an estimate from their metrics); {} dropped by the relays' sockets (kernel, receive buffer full)\n",
            b.relay_input.map_or(NA.to_string(), |n| format!("≈ {n}")),
            b.relay_socket_drops
                .map_or("n/a (relays not on this host)".to_string(), |n| {
                    format!(
                        "{n} (UDP sockets {}, QUIC sockets {})",
                        count(b.relay_udp_socket_drops),
                        count(b.relay_quic_socket_drops)
                    )
                }),
        );
        o += &format!(
            "    relays:                {} dropped, {} failed to send (their metrics)\n",
            count(b.relay_dropped),
            count(b.relay_send_errors)
        );
        o += &format!(
            "    after the relays:      {} forwarded copies no participant socket read; {} dropped by participants' sockets (kernel, receive buffer full)\n",
            count(b.after_relay),
            count(b.receiver_socket_drops)
        );
        o += &format!(
            "    generator, receiving:  {} read but dropped for want of the generator taking them in time\n",
            b.receiver_queue_overflows
        );
        if let Some(d) = &b.dominant {
            o += &format!(
                "    most of the {} deliveries lost: {d}\n",
                b.deliveries_lost
            );
        }
        if let Some(k) = &self.kernel_udp {
            o += &format!(
                "  kernel UDP:        on this host over the run (IPv4 and IPv6, every process): RcvbufErrors {}, SndbufErrors {}, InErrors {}\n",
                k.rcvbuf_errors, k.sndbuf_errors, k.in_errors
            );
        }
        let g = &self.generator;
        o += &format!(
            "  generator:         CPUs {} busy at full load (this process {}, of {} CPUs); senders woke late by {}\n",
            g.cpu_busy
                .map_or(NA.to_string(), |c| format!("{:.0}%", c * 100.0)),
            g.cpu_process
                .map_or(NA.to_string(), |c| format!("{:.0}%", c * 100.0)),
            g.cores,
            g.send_lag_ms.map_or(NA.to_string(), |l| format!(
                "p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
                l.p50, l.p99, l.max
            )),
        );
        if g.limited {
            o += &format!(
                "  WARNING: the generator was a bottleneck: {}. Figures marked * describe this machine as much as the relay.\n",
                g.reasons.join("; ")
            );
        }
        for r in &self.relays {
            o += &format!(
                "  relay {}: received {} datagrams from participants (media, keepalives and {} binds), forwarded {} copies (one per receiving leg; {} bytes of SRTP it cannot decrypt), dropped {}, failed to send {}\n",
                r.node_id,
                r.received_packets,
                r.binds,
                r.forwarded_packets,
                r.forwarded_bytes,
                r.dropped_packets,
                r.send_errors
            );
        }
        if !self.relays.is_empty() {
            o += &format!(
                "  relay cross-check: of the {} copies the relays forwarded, participants' sockets read {} (RTP, RTCP, duplicates and undecryptable alike; {} RTP and {} RTCP decrypted); {} never arrived\n",
                self.relay_forwarded_packets,
                self.participant_datagrams_read,
                self.packets_received + self.packets_duplicated,
                self.rtcp_received,
                self.relay_forwarded_packets
                    .saturating_sub(self.participant_datagrams_read)
            );
        }
        o += &format!(
            "  privacy:           {} datagrams came from anywhere but a relay; participants only ever saw relay addresses\n",
            self.foreign_datagrams
        );
        o
    }
}

/// What the summary says for a figure nothing was measured for.
const NA: &str = "n/a";

fn pct(ratio: Option<f64>, mark: &str) -> String {
    ratio.map_or(NA.to_string(), |r| format!("{:.4}%{mark}", r * 100.0))
}

fn count(n: Option<u64>) -> String {
    n.map_or(NA.to_string(), |n| n.to_string())
}

fn ms_pair(q: Option<&Quantiles>) -> String {
    q.map_or(NA.to_string(), |q| {
        format!("p50 {:.2} ms, p99 {:.2} ms", q.p50, q.p99)
    })
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

    #[test]
    fn spreads_use_nearest_rank_and_nothing_is_none() {
        assert_eq!(Spread::of(Vec::new()), None);
        let s = Spread::of((1..=200).map(f64::from).rev().collect()).unwrap();
        assert_eq!((s.p50, s.p99, s.max), (100.0, 198.0, 200.0));
        let one = Spread::of(vec![7.0]).unwrap();
        assert_eq!((one.p50, one.p99, one.max), (7.0, 7.0, 7.0));
    }

    #[test]
    fn quantiles_and_cdfs_of_nothing_are_absent() {
        let h = latency_histogram();
        assert!(Quantiles::of(&h, 1.0).is_none());
        assert!(cdf(&h, 1.0).is_empty());
        let mut h = latency_histogram();
        for v in 1..=1000 {
            h.record(v * 1000).unwrap();
        }
        let c = cdf(&h, 1000.0);
        assert_eq!(c.len(), 51);
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert!((c[50].0 - 1000.0).abs() < 1.0 && c[50].1 == 1.0);
    }
}
