//! TURN over TCP and TLS against a running relay, over real sockets: three participants of one
//! session, on TCP, UDP and TLS, allocate with the long-term credentials of their own legs and
//! relay to each other across transports (ChannelData padded on streams, Data indications
//! where the receiver has no channel). Then what an outsider tries: a captured TCP Allocate
//! replayed over UDP from the same address and port, and on a second TCP connection; a peer
//! outside the session (the relay's own media port); bytes that are not TURN on the stream;
//! and a closed connection, whose allocation must be gone at once. The metrics count it all
//! under `turn-tcp` and `turn-tls`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use veil_relay::RelayServer;
use veil_relay::config::{Settings, TurnStreamSettings};
use veil_relay_core::KeyRing;
use veil_relay_core::stun::{self, Builder, Kind, attr, method};
use veil_relay_core::token::{KeyId, Limits, SessionId, Ticket, Token};
use veil_relay_core::turn::relayed_port;
use veil_testkit::stun::{Credentials, channel_data, error_code, xor_addr as xor_attr};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const WAIT: Duration = Duration::from_secs(5);

struct Relay {
    udp: SocketAddr,
    tcp: SocketAddr,
    tls: SocketAddr,
    tls_cert: rustls_pki_types::CertificateDer<'static>,
    ops: SocketAddr,
    keys: KeyRing,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Relay {
    async fn start() -> Self {
        let mut key = [0u8; 32];
        key.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i as u8).wrapping_mul(13) ^ std::process::id() as u8);
        let keys = KeyRing::from_keys(&[(1, key)], 1);
        let mut s = Settings::local(keys.clone(), "relay-turn-streams", Vec::new());
        s.workers = 1;
        s.turn_streams = TurnStreamSettings::local().unwrap();
        let tls_cert = s.turn_streams.tls.as_ref().unwrap().1.chain[0].clone();
        let relay = RelayServer::load(s).await.unwrap();
        let udp = relay.udp_addr();
        let tcp = relay.public_turn_tcp_addr().unwrap();
        let tls = relay.public_turn_tls_addr().unwrap().parse().unwrap();
        let ops = relay.ops_addr();
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(relay.run(async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        Self {
            udp,
            tcp,
            tls,
            tls_cert,
            ops,
            keys,
            stop,
            task,
        }
    }

    fn token(&self, session: u64, leg: u8, legs: u8) -> Token {
        self.keys.mint(Ticket {
            key_id: KeyId(0),
            session: SessionId(session),
            leg,
            legs,
            expires_unix_ms: veil_relay::unix_ms() + 600_000,
            limits: Limits::default(),
        })
    }

    async fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.ops).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: relay\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// The value of the series `name{labels}` in a Prometheus text page (0 if absent).
fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// How a test client reaches the relay.
enum Wire {
    Udp(UdpSocket, SocketAddr),
    /// A TCP or TLS stream, and the bytes read past the last message.
    Stream(Box<dyn Stream>, Vec<u8>),
}

impl Wire {
    async fn udp(relay: SocketAddr) -> Self {
        Self::Udp(UdpSocket::bind("127.0.0.1:0").await.unwrap(), relay)
    }

    async fn tcp(relay: SocketAddr) -> Self {
        Self::tcp_from(relay).await.0
    }

    /// A TCP connection, and its local address.
    async fn tcp_from(relay: SocketAddr) -> (Self, SocketAddr) {
        let s = TcpStream::connect(relay).await.unwrap();
        let local = s.local_addr().unwrap();
        (Self::Stream(Box::new(s), Vec::new()), local)
    }

    async fn tls(relay: SocketAddr, cert: &rustls_pki_types::CertificateDer<'static>) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(relay).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("veil-relay").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        Self::Stream(Box::new(tls), Vec::new())
    }

    async fn send(&mut self, msg: &[u8]) {
        match self {
            Self::Udp(s, to) => {
                s.send_to(msg, *to).await.unwrap();
            }
            Self::Stream(s, _) => s.write_all(msg).await.unwrap(),
        }
    }

    /// The next message from the relay (a whole STUN message or ChannelData with its padding),
    /// or `None` if none comes within `WAIT` (or the relay closed the stream).
    async fn recv(&mut self) -> Option<Vec<u8>> {
        self.recv_within(WAIT).await
    }

