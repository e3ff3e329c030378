//! The forwarding table: the one state machine that every door into the relay (UDP workers, QUIC
//! connections) drives. A shell reads, calls one `handle_*`, and carries out the answer: a
//! [`Verdict`] for the received datagram, then [`Transmit`]s and [`Event`]s.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::leg::{LegState, LegStatus, Path, Probing, media_ok, same_endpoint};
use crate::limit::BindLimiter;
use crate::node::{Node, Refusal};
use crate::session::{Ended, Endpoint, LegSet};
use crate::stats::{BindResult, DropReason, Stats};
use crate::stun;
use crate::token::SessionId;
pub use crate::turn::{Frame, Relayed};
use crate::wire::{self, Bind, COOKIE_LEN, Class, ClientMessage, EXPORTER_LEN, Encoded, ErrorCode};

/// Where a forwarded datagram goes: every other reachable bound leg of its session.
#[derive(Debug)]
pub struct Targets {
    legs: arc_swap::Guard<Arc<LegSet>>,
    except: u8,
}

impl Targets {
    pub(crate) fn new(legs: arc_swap::Guard<Arc<LegSet>>, except: u8) -> Self {
        Self { legs, except }
    }

    /// The endpoints to send the datagram to, unmodified.
    #[inline]
    pub fn iter(&self) -> impl Iterator<Item = Endpoint> + '_ {
        self.legs.others(self.except)
    }

    /// How many endpoints.
    pub fn len(&self) -> usize {
        self.legs.len() - 1 - self.legs.withheld_from(self.except) - self.legs.turn_legs()
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
    /// Send the payload of a TURN datagram to the one allocation it names, framed for it
    /// ([`Relayed::datagram`]).
    Relay(Relayed),
    /// A control message, handled; any answer is queued for
    /// [`ForwardingTable::poll_transmit`].
    Control,
    /// Drop it (already counted); any answer is queued for [`ForwardingTable::poll_transmit`].
    Drop(DropReason),
}

/// Something that happened to a leg, for the shell to log or act on. Carries endpoints, which
/// may hold client addresses: log them only redacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A leg was bound (or moved) to `endpoint`.
    Bound {
        /// Its session.
        session: SessionId,
        /// Its index.
        leg: u8,
        /// Where.
        endpoint: Endpoint,
        /// True if the leg was bound elsewhere before.
        moved: bool,
    },
    /// A leg stopped being served through this table.
    Unbound {
        /// Its session.
        session: SessionId,
        /// Its index.
        leg: u8,
        /// Where it was bound.
        endpoint: Endpoint,
        /// Why.
        why: LegStatus,
    },
}

/// Events kept for the shell at most; beyond this the oldest are discarded (they only feed logs).
const MAX_EVENTS: usize = 1024;

/// How long after a PROBE the relay sends another while the path stays unproven.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// PROBEs sent at most between two proofs of a QUIC leg's path: whatever the client does (moving
/// to one address or hopping between many, forged ones among them), the relay sends at most this
/// many small datagrams before the client answers one.
const MAX_PROBES: u8 = 4;

/// A message the relay originates: Veil's own control messages, or STUN answers to TURN
/// clients.
#[derive(Debug, Clone, Copy)]
pub enum Message {
    /// A Veil control message (docs/PROTOCOL.md).
    Veil(Encoded),
    /// A STUN message (an answer to a TURN request).
    Stun(stun::Builder),
}

impl Message {
    /// The bytes to send.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Veil(m) => m.as_bytes(),
            Self::Stun(m) => m.as_bytes(),
        }
    }
}

/// A control message the relay originates.
#[derive(Debug, Clone, Copy)]
pub struct Transmit {
    /// Where to send it.
    pub dst: Endpoint,
    /// What to send.
    pub msg: Message,
    /// True for answers to binds and for CLOSE, which a QUIC shell sends on the leg's control
    /// stream (reliably, in order); false for messages a QUIC shell sends as datagrams
    /// (KEEPALIVE_ACK, PROBE, errors answering a datagram). UDP sends every one as a datagram.
    pub reliable: bool,
}

