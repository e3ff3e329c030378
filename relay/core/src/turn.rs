//! TURN (RFC 8656 over STUN, RFC 8489) as one more kind of leg in the forwarding table: a TURN
//! allocation is a leg bound to [`Endpoint::TurnUdp`] (or, over TCP and TLS, to its connection's
//! [`Endpoint::TurnTcp`] or [`Endpoint::TurnTls`]), by the same ticket, the same directory,
//! the same limits, expiry and revocation as a native leg. What is TURN's own lives here: the
//! long-term credential check, the stateless nonce, the methods, and addressed forwarding.
//!
//! A relayed transport address is not a socket. It is the relay's public IP with a port that
//! only names a leg of the session ([`relayed_port`]): permissions, channels, Send and
//! ChannelData are accepted only toward the relayed addresses of other allocations of the same
//! session, so no datagram ever goes to an address a client chose.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::cookie::CookieError;
use crate::leg::{LegState, leg_dropped};
use crate::session::{Endpoint, LegSet, MAX_SLOTS, TurnView};
use crate::stats::{BindResult, DropReason, Stats};
use crate::stun::{self, Builder, Kind, Message, attr, method};
use crate::table::{EndpointKey, Event, ForwardingTable, Verdict};
use crate::token::{MAX_LEGS, TICKET_LEN};
use veil_protocol::turn::{REALM, credential, ticket_of};

/// The first relayed port: the allocation in slot `n` of a session (leg `n`, or leg `n % 16`'s
/// extra allocation) has relayed port `RELAYED_PORT_BASE + 2n` (even, as EVEN-PORT asks), on
/// the relay's public IP.
pub const RELAYED_PORT_BASE: u16 = 49152;
/// An allocation's lifetime when the client asks for none or less (RFC 8656 §7.2).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
/// The longest allocation lifetime granted; never past the leg token's expiry.
pub const MAX_LIFETIME: Duration = Duration::from_secs(3600);
/// How long a permission lasts (RFC 8656 §9).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// How long a nonce is good for; after that a request gets 438 Stale Nonce and a fresh one.
pub const NONCE_LIFETIME: Duration = Duration::from_secs(600);
/// Answers remembered per allocation, so that a retransmitted request gets the same answer.
const REMEMBERED: usize = 4;
/// IANA protocol number of UDP, the only REQUESTED-TRANSPORT there is.
const UDP: u8 = 17;

/// The relayed port of the allocation in slot `slot`.
pub fn relayed_port(slot: u8) -> u16 {
    RELAYED_PORT_BASE + 2 * u16::from(slot)
}

/// The slot a relayed port names, if it names one. The odd port above a relayed port names the
/// same allocation: RFC 8656 §9 has a permission ignore the port, and clients ask for the RTCP
/// port next to the RTP one (coturn's `turnutils_uclient` does, and stops if that is refused).
fn slot_of_port(port: u16) -> Option<u8> {
    let off = port.checked_sub(RELAYED_PORT_BASE)?;
    (usize::from(off / 2) < MAX_SLOTS).then_some((off / 2) as u8)
}

/// A TURN allocation's own state, held by the table that serves its client's 5-tuple.
#[derive(Clone)]
pub(crate) struct Allocation {
    /// The long-term credential key of its username.
    key: [u8; 16],
    /// The ticket its username carries: later requests must carry the same.
    ticket: [u8; TICKET_LEN],
    /// The last answers, by transaction id.
    answers: [Option<([u8; 12], Builder)>; REMEMBERED],
    next_answer: usize,
}

impl std::fmt::Debug for Allocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocation").finish_non_exhaustive()
    }
}

impl Allocation {
    fn remembered(&self, txn: &[u8; 12]) -> Option<Builder> {
        self.answers
            .iter()
            .flatten()
            .find(|(t, _)| t == txn)
            .map(|(_, b)| *b)
    }

    fn remember(&mut self, txn: [u8; 12], answer: Builder) {
        self.answers[self.next_answer] = Some((txn, answer));
        self.next_answer = (self.next_answer + 1) % REMEMBERED;
    }
}

/// How a datagram relayed to a TURN allocation is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// ChannelData on this channel, which the receiver bound to the sender's relayed address.
    Channel(u16),
    /// A Data indication from this peer address (the sender's relayed address).
    Data(SocketAddr),
}

