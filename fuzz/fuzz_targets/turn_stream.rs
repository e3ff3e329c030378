//! TURN over TCP and TLS: the relay shell's stream framing (`stun::frame_len`) and the core's
//! `handle_turn_stream`, with one node and a table per door as the relay has them: a UDP
//! worker holding leg 0 of session 1, a TCP connection holding leg 1 of session 1, a TLS
//! connection holding leg 0 of session 2 (each allocated with its own credentials). Arbitrary
//! operations: raw byte chunks on either stream (cut anywhere, as TCP delivers them), signed
//! requests, Send indications and padded ChannelData on the streams, datagrams on the UDP
//! port, time passing.
//!
//! Asserts: no panic; the framer never hands out a message longer than the buffer holds or 4
//! KiB, and a stream that cannot be framed is closed (nothing more of it is read); every answer
//! goes back to the connection that asked; media is relayed only to another allocation of the
//! same session, never across sessions, never back to the sender; a relayed payload lies within
//! its message.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use veil_fuzz::Reader;
use veil_relay_core::stun::{self, Builder, Kind, MAX_STREAM_FRAME, attr, method};
use veil_relay_core::token::{KeyId, Limits, SessionId, Ticket, Token};
use veil_relay_core::turn::relayed_port;
use veil_relay_core::{Config, ConnId, Endpoint, ForwardingTable, Node, Verdict};
use veil_testkit::stun::Credentials;

const RELAY_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));
const T0_UNIX_MS: u64 = 1_800_000_000_000;

fn token(ring: &veil_relay_core::KeyRing, session: u64, leg: u8) -> Token {
    ring.mint(Ticket {
        key_id: KeyId(0),
        session: SessionId(session),
        leg,
        legs: 2,
        expires_unix_ms: T0_UNIX_MS + 3_600_000,
        limits: Limits::default(),
    })
}

/// One door and its client: the table serving it, where the client is, what it has sent that
/// the framer has not cut yet.
struct Door {
    ep: Endpoint,
    addr: SocketAddr,
    session: u64,
    table: ForwardingTable,
    creds: Credentials,
    nonce: Vec<u8>,
    txn: u32,
    pending: Vec<u8>,
    closed: bool,
}

impl Door {
    fn signed(&mut self, method: u16, attrs: impl FnOnce(Builder) -> Builder) -> Vec<u8> {
        self.txn += 1;
        let mut txn = [0x22; 12];
        txn[8..].copy_from_slice(&self.txn.to_be_bytes());
        self.creds.sign(
            attrs(Builder::new(method, Kind::Request, &txn)),
            &self.nonce,
        )
    }

    fn is_stream(&self) -> bool {
        matches!(self.ep, Endpoint::TurnTcp(_) | Endpoint::TurnTls(_))
    }

    /// One whole message into its table: a datagram for UDP, a framed message for a stream.
    fn handle(&mut self, now: Instant, msg: &[u8]) -> Verdict {
        if self.is_stream() {
            self.table.handle_turn_stream(now, self.ep, self.addr, msg)
        } else {
            self.table.handle_datagram(now, self.addr, msg)
        }
    }
}

struct World {
    now: Instant,
    doors: Vec<Door>,
}

