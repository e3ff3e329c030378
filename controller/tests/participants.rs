//! Participants join and leave a live call (AddParticipant, RemoveParticipant), as a group
//! call's signaling service does it, over real sockets: a real tonic server, two real relays,
//! real SRTP from the client library. A removed participant's media stops within a second on
//! every relay while the others lose nothing, and their captured token binds nowhere again.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use tonic_types::StatusExt;
use veil_client::{ClientError, LegStatus};
use veil_controller::dev::{Cluster, Options};
use veil_proto::v1 as pb;
use veil_relay_core::wire::ErrorCode;

fn add(session_id: &str, id: &str) -> pb::AddParticipantRequest {
    pb::AddParticipantRequest {
        session_id: session_id.into(),
        participant: Some(pb::Participant {
            participant_id: id.into(),
            ..Default::default()
        }),
    }
}

fn remove(session_id: &str, id: &str) -> pb::RemoveParticipantRequest {
    pb::RemoveParticipantRequest {
        session_id: session_id.into(),
        participant_id: id.into(),
    }
}

/// The field a `BadRequest` names.
fn field_of(s: &tonic::Status) -> String {
    s.get_error_details()
        .bad_request()
        .unwrap()
        .field_violations[0]
        .field
        .clone()
}

/// Sends every 5 ms until `stop` (at most 2000 packets), counting what it sends.
fn talk(
    mut p: Peer,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(Peer, u16)> {
    tokio::spawn(async move {
        let mut sent = 0u16;
        while !stop.load(Ordering::Relaxed) && sent < 2000 {
            // A removed participant's sends may fail once its leg ended: that is the point.
            if p.try_send(b"talking").await.is_ok() {
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (p, sent)
    })
}

/// Everything `p` receives until 1.5 s of silence: (ssrc, seq, when).
async fn drain(p: &mut Peer) -> Vec<(u32, u16, Instant)> {
    let mut out = Vec::new();
    while let Ok(Some(got)) = tokio::time::timeout(Duration::from_millis(1500), p.leg.recv()).await
    {
        out.push((ssrc_of(&got.data), seq_of(&got.data), got.at));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_talk_and_leave_while_the_others_lose_nothing() {
    let c = Cluster::start(Options {
        relays: 2,
        workers_per_relay: 2,
        controllers: 3,
        ..Options::default()
    })
    .await
    .unwrap();
    let mut api = client_any(&c.controller_urls).await;
    let s = allocate(&mut api, request("group-call", 2)).await;
    let primary: SocketAddr = s.relays[0].udp_address.parse().unwrap();
    let backup: SocketAddr = s.relays[1].udp_address.parse().unwrap();

    // A third participant joins the call in progress; a retry returns the same leg.
    let joined = api
        .add_participant(add(&s.session_id, "carol"))
        .await
        .unwrap()
        .into_inner();
    assert!(joined.created);
    let carol_leg = joined.leg.clone().unwrap();
    assert_eq!(carol_leg.leg_index, 2);
    assert_eq!(carol_leg.participant_id, "carol");
    assert_eq!(
        carol_leg.relays, s.relays,
        "the session's relays, primary first"
    );
    let retry = api
        .add_participant(add(&s.session_id, "carol"))
        .await
        .unwrap()
        .into_inner();
    assert!(!retry.created);
    assert_eq!(
        retry.leg.unwrap().token,
        carol_leg.token,
        "a retry mints nothing"
    );
    let now = api
        .get_session(pb::GetSessionRequest {
            session_id: s.session_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let ids: Vec<_> = now.legs.iter().map(|l| l.participant_id.as_str()).collect();
    assert_eq!(ids, ["participant-0", "participant-1", "carol"]);
    // The original allocation's retry still returns the session, as it is now.
    let again = api
        .allocate_session(request("group-call", 2))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.session.unwrap().legs.len(), 3);

    // All three talk to each other through the primary, byte-identical and authenticated.
    let alice = Peer::join(&s.legs[0], "127.0.0.2", 1).await;
    let bob = Peer::join(&s.legs[1], "127.0.0.3", 2).await;
    let carol = Peer::join(&carol_leg, "127.0.0.4", 3).await;
    let mut peers = vec![alice, bob, carol];
    exchange(&mut peers, 10, |_| primary).await;
    // Every replica hears from the relays what each leg carried, the joiner's included.
    for url in &c.controller_urls {
        let mut one = client(url).await;
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let now = one
                .get_session(pb::GetSessionRequest {
                    session_id: s.session_id.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .session
                .unwrap();
            let counted: Vec<(bool, String, u64, u64)> = now
                .legs
                .iter()
                .map(|l| {
                    let a = l.activity.clone().unwrap_or_default();
                    let st = a.stats.unwrap_or_default();
                    (a.bound, a.node_id, st.packets_in, st.packets_out)
                })
                .collect();
            let want = (true, s.relays[0].node_id.clone(), 10, 20);
            if counted.iter().all(|c| *c == want) {
                break;
            }
            assert!(Instant::now() < until, "replica {url}: {counted:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut carol = peers.pop().unwrap();
    let bob = peers.pop().unwrap();
    let alice = peers.pop().unwrap();
    let mut carol_status = carol.leg.status();

    // Everyone keeps talking while the signaling service removes carol.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let alice_talk = talk(alice, stop.clone());
    let bob_talk = talk(bob, stop.clone());
    let carol_rx = tokio::spawn(async move {
        let got = drain(&mut carol).await;
        (carol, got)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let removed_at = Instant::now();
    let after = api
        .remove_participant(remove(&s.session_id, "carol"))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let ids: Vec<_> = after
        .legs
        .iter()
        .map(|l| l.participant_id.as_str())
        .collect();
    assert_eq!(
        ids,
        ["participant-0", "participant-1"],
        "a removed participant is not listed"
    );

    // Carol's media stops within a second, and her client is told the call is over for her.
    let status = ended(&mut carol_status, Duration::from_secs(2), "carol, removed").await;
    assert_eq!(
        status,
        LegStatus::Ended(ClientError::Closed(ErrorCode::SessionClosed))
    );
    // The others talk on for well over a second after the removal.
    let until = removed_at + Duration::from_millis(1500);
    tokio::time::sleep_until(until.into()).await;
    stop.store(true, Ordering::Relaxed);
    let (mut alice, alice_sent) = alice_talk.await.unwrap();
    let (mut bob, bob_sent) = bob_talk.await.unwrap();
    let (_carol, carol_got) = carol_rx.await.unwrap();
    let before: usize = carol_got
        .iter()
        .filter(|(_, _, at)| *at < removed_at)
        .count();
    let last = carol_got.iter().map(|(_, _, at)| *at).max().unwrap();
    assert!(before > 0, "carol heard the others until her removal");
    assert!(
        last.saturating_duration_since(removed_at) < Duration::from_secs(1),
        "carol still got media {:?} after her removal",
        last.saturating_duration_since(removed_at)
    );

    // Alice and Bob lost nothing of each other, and hear nothing from carol after a second.
    let alice_got = drain(&mut alice).await;
    let bob_got = drain(&mut bob).await;
    for (who, got, other_ssrc, other_sent) in [
        ("alice", &alice_got, 2, bob_sent),
        ("bob", &bob_got, 1, alice_sent),
    ] {
        let from_other: HashSet<u16> = got
            .iter()
            .filter(|(ssrc, _, _)| *ssrc == other_ssrc)
            .map(|(_, seq, _)| *seq)
            .collect();
        assert_eq!(
            from_other.len(),
            usize::from(other_sent),
            "{who} lost packets of the other remaining participant"
        );
        let late = got
            .iter()
            .filter(|(ssrc, _, at)| *ssrc == 3 && *at > removed_at + Duration::from_secs(1))
            .count();
        assert_eq!(
            late, 0,
            "{who} still got carol's media a second after her removal"
        );
    }
    for (who, got, other_ssrc) in [("alice", &alice_got, 2), ("bob", &bob_got, 1)] {
        assert!(
            got.iter()
                .any(|(ssrc, _, at)| *ssrc == other_ssrc
                    && *at > removed_at + Duration::from_secs(1)),
            "{who} heard the other remaining participant more than a second after the removal"
        );
    }

    // Carol's token, captured, binds on neither relay: not on the backup either, where she
    // never bound.
    for relay in [primary, backup] {
        let again = bind_udp(&carol_leg.token, relay, "127.0.0.5:0").await;
        assert_eq!(
            again.unwrap_err(),
            ClientError::Refused(ErrorCode::SessionClosed)
        );
    }
    // Removing her again succeeds; the others still talk.
    api.remove_participant(remove(&s.session_id, "carol"))
        .await
        .unwrap();
    let mut peers = vec![alice, bob];
    exchange(&mut peers, 5, |_| primary).await;

    // She is called back: a new leg, a new index and token; the old token stays revoked.
    let back = api
        .add_participant(add(&s.session_id, "carol"))
        .await
        .unwrap()
        .into_inner();
    assert!(back.created);
    let back = back.leg.unwrap();
    assert_eq!(back.leg_index, 3);
    assert_ne!(back.token, carol_leg.token);
    let carol = Peer::join(&back, "127.0.0.6", 4).await;
    peers.push(carol);
    exchange(&mut peers, 5, |_| primary).await;
    let refused = bind_udp(&carol_leg.token, primary, "127.0.0.7:0").await;
    assert_eq!(
        refused.unwrap_err(),
        ClientError::Refused(ErrorCode::SessionClosed)
    );
    c.shutdown().await.unwrap();
}

/// A relay that attaches after a participant was removed (a restart, a relay that was cut off)
/// learns the revocation before anything else, and refuses the removed token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_attaching_later_learns_removed_legs() {
    let keys = veil_controller::dev::generate_keys();
    let kf = key_file(&keys);
    let controller = LocalController::start(veil_controller::config::Settings::local(keys)).await;
    let urls = std::slice::from_ref(&controller.url);
    let _first = RelayProcess::start("relay-a", "", &kf, urls, &[]);
    controller.wait_relays(1).await;
    let mut api = client(&controller.url).await;
    let s = allocate(&mut api, request("late-relay", 3)).await;
    api.remove_participant(remove(&s.session_id, "participant-2"))
        .await
        .unwrap();
    let _second = RelayProcess::start("relay-b", "", &kf, urls, &[]);
    controller.wait_relays(2).await;
    let relays: Vec<SocketAddr> = controller
        .state
        .registry
        .views()
        .iter()
        .map(|v| v.info.udp_address.parse().unwrap())
        .collect();
    assert_eq!(relays.len(), 2);
    for relay in relays {
        let refused = bind_udp(&s.legs[2].token, relay, "127.0.0.8:0").await;
        assert_eq!(
            refused.unwrap_err(),
            ClientError::Refused(ErrorCode::SessionClosed),
            "on {relay}"
        );
        let kept = bind_udp(&s.legs[0].token, relay, "127.0.0.8:0").await;
        assert!(kept.is_ok(), "another leg of the session binds on {relay}");
    }
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_changes_get_precise_errors_and_events() {
    let c = Cluster::start(Options {
        relays: 1,
        controllers: 3,
        ..Options::default()
    })
    .await
    .unwrap();
    let mut api = client_any(&c.controller_urls).await;
    let s = allocate(&mut api, request("errors-call", 2)).await;
    let tokens: Vec<Vec<u8>> = s.legs.iter().map(|l| l.token.clone()).collect();
    let check = |e: tonic::Status, code: Code, want: &str| {
        assert_eq!(e.code(), code, "{}", e.message());
        assert_eq!(reason(&e), want, "{}", e.message());
        // No token, no address, in the message or the details.
        for bytes in [e.message().as_bytes(), e.details()] {
            for t in &tokens {
                assert!(!bytes.windows(t.len()).any(|w| w == t.as_slice()));
            }
            assert!(
                !String::from_utf8_lossy(bytes).contains("127.0.0."),
                "{e:?}"
            );
        }
    };

    // A watcher sees each change, with the session as it is now.
    let mut watch = api
        .watch_session(pb::WatchSessionRequest {
            session_id: s.session_id.clone(),
            leg_events: false,
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.kind(), pb::session_event::Kind::Snapshot);

    // Unknown session, bad fields.
    let e = api
        .add_participant(add("00000000000000aa", "x"))
        .await
        .unwrap_err();
    check(e, Code::NotFound, "SESSION_NOT_FOUND");
    let e = api.add_participant(add("nope", "x")).await.unwrap_err();
    check(e, Code::InvalidArgument, "INVALID_FIELD");
    let e = api
        .add_participant(pb::AddParticipantRequest {
            session_id: s.session_id.clone(),
            participant: None,
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "participant");
    check(e, Code::InvalidArgument, "INVALID_FIELD");
    let e = api
        .add_participant(add(&s.session_id, ""))
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "participant.participant_id");
    check(e, Code::InvalidArgument, "INVALID_FIELD");
    let e = api
        .remove_participant(remove(&s.session_id, ""))
        .await
        .unwrap_err();
    check(e, Code::InvalidArgument, "INVALID_FIELD");
    let e = api
        .remove_participant(remove(&s.session_id, "nobody"))
        .await
        .unwrap_err();
    check(e, Code::NotFound, "PARTICIPANT_NOT_FOUND");

    // The same participant again, otherwise: a conflict, and nothing changes.
    let mut other = add(&s.session_id, "participant-0");
    other.participant.as_mut().unwrap().region = "eu-west".into();
    let e = api.add_participant(other).await.unwrap_err();
    check(e, Code::AlreadyExists, "PARTICIPANT_CONFLICT");

    // Up to 16 legs in a session's life, removed ones included.
    for i in 2..16 {
        let r = api
            .add_participant(add(&s.session_id, &format!("p{i}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.leg.unwrap().leg_index, i);
        let ev = tokio::time::timeout(Duration::from_secs(2), watch.message())
            .await
            .expect("an event per change")
            .unwrap()
            .unwrap();
        assert_eq!(ev.kind(), pb::session_event::Kind::ParticipantsChanged);
        assert_eq!(ev.session.unwrap().legs.len(), i as usize + 1);
    }
    api.remove_participant(remove(&s.session_id, "p5"))
        .await
        .unwrap();
    let ev = watch.message().await.unwrap().unwrap();
    assert_eq!(ev.kind(), pb::session_event::Kind::ParticipantsChanged);
    let legs = ev.session.unwrap().legs;
    assert_eq!(legs.len(), 15);
    assert!(legs.iter().all(|l| l.participant_id != "p5"));
    let e = api
        .add_participant(add(&s.session_id, "p16"))
        .await
        .unwrap_err();
    check(e, Code::FailedPrecondition, "SESSION_FULL");
    let e = api
        .add_participant(add(&s.session_id, "p5"))
        .await
        .unwrap_err();
    check(e, Code::FailedPrecondition, "SESSION_FULL");

    // A released session takes nobody.
    api.release_session(pb::ReleaseSessionRequest {
        session_id: s.session_id.clone(),
    })
    .await
    .unwrap();
    let e = api
        .add_participant(add(&s.session_id, "late"))
        .await
        .unwrap_err();
    check(e, Code::FailedPrecondition, "SESSION_RELEASED");
    c.shutdown().await.unwrap();
}

/// Ringing without exposure: the callee's leg exists from allocation, but until the callee
/// binds, the caller, sending media and keepalives from a raw socket, gets nothing but the
/// KEEPALIVE_ACKs every bound leg gets: no media, no signal that a callee exists, no address.
/// A callee who declines is removed, and the caller's leg goes on untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ringing_callee_is_invisible_to_the_caller() {
    use std::net::UdpSocket;
    use veil_relay_core::token::Token;
    use veil_relay_core::wire::{self, RelayMessage};

    let c = Cluster::start(Options {
        relays: 1,
        controllers: 3,
        ..Options::default()
    })
    .await
    .unwrap();
    let relay = c.relays[0].udp;
    let mut api = client_any(&c.controller_urls).await;
    let s = allocate(&mut api, request("ringing", 2)).await;
    let caller = Token::from_bytes(&s.legs[0].token).unwrap();

    let sock = UdpSocket::bind("127.0.0.2:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 2048];
    sock.send_to(&wire::bind(&caller, [1; 8], None), relay)
        .unwrap();
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let Ok(RelayMessage::Challenge { cookie, .. }) = wire::parse_relay(&buf[..n]) else {
        panic!("a challenge");
    };
    let cookie: [u8; 24] = cookie.try_into().unwrap();
    sock.send_to(&wire::bind(&caller, [2; 8], Some(&cookie)), relay)
        .unwrap();
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    assert!(matches!(
        wire::parse_relay(&buf[..n]),
        Ok(RelayMessage::BindOk { .. })
    ));

    // One phase of ringing: `rounds` rounds, 10 ms apart, of a media packet, with a KEEPALIVE
    // every tenth; returns every datagram the caller got, and the KEEPALIVEs' transaction ids.
    fn ring(
        sock: UdpSocket,
        relay: SocketAddr,
        rounds: u32,
        seq0: u16,
    ) -> (Vec<Vec<u8>>, Vec<[u8; 8]>) {
        {
            sock.set_read_timeout(Some(Duration::from_millis(5)))
                .unwrap();
            let mut left = rounds;
            let (mut got, mut txns, mut seq) = (Vec::new(), Vec::new(), seq0);
            let mut buf = [0u8; 2048];
            while left > 0 {
                left -= 1;
                let mut rtp = rtp_packet(0xca11e4, seq, u32::from(seq) * 960, b"hello?");
                rtp.extend([0u8; 10]); // as long as an SRTP packet's auth tag
                sock.send_to(&rtp, relay).unwrap();
                if seq % 10 == 0 {
                    let txn = [seq as u8; 8];
                    txns.push(txn);
                    sock.send_to(&wire::keepalive(txn), relay).unwrap();
                }
                seq += 1;
                while let Ok((n, from)) = sock.recv_from(&mut buf) {
                    assert_eq!(from, relay, "only the relay ever writes to the caller");
                    got.push(buf[..n].to_vec());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(100));
            while let Ok((n, _)) = sock.recv_from(&mut buf) {
                got.push(buf[..n].to_vec());
            }
            (got, txns)
        }
    }
    let only_acks = |got: &[Vec<u8>], txns: &[[u8; 8]], phase: &str| {
        let acks: Vec<[u8; 8]> = got
            .iter()
            .map(|d| match wire::parse_relay(d) {
                Ok(RelayMessage::KeepaliveAck { txn }) => txn,
                other => panic!("{phase}: the caller got {other:?} ({} bytes)", d.len()),
            })
            .collect();
        assert_eq!(
            acks, txns,
            "{phase}: one KEEPALIVE_ACK per KEEPALIVE, nothing else"
        );
    };

    // The callee's phone rings: nothing of it reaches the caller.
    let s1 = sock.try_clone().unwrap();
    let (got, txns) = tokio::task::spawn_blocking(move || ring(s1, relay, 80, 0))
        .await
        .unwrap();
    only_acks(&got, &txns, "ringing");
    assert_eq!(txns.len(), 8, "a KEEPALIVE every tenth round");

    // The callee declines: removed; the caller's leg is untouched (no CLOSE, acks go on), and
    // the callee's token will never bind.
    api.remove_participant(remove(&s.session_id, "participant-1"))
        .await
        .unwrap();
    let s2 = sock.try_clone().unwrap();
    let (got, txns) = tokio::task::spawn_blocking(move || ring(s2, relay, 50, 1000))
        .await
        .unwrap();
    only_acks(&got, &txns, "declined");
    let refused = bind_udp(&s.legs[1].token, relay, "127.0.0.3:0").await;
    assert_eq!(
        refused.unwrap_err(),
        ClientError::Refused(ErrorCode::SessionClosed)
    );

    // Someone else picks up: added, bound, and only now does the caller hear anyone, and only
    // from the relay's address.
    let leg = api
        .add_participant(add(&s.session_id, "callee-2"))
        .await
        .unwrap()
        .into_inner()
        .leg
        .unwrap();
    let mut callee = Peer::join(&leg, "127.0.0.4", 7).await;
    callee.send(b"hi, it's me").await;
    let (n, from) = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 2048];
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        sock.recv_from(&mut buf)
    })
    .await
    .unwrap()
    .expect("the caller hears the callee once they answer");
    assert_eq!(from, relay);
    assert!(n > 12);
    c.shutdown().await.unwrap();
}