/// A datagram relayed to one TURN allocation: the payload of the received datagram (the
/// `payload` range of it), framed for the receiver.
#[derive(Debug, Clone)]
pub struct Relayed {
    /// The receiving allocation.
    pub dst: Endpoint,
    /// How to frame the payload.
    pub frame: Frame,
    /// Where the payload lies in the received datagram.
    pub payload: Range<usize>,
}

impl Relayed {
    /// Builds the datagram to send into `out` from `pkt` (the received datagram) and returns
    /// its length. `out` must hold [`stun::data_indication_overhead`] plus the payload plus 3
    /// bytes (1600 bytes always do). `txn` is the transaction id of a Data indication (any
    /// value: indications are not answered).
    pub fn datagram(&self, pkt: &[u8], out: &mut [u8], txn: &[u8; 12]) -> usize {
        let payload = &pkt[self.payload.clone()];
        match self.frame {
            Frame::Channel(ch) => {
                // ChannelData out: the channel number is the receiver's, the rest as received.
                out[..2].copy_from_slice(&ch.to_be_bytes());
                out[2..4].copy_from_slice(&(payload.len() as u16).to_be_bytes());
                out[4..4 + payload.len()].copy_from_slice(payload);
                4 + payload.len()
            }
            Frame::Data(peer) => stun::write_data_indication(out, txn, peer, payload),
        }
    }
}

/// Which peer a TURN client's datagram is for.
#[derive(Debug, Clone, Copy)]
enum To {
    /// ChannelData on this channel.
    Channel(u16),
    /// A Send indication to this peer leg.
    Leg(u8),
}

impl LegState {
    /// Relays a TURN client's datagram to the one allocation it names, if both sides permit it.
    fn relay(
        &mut self,
        now: Instant,
        now_unix_ms: u64,
        relayed_ip: IpAddr,
        to: To,
        payload: Range<usize>,
        stats: &mut Stats,
    ) -> Verdict {
        let legs = self.session.legs();
        let counters = legs.counters(self.leg);
        if let Some(c) = counters {
            c.received(payload.len());
        }
        if self.session.is_closed_for(self.leg) {
            return leg_dropped(counters, stats, DropReason::SessionClosed);
        }
        if now >= self.expires_at {
            return leg_dropped(counters, stats, DropReason::Expired);
        }
        let Some((at, own)) = legs.turn_view(self.leg) else {
            return leg_dropped(counters, stats, DropReason::Unbound);
        };
        if at != self.endpoint {
            return leg_dropped(counters, stats, DropReason::Unbound);
        }
        let elapsed = now.saturating_duration_since(self.last_seen).as_secs_f32();
        self.last_seen = now;
        let peer = match to {
            To::Channel(ch) => own.peer_of(ch),
            To::Leg(p) => Some(p),
        };
        let Some(peer) = peer.filter(|&p| own.permits(p, now_unix_ms)) else {
            return leg_dropped(counters, stats, DropReason::TurnNoPermission);
        };
        let Some((dst, theirs)) = legs.turn_view(peer) else {
            return leg_dropped(counters, stats, DropReason::NoPeer);
        };
        let frame = match theirs.channel_of(self.leg) {
            Some(ch) => Frame::Channel(ch),
            None if theirs.permits(self.leg, now_unix_ms) => {
                Frame::Data(SocketAddr::new(relayed_ip, relayed_port(self.leg)))
            }
            None => return leg_dropped(counters, stats, DropReason::TurnNoPermission),
        };
        if !self.limiter.admit(elapsed, payload.len()) {
            return leg_dropped(counters, stats, DropReason::RateLimited);
        }
        if let Some(c) = legs.counters(peer) {
            c.sent(payload.len());
        }
        stats.forwarded_packets += 1;
        stats.forwarded_bytes += payload.len() as u64;
        Verdict::Relay(Relayed {
            dst,
            frame,
            payload,
        })
    }
}

/// An authenticated request's credentials.
struct Verified {
    key: [u8; 16],
    ticket: [u8; TICKET_LEN],
    /// The ticket's claims, where they were decoded (not for a request on the allocation the
    /// ticket already holds, whose cached key needed no derivation).
    claims: Option<crate::token::Ticket>,
}

