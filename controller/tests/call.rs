//! Private calls end to end, over real sockets: a `veil-controller --dev` process (controller and
//! relay), a real tonic client as the signaling service, and participants on their own loopback
//! addresses speaking real SRTP through the relay.

mod common;

use common::*;
use veil_proto::v1 as pb;

/// Strings that would betray a participant's address: the IP, and `ip:port` for its port.
fn address_needles(peers: &[Peer]) -> Vec<String> {
    let mut needles = Vec::new();
    for p in peers {
        let a = p.leg.local_addr();
        needles.push(a.ip().to_string());
        needles.push(a.to_string());
    }
    needles
}

fn token_needles(session: &pb::Session) -> Vec<String> {
    let mut needles = Vec::new();
    for leg in &session.legs {
        needles.push(hex::encode(&leg.token));
        needles.push(hex::encode(&leg.token[32..])); // the secret half alone
        needles.push(hex::encode(&leg.token[..32])); // the ticket alone
        needles.push(format!("{:?}", &leg.token[32..]));
    }
    needles
}

/// A call of one participant per entry of `transports`, through a `veil-controller --dev`
/// process logging at trace level.
async fn private_call(transports: &[pb::Transport]) {
    private_call_logged(transports, "text").await;
}

async fn private_call_logged(transports: &[pb::Transport], format: &str) {
    let n = transports.len();
    // The most verbose logging there is.
    let dev = DevProcess::start(1, &[("VEIL_LOG", "trace"), ("VEIL_LOG_FORMAT", format)]);
    let (relay_udp, relay_quic) = (dev.relay_udp(0), dev.relay_quic(0));
    let mut api = client(&dev.controller_url()).await;
    let answer = api
        .allocate_session(request_with(
            &format!("call-{n}-{transports:?}"),
            transports,
        ))
        .await
        .unwrap()
        .into_inner();
    let session = answer.session.clone().unwrap();
    assert!(answer.created);
    assert_eq!(session.legs.len(), n);
    let relay = &session.relays[0];
    assert_eq!(relay.udp_address, relay_udp.to_string());
    assert_eq!(relay.quic_address, relay_quic.to_string());
    assert_eq!(relay.quic_cert_sha256.len(), 32);

    let mut peers = Vec::new();
    for (i, leg) in session.legs.iter().enumerate() {
        let expected = match transports[i] {
            pb::Transport::Quic => pb::Transport::Quic,
            _ => pb::Transport::Udp,
        };
        assert_eq!(
            leg.transport, expected as i32,
            "leg {i} gets the transport it asked for"
        );
        // 127.0.0.2, 127.0.0.3, ...: each participant its own address; the relay is 127.0.0.1.
        peers.push(Peer::join(leg, &format!("127.0.0.{}", i + 2), 1000 + i as u32).await);
    }
    let sources: Vec<_> = peers
        .iter()
        .map(|p| match p.leg.transport() {
            veil_client::Transport::Udp => relay_udp,
            veil_client::Transport::Quic => relay_quic,
        })
        .collect();
    exchange(&mut peers, 100, |i| sources[i]).await;

    let released = api
        .release_session(pb::ReleaseSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let got = api
        .get_session(pb::GetSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();

    // Neither the API's answers nor the relay's logs hold a participant's address; the logs
    // hold no token either.
    let answers = format!("{answer:?} {released:?} {got:?}");
    let needles = address_needles(&peers);
    for needle in &needles {
        assert!(
            !answers.contains(needle.as_str()),
            "API answer contains {needle}"
        );
    }
    let (status, log) = dev.stop();
    assert!(status.success(), "exits cleanly on SIGTERM: {status:?}");
    for needle in needles.iter().chain(token_needles(&session).iter()) {
        assert!(
            !log.contains(needle.as_str()),
            "relay log contains {needle}"
        );
    }
    assert!(
        log.contains("TRACE") && log.contains("peer#"),
        "trace logging was on, with redacted peers"
    );
    if format == "json" {
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(
                v.get("level").is_some() && v.get("timestamp").is_some(),
                "{line}"
            );
        }
    }
}

use pb::Transport::{Quic, Udp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_party_call_over_udp_is_private() {
    private_call(&[Udp, Udp]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_party_call_over_udp_is_private() {
    private_call(&[Udp, Udp, Udp, Udp]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_party_call_over_quic_is_private() {
    private_call(&[Quic, Quic]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_party_mixed_call_is_private() {
    private_call(&[Quic, Udp]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_party_mixed_call_is_private() {
    private_call(&[Quic, Udp, Quic, Udp]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_call_is_private_in_json_logs_too() {
    private_call_logged(&[Quic, Udp], "json").await;
}
