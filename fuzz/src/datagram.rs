//! The relay's whole packet path, for both of its doors (UDP workers and QUIC connections),
//! driven by a fuzzer-chosen sequence of operations in virtual time, and checked against a model
//! kept by the harness.
//!
//! The scenario is one relay node with two UDP workers sharing its session table (a client's
//! address always reaches the same worker, as the kernel's `SO_REUSEPORT` hash does), and up to
//! [`CONNS`] QUIC connections at a time, each with a [`ForwardingTable`] of its own that takes its
//! bind budget from one limiter shared by every connection, as `relay/src/quic.rs` builds them.
//! Legitimate participants hold the tokens in [`tokens`]; some legs are bound over UDP before the
//! fuzzer's first operation. The fuzzer then chooses, step by step, raw datagrams from any of the
//! addresses in [`source`], complete binds by a legitimate client from any address, replays of
//! what legitimate clients sent (from any address, on either transport), media, time passing
//! (which fires every table's timer as a shell would), revocations, drain and eviction; and, for
//! QUIC, connections opening (from any address), the BIND on their stream (channel-bound to the
//! connection's TLS exporter value, bound to another one, or in UDP's format), datagrams on them
//! (media, KEEPALIVE, PROBE_ACK, BINDs), connection migrations (to an address the client really
//! receives at, or to one it forges), the peer closing them, and the relay shutting down.
//!
//! The harness drives each QUIC connection as `relay/src/quic.rs` does: one BIND read from the
//! connection's first stream (exactly [`wire::BIND_LEN`] bytes), handed to
//! [`ForwardingTable::handle_stream_bind`] with the connection's address and exporter value; the
//! connection is closed if that binds nothing, and otherwise as soon as its table reports its leg
//! ended (an `Unbound` event for its endpoint); datagrams only once bound; a changed address goes
//! to [`ForwardingTable::handle_path`] before anything else; the peer's close to
//! [`ForwardingTable::handle_disconnect`]; the relay stopping to
//! [`ForwardingTable::handle_shutdown`]. Reliable transmits go on the connection's stream, the
//! others as datagrams.
//!
//! # The model
//!
//! The harness learns which endpoint holds which leg only from what a legitimate client can
//! check itself: a BIND_OK that answers a BIND whose tag verifies under the cluster key ring,
//! over UDP with a cookie this relay minted for that very address and ticket less than its
//! lifetime ago, over QUIC on the connection's stream with a tag that also covers that
//! connection's exporter value. It forgets a leg when the relay must have (another endpoint bound
//! it, the endpoint bound another leg, the session was revoked, the QUIC connection closed, an
//! evicting sweep ran in its table). It never forgets idle legs, whose exact unbinding time
//! depends on the sweep: the model may think an endpoint holds a leg the relay has dropped, never
//! the reverse. A held leg is *live* while its token is unexpired and it was active (bound, media,
//! KEEPALIVE) less than the idle timeout ago: the relay must still serve a live leg. A token is
//! unexpired until its own expiry, or until the later one its session was extended to (an
//! `Extend` operation, as ExtendSession sends it to relays, for live sessions only); an
//! extension moves the expiry of the session's held legs and revocations with it.
//!
//! For each QUIC connection the model knows its current address (what the shell reported), the
//! last address proven for it (its address at bind time, then whatever a PROBE_ACK proved), and
//! which PROBEs the client received: those sent while it really was at the connection's current
//! address, not while a forged address was. A QUIC leg is *reachable* while its connection's
//! current address is proven. An IPv4 address and its IPv4-mapped IPv6 form are one address
//! throughout, for the model as for the relay's cookies.
//!
//! # Invariants checked after every operation
//!
//! - Nothing panics (overflow checks are on in fuzz builds).
//! - A datagram is forwarded only from an endpoint that holds a leg whose token has not expired
//!   (expiry is checked per packet); to endpoints that hold other legs of the same session (never
//!   the sender, never another session's), whose QUIC path, if any, is proven; to distinct
//!   endpoints, as many as `Targets::len` says; to every live reachable leg of the session; and
//!   the copies withheld from unproven paths are counted as such, one per leg, neither more than
//!   the session's unreachable legs nor fewer than its live ones. Media from a live leg is
//!   forwarded, or dropped only for its rate limit, for want of a peer, or because every peer's
//!   path is unproven; media after expiry ends the leg with a CLOSE (expired) to its holder, and
//!   only then. Nothing is ever forwarded to a QUIC connection that has closed.
//! - An answer to a UDP address that holds no leg is no longer than the datagram it answers, and
//!   there is at most one answer per datagram (and one per stream BIND).
//! - The relay sends nothing to an endpoint that never held a leg, except that one answer; a QUIC
//!   connection's table sends to that connection only, a UDP worker's to UDP addresses only.
//! - Every answer parses and matches its request: CHALLENGE only for a UDP BIND whose tag
//!   verifies, with a cookie valid for the sender; BIND_OK only as described above, for an
//!   unexpired, unrevoked ticket; KEEPALIVE_ACK only to an endpoint that holds a leg, and always to
//!   a live one; ERROR with the request's transaction id and a code that fits the request (never
//!   Unauthorized for a BIND whose tag verifies for the transport it came on, always Unauthorized
//!   for a BIND on the wrong transport: channel-bound over UDP, UDP's over QUIC, any as a QUIC
//!   datagram); PROBE_ACK and PROBE are never answered. Answers to a stream BIND and CLOSE are
//!   reliable, everything else is not.
//! - A legitimate client that echoes a fresh cookie is never challenged again.
//! - A BIND goes unanswered only when the bind limiter refuses it, and a limiter refuses one only
//!   after it admitted at least a full burst (twice the per-address rate) of BINDs from that IP
//!   address (each UDP worker has a limiter, the QUIC connections share one).
//! - Every datagram and stream BIND is counted as received, and once as forwarded, handled, or
//!   dropped for one reason (besides the withheld copies); every BIND once as bound, challenged
//!   or refused, and bound exactly when BIND_OK answers it.
//! - A PROBE goes only to a QUIC connection whose current address is unproven: one at once when
//!   it moves there, then one at each sweep at least 250 ms after the previous one, four at most,
//!   and none once the address is proven; no address receives more than four before it answers.
//!   A PROBE_ACK proves the path if and only if it echoes a fresh PROBE that this connection was
//!   sent while at its current address; a legitimate client's answer is never refused.
//! - Sweeps send only CLOSE (one per leg that they end as closed, expired or evicted) and PROBE;
//!   they never end a live leg, except that an evicting sweep ends every leg of its table.
//! - A QUIC connection is bound exactly while its table serves its endpoint; the peer closing it
//!   unbinds its leg at once; shutting down tells every bound connection to move (CLOSE
//!   draining) and unbinds its leg.
//! - Once every leg has been idle for longer than the idle timeout and every table has swept, no
//!   table holds a leg and the session table counts none (no leaked capacity).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use veil_relay_core::cookie::Cookies;
use veil_relay_core::limit::BindLimiter;
use veil_relay_core::token::{KeyId, KeyRing, Limits, SessionId, Ticket, Token};
use veil_relay_core::wire::{
    self, BIND_LEN, COOKIE_LEN, Class, ClientMessage, EXPORTER_LEN, ErrorCode, RelayMessage,
};
use veil_relay_core::{
    BindResult, Config, ConnId, DropReason, Endpoint, Event, ForwardingTable, LegStatus, Node,
    Stats, Transmit, Verdict,
};

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
/// QUIC connections open at a time (slots the fuzzer addresses them by).
pub const CONNS: usize = 4;
/// Cookie lifetime on every relay.
const COOKIE_LIFETIME: Duration = Duration::from_secs(10);
/// Legitimate messages kept for replay.
const REPLAY_LOG: usize = 16;
/// Workers of the node.
const WORKERS: usize = 2;
/// The index of the QUIC connections' shared bind limiter, after the workers' own.
const QUIC_LIMITER: usize = WORKERS;
/// How often the QUIC endpoint sweeps its shared bind limiter (`relay/src/quic.rs`).
const LIMITER_SWEEP: Duration = Duration::from_secs(1);
/// The least time between two PROBEs for one unproven address (docs of `ForwardingTable`).
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// PROBEs a connection is sent at most between two proofs of its path, however it moves (one
/// address, or many, forged ones among them): the core's `MAX_PROBES`. (The `datagram` target
/// found this bound broken once: it used to be per move, so hopping between a proven and a
/// forged address drew a PROBE at every hop; fuzz/README.md, "Found so far".)
const MAX_PROBES: u32 = 4;

/// The sources the fuzzer sends from, by index (taken modulo the pool's size). QUIC connections
/// open from, and migrate to, the same addresses (on the relay's QUIC port: a QUIC connection
/// and a UDP leg from one address are different endpoints).
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

