//! An eavesdropper who captured a participant's UDP BIND on the wire replays it over QUIC: the
//! first round, the second round (with the cookie), on the session's primary relay, its backup,
//! and a relay outside the session. Nothing binds, and the participant's call loses nothing.
//! Also: QUIC legs are served by the same core as UDP legs (KEEPALIVE after a revocation,
//! expiry), and a QUIC BIND cannot be replayed on another connection.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use veil_client::{LegConfig, Transport};
use veil_controller::dev::{Cluster, Options};
use veil_proto::v1 as pb;
use veil_relay_core::wire::{self, ErrorCode, RelayMessage};

/// An on-path observer: a UDP forwarder between one client and one relay that keeps a copy of
/// every BIND the client sends.
struct Tap {
    addr: SocketAddr,
    binds: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Tap {
    async fn start(relay: SocketAddr) -> Self {
        let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.9:0").await.unwrap());
        let addr = sock.local_addr().unwrap();
        let binds = Arc::new(Mutex::new(Vec::new()));
        let seen = binds.clone();
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 2048];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                if from == relay {
                    if let Some(c) = client {
                        let _ = sock.send_to(&buf[..n], c).await;
                    }
                } else {
                    client = Some(from);
                    if buf[0] == wire::TYPE_BIND {
                        seen.lock().unwrap().push(buf[..n].to_vec());
                    }
                    let _ = sock.send_to(&buf[..n], relay).await;
                }
            }
        });
        Self { addr, binds, task }
    }
}

/// The attacker checks no certificate: it only wants a connection to write the bytes on.
#[derive(Debug)]
struct AcceptAny;

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn attacker_config() -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
    tls.alpn_protocols = vec![wire::QUIC_ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}

/// Opens a QUIC connection from the attacker's own address, writes `bytes` on its first stream
/// and returns what the relay answered there (`None`: nothing, the connection closed).
async fn write_on_quic(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    bytes: &[u8],
) -> (quinn::Connection, Option<Vec<u8>>) {
    let conn = endpoint
        .connect_with(attacker_config(), relay, "veil-relay")
        .unwrap()
        .await
        .expect("the handshake itself is open to anyone");
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let mut answer = vec![0u8; wire::SHORT_LEN];
    let got = tokio::time::timeout(Duration::from_secs(3), recv.read_exact(&mut answer)).await;
    let answer = matches!(got, Ok(Ok(()))).then_some(answer);
    (conn, answer)
}

fn quic_of(c: &Cluster, udp: SocketAddr) -> SocketAddr {
    c.relays.iter().find(|r| r.udp == udp).unwrap().quic.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_bind_captured_on_the_wire_binds_nothing_over_quic_anywhere() {
    let c = Cluster::start(Options {
        relays: 3,
        ..Options::default()
    })
    .await
    .unwrap();
    let mut api = client(&c.controller_url).await;
    let s = allocate(&mut api, request_with("replayed", &[pb::Transport::Udp; 2])).await;
    let relays = relays_of(&s.legs[0]);
    let (primary, backup) = (relays[0], relays[1]);
    let outsider = c
        .relays
        .iter()
        .map(|r| r.udp)
        .find(|a| !relays.contains(a))
        .unwrap();

    // The victim binds its leg on the primary through the tap, as a participant on a network the
    // attacker watches.
    let tap = Tap::start(primary).await;
    let mut cfg = LegConfig::from_pb(&s.legs[0], "127.0.0.2:0".parse().unwrap());
    assert_eq!(cfg.transport, Transport::Udp);
    cfg.relays[0].udp = tap.addr;
    let victim = Peer::join_config(cfg, 1).await;
    let bob = Peer::join(&s.legs[1], "127.0.0.3", 2).await;
    let captured = tap.binds.lock().unwrap().clone();
    assert_eq!(captured.len(), 2, "the tap saw both rounds of the bind");
    assert!(captured.iter().all(|b| b.len() == wire::BIND_LEN));
    assert_ne!(captured[0], captured[1], "the second round carries the cookie");

    let chat = Chat::start(
        vec![victim, bob],
        Duration::from_millis(20),
        &[tap.addr, primary],
    );
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The attacker writes the captured bytes, unchanged, on QUIC connections of its own, again
    // and again while the call goes on.
    let endpoint = quinn::Endpoint::client("127.0.0.66:0".parse().unwrap()).unwrap();
    let mut refused = 0;
    for round in 0..3 {
        for relay in [primary, backup, outsider] {
            for bind in &captured {
                let (conn, answer) = write_on_quic(&endpoint, quic_of(&c, relay), bind).await;
                let answer = answer.expect("the relay answers a BIND on the stream");
                match wire::parse_relay(&answer) {
                    Ok(RelayMessage::Error { code, .. }) => {
                        assert_eq!(code, ErrorCode::Unauthorized as u16, "round {round}")
                    }
                    other => panic!("a replayed UDP BIND was answered {other:?}"),
                }
                refused += 1;
                // No media reaches the attacker's connection.
                let media =
                    tokio::time::timeout(Duration::from_millis(50), conn.read_datagram()).await;
                assert!(
                    !matches!(media, Ok(Ok(_))),
                    "the attacker received a datagram"
                );
                conn.close(0u32.into(), b"");
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(refused, 18);

    let heard = chat.stop().await;
    let (due, lost) = chat_loss(&heard);
    assert!(due > 50, "the call ran ({due} packets due)");
    assert_eq!(lost, 0, "the victim's call lost {lost} of {due} packets");
    assert!(heard.iter().all(|h| h.bad == 0));

    // Counted, as the binding proof of the wrong transport, on every relay it was tried on.
    for relay in [primary, backup, outsider] {
        let ops = c.relays.iter().find(|r| r.udp == relay).unwrap().metrics;
        let text = http_get(ops, "/metrics").await;
        assert_eq!(
            metric(
                &text,
                "veil_relay_dropped_packets_total{reason=\"bad_binding\",transport=\"quic\"}"
            ),
            6,
            "{text}"
        );
    }
    tap.task.abort();
    c.shutdown().await.unwrap();
}
