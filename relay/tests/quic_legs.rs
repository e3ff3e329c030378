//! The relay's QUIC legs over real sockets, with no controller: tokens minted from the relay's
//! own key ring, a real quinn client. The core decides for QUIC as it does for UDP: a captured
//! UDP BIND binds nothing over QUIC, a KEEPALIVE after a revocation draws CLOSE and never an
//! ACK, and a leg ends at its first packet after its token expires, not at a later sweep.

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
        let fingerprint = relay.quic_fingerprint().unwrap();
        let node = relay.node().clone();
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(relay.run(async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        Self {
            udp,
            quic,
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
