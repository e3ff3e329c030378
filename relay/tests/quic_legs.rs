//! The relay's QUIC legs over real sockets, with no controller: tokens minted from the relay's
//! own key ring, a real quinn client. The core decides for QUIC as it does for UDP: a captured
//! UDP BIND binds nothing over QUIC, a KEEPALIVE after a revocation draws CLOSE and never an
//! ACK, and a leg ends at its first packet after its token expires, not at a later sweep. The
//! QUIC metrics count what these connections really did.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;
use veil_relay::RelayServer;
use veil_relay::config::{QuicSettings, Settings};
use veil_relay_core::token::{KeyId, Limits, SessionId, Ticket, Token};
use veil_relay_core::wire::{self, COOKIE_LEN, ErrorCode, RelayMessage};
use veil_relay_core::{KeyRing, Node};

struct Relay {
    udp: SocketAddr,
    quic: SocketAddr,
    ops: SocketAddr,
    fingerprint: [u8; 32],
    node: Arc<Node>,
    keys: KeyRing,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Relay {
    /// A relay on loopback whose tables sweep only every `sweep`: what a test sees before then
    /// was decided by the packet that drew it.
    async fn start(sweep: Duration) -> Self {
        let keys = KeyRing::from_keys(&[(1, rand_key())], 1);
        let mut s = Settings::local(keys.clone(), "relay-test", Vec::new());
        s.quic = Some(QuicSettings::local().unwrap());
        s.core.sweep_interval = sweep;
        let relay = RelayServer::load(s).await.unwrap();
        let (udp, quic) = (relay.udp_addr(), relay.public_quic_addr().unwrap());
        let ops = relay.ops_addr();
        let fingerprint = relay.quic_fingerprint().unwrap();
        let node = relay.node().clone();
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(relay.run(async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        Self {
            udp,
            quic,
            ops,
            fingerprint,
            node,
            keys,
            stop,
            task,
        }
    }

    fn token(&self, session: u64, leg: u8, ttl: Duration) -> Token {
        self.keys.mint(Ticket {
            key_id: KeyId(0),
            session: SessionId(session),
            leg,
            legs: 2,
            expires_unix_ms: veil_relay::unix_ms() + ttl.as_millis() as u64,
            limits: Limits::default(),
        })
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

fn rand_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = (std::process::id() as u8)
            .wrapping_mul(31)
            .wrapping_add(i as u8 * 7);
    }
    k
}

/// A QUIC connection to the relay, as a participant's client opens it (certificate pinned).
async fn connect(relay: &Relay, local: &str) -> quinn::Connection {
    let endpoint = quinn::Endpoint::client(local.parse().unwrap()).unwrap();
    let cfg = veil_client::quic::client_config(
        relay.fingerprint,
        Duration::from_millis(200),
        Duration::from_secs(5),
    )
    .unwrap();
    endpoint
        .connect_with(cfg, relay.quic, "veil-relay")
        .unwrap()
        .await
        .unwrap()
}

/// Writes `bind` on a new stream of `conn`; returns the stream and the relay's answer.
async fn bind_on(
    conn: &quinn::Connection,
    bind: &[u8],
) -> (quinn::SendStream, quinn::RecvStream, RelayAnswer) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bind).await.unwrap();
    let mut buf = [0u8; wire::BIND_OK_LEN];
    recv.read_exact(&mut buf[..wire::SHORT_LEN]).await.unwrap();
    let len = if buf[0] == wire::TYPE_BIND_OK {
        recv.read_exact(&mut buf[wire::SHORT_LEN..]).await.unwrap();
        wire::BIND_OK_LEN
    } else {
        wire::SHORT_LEN
    };
    let answer = match wire::parse_relay(&buf[..len]).unwrap() {
        RelayMessage::BindOk {
            idle_timeout_secs, ..
        } => RelayAnswer::BindOk(idle_timeout_secs),
        RelayMessage::Error { code, .. } => RelayAnswer::Error(code),
        other => panic!("unexpected answer {other:?}"),
    };
    (send, recv, answer)
}

#[derive(Debug, PartialEq, Eq)]
enum RelayAnswer {
    BindOk(u16),
    Error(u16),
}

/// A channel-bound BIND for `conn`, as the reference client makes it.
fn channel_bind(conn: &quinn::Connection, token: &Token) -> [u8; wire::BIND_LEN] {
    let mut x = [0u8; wire::EXPORTER_LEN];
    conn.export_keying_material(&mut x, wire::EXPORTER_LABEL, b"")
        .unwrap();
    wire::bind_channel(token, [7; 8], &x)
}

/// Reads the control stream until a CLOSE arrives; returns its code.
async fn close_code(recv: &mut quinn::RecvStream, within: Duration) -> Option<u16> {
    let mut buf = [0u8; wire::SHORT_LEN];
    tokio::time::timeout(within, recv.read_exact(&mut buf))
        .await
        .ok()?
        .ok()?;
    match wire::parse_relay(&buf) {
        Ok(RelayMessage::Close { code, .. }) => Some(code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_bind_from_the_wire_binds_nothing_over_quic_and_the_udp_leg_stays() {
    let relay = Relay::start(Duration::from_millis(250)).await;
    let token = relay.token(1, 0, Duration::from_secs(60));
    // The participant's own two rounds over UDP: exactly the bytes an eavesdropper captures.
    let sock = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let first = wire::bind(&token, [1; 8], None);
    sock.send_to(&first, relay.udp).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = sock.recv_from(&mut buf).await.unwrap();
    let Ok(RelayMessage::Challenge { cookie, .. }) = wire::parse_relay(&buf[..n]) else {
        panic!("no CHALLENGE");
    };
    let cookie: [u8; COOKIE_LEN] = cookie.try_into().unwrap();
    let second = wire::bind(&token, [2; 8], Some(&cookie));
    sock.send_to(&second, relay.udp).await.unwrap();
    let (n, _) = sock.recv_from(&mut buf).await.unwrap();
    assert!(matches!(
        wire::parse_relay(&buf[..n]),
        Ok(RelayMessage::BindOk {
            idle_timeout_secs: 30,
            ..
        })
    ));

    for captured in [first, second] {
        let conn = connect(&relay, "127.0.0.66:0").await;
        let (_, _, answer) = bind_on(&conn, &captured).await;
        assert_eq!(answer, RelayAnswer::Error(ErrorCode::Unauthorized as u16));
    }
    assert_eq!(relay.node.directory.legs(), 1, "only the UDP leg is bound");
    // And it is still served where it was.
    sock.send_to(&wire::keepalive([3; 8]), relay.udp)
        .await
        .unwrap();
    let (n, _) = sock.recv_from(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], wire::keepalive_ack([3; 8]).as_bytes());
    relay.stop().await;
}

/// Regression: QUIC acknowledged a KEEPALIVE from a revoked leg until its next sweep. Sweeps are
/// 30 s apart here, so only the KEEPALIVE itself can draw the CLOSE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_keepalive_after_a_release_draws_close_and_never_an_ack() {
    let relay = Relay::start(Duration::from_secs(30)).await;
    let token = relay.token(2, 0, Duration::from_secs(60));
    let conn = connect(&relay, "127.0.0.2:0").await;
    let (_send, mut recv, answer) = bind_on(&conn, &channel_bind(&conn, &token)).await;
    assert_eq!(
        answer,
        RelayAnswer::BindOk(30),
        "the idle timeout is the relay's own"
    );
    conn.send_datagram(wire::keepalive([1; 8]).to_vec().into())
        .unwrap();
    let ack = tokio::time::timeout(Duration::from_secs(2), conn.read_datagram())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&ack[..], wire::keepalive_ack([1; 8]).as_bytes());

    relay
        .node
        .revoke(SessionId(2), veil_relay::unix_ms() + 60_000);
    conn.send_datagram(wire::keepalive([2; 8]).to_vec().into())
        .unwrap();
    assert_eq!(
        close_code(&mut recv, Duration::from_secs(2)).await,
        Some(ErrorCode::SessionClosed as u16)
    );
    let late = tokio::time::timeout(Duration::from_millis(300), conn.read_datagram()).await;
    assert!(
        !matches!(late, Ok(Ok(ref d)) if d[0] == wire::TYPE_KEEPALIVE_ACK),
        "a revoked leg's KEEPALIVE was acknowledged"
    );
    relay.stop().await;
}

/// Regression: a QUIC leg whose token expired was ended only by the next sweep. Sweeps are 30 s
/// apart here: the first packet after expiry ends it, with CLOSE `EXPIRED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_leg_ends_at_its_first_packet_after_its_token_expires() {
    let relay = Relay::start(Duration::from_secs(30)).await;
    let token = relay.token(3, 0, Duration::from_millis(1_500));
    let conn = connect(&relay, "127.0.0.2:0").await;
    let (_send, mut recv, answer) = bind_on(&conn, &channel_bind(&conn, &token)).await;
    assert_eq!(answer, RelayAnswer::BindOk(30));
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let mut rtp = vec![0u8; 100];
    rtp[0] = 0x80;
    conn.send_datagram(rtp.into()).unwrap();
    assert_eq!(
        close_code(&mut recv, Duration::from_secs(2)).await,
        Some(ErrorCode::Expired as u16)
    );
    assert_eq!(relay.node.directory.legs(), 0);
    relay.stop().await;
}

