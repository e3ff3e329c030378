//! Leg events and per-leg counters, as a signaling service reads them (issue "Calls as apps run
//! them", item 3): `WatchSession` with `leg_events` reports each leg bound (relay node id and
//! transport), moved to the backup when its relay is SIGKILLed, unbound and why (removed, the
//! relay down, idle), and removed; `GetSession` returns what each leg carried, counted by the
//! relays, exactly. Real relay processes, a real tonic server, real SRTP; never an address in
//! any of it.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use veil_controller::config::Settings;
use veil_controller::dev::generate_keys;
use veil_proto::v1 as pb;

use pb::session_event::Kind;

type Events = tonic::Streaming<pb::SessionEvent>;

/// The next leg event (skipping relay and participant events), within `wait`.
async fn next_leg_event(
    events: &mut Events,
    seen: &mut Vec<String>,
    wait: Duration,
) -> pb::SessionEvent {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let ev = tokio::time::timeout_at(deadline, events.message())
            .await
            .expect("a leg event in time")
            .unwrap()
            .expect("stream open");
        seen.push(format!("{ev:?}"));
        if matches!(
            Kind::try_from(ev.kind),
            Ok(Kind::LegBound | Kind::LegMoved | Kind::LegUnbound | Kind::LegRemoved)
        ) {
            return ev;
        }
    }
}

fn leg_of(ev: &pb::SessionEvent) -> &pb::LegEvent {
    ev.leg.as_ref().expect("a leg event names its leg")
}

