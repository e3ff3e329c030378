//! Counters of the packet path. The core counts into a plain [`Stats`] it owns; the shell
//! publishes a copy into a [`SharedStats`] after each batch, where the metrics exporter reads it.
//! Nothing here is labelled by session, leg or address: every dimension is a closed enum.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why the relay dropped a datagram or refused a request. A closed set: it labels metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A control message that does not parse, or media shorter than its header.
    Malformed,
    /// First byte outside the ranges the relay serves (STUN, ZRTP, TURN, unassigned, empty).
    UnknownType,
    /// Media or KEEPALIVE from a source that holds no leg.
    Unbound,
    /// A BIND whose ticket is malformed or whose tag does not verify (forged or altered).
    BadToken,
    /// A BIND whose ticket names a key the relay does not hold.
    UnknownKey,
    /// A BIND with an expired ticket, or media of a session past its expiry.
    Expired,
    /// A BIND or media for a released session.
    SessionClosed,
    /// A second BIND whose cookie is stale or not this source's (a fresh CHALLENGE is sent).
    BadCookie,
    /// Media over the leg's packet or bit rate limit.
    RateLimited,
    /// A BIND over the per-source bind rate limit.
    BindRateLimited,
    /// A BIND refused because the relay holds as many legs as it may.
    RelayFull,
    /// A BIND for a new session refused because the relay is draining.
    Draining,
    /// A datagram larger than the relay accepts.
    Oversized,
    /// Media from a leg with no other bound leg to forward to.
    NoPeer,
    /// A forwarded copy larger than the receiving QUIC leg's maximum datagram size.
    TooLargeForPeer,
    /// A BIND whose proof is not bound to the transport it arrived on: a UDP BIND (cookie or
    /// none) over QUIC, a channel-bound BIND over UDP, or a BIND sent as a QUIC datagram rather
    /// than on the connection's stream. A captured UDP BIND replayed over QUIC lands here.
    BadBinding,
    /// A forwarded copy withheld from a QUIC leg whose connection moved to an address that has
    /// not yet answered the relay's PROBE (counted once per withheld copy).
    UnprovenPath,
    /// A plain STUN Binding request: dropped unanswered, for an answer would be an amplifier
    /// (TURN clients connect without it).
    StunBinding,
    /// A TURN request whose credentials (username, MESSAGE-INTEGRITY) do not verify, or that
    /// carries none (answered with 401 and a nonce, no larger than twice the request).
    TurnUnauthorized,
    /// A TURN request, indication or ChannelData from a client with no allocation here, or a
    /// second Allocate on one (answered 437 where the request was authenticated).
    TurnNoAllocation,
    /// A TURN peer address that is not the relayed address of another allocation of the same
    /// session: another session's, no allocation's, the relay's own port, 0.0.0.0, an
    /// IPv4-mapped form (answered 403; an indication is dropped).
    TurnForbiddenPeer,
    /// TURN data toward or from a peer with no permission installed (no CreatePermission or
    /// ChannelBind for it, or one that expired), or on a channel the client never bound.
    TurnNoPermission,
    /// A TURN Allocate for a leg that already holds as many allocations on this relay as it
    /// may (answered 486).
    TurnQuotaReached,
}

impl DropReason {
    /// Number of reasons.
    pub const COUNT: usize = 23;
    /// Every reason, in index order.
    pub const ALL: [Self; Self::COUNT] = [
        Self::Malformed,
        Self::UnknownType,
        Self::Unbound,
        Self::BadToken,
        Self::UnknownKey,
        Self::Expired,
        Self::SessionClosed,
        Self::BadCookie,
        Self::RateLimited,
        Self::BindRateLimited,
        Self::RelayFull,
        Self::Draining,
        Self::Oversized,
        Self::NoPeer,
        Self::TooLargeForPeer,
        Self::BadBinding,
        Self::UnprovenPath,
        Self::StunBinding,
        Self::TurnUnauthorized,
        Self::TurnNoAllocation,
        Self::TurnForbiddenPeer,
        Self::TurnNoPermission,
        Self::TurnQuotaReached,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownType => "unknown_type",
            Self::Unbound => "unbound",
            Self::BadToken => "bad_token",
            Self::UnknownKey => "unknown_key",
            Self::Expired => "expired",
            Self::SessionClosed => "session_closed",
            Self::BadCookie => "bad_cookie",
            Self::RateLimited => "rate_limited",
            Self::BindRateLimited => "bind_rate_limited",
            Self::RelayFull => "relay_full",
            Self::Draining => "draining",
            Self::Oversized => "oversized",
            Self::NoPeer => "no_peer",
            Self::TooLargeForPeer => "too_large_for_peer",
            Self::BadBinding => "bad_binding",
            Self::UnprovenPath => "unproven_path",
            Self::StunBinding => "stun_binding",
            Self::TurnUnauthorized => "turn_unauthorized",
            Self::TurnNoAllocation => "turn_no_allocation",
            Self::TurnForbiddenPeer => "turn_forbidden_peer",
            Self::TurnNoPermission => "turn_no_permission",
            Self::TurnQuotaReached => "turn_quota_reached",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Outcome of a BIND. A closed set: it labels metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BindResult {
    /// The leg is bound (or re-bound) to the source.
    Bound,
    /// A CHALLENGE was sent; the client must echo the cookie.
    Challenged,
    /// Refused; the drop reason says why.
    Refused,
}

impl BindResult {
    /// Number of results.
    pub const COUNT: usize = 3;
    /// Every result, in index order.
    pub const ALL: [Self; Self::COUNT] = [Self::Bound, Self::Challenged, Self::Refused];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bound => "bound",
            Self::Challenged => "challenged",
            Self::Refused => "refused",
        }
    }
}

