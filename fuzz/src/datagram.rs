//! The relay's whole datagram path, driven by a fuzzer-chosen sequence of operations in virtual
//! time, and checked against a model kept by the harness.
//!
//! The scenario is one relay node with two UDP workers sharing its session table (a client's
//! address always reaches the same worker, as the kernel's `SO_REUSEPORT` hash does). Legitimate
//! participants hold the tokens in [`tokens`]; some legs are bound before the fuzzer's first
//! operation. The fuzzer then chooses, step by step, raw datagrams from any of the addresses in
//! [`source`], complete binds by a legitimate client from any address, replays of what
//! legitimate clients sent (from any address), media, time passing (which fires the workers'
//! timers as a shell would), revocations, and drain.
//!
//! # The model
//!
//! The harness learns which address holds which leg only from what a legitimate client can
//! check itself: a BIND_OK that answers a BIND whose tag verifies under the cluster key ring and
//! whose cookie this relay minted for that very address and ticket, less than its lifetime ago.
//! It forgets a leg when the relay must have (another address bound it, the address bound another
//! leg, the session was revoked). It never forgets idle legs, whose exact unbinding time depends
//! on the sweep: the model may think an address holds a leg the relay has dropped, never the
//! reverse, so every check below is sound.
//!
//! # Invariants checked after every operation
//!
//! - Nothing panics (overflow checks are on in fuzz builds).
//! - A datagram is forwarded only from an address that holds a leg whose token has not expired
//!   (expiry is checked per packet); to addresses that hold other legs of the same session (never
//!   the sender, never another session's); to distinct addresses, as many as `Targets::len` says.
//!   Media after expiry ends the leg with a CLOSE (expired) to its holder, and only then.
//! - An answer to an address that holds no leg is no longer than the datagram it answers, and
//!   there is at most one answer per datagram.
//! - The relay sends nothing to an address that never held a leg, except that one answer.
//! - Every answer parses and matches its request: CHALLENGE only for a BIND whose tag verifies,
//!   with a cookie valid for the sender; BIND_OK only as described above, for an unexpired,
//!   unrevoked ticket; KEEPALIVE_ACK only to an address that holds a leg; ERROR with the request's
//!   transaction id and a code that fits the request.
//! - A legitimate client that echoes a fresh cookie is never challenged again.
//! - A BIND goes unanswered only when the bind limiter refuses it, and the limiter refuses one
//!   only after its worker admitted at least a full burst (twice the per-address rate) of BINDs
//!   from that IP address.
//! - Every datagram is counted as received, and exactly once as forwarded, handled, or dropped
//!   for one reason.
//! - Once every leg has been idle for longer than the idle timeout and the workers have swept,
//!   no worker holds a leg and the session table counts none (no leaked capacity).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use veil_relay_core::cookie::Cookies;
use veil_relay_core::token::{KeyId, KeyRing, Limits, SessionId, Ticket, Token};
use veil_relay_core::wire::{self, COOKIE_LEN, ClientMessage, ErrorCode, RelayMessage};
use veil_relay_core::{Config, DropReason, Endpoint, Node, Relay, Stats, Verdict};

use crate::Reader;

/// Wall clock of the scenario's start, Unix milliseconds.
pub const T0_UNIX_MS: u64 = 1_800_000_000_000;
/// Legs a worker sweeps for expiry this often.
pub const SWEEP: Duration = Duration::from_millis(250);
/// A leg that sends nothing for this long is unbound (shorter than the relay's default, so that
/// the fuzzer reaches it in a few steps).
pub const LEG_IDLE: Duration = Duration::from_secs(5);
/// Most legs the node accepts: small, so that the fuzzer fills it.
pub const MAX_LEGS: usize = 8;
/// Longest raw datagram the harness passes (the shell drops anything over 1500 bytes first; the
/// core must cope with any length all the same).
pub const MAX_DATAGRAM: usize = 2048;
/// Most operations one input runs.
pub const MAX_OPS: usize = 512;
/// Cookie lifetime on every relay.
const COOKIE_LIFETIME: Duration = Duration::from_secs(10);
/// Legitimate messages kept for replay.
const REPLAY_LOG: usize = 16;
/// Workers of the node.
const WORKERS: usize = 2;