    async fn recv_within(&mut self, wait: Duration) -> Option<Vec<u8>> {
        match self {
            Self::Udp(s, _) => {
                let mut buf = [0u8; 2048];
                let (n, _) = tokio::time::timeout(wait, s.recv_from(&mut buf))
                    .await
                    .ok()?
                    .unwrap();
                Some(buf[..n].to_vec())
            }
            Self::Stream(s, pending) => {
                let deadline = tokio::time::Instant::now() + wait;
                loop {
                    if let Some(len) = stun::frame_len(pending) {
                        let len = len.expect("the relay frames what it sends");
                        if pending.len() >= len {
                            return Some(pending.drain(..len).collect());
                        }
                    }
                    let mut buf = [0u8; 4096];
                    let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
                        .await
                        .ok()?
                        .ok()?;
                    if n == 0 {
                        return None;
                    }
                    pending.extend_from_slice(&buf[..n]);
                }
            }
        }
    }

    /// True once the relay has closed the stream (EOF or reset) within `WAIT`.
    async fn closed_by_relay(&mut self) -> bool {
        let Self::Stream(s, _) = self else {
            panic!("a UDP socket is never closed");
        };
        let mut buf = [0u8; 256];
        matches!(
            tokio::time::timeout(WAIT, s.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

/// A TURN client signing with its leg's long-term credentials, as WebRTC stacks do.
struct Client {
    wire: Wire,
    creds: Credentials,
    nonce: Vec<u8>,
    txn: u32,
}

impl Client {
    fn new(wire: Wire, token: &Token) -> Self {
        Self {
            wire,
            creds: Credentials::of(token),
            nonce: Vec::new(),
            txn: 0,
        }
    }

    fn next_txn(&mut self) -> [u8; 12] {
        self.txn += 1;
        let mut t = [0x33u8; 12];
        t[8..].copy_from_slice(&self.txn.to_be_bytes());
        t
    }

    fn request(&mut self, method: u16, attrs: impl FnOnce(Builder) -> Builder) -> Vec<u8> {
        let txn = self.next_txn();
        self.creds.sign(
            attrs(Builder::new(method, Kind::Request, &txn)),
            &self.nonce,
        )
    }

    /// Sends a request and returns its answer's error code (`None` for a success).
    async fn exchange(&mut self, req: &[u8]) -> (Option<u16>, Vec<u8>) {
        self.wire.send(req).await;
        let answer = self.wire.recv().await.expect("an answer");
        let m = stun::parse(&answer).expect("a STUN answer");
        assert_eq!(m.txn[..], req[8..20], "the answer to this request");
        if m.kind == Kind::Success {
            assert!(m.verify_integrity(&self.creds.key), "signed answer");
        }
        (error_code(&answer), answer)
    }

    /// Allocates as Chromium does (an unsigned Allocate, a 401, the signed one); returns the
    /// signed request (as captured on the wire) and the relayed address.
    async fn allocate(&mut self) -> (Vec<u8>, SocketAddr) {
        let first = Builder::new(method::ALLOCATE, Kind::Request, &self.next_txn())
            .u32(attr::REQUESTED_TRANSPORT, 17 << 24);
        let (code, answer) = self.exchange(first.as_bytes()).await;
        assert_eq!(code, Some(401));
        self.nonce = stun::parse(&answer).unwrap().nonce.unwrap().to_vec();
        let signed = self.request(method::ALLOCATE, |b| {
            b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
        });
        let (code, answer) = self.exchange(&signed).await;
        assert_eq!(code, None, "allocated");
        (
            signed,
            xor_attr(&answer, attr::XOR_RELAYED_ADDRESS).unwrap(),
        )
    }

    async fn permit(&mut self, peer: SocketAddr) -> Option<u16> {
        let req = self.request(method::CREATE_PERMISSION, |b| {
            b.xor_addr(attr::XOR_PEER_ADDRESS, peer)
        });
        self.exchange(&req).await.0
    }

    async fn channel(&mut self, ch: u16, peer: SocketAddr) -> Option<u16> {
        let req = self.request(method::CHANNEL_BIND, |b| {
            b.u32(attr::CHANNEL_NUMBER, u32::from(ch) << 16)
                .xor_addr(attr::XOR_PEER_ADDRESS, peer)
        });
        self.exchange(&req).await.0
    }

    fn send_indication(&mut self, peer: SocketAddr, payload: &[u8]) -> Vec<u8> {
        let txn = self.next_txn();
        let mut out = vec![0u8; 1600];
        let n = stun::write_data_indication(&mut out, &txn, peer, payload);
        out.truncate(n);
        out[1] = 0x16; // Send indication (0x0016): a Data indication with another method.
        out
    }
}

/// A DTLS-looking payload of `len` bytes (first byte 22, as a DTLS record's).
fn payload(len: usize, tag: u8) -> Vec<u8> {
    let mut p = vec![tag; len];
    p[0] = 22;
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_over_tcp_and_tls_relays_across_transports_and_refuses_what_an_outsider_tries() {
    let relay = Relay::start().await;
    let relayed = |leg: u8| SocketAddr::new(LOOPBACK, relayed_port(leg));
    let (wire, tcp_local) = Wire::tcp_from(relay.tcp).await;
    let mut tcp = Client::new(wire, &relay.token(7, 0, 3));
    let mut udp = Client::new(Wire::udp(relay.udp).await, &relay.token(7, 1, 3));
    let mut tls = Client::new(
        Wire::tls(relay.tls, &relay.tls_cert).await,
        &relay.token(7, 2, 3),
    );
    let (captured, at) = tcp.allocate().await;
    assert_eq!(
        at,
        relayed(0),
        "a relayed address names the leg, on any transport"
    );
    assert_eq!(udp.allocate().await.1, relayed(1));
    assert_eq!(tls.allocate().await.1, relayed(2));

    // TCP <-> UDP: channels on both sides. TCP's ChannelData (odd length, padded) reaches UDP
    // as ChannelData on UDP's channel; UDP's comes back padded on TCP's channel.
    assert_eq!(tcp.channel(0x4000, relayed(1)).await, None);
    assert_eq!(udp.channel(0x4abc, relayed(0)).await, None);
    let media = payload(101, 1);
    tcp.wire.send(&channel_data(0x4000, &media, true)).await;
    let got = udp.wire.recv().await.expect("relayed to UDP");
    assert_eq!(got[..4], [0x4a, 0xbc, 0, 101]);
    assert_eq!(got[4..105], media[..]);
    let back = payload(57, 2);
    udp.wire
        .send(&channel_data(0x4abc, &back, true)[..4 + 57])
        .await;
    let got = tcp.wire.recv().await.expect("relayed to TCP");
    assert_eq!(
        got,
        channel_data(0x4000, &back, true),
        "padded to 4 bytes on the stream"
    );

    // TLS -> TCP with a Send indication: TCP has no channel to TLS, so it gets a Data
    // indication from TLS's relayed address; and back as ChannelData to a Data indication.
    assert_eq!(tls.permit(relayed(0)).await, None);
    assert_eq!(tcp.permit(relayed(2)).await, None);
    let hello = payload(300, 3);
    let send = tls.send_indication(relayed(0), &hello);
    tls.wire.send(&send).await;
    let got = tcp.wire.recv().await.expect("relayed to TCP");
    let m = stun::parse(&got).unwrap();
    assert_eq!((m.method, m.kind), (method::DATA, Kind::Indication));
    assert_eq!(m.peers().next(), Some(relayed(2)));
    assert_eq!(m.data, Some(&hello[..]));
    assert_eq!(tcp.channel(0x4001, relayed(2)).await, None);
    tcp.wire.send(&channel_data(0x4001, &back, true)).await;
    let got = tls.wire.recv().await.expect("relayed to TLS");
    let m = stun::parse(&got).unwrap();
    assert_eq!(
        (m.peers().next(), m.data),
        (Some(relayed(0)), Some(&back[..]))
    );

    // The captured TCP Allocate, replayed over UDP from the very address and port the TCP
    // client used: the nonce is bound to the transport too, so it draws a fresh 401.
    let mut spoof = Wire::Udp(UdpSocket::bind(tcp_local).await.unwrap(), relay.udp);
    spoof.send(&captured).await;
    let answer = spoof.recv().await.expect("a challenge");
    assert_eq!(
        error_code(&answer),
        Some(401),
        "a replay over UDP is challenged"
    );
    // On a second TCP connection (another port): the same.
    let mut second = Wire::tcp(relay.tcp).await;
    second.send(&captured).await;
    let answer = second.recv().await.expect("a challenge");
    assert_eq!(
        error_code(&answer),
        Some(401),
        "a replay on another connection"
    );
    // A retransmission on the original connection gets the original answer, not 437.
    tcp.wire.send(&captured).await;
    let answer = tcp.wire.recv().await.unwrap();
    assert_eq!(stun::parse(&answer).unwrap().kind, Kind::Success);

    // A peer outside the session: the relay's own media port, 0.0.0.0, another session's
    // relayed address shape on another IP.
    for peer in [
        relay.udp,
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), relayed_port(1)),
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), relayed_port(1)),
        relayed(0),
    ] {
        assert_eq!(tcp.permit(peer).await, Some(403), "{peer}");
    }

    // Bytes that are not TURN: the stream cannot be framed, and the relay closes it.
    let mut junk = Wire::tcp(relay.tcp).await;
    junk.send(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n").await;
    assert!(
        junk.closed_by_relay().await,
        "closed on bytes that are not TURN"
    );

    // The TCP client hangs up: its allocation ends with the connection, so UDP's
    // permission toward it names nothing any more.
    drop(tcp);
    let mut gone = None;
    for _ in 0..50 {
        gone = udp.permit(relayed(0)).await;
        if gone == Some(403) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        gone,
        Some(403),
        "the closed connection's allocation is gone"
    );
    // Nothing reaches a closed connection's relayed address.
    udp.wire
        .send(&channel_data(0x4abc, &back, true)[..4 + 57])
        .await;

    // Connections add their counters into their transport's every 50 ms while busy, and at
    // every sweep while quiet: wait for the TLS connection's last ones.
    let mut page = relay.metrics().await;
    for _ in 0..40 {
        if metric(
            &page,
            r#"veil_relay_forwarded_packets_total{transport="turn-tls"}"#,
        ) >= 1.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        page = relay.metrics().await;
    }
    let m = |s: &str| metric(&page, s);
    assert!(m(r#"veil_relay_received_packets_total{transport="turn-tcp"}"#) >= 8.0);
    assert!(m(r#"veil_relay_forwarded_packets_total{transport="turn-tcp"}"#) >= 2.0);
    assert!(m(r#"veil_relay_forwarded_packets_total{transport="turn-tls"}"#) >= 1.0);
    assert!(m(r#"veil_relay_forwarded_packets_total{transport="turn-udp"}"#) >= 1.0);
    assert_eq!(m(r#"veil_relay_bound_legs{transport="turn-tcp"}"#), 0.0);
    assert_eq!(m(r#"veil_relay_bound_legs{transport="turn-tls"}"#), 1.0);
    assert_eq!(m(r#"veil_relay_bound_legs{transport="turn-udp"}"#), 1.0);
    assert_eq!(
        m(r#"veil_relay_turn_connections{transport="turn-tls"}"#),
        1.0
    );
    assert_eq!(
        m(r#"veil_relay_turn_connections_refused_total{reason="framing",transport="turn-tcp"}"#),
        1.0
    );
    assert!(
        m(r#"veil_relay_dropped_packets_total{reason="turn_forbidden_peer",transport="turn-tcp"}"#)
            >= 4.0
    );
    assert!(
        m(r#"veil_relay_dropped_packets_total{reason="turn_unauthorized",transport="turn-tcp"}"#)
            >= 2.0
    );
    drop((udp, tls, second, spoof));
    relay.stop().await;
}

/// A client that sends its ChannelData as one GSO send (UDP_SEGMENT): the relay receives the run
/// coalesced (GRO) and relays it whole to the one allocation it names, as one GSO burst with the
/// receiver's channel number in every datagram. Every datagram arrives, intact, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gso_burst_of_channel_data_arrives_whole_on_the_receivers_channel() {
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrIn, sendmsg};
    use std::os::fd::AsRawFd;
    let relay = Relay::start().await;
    let relayed = |leg: u8| SocketAddr::new(LOOPBACK, relayed_port(leg));
    let mut a = Client::new(Wire::udp(relay.udp).await, &relay.token(9, 0, 2));
    let mut b = Client::new(Wire::udp(relay.udp).await, &relay.token(9, 1, 2));
    a.allocate().await;
    b.allocate().await;
    assert_eq!(a.channel(0x4000, relayed(1)).await, None);
    assert_eq!(b.channel(0x4123, relayed(0)).await, None);
    const N: usize = 16;
    const LEN: usize = 160;
    // N ChannelData messages of 4 + LEN bytes back to back: one send, N datagrams on the wire.
    let mut burst = Vec::new();
    for i in 0..N {
        burst.extend_from_slice(&channel_data(0x4000, &payload(LEN, i as u8), true));
    }
    let Wire::Udp(sock, _) = &a.wire else {
        unreachable!()
    };
    let SocketAddr::V4(to) = relay.udp else {
        unreachable!()
    };
    let seg = (4 + LEN) as u16;
    // The first burst arrives as separate datagrams and makes the worker turn GRO on (a run of
    // equal datagrams from one source); the later ones arrive coalesced.
    for round in 0..3 {
        let sent = sendmsg(
            sock.as_raw_fd(),
            &[std::io::IoSlice::new(&burst)],
            &[ControlMessage::UdpGsoSegments(&seg)],
            MsgFlags::empty(),
            Some(&SockaddrIn::from(to)),
        )
        .unwrap();
        assert_eq!(sent, burst.len());
        for i in 0..N {
            let got = b.wire.recv().await.expect("every datagram of the burst");
            assert_eq!(
                got[..4],
                [0x41, 0x23, 0, LEN as u8],
                "round {round}, datagram {i}"
            );
            assert_eq!(
                got[4..],
                payload(LEN, i as u8)[..],
                "round {round}, datagram {i}, in order"
            );
        }
    }
    assert_eq!(b.wire.recv_within(Duration::from_millis(200)).await, None);
    relay.stop().await;
}