/// The TLS exporter value (`wire::EXPORTER_LABEL`) of QUIC connection `id`: distinct for every
/// connection, as TLS sessions' are.
pub fn exporter(id: ConnId) -> [u8; EXPORTER_LEN] {
    let mut x = [0x5e; EXPORTER_LEN];
    x[..8].copy_from_slice(&id.0.to_be_bytes());
    x
}

/// The exporter value of a TLS session the relay never sees: the client's connection to a
/// machine in the middle, which relays the client's BIND onto its own connection to the relay.
fn foreign_exporter(id: ConnId) -> [u8; EXPORTER_LEN] {
    exporter(ConnId(id.0 | 1 << 63))
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

/// One step of a scenario. Connection slots are taken modulo [`CONNS`]; an operation on a slot
/// whose connection is not in the state it needs (open, before or after its BIND) does nothing.
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
        /// Index into the sessions (0 to 127).
        session: u8,
    },
    /// The controller removes one participant of a session that goes on (one leg revoked).
    RevokeLeg {
        /// Index into the sessions (0 to 127).
        session: u8,
        /// The leg index (modulo 16).
        leg: u8,
    },
    /// The controller extends a session (ExtendSession) past its tokens' expiry.
    Extend {
        /// Index into the sessions (0 to 127).
        session: u8,
        /// By how many seconds past its tokens' expiry (0 to 127).
        secs: u8,
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
    /// A QUIC connection from `source(src)` completes its handshake (after a Retry: its address
    /// is proven) in slot `conn`; whatever connection the slot held is closed by its peer first.
    Connect {
        /// Connection slot.
        conn: u8,
        /// Source index.
        src: u8,
    },
    /// The client of the connection in slot `conn`, not yet bound, sends its BIND on the
    /// connection's stream, for `tokens()[token]`.
    StreamBind {
        /// Connection slot.
        conn: u8,
        /// Token index.
        token: u8,
        /// Modulo 4. 0: channel-bound to this connection's exporter value (the genuine BIND);
        /// 1: channel-bound to another TLS session's (relayed by a machine in the middle);
        /// 2: a UDP BIND, without a cookie; 3: a UDP BIND with a cookie this relay minted for
        /// the connection's address and that ticket.
        kind: u8,
    },
    /// A datagram on the bound connection in slot `conn`.
    QuicMedia {
        /// Connection slot.
        conn: u8,
        /// Modulo 8. 0: RTP, 1: RTCP, 2: DTLS, 3: KEEPALIVE; 4: PROBE_ACK echoing the newest
        /// PROBE the client received (zeros if none); 5: PROBE_ACK echoing the newest PROBE
        /// another connection was sent; 6: a channel-bound BIND (this connection's exporter
        /// value) and 7: a UDP BIND, as datagrams, for `tokens()[len]`.
        kind: u8,
        /// Length (media only), modulo 1501; the token index for BINDs.
        len: u16,
    },
    /// The bound connection in slot `conn` now sends from `source(src)` (QUIC migration); if
    /// `spoofed`, its client forges that address and does not receive there.
    Migrate {
        /// Connection slot.
        conn: u8,
        /// Source index.
        src: u8,
        /// A forged address (the client receives nothing sent there).
        spoofed: bool,
    },
    /// The peer closes the connection in slot `conn` (or it times out).
    Disconnect {
        /// Connection slot.
        conn: u8,
    },
    /// Any bytes on the connection in slot `conn`: on its stream (not yet bound; the shell reads
    /// exactly `wire::BIND_LEN` bytes, padded here with zeros) or as a datagram (bound).
    QuicRaw {
        /// Connection slot.
        conn: u8,
        /// On the stream rather than as a datagram.
        stream: bool,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Sends again, on the connection in slot `conn`, one of the last messages legitimate
    /// clients sent: on its stream (not yet bound) or as a datagram (bound).
    QuicReplay {
        /// Index into the replay log, newest first.
        entry: u8,
        /// Connection slot.
        conn: u8,
        /// On the stream rather than as a datagram.
        stream: bool,
    },
    /// Modulo 3. 0: the drain deadline passes (the node evicts: sweeps tell every client to move
    /// to its backup relay); 1: back in service (eviction stops); 2: the relay stops: every QUIC
    /// connection's table is shut down and every connection closed.
    Stop {
        /// What happens.
        how: u8,
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
            Self::Revoke { session } => out.extend_from_slice(&[4, *session & 0x7f]),
            Self::RevokeLeg { session, leg } => {
                out.extend_from_slice(&[4, 0x80 | (*session & 0x7f), *leg & 0x7f])
            }
            Self::Extend { session, secs } => {
                out.extend_from_slice(&[4, 0x80 | (*session & 0x7f), 0x80 | (*secs & 0x7f)])
            }
            Self::Tick => out.push(5),
            Self::Drain { on } => out.extend_from_slice(&[6, u8::from(*on)]),
            Self::Media { src, kind, len } => {
                out.extend_from_slice(&[7, *src, *kind]);
                out.extend_from_slice(&len.to_be_bytes());
            }
            Self::Connect { conn, src } => out.extend_from_slice(&[8, *conn, *src]),
            Self::StreamBind { conn, token, kind } => {
                out.extend_from_slice(&[9, *conn, *token, *kind])
            }
            Self::QuicMedia { conn, kind, len } => {
                out.extend_from_slice(&[10, *conn, *kind]);
                out.extend_from_slice(&len.to_be_bytes());
            }
            Self::Migrate { conn, src, spoofed } => {
                out.extend_from_slice(&[11, *conn, *src, u8::from(*spoofed)])
            }
            Self::Disconnect { conn } => out.extend_from_slice(&[12, *conn]),
            Self::QuicRaw {
                conn,
                stream,
                bytes,
            } => {
                let len = u16::try_from(bytes.len()).expect("datagrams fit a u16");
                out.extend_from_slice(&[13, *conn, u8::from(*stream)]);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(bytes);
            }
            Self::QuicReplay {
                entry,
                conn,
                stream,
            } => out.extend_from_slice(&[14, *entry, *conn, u8::from(*stream)]),
            Self::Stop { how } => out.extend_from_slice(&[15, *how]),
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

/// Reads the operations of an input: each starts with a tag byte, taken modulo 16, then its
/// fields (see [`Op::encode`]). Any input decodes; at most [`MAX_OPS`] operations.
pub fn decode(data: &[u8]) -> Vec<Op> {
    let mut r = Reader::new(data);
    let mut ops = Vec::new();
    while !r.is_empty() && ops.len() < MAX_OPS {
        let op = match r.u8() % 16 {
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
            // The top bit of the session byte picks one leg rather than the whole session; then
            // the top bit of the leg byte picks an extension of the session instead.
            4 => match r.u8() {
                s if s & 0x80 != 0 => match r.u8() {
                    b if b & 0x80 != 0 => Op::Extend {
                        session: s & 0x7f,
                        secs: b & 0x7f,
                    },
                    leg => Op::RevokeLeg {
                        session: s & 0x7f,
                        leg,
                    },
                },
                s => Op::Revoke { session: s },
            },
            5 => Op::Tick,
            6 => Op::Drain {
                on: r.u8() & 1 == 1,
            },
            7 => Op::Media {
                src: r.u8(),
                kind: r.u8(),
                len: r.u16(),
            },
            8 => Op::Connect {
                conn: r.u8(),
                src: r.u8(),
            },
            9 => Op::StreamBind {
                conn: r.u8(),
                token: r.u8(),
                kind: r.u8(),
            },
            10 => Op::QuicMedia {
                conn: r.u8(),
                kind: r.u8(),
                len: r.u16(),
            },
            11 => Op::Migrate {
                conn: r.u8(),
                src: r.u8(),
                spoofed: r.u8() & 1 == 1,
            },
            12 => Op::Disconnect { conn: r.u8() },
            13 => {
                let conn = r.u8();
                let stream = r.u8() & 1 == 1;
                let len = usize::from(r.u16()).min(MAX_DATAGRAM);
                Op::QuicRaw {
                    conn,
                    stream,
                    bytes: r.bytes(len).to_vec(),
                }
            }
            14 => Op::QuicReplay {
                entry: r.u8(),
                conn: r.u8(),
                stream: r.u8() & 1 == 1,
            },
            _ => Op::Stop { how: r.u8() },
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
    /// The ticket carries rate limits.
    limited: bool,
    /// The last time the relay saw the leg active: bound, media it did not drop before its
    /// idle clock, or a KEEPALIVE it acknowledged.
    last_seen: Instant,
}

/// What the harness knows for sure, from a client's point of view.
#[derive(Debug, Default)]
struct Model {
    /// Endpoints that may hold a leg, and which. Never misses one the relay holds.
    holds: HashMap<Endpoint, Held>,
    /// Every endpoint that ever held a leg.
    ever_bound: HashSet<Endpoint>,
    /// Revoked sessions, and when their tokens expire.
    revoked: HashMap<SessionId, u64>,
    /// Every session ever revoked.
    ever_revoked: HashSet<SessionId>,
    /// Single revoked legs (removed participants), and when their tokens expire.
    revoked_legs: HashMap<(SessionId, u8), u64>,
    /// Every leg ever revoked alone.
    ever_revoked_legs: HashSet<(SessionId, u8)>,
    /// Sessions extended past their tokens' expiry, and until when.
    extended: HashMap<SessionId, u64>,
    /// BINDs each bind limiter (a worker's, or [`QUIC_LIMITER`]) admitted from each source IP
    /// address.
    binds_admitted: HashMap<(usize, IpAddr), u32>,
}

impl Model {
    /// True while leg `leg` of `session` may not bind: its session or it alone is revoked.
    fn closed(&self, session: SessionId, leg: u8) -> bool {
        self.revoked.contains_key(&session) || self.revoked_legs.contains_key(&(session, leg))
    }

    /// True if leg `leg` of `session` was ever revoked, with its session or alone.
    fn ever_closed(&self, session: SessionId, leg: u8) -> bool {
        self.ever_revoked.contains(&session) || self.ever_revoked_legs.contains(&(session, leg))
    }
}

/// Whether two addresses are one endpoint: an IPv4 address and its IPv4-mapped IPv6 form are
/// the same host (a dual-stack socket reports IPv4 peers mapped), and the relay counts them so.
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// A PROBE the relay sent to a QUIC connection.
#[derive(Debug, Clone, Copy)]
struct Probe {
    /// The connection's address when it was sent: where it went.
    addr: SocketAddr,
    txn: [u8; 8],
    cookie: [u8; COOKIE_LEN],
    at: Instant,
}

/// One QUIC connection: its table, and what the model knows of its paths.
#[derive(Debug)]
struct Conn {
    id: ConnId,
    table: ForwardingTable,
    exporter: [u8; EXPORTER_LEN],
    /// Its current address (the last the shell reported).
    addr: SocketAddr,
    /// Whether the client really receives at `addr` (false: it forges that address).
    genuine: bool,
    /// Past its stream BIND, which bound a leg: the shell serves its datagrams.
    bound: bool,
    /// The address last proven for the connection: its address at bind time, then whatever a
    /// PROBE_ACK proved.
    proven: SocketAddr,
    /// PROBEs sent for the current unproven address since the connection moved there, and when
    /// the last one was.
    episode: u32,
    last_probe: Option<Instant>,
    /// PROBEs sent since the path was last proven (or the leg bound).
    since_proof: u32,
    /// Every PROBE the connection was sent.
    probes: Vec<Probe>,
    /// The newest PROBE the client received.
    received: Option<Probe>,
}

impl Conn {
    fn ep(&self) -> Endpoint {
        Endpoint::Quic(self.id)
    }
}

/// Which table a packet reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Door {
    /// A UDP worker.
    Worker(usize),
    /// The QUIC connection in this slot.
    Conn(usize),
}

/// How a packet reaches the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// A UDP datagram from this address.
    Udp(SocketAddr),
    /// A DATAGRAM frame on the QUIC connection in this slot.
    Datagram(usize),
    /// The BIND on the first stream of the QUIC connection in this slot.
    Stream(usize),
}

/// What a verdict was, without its borrow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Forward,
    Control,
    Drop(DropReason),
}

/// A relay node with its UDP workers and QUIC connections, the legitimate clients' tokens, and
/// the model.
#[derive(Debug)]
pub struct Scenario {
    now: Instant,
    node: Arc<Node>,
    workers: Vec<ForwardingTable>,
    /// The bind budget every QUIC connection's table takes from.
    quic_binds: Arc<Mutex<BindLimiter>>,
    quic_binds_swept: Instant,
    conns: Vec<Option<Conn>>,
    next_conn: u64,
    /// Counters of the connections closed so far.
    closed: Stats,
    /// The newest PROBEs sent to any connection.
    probe_log: Vec<(ConnId, Probe)>,
    ring: KeyRing,
    cookies: Cookies,
    tokens: Vec<Token>,
    model: Model,
    log: Vec<Vec<u8>>,
    next_txn: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Self::new()
    }
}

impl Scenario {
    /// A node with two workers, and three legs already bound: session 7 legs 0 and 1 (on
    /// different workers), and the rate-limited leg 0 of session 8. No QUIC connection yet.
    pub fn new() -> Self {
        let now = t0();
        let ring = crate::key_ring();
        let config = Config {
            leg_idle: LEG_IDLE,
            sweep_interval: SWEEP,
            ..Config::default()
        };
        let quic_binds = Arc::new(Mutex::new(BindLimiter::new(
            config.binds_per_ip,
            config.binds_per_worker,
            now,
        )));
        let node = Arc::new(Node::new(
            config,
            ring.clone(),
            MAX_LEGS,
            *crate::COOKIE_SECRET,
            now,
            T0_UNIX_MS,
        ));
        let workers = (0..WORKERS)
            .map(|_| ForwardingTable::new(node.clone(), now))
            .collect();
        let mut s = Self {
            now,
            node,
            workers,
            quic_binds,
            quic_binds_swept: now,
            conns: (0..CONNS).map(|_| None).collect(),
            next_conn: 1,
            closed: Stats::default(),
            probe_log: Vec::new(),
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
                s.model.holds.contains_key(&Endpoint::Udp(source(src))),
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
                self.deliver(Via::Udp(source(*src)), bytes);
            }
            Op::Bind { token, src } => self.bind(usize::from(*token), source(*src)),
            Op::Replay { entry, src } => {
                if let Some(bytes) = self.logged(*entry) {
                    self.deliver(Via::Udp(source(*src)), &bytes);
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
                    assert!(
                        self.model.ever_bound.contains(&ep),
                        "revocation unbound {ep:?}, which never held a leg"
                    );
                }
                self.model.holds.retain(|_, h| h.session != id);
                self.model.revoked.insert(id, expires);
                self.model.ever_revoked.insert(id);
            }
            Op::RevokeLeg { session, leg } => {
                let id = SessionId(SESSIONS[usize::from(*session) % SESSIONS.len()]);
                let leg = *leg % veil_relay_core::token::MAX_LEGS;
                let expires = self.session_expiry(id);
                for ep in self.node.revoke_leg(id, leg, expires) {
                    let held = self.model.holds.get(&ep);
                    assert!(
                        held.is_none_or(|h| (h.session, h.leg) == (id, leg)),
                        "revoking leg {leg} of {id} unbound {ep:?}, which holds another leg"
                    );
                    assert!(
                        self.model.ever_bound.contains(&ep),
                        "revocation unbound {ep:?}, which never held a leg"
                    );
                }
                self.model
                    .holds
                    .retain(|_, h| (h.session, h.leg) != (id, leg));
                let e = self.model.revoked_legs.entry((id, leg)).or_insert(expires);
                *e = (*e).max(expires);
                self.model.ever_revoked_legs.insert((id, leg));
            }
            Op::Extend { session, secs } => {
                let id = SessionId(SESSIONS[usize::from(*session) % SESSIONS.len()]);
                // The controller extends live sessions only (an expired one is NOT_FOUND).
                if self.session_expiry(id) <= self.node.unix_ms(self.now) {
                    return;
                }
                let until = self.session_expiry(id) + u64::from(*secs) * 1000;
                self.node.extend(id, until);
                let e = self.model.extended.entry(id).or_insert(until);
                *e = (*e).max(until);
                // Legs held, and revocations, last as long.
                for h in self.model.holds.values_mut().filter(|h| h.session == id) {
                    h.expires_unix_ms = h.expires_unix_ms.max(until);
                }
                if let Some(exp) = self.model.revoked.get_mut(&id) {
                    *exp = (*exp).max(until);
                }
                for ((_, _), exp) in self
                    .model
                    .revoked_legs
                    .iter_mut()
                    .filter(|((s, _), _)| *s == id)
                {
                    *exp = (*exp).max(until);
                }
            }
            Op::Tick => {
                self.node.tick(self.now);
                let now_unix = self.node.unix_ms(self.now);
                self.model.revoked.retain(|_, exp| *exp > now_unix);
                self.model.revoked_legs.retain(|_, exp| *exp > now_unix);
                self.model.extended.retain(|_, exp| *exp > now_unix);
            }
            Op::Drain { on } => self.node.directory.set_draining(*on),
            Op::Media { src, kind, len } => {
                let pkt = self.media(*kind % 4, *len);
                self.deliver(Via::Udp(source(*src)), &pkt);
            }
            Op::Connect { conn, src } => self.connect(usize::from(*conn) % CONNS, source(*src)),
            Op::StreamBind { conn, token, kind } => {
                let slot = usize::from(*conn) % CONNS;
                let Some(c) = self.conns[slot].as_ref().filter(|c| !c.bound) else {
                    return;
                };
                let token = self.tokens[usize::from(*token) % self.tokens.len()].clone();
                let (id, addr, x) = (c.id, c.addr, c.exporter);
                let txn = self.txn();
                let pkt = match kind % 4 {
                    0 => wire::bind_channel(&token, txn, &x),
                    1 => wire::bind_channel(&token, txn, &foreign_exporter(id)),
                    2 => wire::bind(&token, txn, None),
                    _ => {
                        let cookie = self
                            .cookies
                            .mint(self.mono_ms(), addr, token.ticket_bytes());
                        wire::bind(&token, txn, Some(&cookie))
                    }
                };
                self.log(&pkt);
                self.stream(slot, &pkt);
            }
            Op::QuicMedia { conn, kind, len } => {
                let slot = usize::from(*conn) % CONNS;
                let Some(c) = self.conns[slot].as_ref().filter(|c| c.bound) else {
                    return;
                };
                let (id, x) = (c.id, c.exporter);
                let received = c.received;
                let pkt = match kind % 8 {
                    k @ 0..=3 => self.media(k, *len),
                    4 => {
                        let p = received.map_or(([0; 8], [0; COOKIE_LEN]), |p| (p.txn, p.cookie));
                        let ack = wire::probe_ack(p.0, &p.1).to_vec();
                        self.log(&ack);
                        ack
                    }
                    5 => {
                        let other = self.probe_log.iter().rev().find(|(c, _)| *c != id);
                        let p = other.map_or(([0; 8], [0; COOKIE_LEN]), |(_, p)| (p.txn, p.cookie));
                        wire::probe_ack(p.0, &p.1).to_vec()
                    }
                    k => {
                        let token = self.tokens[usize::from(*len) % self.tokens.len()].clone();
                        let txn = self.txn();
                        let pkt = if k == 6 {
                            wire::bind_channel(&token, txn, &x)
                        } else {
                            wire::bind(&token, txn, None)
                        };
                        pkt.to_vec()
                    }
                };
                self.deliver(Via::Datagram(slot), &pkt);
            }
            Op::Migrate { conn, src, spoofed } => {
                self.migrate(usize::from(*conn) % CONNS, source(*src), *spoofed)
            }
            Op::Disconnect { conn } => {
                let slot = usize::from(*conn) % CONNS;
                if self.conns[slot].is_some() {
                    self.disconnect(slot);
                }
            }
            Op::QuicRaw {
                conn,
                stream,
                bytes,
            } => self.quic_send(usize::from(*conn) % CONNS, *stream, bytes),
            Op::QuicReplay {
                entry,
                conn,
                stream,
            } => {
                if let Some(bytes) = self.logged(*entry) {
                    self.quic_send(usize::from(*conn) % CONNS, *stream, &bytes);
                }
            }
            Op::Stop { how } => match how % 3 {
                0 => self.node.set_evicting(true),
                1 => self.node.set_evicting(false),
                _ => {
                    for slot in 0..CONNS {
                        if self.conns[slot].is_some() {
                            self.shutdown(slot);
                        }
                    }
                }
            },
        }
        assert!(self.node.directory.legs() <= MAX_LEGS);
        for c in self.conns.iter().flatten() {
            if c.bound {
                assert!(
                    c.table.serves(c.ep()) && c.table.local_legs() == 1,
                    "a bound QUIC connection's table no longer serves its leg, and said nothing"
                );
            } else {
                assert_eq!(
                    c.table.local_legs(),
                    0,
                    "a connection serves a leg before its BIND"
                );
            }
        }
    }

    fn txn(&mut self) -> [u8; 8] {
        self.next_txn += 1;
        self.next_txn.to_be_bytes()
    }

    /// A well-formed media datagram (kind 0: RTP, 1: RTCP, 2: DTLS) of `len` modulo 1501
    /// bytes, or (kind 3) a KEEPALIVE.
    fn media(&mut self, kind: u8, len: u16) -> Vec<u8> {
        let len = usize::from(len) % 1501;
        match kind {
            0 | 1 => {
                let mut p = vec![0u8; len];
                if let Some(b) = p.first_mut() {
                    *b = 0x80;
                }
                if let Some(b) = p.get_mut(1) {
                    *b = if kind == 0 { 111 } else { 200 };
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
        }
    }

    /// When session `id` expires: its tokens' expiry, or the later one it was extended to.
    fn session_expiry(&self, id: SessionId) -> u64 {
        let tokens = self
            .tokens
            .iter()
            .find(|t| t.claims().session == id)
            .map_or(T0_UNIX_MS, |t| t.claims().expires_unix_ms);
        self.expiry_of(id, tokens)
    }

    /// A ticket of session `id` expiring at `ticket_expiry` is honoured until this.
    fn expiry_of(&self, id: SessionId, ticket_expiry: u64) -> u64 {
        self.model
            .extended
            .get(&id)
            .map_or(ticket_expiry, |&e| e.max(ticket_expiry))
    }

    fn mono_ms(&self) -> u64 {
        self.now.saturating_duration_since(t0()).as_millis() as u64
    }

    /// Whether a cookie minted at `at` is still within its lifetime now (as the relay counts:
    /// whole milliseconds on its monotonic clock).
    fn fresh(&self, at: Instant) -> bool {
        let issued = at.saturating_duration_since(t0()).as_millis() as u64;
        self.mono_ms() - issued <= COOKIE_LIFETIME.as_millis() as u64
    }

    /// BINDs the worker serving `from` has refused for its bind rate so far.
    fn rate_limited(&self, from: SocketAddr) -> u64 {
        self.workers[worker_of(from)]
            .stats()
            .drops_for(DropReason::BindRateLimited)
    }

    fn log(&mut self, pkt: &[u8]) {
        if self.log.len() == REPLAY_LOG {
            self.log.remove(0);
        }
        self.log.push(pkt.to_vec());
    }

    fn logged(&self, entry: u8) -> Option<Vec<u8>> {
        if self.log.is_empty() {
            return None;
        }
        let i = self.log.len() - 1 - usize::from(entry) % self.log.len();
        Some(self.log[i].clone())
    }

    fn conn(&self, slot: usize) -> &Conn {
        self.conns[slot].as_ref().expect("an open connection")
    }

    fn conn_mut(&mut self, slot: usize) -> &mut Conn {
        self.conns[slot].as_mut().expect("an open connection")
    }

    fn table(&mut self, door: Door) -> &mut ForwardingTable {
        match door {
            Door::Worker(w) => &mut self.workers[w],
            Door::Conn(slot) => &mut self.conn_mut(slot).table,
        }
    }

    /// The slot of the open connection `id`, if any.
    fn slot_of(&self, id: ConnId) -> Option<usize> {
        self.conns
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.id == id))
    }

    /// The table that serves `ep`, if any.
    fn door_of(&self, ep: Endpoint) -> Option<Door> {
        match ep {
            Endpoint::Udp(a) | Endpoint::TurnUdp(a) => Some(Door::Worker(worker_of(a))),
            Endpoint::Quic(id) => self.slot_of(id).map(Door::Conn),
            // This model drives no TURN TCP or TLS connection.
            Endpoint::TurnTcp(_) | Endpoint::TurnTls(_) => None,
        }
    }

    /// True if the model knows the relay must still serve `ep`'s leg.
    fn live(&self, ep: Endpoint) -> bool {
        let now_unix = self.node.unix_ms(self.now);
        self.model.holds.get(&ep).is_some_and(|h| {
            now_unix < h.expires_unix_ms
                && self.now.saturating_duration_since(h.last_seen) < LEG_IDLE
        })
    }

    /// True if media may go to `ep`: a UDP address, or a QUIC connection whose current address
    /// is proven.
    fn reachable(&self, ep: Endpoint) -> bool {
        match ep {
            Endpoint::Udp(_) | Endpoint::TurnUdp(_) => true,
            Endpoint::Quic(id) => self
                .slot_of(id)
                .is_some_and(|s| same(self.conn(s).addr, self.conn(s).proven)),
            Endpoint::TurnTcp(_) | Endpoint::TurnTls(_) => false,
        }
    }

    /// A legitimate client holding token `token` binds from `from`.
    fn bind(&mut self, token: usize, from: SocketAddr) {
        let token = self.tokens[token % self.tokens.len()].clone();
        let txn = self.txn();
        let first = wire::bind(&token, txn, None);
        self.log(&first);
        let limited = self.rate_limited(from);
        let answers = self.deliver(Via::Udp(from), &first);
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
        self.log(&second);
        let limited = self.rate_limited(from);
        let answers = self.deliver(Via::Udp(from), &second);
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

    /// Opens a QUIC connection from `addr` in `slot`, closing the one there first.
    fn connect(&mut self, slot: usize, addr: SocketAddr) {
        if self.conns[slot].is_some() {
            self.disconnect(slot);
        }
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        let table = ForwardingTable::with_shared_binds(
            self.node.clone(),
            self.now,
            self.quic_binds.clone(),
        );
        self.conns[slot] = Some(Conn {
            id,
            table,
            exporter: exporter(id),
            addr,
            genuine: true,
            bound: false,
            proven: addr,
            episode: 0,
            last_probe: None,
            since_proof: 0,
            probes: Vec::new(),
            received: None,
        });
    }

    /// Sends `bytes` on the connection in `slot`: on its stream if `stream` and it is not bound
    /// yet, as a datagram if not `stream` and it is bound.
    fn quic_send(&mut self, slot: usize, stream: bool, bytes: &[u8]) {
        let Some(c) = self.conns[slot].as_ref() else {
            return;
        };
        match (stream, c.bound) {
            (true, false) => self.stream(slot, bytes),
            (false, true) => {
                self.deliver(Via::Datagram(slot), bytes);
            }
            _ => {}
        }
    }

    /// The shell reads the BIND off the stream of the connection in `slot`: exactly
    /// `wire::BIND_LEN` bytes.
    fn stream(&mut self, slot: usize, bytes: &[u8]) {
        let mut buf = [0u8; BIND_LEN];
        let n = bytes.len().min(BIND_LEN);
        buf[..n].copy_from_slice(&bytes[..n]);
        self.deliver(Via::Stream(slot), &buf);
    }

    /// The connection in `slot` (bound) now sends from `to`.
    fn migrate(&mut self, slot: usize, to: SocketAddr, spoofed: bool) {
        let Some(c) = self.conns[slot].as_ref().filter(|c| c.bound) else {
            return;
        };
        // The shell reports a path only when the address changes.
        if c.addr == to {
            return;
        }
        let (ep, proven) = (c.ep(), c.proven);
        let now = self.now;
        let t = &mut self.conn_mut(slot).table;
        let before = *t.stats();
        t.handle_path(now, ep, to);
        let after = *t.stats();
        let transmits: Vec<Transmit> = std::iter::from_fn(|| t.poll_transmit()).collect();
        let events: Vec<Event> = std::iter::from_fn(|| t.poll_event()).collect();
        assert_eq!(after.rx_packets, before.rx_packets);
        assert_eq!(after.forwarded_packets, before.forwarded_packets);
        assert_eq!(after.total_drops(), before.total_drops());
        assert!(
            events.is_empty(),
            "a path change produced events: {events:?}"
        );
        let c = self.conn_mut(slot);
        if same(c.addr, to) {
            // The same endpoint in its other form: still where it was, so still probing the
            // same address (or proven) and receiving there if it did, or if it moved there.
            assert!(
                transmits.is_empty(),
                "a report of the same address in its other form sent {transmits:?}"
            );
            c.addr = to;
            c.genuine |= !spoofed;
            return;
        }
        c.addr = to;
        c.genuine = !spoofed;
        c.episode = 0;
        c.last_probe = None;
        if same(to, proven) {
            assert!(
                transmits.is_empty(),
                "moving back to the proven address sent {transmits:?}"
            );
        } else if c.since_proof >= MAX_PROBES {
            assert!(
                transmits.is_empty(),
                "{MAX_PROBES} PROBEs went unanswered, yet a move drew {transmits:?}"
            );
        } else {
            assert_eq!(
                transmits.len(),
                1,
                "moving to an unproven address sends one PROBE at once: {transmits:?}"
            );
            self.record_probe(slot, &transmits[0]);
        }
    }

    /// Checks a PROBE sent to the connection in `slot`, and delivers it if the client receives
    /// at the connection's address.
    fn record_probe(&mut self, slot: usize, t: &Transmit) {
        let now = self.now;
        let c = self.conn_mut(slot);
        assert_eq!(t.dst, c.ep(), "a PROBE for another endpoint");
        assert!(!t.reliable, "a PROBE sent on the stream");
        let Ok(RelayMessage::Probe { txn, cookie }) = wire::parse_relay(t.msg.as_bytes()) else {
            panic!("not a PROBE: {:02x?}", t.msg.as_bytes());
        };
        assert!(c.bound, "a PROBE to a connection that is not bound");
        assert!(!same(c.addr, c.proven), "a PROBE for a proven path");
        c.episode += 1;
        assert!(
            c.episode <= MAX_PROBES,
            "{} PROBEs for one unproven address",
            c.episode
        );
        if let Some(last) = c.last_probe {
            assert!(
                now.saturating_duration_since(last) >= PROBE_INTERVAL,
                "PROBEs {:?} apart",
                now.saturating_duration_since(last)
            );
        }
        c.last_probe = Some(now);
        let addr = c.addr;
        c.since_proof += 1;
        assert!(
            c.since_proof <= MAX_PROBES,
            "{} PROBEs without an answer (the last to {addr}): a client is sent at most \
             {MAX_PROBES} between two proofs, whatever it does",
            c.since_proof
        );
        let probe = Probe {
            addr,
            txn,
            cookie: cookie.try_into().expect("cookies are 24 bytes"),
            at: now,
        };
        c.probes.push(probe);
        if c.genuine {
            c.received = Some(probe);
        }
        let id = c.id;
        if self.probe_log.len() == REPLAY_LOG {
            self.probe_log.remove(0);
        }
        self.probe_log.push((id, probe));
    }

    /// The peer closes the connection in `slot` (or it times out).
    fn disconnect(&mut self, slot: usize) {
        let c = self.conn(slot);
        if c.bound {
            let ep = c.ep();
            let held = self.model.holds.get(&ep).copied();
            let t = &mut self.conn_mut(slot).table;
            let before = *t.stats();
            t.handle_disconnect(ep);
            let after = *t.stats();
            let transmits: Vec<Transmit> = std::iter::from_fn(|| t.poll_transmit()).collect();
            let events: Vec<Event> = std::iter::from_fn(|| t.poll_event()).collect();
            assert_eq!(after, before, "a disconnect counted something");
            assert!(
                transmits.is_empty(),
                "sent {transmits:?} to a closed connection"
            );
            let [
                Event::Unbound {
                    session,
                    leg,
                    endpoint,
                    why: LegStatus::Disconnected,
                },
            ] = events[..]
            else {
                panic!("a disconnect reported {events:?}");
            };
            assert_eq!(endpoint, ep);
            if let Some(h) = held {
                assert_eq!((session, leg), (h.session, h.leg));
            }
        }
        self.close(slot);
    }

    /// The relay stops: shuts the table of the connection in `slot` down, and closes it.
    fn shutdown(&mut self, slot: usize) {
        let c = self.conn(slot);
        if c.bound {
            let ep = c.ep();
            let t = &mut self.conn_mut(slot).table;
            let before = *t.stats();
            t.handle_shutdown();
            let after = *t.stats();
            let transmits: Vec<Transmit> = std::iter::from_fn(|| t.poll_transmit()).collect();
            let events: Vec<Event> = std::iter::from_fn(|| t.poll_event()).collect();
            assert_eq!(after.rx_packets, before.rx_packets);
            assert_eq!(after.total_drops(), before.total_drops());
            let [t] = transmits[..] else {
                panic!("shutdown sent {transmits:?} to one leg");
            };
            assert_eq!(t.dst, ep);
            assert!(t.reliable, "CLOSE is reliable");
            assert!(
                matches!(
                    wire::parse_relay(t.msg.as_bytes()),
                    Ok(RelayMessage::Close { code, .. }) if code == ErrorCode::Draining as u16
                ),
                "shutdown sent something other than CLOSE (draining)"
            );
            assert!(
                matches!(
                    events[..],
                    [Event::Unbound {
                        endpoint,
                        why: LegStatus::Evicted,
                        ..
                    }] if endpoint == ep
                ),
                "shutdown reported {events:?}"
            );
        }
        self.close(slot);
    }

    /// The connection in `slot` is gone: its table must hold nothing.
    fn close(&mut self, slot: usize) {
        let c = self.conns[slot].take().expect("an open connection");
        assert_eq!(
            c.table.local_legs(),
            0,
            "a closed connection's table holds a leg"
        );
        self.closed.merge(c.table.stats());
        self.model.holds.remove(&c.ep());
    }

    /// Fires every table's timer that is due, as the shells' timers do, and checks what they
    /// send. The QUIC endpoint sweeps its shared bind limiter once a second.
    fn fire_timers(&mut self) {
        if self.now.saturating_duration_since(self.quic_binds_swept) >= LIMITER_SWEEP {
            self.quic_binds
                .lock()
                .expect("not poisoned")
                .forget_idle(self.now);
            self.quic_binds_swept = self.now;
        }
        let doors: Vec<Door> = (0..WORKERS)
            .map(Door::Worker)
            .chain(
                (0..CONNS)
                    .filter(|s| self.conns[*s].is_some())
                    .map(Door::Conn),
            )
            .collect();
        for door in doors {
            self.sweep(door);
        }
    }

    /// Runs the sweep of one table, if due.
    fn sweep(&mut self, door: Door) {
        let now = self.now;
        let due = self.table(door).poll_timeout().is_some_and(|t| t <= now);
        if !due {
            return;
        }
        let evicting = self.node.is_evicting();
        let now_unix = self.node.unix_ms(now);
        let mine: Vec<Endpoint> = self
            .model
            .holds
            .keys()
            .filter(|ep| self.door_of(**ep) == Some(door))
            .copied()
            .collect();
        let live: HashSet<Endpoint> = mine.iter().filter(|ep| self.live(**ep)).copied().collect();
        let probe_due = match door {
            Door::Conn(slot) => {
                let c = self.conn(slot);
                c.bound
                    && !same(c.addr, c.proven)
                    && c.episode < MAX_PROBES
                    && c.since_proof < MAX_PROBES
                    && c.last_probe
                        .is_none_or(|t| now.saturating_duration_since(t) >= PROBE_INTERVAL)
            }
            Door::Worker(_) => false,
        };
        let t = self.table(door);
        let before = *t.stats();
        t.handle_timeout(now);
        let after = *t.stats();
        let transmits: Vec<Transmit> = std::iter::from_fn(|| t.poll_transmit()).collect();
        let events: Vec<Event> = std::iter::from_fn(|| t.poll_event()).collect();
        let rearmed = t.poll_timeout().is_some_and(|t| t > now);
        let legs_left = t.local_legs();
        assert_eq!(after.rx_packets, before.rx_packets);
        assert_eq!(after.forwarded_packets, before.forwarded_packets);
        assert!(rearmed, "the sweep did not re-arm its timer");

        let own = match door {
            Door::Conn(slot) => Some(self.conn(slot).ep()),
            Door::Worker(_) => None,
        };
        let mut told = Vec::new();
        let mut ended_own = false;
        for e in &events {
            let Event::Unbound {
                session,
                leg,
                endpoint,
                why,
            } = *e
            else {
                panic!("a sweep reported {e:?}");
            };
            assert_eq!(
                self.door_of(endpoint),
                Some(door),
                "a sweep unbound {endpoint:?}, which another table serves"
            );
            assert!(
                !live.contains(&endpoint) || (evicting && why == LegStatus::Evicted),
                "a sweep ended the live leg of {endpoint:?} ({why:?})"
            );
            match why {
                LegStatus::Closed => assert!(self.model.ever_closed(session, leg)),
                LegStatus::Expired => assert!(self.session_expiry(session) <= now_unix),
                LegStatus::Evicted => assert!(evicting),
                LegStatus::Moved | LegStatus::Idle => {}
                LegStatus::Serving | LegStatus::Disconnected => {
                    panic!("a sweep ended a leg as {why:?}")
                }
            }
            if matches!(
                why,
                LegStatus::Closed | LegStatus::Expired | LegStatus::Evicted
            ) {
                told.push(endpoint);
            }
            ended_own |= Some(endpoint) == own;
        }
        let mut probes = 0;
        for t in &transmits {
            assert!(
                self.model.ever_bound.contains(&t.dst),
                "a timer sent to {:?}, which never held a leg",
                t.dst
            );
            assert_eq!(
                self.door_of(t.dst),
                Some(door),
                "a timer sent to another table's leg"
            );
            match wire::parse_relay(t.msg.as_bytes()) {
                Ok(RelayMessage::Close { code, session }) => {
                    assert!(t.reliable, "CLOSE is reliable");
                    let session = SessionId(session);
                    let Some(i) = told.iter().position(|ep| *ep == t.dst) else {
                        panic!("a CLOSE to {:?}, whose leg the sweep did not end", t.dst);
                    };
                    told.swap_remove(i);
                    match ErrorCode::from_u16(code) {
                        Some(ErrorCode::SessionClosed) => assert!(
                            self.model.ever_revoked.contains(&session)
                                || self
                                    .model
                                    .ever_revoked_legs
                                    .iter()
                                    .any(|(s, _)| *s == session)
                        ),
                        Some(ErrorCode::Expired) => {
                            assert!(self.session_expiry(session) <= now_unix)
                        }
                        Some(ErrorCode::Draining) => assert!(evicting),
                        other => panic!("a sweep sent CLOSE {other:?}"),
                    }
                }
                Ok(RelayMessage::Probe { .. }) => {
                    let Door::Conn(slot) = door else {
                        panic!("a UDP worker sent a PROBE");
                    };
                    probes += 1;
                    self.record_probe(slot, t);
                }
                _ => panic!("a timer sent something other than CLOSE or PROBE"),
            }
        }
        assert!(told.is_empty(), "legs ended without a CLOSE: {told:?}");
        assert_eq!(
            probes,
            u32::from(probe_due && !ended_own),
            "a sweep sent {probes} PROBEs for an unproven path ({} sent, the last at {:?})",
            match door {
                Door::Conn(slot) => self.conn(slot).episode,
                Door::Worker(_) => 0,
            },
            match door {
                Door::Conn(slot) => self.conn(slot).last_probe.map(|t| now - t),
                Door::Worker(_) => None,
            },
        );
        if evicting {
            assert_eq!(legs_left, 0, "an evicting sweep left legs");
            for ep in mine {
                self.model.holds.remove(&ep);
            }
        }
        if ended_own && let Door::Conn(slot) = door {
            self.close(slot);
        }
    }

    /// Hands one datagram (or stream BIND) to the table that serves it, checks the verdict, the
    /// counters, every transmit and event, and returns the answers to its sender.
    fn deliver(&mut self, via: Via, pkt: &[u8]) -> Vec<Vec<u8>> {
        let (from, door, addr, exporter) = match via {
            Via::Udp(a) => (Endpoint::Udp(a), Door::Worker(worker_of(a)), a, None),
            Via::Datagram(slot) | Via::Stream(slot) => {
                let c = self.conn(slot);
                (c.ep(), Door::Conn(slot), c.addr, Some(c.exporter))
            }
        };
        let held = self.model.holds.get(&from).copied();
        let live = self.live(from);
        let now = self.now;
        let now_unix = self.node.unix_ms(now);
        let request = wire::parse_client(pkt);
        let class = wire::classify(pkt);
        let is_media = match class {
            Class::Rtp => pkt.len() >= wire::MIN_RTP_LEN,
            Class::Dtls => pkt.len() >= wire::MIN_DTLS_LEN,
            Class::Control | Class::Other => false,
        } && !matches!(via, Via::Stream(_));
        let is_bind = matches!(request, Ok(ClientMessage::Bind(_)));
        let t = self.table(door);
        let served = t.serves(from);
        let before = *t.stats();
        let verdict = match via {
            Via::Stream(_) => t.handle_stream_bind(
                now,
                from,
                addr,
                pkt,
                &exporter.expect("a connection's exporter"),
            ),
            Via::Udp(_) | Via::Datagram(_) => t.handle_datagram(now, from, pkt),
        };
        let (outcome, targets, targets_len) = match &verdict {
            Verdict::Forward(targets) => (
                Outcome::Forward,
                targets.iter().collect::<Vec<_>>(),
                targets.len(),
            ),
            Verdict::Control => (Outcome::Control, Vec::new(), 0),
            Verdict::Drop(r) => (Outcome::Drop(*r), Vec::new(), 0),
            // This model's node serves no TURN (`Config::turn_ip` is unset): the `turn` target
            // fuzzes that door.
            Verdict::Relay(r) => panic!("relayed with TURN off: {r:?}"),
        };
        drop(verdict);
        let after = *t.stats();
        let transmits: Vec<Transmit> = std::iter::from_fn(|| t.poll_transmit()).collect();
        let events: Vec<Event> = std::iter::from_fn(|| t.poll_event()).collect();
        let serves_now = t.serves(from);

        // Counters: received once; forwarded, handled or dropped once (besides withheld copies).
        assert_eq!(after.rx_packets, before.rx_packets + 1);
        assert_eq!(after.rx_bytes, before.rx_bytes + pkt.len() as u64);
        let drops = after.total_drops() - before.total_drops();
        let withheld =
            after.drops_for(DropReason::UnprovenPath) - before.drops_for(DropReason::UnprovenPath);
        let bind_results = |s: &Stats| BindResult::ALL.map(|r| s.binds_for(r));
        let (b0, b1) = (bind_results(&before), bind_results(&after));
        let counted: u64 = b1.iter().sum::<u64>() - b0.iter().sum::<u64>();
        assert_eq!(
            counted,
            u64::from(is_bind),
            "a BIND is counted once as bound, challenged or refused, anything else never"
        );
        match outcome {
            Outcome::Forward => {
                assert_eq!(
                    drops, withheld,
                    "a forwarded datagram was also counted as dropped"
                )
            }
            Outcome::Drop(DropReason::UnprovenPath) => {
                assert!(withheld >= 1, "dropped for unproven paths, none counted");
                assert_eq!(drops, withheld);
            }
            Outcome::Drop(reason) => {
                assert_eq!(drops, 1, "a drop counted {drops} times");
                assert_eq!(after.drops_for(reason), before.drops_for(reason) + 1);
            }
            Outcome::Control => {
                // A BIND with a stale cookie is answered with a fresh CHALLENGE, and counted as
                // a bad cookie.
                assert!(drops <= 1);
                assert_eq!(
                    drops,
                    after.drops_for(DropReason::BadCookie)
                        - before.drops_for(DropReason::BadCookie)
                );
            }
        }
        if outcome != Outcome::Forward {
            assert_eq!(after.forwarded_packets, before.forwarded_packets);
        }

        // The bind limiters start each source IP address with a burst of twice its rate and
        // refill it; a refusal therefore comes only after at least that burst. BINDs sent as QUIC
        // datagrams are refused before the limiter.
        if is_bind && !matches!(via, Via::Datagram(_)) {
            let limiter = match door {
                Door::Worker(w) => w,
                Door::Conn(_) => QUIC_LIMITER,
            };
            let admitted = self
                .model
                .binds_admitted
                .entry((limiter, addr.ip()))
                .or_default();
            if outcome == Outcome::Drop(DropReason::BindRateLimited) {
                assert!(
                    *admitted >= 2 * Config::default().binds_per_ip,
                    "a BIND refused by the rate limiter after {admitted} admitted from its address"
                );
            } else {
                *admitted += 1;
            }
        }

        // A BIND on the wrong transport binds nothing, whatever its tag.
        if let Ok(ClientMessage::Bind(b)) = request
            && outcome != Outcome::Drop(DropReason::BindRateLimited)
        {
            let wrong = match via {
                Via::Udp(_) => b.channel_bound,
                Via::Stream(_) => !b.channel_bound,
                Via::Datagram(_) => true,
            };
            assert_eq!(
                wrong,
                outcome == Outcome::Drop(DropReason::BadBinding),
                "a BIND (channel-bound: {}) over {via:?}: {outcome:?}",
                b.channel_bound
            );
        }
        if matches!(via, Via::Stream(_)) && !is_bind {
            assert_eq!(outcome, Outcome::Drop(DropReason::Malformed));
        }

        // The media path, against the model.
        let others: Vec<(Endpoint, bool, bool)> = match held {
            Some(h) => self
                .model
                .holds
                .iter()
                .filter(|(ep, o)| **ep != from && o.session == h.session && o.leg != h.leg)
                .map(|(ep, _)| (*ep, self.live(*ep), self.reachable(*ep)))
                .collect(),
            None => Vec::new(),
        };
        let live_reachable = others.iter().filter(|(_, l, r)| *l && *r).count();
        let live_withheld = others.iter().filter(|(_, l, r)| *l && !*r).count() as u64;
        let may_withhold = others.iter().filter(|(_, _, r)| !*r).count() as u64;
        match outcome {
            Outcome::Forward => {
                let Some(sender) = held else {
                    panic!("forwarded a datagram from {from:?}, which holds no leg");
                };
                assert!(
                    now_unix < sender.expires_unix_ms,
                    "forwarded for a leg whose token has expired"
                );
                assert!(!targets.is_empty(), "forwarded to nobody");
                assert_eq!(targets.len(), targets_len);
                let mut seen = HashSet::new();
                for ep in &targets {
                    assert_ne!(*ep, from, "forwarded a datagram back to its sender");
                    assert!(seen.insert(*ep), "{ep:?} targeted twice");
                    if let Endpoint::Quic(id) = ep {
                        assert!(
                            self.slot_of(*id).is_some(),
                            "forwarded to {ep:?}, a closed QUIC connection"
                        );
                    }
                    let Some(peer) = self.model.holds.get(ep) else {
                        panic!("forwarded to {ep:?}, which holds no leg");
                    };
                    assert_eq!(peer.session, sender.session, "forwarded across sessions");
                    assert_ne!(peer.leg, sender.leg, "forwarded to the sender's own leg");
                    assert!(
                        self.reachable(*ep),
                        "forwarded to {ep:?}, whose QUIC path is unproven"
                    );
                }
                for (ep, live, reachable) in &others {
                    if *live && *reachable {
                        assert!(
                            seen.contains(ep),
                            "not forwarded to {ep:?}, which holds a live leg of the session"
                        );
                    }
                }
                assert_eq!(
                    after.forwarded_packets - before.forwarded_packets,
                    seen.len() as u64
                );
                assert_eq!(
                    after.forwarded_bytes - before.forwarded_bytes,
                    (seen.len() * pkt.len()) as u64
                );
            }
            Outcome::Drop(
                r @ (DropReason::NoPeer | DropReason::UnprovenPath | DropReason::RateLimited),
            ) => {
                let Some(sender) = held else {
                    panic!("{from:?}, which holds no leg, had media dropped as {r:?}");
                };
                match r {
                    DropReason::NoPeer => assert!(
                        others.iter().all(|(_, live, _)| !live),
                        "no peer, while another leg of the session is live"
                    ),
                    DropReason::UnprovenPath => assert_eq!(
                        live_reachable, 0,
                        "dropped as unproven while a live leg of the session is reachable"
                    ),
                    _ => assert!(sender.limited, "rate limited without a limit"),
                }
            }
            Outcome::Drop(_) | Outcome::Control => {}
        }
        if matches!(
            outcome,
            Outcome::Forward | Outcome::Drop(DropReason::UnprovenPath)
        ) {
            assert!(
                (live_withheld..=may_withhold).contains(&withheld),
                "{withheld} copies withheld for unproven paths; {live_withheld} live legs of the \
                 session are unreachable, {may_withhold} may be"
            );
        } else {
            assert_eq!(withheld, 0, "copies withheld from a datagram not forwarded");
        }
        if is_media && live {
            assert!(
                matches!(
                    outcome,
                    Outcome::Forward
                        | Outcome::Drop(
                            DropReason::NoPeer | DropReason::UnprovenPath | DropReason::RateLimited
                        )
                ),
                "media from {from:?}, which holds a live leg: {outcome:?}"
            );
        }
        if is_media
            && matches!(
                outcome,
                Outcome::Forward
                    | Outcome::Drop(
                        DropReason::NoPeer | DropReason::UnprovenPath | DropReason::RateLimited
                    )
            )
            && let Some(h) = self.model.holds.get_mut(&from)
        {
            h.last_seen = now;
        }

        // PROBE_ACK: proves the connection's current address iff it echoes a fresh PROBE sent
        // there, on this connection.
        if let Ok(ClientMessage::ProbeAck { cookie, .. }) = request {
            match via {
                Via::Datagram(slot) => {
                    let c = self.conn(slot);
                    let echoes = c.probes.iter().any(|p| {
                        same(p.addr, c.addr) && p.cookie[..] == *cookie && self.fresh(p.at)
                    });
                    let unproven = !same(c.addr, c.proven);
                    if outcome == Outcome::Control {
                        assert!(
                            echoes && unproven,
                            "a PROBE_ACK proved {} without echoing a fresh PROBE sent there",
                            c.addr
                        );
                        let c = self.conn_mut(slot);
                        c.proven = c.addr;
                        c.episode = 0;
                        c.last_probe = None;
                        c.since_proof = 0;
                    } else {
                        assert_eq!(outcome, Outcome::Drop(DropReason::BadCookie));
                        assert!(
                            !(echoes && unproven && served),
                            "a fresh PROBE_ACK from the address the PROBE went to was refused"
                        );
                    }
                }
                Via::Udp(_) => assert_eq!(outcome, Outcome::Drop(DropReason::BadCookie)),
                Via::Stream(_) => {}
            }
        }

        // Transmits: answers to the sender, and nothing else but to endpoints that held a leg.
        let mut answers = Vec::new();
        for t in &transmits {
            let msg = t.msg.as_bytes();
            match door {
                Door::Worker(_) => assert!(
                    matches!(t.dst, Endpoint::Udp(_)),
                    "a UDP worker sent to {:?}",
                    t.dst
                ),
                Door::Conn(_) => {
                    assert_eq!(t.dst, from, "a QUIC connection's table sent elsewhere")
                }
            }
            let close = matches!(wire::parse_relay(msg), Ok(RelayMessage::Close { .. }));
            assert_eq!(
                t.reliable,
                close || matches!(via, Via::Stream(_)),
                "reliable: {} for {:02x?} answering over {via:?}",
                t.reliable,
                msg
            );
            if t.dst == from {
                if held.is_none() && matches!(via, Via::Udp(_)) {
                    assert!(
                        msg.len() <= pkt.len(),
                        "{}-byte answer to a {}-byte datagram from an address that holds no leg",
                        msg.len(),
                        pkt.len()
                    );
                }
                self.check_answer(via, from, pkt, msg, held);
                answers.push(msg.to_vec());
            } else {
                assert!(
                    self.model.ever_bound.contains(&t.dst),
                    "sent to {:?}, which never held a leg, while handling a datagram from {from:?}",
                    t.dst
                );
            }
        }
        assert!(
            answers.len() <= 1,
            "{} answers to one datagram",
            answers.len()
        );
        if is_bind && outcome != Outcome::Drop(DropReason::BindRateLimited) {
            assert_eq!(
                answers.len(),
                1,
                "a BIND the limiter admitted went unanswered"
            );
        }
        let answered = |ty: u8| answers.first().is_some_and(|a| a[0] == ty);
        assert_eq!(
            b1[BindResult::Bound as usize] - b0[BindResult::Bound as usize],
            u64::from(answered(wire::TYPE_BIND_OK)),
        );
        assert_eq!(
            b1[BindResult::Challenged as usize] - b0[BindResult::Challenged as usize],
            u64::from(answered(wire::TYPE_CHALLENGE)),
        );
        if matches!(request, Ok(ClientMessage::Keepalive { .. })) && live {
            assert!(
                answered(wire::TYPE_KEEPALIVE_ACK),
                "a KEEPALIVE from {from:?}, which holds a live leg, was not acknowledged"
            );
        }

        let mut ended_own = false;
        for e in events {
            match e {
                Event::Bound { endpoint, .. } => assert_eq!(endpoint, from),
                Event::Unbound { endpoint, why, .. } => {
                    assert_eq!(
                        endpoint, from,
                        "a datagram from {from:?} unbound {endpoint:?}"
                    );
                    assert!(
                        matches!(
                            why,
                            LegStatus::Closed | LegStatus::Moved | LegStatus::Expired
                        ),
                        "a datagram ended a leg as {why:?}"
                    );
                    ended_own = true;
                }
            }
        }
        assert!(!serves_now || !ended_own);
        if let Via::Stream(slot) = via {
            // The shell keeps the connection if its BIND bound the leg, else closes it.
            assert_eq!(
                serves_now,
                answered(wire::TYPE_BIND_OK),
                "a stream BIND bound the connection without BIND_OK, or the reverse"
            );
            if serves_now {
                let c = self.conn_mut(slot);
                c.bound = true;
                c.proven = c.addr;
            } else {
                self.close(slot);
            }
        } else if let Via::Datagram(slot) = via
            && ended_own
        {
            // The leg ended: the shell closes the connection.
            self.close(slot);
        }
        answers
    }

    /// Checks one answer to `pkt` from `from`, and learns from a BIND_OK.
    fn check_answer(
        &mut self,
        via: Via,
        from: Endpoint,
        pkt: &[u8],
        answer: &[u8],
        held: Option<Held>,
    ) {
        let Ok(msg) = wire::parse_relay(answer) else {
            panic!("the relay sent a message a client cannot parse: {answer:02x?}");
        };
        let request = wire::parse_client(pkt);
        let now_unix = self.node.unix_ms(self.now);
        let (addr, exporter) = match via {
            Via::Udp(a) => (a, None),
            Via::Datagram(slot) | Via::Stream(slot) => {
                let c = self.conn(slot);
                (c.addr, Some(c.exporter))
            }
        };
        // Whether a BIND's tag verifies for the transport it came on, and its claims if so.
        let verified = |b: &wire::Bind<'_>| match via {
            Via::Udp(_) if !b.channel_bound => self.ring.verify(b.ticket, b.signed, b.tag).ok(),
            Via::Stream(_) if b.channel_bound => {
                let x = exporter.expect("a connection's exporter");
                self.ring
                    .verify_parts(b.ticket, &[b.signed, &x], b.tag)
                    .ok()
            }
            _ => None,
        };
        match msg {
            RelayMessage::Challenge { txn, cookie } => {
                let Ok(ClientMessage::Bind(b)) = request else {
                    panic!("CHALLENGE answers something other than a BIND");
                };
                assert!(matches!(via, Via::Udp(_)), "CHALLENGE over QUIC");
                assert_eq!(txn, b.txn);
                assert!(
                    verified(&b).is_some(),
                    "CHALLENGE for a BIND whose tag does not verify"
                );
                assert_eq!(
                    self.cookies.check(self.mono_ms(), addr, b.ticket, cookie),
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
                let Some(ticket) = verified(&b) else {
                    panic!(
                        "BIND_OK over {via:?} for a BIND (channel-bound: {}) whose tag does not \
                         verify for that transport",
                        b.channel_bound
                    );
                };
                match via {
                    Via::Udp(_) => {
                        let Some(cookie) = b.cookie else {
                            panic!("BIND_OK for a UDP BIND without a cookie");
                        };
                        assert_eq!(
                            self.cookies.check(self.mono_ms(), addr, b.ticket, cookie),
                            Ok(()),
                            "BIND_OK for a cookie not valid for the sender"
                        );
                    }
                    Via::Stream(_) => assert!(b.cookie.is_none()),
                    Via::Datagram(_) => panic!("BIND_OK for a BIND sent as a QUIC datagram"),
                }
                let expires_unix_ms = self.expiry_of(ticket.session, ticket.expires_unix_ms);
                assert!(
                    expires_unix_ms > now_unix,
                    "BIND_OK for an expired ticket (of a session not extended past now)"
                );
                assert!(
                    !self.model.closed(ticket.session, ticket.leg),
                    "BIND_OK for a revoked session or leg"
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
                        expires_unix_ms,
                        limited: ticket.limits != Limits::default(),
                        last_seen: self.now,
                    },
                );
                self.model.ever_bound.insert(from);
            }
            RelayMessage::KeepaliveAck { txn } => {
                assert_eq!(request, Ok(ClientMessage::Keepalive { txn }));
                assert!(
                    held.is_some(),
                    "KEEPALIVE_ACK to an endpoint that holds no leg"
                );
                if let Some(h) = self.model.holds.get_mut(&from) {
                    h.last_seen = self.now;
                }
            }
            RelayMessage::Probe { .. } => panic!("a PROBE answers a datagram"),
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
                        panic!("CLOSE (expired) to an endpoint that holds no leg");
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
                        let ticket = verified(&b);
                        match code {
                            ErrorCode::Unauthorized => assert!(
                                ticket.is_none(),
                                "a BIND whose tag verifies for its transport refused as \
                                 unauthorized"
                            ),
                            ErrorCode::Expired => assert!(
                                ticket
                                    .is_some_and(|t| self.expiry_of(t.session, t.expires_unix_ms)
                                        <= now_unix),
                                "a BIND refused as expired, for a ticket that is not"
                            ),
                            ErrorCode::SessionClosed => assert!(
                                ticket.is_some_and(|t| self.model.closed(t.session, t.leg)),
                                "a BIND refused as closed, for a session or leg that is not revoked"
                            ),
                            ErrorCode::RelayFull => assert!(
                                self.node.directory.legs() >= MAX_LEGS,
                                "a BIND refused as full, with room"
                            ),
                            ErrorCode::Draining => assert!(self.node.directory.is_draining()),
                            ErrorCode::NotBound | ErrorCode::RateLimited => {
                                panic!("{code:?} answers a BIND")
                            }
                        }
                        if matches!(via, Via::Datagram(_)) {
                            assert_eq!(code, ErrorCode::Unauthorized);
                        }
                    }
                    Ok(ClientMessage::ProbeAck { .. }) => panic!("ERROR answers a PROBE_ACK"),
                    Err(_) => panic!("ERROR answers a malformed message"),
                }
            }
        }
    }

    /// The node's counters, summed over every table (closed connections' included).
    pub fn stats(&self) -> Stats {
        let mut total = self.closed;
        for w in &self.workers {
            total.merge(w.stats());
        }
        for c in self.conns.iter().flatten() {
            total.merge(c.table.stats());
        }
        total
    }
}

/// Runs a whole input: the `datagram` fuzz target. Returns every table's counters, summed.
pub fn run(data: &[u8]) -> Stats {
    let mut s = Scenario::new();
    for op in decode(data) {
        s.run(&op);
    }
    // Let every leg go idle, sweep, and check what the timers send. Then nothing may be left:
    // a leg the session table still counts, or a table still holds, would be a leak (capacity
    // that never comes back, or an endpoint that keeps receiving).
    s.run(&Op::Advance { ms: 60_000 });
    for w in &s.workers {
        assert_eq!(
            w.local_legs(),
            0,
            "a worker holds a leg after every leg went idle"
        );
    }
    for c in s.conns.iter().flatten() {
        assert!(
            !c.bound,
            "a QUIC connection still bound after every leg went idle"
        );
        assert_eq!(c.table.local_legs(), 0);
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
