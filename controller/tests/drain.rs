//! Draining, by an operator's DrainRelay and by SIGTERM: no new sessions go to the relay, its
//! calls keep flowing (losing nothing) until the deadline, and then move to the backup relay.

mod common;

use std::time::{Duration, Instant};

use common::*;
use veil_controller::config::Settings;
use veil_controller::dev::{Cluster, Options, generate_keys};
use veil_proto::v1 as pb;
use veil_proto::v1::admin_service_client::AdminServiceClient;

/// Receive sequence numbers within `[from, to)` are consecutive for every sender: no loss.
fn no_loss_between(got: &[(Instant, u16)], from: Instant, to: Instant) -> usize {
    let window: Vec<u16> = got
        .iter()
        .filter(|(at, _)| *at >= from && *at < to)
        .map(|(_, s)| *s)
        .collect();
    for w in window.windows(2) {
        assert_eq!(
            w[1],
            w[0].wrapping_add(1),
            "a packet was lost while draining"
        );
    }
    window.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_relay_takes_no_new_sessions_and_moves_calls_at_the_deadline() {
    let c = Cluster::start(Options {
        relays: 2,
        workers_per_relay: 1,
        ..Options::default()
    })
    .await
    .unwrap();
    let mut api = client(&c.controller_url).await;
    let mut admin = AdminServiceClient::connect(c.controller_url.clone())
        .await
        .unwrap();
    let s = allocate(&mut api, request("before-drain", 2)).await;
    let (primary, backup) = (s.relays[0].node_id.clone(), s.relays[1].node_id.clone());
    let mut events = api
        .watch_session(pb::WatchSessionRequest {
            session_id: s.session_id.clone(),
            leg_events: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        events.message().await.unwrap().unwrap().kind,
        pb::session_event::Kind::Snapshot as i32
    );
    let alice = Peer::join(&s.legs[0], "127.0.0.2", 1).await;
    let bob = Peer::join(&s.legs[1], "127.0.0.3", 2).await;
    let talk = Talk::start(vec![alice, bob], Duration::from_millis(10));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let drained_at = Instant::now();
    let r = admin
        .drain_relay(pb::DrainRelayRequest {
            node_id: primary.clone(),
            draining: true,
            deadline_seconds: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.relay.unwrap().draining);
    let ev = tokio::time::timeout(Duration::from_secs(2), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (ev.kind, ev.node_id.as_str()),
        (
            pb::session_event::Kind::RelayDraining as i32,
            primary.as_str()
        )
    );

    // No new session goes to the draining relay, as primary or backup.
    for i in 0..20 {
        let n = api
            .allocate_session(request(&format!("during-drain-{i}"), 2))
            .await
            .unwrap()
            .into_inner();
        let relays: Vec<_> = n
            .session
            .unwrap()
            .relays
            .iter()
            .map(|r| r.node_id.clone())
            .collect();
        assert_eq!(
            relays,
            vec![backup.clone()],
            "only the other relay serves new calls"
        );
    }
    let list = admin
        .list_relays(pb::ListRelaysRequest {})
        .await
        .unwrap()
        .into_inner();
    let p = list
        .relays
        .iter()
        .find(|r| r.hello.as_ref().unwrap().node_id == primary)
        .unwrap();
    assert!(p.draining && p.up);

    tokio::time::sleep(Duration::from_secs(4)).await;
    let deadline = drained_at + Duration::from_secs(2);
    for (peer, got) in talk.stop().await {
        // Until the deadline the call stays where it was, losing nothing.
        let before = no_loss_between(&got, drained_at, deadline - Duration::from_millis(100));
        assert!(
            before > 150,
            "media flowed during the drain ({before} packets)"
        );
        // Then the clients are told to move, and do, at once.
        assert_eq!(peer.leg.relay_index(), 1, "moved to the backup relay");
        let gap = longest_gap(&got, deadline - Duration::from_millis(500));
        assert!(gap < Duration::from_millis(500), "moving took {gap:?}");
        assert!(
            got.last().unwrap().0 > deadline + Duration::from_millis(1500),
            "media flows on the backup"
        );
    }

    // Back in service: new calls may land there again.
    admin
        .drain_relay(pb::DrainRelayRequest {
            node_id: primary.clone(),
            draining: false,
            deadline_seconds: 0,
        })
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(2), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.kind, pb::session_event::Kind::RelayUndrained as i32);
    let mut on_primary = 0;
    for i in 0..20 {
        let n = api
            .allocate_session(request(&format!("after-drain-{i}"), 2))
            .await
            .unwrap()
            .into_inner();
        on_primary += usize::from(
            n.session
                .unwrap()
                .relays
                .iter()
                .any(|r| r.node_id == primary),
        );
    }
    assert!(on_primary > 0);
    let e = admin
        .drain_relay(pb::DrainRelayRequest {
            node_id: "nope".into(),
            draining: true,
            deadline_seconds: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_relay_without_loss_and_it_exits_0() {
    let keys = generate_keys();
    let kf = key_file(&keys);
    let controller = LocalController::start(Settings::local(keys)).await;
    let url = std::slice::from_ref(&controller.url);
    let mut a = RelayProcess::start(
        "relay-a",
        "zone-a",
        &kf,
        url,
        &["--drain-deadline-secs", "2"],
    );
    let b = RelayProcess::start(
        "relay-b",
        "zone-b",
        &kf,
        url,
        &["--drain-deadline-secs", "2"],
    );
    controller.wait_relays(2).await;
    let mut api = client(&controller.url).await;
    // A call whose primary is relay-a, the relay about to be stopped.
    let s = loop {
        let s = allocate(
            &mut api,
            request(&format!("term-{}", rand::random::<u32>()), 2),
        )
        .await;
        if s.relays[0].node_id == "relay-a" {
            break s;
        }
    };
    let alice = Peer::join(&s.legs[0], "127.0.0.2", 1).await;
    let bob = Peer::join(&s.legs[1], "127.0.0.3", 2).await;
    let talk = Talk::start(vec![alice, bob], Duration::from_millis(10));
    tokio::time::sleep(Duration::from_millis(300)).await;

    a.signal(nix::sys::signal::Signal::SIGTERM);
    let term_at = Instant::now();
    // The controller learns of the drain from the relay's own reports.
    let until = Instant::now() + Duration::from_secs(2);
    while !controller.state.registry.view("relay-a").unwrap().draining {
        assert!(Instant::now() < until, "relay-a reports draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n = allocate(&mut api, request("after-term", 2)).await;
    assert!(
        n.relays.iter().all(|r| r.node_id != "relay-a"),
        "a draining relay gets no new session"
    );

    let status = tokio::task::spawn_blocking(move || {
        let st = a.wait(Duration::from_secs(10));
        (st, a)
    })
    .await
    .unwrap();
    let (status, a) = status;
    let exited_after = term_at.elapsed();
    let status = status.expect("the relay exits after its drain");
    assert!(status.success(), "exit status {status:?}: {}", a.log());
    assert!(
        exited_after >= Duration::from_secs(2),
        "it waited for its deadline ({exited_after:?})"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let deadline = term_at + Duration::from_secs(2);
    for (peer, got) in talk.stop().await {
        let before = no_loss_between(&got, term_at, deadline - Duration::from_millis(100));
        assert!(
            before > 150,
            "media flowed during the drain ({before} packets)"
        );
        assert_eq!(peer.leg.relay_index(), 1, "moved to the backup relay");
        assert!(
            got.last().unwrap().0 > term_at + exited_after,
            "media flows on the backup after relay-a exits"
        );
    }
    drop(b);
    controller.stop().await;
    std::fs::remove_file(kf).ok();
}