/// The sources the fuzzer sends from, by index (taken modulo the pool's size).
pub fn source(i: u8) -> SocketAddr {
    const POOL: [&str; 12] = [
        "127.0.0.2:4000",
        "127.0.0.3:4000",
        "127.0.0.4:4000",
        "127.0.0.5:4000",
        // The first one after a NAT rebinding.
        "127.0.0.2:4001",
        "127.0.0.6:5000",
        // An off-path attacker.
        "192.0.2.66:6666",
        "[::1]:4000",
        "[2001:db8::1]:4000",
        // The first one again, as a dual-stack socket would see it.
        "[::ffff:127.0.0.2]:4000",
        "0.0.0.0:0",
        "255.255.255.255:65535",
    ];
    POOL[usize::from(i) % POOL.len()]
        .parse()
        .expect("the pool holds valid addresses")
}

/// The worker the kernel hands `addr`'s datagrams to: a fixed function of the address.
fn worker_of(addr: SocketAddr) -> usize {
    let ip_low = match addr.ip() {
        IpAddr::V4(v4) => usize::from(v4.octets()[3]),
        IpAddr::V6(v6) => usize::from(v6.octets()[15]),
    };
    (ip_low + usize::from(addr.port())) % WORKERS
}

/// The tokens of the scenario's legitimate clients, by index (taken modulo their number).
///
/// | index | session | leg    | notes                                              |
/// |------:|--------:|--------|----------------------------------------------------|
/// | 0–2   | 7       | 0–2/3  |                                                    |
/// | 3–4   | 8       | 0–1/2  | leg 0 limited to 50 packets/s and 200 kbit/s       |
/// | 5–6   | 9       | 0–1/2  | expires 20 s after the start                       |
/// | 7–8   | 10      | 0,15/16| signed with key 1, the ring's non-signing key      |
/// | 9     | 11      | 0/2    | signed with key 3, which the relay does not hold   |
/// | 10    | 12      | 0/2    | expired before the start                           |
/// | 11    | 7       | 0/3    | forged: leg 1's leg key spliced onto leg 0's ticket |
pub fn tokens() -> Vec<Token> {
    let ring = crate::key_ring();
    let old_key = crate::signer(1).expect("key 1 is in the ring");
    let unknown_key = KeyRing::from_keys(&[(3, [3; 32])], 3);
    let ticket = |session: u64, leg: u8, legs: u8, ttl_ms: i64| Ticket {
        key_id: KeyId(0),
        session: SessionId(session),
        leg,
        legs,
        expires_unix_ms: T0_UNIX_MS.saturating_add_signed(ttl_ms),
        limits: Limits::default(),
    };
    let hour = 3_600_000;
    let mut limited = ticket(8, 0, 2, hour);
    limited.limits = Limits {
        max_pps: 50,
        max_kbps: 200,
    };
    let mut out = vec![
        ring.mint(ticket(7, 0, 3, hour)),
        ring.mint(ticket(7, 1, 3, hour)),
        ring.mint(ticket(7, 2, 3, hour)),
        ring.mint(limited),
        ring.mint(ticket(8, 1, 2, hour)),
        ring.mint(ticket(9, 0, 2, 20_000)),
        ring.mint(ticket(9, 1, 2, 20_000)),
        old_key.mint(ticket(10, 0, 16, hour)),
        old_key.mint(ticket(10, 15, 16, hour)),
        unknown_key.mint(ticket(11, 0, 2, hour)),
        ring.mint(ticket(12, 0, 2, -1)),
    ];
    let mut forged = out[0].to_bytes();
    forged[32..].copy_from_slice(&out[1].to_bytes()[32..]);
    out.push(Token::from_bytes(&forged).expect("a spliced token is well formed"));
    out
}

/// The sessions the fuzzer may revoke, by index (taken modulo their number).
const SESSIONS: [u64; 6] = [7, 8, 9, 10, 11, 12];

