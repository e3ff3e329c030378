//! The relay's session table: which endpoint each leg of each session is bound to.
//!
//! The [`Directory`] is shared by every IO worker of a relay. The kernel spreads clients over
//! workers by their 4-tuple, so two legs of one call may be served by different workers; each
//! worker must see where the other legs are bound. A session's bound legs live in a copy-on-write
//! [`LegSet`] behind an `ArcSwap`: binds (rare) take the directory's mutex and publish a new set;
//! forwarding (every packet) reads the current set without a lock and without writing to any
//! shared cache line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use arc_swap::ArcSwap;

use crate::counters::{Counts, LegCounters};
use crate::token::{Limits, MAX_LEGS, SessionId, Ticket};

/// Identifies a QUIC connection within one relay (assigned by the QUIC shell).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// Where the relay meets a client: every input of the core names the endpoint it came from,
/// every output the endpoint it goes to. One variant per door into the relay; TURN allocations
/// and relay-to-relay legs become variants of their own, so that binding, keepalive, expiry,
/// revocation, limits and close codes exist once for all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A UDP client at this address (on the media port).
    Udp(SocketAddr),
    /// A QUIC client on this connection (whatever its address is now: connections migrate).
    Quic(ConnId),
    /// A TURN allocation (RFC 8656) of a client at this address on the media port: the same
    /// UDP socket as [`Endpoint::Udp`], framed as TURN (ChannelData, Data indications).
    TurnUdp(SocketAddr),
    /// A TURN allocation of a client on this TCP connection (`turn:…?transport=tcp`): TURN
    /// messages framed on the stream (RFC 8656 §12.5). One connection holds one allocation.
    TurnTcp(ConnId),
    /// The same over TLS (`turns:…?transport=tcp`).
    TurnTls(ConnId),
}

impl From<SocketAddr> for Endpoint {
    /// A UDP client's endpoint.
    fn from(a: SocketAddr) -> Self {
        Self::Udp(a)
    }
}

impl PartialEq<SocketAddr> for Endpoint {
    /// True for the UDP endpoint of that address.
    fn eq(&self, other: &SocketAddr) -> bool {
        matches!(self, Self::Udp(a) if a == other)
    }
}

impl Endpoint {
    /// The transport's name, for logs ("udp", "quic"). Never an address.
    pub fn transport(&self) -> &'static str {
        match self {
            Self::Udp(_) => "udp",
            Self::Quic(_) => "quic",
            Self::TurnUdp(_) => "turn-udp",
            Self::TurnTcp(_) => "turn-tcp",
            Self::TurnTls(_) => "turn-tls",
        }
    }

    /// True for TURN allocations, which receive media framed as TURN, addressed to them.
    pub fn is_turn(&self) -> bool {
        matches!(self, Self::TurnUdp(_) | Self::TurnTcp(_) | Self::TurnTls(_))
    }
}

/// TURN allocations one leg may hold at once on a relay: a WebRTC stack may gather on several
/// sockets with the same credentials before BUNDLE settles, and releases the extra ones at once
/// (aiortc: one per transceiver; Chromium: one per network interface and transport, four on
/// a machine with loopback and one interface). Allocation `k` of leg `n` takes slot `n + 16k`
/// of the session.
pub const TURN_ALLOCATIONS_PER_LEG: u8 = 8;
/// Slots of a session: its legs, and their extra TURN allocations.
pub const MAX_SLOTS: usize = MAX_LEGS as usize * TURN_ALLOCATIONS_PER_LEG as usize;

/// What the forwarding of other legs needs to know of a TURN allocation: the peers it permits
/// and the channels it bound, by peer leg index. Replaced (never changed in place) on every
/// CreatePermission or ChannelBind, which are rare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnView {
    /// Unix milliseconds until which each peer slot is permitted (0: never).
    pub permits_until: [u64; MAX_SLOTS],
    /// The channel number bound to each peer slot (0: none).
    pub channels: [u16; MAX_SLOTS],
}

impl Default for TurnView {
    fn default() -> Self {
        Self {
            permits_until: [0; MAX_SLOTS],
            channels: [0; MAX_SLOTS],
        }
    }
}

impl TurnView {
    /// True if `peer` is permitted at `now_unix_ms`.
    #[inline]
    pub fn permits(&self, peer: u8, now_unix_ms: u64) -> bool {
        self.permits_until
            .get(usize::from(peer))
            .is_some_and(|&t| t > now_unix_ms)
    }

    /// The channel bound to `peer`, if any.
    #[inline]
    pub fn channel_of(&self, peer: u8) -> Option<u16> {
        self.channels
            .get(usize::from(peer))
            .copied()
            .filter(|&c| c != 0)
    }

    /// The peer leg bound to `channel`, if any.
    #[inline]
    pub fn peer_of(&self, channel: u16) -> Option<u8> {
        self.channels
            .iter()
            .position(|&c| c == channel)
            .map(|i| i as u8)
    }
}

/// One bound leg in a [`LegSet`].
#[derive(Debug, Clone)]
struct Slot {
    leg: u8,
    ep: Endpoint,
    /// False while the endpoint's current path is unproven (a QUIC connection that moved to an
    /// address that has not answered a PROBE): media is withheld from it.
    reachable: bool,
    /// A TURN allocation's permissions and channels; `None` for native legs.
    turn: Option<Arc<TurnView>>,
    /// This binding's id (unique among the relay's bindings until it wraps at 2^32, in what
    /// was padding), kept while the leg moves within the relay.
    binding: u32,
    /// What this binding carried (with `Config::leg_counters`), kept likewise.
    counters: Option<Arc<LegCounters>>,
    /// The rate limits of the ticket it was bound with (a kernel fast path enforces them too).
    limits: Limits,
}