/// GetSession's activity of each leg, once `done` holds of them (the relays report every
/// 250 ms here), within 5 s.
async fn activity_when(
    api: &mut Api,
    session_id: &str,
    seen: &mut Vec<String>,
    done: impl Fn(&[pb::LegActivity]) -> bool,
) -> Vec<pb::LegActivity> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = api
            .get_session(pb::GetSessionRequest {
                session_id: session_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        seen.push(format!("{s:?}"));
        let a: Vec<pb::LegActivity> = s
            .legs
            .iter()
            .map(|l| {
                l.activity
                    .clone()
                    .expect("GetSession says what each leg does")
            })
            .collect();
        if done(&a) {
            return a;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "activity never settled: {a:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn stats(a: &pb::LegActivity) -> pb::LegStats {
    a.stats.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leg_events_and_counters_tell_the_signaling_service_what_each_leg_does_never_where() {
    let keys = generate_keys();
    let kf = key_file(&keys);
    let controller = LocalController::start(Settings::local(keys)).await;
    let extra = [
        "--quic-addr",
        "127.0.0.1:0",
        "--quic-self-signed",
        "--leg-idle-secs",
        "3",
        "--leg-counters",
    ];
    let relays = [
        RelayProcess::start(
            "relay-a",
            "zone-a",
            &kf,
            std::slice::from_ref(&controller.url),
            &extra,
        ),
        RelayProcess::start(
            "relay-b",
            "zone-b",
            &kf,
            std::slice::from_ref(&controller.url),
            &extra,
        ),
    ];
    controller.wait_relays(2).await;
    let mut api = client(&controller.url).await;
    let s = allocate(
        &mut api,
        request_with(
            "leg-events",
            &[pb::Transport::Udp, pb::Transport::Quic, pb::Transport::Udp],
        ),
    )
    .await;
    let (primary, backup) = (s.relays[0].node_id.clone(), s.relays[1].node_id.clone());
    let mut seen: Vec<String> = Vec::new();

    // A watcher that asked for no leg events gets none; one that asked gets them.
    let mut plain = api
        .watch_session(pb::WatchSessionRequest {
            session_id: s.session_id.clone(),
            leg_events: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = api
        .watch_session(pb::WatchSessionRequest {
            session_id: s.session_id.clone(),
            leg_events: true,
        })
        .await
        .unwrap()
        .into_inner();
    let first = events.message().await.unwrap().unwrap();
    assert_eq!(first.kind, Kind::Snapshot as i32);
    let snap_legs = &first.session.as_ref().unwrap().legs;
    assert!(
        snap_legs.iter().all(|l| l
            .activity
            .as_ref()
            .is_some_and(|a| !a.bound && a.node_id.is_empty())),
        "nobody bound yet: {snap_legs:?}"
    );
    assert_eq!(
        plain.message().await.unwrap().unwrap().kind,
        Kind::Snapshot as i32
    );

    // Each participant's bind is told: its leg, participant, relay, role and transport.
    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let mut peers = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        peers.push(Peer::join(&s.legs[i], ip, 100 + i as u32).await);
        let ev = next_leg_event(&mut events, &mut seen, Duration::from_secs(5)).await;
        assert_eq!(ev.kind, Kind::LegBound as i32, "{ev:?}");
        let l = leg_of(&ev);
        assert_eq!(l.leg_index, i as u32);
        assert_eq!(l.participant_id, s.legs[i].participant_id);
        assert_eq!(l.node_id, primary);
        assert_eq!(l.role, pb::RelayRole::Primary as i32);
        let want = if i == 1 {
            pb::LegTransport::Quic
        } else {
            pb::LegTransport::Udp
        };
        assert_eq!(l.transport, want as i32);
    }

    // Every packet is counted once on the leg that sent it and once on each leg it reached.
    let count: u16 = 200;
    let sources: Vec<std::net::SocketAddr> = peers
        .iter()
        .zip(&s.legs)
        .map(|(p, leg)| match p.leg.transport() {
            veil_client::Transport::Udp => leg.relays[0].udp_address.parse().unwrap(),
            veil_client::Transport::Quic => leg.relays[0].quic_address.parse().unwrap(),
        })
        .collect();
    exchange(&mut peers, count, |i| sources[i]).await;
    let a = activity_when(&mut api, &s.session_id, &mut seen, |a| {
        a.iter().all(|a| stats(a).packets_in == u64::from(count))
            && a.iter()
                .all(|a| stats(a).packets_out == 2 * u64::from(count))
    })
    .await;
    let total_in: u64 = a.iter().map(|a| stats(a).bytes_in).sum();
    for (i, ai) in a.iter().enumerate() {
        let st = stats(ai);
        assert!(ai.bound, "leg {i} bound");
        assert_eq!(ai.node_id, primary);
        assert_eq!(st.packets_dropped, 0, "leg {i}: nothing dropped");
        assert_eq!(
            st.bytes_out,
            total_in - st.bytes_in,
            "leg {i} received every byte the others sent"
        );
    }
    assert_eq!(a[1].transport, pb::LegTransport::Quic as i32);

    // A removed participant: LEG_REMOVED, and its relay tells why it unbound.
    let carol = peers.pop().unwrap();
    api.remove_participant(pb::RemoveParticipantRequest {
        session_id: s.session_id.clone(),
        participant_id: s.legs[2].participant_id.clone(),
    })
    .await
    .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(next_leg_event(&mut events, &mut seen, Duration::from_secs(3)).await);
    }
    got.sort_by_key(|e| e.kind);
    assert_eq!(got[0].kind, Kind::LegUnbound as i32);
    assert_eq!(leg_of(&got[0]).leg_index, 2);
    assert_eq!(leg_of(&got[0]).reason, pb::LegEndReason::Removed as i32);
    assert_eq!(leg_of(&got[0]).node_id, primary);
    assert_eq!(got[1].kind, Kind::LegRemoved as i32);
    assert_eq!(leg_of(&got[1]).leg_index, 2);
    drop(carol);

    // The primary is SIGKILLed mid-call: both legs are unbound there (the relay is down), then
    // each is MOVED to the backup as its client fails over.
    let talk = Talk::start(peers, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(300)).await;
    relays
        .iter()
        .find(|r| r.node_id == primary)
        .unwrap()
        .signal(Signal::SIGKILL);
    let mut unbound = Vec::new();
    let mut moved = Vec::new();
    while unbound.len() < 2 || moved.len() < 2 {
        let ev = next_leg_event(&mut events, &mut seen, Duration::from_secs(6)).await;
        let l = leg_of(&ev).clone();
        match Kind::try_from(ev.kind).unwrap() {
            Kind::LegUnbound => {
                assert_eq!(l.reason, pb::LegEndReason::RelayDown as i32, "{ev:?}");
                assert_eq!(l.node_id, primary);
                unbound.push(l.leg_index);
            }
            Kind::LegMoved => {
                assert_eq!(l.node_id, backup, "{ev:?}");
                assert_eq!(l.from_node_id, primary);
                assert_eq!(l.role, pb::RelayRole::Backup as i32);
                moved.push(l.leg_index);
            }
            other => panic!("unexpected {other:?}: {ev:?}"),
        }
    }
    unbound.sort();
    moved.sort();
    assert_eq!((unbound, moved), (vec![0, 1], vec![0, 1]));
    let peers: Vec<Peer> = talk.stop().await.into_iter().map(|(p, _)| p).collect();
    // The counts add up over both relays: the primary's until it died, the backup's since.
    let after = activity_when(&mut api, &s.session_id, &mut seen, |a| {
        a[..2].iter().all(|a| a.bound && a.node_id == backup)
            && a[..2]
                .iter()
                .all(|a| stats(a).packets_in > u64::from(count))
    })
    .await;
    assert!(stats(&after[0]).packets_out > 2 * u64::from(count) - 1);

    // A participant who goes silent: its leg is unbound for idleness.
    let mut peers = peers;
    let quiet = peers.remove(0);
    drop(quiet);
    let ev = next_leg_event(&mut events, &mut seen, Duration::from_secs(8)).await;
    assert_eq!(ev.kind, Kind::LegUnbound as i32, "{ev:?}");
    assert_eq!(leg_of(&ev).leg_index, 0);
    assert_eq!(leg_of(&ev).reason, pb::LegEndReason::Idle as i32);
    assert_eq!(leg_of(&ev).node_id, backup);

    // The watcher without leg events saw the removal and the relay's loss, and no leg event.
    let mut kinds = Vec::new();
    while let Ok(Some(Ok(Some(ev)))) = tokio::time::timeout(Duration::from_millis(500), async {
        Some(plain.message().await)
    })
    .await
    {
        assert!(ev.leg.is_none(), "{ev:?}");
        kinds.push(Kind::try_from(ev.kind).unwrap());
    }
    assert_eq!(kinds, vec![Kind::ParticipantsChanged, Kind::RelayDown]);

    // Nothing a relay or the controller said of any leg names a participant's address.
    for text in &seen {
        for ip in ips {
            assert!(!text.contains(ip), "an address in {text}");
        }
    }
    drop(peers);
    drop(relays);
    controller.stop().await;
    std::fs::remove_file(kf).ok();
}