impl World {
    fn new() -> Self {
        let ring = veil_fuzz::key_ring();
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let now = *T0.get_or_init(Instant::now);
        let config = Config {
            turn_ip: Some(RELAY_IP),
            ..Config::default()
        };
        let node = Arc::new(Node::new(
            config,
            ring.clone(),
            100,
            *veil_fuzz::COOKIE_SECRET,
            now,
            T0_UNIX_MS,
        ));
        let at = |last: u8| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)), 5000);
        let doors = [
            (Endpoint::TurnUdp(at(1)), at(1), 1, 0),
            (Endpoint::TurnTcp(ConnId(7)), at(2), 1, 1),
            (Endpoint::TurnTls(ConnId(8)), at(3), 2, 0),
        ];
        let mut w = Self {
            now,
            doors: doors
                .into_iter()
                .map(|(ep, addr, session, leg)| Door {
                    ep,
                    addr,
                    session,
                    table: ForwardingTable::new(node.clone(), now),
                    creds: Credentials::of(&token(&ring, session, leg)),
                    nonce: Vec::new(),
                    txn: 0,
                    pending: Vec::new(),
                    closed: false,
                })
                .collect(),
        };
        for d in &mut w.doors {
            let first = Builder::new(method::ALLOCATE, Kind::Request, &[9; 12])
                .u32(attr::REQUESTED_TRANSPORT, 17 << 24);
            d.handle(now, first.as_bytes());
            let t = d.table.poll_transmit().expect("a 401");
            d.nonce = stun::parse(t.msg.as_bytes())
                .unwrap()
                .nonce
                .unwrap()
                .to_vec();
            let req = d.signed(method::ALLOCATE, |b| {
                b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
            });
            d.handle(now, &req);
            let ok = d.table.poll_transmit().expect("an answer");
            assert_eq!(stun::parse(ok.msg.as_bytes()).unwrap().kind, Kind::Success);
            while d.table.poll_event().is_some() {}
        }
        w
    }

    /// Bytes from door `i`'s client: a datagram over UDP; over a stream, appended and framed as
    /// the relay's shell frames them.
    fn send(&mut self, i: usize, bytes: &[u8]) {
        if !self.doors[i].is_stream() {
            self.deliver(i, bytes);
            return;
        }
        if self.doors[i].closed {
            return;
        }
        self.doors[i].pending.extend_from_slice(bytes);
        loop {
            let pending = &self.doors[i].pending;
            match stun::frame_len(pending) {
                None => return,
                Some(Err(_)) => {
                    self.doors[i].closed = true;
                    return;
                }
                Some(Ok(len)) => {
                    assert!((4..=MAX_STREAM_FRAME).contains(&len));
                    if len > pending.len() {
                        return;
                    }
                    let msg: Vec<u8> = self.doors[i].pending.drain(..len).collect();
                    self.deliver(i, &msg);
                }
            }
        }
    }

    /// One whole message from door `i`'s client, and the checks on what comes out.
    fn deliver(&mut self, i: usize, msg: &[u8]) {
        let now = self.now;
        let verdict = self.doors[i].handle(now, msg);
        if let Verdict::Relay(r) = &verdict {
            let dst = self
                .doors
                .iter()
                .position(|d| d.ep == r.dst)
                .unwrap_or_else(|| panic!("relayed to {:?}, no allocation", r.dst));
            assert_ne!(dst, i, "relayed back to the sender");
            assert_eq!(
                self.doors[dst].session, self.doors[i].session,
                "across sessions"
            );
            assert!(r.payload.start <= r.payload.end && r.payload.end <= msg.len());
            let mut out = [0u8; 1700];
            r.datagram(msg, &mut out, &[0; 12]);
        }
        let d = &mut self.doors[i];
        while let Some(t) = d.table.poll_transmit() {
            // The UDP door is the media port: a Veil control packet on it is answered as
            // `Endpoint::Udp`, a TURN one as `Endpoint::TurnUdp`, out of the one socket, to the
            // one address.
            let same = t.dst == d.ep
                || matches!((t.dst, d.ep), (Endpoint::Udp(a), Endpoint::TurnUdp(b)) if a == b);
            assert!(
                same,
                "an answer to another door: {:?} for {:?}",
                t.dst, d.ep
            );
        }
        while d.table.poll_event().is_some() {}
    }
}

fuzz_target!(|data: &[u8]| {
    let mut w = World::new();
    let mut r = Reader::new(data);
    let mut steps = 0;
    while !r.is_empty() && steps < 64 {
        steps += 1;
        let op = r.u8();
        let i = usize::from(r.u8()) % 3;
        match op % 5 {
            // Raw bytes, cut anywhere.
            0 => {
                let len = usize::from(r.u16() % 1600);
                let bytes = r.bytes(len).to_vec();
                w.send(i, &bytes);
            }
            // A signed request with fuzzed fields, toward any peer.
            1 => {
                let m = [
                    method::CREATE_PERMISSION,
                    method::CHANNEL_BIND,
                    method::REFRESH,
                    method::ALLOCATE,
                ][usize::from(r.u8()) % 4];
                let port = relayed_port(r.u8() % 40);
                let ch = 0x4000 | (r.u16() & 0x0fff);
                let extra = r.u8();
                let pkt = w.doors[i].signed(m, |mut b| {
                    if extra & 1 != 0 {
                        b = b.xor_addr(attr::XOR_PEER_ADDRESS, SocketAddr::new(RELAY_IP, port));
                    }
                    if extra & 2 != 0 {
                        b = b.u32(attr::CHANNEL_NUMBER, u32::from(ch) << 16);
                    }
                    if extra & 4 != 0 {
                        b = b.u32(attr::LIFETIME, u32::from(extra));
                    }
                    b
                });
                w.send(i, &pkt);
            }
            // A Send indication toward a relayed address.
            2 => {
                let peer = SocketAddr::new(RELAY_IP, relayed_port(r.u8() % 40));
                let len = usize::from(r.u8());
                let payload = r.bytes(len).to_vec();
                let mut pkt = vec![0u8; 1700];
                let n = stun::write_data_indication(&mut pkt, &[3; 12], peer, &payload);
                pkt.truncate(n);
                pkt[1] = 0x16;
                w.send(i, &pkt);
            }
            // ChannelData, padded on streams as RFC 8656 §12.5 says (or not, if the fuzzer says).
            3 => {
                let ch = r.u16();
                let len = usize::from(r.u8());
                let pad = r.u8() & 1 == 0;
                let mut pkt = ch.to_be_bytes().to_vec();
                pkt.extend((len as u16).to_be_bytes());
                pkt.extend(r.bytes(len));
                if pad {
                    pkt.resize(pkt.len().next_multiple_of(4), 0);
                }
                w.send(i, &pkt);
            }
            // Time passes.
            _ => {
                w.now += Duration::from_millis(u64::from(r.u16()) * 50);
                for d in &mut w.doors {
                    d.table.handle_timeout(w.now);
                    while d.table.poll_transmit().is_some() {}
                    while d.table.poll_event().is_some() {}
                }
            }
        }
    }
});
