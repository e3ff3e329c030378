//! Interop with a QUIC stack Veil did not write: an aioquic (Python) participant binds a leg on
//! the relay and exchanges RFC 9221 datagrams, through the relay, with a Rust participant on
//! UDP speaking real SRTP. The Python environment is set up by the test command
//! (scripts/test.sh installs aioquic into .venv); without it this test fails, never skips.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use veil_controller::dev::{Cluster, Options};
use veil_proto::v1 as pb;

fn python() -> std::path::PathBuf {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/test.sh, which installs aioquic into .venv",
        venv.display()
    );
    venv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aioquic_participant_exchanges_datagrams_with_a_udp_participant() {
    let c = Cluster::start(Options {
        relays: 1,
        ..Options::default()
    })
    .await
    .unwrap();
    let relay = c.relays[0].udp;
    let quic = c.relays[0].quic.unwrap();
    let mut api = client(&c.controller_url).await;
    let s = allocate(
        &mut api,
        request_with("interop", &[pb::Transport::Quic, pb::Transport::Udp]),
    )
    .await;
    assert_eq!(s.legs[0].transport, pb::Transport::Quic as i32);
    let mut bob = Peer::join(&s.legs[1], "127.0.0.3", 0xB0B).await;

    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/aioquic_client.py");
    let mut py = Command::new(python())
        .arg(script)
        .args([
            "--host",
            &quic.ip().to_string(),
            "--port",
            &quic.port().to_string(),
        ])
        .args(["--cert-sha256", &hex::encode(&s.relays[0].quic_cert_sha256)])
        .args(["--token", &hex::encode(&s.legs[0].token)])
        .args(["--echo", "50", "--send", "50", "--timeout", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the aioquic client");
    let stdout = py.stdout.take().unwrap();
    let (line_tx, mut line_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = line_tx.send(line);
        }
    });
    let first = tokio::time::timeout(Duration::from_secs(15), line_rx.recv())
        .await
        .expect("aioquic binds in time");
    assert_eq!(first.as_deref(), Some("BOUND"));

    // Bob sends real SRTP; aioquic echoes each datagram back unchanged, and sends its own.
    let mut sent = HashMap::new();
    for _ in 0..50 {
        let seq = bob.seq;
        sent.insert(seq, bob.send(format!("from bob {seq}").as_bytes()).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut mine = bob.rx_context(); // bob's own key: the echoes must still authenticate
    let (mut echoes, mut theirs) = (0, 0);
    while echoes < 50 || theirs < 50 {
        let got = tokio::time::timeout(Duration::from_secs(10), bob.leg.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("timed out with {echoes} echoes and {theirs} aioquic datagrams")
            })
            .unwrap();
        assert_eq!(got.from, relay, "everything comes from the relay");
        match ssrc_of(&got.data) {
            0xB0B => {
                let seq = seq_of(&got.data);
                assert_eq!(got.data, sent[&seq], "the echo is byte-identical");
                let plain = mine.decrypt_rtp(&got.data).expect("authenticates");
                assert_eq!(&plain[12..], format!("from bob {seq}").as_bytes());
                echoes += 1;
            }
            0xA10C_0DEC => {
                let seq = seq_of(&got.data);
                assert_eq!(
                    &got.data[12..],
                    format!("aioquic datagram {seq}").as_bytes()
                );
                theirs += 1;
            }
            other => panic!("datagram from unknown SSRC {other:#x}"),
        }
    }
    let status = tokio::task::spawn_blocking(move || py.wait())
        .await
        .unwrap()
        .unwrap();
    let mut summary = None;
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(2), line_rx.recv()).await {
        summary = Some(line);
    }
    assert!(
        status.success(),
        "aioquic client failed: {status:?}, {summary:?}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&summary.expect("a summary line")).unwrap();
    assert_eq!(summary["bound"], true);
    assert_eq!(summary["pinned"], true);
    assert_eq!(summary["echoed"], 50);
    c.shutdown().await.unwrap();
}
