//! Hostile input over real sockets: bad tokens bind and forward nothing, and no datagram from an
//! unbound source draws an answer larger than itself.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use rand::Rng;
use tokio::net::UdpSocket;
use veil_controller::dev::{Cluster, Options};
use veil_relay_core::token::Token;
use veil_relay_core::wire::{self, ErrorCode, RelayMessage};
use veil_relay_core::{KeyRing, Ticket};

async fn cluster() -> Cluster {
    Cluster::start(Options {
        relays: 1,
        workers_per_relay: 2,
        ..Options::default()
    })
    .await
    .unwrap()
}

fn error_code(b: &[u8]) -> Option<u16> {
    match wire::parse_relay(b) {
        Ok(RelayMessage::Error { code, .. }) => Some(code),
        _ => None,
    }
}

/// Counts what arrives on `sock` within `wait`.
async fn drain(sock: &UdpSocket, wait: Duration) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(Ok((n, _))) = tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
        got.push(buf[..n].to_vec());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_bind_nothing_and_forward_nothing() {
    let c = cluster().await;
    let relay = c.relays[0].udp;
    let mut api = client(&c.controller_url).await;
    let s = allocate(&mut api, request("victim-call", 2)).await;
    let other = allocate(&mut api, request("other-call", 2)).await;
    let alice = Peer::join(&s.legs[0], "127.0.0.2", 1).await;
    let bob = Peer::join(&s.legs[1], "127.0.0.3", 2).await;

    let real = Token::from_bytes(&s.legs[1].token).unwrap();
    let claims = *real.claims();
    // Forged: the ticket altered (another leg), the real leg key kept.
    let mut forged = real.to_bytes();
    forged[12] = 0;
    let forged = Token::from_bytes(&forged).unwrap();
    // Expired, but signed with the real cluster key.
    let expired = c.keys.mint(Ticket {
        expires_unix_ms: veil_relay::unix_ms() - 1_000,
        ..claims
    });
    // Signed with a key the cluster does not have.
    let stranger = KeyRing::from_keys(&[(77, rand::random())], 77).mint(claims);

    let mallory = UdpSocket::bind("127.0.0.9:0").await.unwrap();
    for (token, code) in [
        (&forged, ErrorCode::Unauthorized),
        (&expired, ErrorCode::Expired),
        (&stranger, ErrorCode::Unauthorized),
    ] {
        let answer = raw_bind(&mallory, relay, token).await;
        assert_eq!(error_code(&answer), Some(code as u16), "{answer:?}");
    }
    // A token for another session binds there, and only there.
    let other_token = Token::from_bytes(&other.legs[0].token).unwrap();
    let answer = raw_bind(&mallory, relay, &other_token).await;
    assert!(matches!(
        wire::parse_relay(&answer),
        Ok(RelayMessage::BindOk { .. })
    ));

    // Mallory sends media into the relay, and alice and bob talk: each of them receives exactly
    // the other's packets (`exchange` fails on any packet it did not send), mallory nothing.
    for seq in 0..50u16 {
        mallory
            .send_to(&rtp_packet(666, seq, 0, b"injected"), relay)
            .await
            .unwrap();
    }
    let mut peers = vec![alice, bob];
    exchange(&mut peers, 50, |_| relay).await;
    for seq in 50..100u16 {
        mallory
            .send_to(&rtp_packet(666, seq, 0, b"injected"), relay)
            .await
            .unwrap();
    }
    for p in peers.iter_mut() {
        let extra = tokio::time::timeout(Duration::from_millis(300), p.leg.recv()).await;
        assert!(
            extra.is_err(),
            "nothing but the other participant's media arrives"
        );
    }
    assert!(
        drain(&mallory, Duration::from_millis(300)).await.is_empty(),
        "mallory hears nothing"
    );

    let metrics = http_get(c.relays[0].metrics, "/metrics").await;
    for (reason, at_least) in [
        ("bad_token", 1),
        ("expired", 1),
        ("unknown_key", 1),
        ("no_peer", 100),
    ] {
        let v = metric(
            &metrics,
            &format!("veil_relay_dropped_packets_total{{reason=\"{reason}\",transport=\"udp\"}}"),
        );
        assert!(v >= at_least, "{reason}: {v}");
    }
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbound_sources_never_draw_answers_larger_than_they_sent() {
    let c = cluster().await;
    let relay = c.relays[0].udp;
    let mut api = client(&c.controller_url).await;
    let s = allocate(&mut api, request("busy-call", 2)).await;
    let alice = Peer::join(&s.legs[0], "127.0.0.2", 1).await;
    let bob = Peer::join(&s.legs[1], "127.0.0.3", 2).await;

    let noise = std::sync::Arc::new(UdpSocket::bind("127.0.0.10:0").await.unwrap());
    // Read answers while sending, so none is lost to a full receive buffer.
    let reader = {
        let noise = noise.clone();
        tokio::spawn(async move { drain(&noise, Duration::from_millis(1500)).await })
    };
    let mut rng = rand::rng();
    let mut sent_len: HashMap<[u8; 8], usize> = HashMap::new();
    let (mut sent_bytes, mut count) = (0usize, 0usize);
    for len in 0..=1500usize {
        for variant in 0..3 {
            let mut d = vec![0u8; len];
            rng.fill(&mut d[..]);
            if len > 0 && variant > 0 {
                // Control-shaped: a Veil type byte and version, so the parser is exercised.
                d[0] = 0x50 + (len % 16) as u8;
                if len > 1 {
                    d[1] = 1;
                }
                if len > 3 && variant == 2 {
                    d[2] = 0;
                    d[3] = 0;
                }
            }
            if len >= 12 {
                // A unique transaction id, which any answer echoes.
                let txn = (count as u64).to_be_bytes();
                d[4..12].copy_from_slice(&txn);
                sent_len.insert(txn, len);
            }
            noise.send_to(&d, relay).await.unwrap();
            sent_bytes += len;
            count += 1;
            if count % 16 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        // Exactly the two message sizes that parse, with a valid header.
        for (ty, size) in [(0x50u8, 84usize), (0x53, 12)] {
            let mut d = vec![0u8; size];
            rng.fill(&mut d[..]);
            d[0] = ty;
            d[1] = 1;
            d[2] = 0;
            d[3] = (len % 2) as u8;
            let txn = (count as u64).to_be_bytes();
            d[4..12].copy_from_slice(&txn);
            sent_len.insert(txn, size);
            noise.send_to(&d, relay).await.unwrap();
            sent_bytes += size;
            count += 1;
        }
    }
    let answers = reader.await.unwrap();
    let answered_bytes: usize = answers.iter().map(|a| a.len()).sum();
    // Answered: well-formed KEEPALIVEs (reserved 0: even rounds) get NOT_BOUND, and well-formed
    // BINDs with a garbage ticket (cookie flag set: odd rounds) get UNAUTHORIZED, as far as the
    // per-source bind limit lets them through; the rest are dropped unanswered. Nothing else.
    let not_bound = answers
        .iter()
        .filter(|a| error_code(a) == Some(ErrorCode::NotBound as u16))
        .count();
    let unauthorized = answers
        .iter()
        .filter(|a| error_code(a) == Some(ErrorCode::Unauthorized as u16))
        .count();
    let limited = metric(
        &http_get(c.relays[0].metrics, "/metrics").await,
        "veil_relay_dropped_packets_total{reason=\"bind_rate_limited\",transport=\"udp\"}",
    ) as usize;
    assert_eq!(not_bound, 751);
    assert_eq!(
        unauthorized + limited,
        750,
        "every bind-shaped message answered or limited"
    );
    assert!(
        unauthorized >= 100,
        "the first burst of binds is handled ({unauthorized})"
    );
    assert_eq!(answers.len(), not_bound + unauthorized);
    for a in &answers {
        let txn: [u8; 8] = a[4..12].try_into().unwrap();
        let asked = sent_len[&txn];
        assert!(
            a.len() <= asked,
            "a {} byte answer to a {asked} byte datagram",
            a.len()
        );
    }
    assert!(
        answered_bytes * 5 < sent_bytes,
        "answered {answered_bytes} of {sent_bytes} bytes"
    );
    eprintln!(
        "{count} datagrams, {sent_bytes} bytes sent; {} answers, {answered_bytes} bytes",
        answers.len()
    );

    // The relay is alive and the call unharmed.
    let mut peers = vec![alice, bob];
    exchange(&mut peers, 20, |_| relay).await;
    // Workers publish their counters within a few milliseconds of going quiet.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let metrics = http_get(c.relays[0].metrics, "/metrics").await;
    let forwarded = metric(
        &metrics,
        "veil_relay_forwarded_packets_total{transport=\"udp\"}",
    );
    assert_eq!(forwarded, 40, "only the call's packets were forwarded");
    // The UDP port's datagrams: Veil's protocol, and TURN's (random bytes whose first byte is
    // STUN's or ChannelData's are counted as turn-udp).
    let received = metric(
        &metrics,
        "veil_relay_received_packets_total{transport=\"udp\"}",
    ) + metric(
        &metrics,
        "veil_relay_received_packets_total{transport=\"turn-udp\"}",
    );
    assert!(
        received as usize >= count,
        "the relay saw all {count} datagrams, not just some ({received})"
    );
    c.shutdown().await.unwrap();
}