/// The bound legs of one session: an immutable snapshot, replaced on every change.
#[derive(Debug, Default, Clone)]
pub struct LegSet {
    /// Exactly as many as bound: a set is rebuilt on every change, never grown in place.
    slots: Box<[Slot]>,
    /// Slots not reachable now (almost always 0, which keeps the media path to one branch).
    withheld: u8,
    /// Slots that are TURN allocations.
    turn: u8,
}

impl LegSet {
    /// The endpoint leg `leg` is bound to, if any.
    #[inline]
    pub fn get(&self, leg: u8) -> Option<Endpoint> {
        self.slots.iter().find(|s| s.leg == leg).map(|s| s.ep)
    }

    /// Every reachable native endpoint except that of leg `except`: where media from `except`
    /// goes. TURN allocations are not among them: TURN is addressed (a datagram names the one
    /// allocation it is for), and a native leg has no relayed address a TURN client could
    /// have permitted.
    #[inline]
    pub fn others(&self, except: u8) -> impl Iterator<Item = Endpoint> + '_ {
        self.slots
            .iter()
            .filter(move |s| s.leg != except && s.reachable && s.turn.is_none())
            .map(|s| s.ep)
    }

    /// Counts one datagram of `len` bytes sent to each of [`LegSet::others`]`(except)`.
    #[inline]
    pub(crate) fn count_sent(&self, except: u8, len: usize) {
        for s in self
            .slots
            .iter()
            .filter(|s| s.leg != except && s.reachable && s.turn.is_none())
        {
            if let Some(c) = &s.counters {
                c.sent(len);
            }
        }
    }

    /// Leg `leg`'s endpoint and its binding's counters (if the relay counts), if it is bound.
    #[inline]
    pub(crate) fn bound(&self, leg: u8) -> Option<(Endpoint, Option<&LegCounters>)> {
        self.slots
            .iter()
            .find(|s| s.leg == leg)
            .map(|s| (s.ep, s.counters.as_deref()))
    }

    /// The counters of leg `leg`'s binding, if it is bound and the relay counts.
    #[inline]
    pub(crate) fn counters(&self, leg: u8) -> Option<&LegCounters> {
        self.bound(leg).and_then(|(_, c)| c)
    }

    /// Bound native legs other than `except` whose media is withheld (unproven path).
    #[inline]
    pub fn withheld_from(&self, except: u8) -> usize {
        if self.withheld == 0 {
            0
        } else {
            self.slots
                .iter()
                .filter(|s| s.leg != except && !s.reachable)
                .count()
        }
    }

    /// How many of the bound legs are TURN allocations.
    #[inline]
    pub fn turn_legs(&self) -> usize {
        usize::from(self.turn)
    }

    /// Leg `leg`'s endpoint and, for a TURN allocation, its permissions and channels.
    #[inline]
    pub fn turn_view(&self, leg: u8) -> Option<(Endpoint, &TurnView)> {
        self.slots
            .iter()
            .find(|s| s.leg == leg)
            .and_then(|s| s.turn.as_deref().map(|v| (s.ep, v)))
    }

    /// Number of bound legs.
    #[inline]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True if no leg is bound.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn rebuilt(slots: Vec<Slot>) -> Self {
        // At most 16 legs a session (tokens say so), so the counts fit.
        let withheld = slots.iter().filter(|s| !s.reachable).count() as u8;
        let turn = slots.iter().filter(|s| s.turn.is_some()).count() as u8;
        Self {
            slots: slots.into_boxed_slice(),
            withheld,
            turn,
        }
    }

    /// The set with leg `leg` bound to `ep`: a leg already bound keeps its binding (id and
    /// counters), a new one takes `fresh`'s.
    fn with(
        &self,
        leg: u8,
        ep: Endpoint,
        limits: Limits,
        fresh: impl FnOnce() -> (u32, Option<Arc<LegCounters>>),
    ) -> Self {
        let (binding, counters) = match self.slots.iter().find(|s| s.leg == leg) {
            Some(s) => (s.binding, s.counters.clone()),
            None => fresh(),
        };
        let slot = Slot {
            leg,
            ep,
            reachable: true,
            turn: ep.is_turn().then(|| Arc::new(TurnView::default())),
            binding,
            counters,
            limits,
        };
        // Sized exactly, so that boxing the slice moves nothing and frees nothing.
        let present = self.slots.iter().any(|s| s.leg == leg);
        let mut slots = Vec::with_capacity(self.slots.len() + usize::from(!present));
        slots.extend(self.slots.iter().map(|s| {
            if s.leg == leg {
                slot.clone()
            } else {
                s.clone()
            }
        }));
        if !present {
            slots.push(slot);
        }
        Self::rebuilt(slots)
    }

    /// The set without any slot of leg `leg` (its native slot and its extra TURN allocations),
    /// and the endpoints those slots held.
    fn without_leg(&self, leg: u8) -> (Self, Vec<Slot>) {
        let (gone, kept): (Vec<Slot>, Vec<Slot>) = self
            .slots
            .iter()
            .cloned()
            .partition(|s| s.leg % MAX_LEGS == leg);
        (Self::rebuilt(kept), gone)
    }

    fn without(&self, leg: u8) -> Self {
        Self::rebuilt(
            self.slots
                .iter()
                .filter(|s| s.leg != leg)
                .cloned()
                .collect(),
        )
    }

    fn with_view(&self, leg: u8, view: TurnView) -> Self {
        let mut slots = self.slots.to_vec();
        for s in slots
            .iter_mut()
            .filter(|s| s.leg == leg && s.turn.is_some())
        {
            s.turn = Some(Arc::new(view.clone()));
        }
        Self::rebuilt(slots)
    }

    fn reachable(&self, leg: u8, reachable: bool) -> Self {
        let mut slots = self.slots.to_vec();
        for s in slots.iter_mut().filter(|s| s.leg == leg) {
            s.reachable = reachable;
        }
        Self::rebuilt(slots)
    }
}