/// An endpoint as a hash key: a UDP address is hashed as one or two integers rather than field
/// by field (which `SocketAddr`'s own `Hash` does, with a length prefix for the IP), a third of
/// the cost of the per-packet lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EndpointKey(pub(crate) Endpoint);

impl std::hash::Hash for EndpointKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self.0 {
            Endpoint::Udp(SocketAddr::V4(a)) => {
                state.write_u64(u64::from(a.ip().to_bits()) << 16 | u64::from(a.port()))
            }
            Endpoint::Udp(SocketAddr::V6(a)) => {
                state.write_u128(a.ip().to_bits());
                state.write_u32(u32::from(a.port()) | (a.scope_id() << 16));
            }
            Endpoint::Quic(c) => {
                state.write_u8(0xff);
                state.write_u64(c.0);
            }
            // As a UDP address, one bit apart (TURN's ChannelData path looks up once a packet).
            Endpoint::TurnUdp(SocketAddr::V4(a)) => {
                state.write_u64(u64::from(a.ip().to_bits()) << 16 | u64::from(a.port()) | 1 << 63)
            }
            Endpoint::TurnUdp(SocketAddr::V6(a)) => {
                state.write_u128(a.ip().to_bits());
                state.write_u32(u32::from(a.port()) | (a.scope_id() << 16));
                state.write_u8(0xfe);
            }
            Endpoint::TurnTcp(c) => {
                state.write_u8(0xfd);
                state.write_u64(c.0);
            }
            Endpoint::TurnTls(c) => {
                state.write_u8(0xfc);
                state.write_u64(c.0);
            }
        }
    }
}

/// Where a table takes its bind budget from: its own limiter (a UDP worker), or one shared by
/// many tables (QUIC connections, one table each).
#[derive(Debug)]
pub(crate) enum Binds {
    Own(BindLimiter),
    Shared(Arc<Mutex<BindLimiter>>),
}

impl Binds {
    pub(crate) fn admit(&mut self, now: Instant, from: SocketAddr) -> bool {
        match self {
            Self::Own(l) => l.admit(now, from.ip()),
            // A panic while holding the lock leaves buckets that are still consistent.
            Self::Shared(l) => l
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(now, from.ip()),
        }
    }

    fn forget_idle(&mut self, now: Instant) {
        match self {
            Self::Own(l) => l.forget_idle(now),
            // The shared limiter is swept by its owner.
            Self::Shared(_) => {}
        }
    }
}

/// How a BIND proves that its sender is the token's holder, here and now.
#[derive(Debug, Clone, Copy)]
enum Proof<'a> {
    /// UDP: the cookie round (return routability for this source address).
    Cookie,
    /// QUIC: the tag covers this connection's TLS exporter value; the handshake (with Retry)
    /// proved the address.
    Channel(&'a [u8; EXPORTER_LEN]),
}

/// The per-worker forwarding table: the legs bound through one UDP worker or one QUIC
/// connection, and everything the relay decides about a datagram. Performs no I/O and never
/// reads the clock.
///
/// After every `handle_*` call (or batch of calls), drain [`ForwardingTable::poll_transmit`],
/// then [`ForwardingTable::poll_event`], then re-arm the timer from
/// [`ForwardingTable::poll_timeout`].
#[derive(Debug)]
pub struct ForwardingTable {
    pub(crate) node: Arc<Node>,
    /// Keyed by endpoint, which for UDP an attacker chooses: keep SipHash (randomly keyed), over
    /// a packed key ([`EndpointKey`]).
    pub(crate) legs: HashMap<EndpointKey, LegState>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    pub(crate) binds: Binds,
    pub(crate) stats: Stats,
    /// What TURN clients sent and were sent, drops and allocations (transport "turn-udp").
    pub(crate) turn_stats: Stats,
    next_sweep: Instant,
}

