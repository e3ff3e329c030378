//! `veil-testkit`: the one harness for driving Veil's sans-IO core without sockets, shared by
//! the core's scenario tests, its criterion benches, and the bench binaries that profile the
//! core (`core-profile`, `legs-memory`). A dev-dependency only: nothing that ships links it.
//!
//! [`Net`] is a virtual network in virtual time: one relay [`Node`], its key ring, a clock that
//! only [`Net::advance`] moves, and tables for UDP workers and QUIC connections. The helpers run
//! each transport's bind exchange as a real client would (the two-round cookie bind over UDP,
//! the channel-bound BIND on a QUIC connection's stream) and read what the core answers.
//!
//! With the feature `browser`, the `browser` module drives headless Chromium over W3C
//! WebDriver, for the WebRTC tests. The `stun` module reads TURN answers as a test client does.

#[cfg(feature = "browser")]
pub mod browser;
pub mod stun;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use veil_relay_core::limit::BindLimiter;
use veil_relay_core::token::{KeyId, Limits, SessionId, Ticket, Token};
use veil_relay_core::wire::{self, COOKIE_LEN, EXPORTER_LEN, RelayMessage};
use veil_relay_core::{Config, Endpoint, ForwardingTable, KeyRing, Node, Transmit, Verdict};

/// Unix time, milliseconds, at the start of virtual time.
pub const T0_UNIX_MS: u64 = 1_800_000_000_000;

/// A relay node in virtual time, and the key ring its tokens come from.
#[derive(Debug)]
pub struct Net {
    /// The origin of virtual time.
    pub t0: Instant,
    /// Now, in virtual time.
    pub now: Instant,
    /// The node every table of this net belongs to.
    pub node: Arc<Node>,
    /// The cluster key ring (key 2 signs; key 1 is also accepted).
    pub keys: KeyRing,
    quic_binds: Arc<Mutex<BindLimiter>>,
}

impl Default for Net {
    fn default() -> Self {
        Self::new()
    }
}

impl Net {
    /// A node holding at most 1,000 legs, with the default packet-path configuration.
    pub fn new() -> Self {
        Self::with_capacity(1_000)
    }

    /// A node holding at most `max_legs` legs.
    pub fn with_capacity(max_legs: usize) -> Self {
        Self::with_config(Config::default(), max_legs)
    }

    /// A node whose bind limits are out of the way, for benchmarks that bind many legs from a
    /// few synthetic addresses as fast as the CPU allows.
    pub fn unlimited(max_legs: usize) -> Self {
        Self::with_config(
            Config {
                binds_per_ip: 1_000_000_000,
                binds_per_worker: 1_000_000_000,
                ..Config::default()
            },
            max_legs,
        )
    }

    /// A node with `config`, holding at most `max_legs` legs.
    pub fn with_config(config: Config, max_legs: usize) -> Self {
        let keys = KeyRing::from_keys(&[(1, [1; 32]), (2, [2; 32])], 2);
        // One real clock reading, as the arbitrary origin of virtual time.
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let quic_binds = Arc::new(Mutex::new(BindLimiter::new(
            config.binds_per_ip,
            config.binds_per_worker,
            t0,
        )));
        let node = Arc::new(Node::new(
            config,
            keys.clone(),
            max_legs,
            [9; 32],
            t0,
            T0_UNIX_MS,
        ));
        Self {
            t0,
            now: t0,
            node,
            keys,
            quic_binds,
        }
    }

    /// A UDP worker's table (with a bind limiter of its own).
    pub fn worker(&self) -> ForwardingTable {
        ForwardingTable::new(self.node.clone(), self.now)
    }

    /// A QUIC connection's table: as the QUIC shell makes one per connection, sharing one bind
    /// limiter among them.
    pub fn connection(&self) -> ForwardingTable {
        ForwardingTable::with_shared_binds(self.node.clone(), self.now, self.quic_binds.clone())
    }

    /// Moves virtual time on.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    /// A token for leg `leg` of `legs` of `session`, valid an hour, default limits.
    pub fn token(&self, session: u64, leg: u8, legs: u8) -> Token {
        self.token_with(session, leg, legs, Limits::default(), 3_600_000)
    }

