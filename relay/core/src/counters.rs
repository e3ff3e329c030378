//! What one binding of a leg carried on this relay: media packets and bytes in from its client,
//! out to it, and its packets the relay dropped. The signaling service reads them per leg
//! (`GetSession`) for its quality reports; they reach the controller in the relay's leg reports,
//! never as metric labels.
//!
//! A binding's counters live from the leg's bind on this relay until it is unbound here (a move
//! to another address or transport of the same relay keeps them). They are opt-in
//! (`Config::leg_counters`): each costs an allocation of 192 bytes per bound leg, and the media
//! path four atomic additions per forwarded datagram and two more per extra target
//! (docs/PERFORMANCE.md).
//!
//! The received half is written by the one worker that serves the leg; the sent half by the
//! workers of the legs that send to it (in a two-party call, the one other worker): two cache
//! lines, so that neither writer disturbs the other's.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
#[repr(align(64))]
struct Line {
    packets: AtomicU64,
    bytes: AtomicU64,
    dropped: AtomicU64,
}

/// One binding's counters, shared by the forwarding tables that serve and send to the leg.
#[derive(Debug, Default)]
pub struct LegCounters {
    rx: Line,
    tx: Line,
}

/// A reading of [`LegCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Media datagrams received from the leg's client (SRTP, SRTCP, DTLS; not Veil's own
    /// control messages), forwarded or not.
    pub packets_in: u64,
    /// Their bytes (UDP payload; for TURN, the relayed payload).
    pub bytes_in: u64,
    /// Media datagrams the relay forwarded to the leg's client.
    pub packets_out: u64,
    /// Their bytes.
    pub bytes_out: u64,
    /// Of `packets_in`, those the relay did not forward (rate limit, no peer bound, revoked,
    /// expired, an unproven path, no TURN permission).
    pub packets_dropped: u64,
}

impl LegCounters {
    #[inline]
    pub(crate) fn received(&self, len: usize) {
        self.rx.packets.fetch_add(1, Ordering::Relaxed);
        self.rx.bytes.fetch_add(len as u64, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn dropped(&self) {
        self.rx.dropped.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn sent(&self, len: usize) {
        self.tx.packets.fetch_add(1, Ordering::Relaxed);
        self.tx.bytes.fetch_add(len as u64, Ordering::Relaxed);
    }

    /// Adds what a kernel fast path carried for this binding since its last reading: media
    /// received from the leg's client, of it dropped, and sent to it.
    pub(crate) fn add_fast(&self, received: (u64, u64), dropped: u64, sent: (u64, u64)) {
        self.rx.packets.fetch_add(received.0, Ordering::Relaxed);
        self.rx.bytes.fetch_add(received.1, Ordering::Relaxed);
        self.rx.dropped.fetch_add(dropped, Ordering::Relaxed);
        self.tx.packets.fetch_add(sent.0, Ordering::Relaxed);
        self.tx.bytes.fetch_add(sent.1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn counts(&self) -> Counts {
        Counts {
            packets_in: self.rx.packets.load(Ordering::Relaxed),
            bytes_in: self.rx.bytes.load(Ordering::Relaxed),
            packets_out: self.tx.packets.load(Ordering::Relaxed),
            bytes_out: self.tx.bytes.load(Ordering::Relaxed),
            packets_dropped: self.rx.dropped.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_sit_on_their_own_cache_lines() {
        let c = LegCounters::default();
        let rx = std::ptr::addr_of!(c.rx) as usize;
        let tx = std::ptr::addr_of!(c.tx) as usize;
        assert!(rx.abs_diff(tx) >= 64);
        c.received(100);
        c.received(50);
        c.dropped();
        c.sent(80);
        assert_eq!(
            c.counts(),
            Counts {
                packets_in: 2,
                bytes_in: 150,
                packets_out: 1,
                bytes_out: 80,
                packets_dropped: 1
            }
        );
    }
}
