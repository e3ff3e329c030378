//! `core-profile`: a fixed, deterministic workload for the sans-IO packet path, to run under a
//! profiler that counts instructions (`valgrind --tool=callgrind`): binds legs through the real
//! two-round bind, then forwards datagrams from random bound legs through
//! `ForwardingTable::handle_datagram`, iterating the targets as the UDP shell does. No sockets, no clock
//! reads in the loop: what it costs is the core's own work per packet.
//!
//! ```sh
//! # the forwarding loop only (per datagram), then the binds only (per leg)
//! valgrind --tool=callgrind --toggle-collect='*forward_all*' --callgrind-out-file=fwd.cg \
//!     target/release/core-profile
//! valgrind --tool=callgrind --toggle-collect='*bind_all*' --callgrind-out-file=bind.cg \
//!     target/release/core-profile --packets 0
//! callgrind_annotate --inclusive=yes fwd.cg | head -40
//! ```
//!
//! Under valgrind, `sha2` falls back to its portable code (valgrind's CPU model has no SHA
//! extensions), so instruction counts of HMAC are several times what the native SHA-NI path
//! executes.

#![forbid(unsafe_code)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use rand::{Rng, SeedableRng, rngs::StdRng};
use veil_relay_core::{ForwardingTable, Limits, Verdict};
use veil_testkit::Net;

#[derive(Parser, Debug)]
struct Args {
    /// Legs to bind (two-party sessions).
    #[arg(long, default_value_t = 10_000)]
    legs: u64,
    /// Datagrams to forward.
    #[arg(long, default_value_t = 1_000_000)]
    packets: u64,
    /// Datagram size, bytes.
    #[arg(long, default_value_t = 200)]
    size: usize,
}

fn addr(i: u64) -> SocketAddr {
    veil_testkit::synthetic_addr(i)
}

/// Binds `legs` legs (two per session) with the two-round bind.
#[inline(never)]
fn bind_all(net: &Net, relay: &mut ForwardingTable, legs: u64) -> anyhow::Result<()> {
    // A controller's default limits: the limiter runs on every packet.
    let limits = Limits {
        max_pps: 5_000,
        max_kbps: 50_000,
    };
    for s in 0..legs / 2 {
        for leg in 0..2u8 {
            let token = net.token_with(s + 1, leg, 2, limits, 3_600_000);
            let from = addr(s * 2 + u64::from(leg));
            let answer = veil_testkit::udp_bind(relay, net.t0, from, &token);
            anyhow::ensure!(
                veil_testkit::is_bind_ok(&answer),
                "bind {leg} of session {s}"
            );
            veil_testkit::forget_events(relay);
        }
    }
    Ok(())
}

/// Forwards `packets` datagrams from `sources` in turn; returns how many copies were sent.
#[inline(never)]
fn forward_all(
    relay: &mut ForwardingTable,
    t0: Instant,
    sources: &[SocketAddr],
    pkt: &[u8],
    packets: u64,
) -> u64 {
    let mut forwarded = 0u64;
    for i in 0..packets {
        // Virtual time advancing 1 µs per packet: the limiters refill as in a real call.
        let now = t0 + Duration::from_micros(i);
        let from = sources[i as usize % sources.len()];
        if let Verdict::Forward(t) = relay.handle_datagram(now, from, pkt) {
            for ep in t.iter() {
                black_box(ep);
                forwarded += 1;
            }
        }
    }
    forwarded
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let legs = args.legs.max(2) / 2 * 2;
    let net = Net::unlimited(legs as usize + 1);
    let t0 = net.t0;
    let mut relay = net.worker();
    bind_all(&net, &mut relay, legs)?;
    let mut pkt = vec![0u8; args.size];
    pkt[0] = 0x80;
    pkt[1] = 96;
    let mut rng = StdRng::seed_from_u64(1);
    let sources: Vec<SocketAddr> = (0..65_536)
        .map(|_| addr(rng.random_range(0..legs)))
        .collect();
    let started = Instant::now();
    let forwarded = forward_all(&mut relay, t0, &sources, &pkt, args.packets);
    let took = started.elapsed();
    println!(
        "{legs} legs, {} datagrams, {forwarded} forwarded, {:.1} ns per datagram ({} rate-limited)",
        args.packets,
        took.as_nanos() as f64 / args.packets.max(1) as f64,
        relay
            .stats()
            .drops_for(veil_relay_core::DropReason::RateLimited)
    );
    Ok(())
}
