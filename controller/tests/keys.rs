//! Keys and revocation (issue 8): a key rotation through SIGHUP, with real processes and calls in
//! flight, loses no packet; a bad key file on SIGHUP is ignored; and a release stops a session's
//! forwarding on every relay within a second, with its legs bound on different relays.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use veil_client::{ClientError, LegConfig};
use veil_controller::dev::{Cluster, Options};
use veil_proto::v1 as pb;
use veil_relay_core::wire::ErrorCode;
use veil_relay_core::{KeyId, KeyRing, Token};

const RELOADED: &str = "key ring reloaded";
const RELOAD_FAILED: &str = "key ring reload failed";

/// A key ring file in the format the binaries read.
fn ring(keys: &[(u16, [u8; 32])], signing: u16) -> String {
    KeyRing::from_keys(keys, signing).to_file_format()
}

/// Whether our child `pid` is still running (not exited, not a zombie waiting to be reaped).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

async fn wait_relays_up(url: &str, n: usize) {
    let until = Instant::now() + Duration::from_secs(15);
    while relays_up(url).await < n {
        assert!(Instant::now() < until, "relays did not attach");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_through_sighup_drops_no_packet() {
    let (old, new) = (
        (1u16, rand::random::<[u8; 32]>()),
        (2u16, rand::random::<[u8; 32]>()),
    );
    let dir = std::env::temp_dir().join(format!("veil-rotation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The controller and the relays each read their own copy, as separate hosts would.
    let (ckf, rkf) = (dir.join("controller.keys"), dir.join("relay.keys"));
    std::fs::write(&ckf, ring(&[old], old.0)).unwrap();
    std::fs::write(&rkf, ring(&[old], old.0)).unwrap();

    let controller = ControllerProcess::start(&ckf);
    let relays: Vec<RelayProcess> = (0..2)
        .map(|i| {
            RelayProcess::start(
                &format!("relay-{i}"),
                &format!("zone-{i}"),
                &rkf,
                std::slice::from_ref(&controller.url),
                &[],
            )
        })
        .collect();
    wait_relays_up(&controller.url, 2).await;
    let nodes = || {
        let mut logs: Vec<Box<dyn Fn() -> String + '_>> = vec![Box::new(|| controller.log())];
        for r in &relays {
            logs.push(Box::new(move || r.log()));
        }
        logs
    };
    let hup_all = || {
        controller.signal(Signal::SIGHUP);
        for r in &relays {
            r.signal(Signal::SIGHUP);
        }
    };

    let mut api = client(&controller.url).await;
    let old_call = allocate(&mut api, request("old-call", 2)).await;
    let old_token = Token::from_bytes(&old_call.legs[0].token).unwrap();
    assert_eq!(old_token.claims().key_id, KeyId(old.0));
    let old_relay: SocketAddr = old_call.relays[0].udp_address.parse().unwrap();
    let old_chat = Chat::start(
        vec![
            Peer::join(&old_call.legs[0], "127.0.0.2", 1).await,
            Peer::join(&old_call.legs[1], "127.0.0.3", 2).await,
        ],
        Duration::from_millis(10),
        &[old_relay],
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A botched edit: every node logs it, keeps its ring, and keeps running.
    std::fs::write(&ckf, "1 not-a-key signing\n").unwrap();
    std::fs::write(&rkf, "# truncated by a bad copy\n").unwrap();
    hup_all();
    for log in nodes() {
        wait_log(log, RELOAD_FAILED, 1).await;
    }
    assert!(
        running(controller.child.id()),
        "the controller survived a bad key file"
    );
    for r in &relays {
        assert!(running(r.child.id()), "the relay survived a bad key file");
    }
    let still = allocate(&mut api, request("after-bad-file", 2)).await;
    assert_eq!(
        Token::from_bytes(&still.legs[0].token)
            .unwrap()
            .claims()
            .key_id,
        KeyId(old.0),
        "the controller still signs with the ring it had"
    );

    // 1. The new key everywhere, not signing.
    std::fs::write(&ckf, ring(&[old, new], old.0)).unwrap();
    std::fs::write(&rkf, ring(&[old, new], old.0)).unwrap();
    hup_all();
    for log in nodes() {
        wait_log(log, RELOADED, 1).await;
    }

    // 2. Signing moves to the new key on the controller.
    std::fs::write(&ckf, ring(&[old, new], new.0)).unwrap();
    controller.signal(Signal::SIGHUP);
    wait_log(|| controller.log(), RELOADED, 2).await;

    // 3. New calls get new-key tokens, and bind on either relay, while the old call goes on.
    let new_call = allocate(&mut api, request("new-call", 2)).await;
    for leg in &new_call.legs {
        assert_eq!(
            Token::from_bytes(&leg.token).unwrap().claims().key_id,
            KeyId(new.0),
            "new tokens use the new signing key"
        );
    }
    let new_relay: SocketAddr = new_call.relays[0].udp_address.parse().unwrap();
    let new_chat = Chat::start(
        vec![
            Peer::join(&new_call.legs[0], "127.0.0.4", 3).await,
            Peer::join(&new_call.legs[1], "127.0.0.5", 4).await,
        ],
        Duration::from_millis(10),
        &[new_relay],
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 4. The old key is retired everywhere.
    std::fs::write(&ckf, ring(&[new], new.0)).unwrap();
    std::fs::write(&rkf, ring(&[new], new.0)).unwrap();
    hup_all();
    wait_log(|| controller.log(), RELOADED, 3).await;
    for r in &relays {
        wait_log(|| r.log(), RELOADED, 2).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // An old-key token no longer binds, on any relay: not even the old call's own, from a new
    // address (which would otherwise move its leg).
    for relay in [&old_call.relays[0], &old_call.relays[1]] {
        let again = bind_udp(
            &old_call.legs[0].token,
            relay.udp_address.parse().unwrap(),
            "127.0.0.9:0",
        )
        .await;
        assert_eq!(
            again.unwrap_err(),
            ClientError::Refused(ErrorCode::Unauthorized),
            "{}",
            relay.node_id
        );
    }
    // And calls still start.
    api.allocate_session(request("after-retirement", 2))
        .await
        .unwrap();

    // Not one packet lost, by either call, across the whole procedure; nothing foreign.
    let mut report = Vec::new();
    for (name, chat) in [("old", old_chat), ("new", new_chat)] {
        let heard = chat.stop().await;
        for h in &heard {
            assert_eq!(h.bad, 0, "{name} call: nothing foreign");
        }
        let (due, lost) = chat_loss(&heard);
        report.push(format!("{name} call {due} packets due, {lost} lost"));
        assert_eq!(lost, 0, "{name} call lost {lost} of {due} packets");
        assert!(due > 100, "{name} call ran ({due} packets)");
    }
    eprintln!("key rotation with calls in flight: {}", report.join("; "));
    for r in &relays {
        assert!(!r.log().contains("panicked"), "{}", r.log());
    }
    drop(relays);
    drop(controller);
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_stops_forwarding_on_every_relay_within_a_second() {
    let c = Cluster::start(Options {
        relays: 2,
        workers_per_relay: 1,
        ..Options::default()
    })
    .await
    .unwrap();
    let mut api = client(&c.controller_url).await;
    let s = allocate(&mut api, request("split-call", 4)).await;
    let relay_addr = |i: usize| -> SocketAddr { s.relays[i].udp_address.parse().unwrap() };
    // Legs 0 and 1 bind on the primary, legs 2 and 3 on the backup: tokens are good on any
    // relay, so one session is served by two relays at once.
    let mut peers = Vec::new();
    for (j, leg) in s.legs.iter().enumerate() {
        let mut cfg = LegConfig::from_pb(leg, format!("127.0.2.{}:0", 2 + j).parse().unwrap());
        cfg.transport = veil_client::Transport::Udp;
        if j >= 2 {
            cfg.relays.reverse();
        }
        peers.push(Peer::join_config(cfg, 10 + j as u32).await);
    }
    assert_eq!(
        peers
            .iter()
            .map(|p| p.leg.relay_index())
            .collect::<Vec<_>>(),
        [0, 0, 0, 0],
        "each leg bound on the first relay it was given"
    );
    let on_backup = peers.split_off(2);
    let talk = [
        Talk::start(peers, Duration::from_millis(5)),
        Talk::start(on_backup, Duration::from_millis(5)),
    ];
    tokio::time::sleep(Duration::from_millis(400)).await;

    let session_id = veil_proto::parse_session_id(&s.session_id).unwrap();
    let node_of = |name: &str| {
        let i = c.relays.iter().position(|r| r.node_id == name).unwrap();
        c.relay_nodes[i].clone()
    };
    let nodes = [node_of(&s.relays[0].node_id), node_of(&s.relays[1].node_id)];
    let released_at = Instant::now();
    api.release_session(pb::ReleaseSessionRequest {
        session_id: s.session_id.clone(),
    })
    .await
    .unwrap();
    // When each relay had the revocation in force.
    let mut applied = [None; 2];
    let until = released_at + Duration::from_secs(2);
    while applied.iter().any(Option::is_none) && Instant::now() < until {
        for (a, n) in applied.iter_mut().zip(&nodes) {
            if a.is_none()
                && n.directory
                    .is_revoked(veil_relay_core::SessionId(session_id))
            {
                *a = Some(released_at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut report = Vec::new();
    for (i, t) in talk.into_iter().enumerate() {
        let got = t.stop().await;
        let before: usize = got
            .iter()
            .map(|(_, a)| a.iter().filter(|(at, _)| *at < released_at).count())
            .sum();
        assert!(before > 50, "relay {i}: media flowed before the release");
        let last = got
            .iter()
            .flat_map(|(_, a)| a.iter().map(|(at, _)| *at))
            .max()
            .unwrap();
        let stopped_after = last.saturating_duration_since(released_at);
        let applied = applied[i].expect("the revocation reached the relay");
        report.push(format!(
            "{} ({}): revocation in force after {applied:.1?}, last packet delivered {stopped_after:.1?} after the release",
            s.relays[i].node_id,
            relay_addr(i)
        ));
        assert!(
            stopped_after < Duration::from_secs(1) && applied < Duration::from_secs(1),
            "relay {i} kept forwarding {stopped_after:?} after the release"
        );
    }
    eprintln!(
        "release of a session split over two relays:\n  {}",
        report.join("\n  ")
    );
    // Its tokens no longer bind anywhere.
    for i in 0..2 {
        let again = bind_udp(&s.legs[0].token, relay_addr(i), "127.0.2.20:0").await;
        assert_eq!(
            again.unwrap_err(),
            ClientError::Refused(ErrorCode::SessionClosed)
        );
    }
    c.shutdown().await.unwrap();
}