/// The value of the sample `series` (name and labels, as exposed) on the relay's /metrics.
async fn metric(relay: &Relay, series: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(relay.ops).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("/metrics has no {series}"))
}

/// Waits until `series` reaches `want` (connection counters are published about every sweep).
async fn wait_metric(relay: &Relay, series: &str, want: f64) {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = metric(relay, series).await;
        if got >= want || std::time::Instant::now() > until {
            assert_eq!(got, want, "{series}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_connections_refusals_and_datagrams_are_counted() {
    let relay = Relay::start(Duration::from_millis(100)).await;
    for series in [
        "veil_relay_quic_connections",
        "veil_relay_quic_connections_accepted_total",
        "veil_relay_quic_handshake_failures_total",
        r#"veil_relay_quic_connections_refused_total{reason="bind_refused"}"#,
        r#"veil_relay_quic_datagrams_received_total"#,
    ] {
        assert_eq!(metric(&relay, series).await, 0.0, "{series} at start");
    }

    // A leg: five KEEPALIVEs in, five acknowledgements out, all as DATAGRAM frames.
    let token = relay.token(4, 0, Duration::from_secs(60));
    let conn = connect(&relay, "127.0.0.2:0").await;
    let (_send, _recv, answer) = bind_on(&conn, &channel_bind(&conn, &token)).await;
    assert_eq!(answer, RelayAnswer::BindOk(30));
    for i in 0..5u8 {
        conn.send_datagram(wire::keepalive([i; 8]).to_vec().into())
            .unwrap();
        tokio::time::timeout(Duration::from_secs(2), conn.read_datagram())
            .await
            .unwrap()
            .unwrap();
    }
    wait_metric(&relay, "veil_relay_quic_datagrams_received_total", 5.0).await;
    wait_metric(&relay, "veil_relay_quic_datagrams_sent_total", 5.0).await;
    assert_eq!(metric(&relay, "veil_relay_quic_connections").await, 1.0);
    assert_eq!(
        metric(&relay, "veil_relay_quic_connections_accepted_total").await,
        1.0
    );
    // Its first Initial came from an unproven address: answered with a Retry.
    assert_eq!(metric(&relay, "veil_relay_quic_retries_total").await, 1.0);

    // A BIND the relay refuses (a token for another leg count), and a stream without a BIND.
    let other = relay.keys.mint(Ticket {
        key_id: KeyId(0),
        session: SessionId(5),
        leg: 0,
        legs: 2,
        expires_unix_ms: veil_relay::unix_ms() - 1,
        limits: Limits::default(),
    });
    let refused = connect(&relay, "127.0.0.3:0").await;
    let (_, _, answer) = bind_on(&refused, &channel_bind(&refused, &other)).await;
    assert!(matches!(answer, RelayAnswer::Error(_)), "{answer:?}");
    let empty = connect(&relay, "127.0.0.4:0").await;
    let (mut send, _recv) = empty.open_bi().await.unwrap();
    send.write_all(&[0x55; 10]).await.unwrap();
    send.finish().unwrap();
    wait_metric(
        &relay,
        r#"veil_relay_quic_connections_refused_total{reason="bind_refused"}"#,
        1.0,
    )
    .await;
    wait_metric(
        &relay,
        r#"veil_relay_quic_connections_refused_total{reason="no_bind"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        metric(&relay, "veil_relay_quic_connections_accepted_total").await,
        3.0
    );

    // A client that rejects the relay's certificate (pinned to another fingerprint): the
    // handshake fails on the relay's side too.
    let endpoint = quinn::Endpoint::client("127.0.0.5:0".parse().unwrap()).unwrap();
    let cfg = veil_client::quic::client_config(
        [0xAB; 32],
        Duration::from_millis(200),
        Duration::from_secs(5),
    )
    .unwrap();
    let failed = endpoint
        .connect_with(cfg, relay.quic, "veil-relay")
        .unwrap()
        .await;
    assert!(failed.is_err(), "a wrong pin must fail the handshake");
    wait_metric(&relay, "veil_relay_quic_handshake_failures_total", 1.0).await;

    // Every connection gone: none open.
    conn.close(0u32.into(), b"done");
    refused.close(0u32.into(), b"done");
    empty.close(0u32.into(), b"done");
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while metric(&relay, "veil_relay_quic_connections").await > 0.0 {
        assert!(
            std::time::Instant::now() < until,
            "connections still counted open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop().await;
}