/// The outcome of checking a request's credentials.
enum Auth {
    Verified(Verified),
    /// Not verified; the answer (401 or 438) is queued, or was refused by the rate limit.
    Challenged(Verdict),
}

impl ForwardingTable {
    /// Handles a datagram whose first byte is STUN's (0-3) or ChannelData's (0x40-0x4F), from
    /// a UDP client at `addr`.
    pub(crate) fn handle_turn(&mut self, now: Instant, addr: SocketAddr, pkt: &[u8]) -> Verdict {
        if self.node.config().turn_ip.is_none() {
            self.stats.count_drop(DropReason::UnknownType);
            return Verdict::Drop(DropReason::UnknownType);
        }
        // TURN has counters of its own (transport "turn-udp"): move the receive count there.
        self.stats.rx_packets -= 1;
        self.stats.rx_bytes -= pkt.len() as u64;
        self.turn(now, Endpoint::TurnUdp(addr), addr, pkt)
    }

    /// Handles one TURN message a client sent on a TCP or TLS connection: `ep` is the
    /// connection's [`Endpoint::TurnTcp`] or [`Endpoint::TurnTls`], `addr` its peer address.
    /// `frame` is a whole STUN message, or a ChannelData message with its padding, as the shell
    /// cut them from the stream (RFC 8656 §12.5, [`stun::frame_len`]). Counted in
    /// [`Self::turn_stats`].
    pub fn handle_turn_stream(
        &mut self,
        now: Instant,
        ep: Endpoint,
        addr: SocketAddr,
        frame: &[u8],
    ) -> Verdict {
        debug_assert!(matches!(ep, Endpoint::TurnTcp(_) | Endpoint::TurnTls(_)));
        let refused = if self.node.config().turn_ip.is_none()
            || !matches!(frame.first(), Some(0..=3 | 0x40..=0x4F))
        {
            Some(DropReason::UnknownType)
        } else if frame.len() > crate::wire::MAX_DATAGRAM {
            // What arrives over UDP is at most this long, and relayed datagrams leave over UDP.
            Some(DropReason::Oversized)
        } else {
            None
        };
        if let Some(reason) = refused {
            self.turn_stats.rx_packets += 1;
            self.turn_stats.rx_bytes += frame.len() as u64;
            return self.drop_reason(reason);
        }
        self.turn(now, ep, addr, frame)
    }

    /// A TURN message from the client at `addr`, whose allocation (if any) is at `ep`.
    fn turn(&mut self, now: Instant, ep: Endpoint, addr: SocketAddr, pkt: &[u8]) -> Verdict {
        let Some(ip) = self.node.config().turn_ip else {
            return self.drop_reason(DropReason::UnknownType);
        };
        self.turn_stats.rx_packets += 1;
        self.turn_stats.rx_bytes += pkt.len() as u64;
        if pkt[0] & 0xC0 == 0x40 {
            return self.channel_data(now, ep, ip, pkt);
        }
        // No answer to what does not parse: it may come from a spoofed source.
        let Ok(msg) = stun::parse(pkt) else {
            return self.drop_reason(DropReason::Malformed);
        };
        match (msg.kind, msg.method) {
            (Kind::Request, method::BINDING) => self.drop_reason(DropReason::StunBinding),
            (Kind::Indication, method::SEND) => self.send_indication(now, ep, ip, &msg, pkt),
            (
                Kind::Request,
                method::ALLOCATE
                | method::REFRESH
                | method::CREATE_PERMISSION
                | method::CHANNEL_BIND,
            ) => self.turn_request(now, ep, addr, ip, &msg),
            // Answers, other indications, methods a TURN server does not serve: no answer,
            // which could only go to an unverified source.
            _ => self.drop_reason(DropReason::UnknownType),
        }
    }

    fn drop_reason(&mut self, reason: DropReason) -> Verdict {
        self.turn_stats.count_drop(reason);
        Verdict::Drop(reason)
    }