/// One step of a scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Any bytes, from `source(src)`.
    Datagram {
        /// Source index.
        src: u8,
        /// The datagram.
        bytes: Vec<u8>,
    },
    /// The legitimate holder of `tokens()[token]` binds from `source(src)`: BIND, then BIND
    /// with the cookie of the CHALLENGE.
    Bind {
        /// Token index.
        token: u8,
        /// Source index.
        src: u8,
    },
    /// Sends again, from `source(src)`, one of the last messages legitimate clients sent.
    Replay {
        /// Index into the replay log, newest first.
        entry: u8,
        /// Source index.
        src: u8,
    },
    /// Time passes; due timers fire.
    Advance {
        /// How long, in milliseconds.
        ms: u16,
    },
    /// The controller releases a session.
    Revoke {
        /// Index into the sessions.
        session: u8,
    },
    /// The node's housekeeping tick (forgets revocations of expired tokens).
    Tick,
    /// Starts or stops draining.
    Drain {
        /// Draining or not.
        on: bool,
    },
    /// A well-formed media datagram or KEEPALIVE from `source(src)`.
    Media {
        /// Source index.
        src: u8,
        /// 0: RTP, 1: RTCP, 2: DTLS, 3: KEEPALIVE (modulo 4).
        kind: u8,
        /// Length (media only), modulo 1501.
        len: u16,
    },
}

impl Op {
    /// Appends the operation's encoding, as [`decode`] reads it.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Datagram { src, bytes } => {
                let len = u16::try_from(bytes.len()).expect("datagrams fit a u16");
                out.extend_from_slice(&[0, *src]);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(bytes);
            }
            Self::Bind { token, src } => out.extend_from_slice(&[1, *token, *src]),
            Self::Replay { entry, src } => out.extend_from_slice(&[2, *entry, *src]),
            Self::Advance { ms } => {
                out.push(3);
                out.extend_from_slice(&ms.to_be_bytes());
            }
            Self::Revoke { session } => out.extend_from_slice(&[4, *session]),
            Self::Tick => out.push(5),
            Self::Drain { on } => out.extend_from_slice(&[6, u8::from(*on)]),
            Self::Media { src, kind, len } => {
                out.extend_from_slice(&[7, *src, *kind]);
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
    }
}

/// Encodes a whole scenario.
pub fn encode(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        op.encode(&mut out);
    }
    out
}

/// Reads the operations of an input: each starts with a tag byte, taken modulo 8, then its
/// fields (see [`Op::encode`]). Any input decodes; at most [`MAX_OPS`] operations.
pub fn decode(data: &[u8]) -> Vec<Op> {
    let mut r = Reader::new(data);
    let mut ops = Vec::new();
    while !r.is_empty() && ops.len() < MAX_OPS {
        let op = match r.u8() % 8 {
            0 => {
                let src = r.u8();
                let len = usize::from(r.u16()).min(MAX_DATAGRAM);
                Op::Datagram {
                    src,
                    bytes: r.bytes(len).to_vec(),
                }
            }
            1 => Op::Bind {
                token: r.u8(),
                src: r.u8(),
            },
            2 => Op::Replay {
                entry: r.u8(),
                src: r.u8(),
            },
            3 => Op::Advance { ms: r.u16() },
            4 => Op::Revoke { session: r.u8() },
            5 => Op::Tick,
            6 => Op::Drain {
                on: r.u8() & 1 == 1,
            },
            _ => Op::Media {
                src: r.u8(),
                kind: r.u8(),
                len: r.u16(),
            },
        };
        ops.push(op);
    }
    ops
}

/// The origin of virtual time: one real clock reading per process.
fn t0() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

/// A leg as the model knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    session: SessionId,
    leg: u8,
    expires_unix_ms: u64,
}

/// What the harness knows for sure, from a client's point of view.
#[derive(Debug, Default)]
struct Model {
    /// Addresses that may hold a leg, and which. Never misses one the relay holds.
    holds: HashMap<SocketAddr, Held>,
    /// Every address that ever held a leg.
    ever_bound: HashSet<SocketAddr>,
    /// Revoked sessions, and when their tokens expire.
    revoked: HashMap<SessionId, u64>,
    /// BINDs each worker admitted from each source IP address (past its bind limiter).
    binds_admitted: HashMap<(usize, IpAddr), u32>,
}

/// A relay node with its workers, the legitimate clients' tokens, and the model.
#[derive(Debug)]
pub struct Scenario {
    now: Instant,
    node: Arc<Node>,
    workers: Vec<Relay>,
    ring: KeyRing,
    cookies: Cookies,
    tokens: Vec<Token>,
    model: Model,
    log: Vec<(SocketAddr, Vec<u8>)>,
    next_txn: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Self::new()
    }
}

