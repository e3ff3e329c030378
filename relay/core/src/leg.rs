//! One bound leg, as the forwarding table that receives its packets holds it: the one leg state
//! machine of every transport (expiry, revocation, moves, idleness, rate limits, and for QUIC
//! the proof of the connection's current path).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::counters::LegCounters;
use crate::limit::Limiter;
use crate::session::{Endpoint, Session};
use crate::stats::{DropReason, Stats};
use crate::table::{Targets, Verdict};
use crate::token::SessionId;
use crate::wire::{self, Class};

/// The path of a QUIC leg: where its connection was last proven to receive, and the address it
/// moved to, if that one is not proven yet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Path {
    /// Proven by the handshake (Retry) at bind time, or by a PROBE_ACK since.
    pub(crate) proven: SocketAddr,
    /// The address the connection moved to, awaiting a PROBE_ACK.
    pub(crate) probing: Option<Probing>,
    /// PROBEs the relay may still send before the client next proves a path: refilled by each
    /// proof, not by moving, so that a client hopping between addresses (forged ones among them)
    /// draws at most this many PROBEs between two answers, wherever they go.
    pub(crate) probes_left: u8,
}

/// Whether `a` and `b` are one UDP endpoint: an IPv4 address and its IPv4-mapped IPv6 form
/// (`::ffff:a.b.c.d`, as a dual-stack socket reports IPv4 peers) are the same host, as return
/// routability cookies already count them.
pub(crate) fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// A path being proven.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Probing {
    /// The unproven address.
    pub(crate) addr: SocketAddr,
    /// When to send the next PROBE.
    pub(crate) next_probe: Instant,
}

/// One bound leg.
#[derive(Debug)]
pub struct LegState {
    pub(crate) session: Arc<Session>,
    pub(crate) leg: u8,
    pub(crate) endpoint: Endpoint,
    pub(crate) last_seen: Instant,
    /// The session's expiry on the monotonic clock: checked on every packet, cheaply. For a
    /// TURN allocation, the end of its lifetime (never past the session's expiry).
    pub(crate) expires_at: Instant,
    /// The session expiry (Unix ms) `expires_at` was computed from: when the session was
    /// extended since, a native leg moves `expires_at` by as much ([`LegState::renew`]).
    pub(crate) expiry_unix_ms: u64,
    pub(crate) limiter: Limiter,
    /// QUIC legs only; boxed, so that a UDP leg pays one pointer for it (legs are the relay's
    /// memory: `bench/` measures bytes per leg).
    pub(crate) path: Option<Box<Path>>,
    /// A TURN allocation's own state (its key, relayed address, answers); `None` for native
    /// legs.
    pub(crate) turn: Option<Box<crate::turn::Allocation>>,
}

/// Why a leg stopped being served, as found by [`LegState::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegStatus {
    /// Still bound here.
    Serving,
    /// Its session was revoked.
    Closed,
    /// It was re-bound to another endpoint.
    Moved,
    /// Its session's tokens expired.
    Expired,
    /// It sent nothing (media or KEEPALIVE) for longer than the idle timeout.
    Idle,
    /// The relay's drain deadline passed: the client must move to its backup relay.
    Evicted,
    /// Its QUIC connection was closed or timed out.
    Disconnected,
}

impl LegState {
    pub(crate) fn new(
        session: Arc<Session>,
        leg: u8,
        endpoint: Endpoint,
        now: Instant,
        (expires_at, expiry_unix_ms): (Instant, u64),
        limiter: Limiter,
    ) -> Self {
        Self {
            session,
            leg,
            endpoint,
            last_seen: now,
            expires_at,
            expiry_unix_ms,
            limiter,
            path: None,
            turn: None,
        }
    }

    /// The session this leg belongs to.
    pub fn session(&self) -> SessionId {
        self.session.id()
    }

    pub(crate) fn session_ref(&self) -> &Session {
        &self.session
    }

    /// The leg index.
    pub fn leg(&self) -> u8 {
        self.leg % crate::token::MAX_LEGS
    }

    /// The leg's slot in its session: its index, or for an extra TURN allocation of the leg,
    /// `index + 16k` (session.rs, `TURN_ALLOCATIONS_PER_LEG`).
    pub(crate) fn slot(&self) -> u8 {
        self.leg
    }

    /// The endpoint the leg is bound to.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// Whether the leg is still bound at its endpoint: `Closed` if its session (or it alone) was
    /// revoked, `Moved` if it was bound elsewhere since, else `Serving`. Expiry and idleness are
    /// left to [`LegState::check`], which the sweep runs.
    pub fn binding(&self) -> LegStatus {
        if self.session.is_closed_for(self.leg) {
            LegStatus::Closed
        } else if self.session.legs().get(self.leg) != Some(self.endpoint) {
            LegStatus::Moved
        } else {
            LegStatus::Serving
        }
    }