    /// ChannelData: parses 4 bytes and looks up once.
    #[inline]
    fn channel_data(&mut self, now: Instant, ep: Endpoint, ip: IpAddr, pkt: &[u8]) -> Verdict {
        if pkt.len() < 4 {
            return self.drop_reason(DropReason::Malformed);
        }
        let ch = u16::from_be_bytes([pkt[0], pkt[1]]);
        let len = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
        // The payload may be followed by padding (over TCP it must be), never cut short.
        if 4 + len > pkt.len() || !(0x4000..=0x4FFF).contains(&ch) {
            return self.drop_reason(DropReason::Malformed);
        }
        let now_unix = self.node.unix_ms(now);
        let Some(leg) = self.legs.get_mut(&EndpointKey(ep)) else {
            return self.drop_reason(DropReason::TurnNoAllocation);
        };
        let verdict = leg.relay(
            now,
            now_unix,
            ip,
            To::Channel(ch),
            4..4 + len,
            &mut self.turn_stats,
        );
        self.after_relay(ep, &verdict);
        verdict
    }

    fn send_indication(
        &mut self,
        now: Instant,
        ep: Endpoint,
        ip: IpAddr,
        msg: &Message<'_>,
        pkt: &[u8],
    ) -> Verdict {
        let (Some(peer), Some(data)) = (msg.peers().next(), msg.data) else {
            return self.drop_reason(DropReason::Malformed);
        };
        let Some(leg) = self.legs.get(&EndpointKey(ep)) else {
            return self.drop_reason(DropReason::TurnNoAllocation);
        };
        if leg.session.is_closed_for(leg.leg) {
            let verdict = self.drop_reason(DropReason::SessionClosed);
            self.after_relay(ep, &verdict);
            return verdict;
        }
        let Some(peer) = peer_leg(&leg.session.legs(), leg.leg, ip, peer) else {
            return self.drop_reason(DropReason::TurnForbiddenPeer);
        };
        // DATA's value is a slice of `pkt`.
        let start = data.as_ptr() as usize - pkt.as_ptr() as usize;
        let now_unix = self.node.unix_ms(now);
        let leg = self
            .legs
            .get_mut(&EndpointKey(ep))
            .expect("looked up above");
        let verdict = leg.relay(
            now,
            now_unix,
            ip,
            To::Leg(peer),
            start..start + data.len(),
            &mut self.turn_stats,
        );
        self.after_relay(ep, &verdict);
        verdict
    }

    /// Forgets an allocation whose leg ended (revoked, moved, expired) while relaying.
    fn after_relay(&mut self, ep: Endpoint, verdict: &Verdict) {
        use crate::leg::LegStatus;
        match verdict {
            Verdict::Drop(DropReason::SessionClosed) => self.forget_leg(ep, LegStatus::Closed),
            Verdict::Drop(DropReason::Unbound) => self.forget_leg(ep, LegStatus::Moved),
            Verdict::Drop(DropReason::Expired) => self.forget_leg(ep, LegStatus::Expired),
            _ => {}
        }
    }

    /// Queues `answer` to `ep`, with MESSAGE-INTEGRITY under `key` where the request was
    /// authenticated, FINGERPRINT where the request had one, remembered for retransmissions.
    fn answer(
        &mut self,
        ep: Endpoint,
        req: &Message<'_>,
        mut answer: Builder,
        key: Option<&[u8; 16]>,
    ) {
        if let Some(key) = key {
            answer = answer.integrity(key);
        }
        if req.fingerprint {
            answer = answer.fingerprint();
        }
        if let Some(a) = self
            .legs
            .get_mut(&EndpointKey(ep))
            .and_then(|l| l.turn.as_mut())
        {
            a.remember(req.txn, answer);
        }
        self.send_stun(ep, answer);
    }

    /// An error answer to an authenticated request.
    fn refuse(
        &mut self,
        ep: Endpoint,
        req: &Message<'_>,
        code: u16,
        reason: &str,
        key: &[u8; 16],
        why: DropReason,
    ) -> Verdict {
        let b = Builder::new(req.method, Kind::Error, &req.txn).error(code, reason);
        self.answer(ep, req, b, Some(key));
        self.drop_reason(why)
    }