impl Scenario {
    /// A node with two workers, and three legs already bound: session 7 legs 0 and 1 (on
    /// different workers), and the rate-limited leg 0 of session 8.
    pub fn new() -> Self {
        let now = t0();
        let ring = crate::key_ring();
        let config = Config {
            leg_idle: LEG_IDLE,
            sweep_interval: SWEEP,
            ..Config::default()
        };
        let node = Arc::new(Node::new(
            config,
            ring.clone(),
            MAX_LEGS,
            *crate::COOKIE_SECRET,
            now,
            T0_UNIX_MS,
        ));
        let workers = (0..WORKERS)
            .map(|_| Relay::new(node.clone(), now))
            .collect();
        let mut s = Self {
            now,
            node,
            workers,
            ring,
            cookies: Cookies::new(*crate::COOKIE_SECRET, COOKIE_LIFETIME),
            tokens: tokens(),
            model: Model::default(),
            log: Vec::new(),
            next_txn: 0,
        };
        for (token, src) in [(0, 0), (1, 1), (3, 2)] {
            s.run(&Op::Bind { token, src });
            assert!(
                s.model.holds.contains_key(&source(src)),
                "setup bind of token {token} failed"
            );
        }
        assert_ne!(worker_of(source(0)), worker_of(source(1)));
        s.log.clear();
        s
    }

    /// Runs one operation and checks every invariant.
    pub fn run(&mut self, op: &Op) {
        match op {
            Op::Datagram { src, bytes } => {
                self.deliver(source(*src), bytes);
            }
            Op::Bind { token, src } => self.bind(usize::from(*token), source(*src)),
            Op::Replay { entry, src } => {
                if !self.log.is_empty() {
                    let i = self.log.len() - 1 - usize::from(*entry) % self.log.len();
                    let bytes = self.log[i].1.clone();
                    self.deliver(source(*src), &bytes);
                }
            }
            Op::Advance { ms } => {
                self.now += Duration::from_millis(u64::from(*ms));
                self.fire_timers();
            }
            Op::Revoke { session } => {
                let id = SessionId(SESSIONS[usize::from(*session) % SESSIONS.len()]);
                let expires = self.session_expiry(id);
                for ep in self.node.revoke(id, expires) {
                    let Endpoint::Udp(a) = ep else {
                        panic!("a QUIC endpoint in a UDP-only relay: {ep:?}")
                    };
                    assert!(self.model.ever_bound.contains(&a));
                }
                self.model.holds.retain(|_, h| h.session != id);
                self.model.revoked.insert(id, expires);
            }
            Op::Tick => {
                self.node.tick(self.now);
                let now_unix = self.node.unix_ms(self.now);
                self.model.revoked.retain(|_, exp| *exp > now_unix);
            }
            Op::Drain { on } => self.node.directory.set_draining(*on),
            Op::Media { src, kind, len } => {
                let len = usize::from(*len) % 1501;
                let pkt = match kind % 4 {
                    0 | 1 => {
                        let mut p = vec![0u8; len];
                        if let Some(b) = p.first_mut() {
                            *b = 0x80;
                        }
                        if let Some(b) = p.get_mut(1) {
                            *b = if kind % 4 == 0 { 111 } else { 200 };
                        }
                        p
                    }
                    2 => {
                        let mut p = vec![0u8; len];
                        p.iter_mut().zip([22, 0xfe, 0xfd]).for_each(|(b, v)| *b = v);
                        p
                    }
                    _ => {
                        let txn = self.txn();
                        wire::keepalive(txn).to_vec()
                    }
                };
                self.deliver(source(*src), &pkt);
            }
        }
        assert!(self.node.directory.legs() <= MAX_LEGS);
    }

    fn txn(&mut self) -> [u8; 8] {
        self.next_txn += 1;
        self.next_txn.to_be_bytes()
    }

    fn session_expiry(&self, id: SessionId) -> u64 {
        self.tokens
            .iter()
            .find(|t| t.claims().session == id)
            .map_or(T0_UNIX_MS, |t| t.claims().expires_unix_ms)
    }

    fn mono_ms(&self) -> u64 {
        self.now.saturating_duration_since(t0()).as_millis() as u64
    }

    /// BINDs the worker serving `from` has refused for its bind rate so far.
    fn rate_limited(&self, from: SocketAddr) -> u64 {
        self.workers[worker_of(from)]
            .stats()
            .drops_for(DropReason::BindRateLimited)
    }

    fn log(&mut self, from: SocketAddr, pkt: &[u8]) {
        if self.log.len() == REPLAY_LOG {
            self.log.remove(0);
        }
        self.log.push((from, pkt.to_vec()));
    }

