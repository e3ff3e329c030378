//! The relay's Prometheus metrics. The packet path counts into plain per-worker structs; this
//! module copies them into the registry at each scrape. No label holds an address, a session or
//! a participant: transports, drop reasons and bind results are closed sets.

use std::sync::{Arc, Mutex};

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use veil_relay_core::{BindResult, DropReason, Node, SharedStats, Stats};

use crate::send::{QuicConns, QuicRefusal, StreamRefusal, TurnStreams};

/// A client transport, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain UDP.
    Udp,
    /// QUIC datagrams.
    Quic,
    /// TURN over UDP (on the UDP media port).
    TurnUdp,
    /// TURN over TCP.
    TurnTcp,
    /// TURN over TLS.
    TurnTls,
}

impl Transport {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Quic => "quic",
            Self::TurnUdp => "turn-udp",
            Self::TurnTcp => "turn-tcp",
            Self::TurnTls => "turn-tls",
        }
    }

    const ALL: [Self; 5] = [
        Self::Udp,
        Self::Quic,
        Self::TurnUdp,
        Self::TurnTcp,
        Self::TurnTls,
    ];
}

/// The relay's metrics, registered in a registry passed in.
pub struct RelayMetrics {
    rx_packets: IntCounterVec,
    rx_bytes: IntCounterVec,
    fwd_packets: IntCounterVec,
    fwd_bytes: IntCounterVec,
    control_packets: IntCounterVec,
    control_bytes: IntCounterVec,
    send_errors: IntCounterVec,
    drops: IntCounterVec,
    binds: IntCounterVec,
    bound_legs: IntGaugeVec,
    sessions: IntGauge,
    capacity: IntGauge,
    draining: IntGauge,
    revocations: IntGauge,
    leg_revocations: IntGauge,
    extensions: IntGauge,
    /// Controllers this relay is attached to right now.
    pub controllers_attached: IntGauge,
    /// Controller addresses the relay keeps a link to (every address of every --controller
    /// host, as last resolved).
    pub controller_addresses: IntGauge,
    resolutions: IntCounterVec,
    quic_open: IntGauge,
    quic_accepted: IntCounterVec,
    quic_refused: IntCounterVec,
    quic_retries: IntCounterVec,
    quic_handshake_failures: IntCounterVec,
    quic_datagrams_rx: IntCounterVec,
    quic_datagrams_tx: IntCounterVec,
    turn_connections: IntGaugeVec,
    turn_accepted: IntCounterVec,
    turn_refused: IntCounterVec,
    xdp_mode: IntGaugeVec,
    xdp_legs: IntGauge,
    xdp_packets: IntCounterVec,
    /// What the kernel fast path is doing (`--xdp`).
    pub xdp: Arc<crate::xdp::Status>,
    /// Time from receiving a batch of datagrams to having sent everything it caused.
    pub forwarding_latency: Histogram,
    sources: Mutex<Vec<(Transport, Arc<SharedStats>)>>,
    quic: Mutex<Option<Arc<QuicConns>>>,
    streams: Mutex<Option<Arc<TurnStreams>>>,
    refresh_lock: Mutex<()>,
    node: Arc<Node>,
}

impl std::fmt::Debug for RelayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayMetrics").finish_non_exhaustive()
    }
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