    /// A token with these limits, valid `ttl_ms` from the start of virtual time.
    pub fn token_with(
        &self,
        session: u64,
        leg: u8,
        legs: u8,
        limits: Limits,
        ttl_ms: u64,
    ) -> Token {
        self.keys.mint(Ticket {
            key_id: KeyId(0),
            session: SessionId(session),
            leg,
            legs,
            expires_unix_ms: T0_UNIX_MS + ttl_ms,
            limits,
        })
    }
}

/// 127.0.0.`last`:`port`.
pub fn addr(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, last], port))
}

/// Synthetic client address number `i`: 127.1.x.y, 62,500 ports each (never used on a
/// network).
pub fn synthetic_addr(i: u64) -> SocketAddr {
    let ip = Ipv4Addr::new(
        127,
        1,
        (i / 62_500 / 256) as u8,
        (i / 62_500 % 256) as u8 + 1,
    );
    SocketAddr::V4(SocketAddrV4::new(ip, 1024 + (i % 62_500) as u16))
}

/// Limits too high ever to bite: the limiter runs on every packet, as it does for a
/// controller's tokens, without dropping anything.
pub const NO_LIMITS: Limits = Limits {
    max_pps: u32::MAX,
    max_kbps: u32::MAX,
};

/// Drains a table's transmits.
pub fn replies(t: &mut ForwardingTable) -> Vec<Transmit> {
    std::iter::from_fn(|| t.poll_transmit()).collect()
}

/// Drains a table's events.
pub fn forget_events(t: &mut ForwardingTable) {
    while t.poll_event().is_some() {}
}

/// Runs the two-round UDP bind for `token` from `from` at `now` (BIND, CHALLENGE, BIND with the
/// cookie, transaction ids 1 and 2). Returns the final answer's bytes: BIND_OK, or the ERROR
/// that ended it (then possibly after the first round).
pub fn udp_bind(t: &mut ForwardingTable, now: Instant, from: SocketAddr, token: &Token) -> Vec<u8> {
    let first = wire::bind(token, [1; 8], None);
    t.handle_datagram(now, from, &first);
    let out = replies(t);
    assert_eq!(out.len(), 1, "one answer to a BIND: {out:?}");
    assert_eq!(out[0].dst, from);
    let cookie: [u8; COOKIE_LEN] = match wire::parse_relay(out[0].msg.as_bytes()) {
        Ok(RelayMessage::Challenge { txn, cookie }) => {
            assert_eq!(txn, [1; 8]);
            cookie.try_into().expect("the parser checked the length")
        }
        _ => return out[0].msg.as_bytes().to_vec(),
    };
    t.handle_datagram(now, from, &wire::bind(token, [2; 8], Some(&cookie)));
    let out = replies(t);
    assert_eq!(out.len(), 1, "one answer to a BIND: {out:?}");
    out[0].msg.as_bytes().to_vec()
}

/// True if `b` is a BIND_OK.
pub fn is_bind_ok(b: &[u8]) -> bool {
    matches!(wire::parse_relay(b), Ok(RelayMessage::BindOk { .. }))
}

/// Sends the channel-bound BIND for `token` on QUIC connection `ep` (at `addr`, with TLS
/// exporter value `exporter`) as the QUIC shell hands it over; returns the one answer.
pub fn quic_bind(
    t: &mut ForwardingTable,
    now: Instant,
    ep: Endpoint,
    addr: SocketAddr,
    token: &Token,
    exporter: &[u8; EXPORTER_LEN],
) -> Transmit {
    let pkt = wire::bind_channel(token, [2; 8], exporter);
    t.handle_stream_bind(now, ep, addr, &pkt, exporter);
    let out = replies(t);
    assert_eq!(out.len(), 1, "one answer to a BIND: {out:?}");
    assert!(out[0].reliable, "a stream bind is answered on the stream");
    assert_eq!(out[0].dst, ep);
    out[0]
}

/// An RTP-shaped datagram of `len` bytes (shorter than 4: only the first bytes) with sequence
/// number `seq`.
pub fn rtp(seq: u16, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len.max(4)];
    p[0] = 0x80;
    p[1] = 111;
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p
}

/// Where a verdict forwards to (nothing unless `Forward`).
pub fn targets(v: &Verdict) -> Vec<Endpoint> {
    match v {
        Verdict::Forward(t) => t.iter().collect(),
        _ => Vec::new(),
    }
}