    /// A legitimate client holding token `token` binds from `from`.
    fn bind(&mut self, token: usize, from: SocketAddr) {
        let token = self.tokens[token % self.tokens.len()].clone();
        let txn = self.txn();
        let first = wire::bind(&token, txn, None);
        self.log(from, &first);
        let limited = self.rate_limited(from);
        let answers = self.deliver(from, &first);
        if self.rate_limited(from) > limited {
            assert!(answers.is_empty(), "a rate-limited BIND was answered");
            return;
        }
        assert_eq!(answers.len(), 1, "a BIND gets exactly one answer");
        let cookie: [u8; COOKIE_LEN] = match wire::parse_relay(&answers[0]) {
            Ok(RelayMessage::Challenge { cookie, .. }) => {
                cookie.try_into().expect("cookies are 24 bytes")
            }
            // Refused (checked in `check_answer`).
            _ => return,
        };
        let txn = self.txn();
        let second = wire::bind(&token, txn, Some(&cookie));
        self.log(from, &second);
        let limited = self.rate_limited(from);
        let answers = self.deliver(from, &second);
        if self.rate_limited(from) > limited {
            assert!(answers.is_empty(), "a rate-limited BIND was answered");
            return;
        }
        assert_eq!(answers.len(), 1, "a BIND gets exactly one answer");
        assert!(
            !matches!(
                wire::parse_relay(&answers[0]),
                Ok(RelayMessage::Challenge { .. })
            ),
            "a fresh cookie, echoed from the address it was sent to, was refused"
        );
    }

    /// Fires the workers' timers that are due, as the shell's timer does, and checks what they
    /// send.
    fn fire_timers(&mut self) {
        for w in 0..WORKERS {
            let due = self.workers[w]
                .poll_timeout()
                .is_some_and(|t| t <= self.now);
            if !due {
                continue;
            }
            let before = *self.workers[w].stats();
            self.workers[w].handle_timeout(self.now);
            let after = *self.workers[w].stats();
            assert_eq!(after.rx_packets, before.rx_packets);
            assert_eq!(after.forwarded_packets, before.forwarded_packets);
            while let Some(t) = self.workers[w].poll_transmit() {
                assert!(
                    self.model.ever_bound.contains(&t.dst),
                    "a timer sent to an address that never held a leg"
                );
                assert!(
                    matches!(
                        wire::parse_relay(t.msg.as_bytes()),
                        Ok(RelayMessage::Close { .. })
                    ),
                    "a timer sent something other than CLOSE"
                );
            }
            while self.workers[w].poll_event().is_some() {}
            assert!(
                self.workers[w].poll_timeout().is_some_and(|t| t > self.now),
                "the sweep did not re-arm its timer"
            );
        }
    }

