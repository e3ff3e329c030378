//! Figures: what receivers measured, per stream, per second, and over the whole run.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use hdrhistogram::Histogram;

/// A latency histogram in microseconds, from 1 µs to 60 s.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid")
}

/// A coarser histogram (1 µs to 60 s, two significant digits): for the per-second,
/// per-transport series, where a tenth of the memory of [`latency_histogram`] is plenty.
pub fn coarse_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("static bounds are valid")
}

/// The transport of one participant's leg. A closed set: it keys figures and report fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LegTransport {
    /// UDP datagrams.
    Udp,
    /// QUIC datagrams.
    Quic,
}

impl LegTransport {
    /// Both, in index order.
    pub const ALL: [Self; 2] = [Self::Udp, Self::Quic];

    /// Label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Quic => "quic",
        }
    }

    /// Index into per-transport arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl From<veil_client::Transport> for LegTransport {
    fn from(t: veil_client::Transport) -> Self {
        match t {
            veil_client::Transport::Udp => Self::Udp,
            veil_client::Transport::Quic => Self::Quic,
        }
    }
}

/// What one receiver saw of one sender's RTP stream, tracked by the sender's packet index.
#[derive(Debug, Default)]
pub struct StreamRx {
    seen: Vec<u64>,
    max_index: Option<u64>,
    /// Distinct packets received.
    pub unique: u64,
    /// Copies of packets already received.
    pub duplicates: u64,
    /// Packets that arrived after a later one.
    pub reordered: u64,
    /// RFC 3550 interarrival jitter, seconds.
    pub jitter: f64,
    prev_transit: Option<f64>,
    /// Arrival of the first distinct packet, seconds on the run's clock.
    pub first_arrival: Option<f64>,
    /// Arrival of the latest distinct packet.
    pub last_arrival: Option<f64>,
    /// Longest time between two consecutive distinct arrivals, seconds.
    pub max_gap: f64,
}

impl StreamRx {
    /// Records packet `index`, sent at `sent_s` and received at `arrived_s` (seconds on one clock).
    pub fn record(&mut self, index: u64, sent_s: f64, arrived_s: f64) {
        let (word, bit) = ((index / 64) as usize, index % 64);
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return;
        }
        self.seen[word] |= 1 << bit;
        self.unique += 1;
        if let Some(last) = self.last_arrival {
            self.max_gap = self.max_gap.max(arrived_s - last);
        }
        self.first_arrival.get_or_insert(arrived_s);
        self.last_arrival = Some(arrived_s);
        match self.max_index {
            Some(m) if index < m => self.reordered += 1,
            _ => self.max_index = Some(index),
        }
        // RFC 3550 §6.4.1: J += (|D| - J) / 16, D the change in transit time.
        let transit = arrived_s - sent_s;
        if let Some(prev) = self.prev_transit {
            self.jitter += ((transit - prev).abs() - self.jitter) / 16.0;
        }
        self.prev_transit = Some(transit);
    }

    /// The longest interruption of this stream, seconds: the longest time between two
    /// consecutive arrivals, or from the sender's first packet (sent at `first_sent_s`) to the
    /// first arrival, or from the last arrival to the sender's last packet (`last_sent_s`). A
    /// stream of which nothing arrived was interrupted for as long as it was sent.
    pub fn longest_gap(&self, first_sent_s: f64, last_sent_s: f64) -> f64 {
        match (self.first_arrival, self.last_arrival) {
            (Some(first), Some(last)) => self
                .max_gap
                .max(first - first_sent_s)
                .max(last_sent_s - last)
                .max(0.0),
            _ => (last_sent_s - first_sent_s).max(0.0),
        }
    }

    /// Whether packet `index` was received.
    pub fn has(&self, index: u64) -> bool {
        self.seen
            .get((index / 64) as usize)
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }
}

/// One second of the run.
#[derive(Debug, Clone)]
pub struct Second {
    /// RTP packets sent.
    pub sent: u64,
    /// Bytes of SRTP sent.
    pub bytes_sent: u64,
    /// RTP packets received (distinct).
    pub received: u64,
    /// Bytes received (datagrams as they arrived).
    pub bytes: u64,
    /// Packets sent in this second that never arrived somewhere they should have.
    pub lost: u64,
    /// One-way latency of packets received in this second.
    pub latency: Histogram<u64>,
    /// Calls with every leg bound at the end of this second.
    pub calls_up: u64,
    /// Sum of the receiving streams' RFC 3550 jitter after each packet received this second,
    /// seconds (with `jitter_n`, their mean).
    pub jitter_sum: f64,
    /// Packets that sum is over.
    pub jitter_n: u64,
    /// How late senders woke for the frames they sent this second, µs.
    pub send_lag: Histogram<u64>,
    /// Per receiving transport: packets received, packets lost (by the second they were sent),
    /// and the latency of those received.
    pub by_transport: [TransportSecond; 2],
    /// `(machine busy, this process)` over this second, fractions of all CPUs.
    pub cpu: Option<(f64, f64)>,
    /// Each relay's `(forwarded, dropped)` datagrams over this second, from its metrics.
    pub relays: Vec<(String, u64, u64)>,
}

