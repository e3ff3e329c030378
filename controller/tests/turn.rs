//! TURN for WebRTC apps, end to end: a real cluster allocates a session, each leg's
//! `ice_servers` go to a WebRTC stack Veil did not write (aiortc, from PyPI, installed into
//! .venv by the test command; without it this test fails, never skips), and two peers make a
//! relay-only call through Veil's TURN: a data channel echoes every message and audio flows
//! both ways.

mod common;

use std::process::Command;

use common::*;
use veil_controller::dev::{Cluster, Options};
use veil_proto::v1 as pb;

fn python() -> std::path::PathBuf {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/test.sh, which installs aiortc into .venv",
        venv.display()
    );
    venv
}

/// A leg's `ice_servers` with only the URLs whose transport query is `transport` (aiortc uses
/// the first TURN URL it is given).
fn ice_servers_json(leg: &pb::Leg, transport: &str) -> serde_json::Value {
    let suffix = format!("?transport={transport}");
    serde_json::json!({
        "ice_servers": leg.ice_servers.iter().map(|s| serde_json::json!({
            "urls": s.urls.iter().filter(|u| u.starts_with("turn:") && u.ends_with(&suffix)).collect::<Vec<_>>(),
            "username": s.username,
            "credential": s.credential,
        })).collect::<Vec<_>>(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_peers_make_a_relay_only_call_through_veil_turn() {
    aiortc_call("udp").await;
}

/// The same with each peer given only its leg's TURN over TCP URLs: aioice reaches the relays
/// over TCP (RFC 8656 §12.5 framing), and the relays count the call as `turn-tcp`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_peers_make_a_relay_only_call_through_veil_turn_over_tcp() {
    aiortc_call("tcp").await;
}

async fn aiortc_call(transport: &str) {
    let c = Cluster::start(Options {
        relays: 2,
        ..Options::default()
    })
    .await
    .unwrap();
    let mut api = client(&c.controller_url).await;
    let s = allocate(&mut api, request("aiortc", 2)).await;
    // Each leg lists its primary and backup relays as TURN servers, with its own credentials.
    let relays: Vec<String> = c.relays.iter().map(|r| r.udp.to_string()).collect();
    for leg in &s.legs {
        assert_eq!(leg.ice_servers.len(), 2, "{leg:?}");
        for (server, relay) in leg.ice_servers.iter().zip(&leg.relays) {
            assert_eq!(
                server.urls[0],
                format!("turn:{}?transport=udp", relay.udp_address),
                "UDP first"
            );
            assert_eq!(server.urls.len(), 3, "UDP, TCP and TLS: {:?}", server.urls);
            assert!(relays.contains(&relay.udp_address));
        }
    }
    assert_ne!(
        s.legs[0].ice_servers[0].username,
        s.legs[1].ice_servers[0].username
    );

    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/aiortc_call.py");
    let legs = serde_json::json!([
        ice_servers_json(&s.legs[0], transport),
        ice_servers_json(&s.legs[1], transport)
    ]);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script)
            .args([
                "--legs",
                &legs.to_string(),
                "--messages",
                "20",
                "--timeout",
                "60",
            ])
            .output()
            .expect("run the aiortc call")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "aiortc call failed: {stdout}\n{stderr}"
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(r["echoed"], 20, "{r}");
    for side in ["caller", "callee"] {
        let pair = &r[side]["pair"];
        assert_eq!(
            (pair["local"].as_str(), pair["remote"].as_str()),
            (Some("relay"), Some("relay")),
            "{r}"
        );
        // The remote candidate is a relayed address on one of the session's relays: a
        // participant only ever learns relay addresses.
        let remote: std::net::SocketAddr = pair["remote_addr"].as_str().unwrap().parse().unwrap();
        assert!(c.relays.iter().any(|x| x.udp.ip() == remote.ip()), "{r}");
        assert!(
            r[side]["rtp_received"].as_u64().unwrap() > 20,
            "audio reached the {side}: {r}"
        );
    }
    // The relays counted the call as TURN over its transport: forwarded under "turn-udp" or
    // "turn-tcp", nothing forwarded as anything else, and no label names a session or an
    // address.
    let label = format!("transport=\"turn-{transport}\"");
    let mut turn = 0.0;
    for relay in &c.relays {
        let text = http_get(relay.metrics, "/metrics").await;
        for line in text
            .lines()
            .filter(|l| l.starts_with("veil_relay_forwarded_packets_total"))
        {
            let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            if line.contains(&label) {
                turn += v;
            } else {
                assert_eq!(v, 0.0, "{line}");
            }
        }
        assert!(
            !text.contains("127.0.0.1") && !text.contains("session="),
            "{text}"
        );
    }
    assert!(turn > 100.0, "{turn} datagrams relayed as TURN");
}
