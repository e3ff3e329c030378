//! Micro-benchmarks of the sans-IO packet path: classification, the per-packet leg lookup at
//! 10k / 100k / 1M bound legs, fan-out to 2, 4 and 16 legs, TURN relaying between two
//! allocations side by side with a native two-leg forward, token verification and the whole
//! two-round bind.
//!
//! ```sh
//! cargo bench -p veil-relay-core --bench packet_path            # everything
//! cargo bench -p veil-relay-core --bench packet_path -- fanout  # one group
//! ```
//!
//! Everything runs in virtual time (one real clock reading as the origin), as the core's tests
//! do. Tokens carry rate limits too high ever to bite, so the limiter runs on every packet as it
//! does for a controller's tokens, without dropping anything.

// One real clock reading, as the arbitrary origin of virtual time.
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::{Rng, SeedableRng, rngs::StdRng};
use veil_relay_core::token::Token;
use veil_relay_core::wire;
use veil_relay_core::{ForwardingTable, KeyRing, Node, Verdict};
use veil_testkit::Net;
use veil_testkit::stun::Credentials;

/// A node and one worker, bind limits raised (the benchmarks bind from few addresses, fast).
struct Harness {
    t0: Instant,
    keys: KeyRing,
    node: Arc<Node>,
    net: Net,
    relay: ForwardingTable,
}

impl Harness {
    fn new(max_legs: usize) -> Self {
        let net = Net::unlimited(max_legs);
        let relay = net.worker();
        Self {
            t0: net.t0,
            keys: net.keys.clone(),
            node: net.node.clone(),
            net,
            relay,
        }
    }

    fn token(&self, session: u64, leg: u8, legs: u8) -> Token {
        self.net
            .token_with(session, leg, legs, veil_testkit::NO_LIMITS, 3_600_000)
    }

    /// The two-round bind; panics if it does not end in BIND_OK.
    fn bind(&mut self, from: SocketAddr, token: &Token) {
        let answer = veil_testkit::udp_bind(&mut self.relay, self.t0, from, token);
        assert!(veil_testkit::is_bind_ok(&answer));
        veil_testkit::forget_events(&mut self.relay);
    }
}

/// Synthetic client address `i` (never used on a network).
fn addr(i: u64) -> SocketAddr {
    veil_testkit::synthetic_addr(i)
}

fn rtp(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x80;
    p[1] = 96;
    p
}

/// Runs one datagram through the worker and sends nowhere: counts the targets.
#[inline]
fn forward(relay: &mut ForwardingTable, now: Instant, from: SocketAddr, pkt: &[u8]) -> usize {
    match relay.handle_datagram(now, from, pkt) {
        Verdict::Forward(t) => {
            let mut n = 0;
            for ep in t.iter() {
                black_box(ep);
                n += 1;
            }
            n
        }
        _ => 0,
    }
}

fn classify(c: &mut Criterion) {
    let mut g = c.benchmark_group("classify");
    g.throughput(Throughput::Elements(1));
    let h = Harness::new(10);
    let bind = wire::bind(&h.token(1, 0, 2), [1; 8], None);
    let mut dtls = vec![22u8; 100];
    dtls[1] = 0xfe;
    let cases: [(&str, Vec<u8>); 4] = [
        ("rtp", rtp(200)),
        ("dtls", dtls),
        ("control", bind.to_vec()),
        ("stun", vec![0u8; 100]),
    ];
    for (name, pkt) in &cases {
        g.bench_with_input(BenchmarkId::from_parameter(name), pkt, |b, pkt| {
            b.iter(|| wire::classify(black_box(pkt)))
        });
    }
    g.bench_function("parse_bind", |b| {
        b.iter(|| wire::parse_client(black_box(&bind)).is_ok())
    });
    g.finish();
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    g.throughput(Throughput::Elements(1));
    g.sample_size(50);
    let pkt = rtp(200);
    for n in [10_000u64, 100_000, 1_000_000] {
        // n legs: n/2 two-party sessions, every leg bound through the real two-round bind.
        let mut h = Harness::new(n as usize + 1);
        for s in 0..n / 2 {
            for leg in 0..2u8 {
                let token = h.token(s + 1, leg, 2);
                h.bind(addr(s * 2 + u64::from(leg)), &token);
            }
        }
        assert_eq!(h.node.directory.legs() as u64, n);
        // Sources in random order, so that the table's memory is touched as live traffic
        // from many calls would touch it (at 1M legs it does not fit in the caches).
        let mut rng = StdRng::seed_from_u64(n);
        let sources: Vec<SocketAddr> = (0..65_536).map(|_| addr(rng.random_range(0..n))).collect();
        let now = h.t0 + Duration::from_millis(1);
        g.bench_function(BenchmarkId::new("hit", n), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 0xFFFF;
                forward(&mut h.relay, now, sources[i], &pkt)
            })
        });
        if n == 1_000_000 {
            // Media from an address that holds no leg: one lookup, then a counted drop.
            let strangers: Vec<SocketAddr> = (0..65_536).map(|i| addr(n + i)).collect();
            g.bench_function(BenchmarkId::new("miss", n), |b| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) & 0xFFFF;
                    forward(&mut h.relay, now, strangers[i], &pkt)
                })
            });
        }
    }
    g.finish();
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    let pkt = rtp(1200);
    for legs in [2u8, 4, 16] {
        let mut h = Harness::new(100);
        for leg in 0..legs {
            let token = h.token(1, leg, legs);
            h.bind(addr(u64::from(leg)), &token);
        }
        let now = h.t0 + Duration::from_millis(1);
        let from = addr(0);
        assert_eq!(
            forward(&mut h.relay, now, from, &pkt),
            usize::from(legs) - 1
        );
        // Bytes forwarded: one copy of the datagram per other leg.
        g.throughput(Throughput::Bytes(pkt.len() as u64 * u64::from(legs - 1)));
        g.bench_function(BenchmarkId::new("legs", legs), |b| {
            b.iter(|| forward(&mut h.relay, now, from, black_box(&pkt)))
        });
    }
    g.finish();
}

