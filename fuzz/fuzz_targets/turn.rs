//! The relay's TURN door: a UDP worker's forwarding table with TURN on, three genuine
//! allocations (legs 0 and 1 of session 1, leg 0 of session 2, each signed with its own
//! credentials), and arbitrary operations: raw datagrams from the allocations' addresses or
//! from strangers, requests the genuine clients sign with arbitrary fields (CreatePermission,
//! ChannelBind, Refresh, Allocate, to any peer address), Send indications and ChannelData to any
//! peer or channel, and time passing.
//!
//! Asserts: no panic; media is relayed only from an allocation to another allocation of the
//! same session (never to a stranger, never across sessions, never to an address a client
//! named); every answer goes to the source of the datagram that caused it; a stranger (who
//! holds no credentials) never gets an answer larger than twice its datagram, and for anything
//! but an Allocate none larger than its datagram; a relayed payload lies within the datagram.
//!
//! Input: a sequence of operations, `op (1) | ...` (see `fuzz_target!` below).

#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use veil_fuzz::Reader;
use veil_relay_core::stun::{self, Builder, Kind, attr, method};
use veil_relay_core::token::{KeyId, Limits, SessionId, Ticket, Token};
use veil_relay_core::turn::relayed_port;
use veil_relay_core::{Config, Endpoint, ForwardingTable, Node, Verdict};
use veil_testkit::stun::Credentials;

const RELAY_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));
const T0_UNIX_MS: u64 = 1_800_000_000_000;

struct Client {
    addr: SocketAddr,
    session: u64,
    creds: Credentials,
    nonce: Vec<u8>,
    txn: u32,
}

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

impl Client {
    fn new(addr: SocketAddr, session: u64, token: &Token) -> Self {
        Self {
            addr,
            session,
            creds: Credentials::of(token),
            nonce: Vec::new(),
            txn: 0,
        }
    }

    fn signed(&mut self, method: u16, attrs: impl FnOnce(Builder) -> Builder) -> Vec<u8> {
        self.txn += 1;
        let mut txn = [0x11; 12];
        txn[8..].copy_from_slice(&self.txn.to_be_bytes());
        txn[0] = self.addr.ip().to_string().len() as u8;
        self.creds.sign(
            attrs(Builder::new(method, Kind::Request, &txn)),
            &self.nonce,
        )
    }
}

struct World {
    now: Instant,
    table: ForwardingTable,
    clients: Vec<Client>,
}

impl World {
    fn new() -> Self {
        let ring = veil_fuzz::key_ring();
        // One clock reading per process: every input starts at the same instant.
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
        let table = ForwardingTable::new(node, now);
        let at = |last: u8| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)), 5000);
        let clients = vec![
            Client::new(at(1), 1, &token(&ring, 1, 0)),
            Client::new(at(2), 1, &token(&ring, 1, 1)),
            Client::new(at(3), 2, &token(&ring, 2, 0)),
        ];
        let mut w = Self {
            now,
            table,
            clients,
        };
        for i in 0..w.clients.len() {
            let first = Builder::new(method::ALLOCATE, Kind::Request, &[i as u8; 12])
                .u32(attr::REQUESTED_TRANSPORT, 17 << 24);
            let addr = w.clients[i].addr;
            w.table.handle_datagram(w.now, addr, first.as_bytes());
            let t = w.table.poll_transmit().expect("a 401");
            w.clients[i].nonce = stun::parse(t.msg.as_bytes())
                .unwrap()
                .nonce
                .unwrap()
                .to_vec();
            let req = w.clients[i].signed(method::ALLOCATE, |b| {
                b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
            });
            w.table.handle_datagram(w.now, addr, &req);
            let ok = w.table.poll_transmit().expect("an answer");
            assert_eq!(stun::parse(ok.msg.as_bytes()).unwrap().kind, Kind::Success);
        }
        while w.table.poll_event().is_some() {}
        w
    }

    /// Feeds one datagram from `from` and checks what comes out.
    fn feed(&mut self, from: SocketAddr, pkt: &[u8]) {
        let sender = self.clients.iter().position(|c| c.addr == from);
        let verdict = self.table.handle_datagram(self.now, from, pkt);
        if let Verdict::Relay(r) = &verdict {
            let s = sender.expect("relayed for a stranger");
            let dst = self
                .clients
                .iter()
                .position(|c| Endpoint::TurnUdp(c.addr) == r.dst)
                .unwrap_or_else(|| panic!("relayed to {:?}, no allocation", r.dst));
            assert_ne!(dst, s, "relayed back to the sender");
            assert_eq!(
                self.clients[dst].session, self.clients[s].session,
                "across sessions"
            );
            assert!(r.payload.end <= pkt.len() && r.payload.start <= r.payload.end);
            let mut out = [0u8; 1700];
            r.datagram(pkt, &mut out, &[0; 12]);
        }
        if let Verdict::Forward(t) = &verdict {
            assert!(
                t.is_empty() || sender.is_some(),
                "a stranger's datagram forwarded"
            );
        }
        let is_allocate = stun::parse(pkt).is_ok_and(|m| m.method == method::ALLOCATE);
        while let Some(t) = self.table.poll_transmit() {
            assert!(
                t.dst == Endpoint::TurnUdp(from) || t.dst == Endpoint::Udp(from),
                "answer to {:?}",
                t.dst
            );
            if sender.is_none() {
                let n = t.msg.as_bytes().len();
                let limit = if is_allocate {
                    2 * pkt.len()
                } else {
                    pkt.len()
                };
                assert!(n <= limit, "{n} bytes to a stranger for {}", pkt.len());
            }
        }
        while self.table.poll_event().is_some() {}
    }
}

