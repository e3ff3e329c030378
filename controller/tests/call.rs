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

async fn private_call(n: usize) {
    // The most verbose logging there is.
    let dev = DevProcess::start(1, &[("VEIL_LOG", "trace")]);
    let relay = dev.relay_udp(0);
    let mut api = client(&dev.controller_url()).await;
    let answer = api
        .allocate_session(request(&format!("call-{n}"), n))
        .await
        .unwrap()
        .into_inner();
    let session = answer.session.clone().unwrap();
    assert!(answer.created);
    assert_eq!(session.legs.len(), n);
    assert_eq!(session.relays[0].udp_address, relay.to_string());

    let mut peers = Vec::new();
    for (i, leg) in session.legs.iter().enumerate() {
        // 127.0.0.2, 127.0.0.3, ...: each participant its own address; the relay is 127.0.0.1.
        peers.push(Peer::join(leg, &format!("127.0.0.{}", i + 2), 1000 + i as u32).await);
    }
    exchange(&mut peers, 100, |_| relay).await;

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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_party_call_over_udp_is_private() {
    private_call(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_party_call_over_udp_is_private() {
    private_call(4).await;
}
