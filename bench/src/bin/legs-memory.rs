//! `legs-memory`: resident memory per bound leg. Builds a relay's sans-IO core (a `Node` and one
//! worker's `ForwardingTable`), binds N legs (default 1,000,000: 500,000 two-party sessions) through
//! `ForwardingTable::handle_datagram` with the real two-round bind (BIND, CHALLENGE, BIND with the cookie),
//! from synthetic source addresses (no sockets: nothing is sent anywhere), and reads the
//! process's own resident set size (`VmRSS`) before and after.
//!
//! The per-source and per-worker bind limits are raised far above their defaults (50/s per
//! source IP, 20,000/s per worker) for this: the synthetic legs come from 16 addresses and bind
//! as fast as the CPU allows, which the defaults exist to refuse.

#![forbid(unsafe_code)]

use std::mem::size_of;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use veil_relay_core::session::{Endpoint, LegSet, Session};
use veil_relay_core::token::SessionId;
use veil_relay_core::{LegState, Limits};
use veil_testkit::Net;

#[derive(Parser, Debug)]
struct Args {
    /// Legs to bind (two per session).
    #[arg(long, default_value_t = 1_000_000)]
    legs: u64,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// The synthetic source address of leg `i`.
fn source(i: u64) -> SocketAddr {
    veil_testkit::synthetic_addr(i)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let legs = args.legs.max(2) / 2 * 2;
    let rss_before = veil_bench::cpu::self_rss_bytes()?;
    let net = Net::unlimited(legs as usize + 1);
    let (t0, node) = (net.t0, net.node.clone());
    let mut relay = net.worker();
    let started = Instant::now();
    // A controller's default limits.
    let limits = Limits {
        max_pps: 5_000,
        max_kbps: 50_000,
    };
    for s in 0..legs / 2 {
        for leg in 0..2u8 {
            let token = net.token_with(s + 1, leg, 2, limits, 3_600_000);
            let answer =
                veil_testkit::udp_bind(&mut relay, t0, source(s * 2 + u64::from(leg)), &token);
            if !veil_testkit::is_bind_ok(&answer) {
                anyhow::bail!("bind {} of session {s} failed", leg);
            }
            veil_testkit::forget_events(&mut relay);
        }
    }
    let bind_time = started.elapsed();
    // One sweep, as a running relay does every 250 ms: forgets the bind limiter's idle sources.
    relay.handle_timeout(t0 + Duration::from_secs(5));
    let rss_after = veil_bench::cpu::self_rss_bytes()?;
    assert_eq!(relay.local_legs() as u64, legs);
    assert_eq!(node.directory.legs() as u64, legs);
    let per_leg = (rss_after - rss_before) as f64 / legs as f64;

    // Where the bytes go, by the sizes of the structures (hashbrown: a power-of-two bucket count
    // at most 7/8 full, one control byte per bucket).
    let buckets = |n: u64| (n * 8).div_ceil(7).next_power_of_two();
    let peer_entry = size_of::<(SocketAddr, LegState)>() as u64;
    let by_peer = buckets(legs) * (peer_entry + 1);
    let sessions = legs / 2;
    let dir_entry = size_of::<(SessionId, Arc<Session>)>() as u64;
    let directory = buckets(sessions) * (dir_entry + 1);
    // Each session: an Arc<Session>, an Arc<LegSet> and the LegSet's boxed slice of slots,
    // exactly as long as the legs bound (each slot: the leg, its endpoint, its reachability).
    let session_heap = 16 + size_of::<Session>() as u64;
    let legset_heap = 16 + size_of::<LegSet>() as u64;
    let slots_heap = 2 * size_of::<(u8, Endpoint, bool)>() as u64;
    let per_session = session_heap + legset_heap + slots_heap;
    let estimate = by_peer + directory + sessions * per_session;

    println!(
        "{legs} legs ({sessions} two-party sessions) bound through ForwardingTable::handle_datagram in {:.1} s ({:.1} us per leg, two rounds)",
        bind_time.as_secs_f64(),
        bind_time.as_secs_f64() * 1e6 / legs as f64
    );
    println!(
        "bind limits raised for this measurement: binds_per_ip and binds_per_worker = 1e9/s (defaults 50 and 20000)"
    );
    println!(
        "VmRSS before {:.1} MiB, after {:.1} MiB: {:.0} bytes per leg (target <= 512: {})",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
        per_leg,
        if per_leg <= 512.0 { "met" } else { "MISSED" }
    );
    println!("where the bytes go (structure sizes, before allocator overhead):");
    println!(
        "  size_of: SocketAddr {}, Endpoint {}, LegState {}, (SocketAddr, LegState) {}, Session {}, LegSet {}, (u8, Endpoint) {}",
        size_of::<SocketAddr>(),
        size_of::<Endpoint>(),
        size_of::<LegState>(),
        peer_entry,
        size_of::<Session>(),
        size_of::<LegSet>(),
        size_of::<(u8, Endpoint)>()
    );
    println!(
        "  ForwardingTable::by_peer   {:>9} buckets x {} B = {:>6.1} MiB  {:>5.0} B/leg",
        buckets(legs),
        peer_entry + 1,
        by_peer as f64 / 1048576.0,
        by_peer as f64 / legs as f64
    );
    println!(
        "  Directory map    {:>9} buckets x {} B = {:>6.1} MiB  {:>5.0} B/leg",
        buckets(sessions),
        dir_entry + 1,
        directory as f64 / 1048576.0,
        directory as f64 / legs as f64
    );
    println!(
        "  per session: Arc<Session> {session_heap} + Arc<LegSet> {legset_heap} + slots {slots_heap} = {per_session} B  {:>5.0} B/leg",
        per_session as f64 / 2.0
    );
    println!(
        "  estimate {:.1} MiB, {:.0} B/leg; the rest of the measured figure is allocator overhead (malloc headers, rounding, freed LegSet copies kept for reuse)",
        estimate as f64 / 1048576.0,
        estimate as f64 / legs as f64
    );
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "legs": legs,
            "rss_before": rss_before,
            "rss_after": rss_after,
            "bytes_per_leg": per_leg,
            "estimate_bytes_per_leg": estimate as f64 / legs as f64,
            "by_peer_bytes_per_leg": by_peer as f64 / legs as f64,
            "bind_us_per_leg": bind_time.as_secs_f64() * 1e6 / legs as f64,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    Ok(())
}