    /// Answers an unauthenticated request with 401 (or 438 for a stale nonce) and a fresh
    /// nonce: no larger than twice the request, for Allocate (the exchange every client starts
    /// with), and no larger than the request otherwise; rate-limited per source like BINDs.
    fn challenge(
        &mut self,
        now: Instant,
        ep: Endpoint,
        addr: SocketAddr,
        req: &Message<'_>,
        stale: bool,
    ) -> Verdict {
        if !self.binds.admit(now, addr) {
            return self.drop_reason(DropReason::BindRateLimited);
        }
        let nonce = self
            .node
            .cookies
            .mint_nonce(self.node.unix_ms(now), addr, ep.transport());
        let (code, reason) = if stale { (438, "") } else { (401, "") };
        let mut b = Builder::new(req.method, Kind::Error, &req.txn)
            .error(code, reason)
            .attr(attr::REALM, REALM.as_bytes())
            .attr(attr::NONCE, &nonce);
        let len = req.raw().len();
        let limit = if req.method == method::ALLOCATE {
            2 * len
        } else {
            len
        };
        if req.fingerprint && b.as_bytes().len() + 8 <= limit {
            b = b.fingerprint();
        }
        if b.as_bytes().len() > limit {
            return self.drop_reason(DropReason::TurnUnauthorized);
        }
        self.send_stun(ep, b);
        self.turn_stats.count_drop(DropReason::TurnUnauthorized);
        Verdict::Control
    }

    /// Checks the long-term credentials of a request: the nonce (this source's, and fresh),
    /// the realm, the username (a ticket the key ring verifies) and MESSAGE-INTEGRITY.
    fn authenticate(
        &mut self,
        now: Instant,
        ep: Endpoint,
        addr: SocketAddr,
        req: &Message<'_>,
    ) -> Auth {
        let (Some(user), Some(realm), Some(nonce)) = (req.username, req.realm, req.nonce) else {
            return Auth::Challenged(self.challenge(now, ep, addr, req, false));
        };
        if !req.has_integrity() || realm != REALM.as_bytes() {
            return Auth::Challenged(self.challenge(now, ep, addr, req, false));
        }
        match self.node.cookies.check_nonce(
            self.node.unix_ms(now),
            addr,
            ep.transport(),
            nonce,
            NONCE_LIFETIME,
        ) {
            Ok(()) => {}
            Err(CookieError::Expired) => {
                return Auth::Challenged(self.challenge(now, ep, addr, req, true));
            }
            Err(CookieError::Mismatch) => {
                return Auth::Challenged(self.challenge(now, ep, addr, req, false));
            }
        }
        let Some(ticket) = ticket_of(user) else {
            return Auth::Challenged(self.challenge(now, ep, addr, req, false));
        };
        // The allocation's key, where this 5-tuple has one for this ticket: no derivation.
        let cached = self
            .legs
            .get(&EndpointKey(ep))
            .and_then(|l| l.turn.as_ref())
            .filter(|a| a.ticket == ticket)
            .map(|a| a.key);
        let (key, claims) = match cached {
            Some(k) => (k, None),
            None => match self.node.keys().leg_key(&ticket) {
                Ok((claims, leg_key)) => (
                    stun::long_term_key(user, realm, credential(&leg_key).as_bytes()),
                    Some(claims),
                ),
                Err(_) => return Auth::Challenged(self.challenge(now, ep, addr, req, false)),
            },
        };
        if !req.verify_integrity(&key) {
            return Auth::Challenged(self.challenge(now, ep, addr, req, false));
        }
        Auth::Verified(Verified {
            key,
            ticket,
            claims,
        })
    }

