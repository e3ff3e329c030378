//! A call that outlives its TTL (ExtendSession), over real sockets: three real controller
//! replicas (every RPC sent to any of them), real relays with UDP and QUIC, real SRTP from the
//! client library. The tokens stay the same; media crosses the original expiry with no packet
//! lost and no client doing anything; the same tokens bind after it, on the backup and on a
//! relay that attached after the extension; a session that was not extended ends at its expiry
//! as before.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use tonic::Code;
use tonic_types::StatusExt;
use veil_client::{ClientError, LegStatus};
use veil_proto::v1 as pb;
use veil_relay::RelayServer;
use veil_relay_core::wire::ErrorCode;

/// Starts an in-process relay with UDP and QUIC, attached to every one of `controllers`; stops
/// when `stop` turns true.
async fn relay(
    keys: &veil_relay_core::token::KeyRing,
    node_id: &str,
    controllers: &[String],
    stop: &tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let mut s = veil_relay::config::Settings::local(keys.clone(), node_id, controllers.to_vec());
    s.zone = format!("zone-{node_id}");
    s.workers = 1;
    s.report_interval = Duration::from_millis(250);
    s.quic = Some(veil_relay::config::QuicSettings::local().unwrap());
    let r = RelayServer::load(s).await.unwrap();
    let mut rx = stop.clone();
    tokio::spawn(r.run(async move {
        let _ = rx.wait_for(|s| *s).await;
    }))
}