/// One session as a relay serves it.
#[derive(Debug)]
pub struct Session {
    id: SessionId,
    /// Its tokens' expiry, or later once the controller extended it (only ever moves later).
    expires_unix_ms: AtomicU64,
    legs: ArcSwap<LegSet>,
    /// Bit `i` set: leg `i` was revoked (its participant removed); all set: the session was.
    closed: AtomicU16,
    /// When a kernel fast path last saw each leg's media (the node's monotonic ms + 1; 0:
    /// never): what keeps an offloaded leg from going idle. Allocated on the first note, so a
    /// session no fast path serves pays one pointer.
    fast_seen: OnceLock<Box<[AtomicU64; MAX_LEGS as usize]>>,
}

/// Every leg of a session, as a [`Session::closed`] mask.
const ALL_LEGS: u16 = u16::MAX;

/// Leg `slot`'s bit in a [`Session::closed`] mask (a slot `leg + 16k` is leg `leg`'s).
#[inline]
fn leg_bit(slot: u8) -> u16 {
    1 << (slot % MAX_LEGS)
}

impl Session {
    /// The session id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// When the session expires, Unix milliseconds: its tokens' expiry, or the later one the
    /// controller extended it to.
    pub fn expires_unix_ms(&self) -> u64 {
        self.expires_unix_ms.load(Ordering::Relaxed)
    }

    /// The current bound legs. Lock-free; hold the guard only briefly (one packet).
    #[inline]
    pub fn legs(&self) -> arc_swap::Guard<Arc<LegSet>> {
        self.legs.load()
    }

    /// True once the session was revoked: forward nothing more.
    #[inline]
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed) == ALL_LEGS
    }

    /// Credits what a kernel fast path carried for leg `slot` since its last reading, at
    /// `mono_ms` (the node's monotonic milliseconds, [`crate::Node::mono_ms`]): `rx` media
    /// datagrams and bytes received from it, `dropped` of them, `fwd` forwarded to leg `peer`.
    /// Into their bindings' counters where the relay counts, and into `slot`'s idle clock.
    pub fn credit_fast(
        &self,
        slot: u8,
        peer: u8,
        mono_ms: u64,
        rx: (u64, u64),
        dropped: u64,
        fwd: (u64, u64),
    ) {
        self.note_fast(slot, mono_ms);
        let legs = self.legs.load();
        if let Some(c) = legs.counters(slot) {
            c.add_fast(rx, dropped, (0, 0));
        }
        if let Some(c) = legs.counters(peer) {
            c.add_fast((0, 0), 0, fwd);
        }
    }

    fn note_fast(&self, slot: u8, mono_ms: u64) {
        let seen = self
            .fast_seen
            .get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
        seen[usize::from(slot % MAX_LEGS)].fetch_max(mono_ms + 1, Ordering::Relaxed);
    }

    /// When a kernel fast path last saw leg `slot`'s media, the node's monotonic ms, if ever.
    pub(crate) fn fast_seen(&self, slot: u8) -> Option<u64> {
        let seen = self.fast_seen.get()?;
        match seen[usize::from(slot % MAX_LEGS)].load(Ordering::Relaxed) {
            0 => None,
            t => Some(t - 1),
        }
    }

    /// True once the session, or leg `slot` of it alone, was revoked: forward nothing more from
    /// or to that leg. One load, as [`Session::is_closed`] was: the media path pays nothing for
    /// single-leg revocation.
    #[inline]
    pub fn is_closed_for(&self, slot: u8) -> bool {
        self.closed.load(Ordering::Relaxed) & leg_bit(slot) != 0
    }
}

/// Why the directory refused a bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// The session was revoked.
    #[error("session closed")]
    SessionClosed,
    /// The leg holds as many TURN allocations here as it may.
    #[error("allocation quota reached")]
    QuotaReached,
    /// The relay holds its maximum number of legs.
    #[error("relay full")]
    RelayFull,
    /// The relay is draining and the session is not already served here.
    #[error("draining")]
    Draining,
}

/// A successful bind.
#[derive(Debug)]
pub struct Bound {
    /// The session.
    pub session: Arc<Session>,
    /// The endpoint the leg was bound to before, if it moved.
    pub previous: Option<Endpoint>,
}

/// Why a leg stopped being bound on this relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It sent nothing for longer than the idle timeout.
    Idle,
    /// Its session's tokens (or its TURN allocation's lifetime) expired.
    Expired,
    /// Its QUIC or TURN connection closed, or its TURN client released the allocation.
    Disconnected,
    /// The relay drained or stopped: its client was told to move to the backup relay.
    Evicted,
    /// Its session was released.
    Released,
    /// Its participant was removed from the session.
    Removed,
    /// Its endpoint was bound to another leg since (one endpoint holds one leg).
    Replaced,
}

/// What happened to a leg's binding on this relay: the directory tells its observer
/// ([`Directory::observe`]) of every one, as it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegChange {
    /// The session.
    pub session: SessionId,
    /// The leg's slot (its index, or `index + 16k` for an extra TURN allocation).
    pub slot: u8,
    /// The transport of the endpoint concerned ([`Endpoint::transport`]); never an address.
    pub transport: &'static str,
    /// The binding's id: unique among the relay's bindings (until it wraps at 2^32).
    pub binding: u64,
    /// Its counters at the change (final ones, for an unbind), if the relay counts.
    pub counts: Option<Counts>,
    /// Bound, or unbound and why.
    pub kind: ChangeKind,
}

/// The kinds of [`LegChange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Bound here: first bound (`moved` false) or moved to another endpoint of this relay (its
    /// counters go on).
    Bound {
        /// True if the leg was bound here at another endpoint before.
        moved: bool,
    },
    /// No longer bound here.
    Unbound(Ended),
}

