//! Figures: what receivers measured, per stream, per second, and over the whole run.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use hdrhistogram::Histogram;

/// A latency histogram in microseconds, from 1 µs to 60 s.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid")
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
}

impl Second {
    fn new() -> Self {
        Self {
            sent: 0,
            received: 0,
            bytes: 0,
            lost: 0,
            latency: latency_histogram(),
            calls_up: 0,
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
    /// Calls that failed to set up.
    pub calls_failed: AtomicU64,
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
            calls_failed: AtomicU64::new(0),
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

    /// Counts `n` RTP packets sent in second `s`, each due at `fanout` receivers.
    pub fn on_sent(&self, s: usize, n: u64, bytes: u64, fanout: u64) {
        self.sent.fetch_add(n, Relaxed);
        self.bytes_sent.fetch_add(bytes, Relaxed);
        self.expected.fetch_add(n * fanout, Relaxed);
        self.with_second(s, |sec| sec.sent += n);
    }

    /// Counts one distinct RTP packet received in second `s` with `latency_us`.
    pub fn on_received(&self, s: usize, bytes: u64, latency_us: u64) {
        self.received.fetch_add(1, Relaxed);
        self.bytes_received.fetch_add(bytes, Relaxed);
        self.with_second(s, |sec| {
            sec.received += 1;
            sec.bytes += bytes;
            // Saturates at the histogram's 60 s ceiling rather than failing.
            sec.latency.saturating_record(latency_us.max(1));
        });
    }

    /// Counts `n` packets sent in second `s` as lost.
    pub fn on_lost(&self, s: usize, n: u64) {
        self.with_second(s, |sec| sec.lost += n);
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
        c.on_sent(0, 10, 1000, 1);
        c.on_sent(2, 5, 500, 3);
        c.on_received(2, 100, 1500);
        c.on_lost(0, 1);
        let secs = c.seconds();
        assert_eq!(secs.len(), 3);
        assert_eq!((secs[0].sent, secs[0].lost, secs[2].received), (10, 1, 1));
        assert_eq!(c.expected.load(Relaxed), 25);
        assert_eq!(c.p99_of(2), Some(secs[2].latency.value_at_quantile(0.99)));
        assert_eq!(c.p99_of(1), None);
    }
}