    fn turn_request(
        &mut self,
        now: Instant,
        ep: Endpoint,
        addr: SocketAddr,
        ip: IpAddr,
        req: &Message<'_>,
    ) -> Verdict {
        // A retransmission gets the answer the request got.
        if let Some(answer) = self
            .legs
            .get(&EndpointKey(ep))
            .and_then(|l| l.turn.as_ref())
            .and_then(|a| a.remembered(&req.txn))
        {
            self.send_stun(ep, answer);
            return Verdict::Control;
        }
        let v = match self.authenticate(now, ep, addr, req) {
            Auth::Verified(v) => v,
            Auth::Challenged(verdict) => return verdict,
        };
        if !req.unknown().is_empty() {
            let mut types = [0u8; 2 * stun::MAX_UNKNOWN];
            for (i, t) in req.unknown().iter().enumerate() {
                types[2 * i..2 * i + 2].copy_from_slice(&t.to_be_bytes());
            }
            let b = Builder::new(req.method, Kind::Error, &req.txn)
                .error(420, "Unknown Attribute")
                .attr(attr::UNKNOWN_ATTRIBUTES, &types[..2 * req.unknown().len()]);
            self.answer(ep, req, b, Some(&v.key));
            return self.drop_reason(DropReason::Malformed);
        }
        if req.method == method::ALLOCATE {
            return self.allocate(now, ep, addr, ip, req, &v);
        }
        let held = self
            .legs
            .get(&EndpointKey(ep))
            .and_then(|l| l.turn.as_ref())
            .map(|a| a.ticket);
        match held {
            None => {
                return self.refuse(
                    ep,
                    req,
                    437,
                    "Allocation Mismatch",
                    &v.key,
                    DropReason::TurnNoAllocation,
                );
            }
            Some(t) if t != v.ticket => {
                return self.refuse(
                    ep,
                    req,
                    441,
                    "Wrong Credentials",
                    &v.key,
                    DropReason::TurnUnauthorized,
                );
            }
            Some(_) => {}
        }
        match req.method {
            method::REFRESH => self.refresh(now, ep, req, &v),
            method::CREATE_PERMISSION => self.create_permission(now, ep, ip, req, &v),
            _ => self.channel_bind(now, ep, ip, req, &v),
        }
    }

    fn allocate(
        &mut self,
        now: Instant,
        ep: Endpoint,
        addr: SocketAddr,
        ip: IpAddr,
        req: &Message<'_>,
        v: &Verified,
    ) -> Verdict {
        let key = &v.key;
        if self
            .legs
            .get(&EndpointKey(ep))
            .is_some_and(|l| l.turn.is_some())
        {
            return self.refuse(
                ep,
                req,
                437,
                "Allocation Mismatch",
                key,
                DropReason::TurnNoAllocation,
            );
        }
        match req.requested_transport {
            None => return self.refuse(ep, req, 400, "Bad Request", key, DropReason::Malformed),
            Some(UDP) => {}
            Some(_) => {
                return self.refuse(
                    ep,
                    req,
                    442,
                    "Unsupported Transport Protocol",
                    key,
                    DropReason::Malformed,
                );
            }
        }
        // RFC 8656 §7.2: a reservation Veil never handed out.
        if req.reservation_token {
            return self.refuse(
                ep,
                req,
                508,
                "Insufficient Capacity",
                key,
                DropReason::Malformed,
            );
        }
        let family_ok = match req.requested_family.unwrap_or(1) {
            1 => ip.is_ipv4(),
            2 => ip.is_ipv6(),
            _ => false,
        };
        if !family_ok {
            return self.refuse(
                ep,
                req,
                440,
                "Address Family not Supported",
                key,
                DropReason::Malformed,
            );
        }
        let node = self.node.clone();
        // Decoded by `authenticate`: only a 5-tuple's own allocation skips that, and it got
        // 437 above.
        let Some(ticket) = v.claims else {
            return self.refuse(
                ep,
                req,
                437,
                "Allocation Mismatch",
                key,
                DropReason::TurnNoAllocation,
            );
        };
        let now_unix = node.unix_ms(now);
        // The ticket's own expiry, or the later one its session was extended to.
        if node.directory.expiry(&ticket) <= now_unix {
            // Fresh nonce and realm, as every 401 has them: the client may come back with a
            // new token.
            return self.challenge(now, ep, addr, req, false);
        }
        if node.directory.refuses(&ticket) {
            return self.refuse(ep, req, 403, "Forbidden", key, DropReason::SessionClosed);
        }
        let (mut leg, previous) = match node.bind_leg(now, &ticket, ep) {
            Ok(x) => x,
            Err(r) => {
                let (code, reason) = match r.reason {
                    DropReason::SessionClosed => (403, "Forbidden"),
                    DropReason::TurnQuotaReached => (486, "Allocation Quota Reached"),
                    _ => (508, "Insufficient Capacity"),
                };
                self.turn_stats.binds[BindResult::Refused as usize] += 1;
                return self.refuse(ep, req, code, reason, key, r.reason);
            }
        };
        let slot = leg.slot();
        let left = Duration::from_millis(leg.session.expires_unix_ms().saturating_sub(now_unix));
        let lifetime = lifetime(req.lifetime).min(left);
        leg.expires_at = now + lifetime;
        leg.turn = Some(Box::new(Allocation {
            key: *key,
            ticket: v.ticket,
            answers: [None; REMEMBERED],
            next_answer: 0,
        }));
        if let Some(old) = previous
            && old != ep
        {
            self.legs.remove(&EndpointKey(old));
        }
        if let Some(old) = self.legs.insert(EndpointKey(ep), leg)
            && (old.session() != ticket.session || old.leg() != ticket.leg)
        {
            node.unbind_leg(&old, crate::session::Ended::Replaced);
        }
        self.turn_stats.binds[BindResult::Bound as usize] += 1;
        let relayed = SocketAddr::new(ip, relayed_port(slot));
        let b = Builder::new(method::ALLOCATE, Kind::Success, &req.txn)
            .xor_addr(attr::XOR_RELAYED_ADDRESS, relayed)
            .xor_addr(attr::XOR_MAPPED_ADDRESS, addr)
            .u32(attr::LIFETIME, lifetime.as_secs() as u32);
        self.answer(ep, req, b, Some(key));
        self.event(Event::Bound {
            session: ticket.session,
            leg: ticket.leg,
            endpoint: ep,
            moved: previous.is_some_and(|p| p != ep),
        });
        Verdict::Control
    }