/// One second of one receiving transport.
#[derive(Debug, Clone)]
pub struct TransportSecond {
    /// RTP packets received (distinct).
    pub received: u64,
    /// Packets due at this transport's participants, sent this second, never received.
    pub lost: u64,
    /// One-way latency of packets received this second.
    pub latency: Histogram<u64>,
}

impl Second {
    fn new() -> Self {
        let t = || TransportSecond {
            received: 0,
            lost: 0,
            latency: coarse_histogram(),
        };
        Self {
            sent: 0,
            bytes_sent: 0,
            received: 0,
            bytes: 0,
            lost: 0,
            latency: latency_histogram(),
            calls_up: 0,
            jitter_sum: 0.0,
            jitter_n: 0,
            send_lag: coarse_histogram(),
            by_transport: [t(), t()],
            cpu: None,
            relays: Vec::new(),
        }
    }
}

/// Counters every task writes to, and the per-second timeline.
#[derive(Debug)]
pub struct Collector {
    /// RTP packets sent.
    pub sent: AtomicU64,
    /// RTP packets expected at receivers (sent × other participants).
    pub expected: AtomicU64,
    /// RTP packets received (distinct).
    pub received: AtomicU64,
    /// Duplicate RTP packets received.
    pub duplicates: AtomicU64,
    /// Bytes of media received.
    pub bytes_received: AtomicU64,
    /// Bytes of media sent.
    pub bytes_sent: AtomicU64,
    /// Packets that failed SRTP/SRTCP authentication or decryption, or came from no known sender.
    pub decrypt_failures: AtomicU64,
    /// RTCP sender reports sent.
    pub rtcp_sent: AtomicU64,
    /// RTCP sender reports received (and decrypted).
    pub rtcp_received: AtomicU64,
    /// Calls with every leg bound.
    pub calls_up: AtomicU64,
    /// Calls that failed, by kind of failure (the stage and the error's class): how many, and
    /// the first one's error.
    pub failures: Mutex<std::collections::BTreeMap<String, (u64, String)>>,
    /// Media datagrams the generator tried to send and its socket refused.
    pub send_errors: AtomicU64,
    /// Latency over the whole run, by receiving transport.
    pub latency_by_transport: Mutex<[Histogram<u64>; 2]>,
    seconds: Mutex<Vec<Second>>,
}

impl Default for Collector {
    fn default() -> Self {
        Self {
            sent: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            decrypt_failures: AtomicU64::new(0),
            rtcp_sent: AtomicU64::new(0),
            rtcp_received: AtomicU64::new(0),
            calls_up: AtomicU64::new(0),
            failures: Mutex::new(Default::default()),
            send_errors: AtomicU64::new(0),
            latency_by_transport: Mutex::new([latency_histogram(), latency_histogram()]),
            seconds: Mutex::new(Vec::new()),
        }
    }
}

impl Collector {
    fn with_second<R>(&self, s: usize, f: impl FnOnce(&mut Second) -> R) -> R {
        let mut secs = self.seconds.lock().unwrap_or_else(|e| e.into_inner());
        while secs.len() <= s {
            secs.push(Second::new());
        }
        f(&mut secs[s])
    }

    /// Counts one frame sent in second `s`: `n` RTP packets of `bytes`, each due at `fanout`
    /// receivers, by a sender that woke `lag_us` after the frame was due.
    pub fn on_sent(&self, s: usize, n: u64, bytes: u64, fanout: u64, lag_us: u64) {
        self.sent.fetch_add(n, Relaxed);
        self.bytes_sent.fetch_add(bytes, Relaxed);
        self.expected.fetch_add(n * fanout, Relaxed);
        self.with_second(s, |sec| {
            sec.sent += n;
            sec.bytes_sent += bytes;
            sec.send_lag.saturating_record(lag_us.max(1));
        });
    }