fn unix_ms(t: &prost_types::Timestamp) -> u64 {
    t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn extend(session_id: &str, ttl_seconds: u32) -> pb::ExtendSessionRequest {
    pb::ExtendSessionRequest {
        session_id: session_id.into(),
        ttl_seconds,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_extended_past_its_ttl_loses_no_packet_and_its_tokens_bind_on() {
    let keys = veil_controller::dev::generate_keys();
    // Three replicas; every RPC goes to any of them.
    let replicas = LocalController::start_replicas(&keys, 3).await;
    let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = vec![
        relay(&keys, "relay-a", &urls, &stopped).await,
        relay(&keys, "relay-b", &urls, &stopped).await,
    ];
    for r in &replicas {
        r.wait_relays(2).await;
    }
    let controller = &replicas[0];
    let mut api = client_any(&urls).await;

    // Two calls of the shortest TTL: one is extended, the other is not.
    let transports = [pb::Transport::Udp, pb::Transport::Quic];
    let mut long = request_with("long-call", &transports);
    long.ttl_seconds = 60;
    let mut short = request_with("short-call", &transports);
    short.ttl_seconds = 60;
    let s = allocate(&mut api, long).await;
    let other = allocate(&mut api, short).await;
    let expiry = unix_ms(s.expires_at.as_ref().unwrap());
    let primary: SocketAddr = s.relays[0].udp_address.parse().unwrap();
    let backup: SocketAddr = s.relays[1].udp_address.parse().unwrap();
    // Bob's leg is QUIC: his media comes from the primary's QUIC address.
    let primary_quic: SocketAddr = s.relays[0].quic_address.parse().unwrap();
    let from = move |i: usize| if i == 1 { primary_quic } else { primary };
    assert_eq!(s.legs[1].transport, pb::Transport::Quic as i32);
    let mut watch = api
        .watch_session(pb::WatchSessionRequest {
            session_id: s.session_id.clone(),
            leg_events: false,
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.kind, pb::session_event::Kind::Snapshot as i32);

    let alice = Peer::join(&s.legs[0], "127.0.0.2", 1).await;
    let bob = Peer::join(&s.legs[1], "127.0.0.3", 2).await;
    let mut peers = vec![alice, bob];
    exchange(&mut peers, 5, from).await;
    let mut others = vec![
        Peer::join(&other.legs[0], "127.0.0.4", 3).await,
        Peer::join(&other.legs[1], "127.0.0.5", 4).await,
    ];
    exchange(&mut others, 5, |i| {
        let other_primary: SocketAddr = other.relays[0].udp_address.parse().unwrap();
        let other_quic: SocketAddr = other.relays[0].quic_address.parse().unwrap();
        if i == 1 { other_quic } else { other_primary }
    })
    .await;

    // Bad requests change nothing, and say what is wrong.
    for bad in [0, 59, 86_401] {
        let e = api
            .extend_session(extend(&s.session_id, bad))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
        assert_eq!(
            e.get_error_details()
                .bad_request()
                .unwrap()
                .field_violations[0]
                .field,
            "ttl_seconds"
        );
    }
    let e = api
        .extend_session(extend("00000000000000ff", 600))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::NotFound, "SESSION_NOT_FOUND")
    );

    // The signaling service extends the call to an hour: same tokens, a later expiry.
    let extended = api
        .extend_session(extend(&s.session_id, 3600))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let new_expiry = unix_ms(extended.expires_at.as_ref().unwrap());
    assert!(new_expiry >= expiry + 3_500_000, "{new_expiry} vs {expiry}");
    for (a, b) in extended.legs.iter().zip(&s.legs) {
        assert_eq!(a.token, b.token, "the tokens stay the same");
        assert_eq!(unix_ms(a.expires_at.as_ref().unwrap()), new_expiry);
    }
    let ev = watch.message().await.unwrap().unwrap();
    assert_eq!(ev.kind, pb::session_event::Kind::Extended as i32);
    assert_eq!(ev.session.unwrap().expires_at, extended.expires_at);
    // Asking for less never shortens it; the retry is idempotent.
    let again = api
        .extend_session(extend(&s.session_id, 60))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(again.expires_at, extended.expires_at);

    // A relay that attaches after the extension hears it when it attaches.
    tasks.push(relay(&keys, "relay-c", &urls, &stopped).await);
    for r in &replicas {
        r.wait_relays(3).await;
    }
    let late: SocketAddr = controller
        .state
        .registry
        .views()
        .iter()
        .find(|v| v.info.node_id == "relay-c")
        .unwrap()
        .info
        .udp_address
        .parse()
        .unwrap();

    // Media crosses the original expiry: bursts every 50 ms from 2 s before it to 2 s after,
    // each delivered whole (`exchange` fails on any packet lost). The clients keep their legs
    // alive by themselves meanwhile, and do nothing about the extension.
    let wait = Duration::from_millis(expiry.saturating_sub(now_ms() + 2_000));
    tokio::time::sleep(wait).await;
    let mut status = peers.iter().map(|p| p.leg.status()).collect::<Vec<_>>();
    let mut other_status = others[0].leg.status();
    while now_ms() < expiry + 2_000 {
        exchange(&mut peers, 3, from).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for s in &mut status {
        assert!(
            matches!(*s.borrow_and_update(), LegStatus::Bound { relay: 0 }),
            "past the original expiry: {:?}",
            *s.borrow()
        );
    }
    // The call that was not extended ended at its expiry, as before.
    let over = ended(
        &mut other_status,
        Duration::from_secs(3),
        "the unextended call",
    )
    .await;
    assert_eq!(
        over,
        LegStatus::Ended(ClientError::Closed(ErrorCode::Expired))
    );

    // Past the tokens' own expiry, they bind on the backup (a failover) and on the relay that
    // attached later; the unextended call's do not.
    for relay in [backup, late] {
        let leg = bind_udp(&s.legs[0].token, relay, "127.0.0.6:0").await;
        assert!(leg.is_ok(), "{relay}: {:?}", leg.err());
        let refused = bind_udp(&other.legs[0].token, relay, "127.0.0.7:0").await;
        assert_eq!(
            refused.unwrap_err(),
            ClientError::Refused(ErrorCode::Expired)
        );
    }
    exchange(&mut peers, 5, from).await;

    // A released session cannot be extended.
    api.release_session(pb::ReleaseSessionRequest {
        session_id: s.session_id.clone(),
    })
    .await
    .unwrap();
    let e = api
        .extend_session(extend(&s.session_id, 600))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "SESSION_RELEASED")
    );
    stop.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for r in replicas {
        r.stop().await;
    }
}