impl ForwardingTable {
    /// A table of `node` with a bind limiter of its own (a UDP worker).
    pub fn new(node: Arc<Node>, now: Instant) -> Self {
        let binds = BindLimiter::new(
            node.config().binds_per_ip,
            node.config().binds_per_worker,
            now,
        );
        Self::with_binds(node, now, Binds::Own(binds))
    }

    /// A table of `node` that takes its bind budget from `binds`, shared with other tables (one
    /// QUIC connection's; the owner of `binds` calls [`BindLimiter::forget_idle`]).
    pub fn with_shared_binds(
        node: Arc<Node>,
        now: Instant,
        binds: Arc<Mutex<BindLimiter>>,
    ) -> Self {
        Self::with_binds(node, now, Binds::Shared(binds))
    }

    fn with_binds(node: Arc<Node>, now: Instant, binds: Binds) -> Self {
        let next_sweep = now + node.config().sweep_interval;
        Self {
            node,
            legs: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            binds,
            stats: Stats::default(),
            turn_stats: Stats::default(),
            next_sweep,
        }
    }

    /// This table's counters since it was made (or last taken).
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// This table's TURN counters: datagrams from TURN clients, what was relayed to TURN
    /// allocations, TURN answers, drops and allocations (counted in neither of the others).
    pub fn turn_stats(&self) -> &Stats {
        &self.turn_stats
    }

    /// Takes this table's counters, leaving zeros: for shells that add deltas into shared
    /// counters.
    pub fn take_stats(&mut self) -> Stats {
        std::mem::take(&mut self.stats)
    }

    /// Takes this table's TURN counters, leaving zeros (a TURN connection's shell adds them into
    /// its transport's).
    pub fn take_turn_stats(&mut self) -> Stats {
        std::mem::take(&mut self.turn_stats)
    }

    /// Counts datagrams the shell failed to send.
    pub fn count_send_errors(&mut self, n: u64) {
        self.stats.send_errors += n;
    }

    /// Counts a datagram the shell dropped before the core saw it (for example, too large).
    pub fn count_shell_drop(&mut self, len: usize, reason: DropReason) {
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += len as u64;
        self.stats.count_drop(reason);
    }

    /// Legs bound through this table.
    pub fn local_legs(&self) -> usize {
        self.legs.len()
    }

    /// Whether `ep` holds a leg in this table.
    pub fn serves(&self, ep: Endpoint) -> bool {
        self.legs.contains_key(&EndpointKey(ep))
    }

