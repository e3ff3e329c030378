//! QUIC legs: connection migration keeps a leg without a new bind, datagrams too large for a
//! QUIC leg are dropped and counted, so are those a stalled QUIC leg's send buffer discards,
//! certificates are pinned, and bad tokens bind nothing.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use veil_client::{ClientError, Leg, LegConfig, RelayInfo, Transport};
use veil_controller::dev::{Cluster, Options};
use veil_proto::v1 as pb;
use veil_relay_core::wire::ErrorCode;

async fn cluster() -> Cluster {
    Cluster::start(Options {
        relays: 1,
        workers_per_relay: 2,
        ..Options::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrating_quic_client_keeps_its_leg_without_a_new_bind() {
    let c = cluster().await;
    let (udp, quic) = (c.relays[0].udp, c.relays[0].quic.unwrap());
    let mut api = client(&c.controller_url).await;
    let s = allocate(
        &mut api,
        request_with("moving", &[pb::Transport::Quic, pb::Transport::Udp]),
    )
    .await;
    let alice = Peer::join(&s.legs[0], "127.0.0.2", 1).await;
    let bob = Peer::join(&s.legs[1], "127.0.0.3", 2).await;
    let mut peers = vec![alice, bob];
    let source = |i: usize| if i == 0 { quic } else { udp };
    exchange(&mut peers, 50, source).await;

    // Alice's phone moves from Wi-Fi to cellular: a new local address.
    let before = peers[0].leg.local_addr();
    let after = peers[0]
        .leg
        .migrate("127.0.0.5:0".parse().unwrap())
        .unwrap();
    assert_ne!(before.ip(), after.ip());
    // QUIC keepalives (every 200 ms) carry the connection to the new path.
    tokio::time::sleep(Duration::from_millis(400)).await;
    exchange(&mut peers, 50, source).await;

    let counters = peers[0].leg.counters();
    assert_eq!(
        (
            counters.binds.load(Relaxed),
            counters.failovers.load(Relaxed)
        ),
        (1, 0),
        "no new bind"
    );
    let m = http_get(c.relays[0].metrics, "/metrics").await;
    assert_eq!(
        metric(
            &m,
            "veil_relay_binds_total{result=\"bound\",transport=\"quic\"}"
        ),
        1
    );
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_too_large_for_a_quic_leg_are_dropped_and_counted() {
    let c = cluster().await;
    let quic = c.relays[0].quic.unwrap();
    let mut api = client(&c.controller_url).await;
    let s = allocate(
        &mut api,
        request_with("big", &[pb::Transport::Quic, pb::Transport::Udp]),
    )
    .await;
    let mut alice = Peer::join(&s.legs[0], "127.0.0.2", 1).await;
    let mut bob = Peer::join(&s.legs[1], "127.0.0.3", 2).await;
    let max = alice
        .leg
        .max_datagram_size()
        .expect("the client library exposes the current maximum");
    assert!((1000..1500).contains(&max), "QUIC max datagram size {max}");

    // Alice cannot send more than the path takes: refused locally and counted. (Not `max + 1`:
    // path MTU discovery may raise the maximum between the two calls; it tops out at 1452-byte
    // UDP payloads, so 1500 bytes never fit.)
    let err = alice.leg.send(&[0x80; 1500]).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(alice.leg.counters().too_large.load(Relaxed), 1);

    // Bob (UDP) sends a 1490-byte packet, which the relay accepts over UDP (up to 1500) but
    // cannot fit in a QUIC datagram (path MTU discovery tops out at 1452-byte UDP payloads).
    bob.send(&vec![7u8; 1490 - 22]).await;
    let small = bob.send(b"fits").await;
    let got = tokio::time::timeout(Duration::from_secs(2), alice.leg.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got.data, small,
        "the oversized packet was dropped, the next one delivered"
    );
    assert_eq!(got.from, quic);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let m = http_get(c.relays[0].metrics, "/metrics").await;
    assert_eq!(
        metric(
            &m,
            "veil_relay_dropped_packets_total{reason=\"too_large_for_peer\",transport=\"quic\"}"
        ),
        1
    );
    c.shutdown().await.unwrap();
}

/// A QUIC leg's datagrams wait in the relay's send buffer for that connection (1 MiB) while its
/// congestion window is full. When the buffer is full, quinn discards the oldest queued datagram
/// to make room; the relay counts each such discard as a send error, as it counts a full socket
/// buffer over UDP, rather than losing media silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_a_stalled_quic_leg_cannot_take_are_counted() {
    let c = cluster().await;
    let ops = c.relays[0].metrics;
    let mut api = client(&c.controller_url).await;
    let s = allocate(
        &mut api,
        request_with("stalled", &[pb::Transport::Quic, pb::Transport::Udp]),
    )
    .await;

    // Alice (QUIC) runs on a runtime of her own with one thread, so that the test can stall her:
    // while that thread blocks, her endpoint neither reads nor acknowledges anything.
    let leg = s.legs[0].clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
    let alice = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut cfg = LegConfig::from_pb(&leg, "127.0.0.2:0".parse().unwrap());
            // The stall below lasts well under this: QUIC must not call the path dead.
            cfg.dead_after = Duration::from_secs(10);
            let mut leg = Leg::bind(cfg).await.expect("leg binds");
            ready_tx.send(()).unwrap();
            // Stalled: this blocks the runtime's only thread.
            resume_rx.recv().unwrap();
            // Resumed: take what the relay kept for her.
            let mut received = 0u64;
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(500), leg.recv()).await
            {
                received += 1;
            }
            received
        })
    });
    tokio::task::spawn_blocking(move || ready_rx.recv().unwrap())
        .await
        .unwrap();
    let mut bob = Peer::join(&s.legs[1], "127.0.0.3", 2).await;
    // Counted by the transport the datagrams arrived on (Bob's UDP); discards by the one they
    // leave on.
    let forwarded_series = "veil_relay_forwarded_packets_total{transport=\"udp\"}";
    let errors_series = "veil_relay_send_errors_total{transport=\"quic\"}";
    let m = http_get(ops, "/metrics").await;
    let (forwarded0, errors0) = (metric(&m, forwarded_series), metric(&m, errors_series));

    // Bob (UDP) sends 3,000 datagrams of about 1,100 bytes, 30 per millisecond: three times what
    // the relay's send buffer for Alice holds.
    let payload = vec![0x5a; 1080];
    for _ in 0..100 {
        for _ in 0..30 {
            bob.send(&payload).await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = http_get(ops, "/metrics").await;
    let forwarded = metric(&m, forwarded_series) - forwarded0;
    let discarded = metric(&m, errors_series) - errors0;
    resume_tx.send(()).unwrap();
    let received = tokio::task::spawn_blocking(move || alice.join().unwrap())
        .await
        .unwrap();

    assert!(
        forwarded > 1_500,
        "the relay received only {forwarded} of the 3,000 datagrams"
    );
    assert!(discarded > 0, "nothing counted as discarded");
    // Every datagram beyond what the buffer (1 MiB: about 930 of these) and the congestion
    // window hold is counted.
    let kept = forwarded - discarded;
    assert!(
        kept <= 1_200,
        "{forwarded} forwarded, {discarded} counted as discarded: {kept} cannot all have fit"
    );
    // Alice's connection survived the stall and delivers what was kept, and no more.
    assert!(
        received > 0 && received <= kept,
        "alice received {received} datagrams; the relay kept {kept}"
    );
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_binds_refuse_bad_tokens_and_pin_the_certificate() {
    let c = cluster().await;
    let mut api = client(&c.controller_url).await;
    let s = allocate(
        &mut api,
        request_with("pinned", &[pb::Transport::Quic, pb::Transport::Quic]),
    )
    .await;
    let local = "127.0.0.2:0".parse().unwrap();

    let mut forged = s.legs[0].token.clone();
    forged[5] ^= 1;
    let cfg = LegConfig {
        token: forged,
        ..LegConfig::from_pb(&s.legs[0], local)
    };
    assert_eq!(
        Leg::bind(cfg).await.unwrap_err(),
        ClientError::Refused(ErrorCode::Unauthorized)
    );

    // A relay whose certificate is not the pinned one is not trusted.
    let mut wrong = RelayInfo::from_pb(&s.relays[0]).unwrap();
    wrong.quic_cert_sha256 = Some([0u8; 32]);
    let mut cfg = LegConfig::new(s.legs[0].token.clone(), vec![wrong], Transport::Quic, local);
    cfg.bind_timeout = Duration::from_millis(500);
    assert_eq!(Leg::bind(cfg).await.unwrap_err(), ClientError::Unreachable);

    // The right pin binds.
    let leg = Leg::bind(LegConfig::from_pb(&s.legs[0], local))
        .await
        .unwrap();
    assert_eq!(leg.transport(), Transport::Quic);
    c.shutdown().await.unwrap();
}