/// A TURN allocation of leg `leg` of session 1 from `from`, as WebRTC clients make it (the
/// unsigned Allocate, the 401, the signed one); returns its credentials and the nonce.
fn turn_allocate(
    t: &mut ForwardingTable,
    now: Instant,
    from: SocketAddr,
    token: &Token,
) -> (Credentials, Vec<u8>) {
    use veil_relay_core::stun::{self, Builder, Kind, attr, method};
    let creds = Credentials::of(token);
    let first = Builder::new(method::ALLOCATE, Kind::Request, &[1; 12])
        .u32(attr::REQUESTED_TRANSPORT, 17 << 24);
    t.handle_datagram(now, from, first.as_bytes());
    let challenge = t.poll_transmit().expect("a 401");
    let nonce = stun::parse(challenge.msg.as_bytes())
        .unwrap()
        .nonce
        .unwrap()
        .to_vec();
    let req = creds.sign(
        Builder::new(method::ALLOCATE, Kind::Request, &[2; 12])
            .u32(attr::REQUESTED_TRANSPORT, 17 << 24),
        &nonce,
    );
    t.handle_datagram(now, from, &req);
    let ok = t.poll_transmit().expect("an answer");
    assert_eq!(stun::parse(ok.msg.as_bytes()).unwrap().kind, Kind::Success);
    veil_testkit::forget_events(t);
    (creds, nonce)
}