    /// Hands one datagram to the worker that serves `from`, checks the verdict, the counters and
    /// every transmit, and returns the answers addressed to `from`.
    fn deliver(&mut self, from: SocketAddr, pkt: &[u8]) -> Vec<Vec<u8>> {
        let w = worker_of(from);
        let held = self.model.holds.get(&from).copied();
        let now_unix = self.node.unix_ms(self.now);
        let before = *self.workers[w].stats();
        let verdict = self.workers[w].handle_datagram(self.now, from, pkt);
        let after = *self.workers[w].stats();
        assert_eq!(after.rx_packets, before.rx_packets + 1);
        assert_eq!(after.rx_bytes, before.rx_bytes + pkt.len() as u64);
        let drops = after.total_drops() - before.total_drops();
        if matches!(wire::parse_client(pkt), Ok(ClientMessage::Bind(_))) {
            // The bind limiter starts each source IP address with a burst of twice its rate
            // and refills it; a refusal therefore comes only after at least that burst.
            let admitted = self.model.binds_admitted.entry((w, from.ip())).or_default();
            if matches!(verdict, Verdict::Drop(DropReason::BindRateLimited)) {
                assert!(
                    *admitted >= 2 * Config::default().binds_per_ip,
                    "a BIND refused by the rate limiter after {admitted} admitted from its address"
                );
            } else {
                *admitted += 1;
            }
        }
        match &verdict {
            Verdict::Forward(targets) => {
                let Some(held) = held else {
                    panic!("forwarded a datagram from {from}, which holds no leg");
                };
                assert!(
                    now_unix < held.expires_unix_ms,
                    "forwarded for a leg whose token has expired"
                );
                let eps: Vec<Endpoint> = targets.iter().collect();
                assert!(!eps.is_empty(), "forwarded to nobody");
                assert_eq!(eps.len(), targets.len());
                let mut seen = HashSet::new();
                for ep in eps {
                    let Endpoint::Udp(to) = ep else {
                        panic!("a QUIC target in a UDP-only relay: {ep:?}")
                    };
                    assert_ne!(to, from, "forwarded a datagram back to its sender");
                    assert!(seen.insert(to), "{to} targeted twice");
                    let Some(peer) = self.model.holds.get(&to) else {
                        panic!("forwarded to {to}, which holds no leg");
                    };
                    assert_eq!(peer.session, held.session, "forwarded across sessions");
                    assert_ne!(peer.leg, held.leg, "forwarded to the sender's own leg");
                }
                assert_eq!(
                    after.forwarded_packets - before.forwarded_packets,
                    seen.len() as u64
                );
                assert_eq!(
                    after.forwarded_bytes - before.forwarded_bytes,
                    (seen.len() * pkt.len()) as u64
                );
                assert_eq!(drops, 0, "a forwarded datagram was also counted as dropped");
            }
            Verdict::Drop(reason) => {
                assert_eq!(drops, 1, "a drop counted {drops} times");
                assert_eq!(after.drops_for(*reason), before.drops_for(*reason) + 1);
                assert_eq!(after.forwarded_packets, before.forwarded_packets);
            }
            Verdict::Control => {
                // A BIND with a stale cookie is answered with a fresh CHALLENGE, and counted as
                // a bad cookie.
                assert!(drops <= 1);
                assert_eq!(
                    drops,
                    after.drops_for(DropReason::BadCookie)
                        - before.drops_for(DropReason::BadCookie)
                );
                assert_eq!(after.forwarded_packets, before.forwarded_packets);
            }
        }
        drop(verdict);

        let mut answers = Vec::new();
        while let Some(t) = self.workers[w].poll_transmit() {
            let msg = t.msg.as_bytes();
            if t.dst == from {
                if held.is_none() {
                    assert!(
                        msg.len() <= pkt.len(),
                        "{}-byte answer to a {}-byte datagram from an address that holds no leg",
                        msg.len(),
                        pkt.len()
                    );
                }
                self.check_answer(from, pkt, msg, held);
                answers.push(msg.to_vec());
            } else {
                assert!(
                    self.model.ever_bound.contains(&t.dst),
                    "sent to {}, which never held a leg, while handling a datagram from {from}",
                    t.dst
                );
            }
        }
        assert!(
            answers.len() <= 1,
            "{} answers to one datagram",
            answers.len()
        );
        while let Some(e) = self.workers[w].poll_event() {
            if let veil_relay_core::Event::Bound { peer, .. } = e {
                assert_eq!(peer, from);
            }
        }
        answers
    }