    /// Counts one distinct RTP packet received in second `s` by a participant on `transport`,
    /// with `latency_us`, its stream's RFC 3550 jitter being `jitter_s` after it.
    pub fn on_received(
        &self,
        s: usize,
        transport: LegTransport,
        bytes: u64,
        latency_us: u64,
        jitter_s: f64,
    ) {
        self.received.fetch_add(1, Relaxed);
        self.bytes_received.fetch_add(bytes, Relaxed);
        // Saturates at the histogram's 60 s ceiling rather than failing.
        let latency_us = latency_us.max(1);
        self.with_second(s, |sec| {
            sec.received += 1;
            sec.bytes += bytes;
            sec.latency.saturating_record(latency_us);
            sec.jitter_sum += jitter_s;
            sec.jitter_n += 1;
            let t = &mut sec.by_transport[transport.index()];
            t.received += 1;
            t.latency.saturating_record(latency_us);
        });
        self.latency_by_transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())[transport.index()]
        .saturating_record(latency_us);
    }

    /// Counts `n` packets sent in second `s`, due at a participant on `transport`, as lost.
    pub fn on_lost(&self, s: usize, transport: LegTransport, n: u64) {
        self.with_second(s, |sec| {
            sec.lost += n;
            sec.by_transport[transport.index()].lost += n;
        });
    }

    /// Counts a call that failed, by kind, with its error; true for the first of its kind.
    pub fn on_failure(&self, kind: &str, error: &str) -> bool {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let entry = f
            .entry(kind.to_string())
            .or_insert_with(|| (0, error.to_string()));
        entry.0 += 1;
        entry.0 == 1
    }

    /// Calls that failed.
    pub fn calls_failed(&self) -> u64 {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|(n, _)| n)
            .sum()
    }

    /// Notes what the CPUs did during second `s`.
    pub fn set_cpu(&self, s: usize, busy: f64, process: f64) {
        self.with_second(s, |sec| sec.cpu = Some((busy, process)));
    }

    /// Notes each relay's `(name, forwarded, dropped)` during second `s`.
    pub fn set_relays(&self, s: usize, relays: Vec<(String, u64, u64)>) {
        self.with_second(s, |sec| sec.relays = relays);
    }

    /// Notes the calls up at second `s`.
    pub fn set_calls_up(&self, s: usize) {
        let up = self.calls_up.load(Relaxed);
        self.with_second(s, |sec| sec.calls_up = up);
    }

    /// The timeline so far.
    pub fn seconds(&self) -> Vec<Second> {
        self.seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The latest second's receive-side p99 latency, microseconds.
    pub fn p99_of(&self, s: usize) -> Option<u64> {
        let secs = self.seconds.lock().unwrap_or_else(|e| e.into_inner());
        secs.get(s)
            .filter(|x| !x.latency.is_empty())
            .map(|x| x.latency.value_at_quantile(0.99))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_tracks_loss_duplicates_reordering_and_jitter() {
        let mut s = StreamRx::default();
        for (i, idx) in [0u64, 1, 3, 2, 3, 5].iter().enumerate() {
            // Constant transit except the reordered packet.
            let sent = *idx as f64 * 0.02;
            let extra = if *idx == 2 { 0.010 } else { 0.0 };
            s.record(*idx, sent, sent + 0.001 + extra + i as f64 * 0.0);
        }
        assert_eq!((s.unique, s.duplicates, s.reordered), (5, 1, 1));
        assert!(s.has(2) && !s.has(4) && !s.has(1000));
        assert!(s.jitter > 0.0 && s.jitter < 0.010);

        let mut steady = StreamRx::default();
        for i in 0..100 {
            steady.record(i, i as f64 * 0.02, i as f64 * 0.02 + 0.005);
        }
        assert!(
            steady.jitter < 1e-12,
            "constant delay has no jitter: {}",
            steady.jitter
        );
    }

    #[test]
    fn collector_buckets_by_second() {
        let c = Collector::default();
        c.on_sent(0, 10, 1000, 1, 300);
        c.on_sent(2, 5, 500, 3, 2000);
        c.on_received(2, LegTransport::Quic, 100, 1500, 0.002);
        c.on_lost(0, LegTransport::Udp, 1);
        let secs = c.seconds();
        assert_eq!(secs.len(), 3);
        assert_eq!((secs[0].sent, secs[0].lost, secs[2].received), (10, 1, 1));
        assert_eq!(
            (secs[0].by_transport[0].lost, secs[0].by_transport[1].lost),
            (1, 0)
        );
        assert_eq!(secs[2].by_transport[1].received, 1);
        assert_eq!((secs[2].jitter_n, secs[2].bytes_sent), (1, 500));
        assert!(secs[2].send_lag.max() >= 1990);
        assert_eq!(c.expected.load(Relaxed), 25);
        assert_eq!(c.p99_of(2), Some(secs[2].latency.value_at_quantile(0.99)));
        assert_eq!(c.p99_of(1), None);
        assert!(c.on_failure("allocate_unavailable", "no relay available"));
        assert!(!c.on_failure("allocate_unavailable", "again"));
        assert!(c.on_failure("bind_unreachable", "no relay answered"));
        assert_eq!(c.calls_failed(), 3);
        let f = c.failures.lock().unwrap();
        assert_eq!(
            f["allocate_unavailable"],
            (2, "no relay available".to_string())
        );
    }

    #[test]
    fn longest_gap_covers_the_middle_and_both_ends() {
        let mut s = StreamRx::default();
        // Sent every 20 ms from 1.0 s to 1.8 s; those sent from 1.30 to 1.48 s are lost.
        for i in 0..=40u64 {
            let sent = 1.0 + i as f64 * 0.02;
            if (15..25).contains(&i) {
                continue;
            }
            s.record(i, sent, sent + 0.001);
        }
        let gap = s.longest_gap(1.0, 1.0 + 40.0 * 0.02);
        assert!((gap - 0.22).abs() < 1e-9, "{gap}");
        // Had the sender gone on to 2.5 s with nothing more arriving, the tail is the gap.
        let tail = s.longest_gap(1.0, 2.5);
        assert!((tail - (2.5 - 1.801)).abs() < 1e-9, "{tail}");
        assert_eq!(StreamRx::default().longest_gap(1.0, 4.0), 3.0);
    }
}