    /// Handles one datagram received from `from`: a UDP datagram on the media port, or a QUIC
    /// DATAGRAM frame on a connection.
    #[inline]
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: impl Into<Endpoint>,
        pkt: &[u8],
    ) -> Verdict {
        let from = from.into();
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += pkt.len() as u64;
        let class = wire::classify(pkt);
        match class {
            Class::Rtp | Class::Dtls => {
                if !media_ok(class, pkt) {
                    self.stats.count_drop(DropReason::Malformed);
                    return Verdict::Drop(DropReason::Malformed);
                }
                let Some(leg) = self.legs.get_mut(&EndpointKey(from)) else {
                    self.stats.count_drop(DropReason::Unbound);
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
            // STUN (0-3) and ChannelData (0x40-0x4F) from a UDP client: TURN.
            Class::Other => match (from, pkt.first()) {
                (Endpoint::Udp(addr), Some(0..=3 | 0x40..=0x4F)) => {
                    self.handle_turn(now, addr, pkt)
                }
                _ => {
                    self.stats.count_drop(DropReason::UnknownType);
                    Verdict::Drop(DropReason::UnknownType)
                }
            },
        }
    }

    /// Handles the BIND a QUIC client sent on its connection's first stream. `addr` is the
    /// connection's address (proven by the handshake), `exporter` its TLS exporter value for
    /// [`wire::EXPORTER_LABEL`].
    pub fn handle_stream_bind(
        &mut self,
        now: Instant,
        from: Endpoint,
        addr: SocketAddr,
        pkt: &[u8],
        exporter: &[u8; EXPORTER_LEN],
    ) -> Verdict {
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += pkt.len() as u64;
        match wire::parse_client(pkt) {
            Ok(ClientMessage::Bind(bind)) => {
                self.handle_bind(now, from, addr, &bind, Proof::Channel(exporter))
            }
            // Not a BIND: nothing to answer on the stream; the shell closes the connection.
            Ok(_) | Err(_) => {
                self.stats.count_drop(DropReason::Malformed);
                Verdict::Drop(DropReason::Malformed)
            }
        }
    }

    /// Tells the table that the QUIC connection of `ep` now sends from `addr` (connection
    /// migration). Until the client answers the PROBE sent to `addr`, the leg receives no media:
    /// a bound participant could otherwise forge packets from a victim's address and have the
    /// relay send the victim media in its name. Moving back to the last proven address needs no
    /// proof. An address and its IPv4-mapped form are one address here, as in the cookies that
    /// prove it.
    pub fn handle_path(&mut self, now: Instant, ep: Endpoint, addr: SocketAddr) {
        let Some(leg) = self.legs.get_mut(&EndpointKey(ep)) else {
            return;
        };
        let Some(path) = leg.path.as_mut() else {
            return;
        };
        if same_endpoint(addr, path.proven) {
            if path.probing.take().is_some() {
                self.node
                    .directory
                    .set_reachable(leg.session_ref(), leg.slot(), ep, true);
            }
            return;
        }
        if path.probing.is_some_and(|p| same_endpoint(p.addr, addr)) {
            return;
        }
        let first = path.probing.is_none();
        path.probing = Some(Probing {
            addr,
            next_probe: now,
        });
        if first {
            self.node
                .directory
                .set_reachable(leg.session_ref(), leg.slot(), ep, false);
        }
        self.probe(now, ep);
    }

    /// Tells the table that the QUIC connection of `ep` is gone (closed, reset or timed out).
    pub fn handle_disconnect(&mut self, ep: Endpoint) {
        let Some(leg) = self.legs.remove(&EndpointKey(ep)) else {
            return;
        };
        self.node.unbind_leg(&leg, Ended::Disconnected);
        self.event(Event::Unbound {
            session: leg.session(),
            leg: leg.leg(),
            endpoint: ep,
            why: LegStatus::Disconnected,
        });
    }

    /// Sends the next PROBE for `ep`'s unproven path, if one is due.
    fn probe(&mut self, now: Instant, ep: Endpoint) {
        let Some(leg) = self.legs.get_mut(&EndpointKey(ep)) else {
            return;
        };
        let context = probe_context(leg);
        let Some(path) = leg.path.as_mut() else {
            return;
        };
        let Some(p) = path.probing.as_mut() else {
            return;
        };
        if path.probes_left == 0 || now < p.next_probe {
            return;
        }
        path.probes_left -= 1;
        p.next_probe = now + PROBE_INTERVAL;
        let addr = p.addr;
        let cookie = self
            .node
            .cookies
            .mint(self.node.mono_ms(now), addr, &context);
        self.send(ep, wire::probe(probe_txn(&cookie), &cookie), false);
    }

    fn handle_probe_ack(&mut self, now: Instant, from: Endpoint, cookie: &[u8]) -> Verdict {
        let node = self.node.clone();
        let proven = self.legs.get_mut(&EndpointKey(from)).and_then(|leg| {
            let context = probe_context(leg);
            let pending = leg.path.as_ref().and_then(|p| p.probing)?;
            node.cookies
                .check(node.mono_ms(now), pending.addr, &context, cookie)
                .ok()?;
            let path = leg.path.as_mut()?;
            path.proven = pending.addr;
            path.probing = None;
            path.probes_left = MAX_PROBES;
            node.directory
                .set_reachable(leg.session_ref(), leg.slot(), from, true);
            Some(())
        });
        match proven {
            Some(()) => Verdict::Control,
            None => {
                // A stale, forged or unexpected echo: no answer (it may be spoofed).
                self.stats.count_drop(DropReason::BadCookie);
                Verdict::Drop(DropReason::BadCookie)
            }
        }
    }

    fn handle_control(&mut self, now: Instant, from: Endpoint, pkt: &[u8]) -> Verdict {
        let Ok(msg) = wire::parse_client(pkt) else {
            // No answer: a malformed message may come from a spoofed source.
            self.stats.count_drop(DropReason::Malformed);
            return Verdict::Drop(DropReason::Malformed);
        };
        match msg {
            // A leg whose session was revoked, or that was bound elsewhere since (perhaps through
            // another table), is gone even if this table's sweep has not noticed yet: answer
            // as media from it would find, never KEEPALIVE_ACK, which would tell the client that
            // the relay still serves it. (Found by the `datagram` fuzz target.)
            ClientMessage::Keepalive { txn } => {
                let key = EndpointKey(from);
                match self.legs.get(&key).map(LegState::binding) {
                    Some(LegStatus::Serving) => {
                        if let Some(leg) = self.legs.get_mut(&key) {
                            leg.touch(now);
                        }
                        self.send(from, wire::keepalive_ack(txn), false);
                        Verdict::Control
                    }
                    Some(LegStatus::Closed) => {
                        self.stats.count_drop(DropReason::SessionClosed);
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
            ClientMessage::Bind(bind) => match from {
                Endpoint::Udp(addr) => self.handle_bind(now, from, addr, &bind, Proof::Cookie),
                // Over QUIC a BIND goes on the connection's stream, bound to its TLS session.
                // (A TURN endpoint is never the source of a datagram: TURN clients are UDP
                // ones, and the table names their allocations.)
                Endpoint::Quic(_)
                | Endpoint::TurnUdp(_)
                | Endpoint::TurnTcp(_)
                | Endpoint::TurnTls(_) => {
                    self.stats.binds[BindResult::Refused as usize] += 1;
                    self.stats.count_drop(DropReason::BadBinding);
                    self.send(from, wire::error(bind.txn, ErrorCode::Unauthorized), false);
                    Verdict::Drop(DropReason::BadBinding)
                }
            },
            ClientMessage::ProbeAck { cookie, .. } => self.handle_probe_ack(now, from, cookie),
        }
    }

    /// Answers a KEEPALIVE from an endpoint that holds no leg.
    fn not_bound(&mut self, from: Endpoint, txn: [u8; 8]) -> Verdict {
        self.stats.count_drop(DropReason::Unbound);
        // As long as the KEEPALIVE itself: no amplification.
        self.send(from, wire::error(txn, ErrorCode::NotBound), false);
        Verdict::Drop(DropReason::Unbound)
    }

    fn handle_bind(
        &mut self,
        now: Instant,
        from: Endpoint,
        addr: SocketAddr,
        bind: &Bind<'_>,
        proof: Proof<'_>,
    ) -> Verdict {
        // Before any cryptography: a flood of binds costs a hash lookup each, and gets no answer.
        if !self.binds.admit(now, addr) {
            self.stats.binds[BindResult::Refused as usize] += 1;
            self.stats.count_drop(DropReason::BindRateLimited);
            return Verdict::Drop(DropReason::BindRateLimited);
        }
        let reliable = matches!(proof, Proof::Channel(_));
        let refuse = |this: &mut Self, r: Refusal| {
            this.stats.binds[BindResult::Refused as usize] += 1;
            this.stats.count_drop(r.reason);
            this.send(from, wire::error(bind.txn, r.code), reliable);
            Verdict::Drop(r.reason)
        };
        // A BIND proves possession for the transport it was made for, and only there: a UDP
        // BIND seen on the wire (its cookie round included) binds nothing over QUIC, and a
        // channel-bound one nothing over UDP.
        let exporter = match (proof, bind.channel_bound) {
            (Proof::Cookie, false) => None,
            (Proof::Channel(x), true) => Some(x),
            (Proof::Cookie, true) | (Proof::Channel(_), false) => {
                let wrong = Refusal::new(DropReason::BadBinding, ErrorCode::Unauthorized);
                return refuse(self, wrong);
            }
        };
        let node = self.node.clone();
        let ticket = match node.authenticate(now, bind, exporter) {
            Ok(t) => t,
            Err(r) => return refuse(self, r),
        };
        if let Proof::Cookie = proof {
            let cookie_ok = bind
                .cookie
                .map(|c| node.cookies.check(node.mono_ms(now), addr, bind.ticket, c));
            match cookie_ok {
                None | Some(Err(_)) => {
                    if cookie_ok.is_some() {
                        self.stats.count_drop(DropReason::BadCookie);
                    }
                    self.stats.binds[BindResult::Challenged as usize] += 1;
                    let cookie = node.cookies.mint(node.mono_ms(now), addr, bind.ticket);
                    self.send(from, wire::challenge(bind.txn, &cookie), false);
                    return Verdict::Control;
                }
                Some(Ok(())) => {}
            }
        }
        let (mut leg, previous) = match node.bind_leg(now, &ticket, from) {
            Ok(x) => x,
            Err(r) => return refuse(self, r),
        };
        if let Endpoint::Quic(_) = from {
            leg.path = Some(Box::new(Path {
                proven: addr,
                probing: None,
                probes_left: MAX_PROBES,
            }));
        }
        // The leg moved from another endpoint this table serves: forget that one.
        if let Some(old) = previous
            && old != from
        {
            self.legs.remove(&EndpointKey(old));
        }
        // This endpoint held another leg: that leg is unbound, as one endpoint holds one leg.
        if let Some(old) = self.legs.insert(EndpointKey(from), leg)
            && (old.session() != ticket.session || old.leg() != ticket.leg)
        {
            node.unbind_leg(&old, Ended::Replaced);
        }
        self.stats.binds[BindResult::Bound as usize] += 1;
        self.send(
            from,
            wire::bind_ok(bind.txn, node.idle_timeout_secs()),
            reliable,
        );
        let moved = previous.is_some_and(|p| p != from);
        self.event(Event::Bound {
            session: ticket.session,
            leg: ticket.leg,
            endpoint: from,
            moved,
        });
        Verdict::Control
    }

    /// Forgets the leg `from` held in this table, which its session's revocation (`Closed`), a
    /// bind elsewhere (`Moved`) or its expiry ended; tells the client of a closed or expired
    /// session.
    pub(crate) fn forget_leg(&mut self, from: Endpoint, why: LegStatus) {
        let Some(leg) = self.legs.remove(&EndpointKey(from)) else {
            return;
        };
        let session = leg.session();
        match why {
            LegStatus::Closed => {
                self.send(from, wire::close(ErrorCode::SessionClosed, session.0), true)
            }
            LegStatus::Expired => {
                self.node.unbind_leg(&leg, Ended::Expired);
                self.send(from, wire::close(ErrorCode::Expired, session.0), true);
            }
            _ => {}
        }
        self.event(Event::Unbound {
            session,
            leg: leg.leg(),
            endpoint: from,
            why,
        });
    }

    pub(crate) fn event(&mut self, e: Event) {
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    fn send(&mut self, dst: Endpoint, msg: Encoded, reliable: bool) {
        // TURN clients speak STUN only: a leg that ends there ends silently, and the client
        // learns it from its next request (437).
        if dst.is_turn() {
            return;
        }
        self.send_message(dst, Message::Veil(msg), reliable);
    }

    pub(crate) fn send_message(&mut self, dst: Endpoint, msg: Message, reliable: bool) {
        let stats = if dst.is_turn() {
            &mut self.turn_stats
        } else {
            &mut self.stats
        };
        stats.control_tx_packets += 1;
        stats.control_tx_bytes += msg.as_bytes().len() as u64;
        self.transmits.push_back(Transmit { dst, msg, reliable });
    }

    /// Sweeps this table's legs when due: unbinds idle and expired legs, forgets moved ones,
    /// tells the clients of closed and expired sessions, sends due PROBEs, and, while the node
    /// is evicting, tells every client to move to its backup relay.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + self.node.config().sweep_interval;
        self.binds.forget_idle(now);
        let node = &self.node;
        let now_unix = node.unix_ms(now);
        let idle = node.config().leg_idle;
        let evicting = node.is_evicting();
        let mut ended = Vec::new();
        let mut probing = Vec::new();
        self.legs.retain(|key, leg| {
            // An extended session's native legs go on past their tokens' expiry.
            leg.renew();
            // Media a kernel fast path forwarded for the leg keeps it alive as its own would.
            if let Some(ms) = leg.session.fast_seen(leg.slot()) {
                leg.last_seen = leg.last_seen.max(node.instant_at(ms));
            }
            let why = match leg.check(now, now_unix, idle) {
                LegStatus::Serving if evicting => LegStatus::Evicted,
                why => why,
            };
            if why == LegStatus::Serving {
                if leg.path.as_ref().is_some_and(|p| p.probing.is_some()) {
                    probing.push(key.0);
                }
                return true;
            }
            let end = match why {
                LegStatus::Expired => Some(Ended::Expired),
                LegStatus::Idle => Some(Ended::Idle),
                LegStatus::Evicted => Some(Ended::Evicted),
                LegStatus::Serving
                | LegStatus::Closed
                | LegStatus::Moved
                | LegStatus::Disconnected => None,
            };
            if let Some(end) = end {
                node.unbind_leg(leg, end);
            }
            ended.push(Event::Unbound {
                session: leg.session(),
                leg: leg.leg(),
                endpoint: key.0,
                why,
            });
            false
        });
        for e in ended {
            if let Event::Unbound {
                session,
                endpoint,
                why,
                ..
            } = e
            {
                let code = match why {
                    LegStatus::Closed => Some(ErrorCode::SessionClosed),
                    LegStatus::Expired => Some(ErrorCode::Expired),
                    LegStatus::Evicted => Some(ErrorCode::Draining),
                    LegStatus::Serving
                    | LegStatus::Moved
                    | LegStatus::Idle
                    | LegStatus::Disconnected => None,
                };
                if let Some(code) = code {
                    self.send(endpoint, wire::close(code, session.0), true);
                }
            }
            self.event(e);
        }
        for ep in probing {
            self.probe(now, ep);
        }
    }

    /// The relay is stopping (past any drain): tells every leg's client to move to its backup
    /// relay (CLOSE `DRAINING`) and unbinds it, now.
    pub fn handle_shutdown(&mut self) {
        let legs: Vec<_> = self.legs.drain().collect();
        for (key, leg) in legs {
            self.node.unbind_leg(&leg, Ended::Evicted);
            self.send(
                key.0,
                wire::close(ErrorCode::Draining, leg.session().0),
                true,
            );
            self.event(Event::Unbound {
                session: leg.session(),
                leg: leg.leg(),
                endpoint: key.0,
                why: LegStatus::Evicted,
            });
        }
    }

    /// When [`ForwardingTable::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next_sweep)
    }

    /// The next event, for logs (and for a QUIC shell, to close a connection whose leg ended).
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next control message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }
}

/// What a PROBE's cookie covers besides the address: the leg it proves a path for.
fn probe_context(leg: &LegState) -> [u8; 17] {
    let mut c = [0u8; 17];
    c[..8].copy_from_slice(&leg.session().0.to_be_bytes());
    c[8] = leg.leg();
    if let Endpoint::Quic(id) = leg.endpoint() {
        c[9..].copy_from_slice(&id.0.to_be_bytes());
    }
    c
}

/// A PROBE's transaction id: the tail of its cookie's MAC (the client only echoes it).
fn probe_txn(cookie: &[u8; COOKIE_LEN]) -> [u8; 8] {
    cookie[COOKIE_LEN - 8..]
        .try_into()
        .expect("a cookie is longer than 8 bytes")
}
