//! Micro-benchmarks of the sans-IO packet path: classification, the per-packet leg lookup at
//! 10k / 100k / 1M bound legs, fan-out to 2, 4 and 16 legs, token verification and the whole
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
    targets = classify, lookup, fanout, tokens
}
criterion_main!(benches);
