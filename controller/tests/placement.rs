//! Placement across real relays: allocations spread evenly over equally loaded relays, and a
//! relay reporting high load gets almost none.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use veil_client::{Leg, LegConfig};
use veil_controller::dev::{Cluster, Options};
use veil_relay_core::{KeyId, Limits, SessionId, Ticket};

async fn primaries(c: &Cluster, prefix: &str, n: usize) -> HashMap<String, usize> {
    let mut api = client(&c.controller_url).await;
    let mut count = HashMap::new();
    for i in 0..n {
        let s = allocate(&mut api, request(&format!("{prefix}-{i}"), 2)).await;
        *count.entry(s.relays[0].node_id.clone()).or_insert(0) += 1;
        assert_ne!(s.relays[0].node_id, s.relays[1].node_id);
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_allocations_spread_evenly_over_four_relays() {
    let c = Cluster::start(Options {
        relays: 4,
        workers_per_relay: 1,
        quic: false,
        ..Options::default()
    })
    .await
    .unwrap();
    let count = primaries(&c, "even", 1000).await;
    eprintln!("primaries: {count:?}");
    assert_eq!(count.len(), 4);
    for (relay, n) in &count {
        assert!(
            (213..=287).contains(n),
            "{relay} got {n} of 1000: outside ±15% of 250"
        );
    }
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_reporting_high_load_gets_almost_none() {
    // relay-3 can hold 100 legs; the test fills 90 of them with real bound legs.
    let c = Cluster::start(Options {
        relays: 4,
        workers_per_relay: 1,
        quic: false,
        capacities: vec![100_000, 100_000, 100_000, 100],
        ..Options::default()
    })
    .await
    .unwrap();
    let busy = c.relays[3].udp;
    let mut legs = Vec::new();
    for i in 0..90u64 {
        let token = c.keys.mint(Ticket {
            key_id: KeyId(0),
            session: SessionId(0xB0_0000 + i / 2),
            leg: (i % 2) as u8,
            legs: 2,
            expires_unix_ms: veil_relay::unix_ms() + 600_000,
            limits: Limits::default(),
        });
        let ip = format!("127.0.1.{}", i + 1);
        let cfg = LegConfig::udp(
            token.to_bytes().to_vec(),
            vec![busy],
            format!("{ip}:0").parse().unwrap(),
        );
        legs.push(Leg::bind(cfg).await.unwrap());
    }
    // Wait for relay-3's load report to show them.
    let until = Instant::now() + Duration::from_secs(5);
    while c
        .controller
        .registry
        .view("relay-3")
        .unwrap()
        .load
        .bound_legs
        < 90
    {
        assert!(Instant::now() < until, "relay-3 reports its load");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let count = primaries(&c, "loaded", 200).await;
    eprintln!("primaries: {count:?}");
    let on_busy = count.get("relay-3").copied().unwrap_or(0);
    assert!(on_busy <= 2, "the loaded relay got {on_busy} of 200");
    for r in ["relay-0", "relay-1", "relay-2"] {
        assert!(count.get(r).copied().unwrap_or(0) > 40, "{r}: {count:?}");
    }
    drop(legs);
    c.shutdown().await.unwrap();
}