/// Counters of one forwarding table (a UDP worker's, or a QUIC connection's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Datagrams forwarded (one per target leg).
    pub forwarded_packets: u64,
    /// Bytes forwarded (one payload per target leg).
    pub forwarded_bytes: u64,
    /// Control messages the relay originated (CHALLENGE, BIND_OK, ACK, ERROR, CLOSE).
    pub control_tx_packets: u64,
    /// Bytes of those control messages.
    pub control_tx_bytes: u64,
    /// Datagrams or bytes the shell failed to send (buffer full, unreachable).
    pub send_errors: u64,
    /// BIND outcomes, indexed like [`BindResult::ALL`].
    pub binds: [u64; BindResult::COUNT],
    /// Drops, indexed like [`DropReason::ALL`].
    pub drops: [u64; DropReason::COUNT],
}

impl Stats {
    /// Counts one drop.
    #[inline]
    pub fn count_drop(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
    }

    /// Counts `n` drops.
    #[inline]
    pub fn count_drops(&mut self, reason: DropReason, n: u64) {
        self.drops[reason.index()] += n;
    }

    /// Drops counted for `reason`.
    pub fn drops_for(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// Binds counted for `result`.
    pub fn binds_for(&self, result: BindResult) -> u64 {
        self.binds[result as usize]
    }

    /// All drops, whatever the reason.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &Self) {
        self.rx_packets += other.rx_packets;
        self.rx_bytes += other.rx_bytes;
        self.forwarded_packets += other.forwarded_packets;
        self.forwarded_bytes += other.forwarded_bytes;
        self.control_tx_packets += other.control_tx_packets;
        self.control_tx_bytes += other.control_tx_bytes;
        self.send_errors += other.send_errors;
        for (a, b) in self.binds.iter_mut().zip(other.binds) {
            *a += b;
        }
        for (a, b) in self.drops.iter_mut().zip(other.drops) {
            *a += b;
        }
    }
}

const SCALARS: usize = 7;
const FIELDS: usize = SCALARS + BindResult::COUNT + DropReason::COUNT;

/// A [`Stats`] readable from other threads.
#[derive(Debug)]
pub struct SharedStats {
    fields: [AtomicU64; FIELDS],
}

impl Default for SharedStats {
    fn default() -> Self {
        Self {
            fields: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

fn flatten(s: &Stats) -> [u64; FIELDS] {
    let mut out = [0u64; FIELDS];
    out[..SCALARS].copy_from_slice(&[
        s.rx_packets,
        s.rx_bytes,
        s.forwarded_packets,
        s.forwarded_bytes,
        s.control_tx_packets,
        s.control_tx_bytes,
        s.send_errors,
    ]);
    out[SCALARS..SCALARS + BindResult::COUNT].copy_from_slice(&s.binds);
    out[SCALARS + BindResult::COUNT..].copy_from_slice(&s.drops);
    out
}

impl SharedStats {
    /// Overwrites the shared copy with `stats`. For a single writer that owns the counts.
    pub fn publish(&self, stats: &Stats) {
        for (cell, v) in self.fields.iter().zip(flatten(stats)) {
            cell.store(v, Relaxed);
        }
    }

    /// Adds `delta` to the shared copy. For many writers that each count a part.
    pub fn add(&self, delta: &Stats) {
        for (cell, v) in self.fields.iter().zip(flatten(delta)) {
            if v != 0 {
                cell.fetch_add(v, Relaxed);
            }
        }
    }

    /// A snapshot.
    pub fn load(&self) -> Stats {
        let f: [u64; FIELDS] = std::array::from_fn(|i| self.fields[i].load(Relaxed));
        let mut s = Stats {
            rx_packets: f[0],
            rx_bytes: f[1],
            forwarded_packets: f[2],
            forwarded_bytes: f[3],
            control_tx_packets: f[4],
            control_tx_bytes: f[5],
            send_errors: f[6],
            ..Stats::default()
        };
        s.binds
            .copy_from_slice(&f[SCALARS..SCALARS + BindResult::COUNT]);
        s.drops.copy_from_slice(&f[SCALARS + BindResult::COUNT..]);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_labels_and_round_trip() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let labels: std::collections::HashSet<_> =
            DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), DropReason::COUNT);
        for (i, r) in BindResult::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }

        let mut s = Stats {
            rx_packets: 1,
            rx_bytes: 2,
            forwarded_packets: 3,
            forwarded_bytes: 4,
            ..Default::default()
        };
        s.control_tx_packets = 5;
        s.control_tx_bytes = 6;
        s.send_errors = 7;
        s.binds = [8, 9, 10];
        s.count_drop(DropReason::NoPeer);
        s.count_drop(DropReason::Malformed);
        let shared = SharedStats::default();
        shared.publish(&s);
        assert_eq!(shared.load(), s);
        shared.add(&s);
        let mut twice = s;
        twice.merge(&s);
        assert_eq!(shared.load(), twice);
        assert_eq!(twice.drops_for(DropReason::NoPeer), 2);
        assert_eq!(twice.total_drops(), 4);
    }
}
