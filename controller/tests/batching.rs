//! The relay's batched I/O keeps every datagram intact and in order: a GSO burst from a client
//! (as a NIC with GRO would present a video frame) arrives as separate datagrams, and a 16-party
//! fan-out larger than one `sendmmsg` batch reaches every leg in order.

mod common;

use std::time::Duration;

use common::*;
use quinn_udp::{Transmit, UdpSockRef, UdpSocketState};
use veil_controller::dev::{Cluster, Options};
use veil_relay_core::token::Token;
use veil_relay_core::wire::{self, RelayMessage};

fn rtp(seq: u16, len: usize) -> Vec<u8> {
    let mut p = rtp_packet(0xF00D, seq, 0, &[]);
    p.resize(len, (seq % 251) as u8);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gso_burst_arrives_as_separate_datagrams_in_order() {
    let c = Cluster::start(Options {
        relays: 1,
        workers_per_relay: 1,
        quic: false,
        ..Options::default()
    })
    .await
    .unwrap();
    let relay = c.relays[0].udp;
    let mut api = client(&c.controller_url).await;
    let s = allocate(&mut api, request("burst", 2)).await;
    let mut bob = Peer::join(&s.legs[1], "127.0.0.3", 2).await;
    let sender = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let answer = raw_bind(
        &sender,
        relay,
        &Token::from_bytes(&s.legs[0].token).unwrap(),
    )
    .await;
    assert!(matches!(
        wire::parse_relay(&answer),
        Ok(RelayMessage::BindOk { .. })
    ));

    let state = UdpSocketState::new(UdpSockRef::from(&sender)).unwrap();
    let segments = state.max_gso_segments().min(10);
    let mut sent = Vec::new();
    for frame in 0..20u16 {
        // One frame: `segments` packets of 1200 bytes, the last shorter, in one send.
        let mut contents = Vec::new();
        for k in 0..segments as u16 {
            let len = if k as usize == segments - 1 {
                700
            } else {
                1200
            };
            let p = rtp(frame * 100 + k, len);
            contents.extend_from_slice(&p);
            sent.push(p);
        }
        let t = Transmit {
            destination: relay,
            ecn: None,
            contents: &contents,
            segment_size: Some(1200),
            src_ip: None,
        };
        state.send(UdpSockRef::from(&sender), &t).unwrap();
        // Frames a few milliseconds apart, as video frames are (33 ms at 30 frames/s).
        std::thread::sleep(Duration::from_millis(5));
    }
    for expected in &sent {
        let got = tokio::time::timeout(Duration::from_secs(3), bob.leg.recv())
            .await
            .expect("delivered")
            .unwrap();
        assert_eq!(
            (seq_of(&got.data), got.data.len()),
            (seq_of(expected), expected.len()),
            "in order"
        );
        assert_eq!(&got.data[..], &expected[..], "intact");
        assert_eq!(got.from, relay);
    }
    eprintln!("{} datagrams in bursts of {segments}", sent.len());
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_party_fan_out_reaches_every_leg_in_order() {
    let c = Cluster::start(Options {
        relays: 1,
        workers_per_relay: 2,
        quic: false,
        ..Options::default()
    })
    .await
    .unwrap();
    let relay = c.relays[0].udp;
    let mut api = client(&c.controller_url).await;
    let s = allocate(&mut api, request("sixteen", 16)).await;
    let mut peers = Vec::new();
    for (i, leg) in s.legs.iter().enumerate() {
        peers.push(Peer::join(leg, &format!("127.0.2.{}", i + 1), 100 + i as u32).await);
    }
    // Each of 16 sends 20: every peer gets 15 × 20 = 300, in order per sender.
    exchange(&mut peers, 20, |_| relay).await;
    c.shutdown().await.unwrap();
}
