//! The per-worker packet path: [`Relay`] turns each received datagram into a [`Verdict`], and the
//! node-wide [`Node`] holds what workers share.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::cookie::Cookies;
use crate::limit::{BindLimiter, Limiter};
use crate::session::{BindError, Directory, Endpoint, LegSet, Session};
use crate::stats::{BindResult, DropReason, Stats};
use crate::token::{KeyRing, SessionId, Ticket, VerifyError};
use crate::wire::{self, Bind, Class, ClientMessage, Encoded, ErrorCode};

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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            leg_idle: Duration::from_secs(30),
            sweep_interval: Duration::from_millis(250),
            binds_per_ip: 50,
            binds_per_worker: 20_000,
            cookie_lifetime: Duration::from_secs(10),
        }
    }
}

/// State shared by every worker and transport adapter of one relay node.
#[derive(Debug)]
pub struct Node {
    /// The session table.
    pub directory: Directory,
    keys: ArcSwap<KeyRing>,
    cookies: Cookies,
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
    fn new(reason: DropReason, code: ErrorCode) -> Self {
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
            directory: Directory::new(max_legs),
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

    fn mono_ms(&self, now: Instant) -> u64 {
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

    /// Starts (or stops) evicting: at their next sweep, workers and adapters send every bound
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

    /// Authenticates a BIND: its ticket and tag, expiry, and revocation.
    pub fn authenticate(&self, now: Instant, bind: &Bind<'_>) -> Result<Ticket, Refusal> {
        let ticket = self
            .keys
            .load()
            .verify(bind.ticket, bind.signed, bind.tag)
            .map_err(|e| match e {
                VerifyError::UnknownKey => {
                    Refusal::new(DropReason::UnknownKey, ErrorCode::Unauthorized)
                }
                VerifyError::Malformed(_) | VerifyError::BadTag => {
                    Refusal::new(DropReason::BadToken, ErrorCode::Unauthorized)
                }
            })?;
        if ticket.expires_unix_ms <= self.unix_ms(now) {
            return Err(Refusal::new(DropReason::Expired, ErrorCode::Expired));
        }
        if self.directory.is_revoked(ticket.session) {
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
    pub fn attach(
        &self,
        now: Instant,
        ticket: &Ticket,
        ep: Endpoint,
    ) -> Result<(LegState, Option<Endpoint>), Refusal> {
        let bound = self.directory.bind(ticket, ep).map_err(|e| match e {
            BindError::SessionClosed => {
                Refusal::new(DropReason::SessionClosed, ErrorCode::SessionClosed)
            }
            BindError::RelayFull => Refusal::new(DropReason::RelayFull, ErrorCode::RelayFull),
            BindError::Draining => Refusal::new(DropReason::Draining, ErrorCode::Draining),
        })?;
        let left = ticket.expires_unix_ms.saturating_sub(self.unix_ms(now));
        // A leg that moves (rebinds) starts with empty rate buckets, so that binding again cannot
        // refill a burst; a new leg starts with a full second of burst.
        let limiter = if bound.previous.is_some() {
            Limiter::drained(ticket.limits)
        } else {
            Limiter::new(ticket.limits)
        };
        let leg = LegState {
            session: bound.session,
            leg: ticket.leg,
            endpoint: ep,
            last_seen: now,
            expires_at: now + Duration::from_millis(left),
            limiter,
        };
        Ok((leg, bound.previous))
    }

    /// Unbinds `leg` if it is still bound where it was.
    pub fn detach(&self, leg: &LegState) -> bool {
        self.directory.unbind(&leg.session, leg.leg, leg.endpoint)
    }

    fn idle_timeout_secs(&self) -> u16 {
        self.config.leg_idle.as_secs().min(u64::from(u16::MAX)) as u16
    }
}

/// One bound leg, as the worker or connection that receives its packets holds it.
#[derive(Debug)]
pub struct LegState {
    session: Arc<Session>,
    leg: u8,
    endpoint: Endpoint,
    last_seen: Instant,
    /// The ticket's expiry on the monotonic clock: checked on every packet, cheaply.
    expires_at: Instant,
    limiter: Limiter,
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
    /// It sent nothing for longer than the idle timeout.
    Idle,
    /// The relay's drain deadline passed: the client must move to its backup relay.
    Evicted,
}

impl LegState {
    /// The session this leg belongs to.
    pub fn session(&self) -> SessionId {
        self.session.id()
    }

    /// The leg index.
    pub fn leg(&self) -> u8 {
        self.leg
    }

    /// The endpoint the leg is bound to.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// Whether the leg is still bound at its endpoint: `Closed` if its session was revoked,
    /// `Moved` if it was bound elsewhere since, else `Serving`. Expiry and idleness are left to
    /// [`LegState::check`], which the sweep runs.
    pub fn binding(&self) -> LegStatus {
        if self.session.is_closed() {
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
        } else if self.session.expires_unix_ms() <= now_unix_ms {
            LegStatus::Expired
        } else if now.saturating_duration_since(self.last_seen) >= idle {
            LegStatus::Idle
        } else {
            LegStatus::Serving
        }
    }

    /// Notes a KEEPALIVE.
    pub fn touch(&mut self, now: Instant) {
        self.last_seen = now;
    }

    /// The media path: decides where one SRTP, SRTCP or DTLS datagram from this leg goes.
    /// `pkt` must already be classified as media and long enough.
    #[inline]
    pub fn forward(&mut self, now: Instant, pkt: &[u8], stats: &mut Stats) -> Verdict {
        if self.session.is_closed() {
            return self.dropped(stats, DropReason::SessionClosed);
        }
        if now >= self.expires_at {
            return self.dropped(stats, DropReason::Expired);
        }
        let legs = self.session.legs();
        if legs.get(self.leg) != Some(self.endpoint) {
            return self.dropped(stats, DropReason::Unbound);
        }
        // Any packet keeps the leg alive, admitted or not; the limiter refills for the time
        // since the previous one.
        let elapsed = now.saturating_duration_since(self.last_seen).as_secs_f32();
        self.last_seen = now;
        if !self.limiter.admit(elapsed, pkt.len()) {
            return self.dropped(stats, DropReason::RateLimited);
        }
        let n = legs.len() as u64 - 1;
        if n == 0 {
            return self.dropped(stats, DropReason::NoPeer);
        }
        stats.forwarded_packets += n;
        stats.forwarded_bytes += n * pkt.len() as u64;
        Verdict::Forward(Targets {
            legs,
            except: self.leg,
        })
    }

    fn dropped(&self, stats: &mut Stats, reason: DropReason) -> Verdict {
        stats.drop(reason);
        Verdict::Drop(reason)
    }
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

/// Where a forwarded datagram goes: every other bound leg of its session.
#[derive(Debug)]
pub struct Targets {
    legs: arc_swap::Guard<Arc<LegSet>>,
    except: u8,
}

impl Targets {
    /// The endpoints to send the datagram to, unmodified.
    #[inline]
    pub fn iter(&self) -> impl Iterator<Item = Endpoint> + '_ {
        self.legs.others(self.except)
    }

    /// How many endpoints.
    pub fn len(&self) -> usize {
        self.legs.len() - 1
    }

    /// True if there are none (never, for a `Forward` verdict).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What to do with a received datagram.
#[derive(Debug)]
pub enum Verdict {
    /// Send the received bytes, unmodified, to each target.
    Forward(Targets),
    /// A control message, handled; any answer is queued for [`Relay::poll_transmit`].
    Control,
    /// Drop it (already counted).
    Drop(DropReason),
}

/// Something that happened to a leg, for the shell to log or act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A leg was bound (or moved) to `peer`.
    Bound {
        /// Its session.
        session: SessionId,
        /// Its index.
        leg: u8,
        /// The client address.
        peer: SocketAddr,
        /// True if the leg was bound elsewhere before.
        moved: bool,
    },
    /// A leg stopped being served through this worker.
    Unbound {
        /// Its session.
        session: SessionId,
        /// Its index.
        leg: u8,
        /// The client address.
        peer: SocketAddr,
        /// Why.
        why: LegStatus,
    },
}

/// Events kept for the shell at most; beyond this the oldest are discarded (they only feed logs).
const MAX_EVENTS: usize = 1024;

/// A control message the relay originates.
#[derive(Debug, Clone, Copy)]
pub struct Transmit {
    /// Where to send it.
    pub dst: SocketAddr,
    /// What to send.
    pub msg: Encoded,
}

/// A client address as a hash key: the address is hashed as one or two integers rather than
/// field by field (which `SocketAddr`'s own `Hash` does, with a length prefix for the IP), a
/// third of the cost of the per-packet lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerKey(pub(crate) SocketAddr);

impl std::hash::Hash for PeerKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self.0 {
            SocketAddr::V4(a) => {
                state.write_u64(u64::from(a.ip().to_bits()) << 16 | u64::from(a.port()))
            }
            SocketAddr::V6(a) => {
                state.write_u128(a.ip().to_bits());
                state.write_u32(u32::from(a.port()) | (a.scope_id() << 16));
            }
        }
    }
}

/// Forwarding state for one UDP IO worker. Performs no I/O and never reads the clock.
///
/// After every `handle_*` call (or batch of calls), drain [`Relay::poll_transmit`], then
/// [`Relay::poll_event`], then re-arm the timer from [`Relay::poll_timeout`].
#[derive(Debug)]
pub struct Relay {
    node: Arc<Node>,
    /// Keyed by client address, which an attacker chooses: keep SipHash (randomly keyed), over
    /// a packed key ([`PeerKey`]).
    by_peer: HashMap<PeerKey, LegState>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    binds: BindLimiter,
    stats: Stats,
    next_sweep: Instant,
}

impl Relay {
    /// A worker of `node`.
    pub fn new(node: Arc<Node>, now: Instant) -> Self {
        let next_sweep = now + node.config.sweep_interval;
        let binds = BindLimiter::new(node.config.binds_per_ip, node.config.binds_per_worker, now);
        Self {
            node,
            by_peer: HashMap::new(),
            transmits: VecDeque::with_capacity(64),
            events: VecDeque::new(),
            binds,
            stats: Stats::default(),
            next_sweep,
        }
    }

    /// This worker's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Counts datagrams the shell failed to send.
    pub fn count_send_errors(&mut self, n: u64) {
        self.stats.send_errors += n;
    }

    /// Counts a datagram the shell dropped before the core saw it (for example, too large).
    pub fn count_shell_drop(&mut self, len: usize, reason: DropReason) {
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += len as u64;
        self.stats.drop(reason);
    }

    /// Legs bound through this worker.
    pub fn local_legs(&self) -> usize {
        self.by_peer.len()
    }

    /// Handles one datagram received from `from`.
    #[inline]
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, pkt: &[u8]) -> Verdict {
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += pkt.len() as u64;
        let class = wire::classify(pkt);
        match class {
            Class::Rtp | Class::Dtls => {
                if !media_ok(class, pkt) {
                    self.stats.drop(DropReason::Malformed);
                    return Verdict::Drop(DropReason::Malformed);
                }
                let Some(leg) = self.by_peer.get_mut(&PeerKey(from)) else {
                    self.stats.drop(DropReason::Unbound);
                    return Verdict::Drop(DropReason::Unbound);
                };
                let verdict = leg.forward(now, pkt, &mut self.stats);
                match verdict {
                    Verdict::Drop(DropReason::SessionClosed) => {
                        self.forget_leg(from, LegStatus::Closed);
                    }
                    Verdict::Drop(DropReason::Unbound) => self.forget_leg(from, LegStatus::Moved),
                    Verdict::Drop(DropReason::Expired) => self.forget_leg(from, LegStatus::Expired),
                    _ => {}
                }
                verdict
            }
            Class::Control => self.handle_control(now, from, pkt),
            Class::Other => {
                self.stats.drop(DropReason::UnknownType);
                Verdict::Drop(DropReason::UnknownType)
            }
        }
    }

    fn handle_control(&mut self, now: Instant, from: SocketAddr, pkt: &[u8]) -> Verdict {
        let Ok(msg) = wire::parse_client(pkt) else {
            // No answer: a malformed message may come from a spoofed source.
            self.stats.drop(DropReason::Malformed);
            return Verdict::Drop(DropReason::Malformed);
        };
        match msg {
            // A leg whose session was revoked, or that was bound elsewhere since (perhaps through
            // another worker), is gone even if this worker's sweep has not noticed yet: answer
            // as media from it would find, never KEEPALIVE_ACK, which would tell the client that
            // the relay still serves it. (Found by the `datagram` fuzz target.)
            ClientMessage::Keepalive { txn } => {
                match self.by_peer.get(&PeerKey(from)).map(LegState::binding) {
                    Some(LegStatus::Serving) => {
                        if let Some(leg) = self.by_peer.get_mut(&PeerKey(from)) {
                            leg.touch(now);
                        }
                        self.send(from, wire::keepalive_ack(txn));
                        Verdict::Control
                    }
                    Some(LegStatus::Closed) => {
                        self.stats.drop(DropReason::SessionClosed);
                        // CLOSE, as long as the KEEPALIVE: no amplification.
                        self.forget_leg(from, LegStatus::Closed);
                        Verdict::Drop(DropReason::SessionClosed)
                    }
                    // `Moved`: `binding` returns nothing else.
                    Some(_) => {
                        self.forget_leg(from, LegStatus::Moved);
                        self.not_bound(from, txn)
                    }
                    None => self.not_bound(from, txn),
                }
            }
            ClientMessage::Bind(bind) => self.handle_bind(now, from, &bind),
        }
    }

    /// Answers a KEEPALIVE from an address that holds no leg.
    fn not_bound(&mut self, from: SocketAddr, txn: [u8; 8]) -> Verdict {
        self.stats.drop(DropReason::Unbound);
        // As long as the KEEPALIVE itself: no amplification.
        self.send(from, wire::error(txn, ErrorCode::NotBound));
        Verdict::Drop(DropReason::Unbound)
    }

    fn handle_bind(&mut self, now: Instant, from: SocketAddr, bind: &Bind<'_>) -> Verdict {
        // Before any cryptography: a flood of binds costs a hash lookup each, and gets no answer.
        if !self.binds.admit(now, from.ip()) {
            self.stats.binds[BindResult::Refused as usize] += 1;
            self.stats.drop(DropReason::BindRateLimited);
            return Verdict::Drop(DropReason::BindRateLimited);
        }
        let node = self.node.clone();
        let refuse = |this: &mut Self, r: Refusal| {
            this.stats.binds[BindResult::Refused as usize] += 1;
            this.stats.drop(r.reason);
            this.send(from, wire::error(bind.txn, r.code));
            Verdict::Drop(r.reason)
        };
        let ticket = match node.authenticate(now, bind) {
            Ok(t) => t,
            Err(r) => return refuse(self, r),
        };
        let cookie_ok = bind
            .cookie
            .map(|c| node.cookies.check(node.mono_ms(now), from, bind.ticket, c));
        match cookie_ok {
            None | Some(Err(_)) => {
                if cookie_ok.is_some() {
                    self.stats.drop(DropReason::BadCookie);
                }
                self.stats.binds[BindResult::Challenged as usize] += 1;
                let cookie = node.cookies.mint(node.mono_ms(now), from, bind.ticket);
                self.send(from, wire::challenge(bind.txn, &cookie));
                return Verdict::Control;
            }
            Some(Ok(())) => {}
        }
        let (leg, previous) = match node.attach(now, &ticket, Endpoint::Udp(from)) {
            Ok(x) => x,
            Err(r) => return refuse(self, r),
        };
        // The leg moved from another address this worker serves: forget that one.
        if let Some(Endpoint::Udp(old)) = previous
            && old != from
        {
            self.by_peer.remove(&PeerKey(old));
        }
        // This address held another leg: that leg is unbound, as one address holds one leg.
        if let Some(old) = self.by_peer.insert(PeerKey(from), leg)
            && (old.session() != ticket.session || old.leg() != ticket.leg)
        {
            node.detach(&old);
        }
        self.stats.binds[BindResult::Bound as usize] += 1;
        self.send(from, wire::bind_ok(bind.txn, node.idle_timeout_secs()));
        let moved = previous.is_some_and(|p| p != Endpoint::Udp(from));
        self.event(Event::Bound {
            session: ticket.session,
            leg: ticket.leg,
            peer: from,
            moved,
        });
        Verdict::Control
    }

    /// Forgets the leg `from` held on this worker, which its session's revocation (`Closed`) or
    /// a bind elsewhere (`Moved`) ended; tells the client of a closed session.
    fn forget_leg(&mut self, from: SocketAddr, why: LegStatus) {
        let Some(leg) = self.by_peer.remove(&PeerKey(from)) else {
            return;
        };
        let session = leg.session();
        match why {
            LegStatus::Closed => self.send(from, wire::close(ErrorCode::SessionClosed, session.0)),
            LegStatus::Expired => {
                self.node.detach(&leg);
                self.send(from, wire::close(ErrorCode::Expired, session.0));
            }
            _ => {}
        }
        self.event(Event::Unbound {
            session,
            leg: leg.leg(),
            peer: from,
            why,
        });
    }

    fn event(&mut self, e: Event) {
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    fn send(&mut self, dst: SocketAddr, msg: Encoded) {
        self.stats.control_tx_packets += 1;
        self.stats.control_tx_bytes += msg.as_bytes().len() as u64;
        self.transmits.push_back(Transmit { dst, msg });
    }

    /// Sweeps this worker's legs when due: unbinds idle and expired legs, forgets moved ones,
    /// tells the clients of closed and expired sessions, and, while the node is evicting, tells
    /// every client to move to its backup relay.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + self.node.config.sweep_interval;
        self.binds.forget_idle(now);
        let node = &self.node;
        let now_unix = node.unix_ms(now);
        let idle = node.config.leg_idle;
        let evicting = node.is_evicting();
        let mut ended = Vec::new();
        self.by_peer.retain(|addr, leg| {
            let why = match leg.check(now, now_unix, idle) {
                LegStatus::Serving if evicting => LegStatus::Evicted,
                why => why,
            };
            if why == LegStatus::Serving {
                return true;
            }
            if matches!(
                why,
                LegStatus::Expired | LegStatus::Idle | LegStatus::Evicted
            ) {
                node.detach(leg);
            }
            ended.push(Event::Unbound {
                session: leg.session(),
                leg: leg.leg(),
                peer: addr.0,
                why,
            });
            false
        });
        for e in ended {
            if let Event::Unbound {
                session, peer, why, ..
            } = e
            {
                let code = match why {
                    LegStatus::Closed => Some(ErrorCode::SessionClosed),
                    LegStatus::Expired => Some(ErrorCode::Expired),
                    LegStatus::Evicted => Some(ErrorCode::Draining),
                    LegStatus::Serving | LegStatus::Moved | LegStatus::Idle => None,
                };
                if let Some(code) = code {
                    self.send(peer, wire::close(code, session.0));
                }
            }
            self.event(e);
        }
    }

    /// When [`Relay::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next_sweep)
    }

    /// The next event, for logs.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next control message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }
}

#[cfg(test)]
mod tests;