    /// Whether the leg is still served, at `now` / `now_unix_ms`.
    pub fn check(&self, now: Instant, now_unix_ms: u64, idle: Duration) -> LegStatus {
        let binding = self.binding();
        if binding != LegStatus::Serving {
            binding
        } else if self.session.expires_unix_ms() <= now_unix_ms || now >= self.expires_at {
            LegStatus::Expired
        // A TURN allocation lives by its lifetime and Refresh (RFC 8656 §7), which `expires_at`
        // holds: until it has a peer, a WebRTC client sends it nothing else (a call that rings
        // for 30 s would otherwise lose it).
        } else if !self.endpoint.is_turn() && now.saturating_duration_since(self.last_seen) >= idle
        {
            LegStatus::Idle
        } else {
            LegStatus::Serving
        }
    }

    /// Moves a native leg's `expires_at` by as much as its session was extended since it was
    /// computed (ExtendSession); returns whether it moved. The media path calls it only once
    /// `expires_at` has passed, so it pays nothing for extensions until then; the sweep calls it
    /// on every leg, so a silent leg is not ended at the old expiry. A TURN allocation's
    /// `expires_at` is its lifetime, which only a Refresh moves (RFC 8656 §7).
    pub(crate) fn renew(&mut self) -> bool {
        let until = self.session.expires_unix_ms();
        if self.turn.is_some() || until <= self.expiry_unix_ms {
            return false;
        }
        self.expires_at += Duration::from_millis(until - self.expiry_unix_ms);
        self.expiry_unix_ms = until;
        true
    }

    /// Notes a KEEPALIVE.
    pub(crate) fn touch(&mut self, now: Instant) {
        self.last_seen = now;
    }

    /// The media path: decides where one SRTP, SRTCP or DTLS datagram from this leg goes.
    /// `pkt` must already be classified as media and long enough.
    #[inline]
    pub(crate) fn forward(&mut self, now: Instant, pkt: &[u8], stats: &mut Stats) -> Verdict {
        let legs = self.session.legs();
        let own = legs.bound(self.leg);
        // The leg's binding's counters, where the relay counts (one branch otherwise).
        let counters = own.and_then(|(_, c)| c);
        if let Some(c) = counters {
            c.received(pkt.len());
        }
        if self.session.is_closed_for(self.leg) {
            return leg_dropped(counters, stats, DropReason::SessionClosed);
        }
        if now >= self.expires_at {
            // Past the expiry it was bound with: its session may have been extended since.
            self.renew();
            if now >= self.expires_at {
                return leg_dropped(counters, stats, DropReason::Expired);
            }
        }
        if own.map(|(ep, _)| ep) != Some(self.endpoint) {
            return leg_dropped(counters, stats, DropReason::Unbound);
        }
        // Any packet keeps the leg alive, admitted or not; the limiter refills for the time
        // since the previous one.
        let elapsed = now.saturating_duration_since(self.last_seen).as_secs_f32();
        self.last_seen = now;
        if !self.limiter.admit(elapsed, pkt.len()) {
            return leg_dropped(counters, stats, DropReason::RateLimited);
        }
        // Legs whose QUIC path is unproven get nothing: an address that has not shown it
        // receives must not be sent media in its name (docs/SECURITY.md §2).
        let withheld = legs.withheld_from(self.leg);
        if withheld > 0 {
            stats.count_drops(DropReason::UnprovenPath, withheld as u64);
        }
        let n = (legs.len() - 1 - withheld - legs.turn_legs()) as u64;
        if n == 0 {
            return if withheld > 0 {
                if let Some(c) = counters {
                    c.dropped();
                }
                Verdict::Drop(DropReason::UnprovenPath)
            } else {
                leg_dropped(counters, stats, DropReason::NoPeer)
            };
        }
        if counters.is_some() {
            legs.count_sent(self.leg, pkt.len());
        }
        stats.forwarded_packets += n;
        stats.forwarded_bytes += n * pkt.len() as u64;
        Verdict::Forward(Targets::new(legs, self.leg))
    }
}

fn dropped(stats: &mut Stats, reason: DropReason) -> Verdict {
    stats.count_drop(reason);
    Verdict::Drop(reason)
}

/// A drop of one of a bound leg's datagrams: counted for the relay and for the leg.
pub(crate) fn leg_dropped(
    counters: Option<&LegCounters>,
    stats: &mut Stats,
    reason: DropReason,
) -> Verdict {
    if let Some(c) = counters {
        c.dropped();
    }
    dropped(stats, reason)
}

/// Checks that a media datagram is long enough for its class.
#[inline]
pub fn media_ok(class: Class, pkt: &[u8]) -> bool {
    match class {
        Class::Rtp => pkt.len() >= wire::MIN_RTP_LEN,
        Class::Dtls => pkt.len() >= wire::MIN_DTLS_LEN,
        Class::Control | Class::Other => false,
    }
}