/// TURN relaying (ChannelData in, ChannelData out on the receiver's channel; and a Send
/// indication in, a Data indication out) next to the native forward of a two-leg call, same
/// payload: what being a TURN server costs the packet path. The relayed datagram is built as
/// the shell builds it.
fn turn(c: &mut Criterion) {
    use veil_relay_core::Config;
    use veil_relay_core::stun::{self, Builder, Kind, attr, method};
    use veil_relay_core::turn::relayed_port;
    let mut g = c.benchmark_group("turn");
    g.throughput(Throughput::Elements(1));
    let ip = std::net::IpAddr::from([203, 0, 113, 1]);
    let net = Net::with_config(
        Config {
            turn_ip: Some(ip),
            binds_per_ip: 1_000_000_000,
            binds_per_worker: 1_000_000_000,
            ..Config::default()
        },
        100,
    );
    let mut t = net.worker();
    let now = net.t0 + Duration::from_millis(1);
    let (a, b) = (addr(1), addr(2));
    let tokens = [
        net.token_with(1, 0, 2, veil_testkit::NO_LIMITS, 3_600_000),
        net.token_with(1, 1, 2, veil_testkit::NO_LIMITS, 3_600_000),
    ];
    let peer = |leg: u8| SocketAddr::new(ip, relayed_port(leg));
    let creds: Vec<_> = [(a, &tokens[0]), (b, &tokens[1])]
        .into_iter()
        .map(|(from, token)| turn_allocate(&mut t, net.t0, from, token))
        .collect();
    for (i, (from, other)) in [(a, 1u8), (b, 0u8)].into_iter().enumerate() {
        let (c, nonce) = &creds[i];
        let bind = c.sign(
            Builder::new(method::CHANNEL_BIND, Kind::Request, &[20 + i as u8; 12])
                .u32(attr::CHANNEL_NUMBER, 0x4000 << 16)
                .xor_addr(attr::XOR_PEER_ADDRESS, peer(other)),
            nonce,
        );
        t.handle_datagram(net.t0, from, &bind);
        let ok = t.poll_transmit().expect("an answer");
        assert_eq!(stun::parse(ok.msg.as_bytes()).unwrap().kind, Kind::Success);
    }
    let payload = rtp(200);
    let mut cd = vec![0x40, 0x00, 0, 200];
    cd.extend_from_slice(&payload);
    let mut send = vec![0u8; 1600];
    let n = stun::write_data_indication(&mut send, &[3; 12], peer(1), &payload);
    send.truncate(n);
    send[1] = 0x16;
    let mut out = [0u8; 1700];
    // Virtual time moves a microsecond a packet (1M packets/s), so that the rate limiter
    // refills as it does under real load, in all three cases.
    let mut tick = 0u64;
    let mut relay = move |t: &mut ForwardingTable, pkt: &[u8]| {
        tick += 1;
        match t.handle_datagram(now + Duration::from_micros(tick), a, pkt) {
            Verdict::Relay(r) => r.datagram(pkt, &mut out, &[0; 12]),
            v => panic!("not relayed: {v:?}"),
        }
    };
    g.bench_function("channel_data_200", |bch| {
        bch.iter(|| relay(&mut t, black_box(&cd)))
    });
    // Without B's channel, A's data reaches B as a Data indication.
    g.bench_function("send_indication_200", |bch| {
        let mut t2 = net.worker();
        let (c2, d2) = (addr(3), addr(4));
        let tk = [
            net.token_with(2, 0, 2, veil_testkit::NO_LIMITS, 3_600_000),
            net.token_with(2, 1, 2, veil_testkit::NO_LIMITS, 3_600_000),
        ];
        let creds: Vec<_> = [(c2, &tk[0]), (d2, &tk[1])]
            .into_iter()
            .map(|(from, token)| turn_allocate(&mut t2, net.t0, from, token))
            .collect();
        for (i, (from, other)) in [(c2, 1u8), (d2, 0u8)].into_iter().enumerate() {
            let (c, nonce) = &creds[i];
            let perm = c.sign(
                Builder::new(
                    method::CREATE_PERMISSION,
                    Kind::Request,
                    &[40 + i as u8; 12],
                )
                .xor_addr(attr::XOR_PEER_ADDRESS, peer(other)),
                nonce,
            );
            t2.handle_datagram(net.t0, from, &perm);
            let ok = t2.poll_transmit().expect("an answer");
            assert_eq!(stun::parse(ok.msg.as_bytes()).unwrap().kind, Kind::Success);
        }
        let mut out = [0u8; 1700];
        let mut tick = 0u64;
        bch.iter(|| {
            tick += 1;
            match t2.handle_datagram(now + Duration::from_micros(tick), c2, black_box(&send)) {
                Verdict::Relay(r) => r.datagram(&send, &mut out, &[0; 12]),
                v => panic!("not relayed: {v:?}"),
            }
        })
    });
    // The native two-leg call, for comparison.
    let mut h = Harness::new(10);
    for leg in 0..2 {
        let token = h.token(1, leg, 2);
        h.bind(addr(10 + u64::from(leg)), &token);
    }
    let hnow = h.t0 + Duration::from_millis(1);
    g.bench_function("native_forward_200", |bch| {
        let mut tick = 0u64;
        bch.iter(|| {
            tick += 1;
            forward(
                &mut h.relay,
                hnow + Duration::from_micros(tick),
                addr(10),
                black_box(&payload),
            )
        })
    });
    g.finish();
}

fn tokens(c: &mut Criterion) {
    let mut g = c.benchmark_group("token");
    g.throughput(Throughput::Elements(1));
    let mut h = Harness::new(10);
    let token = h.token(1, 0, 2);
    let bind = wire::bind(&token, [1; 8], None);
    let keys = h.keys.clone();
    g.bench_function("verify_bind", |b| {
        b.iter(|| {
            let Ok(wire::ClientMessage::Bind(m)) = wire::parse_client(black_box(&bind)) else {
                unreachable!("a BIND");
            };
            keys.verify(m.ticket, m.signed, m.tag).is_ok()
        })
    });
    // The whole exchange, BIND → CHALLENGE → BIND with cookie → BIND_OK, rebinding one leg from
    // one address: two tag verifications, a cookie minted and checked, the directory updated.
    let from = addr(0);
    g.bench_function("bind_two_rounds", |b| b.iter(|| h.bind(from, &token)));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = classify, lookup, fanout, turn, tokens
}
criterion_main!(benches);