impl RelayMetrics {
    /// Registers the relay's metrics in `registry`.
    pub fn register(registry: &Registry, node: Arc<Node>) -> prometheus::Result<Self> {
        let t = &["transport"];
        let forwarding_latency = Histogram::with_opts(
            HistogramOpts::new(
                "veil_relay_forwarding_latency_seconds",
                "Time from receiving a batch of datagrams to having sent everything it caused.",
            )
            .buckets(vec![
                5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
            ]),
        )?;
        registry.register(Box::new(forwarding_latency.clone()))?;
        let m = Self {
            rx_packets: counter(
                registry,
                "veil_relay_received_packets_total",
                "Datagrams received from clients.",
                t,
            )?,
            rx_bytes: counter(
                registry,
                "veil_relay_received_bytes_total",
                "Bytes received from clients.",
                t,
            )?,
            fwd_packets: counter(
                registry,
                "veil_relay_forwarded_packets_total",
                "Datagrams forwarded to legs (one per receiving leg), by the transport they arrived on.",
                t,
            )?,
            fwd_bytes: counter(
                registry,
                "veil_relay_forwarded_bytes_total",
                "Bytes forwarded to legs.",
                t,
            )?,
            control_packets: counter(
                registry,
                "veil_relay_control_sent_packets_total",
                "Control messages the relay sent (challenges, acknowledgements, errors).",
                t,
            )?,
            control_bytes: counter(
                registry,
                "veil_relay_control_sent_bytes_total",
                "Bytes of control messages sent.",
                t,
            )?,
            send_errors: counter(
                registry,
                "veil_relay_send_errors_total",
                "Datagrams the relay failed to send (UDP socket buffer full; QUIC datagram send buffer full, the oldest queued datagram discarded; connection gone).",
                t,
            )?,
            drops: counter(
                registry,
                "veil_relay_dropped_packets_total",
                "Datagrams dropped or requests refused, by reason.",
                &["transport", "reason"],
            )?,
            binds: counter(
                registry,
                "veil_relay_binds_total",
                "Bind requests by result.",
                &["transport", "result"],
            )?,
            bound_legs: {
                let g = IntGaugeVec::new(
                    Opts::new("veil_relay_bound_legs", "Legs bound now, by transport."),
                    t,
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            sessions: gauge(
                registry,
                "veil_relay_sessions",
                "Sessions with at least one bound leg.",
            )?,
            capacity: gauge(
                registry,
                "veil_relay_capacity_legs",
                "The most legs the relay accepts.",
            )?,
            draining: gauge(
                registry,
                "veil_relay_draining",
                "1 while the relay drains, else 0.",
            )?,
            revocations: gauge(
                registry,
                "veil_relay_revoked_sessions",
                "Session revocations in force.",
            )?,
            leg_revocations: gauge(
                registry,
                "veil_relay_revoked_legs",
                "Single-leg revocations (participants removed from a session that goes on) in force.",
            )?,
            extensions: gauge(
                registry,
                "veil_relay_extended_sessions",
                "Sessions extended (ExtendSession) past their tokens' expiry, in force.",
            )?,
            controllers_attached: gauge(
                registry,
                "veil_relay_controllers_attached",
                "Controllers attached now.",
            )?,
            controller_addresses: gauge(
                registry,
                "veil_relay_controller_addresses",
                "Controller addresses the relay keeps a link to: every address each --controller host resolves to.",
            )?,
            resolutions: counter(
                registry,
                "veil_relay_controller_resolutions_total",
                "Resolutions of --controller host names, by result (a failed one keeps the links there are).",
                &["result"],
            )?,
            quic_open: gauge(
                registry,
                "veil_relay_quic_connections",
                "QUIC connections open now (handshake complete, not yet ended).",
            )?,
            quic_accepted: counter(
                registry,
                "veil_relay_quic_connections_accepted_total",
                "QUIC connections whose handshake completed.",
                &[],
            )?,
            quic_refused: counter(
                registry,
                "veil_relay_quic_connections_refused_total",
                "QUIC connection attempts or connections turned away, by reason.",
                &["reason"],
            )?,
            quic_retries: counter(
                registry,
                "veil_relay_quic_retries_total",
                "QUIC Retry packets sent to prove a client's address before any handshake.",
                &[],
            )?,
            quic_handshake_failures: counter(
                registry,
                "veil_relay_quic_handshake_failures_total",
                "QUIC handshakes that failed or did not complete within 5 s.",
                &[],
            )?,
            quic_datagrams_rx: counter(
                registry,
                "veil_relay_quic_datagrams_received_total",
                "QUIC DATAGRAM frames received (quinn's count, published about once a second per connection).",
                &[],
            )?,
            quic_datagrams_tx: counter(
                registry,
                "veil_relay_quic_datagrams_sent_total",
                "QUIC DATAGRAM frames sent (quinn's count, published about once a second per connection).",
                &[],
            )?,
            turn_connections: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "veil_relay_turn_connections",
                        "TURN TCP and TLS connections open now (TLS: past the handshake).",
                    ),
                    t,
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            turn_accepted: counter(
                registry,
                "veil_relay_turn_connections_accepted_total",
                "TURN TCP connections accepted, and TLS connections whose handshake completed.",
                t,
            )?,
            turn_refused: counter(
                registry,
                "veil_relay_turn_connections_refused_total",
                "TURN TCP and TLS connections the relay closed, by reason: full (--turn-max-connections), handshake (TLS failed or took over 5 s), no_allocation (none within 10 s), framing (bytes that are not TURN messages, or a message over 4 KiB).",
                &["transport", "reason"],
            )?,
            xdp_mode: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "veil_relay_xdp_mode",
                        "The kernel fast path (--xdp): 1 for the mode in force: off (not asked for), userspace (asked for, could not attach: the workers forward everything), native, generic.",
                    ),
                    &["mode"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            xdp_legs: gauge(
                registry,
                "veil_relay_xdp_legs",
                "Legs the kernel fast path forwards now (both legs of each 2-party UDP session it holds).",
            )?,
            xdp_packets: counter(
                registry,
                "veil_relay_xdp_packets_total",
                "Datagrams of offloaded legs the kernel fast path decided on, by result: forwarded, rate_limited (dropped; also counted in veil_relay_dropped_packets_total), or handed to the workers: passed_expired, passed_not_media (control, malformed, too large), passed_peer_unknown (the peer's next hop not learned yet). Its forwarded datagrams are also counted in the transport-udp series of the other counters.",
                &["result"],
            )?,
            xdp: Arc::new(crate::xdp::Status::default()),
            forwarding_latency,
            sources: Mutex::new(Vec::new()),
            quic: Mutex::new(None),
            streams: Mutex::new(None),
            refresh_lock: Mutex::new(()),
            node,
        };
        // Create every labelled series up front, so dashboards and alerts see zeros, not gaps.
        for tr in Transport::ALL {
            for r in DropReason::ALL {
                m.drops.with_label_values(&[tr.as_str(), r.as_str()]);
            }
            for r in BindResult::ALL {
                m.binds.with_label_values(&[tr.as_str(), r.as_str()]);
            }
        }
        for r in RESOLUTION_RESULTS {
            m.resolutions.with_label_values(&[r]);
        }
        for r in XDP_RESULTS {
            m.xdp_packets.with_label_values(&[r]);
        }
        for r in QuicRefusal::ALL {
            m.quic_refused.with_label_values(&[r.as_str()]);
        }
        for tr in STREAMS {
            m.turn_connections.with_label_values(&[tr.as_str()]);
            m.turn_accepted.with_label_values(&[tr.as_str()]);
            for r in StreamRefusal::ALL {
                m.turn_refused.with_label_values(&[tr.as_str(), r.as_str()]);
            }
        }
        // Unlabelled counters (vectors only to share `set`): their one series, zero without QUIC.
        for c in [
            &m.quic_accepted,
            &m.quic_retries,
            &m.quic_handshake_failures,
            &m.quic_datagrams_rx,
            &m.quic_datagrams_tx,
        ] {
            c.with_label_values::<&str>(&[]);
        }
        m.refresh();
        Ok(m)
    }

    /// Adds a packet-path instance whose counters the metrics include.
    pub fn add_source(&self, transport: Transport, stats: Arc<SharedStats>) {
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((transport, stats));
    }

    /// Adds the QUIC transport: its counters and its legs.
    pub fn add_quic(&self, quic: Arc<QuicConns>) {
        self.add_source(Transport::Quic, quic.stats.clone());
        *self.quic.lock().unwrap_or_else(|e| e.into_inner()) = Some(quic);
    }

    /// Adds TURN over TCP and TLS: their counters and their connections.
    pub fn add_streams(&self, streams: Arc<TurnStreams>) {
        self.add_source(Transport::TurnTcp, streams.tcp.clone());
        self.add_source(Transport::TurnTls, streams.tls.clone());
        *self.streams.lock().unwrap_or_else(|e| e.into_inner()) = Some(streams);
    }

    /// Totals per transport.
    pub fn totals(&self) -> [(Transport, Stats); 5] {
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        Transport::ALL.map(|tr| {
            let mut total = Stats::default();
            for (_, s) in sources.iter().filter(|(t, _)| *t == tr) {
                total.merge(&s.load());
            }
            (tr, total)
        })
    }

    /// Copies the packet path's counters into the registry; call before gathering.
    pub fn refresh(&self) {
        // Serialise refreshes, so two scrapes cannot both add the same delta.
        let _guard = self.refresh_lock.lock().unwrap_or_else(|e| e.into_inner());
        for (tr, s) in self.totals() {
            let l = &[tr.as_str()];
            set(&self.rx_packets, l, s.rx_packets);
            set(&self.rx_bytes, l, s.rx_bytes);
            set(&self.fwd_packets, l, s.forwarded_packets);
            set(&self.fwd_bytes, l, s.forwarded_bytes);
            set(&self.control_packets, l, s.control_tx_packets);
            set(&self.control_bytes, l, s.control_tx_bytes);
            set(&self.send_errors, l, s.send_errors);
            for r in DropReason::ALL {
                set(&self.drops, &[tr.as_str(), r.as_str()], s.drops_for(r));
            }
            for r in BindResult::ALL {
                set(&self.binds, &[tr.as_str(), r.as_str()], s.binds_for(r));
            }
        }
        let d = &self.node.directory;
        let quic = self
            .quic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, |q| q.legs());
        self.bound_legs
            .with_label_values(&["quic"])
            .set(quic as i64);
        if let Some(q) = self.quic.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            use std::sync::atomic::Ordering::Relaxed;
            let c = &q.counters;
            self.quic_open.set(c.open.load(Relaxed) as i64);
            set(&self.quic_accepted, &[], c.accepted.load(Relaxed));
            set(&self.quic_retries, &[], c.retries.load(Relaxed));
            set(
                &self.quic_handshake_failures,
                &[],
                c.handshake_failures.load(Relaxed),
            );
            set(&self.quic_datagrams_rx, &[], c.datagrams_rx.load(Relaxed));
            set(&self.quic_datagrams_tx, &[], c.datagrams_tx.load(Relaxed));
            for r in QuicRefusal::ALL {
                set(&self.quic_refused, &[r.as_str()], c.refused(r));
            }
        }
        let mut turn_streams = 0;
        if let Some(st) = self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            use std::sync::atomic::Ordering::Relaxed;
            for (tr, c) in STREAMS.into_iter().zip(&st.counters) {
                let l = [tr.as_str()];
                self.turn_connections
                    .with_label_values(&l)
                    .set(c.open.load(Relaxed) as i64);
                set(&self.turn_accepted, &l, c.accepted.load(Relaxed));
                for r in StreamRefusal::ALL {
                    set(&self.turn_refused, &[tr.as_str(), r.as_str()], c.refused(r));
                }
                let allocated = c.allocated.load(Relaxed) as usize;
                self.bound_legs.with_label_values(&l).set(allocated as i64);
                turn_streams += allocated;
            }
        }
        self.bound_legs
            .with_label_values(&["turn-udp"])
            .set(d.turn_legs().saturating_sub(turn_streams) as i64);
        self.bound_legs
            .with_label_values(&["udp"])
            .set(d.legs().saturating_sub(quic + d.turn_legs()) as i64);
        self.sessions.set(d.sessions() as i64);
        self.capacity.set(d.max_legs() as i64);
        self.draining.set(i64::from(d.is_draining()));
        self.revocations.set(d.revocations() as i64);
        self.leg_revocations.set(d.leg_revocations() as i64);
        self.extensions.set(d.extensions() as i64);
        let x = &self.xdp;
        for mode in crate::xdp::Status::MODES {
            self.xdp_mode
                .with_label_values(&[mode])
                .set(i64::from(x.mode() == mode));
        }
        {
            use std::sync::atomic::Ordering::Relaxed;
            self.xdp_legs.set(x.legs.load(Relaxed) as i64);
            for (r, c) in XDP_RESULTS.into_iter().zip([
                &x.forwarded,
                &x.rate_limited,
                &x.passed_expired,
                &x.passed_not_media,
                &x.passed_peer_unknown,
            ]) {
                set(&self.xdp_packets, &[r], c.load(Relaxed));
            }
        }
    }
}

/// The results of `veil_relay_xdp_packets_total`, in the order of [`crate::xdp::Status`].
const XDP_RESULTS: [&str; 5] = [
    "forwarded",
    "rate_limited",
    "passed_expired",
    "passed_not_media",
    "passed_peer_unknown",
];

/// The stream transports of TURN, in the order of [`TurnStreams::counters`].
const STREAMS: [Transport; 2] = [Transport::TurnTcp, Transport::TurnTls];

/// Outcomes of a controller host name resolution, as label values.
const RESOLUTION_RESULTS: [&str; 2] = ["resolved", "failed"];

impl RelayMetrics {
    /// Counts a resolution of a --controller host name (`ok`: it gave at least one address).
    pub fn count_resolution(&self, ok: bool) {
        self.resolutions
            .with_label_values(&[RESOLUTION_RESULTS[usize::from(!ok)]])
            .inc();
    }
}

/// Raises a counter to `total` (counters only go up; the sources are cumulative).
fn set(vec: &IntCounterVec, labels: &[&str], total: u64) {
    let c = vec.with_label_values(labels);
    let current = c.get();
    if total > current {
        c.inc_by(total - current);
    }
}