    /// Checks one answer to `pkt` from `from`, and learns from a BIND_OK.
    fn check_answer(&mut self, from: SocketAddr, pkt: &[u8], answer: &[u8], held: Option<Held>) {
        let Ok(msg) = wire::parse_relay(answer) else {
            panic!("the relay sent a message a client cannot parse: {answer:02x?}");
        };
        let request = wire::parse_client(pkt);
        let now_unix = self.node.unix_ms(self.now);
        match msg {
            RelayMessage::Challenge { txn, cookie } => {
                let Ok(ClientMessage::Bind(b)) = request else {
                    panic!("CHALLENGE answers something other than a BIND");
                };
                assert_eq!(txn, b.txn);
                assert!(
                    self.ring.verify(b.ticket, b.signed, b.tag).is_ok(),
                    "CHALLENGE for a BIND whose tag does not verify"
                );
                assert_eq!(
                    self.cookies.check(self.mono_ms(), from, b.ticket, cookie),
                    Ok(()),
                    "CHALLENGE with a cookie not valid for its destination"
                );
            }
            RelayMessage::BindOk {
                txn,
                idle_timeout_secs,
            } => {
                let Ok(ClientMessage::Bind(b)) = request else {
                    panic!("BIND_OK answers something other than a BIND");
                };
                assert_eq!(txn, b.txn);
                assert_eq!(u64::from(idle_timeout_secs), LEG_IDLE.as_secs());
                let Ok(ticket) = self.ring.verify(b.ticket, b.signed, b.tag) else {
                    panic!("BIND_OK for a BIND whose tag does not verify");
                };
                let Some(cookie) = b.cookie else {
                    panic!("BIND_OK for a BIND without a cookie");
                };
                assert_eq!(
                    self.cookies.check(self.mono_ms(), from, b.ticket, cookie),
                    Ok(()),
                    "BIND_OK for a cookie not valid for the sender"
                );
                assert!(
                    ticket.expires_unix_ms > now_unix,
                    "BIND_OK for an expired ticket"
                );
                assert!(
                    !self.model.revoked.contains_key(&ticket.session),
                    "BIND_OK for a revoked session"
                );
                // The leg is at `from` now, and only there; `from` holds only this leg.
                self.model
                    .holds
                    .retain(|_, h| (h.session, h.leg) != (ticket.session, ticket.leg));
                self.model.holds.insert(
                    from,
                    Held {
                        session: ticket.session,
                        leg: ticket.leg,
                        expires_unix_ms: ticket.expires_unix_ms,
                    },
                );
                self.model.ever_bound.insert(from);
            }
            RelayMessage::KeepaliveAck { txn } => {
                assert_eq!(request, Ok(ClientMessage::Keepalive { txn }));
                assert!(
                    held.is_some(),
                    "KEEPALIVE_ACK to an address that holds no leg"
                );
            }
            RelayMessage::Close { code, .. } => {
                assert!(
                    matches!(request, Ok(ClientMessage::Keepalive { .. }))
                        || matches!(wire::classify(pkt), wire::Class::Rtp | wire::Class::Dtls),
                    "CLOSE answers something other than media or KEEPALIVE"
                );
                assert!(self.model.ever_bound.contains(&from));
                if code == ErrorCode::Expired as u16 {
                    // Expiry is checked per packet: the first datagram after the token's
                    // expiry ends the leg, and the client is told why.
                    let Some(held) = held else {
                        panic!("CLOSE (expired) to an address that holds no leg");
                    };
                    assert!(
                        now_unix >= held.expires_unix_ms,
                        "CLOSE (expired) for a leg whose token is still valid"
                    );
                    self.model.holds.remove(&from);
                } else {
                    assert_eq!(code, ErrorCode::SessionClosed as u16);
                }
            }
            RelayMessage::Error { txn, code } => {
                let code = ErrorCode::from_u16(code).expect("the relay sends known codes");
                match request {
                    Ok(ClientMessage::Keepalive { txn: t }) => {
                        assert_eq!(txn, t);
                        assert_eq!(code, ErrorCode::NotBound);
                    }
                    Ok(ClientMessage::Bind(b)) => {
                        assert_eq!(txn, b.txn);
                        assert!(
                            matches!(
                                code,
                                ErrorCode::Unauthorized
                                    | ErrorCode::Expired
                                    | ErrorCode::SessionClosed
                                    | ErrorCode::RelayFull
                                    | ErrorCode::Draining
                            ),
                            "{code:?} answers a BIND"
                        );
                        if code == ErrorCode::Unauthorized {
                            assert!(
                                self.ring.verify(b.ticket, b.signed, b.tag).is_err(),
                                "a BIND whose tag verifies refused as unauthorized"
                            );
                        }
                    }
                    Err(_) => panic!("ERROR answers a malformed message"),
                }
            }
        }
    }
}

/// Runs a whole input: the `datagram` fuzz target. Returns the workers' counters, summed.
pub fn run(data: &[u8]) -> Stats {
    let mut s = Scenario::new();
    for op in decode(data) {
        s.run(&op);
    }
    // Let every leg go idle, sweep, and check what the timers send. Then nothing may be left:
    // a leg the session table still counts, or a worker still holds, would be a leak (capacity
    // that never comes back, or an address that keeps receiving).
    s.run(&Op::Advance { ms: 60_000 });
    for w in &s.workers {
        assert_eq!(
            w.local_legs(),
            0,
            "a worker holds a leg after every leg went idle"
        );
    }
    assert_eq!(
        s.node.directory.legs(),
        0,
        "legs leaked in the session table"
    );
    assert_eq!(
        s.node.directory.sessions(),
        0,
        "sessions leaked in the session table"
    );
    s.stats()
}

impl Scenario {
    /// The node's counters, summed over workers.
    pub fn stats(&self) -> Stats {
        let mut total = Stats::default();
        for w in &self.workers {
            total.merge(w.stats());
        }
        total
    }
}
