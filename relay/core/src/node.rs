//! What every forwarding table of one relay node shares: the session table, the key ring, the
//! cookie secret, the clock's tie to Unix time, the drain state and the packet-path tunables.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::cookie::Cookies;
use crate::leg::LegState;
use crate::limit::Limiter;
use crate::session::{BindError, Directory, Ended, Endpoint};
use crate::stats::DropReason;
use crate::token::{KeyRing, SessionId, Ticket, VerifyError};
use crate::wire::{Bind, EXPORTER_LEN, ErrorCode};

/// Tunables of the packet path.
#[derive(Debug, Clone)]
pub struct Config {
    /// A bound leg that sends nothing (media or KEEPALIVE) for this long is unbound.
    pub leg_idle: Duration,
    /// How often each worker sweeps its legs for expiry, idleness and closed sessions.
    pub sweep_interval: Duration,
    /// BIND messages each source IP address may send per second (a burst of twice as many is
    /// allowed); beyond that they are dropped unanswered, before any cryptography.
    pub binds_per_ip: u32,
    /// BIND messages each worker handles per second from all sources together.
    pub binds_per_worker: u32,
    /// How long a CHALLENGE's cookie stays valid: the longest a client may take between the
    /// CHALLENGE and its second BIND (docs/PROTOCOL.md says 10 s, the default). Shorter
    /// lifetimes narrow the window in which a captured cookie is worth anything (it is only good
    /// from the address it was issued to, with the same ticket, on this relay process), at the
    /// cost of failing clients whose round trip is longer. Tests shorten it to see expiry without
    /// waiting 10 s.
    pub cookie_lifetime: Duration,
    /// The relay's public IP for TURN: relayed addresses are this IP with a port naming a leg.
    /// `None`: no TURN (STUN and ChannelData are dropped as unknown types).
    pub turn_ip: Option<std::net::IpAddr>,
    /// Count what each bound leg carries (media in, out, dropped) for the controller's
    /// `GetSession`: 192 bytes more per bound leg, and a few atomic additions per packet.
    pub leg_counters: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            leg_idle: Duration::from_secs(30),
            sweep_interval: Duration::from_millis(250),
            binds_per_ip: 50,
            binds_per_worker: 20_000,
            cookie_lifetime: Duration::from_secs(10),
            turn_ip: None,
            leg_counters: false,
        }
    }
}

/// State shared by every forwarding table (UDP workers, QUIC connections) of one relay node.
#[derive(Debug)]
pub struct Node {
    /// The session table.
    pub directory: Directory,
    keys: ArcSwap<KeyRing>,
    pub(crate) cookies: Cookies,
    epoch: Instant,
    unix_ms_at_epoch: AtomicU64,
    evicting: AtomicBool,
    config: Config,
}

/// Why a bind was refused: what to count, and what to tell the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The drop reason counted.
    pub reason: DropReason,
    /// The error code answered.
    pub code: ErrorCode,
}

impl Refusal {
    pub(crate) fn new(reason: DropReason, code: ErrorCode) -> Self {
        Self { reason, code }
    }
}

impl Node {
    /// A node verifying tokens with `keys`. `cookie_secret` must be random and private to this
    /// process; `now` and `unix_ms` tie the monotonic clock to the wall clock that token
    /// expiries use (refresh with [`Node::set_wall_clock`]).
    pub fn new(
        config: Config,
        keys: KeyRing,
        max_legs: usize,
        cookie_secret: [u8; 32],
        now: Instant,
        unix_ms: u64,
    ) -> Self {
        Self {
            directory: Directory::new(max_legs).with_leg_counters(config.leg_counters),
            keys: ArcSwap::from_pointee(keys),
            cookies: Cookies::new(cookie_secret, config.cookie_lifetime),
            epoch: now,
            unix_ms_at_epoch: AtomicU64::new(unix_ms),
            evicting: AtomicBool::new(false),
            config,
        }
    }

    /// The packet-path configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Re-ties the monotonic clock to the wall clock (call about once a second).
    pub fn set_wall_clock(&self, now: Instant, unix_ms: u64) {
        let since = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.unix_ms_at_epoch
            .store(unix_ms.saturating_sub(since), Ordering::Relaxed);
    }

