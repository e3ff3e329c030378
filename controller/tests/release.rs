//! Release: a released session stops forwarding on the relay within a second, its clients are
//! told, and its tokens no longer bind.

mod common;

use std::time::{Duration, Instant};

use common::*;
use veil_client::{ClientError, LegStatus};
use veil_controller::dev::{Cluster, Options};
use veil_proto::v1 as pb;
use veil_relay_core::wire::ErrorCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_stops_forwarding_within_a_second() {
    let c = Cluster::start(Options {
        relays: 1,
        workers_per_relay: 2,
        ..Options::default()
    })
    .await
    .unwrap();
    let relay = c.relays[0].udp;
    let mut api = client(&c.controller_url).await;
    let s = allocate(&mut api, request("short-call", 2)).await;
    let alice = Peer::join(&s.legs[0], "127.0.0.2", 1).await;
    let bob = Peer::join(&s.legs[1], "127.0.0.3", 2).await;
    let mut peers = vec![alice, bob];
    exchange(&mut peers, 10, |_| relay).await;
    let mut bob = peers.pop().unwrap();
    let mut alice = peers.pop().unwrap();
    let mut bob_status = bob.leg.status();

    // Alice keeps talking, every 5 ms, while the signaling service releases the call.
    let talker = tokio::spawn(async move {
        for _ in 0..600 {
            alice.send(b"still talking").await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        alice
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let released_at = Instant::now();
    api.release_session(pb::ReleaseSessionRequest {
        session_id: s.session_id.clone(),
    })
    .await
    .unwrap();

    let mut last_rx = released_at;
    let mut before = 0;
    while let Ok(Some(got)) =
        tokio::time::timeout(Duration::from_millis(1500), bob.leg.recv()).await
    {
        last_rx = got.at;
        before += 1;
    }
    let stopped_after = last_rx.saturating_duration_since(released_at);
    assert!(before > 0, "media flowed until the release");
    assert!(
        stopped_after < Duration::from_secs(1),
        "forwarding stopped {stopped_after:?} after release"
    );

    // Bob's client was told the session is over.
    let status = ended(&mut bob_status, Duration::from_secs(1), "bob, released").await;
    assert_eq!(
        status,
        LegStatus::Ended(ClientError::Closed(ErrorCode::SessionClosed))
    );
    let alice = talker.await.unwrap();
    assert!(
        alice
            .leg
            .counters()
            .sent
            .load(std::sync::atomic::Ordering::Relaxed)
            > 100
    );

    // The token no longer binds, on any relay.
    let again = bind_udp(&s.legs[1].token, relay, "127.0.0.4:0").await;
    assert_eq!(
        again.unwrap_err(),
        ClientError::Refused(ErrorCode::SessionClosed)
    );
    c.shutdown().await.unwrap();
}
