//! Failover: a relay process killed mid-call leaves the call flowing again on the backup relay
//! within 2 s, and WatchSession tells the signaling service.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use veil_controller::config::Settings;
use veil_controller::dev::generate_keys;
use veil_proto::v1 as pb;

async fn killed_relay_fails_over(transports: &[pb::Transport]) {
    let keys = generate_keys();
    let kf = key_file(&keys);
    let controller = LocalController::start(Settings::local(keys)).await;
    let quic = ["--quic-addr", "127.0.0.1:0", "--quic-self-signed"];
    let relays = [
        RelayProcess::start(
            "relay-a",
            "zone-a",
            &kf,
            std::slice::from_ref(&controller.url),
            &quic,
        ),
        RelayProcess::start(
            "relay-b",
            "zone-b",
            &kf,
            std::slice::from_ref(&controller.url),
            &quic,
        ),
    ];
    controller.wait_relays(2).await;

    let mut api = client(&controller.url).await;
    let s = allocate(&mut api, request_with("failover", transports)).await;
    assert_eq!(s.relays.len(), 2);
    let primary = s.relays[0].node_id.clone();
    let backup = s.relays[1].node_id.clone();
    assert_ne!(primary, backup);
    let mut events = api
        .watch_session(pb::WatchSessionRequest {
            session_id: s.session_id.clone(),
            leg_events: false,
        })
        .await
        .unwrap()
        .into_inner();
    let first = events.message().await.unwrap().unwrap();
    assert_eq!(first.kind, pb::session_event::Kind::Snapshot as i32);

    let alice = Peer::join(&s.legs[0], "127.0.0.2", 1).await;
    let bob = Peer::join(&s.legs[1], "127.0.0.3", 2).await;
    let talk = Talk::start(vec![alice, bob], Duration::from_millis(10));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let victim = relays.iter().find(|r| r.node_id == primary).unwrap();
    victim.signal(Signal::SIGKILL);
    let killed_at = Instant::now();

    // The signaling service hears of it.
    let ev = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await
        .expect("an event")
        .unwrap()
        .unwrap();
    assert_eq!(ev.kind, pb::session_event::Kind::RelayDown as i32);
    assert_eq!(ev.node_id, primary);
    assert_eq!(ev.role, pb::RelayRole::Primary as i32);

    tokio::time::sleep(Duration::from_secs(4)).await;
    for (peer, got) in talk.stop().await {
        let gap = longest_gap(&got, killed_at);
        assert!(
            gap < Duration::from_secs(2),
            "media stopped for {gap:?} after the relay died"
        );
        let last = got.last().unwrap().0;
        assert!(
            last > killed_at + Duration::from_secs(3),
            "media flows again, on the backup"
        );
        assert_eq!(
            peer.leg.relay_index(),
            1,
            "the leg moved to the backup relay"
        );
        let c = peer.leg.counters();
        assert_eq!(
            c.binds.load(std::sync::atomic::Ordering::Relaxed),
            2,
            "one bind on each relay"
        );
        eprintln!(
            "{:?} leg: longest gap after the kill {gap:?}",
            peer.leg.transport()
        );
    }
    drop(relays);
    controller.stop().await;
    std::fs::remove_file(kf).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_relay_fails_over_to_the_backup_within_2s_udp() {
    killed_relay_fails_over(&[pb::Transport::Udp, pb::Transport::Udp]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_relay_fails_over_to_the_backup_within_2s_mixed() {
    killed_relay_fails_over(&[pb::Transport::Quic, pb::Transport::Udp]).await;
}