    fn refresh(&mut self, now: Instant, ep: Endpoint, req: &Message<'_>, v: &Verified) -> Verdict {
        let node = self.node.clone();
        let asked = req.lifetime.unwrap_or(DEFAULT_LIFETIME.as_secs() as u32);
        if asked == 0 {
            // Released by the client: the leg is unbound, and answered LIFETIME 0.
            let b = Builder::new(method::REFRESH, Kind::Success, &req.txn).u32(attr::LIFETIME, 0);
            self.answer(ep, req, b, Some(&v.key));
            if let Some(leg) = self.legs.remove(&EndpointKey(ep)) {
                node.unbind_leg(&leg, crate::session::Ended::Disconnected);
                self.event(Event::Unbound {
                    session: leg.session(),
                    leg: leg.leg(),
                    endpoint: ep,
                    why: crate::leg::LegStatus::Disconnected,
                });
            }
            return Verdict::Control;
        }
        let now_unix = node.unix_ms(now);
        let Some(leg) = self.legs.get_mut(&EndpointKey(ep)) else {
            return self.drop_reason(DropReason::TurnNoAllocation);
        };
        let left = Duration::from_millis(leg.session.expires_unix_ms().saturating_sub(now_unix));
        let lifetime = lifetime(Some(asked)).min(left);
        leg.expires_at = now + lifetime;
        leg.touch(now);
        let b = Builder::new(method::REFRESH, Kind::Success, &req.txn)
            .u32(attr::LIFETIME, lifetime.as_secs() as u32);
        self.answer(ep, req, b, Some(&v.key));
        Verdict::Control
    }

    /// The peer legs a request names, or `None` (answered 403) if any is not another
    /// allocation of the session.
    fn peers_of(&self, ep: Endpoint, ip: IpAddr, req: &Message<'_>) -> Option<u128> {
        let leg = self.legs.get(&EndpointKey(ep))?;
        let legs = leg.session.legs();
        let mut mask = 0u128;
        for p in req.peers() {
            mask |= 1u128 << peer_leg(&legs, leg.leg, ip, p)?;
        }
        Some(mask)
    }

    /// 403 for a request naming a peer outside the session.
    fn forbidden(&mut self, ep: Endpoint, req: &Message<'_>, key: &[u8; 16]) -> Verdict {
        self.refuse(
            ep,
            req,
            403,
            "Forbidden",
            key,
            DropReason::TurnForbiddenPeer,
        )
    }