fn peer_addr(r: &mut Reader<'_>) -> SocketAddr {
    match r.u8() % 4 {
        0 => SocketAddr::new(RELAY_IP, relayed_port(r.u8() % 70)),
        1 => SocketAddr::new(RELAY_IP, r.u16()),
        2 => SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, r.u8())), r.u16()),
        _ => SocketAddr::new(
            IpAddr::V6(Ipv4Addr::new(203, 0, 113, 1).to_ipv6_mapped()),
            relayed_port(r.u8() % 20),
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut w = World::new();
    let mut r = Reader::new(data);
    let mut steps = 0;
    while !r.is_empty() && steps < 64 {
        steps += 1;
        let op = r.u8();
        let who = usize::from(r.u8()) % 3;
        match op % 6 {
            // Raw bytes from an allocation's address or a stranger's.
            0 => {
                let from = if op & 0x80 == 0 {
                    w.clients[who].addr
                } else {
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 9, 9, r.u8())), 6000)
                };
                let len = usize::from(r.u8());
                let pkt = r.bytes(len).to_vec();
                w.feed(from, &pkt);
            }
            // A signed request with fuzzed fields.
            1 => {
                let m = [
                    method::CREATE_PERMISSION,
                    method::CHANNEL_BIND,
                    method::REFRESH,
                    method::ALLOCATE,
                ][usize::from(r.u8()) % 4];
                let peer = peer_addr(&mut r);
                let ch = r.u16();
                let life = u32::from(r.u16());
                let extra = r.u8();
                let pkt = w.clients[who].signed(m, |mut b| {
                    if extra & 1 != 0 {
                        b = b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
                    }
                    if extra & 2 != 0 {
                        b = b.u32(attr::CHANNEL_NUMBER, u32::from(ch) << 16);
                    }
                    if extra & 4 != 0 {
                        b = b.u32(attr::LIFETIME, life);
                    }
                    if extra & 8 != 0 {
                        b = b.u32(attr::REQUESTED_TRANSPORT, u32::from(extra) << 24);
                    }
                    b
                });
                let from = w.clients[who].addr;
                w.feed(from, &pkt);
            }
            // A Send indication to any peer.
            2 => {
                let peer = peer_addr(&mut r);
                let len = usize::from(r.u8());
                let payload = r.bytes(len).to_vec();
                let mut pkt = vec![0u8; 1700];
                let n = stun::write_data_indication(&mut pkt, &[3; 12], peer, &payload);
                pkt.truncate(n);
                pkt[1] = 0x16;
                let from = w.clients[who].addr;
                w.feed(from, &pkt);
            }
            // ChannelData on any channel.
            3 => {
                let ch = r.u16();
                let len = usize::from(r.u8());
                let mut pkt = ch.to_be_bytes().to_vec();
                pkt.extend((len as u16).to_be_bytes());
                pkt.extend(r.bytes(len));
                let from = w.clients[who].addr;
                w.feed(from, &pkt);
            }
            // Time passes (sweeps included).
            4 => {
                w.now += Duration::from_millis(u64::from(r.u16()) * 50);
                w.table.handle_timeout(w.now);
                while w.table.poll_transmit().is_some() {}
                while w.table.poll_event().is_some() {}
            }
            // A genuine client's signed request replayed from a stranger's address.
            _ => {
                let pkt = w.clients[who].signed(method::CREATE_PERMISSION, |b| {
                    b.xor_addr(
                        attr::XOR_PEER_ADDRESS,
                        SocketAddr::new(RELAY_IP, relayed_port(1)),
                    )
                });
                let from = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)), 6000);
                w.feed(from, &pkt);
            }
        }
    }
});