/// A session a kernel fast path may forward: two legs, both bound over native UDP at addresses of
/// one family, both reachable, neither revoked. Anything else (a third leg, TURN, QUIC) is
/// forwarded by the workers alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastPair {
    /// The session.
    pub session: SessionId,
    /// Its expiry, Unix milliseconds (extensions included).
    pub expires_unix_ms: u64,
    /// Each leg: its slot, its client's address and its ticket's limits.
    pub legs: [(u8, SocketAddr, Limits); 2],
}

/// One bound leg as [`Directory::bound_legs`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundLeg {
    /// The session.
    pub session: SessionId,
    /// The leg's slot.
    pub slot: u8,
    /// Its endpoint's transport; never an address.
    pub transport: &'static str,
    /// The binding's id.
    pub binding: u64,
    /// Its counters now, if the relay counts.
    pub counts: Option<Counts>,
}

impl Slot {
    fn change(&self, session: SessionId, kind: ChangeKind) -> LegChange {
        LegChange {
            session,
            slot: self.leg,
            transport: self.ep.transport(),
            binding: u64::from(self.binding),
            counts: self.counters.as_ref().map(|c| c.counts()),
            kind,
        }
    }
}

/// Who hears of every [`LegChange`].
struct Observer(Box<dyn Fn(LegChange) + Send + Sync>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Keyed by controller-chosen random ids, not by anything a client picks freely (a client
    /// only reaches this map with an authenticated ticket): SipHash's cost is irrelevant here,
    /// as the map is touched on binds and expiry only, never per packet.
    sessions: HashMap<SessionId, Arc<Session>>,
    /// Revoked sessions and their token expiry: refused until then.
    revoked: HashMap<SessionId, u64>,
    /// Revoked single legs (removed participants) of sessions that go on: a mask of leg
    /// indices, and the tokens' expiry.
    revoked_legs: HashMap<SessionId, (u16, u64)>,
    /// Sessions the controller extended past their tokens' expiry, and until when. Soft state
    /// like the revocations: replayed by the controller when the relay attaches.
    extended: HashMap<SessionId, u64>,
}

impl Inner {
    /// `expires_unix_ms`, or the later expiry session `id` was extended to.
    fn extended_until(&self, id: SessionId, expires_unix_ms: u64) -> u64 {
        self.extended
            .get(&id)
            .map_or(expires_unix_ms, |&e| e.max(expires_unix_ms))
    }

    fn refuses(&self, ticket: &Ticket) -> bool {
        self.revoked.contains_key(&ticket.session)
            || self
                .revoked_legs
                .get(&ticket.session)
                .is_some_and(|(mask, _)| mask & leg_bit(ticket.leg) != 0)
    }
}

/// The table of sessions and their bound legs, shared by a relay's workers and adapters.
#[derive(Debug)]
pub struct Directory {
    inner: Mutex<Inner>,
    legs: AtomicUsize,
    /// Of `legs`, those bound to TURN allocations.
    turn_legs: AtomicUsize,
    max_legs: usize,
    draining: AtomicBool,
    /// The next binding's id.
    next_binding: std::sync::atomic::AtomicU32,
    /// Whether bindings count what they carry (`Config::leg_counters`).
    counting: bool,
    observer: std::sync::OnceLock<Observer>,
}

impl Directory {
    /// An empty directory that accepts at most `max_legs` bound legs.
    pub fn new(max_legs: usize) -> Self {
        Self {
            inner: Mutex::default(),
            legs: AtomicUsize::new(0),
            turn_legs: AtomicUsize::new(0),
            max_legs,
            draining: AtomicBool::new(false),
            next_binding: std::sync::atomic::AtomicU32::new(1),
            counting: false,
            observer: std::sync::OnceLock::new(),
        }
    }

    /// The directory, counting what each binding carries ([`LegCounters`]) if `on`.
    pub fn with_leg_counters(mut self, on: bool) -> Self {
        self.counting = on;
        self
    }

    /// Calls `f` with every [`LegChange`] from now on, as it happens (under the directory's
    /// lock: `f` must not block or call back into the directory). At most one observer; a
    /// second call changes nothing and returns false.
    pub fn observe(&self, f: impl Fn(LegChange) + Send + Sync + 'static) -> bool {
        self.observer.set(Observer(Box::new(f))).is_ok()
    }

    fn tell(&self, change: LegChange) {
        if let Some(o) = self.observer.get() {
            (o.0)(change);
        }
    }

    /// Session `id` as a kernel fast path may forward it, if it may ([`FastPair`]).
    pub fn fast_pair(&self, id: SessionId) -> Option<FastPair> {
        let inner = self.lock();
        let session = inner.sessions.get(&id)?;
        if session.closed.load(Ordering::Relaxed) != 0 {
            return None;
        }
        let legs = session.legs.load();
        let [a, b] = &legs.slots[..] else {
            return None;
        };
        let udp = |s: &Slot| match s.ep {
            Endpoint::Udp(addr) if s.reachable => Some((s.leg, addr, s.limits)),
            _ => None,
        };
        let (a, b) = (udp(a)?, udp(b)?);
        (a.1.is_ipv4() == b.1.is_ipv4()).then(|| FastPair {
            session: id,
            expires_unix_ms: session.expires_unix_ms(),
            legs: [a, b],
        })
    }

    /// Session `id`, if a leg of it is bound here.
    pub fn session(&self, id: SessionId) -> Option<Arc<Session>> {
        self.lock().sessions.get(&id).cloned()
    }

    /// Every leg bound now, with its counters.
    pub fn bound_legs(&self) -> Vec<BoundLeg> {
        let inner = self.lock();
        let mut out = Vec::with_capacity(self.legs());
        for s in inner.sessions.values() {
            for slot in s.legs.load().slots.iter() {
                out.push(BoundLeg {
                    session: s.id,
                    slot: slot.leg,
                    transport: slot.ep.transport(),
                    binding: u64::from(slot.binding),
                    counts: slot.counters.as_ref().map(|c| c.counts()),
                });
            }
        }
        out
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves maps that are still consistent (every update is
        // a single insert or remove), so poisoning carries no information: recover.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Binds leg `ticket.leg` of `ticket.session` to `ep`, replacing any previous endpoint of
    /// that leg. The caller has authenticated the ticket and checked its expiry.
    pub fn bind(&self, ticket: &Ticket, ep: Endpoint) -> Result<Bound, BindError> {
        let inner = self.lock();
        self.bind_slot(inner, ticket, ticket.leg, ep)
    }

    /// Binds a TURN allocation of `ticket`'s leg to `ep`: in the leg's slot `ep` already holds,
    /// else its first free one (slot `leg + 16k`). Returns the slot too.
    pub fn bind_turn(&self, ticket: &Ticket, ep: Endpoint) -> Result<(Bound, u8), BindError> {
        let inner = self.lock();
        let legs = inner
            .sessions
            .get(&ticket.session)
            .map(|s| s.legs.load_full());
        let slots = (0..TURN_ALLOCATIONS_PER_LEG).map(|k| ticket.leg + MAX_LEGS * k);
        let slot = match &legs {
            None => ticket.leg,
            Some(legs) => slots
                .clone()
                .find(|&s| legs.get(s) == Some(ep))
                .or_else(|| slots.clone().find(|&s| legs.get(s).is_none()))
                .ok_or(BindError::QuotaReached)?,
        };
        Ok((self.bind_slot(inner, ticket, slot, ep)?, slot))
    }

    fn bind_slot(
        &self,
        mut inner: MutexGuard<'_, Inner>,
        ticket: &Ticket,
        slot: u8,
        ep: Endpoint,
    ) -> Result<Bound, BindError> {
        if inner.refuses(ticket) {
            return Err(BindError::SessionClosed);
        }
        let existing = inner.sessions.get(&ticket.session).cloned();
        let previous = existing.as_ref().and_then(|s| s.legs.load().get(slot));
        if previous.is_none() {
            if existing.is_none() && self.draining.load(Ordering::Relaxed) {
                return Err(BindError::Draining);
            }
            if self.legs.load(Ordering::Relaxed) >= self.max_legs {
                return Err(BindError::RelayFull);
            }
            self.legs.fetch_add(1, Ordering::Relaxed);
        }
        match (previous.is_some_and(|p| p.is_turn()), ep.is_turn()) {
            (false, true) => {
                self.turn_legs.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.turn_legs.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        // A ticket minted after an extension names the later expiry itself, signed: it may
        // reach this relay before the controller's word of the extension does.
        let expiry = inner.extended_until(ticket.session, ticket.expires_unix_ms);
        if let Some(s) = &existing {
            s.expires_unix_ms.fetch_max(expiry, Ordering::Relaxed);
        }
        let session = existing.unwrap_or_else(|| {
            let s = Arc::new(Session {
                id: ticket.session,
                expires_unix_ms: AtomicU64::new(expiry),
                legs: ArcSwap::from_pointee(LegSet::default()),
                closed: AtomicU16::new(0),
                fast_seen: OnceLock::new(),
            });
            inner.sessions.insert(ticket.session, s.clone());
            s
        });
        let next = session.legs.load().with(slot, ep, ticket.limits, || {
            (
                self.next_binding.fetch_add(1, Ordering::Relaxed),
                self.counting.then(|| Arc::new(LegCounters::default())),
            )
        });
        if previous != Some(ep)
            && let Some(s) = next.slots.iter().find(|s| s.leg == slot)
        {
            self.tell(s.change(
                ticket.session,
                ChangeKind::Bound {
                    moved: previous.is_some(),
                },
            ));
        }
        session.legs.store(Arc::new(next));
        Ok(Bound { session, previous })
    }

    /// Unbinds leg `leg` of `session` if it is still bound to `ep` (it may have moved since);
    /// returns whether it was. Removes the session once its last leg is gone.
    pub fn unbind(&self, session: &Session, leg: u8, ep: Endpoint, why: Ended) -> bool {
        let mut inner = self.lock();
        let legs = session.legs.load();
        if legs.get(leg) != Some(ep) {
            return false;
        }
        if let Some(slot) = legs.slots.iter().find(|s| s.leg == leg) {
            self.tell(slot.change(session.id, ChangeKind::Unbound(why)));
        }
        let next = legs.without(leg);
        let empty = next.is_empty();
        session.legs.store(Arc::new(next));
        self.legs.fetch_sub(1, Ordering::Relaxed);
        if ep.is_turn() {
            self.turn_legs.fetch_sub(1, Ordering::Relaxed);
        }
        if empty
            && inner
                .sessions
                .get(&session.id)
                .is_some_and(|s| std::ptr::eq(Arc::as_ptr(s), session))
        {
            inner.sessions.remove(&session.id);
        }
        true
    }

    /// Changes the permissions and channels of TURN allocation `leg` of `session`, if still
    /// bound to `ep`; returns the new view, or `None` if the leg is not bound there.
    pub fn update_turn(
        &self,
        session: &Session,
        leg: u8,
        ep: Endpoint,
        change: impl FnOnce(&mut TurnView),
    ) -> Option<TurnView> {
        let _inner = self.lock();
        let legs = session.legs.load();
        let (at, view) = legs.turn_view(leg)?;
        if at != ep {
            return None;
        }
        let mut view = view.clone();
        change(&mut view);
        let next = legs.with_view(leg, view.clone());
        session.legs.store(Arc::new(next));
        Some(view)
    }

    /// Marks leg `leg` of `session`, if still bound to `ep`, as reachable or not: media is
    /// withheld from an unreachable leg. Returns whether the leg was bound there.
    pub fn set_reachable(&self, session: &Session, leg: u8, ep: Endpoint, reachable: bool) -> bool {
        let _inner = self.lock();
        let legs = session.legs.load();
        if legs.get(leg) != Some(ep) {
            return false;
        }
        let next = legs.reachable(leg, reachable);
        session.legs.store(Arc::new(next));
        true
    }

    /// Revokes a session until `expires_unix_ms`: its legs are unbound at once, workers stop
    /// forwarding its media at their next packet, and its tokens no longer bind. Returns the
    /// session's endpoints that were bound, so the caller can tell them.
    pub fn revoke(&self, id: SessionId, expires_unix_ms: u64) -> Vec<Endpoint> {
        let mut inner = self.lock();
        let until = inner.extended_until(id, expires_unix_ms);
        inner.revoked.insert(id, until);
        let Some(session) = inner.sessions.remove(&id) else {
            return Vec::new();
        };
        session.closed.store(ALL_LEGS, Ordering::Relaxed);
        let legs = session.legs.swap(Arc::new(LegSet::default()));
        for slot in legs.slots.iter() {
            self.tell(slot.change(id, ChangeKind::Unbound(Ended::Released)));
        }
        self.legs.fetch_sub(legs.len(), Ordering::Relaxed);
        self.turn_legs
            .fetch_sub(legs.turn_legs(), Ordering::Relaxed);
        legs.slots.iter().map(|s| s.ep).collect()
    }

    /// Revokes leg `leg` of session `id` alone until `expires_unix_ms` (its participant was
    /// removed; the others go on): its slots are unbound at once (its extra TURN allocations
    /// too), no other leg forwards to it from its next packet, its own packets are dropped and
    /// answered as a revoked session's are, and its token no longer binds. Returns the
    /// endpoints it was bound to, so the caller can tell them.
    pub fn revoke_leg(&self, id: SessionId, leg: u8, expires_unix_ms: u64) -> Vec<Endpoint> {
        let leg = leg % MAX_LEGS;
        let mut inner = self.lock();
        let until = inner.extended_until(id, expires_unix_ms);
        let entry = inner.revoked_legs.entry(id).or_insert((0, until));
        entry.0 |= leg_bit(leg);
        entry.1 = entry.1.max(until);
        let Some(session) = inner.sessions.get(&id).cloned() else {
            return Vec::new();
        };
        session.closed.fetch_or(leg_bit(leg), Ordering::Relaxed);
        let (next, gone) = session.legs.load().without_leg(leg);
        for slot in &gone {
            self.tell(slot.change(id, ChangeKind::Unbound(Ended::Removed)));
        }
        let empty = next.is_empty();
        session.legs.store(Arc::new(next));
        self.legs.fetch_sub(gone.len(), Ordering::Relaxed);
        let turn = gone.iter().filter(|s| s.ep.is_turn()).count();
        self.turn_legs.fetch_sub(turn, Ordering::Relaxed);
        if empty {
            inner.sessions.remove(&id);
        }
        gone.into_iter().map(|s| s.ep).collect()
    }

    /// Extends session `id` to `expires_unix_ms` (never earlier than it was): its tokens bind
    /// until then, its bound legs are served until then (each notices at its next packet or
    /// sweep), and its TURN allocations may be refreshed until then. Its revocations, of the
    /// session or of single legs, last as long, so that no removed participant's token binds
    /// again in the extra time.
    pub fn extend(&self, id: SessionId, expires_unix_ms: u64) {
        let mut inner = self.lock();
        let e = inner.extended.entry(id).or_insert(expires_unix_ms);
        *e = (*e).max(expires_unix_ms);
        let until = *e;
        if let Some(exp) = inner.revoked.get_mut(&id) {
            *exp = (*exp).max(until);
        }
        if let Some((_, exp)) = inner.revoked_legs.get_mut(&id) {
            *exp = (*exp).max(until);
        }
        if let Some(session) = inner.sessions.get(&id) {
            session.expires_unix_ms.fetch_max(until, Ordering::Relaxed);
        }
    }

    /// When `ticket`'s session expires, Unix milliseconds: the ticket's own expiry, or the later
    /// one the controller extended the session to.
    pub fn expiry(&self, ticket: &Ticket) -> u64 {
        self.lock()
            .extended_until(ticket.session, ticket.expires_unix_ms)
    }

    /// Number of session extensions in force.
    pub fn extensions(&self) -> usize {
        self.lock().extended.len()
    }

    /// True if `id` is revoked.
    pub fn is_revoked(&self, id: SessionId) -> bool {
        self.lock().revoked.contains_key(&id)
    }

    /// True if `ticket` may not bind: its session, or its leg alone, is revoked.
    pub fn refuses(&self, ticket: &Ticket) -> bool {
        self.lock().refuses(ticket)
    }

    /// Forgets revocations and extensions that have expired by `now_unix_ms`.
    pub fn forget_expired_revocations(&self, now_unix_ms: u64) {
        let mut inner = self.lock();
        inner.revoked.retain(|_, exp| *exp > now_unix_ms);
        inner.revoked_legs.retain(|_, (_, exp)| *exp > now_unix_ms);
        inner.extended.retain(|_, exp| *exp > now_unix_ms);
    }

    /// Number of session revocations in force.
    pub fn revocations(&self) -> usize {
        self.lock().revoked.len()
    }

    /// Number of single-leg revocations in force.
    pub fn leg_revocations(&self) -> usize {
        self.lock()
            .revoked_legs
            .values()
            .map(|(mask, _)| mask.count_ones() as usize)
            .sum()
    }

    /// Number of sessions with at least one bound leg.
    pub fn sessions(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Number of bound legs.
    pub fn legs(&self) -> usize {
        self.legs.load(Ordering::Relaxed)
    }

    /// Number of bound legs that are TURN allocations.
    pub fn turn_legs(&self) -> usize {
        self.turn_legs.load(Ordering::Relaxed)
    }

    /// The most legs this directory accepts.
    pub fn max_legs(&self) -> usize {
        self.max_legs
    }

    /// Starts (or stops) draining: binds for sessions not already served here are refused.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    /// True while draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{KeyId, Limits};

    fn ticket(session: u64, leg: u8) -> Ticket {
        Ticket {
            key_id: KeyId(1),
            session: SessionId(session),
            leg,
            legs: 4,
            expires_unix_ms: 1_000,
            limits: Limits::default(),
        }
    }

    fn udp(port: u16) -> Endpoint {
        Endpoint::Udp(SocketAddr::from(([127, 0, 0, 2], port)))
    }

    #[test]
    fn bind_rebind_unbind() {
        let d = Directory::new(10);
        let a = d.bind(&ticket(1, 0), udp(1)).unwrap();
        assert_eq!(a.previous, None);
        let b = d.bind(&ticket(1, 1), udp(2)).unwrap();
        assert!(Arc::ptr_eq(&a.session, &b.session));
        assert_eq!(d.legs(), 2);
        assert_eq!(a.session.legs().others(0).collect::<Vec<_>>(), vec![udp(2)]);

        // The leg moves: same count, new endpoint, the old one reported.
        let moved = d.bind(&ticket(1, 1), udp(3)).unwrap();
        assert_eq!(moved.previous, Some(udp(2)));
        assert_eq!(d.legs(), 2);
        assert!(
            !d.unbind(&a.session, 1, udp(2), Ended::Idle),
            "stale endpoint unbinds nothing"
        );
        assert!(d.unbind(&a.session, 1, udp(3), Ended::Idle));
        assert!(d.unbind(&a.session, 0, udp(1), Ended::Idle));
        assert_eq!((d.legs(), d.sessions()), (0, 0));

        // A new bind after the session emptied starts a new session object.
        let c = d.bind(&ticket(1, 0), udp(1)).unwrap();
        assert!(!Arc::ptr_eq(&a.session, &c.session));
    }

    #[test]
    fn every_bind_move_and_unbind_is_told_with_its_binding_and_counters() {
        let d = Directory::new(10).with_leg_counters(true);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        assert!(d.observe(move |c| log.lock().unwrap().push(c)));
        assert!(!d.observe(|_| {}), "one observer");
        let take = || std::mem::take(&mut *seen.lock().unwrap());

        let a = d.bind(&ticket(1, 0), udp(1)).unwrap();
        d.bind(&ticket(1, 1), udp(2)).unwrap();
        let bound = take();
        let (id_a, id_b) = (bound[0].binding, bound[1].binding);
        assert_ne!(id_a, id_b);
        // A datagram from leg 0 to leg 1, as the forwarding path counts it.
        let legs = a.session.legs();
        legs.counters(0).unwrap().received(100);
        legs.count_sent(0, 100);
        assert_eq!(legs.counters(1).unwrap().counts().packets_out, 1);
        assert_eq!(
            legs.counters(0).unwrap().counts().packets_out,
            0,
            "not to the sender"
        );
        // Moving keeps the binding and its counters.
        d.bind(&ticket(1, 1), udp(3)).unwrap();
        assert_eq!(
            a.session.legs().counters(1).unwrap().counts().packets_out,
            1
        );
        // Binding again where it is tells nothing.
        d.bind(&ticket(1, 1), udp(3)).unwrap();
        assert!(d.unbind(&a.session, 0, udp(1), Ended::Idle));
        let kinds: Vec<_> = take().iter().map(|c| (c.slot, c.binding, c.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (1, id_b, ChangeKind::Bound { moved: true }),
                (0, id_a, ChangeKind::Unbound(Ended::Idle)),
            ]
        );
        let bound = d.bound_legs();
        assert_eq!(bound.len(), 1);
        assert_eq!(
            (bound[0].slot, bound[0].counts.map(|c| c.packets_out)),
            (1, Some(1))
        );

        // Removal and release are told, with the final counters.
        d.bind(&ticket(1, 2), udp(4)).unwrap();
        take();
        d.revoke_leg(SessionId(1), 1, 500);
        let removed = take();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].kind, ChangeKind::Unbound(Ended::Removed));
        assert_eq!(removed[0].counts.map(|c| c.packets_out), Some(1));
        assert_eq!(removed[0].transport, "udp");
        d.revoke(SessionId(1), 500);
        let released = take();
        assert_eq!(
            released
                .iter()
                .map(|c| (c.slot, c.kind))
                .collect::<Vec<_>>(),
            vec![(2, ChangeKind::Unbound(Ended::Released))]
        );
        assert!(d.bound_legs().is_empty());

        // A relay that does not count tells the same changes, with no counts.
        let quiet = Directory::new(10);
        let b = quiet.bind(&ticket(1, 0), udp(1)).unwrap();
        assert!(b.session.legs().counters(0).is_none());
        assert_eq!(quiet.bound_legs()[0].counts, None);
    }

    #[test]
    fn capacity_counts_legs_not_rebinds() {
        let d = Directory::new(2);
        d.bind(&ticket(1, 0), udp(1)).unwrap();
        d.bind(&ticket(1, 1), udp(2)).unwrap();
        assert_eq!(
            d.bind(&ticket(1, 2), udp(3)).unwrap_err(),
            BindError::RelayFull
        );
        assert_eq!(
            d.bind(&ticket(2, 0), udp(3)).unwrap_err(),
            BindError::RelayFull
        );
        assert!(
            d.bind(&ticket(1, 1), udp(4)).is_ok(),
            "moving a bound leg needs no capacity"
        );
    }

    #[test]
    fn revoke_closes_and_refuses() {
        let d = Directory::new(10);
        let a = d.bind(&ticket(1, 0), udp(1)).unwrap();
        d.bind(&ticket(1, 1), udp(2)).unwrap();
        let mut eps = d.revoke(SessionId(1), 500);
        eps.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(eps, vec![udp(1), udp(2)]);
        assert!(a.session.is_closed());
        assert!(a.session.legs().is_empty());
        assert_eq!((d.legs(), d.sessions()), (0, 0));
        assert_eq!(
            d.bind(&ticket(1, 0), udp(1)).unwrap_err(),
            BindError::SessionClosed
        );
        assert!(!d.unbind(&a.session, 0, udp(1), Ended::Idle));
        d.forget_expired_revocations(499);
        assert!(d.is_revoked(SessionId(1)));
        d.forget_expired_revocations(500);
        assert!(!d.is_revoked(SessionId(1)));
    }

    #[test]
    fn revoking_one_leg_leaves_the_others() {
        let d = Directory::new(10);
        let a = d.bind(&ticket(1, 0), udp(1)).unwrap();
        d.bind(&ticket(1, 1), udp(2)).unwrap();
        d.bind(&ticket(1, 2), udp(3)).unwrap();
        let (b, slot) = d
            .bind_turn(
                &ticket(1, 1),
                Endpoint::TurnUdp(SocketAddr::from(([127, 0, 0, 9], 1))),
            )
            .unwrap();
        assert_eq!(slot, 1 + MAX_LEGS, "leg 1's second allocation");
        assert!(Arc::ptr_eq(&a.session, &b.session));
        assert_eq!((d.legs(), d.turn_legs()), (4, 1));

        let mut eps = d.revoke_leg(SessionId(1), 1, 500);
        eps.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(
            eps.len(),
            2,
            "the leg's native slot and its TURN allocation: {eps:?}"
        );
        assert!(eps.contains(&udp(2)));
        assert_eq!((d.legs(), d.turn_legs(), d.sessions()), (2, 0, 1));
        assert!(!a.session.is_closed(), "the session goes on");
        assert!(a.session.is_closed_for(1) && a.session.is_closed_for(1 + MAX_LEGS));
        assert!(!a.session.is_closed_for(0) && !a.session.is_closed_for(2));
        assert_eq!(a.session.legs().others(0).collect::<Vec<_>>(), vec![udp(3)]);

        // Its token binds nowhere again, on this session object or a new one; others do.
        assert_eq!(
            d.bind(&ticket(1, 1), udp(4)).unwrap_err(),
            BindError::SessionClosed
        );
        assert!(d.refuses(&ticket(1, 1)) && !d.refuses(&ticket(1, 0)));
        assert!(
            d.bind(&ticket(1, 0), udp(5)).is_ok(),
            "another leg may move"
        );
        assert_eq!(d.leg_revocations(), 1);
        // A leg revoked before the session reaches this relay is refused too.
        assert!(d.revoke_leg(SessionId(2), 3, 500).is_empty());
        assert_eq!(
            d.bind(&ticket(2, 3), udp(6)).unwrap_err(),
            BindError::SessionClosed
        );
        assert!(d.bind(&ticket(2, 0), udp(6)).is_ok());
        d.forget_expired_revocations(500);
        assert_eq!(d.leg_revocations(), 0);
        assert!(!d.refuses(&ticket(2, 3)));
    }

    #[test]
    fn an_extension_moves_the_expiry_and_keeps_the_revocations() {
        let d = Directory::new(10);
        let a = d.bind(&ticket(1, 0), udp(1)).unwrap();
        d.bind(&ticket(1, 1), udp(2)).unwrap();
        d.revoke_leg(SessionId(1), 1, 1_000);
        assert_eq!(a.session.expires_unix_ms(), 1_000);

        d.extend(SessionId(1), 5_000);
        assert_eq!(a.session.expires_unix_ms(), 5_000, "the bound session");
        assert_eq!(d.expiry(&ticket(1, 2)), 5_000, "its tokens");
        assert_eq!(d.expiry(&ticket(2, 0)), 1_000, "another session's are not");
        d.extend(SessionId(1), 3_000);
        assert_eq!(
            d.expiry(&ticket(1, 0)),
            5_000,
            "an extension never shortens"
        );

        // Past the tokens' own expiry, the removed participant stays removed.
        d.forget_expired_revocations(4_999);
        assert!(d.refuses(&ticket(1, 1)) && !d.refuses(&ticket(1, 0)));
        assert_eq!(d.extensions(), 1);
        // A revocation that arrives after the extension (with the tokens' expiry) lasts as long.
        d.revoke(SessionId(1), 1_000);
        d.forget_expired_revocations(4_999);
        assert!(d.is_revoked(SessionId(1)));

        // A session extended before its first leg binds here starts extended.
        d.extend(SessionId(3), 7_000);
        let c = d.bind(&ticket(3, 0), udp(3)).unwrap();
        assert_eq!(c.session.expires_unix_ms(), 7_000);

        d.forget_expired_revocations(5_000);
        assert!(!d.is_revoked(SessionId(1)) && !d.refuses(&ticket(1, 1)));
        assert_eq!(d.expiry(&ticket(1, 0)), 1_000, "the extension is forgotten");
        assert_eq!(d.extensions(), 1);
    }

    #[test]
    fn draining_refuses_only_new_sessions() {
        let d = Directory::new(10);
        d.bind(&ticket(1, 0), udp(1)).unwrap();
        d.set_draining(true);
        assert_eq!(
            d.bind(&ticket(2, 0), udp(2)).unwrap_err(),
            BindError::Draining
        );
        assert!(
            d.bind(&ticket(1, 1), udp(3)).is_ok(),
            "a call already here continues"
        );
        assert!(
            d.bind(&ticket(1, 0), udp(4)).is_ok(),
            "and its legs may move"
        );
    }
}