    fn create_permission(
        &mut self,
        now: Instant,
        ep: Endpoint,
        ip: IpAddr,
        req: &Message<'_>,
        v: &Verified,
    ) -> Verdict {
        if req.peers().next().is_none() || req.too_many_peers {
            return self.refuse(ep, req, 400, "Bad Request", &v.key, DropReason::Malformed);
        }
        let Some(mask) = self.peers_of(ep, ip, req) else {
            return self.forbidden(ep, req, &v.key);
        };
        let until = self.node.unix_ms(now) + PERMISSION_LIFETIME.as_millis() as u64;
        if !self.update_view(now, ep, |view| {
            for p in 0..MAX_SLOTS {
                if mask & (1 << p) != 0 {
                    view.permits_until[p] = until;
                }
            }
            true
        }) {
            return self.drop_reason(DropReason::Unbound);
        }
        let b = Builder::new(method::CREATE_PERMISSION, Kind::Success, &req.txn);
        self.answer(ep, req, b, Some(&v.key));
        Verdict::Control
    }

    fn channel_bind(
        &mut self,
        now: Instant,
        ep: Endpoint,
        ip: IpAddr,
        req: &Message<'_>,
        v: &Verified,
    ) -> Verdict {
        // 0x4000-0x4FFF only: first bytes 0x50-0x5F are Veil's control messages.
        let Some(ch) = req.channel.filter(|c| (0x4000..=0x4FFF).contains(c)) else {
            return self.refuse(ep, req, 400, "Bad Request", &v.key, DropReason::Malformed);
        };
        let mut peers = req.peers();
        let (Some(_), None) = (peers.next(), peers.next()) else {
            return self.refuse(ep, req, 400, "Bad Request", &v.key, DropReason::Malformed);
        };
        let Some(mask) = self.peers_of(ep, ip, req) else {
            return self.forbidden(ep, req, &v.key);
        };
        let peer = mask.trailing_zeros() as u8;
        let until = self.node.unix_ms(now) + PERMISSION_LIFETIME.as_millis() as u64;
        // A channel names one peer, and a peer has one channel, for the allocation's life.
        let bound = self.update_view(now, ep, |view| {
            let clash = view.peer_of(ch).is_some_and(|q| q != peer)
                || view.channel_of(peer).is_some_and(|c| c != ch);
            if clash {
                return false;
            }
            view.channels[usize::from(peer)] = ch;
            view.permits_until[usize::from(peer)] = until;
            true
        });
        if !bound {
            return self.refuse(ep, req, 400, "Bad Request", &v.key, DropReason::Malformed);
        }
        let b = Builder::new(method::CHANNEL_BIND, Kind::Success, &req.txn);
        self.answer(ep, req, b, Some(&v.key));
        Verdict::Control
    }

    /// Changes `ep`'s allocation's permissions and channels if `change` says yes; false if it
    /// said no or the leg is not bound there any more.
    fn update_view(
        &mut self,
        now: Instant,
        ep: Endpoint,
        change: impl FnOnce(&mut TurnView) -> bool,
    ) -> bool {
        let Some(leg) = self.legs.get_mut(&EndpointKey(ep)) else {
            return false;
        };
        leg.touch(now);
        let mut ok = false;
        let updated = self
            .node
            .directory
            .update_turn(&leg.session, leg.leg, ep, |view| {
                let mut next = view.clone();
                ok = change(&mut next);
                if ok {
                    *view = next;
                }
            });
        updated.is_some() && ok
    }

    /// Queues a STUN answer.
    fn send_stun(&mut self, dst: Endpoint, msg: Builder) {
        self.send_message(dst, crate::table::Message::Stun(msg), false);
    }
}

/// The lifetime granted for a requested one (RFC 8656 §7.2: the default at least, the maximum
/// at most).
fn lifetime(asked: Option<u32>) -> Duration {
    let asked = Duration::from_secs(u64::from(asked.unwrap_or(0)));
    asked.clamp(DEFAULT_LIFETIME, MAX_LIFETIME)
}

/// The leg of `legs` whose relayed address `peer` is, if it is another allocation of the
/// session than `own`. The relayed IP must be the relay's own, in the same form: 0.0.0.0,
/// loopback, the relay's media port, IPv4-mapped IPv6 forms of the relay's address and every
/// other address name no leg.
fn peer_leg(legs: &LegSet, own: u8, ip: IpAddr, peer: SocketAddr) -> Option<u8> {
    if peer.ip() != ip {
        return None;
    }
    let slot = slot_of_port(peer.port())?;
    // Another participant's allocation: not one of the sender's own leg.
    (slot % MAX_LEGS != own % MAX_LEGS && legs.turn_view(slot).is_some()).then_some(slot)
}