    /// Unix milliseconds at `now`.
    pub fn unix_ms(&self, now: Instant) -> u64 {
        self.unix_ms_at_epoch.load(Ordering::Relaxed)
            + now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The instant `mono_ms` milliseconds after the node's epoch ([`Node::mono_ms`]).
    pub fn instant_at(&self, mono_ms: u64) -> Instant {
        self.epoch + std::time::Duration::from_millis(mono_ms)
    }

    /// `now` as milliseconds since the node's epoch: the clock of cookies and of
    /// [`crate::session::Session::note_fast`].
    pub fn mono_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Replaces the key ring (rotation). Legs already bound stay bound.
    pub fn set_keys(&self, keys: KeyRing) {
        self.keys.store(Arc::new(keys));
    }

    /// The key ring in use.
    pub fn keys(&self) -> Arc<KeyRing> {
        self.keys.load_full()
    }

    /// Revokes a session: see [`Directory::revoke`].
    pub fn revoke(&self, id: SessionId, expires_unix_ms: u64) -> Vec<Endpoint> {
        self.directory.revoke(id, expires_unix_ms)
    }

    /// Extends a session: see [`Directory::extend`].
    pub fn extend(&self, id: SessionId, expires_unix_ms: u64) {
        self.directory.extend(id, expires_unix_ms)
    }

    /// Revokes one leg of a session: see [`Directory::revoke_leg`].
    pub fn revoke_leg(&self, id: SessionId, leg: u8, expires_unix_ms: u64) -> Vec<Endpoint> {
        self.directory.revoke_leg(id, leg, expires_unix_ms)
    }

    /// Starts (or stops) evicting: at their next sweep, forwarding tables send every bound
    /// leg a CLOSE `DRAINING` (move to your backup relay) and unbind it. The end of a drain.
    pub fn set_evicting(&self, evicting: bool) {
        self.evicting.store(evicting, Ordering::Relaxed);
    }

    /// True while evicting.
    pub fn is_evicting(&self) -> bool {
        self.evicting.load(Ordering::Relaxed)
    }

    /// Housekeeping not tied to a worker: forgets revocations of expired tokens.
    pub fn tick(&self, now: Instant) {
        self.directory.forget_expired_revocations(self.unix_ms(now));
    }

    /// Authenticates a BIND: its ticket and tag, expiry, and revocation. `exporter` is the TLS
    /// exporter value of the connection a channel-bound BIND arrived on: the tag covers it too.
    pub fn authenticate(
        &self,
        now: Instant,
        bind: &Bind<'_>,
        exporter: Option<&[u8; EXPORTER_LEN]>,
    ) -> Result<Ticket, Refusal> {
        let keys = self.keys.load();
        let verified = match exporter {
            Some(x) => keys.verify_parts(bind.ticket, &[bind.signed, x], bind.tag),
            None => keys.verify(bind.ticket, bind.signed, bind.tag),
        };
        let ticket = verified.map_err(|e| match e {
            VerifyError::UnknownKey => {
                Refusal::new(DropReason::UnknownKey, ErrorCode::Unauthorized)
            }
            VerifyError::Malformed(_) | VerifyError::BadTag => {
                Refusal::new(DropReason::BadToken, ErrorCode::Unauthorized)
            }
        })?;
        if self.directory.expiry(&ticket) <= self.unix_ms(now) {
            return Err(Refusal::new(DropReason::Expired, ErrorCode::Expired));
        }
        if self.directory.refuses(&ticket) {
            return Err(Refusal::new(
                DropReason::SessionClosed,
                ErrorCode::SessionClosed,
            ));
        }
        Ok(ticket)
    }

    /// Binds an authenticated ticket's leg to `ep`, whose reachability the caller has checked
    /// (a cookie for UDP, the handshake for QUIC). Returns the leg's state and the endpoint it
    /// was bound to before, if it moved.
    pub(crate) fn bind_leg(
        &self,
        now: Instant,
        ticket: &Ticket,
        ep: Endpoint,
    ) -> Result<(LegState, Option<Endpoint>), Refusal> {
        let bound = if ep.is_turn() {
            self.directory.bind_turn(ticket, ep)
        } else {
            self.directory.bind(ticket, ep).map(|b| (b, ticket.leg))
        };
        let (bound, slot) = bound.map_err(|e| match e {
            BindError::SessionClosed => {
                Refusal::new(DropReason::SessionClosed, ErrorCode::SessionClosed)
            }
            BindError::RelayFull => Refusal::new(DropReason::RelayFull, ErrorCode::RelayFull),
            BindError::QuotaReached => {
                Refusal::new(DropReason::TurnQuotaReached, ErrorCode::RelayFull)
            }
            BindError::Draining => Refusal::new(DropReason::Draining, ErrorCode::Draining),
        })?;
        let expiry = bound.session.expires_unix_ms();
        let left = expiry.saturating_sub(self.unix_ms(now));
        // A leg that moves (rebinds) starts with empty rate buckets, so that binding again cannot
        // refill a burst; a new leg starts with a full second of burst.
        let limiter = if bound.previous.is_some() {
            Limiter::drained(ticket.limits)
        } else {
            Limiter::new(ticket.limits)
        };
        let leg = LegState::new(
            bound.session,
            slot,
            ep,
            now,
            (now + Duration::from_millis(left), expiry),
            limiter,
        );
        Ok((leg, bound.previous))
    }

    /// Unbinds `leg` if it is still bound where it was.
    pub(crate) fn unbind_leg(&self, leg: &LegState, why: Ended) -> bool {
        self.directory
            .unbind(leg.session_ref(), leg.slot(), leg.endpoint(), why)
    }

    pub(crate) fn idle_timeout_secs(&self) -> u16 {
        self.config.leg_idle.as_secs().min(u64::from(u16::MAX)) as u16
    }
}
