//! The QUIC transport of a leg: a connection per relay (ALPN `veil/2`, the relay's certificate
//! pinned by its SHA-256), a channel-bound BIND on the first bidirectional stream (its tag covers
//! the connection's TLS exporter value, so it binds on this connection only), media as QUIC
//! datagrams, KEEPALIVEs as the relay's idle timeout requires, answers to the relay's PROBEs
//! after a migration, and failover when the connection dies (its idle timeout is the client's
//! `dead_after`, with QUIC keepalives every `keepalive_interval`).
//!
//! With hot standby ([`crate::Standby`]) the leg holds a second connection, bound with the same
//! token on the next relay of the session from the same socket, kept alive and carrying none of
//! this participant's media; when the current connection dies (QUIC's idle timeout, which
//! quinn never lets fall under three probe timeouts of the path's measured round trip) or its
//! relay drains or loses the leg, media goes over the standby connection at once, and media
//! arriving over the standby moves the leg there too (after [`crate::Standby::hold`]), as on
//! UDP legs.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use veil_protocol::token::Token;
use veil_protocol::wire::{self, Class, ErrorCode, RelayMessage};

use crate::{ClientError, LegConfig, LegStatus, Link};

/// The ALPN protocol id of Veil over QUIC.
pub const ALPN: &[u8] = wire::QUIC_ALPN;

/// Accepts exactly one server certificate: the one whose SHA-256 the controller handed out.
/// No CA is involved; signatures are still verified, so the server must hold the key.
#[derive(Debug)]
pub struct Pinned {
    sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    /// Pins `sha256`.
    pub fn new(sha256: [u8; 32]) -> Self {
        Self {
            sha256,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        // Not secret: a fingerprint comparison need not be constant-time.
        if got == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A quinn client configuration for a relay with certificate fingerprint `sha256`.
pub fn client_config(
    sha256: [u8; 32],
    keepalive: Duration,
    idle: Duration,
) -> Result<quinn::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Socket(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned::new(sha256)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| ClientError::Socket(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(keepalive))
        .max_idle_timeout(Some(
            idle.try_into()
                .map_err(|_| ClientError::Socket("idle timeout out of range".into()))?,
        ))
        .datagram_receive_buffer_size(Some(1 << 20))
        .datagram_send_buffer_size(1 << 20);
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

type Slot = Arc<RwLock<Option<quinn::Connection>>>;

/// Binds the local endpoint and starts the driver task.
pub(crate) fn start(
    config: LegConfig,
    token: Token,
    link: Link,
) -> Result<(Slot, quinn::Endpoint, tokio::task::JoinHandle<()>), ClientError> {
    // The receive buffer the UDP legs ask for (the kernel default is a fifth of it).
    let socket = {
        use socket2::{Domain, Protocol, Socket, Type};
        let addr = config.local_addr;
        let bind = || -> std::io::Result<std::net::UdpSocket> {
            let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            let _ = socket.set_recv_buffer_size(crate::udp::RECV_BUFFER);
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            Ok(socket.into())
        };
        bind().map_err(|e| ClientError::Socket(e.to_string()))?
    };
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| ClientError::Socket(e.to_string()))?;
    let local = endpoint
        .local_addr()
        .map_err(|e| ClientError::Socket(e.to_string()))?;
    *link
        .shared
        .local_addr
        .write()
        .unwrap_or_else(|e| e.into_inner()) = local;
    let slot: Slot = Arc::new(RwLock::new(None));
    let driver = Driver {
        endpoint: endpoint.clone(),
        slot: slot.clone(),
        link,
        token,
        config,
    };
    Ok((slot, endpoint, tokio::spawn(driver.run())))
}

struct Driver {
    endpoint: quinn::Endpoint,
    slot: Slot,
    link: Link,
    token: Token,
    config: LegConfig,
}

/// Why a bind attempt failed.
enum BindFailure {
    /// For good.
    Refused(ErrorCode),
    /// Try the next relay.
    Next,
}

/// Why a bound connection ended.
enum End {
    /// Move to the next relay.
    Failover,
    /// For good.
    Over(ClientError),
    /// The app dropped the leg.
    Gone,
}

/// A connection bound on one relay.
struct Bound {
    relay: usize,
    conn: quinn::Connection,
    control: quinn::RecvStream,
    /// The relay's idle timeout for the leg.
    idle: Duration,
    /// The CLOSE being read from the control stream.
    close: Vec<u8>,
    control_open: bool,
    last_rx: Instant,
    last_keepalive: Instant,
}

impl Bound {
    fn new(
        relay: usize,
        (conn, control, idle): (quinn::Connection, quinn::RecvStream, Duration),
    ) -> Self {
        let now = Instant::now();
        Self {
            relay,
            conn,
            control,
            idle,
            close: Vec::new(),
            control_open: true,
            last_rx: now,
            last_keepalive: now,
        }
    }

    /// A KEEPALIVE when the relay's idle timeout needs one: after `keepalive` without anything
    /// from the relay, and at least every third of its idle timeout.
    fn keepalive(&mut self, keepalive: Duration, now: Instant) {
        if now.duration_since(self.last_rx) >= keepalive
            || now.duration_since(self.last_keepalive) >= self.idle / 3
        {
            self.last_keepalive = now;
            let ka = wire::keepalive(rand::random());
            let _ = self.conn.send_datagram(bytes::Bytes::copy_from_slice(&ka));
        }
    }

    /// Control bytes read from the stream: the CLOSE they complete for `session`, if any.
    fn on_control(&mut self, bytes: &[u8], session: u64) -> Option<Option<ErrorCode>> {
        self.close.extend_from_slice(bytes);
        if self.close.len() < wire::SHORT_LEN {
            return None;
        }
        let close = match wire::parse_relay(&self.close[..wire::SHORT_LEN]) {
            Ok(RelayMessage::Close { code, session: s }) if s == session => {
                Some(ErrorCode::from_u16(code))
            }
            _ => None,
        };
        self.close.clear();
        close
    }
}

/// What a datagram from a relay was.
enum Datagram {
    Media,
    /// The relay lost the leg (a KEEPALIVE answered NOT_BOUND).
    NotBound,
    Other,
}

impl Driver {
    async fn run(self) {
        if let Some(standby) = self.config.standby {
            return self.run_hot(standby).await;
        }
        let (mut start, mut ever_bound) = (0, false);
        loop {
            let Some(mut b) = self.bind_active(start, ever_bound).await else {
                return;
            };
            ever_bound = true;
            let end = self.serve(&mut b).await;
            *self.slot.write().unwrap_or_else(|e| e.into_inner()) = None;
            match end {
                End::Failover => {}
                End::Over(e) => return self.link.end(e),
                End::Gone => return,
            }
            self.link.shared.counters.failovers.fetch_add(1, Relaxed);
            start = b.relay + 1;
        }
    }

    async fn connect_and_bind(
        &self,
        i: usize,
    ) -> Result<(quinn::Connection, quinn::RecvStream, Duration), BindFailure> {
        self.connect_and_bind_with(i, self.config.keepalive_interval, self.config.dead_after)
            .await
    }

    async fn connect_and_bind_with(
        &self,
        i: usize,
        keepalive: Duration,
        dead_after: Duration,
    ) -> Result<(quinn::Connection, quinn::RecvStream, Duration), BindFailure> {
        let r = &self.config.relays[i];
        let (Some(addr), Some(pin)) = (r.quic, r.quic_cert_sha256) else {
            return Err(BindFailure::Next);
        };
        let cfg = client_config(pin, keepalive, dead_after).map_err(|_| BindFailure::Next)?;
        let attempt = async {
            let conn = self
                .endpoint
                .connect_with(cfg, addr, "veil-relay")
                .ok()?
                .await
                .ok()?;
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            let mut exporter = [0u8; wire::EXPORTER_LEN];
            conn.export_keying_material(&mut exporter, wire::EXPORTER_LABEL, b"")
                .ok()?;
            send.write_all(&wire::bind_channel(&self.token, rand::random(), &exporter))
                .await
                .ok()?;
            // BIND_OK is 16 bytes, ERROR 12: read the common 12, then the rest of a BIND_OK.
            let mut buf = [0u8; wire::BIND_OK_LEN];
            recv.read_exact(&mut buf[..wire::SHORT_LEN]).await.ok()?;
            let len = if buf[0] == wire::TYPE_BIND_OK {
                recv.read_exact(&mut buf[wire::SHORT_LEN..]).await.ok()?;
                wire::BIND_OK_LEN
            } else {
                wire::SHORT_LEN
            };
            let answer = match wire::parse_relay(&buf[..len]).ok()? {
                RelayMessage::BindOk {
                    idle_timeout_secs, ..
                } => Ok(Duration::from_secs(u64::from(idle_timeout_secs.max(1)))),
                RelayMessage::Error { code, .. } => Err(code),
                _ => return None,
            };
            Some((conn, recv, answer))
        };
        match tokio::time::timeout(self.config.bind_timeout, attempt).await {
            Ok(Some((conn, recv, Ok(idle)))) => Ok((conn, recv, idle)),
            Ok(Some((_, _, Err(code)))) => match ErrorCode::from_u16(code) {
                Some(
                    c @ (ErrorCode::Unauthorized | ErrorCode::Expired | ErrorCode::SessionClosed),
                ) => Err(BindFailure::Refused(c)),
                _ => Err(BindFailure::Next),
            },
            Ok(None) | Err(_) => Err(BindFailure::Next),
        }
    }

    /// Carries the leg over `b` until its connection ends.
    async fn serve(&self, b: &mut Bound) -> End {
        let session = self.token.claims().session.0;
        let mut buf = [0u8; 64];
        let mut tick = tokio::time::interval(self.config.keepalive_interval);
        loop {
            tokio::select! {
                _ = tick.tick() => b.keepalive(self.config.keepalive_interval, Instant::now()),
                d = b.conn.read_datagram() => match d {
                    Ok(pkt) => {
                        if let Datagram::NotBound = self.on_datagram(b, pkt) {
                            // A KEEPALIVE answered NOT_BOUND: the relay lost the leg.
                            b.conn.close(0u32.into(), b"not bound");
                            return End::Failover;
                        }
                    }
                    // Idle timeout (relay dead), or closed by the relay.
                    Err(_) => return End::Failover,
                },
                r = b.control.read(&mut buf), if b.control_open => match r {
                    Ok(Some(n)) => match b.on_control(&buf[..n], session) {
                        None => {}
                        Some(Some(ErrorCode::Draining)) => return End::Failover,
                        Some(c) => {
                            return End::Over(ClientError::Closed(
                                c.unwrap_or(ErrorCode::SessionClosed),
                            ));
                        }
                    },
                    Ok(None) | Err(_) => b.control_open = false,
                },
                _ = self.link.media.closed() => {
                    b.conn.close(0u32.into(), b"leg dropped");
                    return End::Gone;
                }
            }
        }
    }
}

impl Driver {
    /// The next relay after `after` that is not `active`, for a standby.
    fn standby_candidate(&self, after: usize, active: usize) -> Option<usize> {
        let n = self.config.relays.len();
        (1..=n).map(|k| (after + k) % n).find(|&r| r != active)
    }

    /// Binds as the current relay on `start`, or the relays after it; `None` when the leg
    /// ended (refused for good, or no relay ever took it).
    async fn bind_active(&self, start: usize, ever_bound: bool) -> Option<Bound> {
        let n = self.config.relays.len();
        let mut relay = start;
        loop {
            let r = &self.config.relays[relay % n];
            self.link
                .shared
                .set_relay(relay % n, r.quic.unwrap_or(r.udp));
            self.link
                .status
                .send_replace(LegStatus::Binding { relay: relay % n });
            match self.connect_and_bind(relay % n).await {
                Ok(b) => {
                    let b = Bound::new(relay % n, b);
                    self.link.shared.counters.binds.fetch_add(1, Relaxed);
                    self.make_active(&b);
                    return Some(b);
                }
                Err(BindFailure::Refused(code)) => {
                    self.link.end(ClientError::Refused(code));
                    return None;
                }
                Err(BindFailure::Next) => {
                    if !ever_bound && relay + 1 >= start + n {
                        self.link.end(ClientError::Unreachable);
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            self.link.shared.counters.failovers.fetch_add(1, Relaxed);
            relay += 1;
        }
    }

    /// Media goes over `b` from now on.
    fn make_active(&self, b: &Bound) {
        *self.slot.write().unwrap_or_else(|e| e.into_inner()) = Some(b.conn.clone());
        let r = &self.config.relays[b.relay];
        self.link.shared.set_relay(b.relay, r.quic.unwrap_or(r.udp));
        self.link
            .status
            .send_replace(LegStatus::Bound { relay: b.relay });
    }

    fn publish_standby(&self, standby: Option<&Bound>) {
        let i = standby.map_or(usize::MAX, |b| b.relay);
        self.link.shared.standby_index.store(i, Relaxed);
    }

    /// Handles a datagram from the relay of `b`.
    fn on_datagram(&self, b: &mut Bound, pkt: bytes::Bytes) -> Datagram {
        b.last_rx = Instant::now();
        match wire::classify(&pkt) {
            Class::Rtp | Class::Dtls => {
                self.link.deliver(pkt, b.conn.remote_address(), b.last_rx);
                Datagram::Media
            }
            Class::Control => match wire::parse_relay(&pkt) {
                Ok(RelayMessage::Probe { txn, cookie }) => {
                    let ack = wire::probe_ack(txn, cookie);
                    let _ = b.conn.send_datagram(bytes::Bytes::copy_from_slice(&ack));
                    Datagram::Other
                }
                Ok(RelayMessage::Error { code, .. })
                    if ErrorCode::from_u16(code) == Some(ErrorCode::NotBound) =>
                {
                    Datagram::NotBound
                }
                _ => Datagram::Other,
            },
            Class::Other => Datagram::Other,
        }
    }

    /// Hot standby: the current connection, and a second one bound on the next relay.
    async fn run_hot(&self, s: crate::Standby) {
        let session = self.token.claims().session.0;
        let Some(mut active) = self.bind_active(0, false).await else {
            return;
        };
        let mut standby: Option<Bound> = None;
        // The standby bind under way: which relay, and when it may start.
        let mut next_standby = self
            .standby_candidate(active.relay, active.relay)
            .map(|r| (r, Instant::now()));
        let mut connecting = None;
        let mut switched: Option<Instant> = None;
        let mut tick =
            tokio::time::interval(self.config.keepalive_interval.min(s.keepalive_interval));
        let (mut abuf, mut sbuf) = ([0u8; 64], [0u8; 64]);
        loop {
            if connecting.is_none()
                && let Some((relay, at)) = next_standby.take()
            {
                connecting = Some(Box::pin(async move {
                    tokio::time::sleep_until(at.into()).await;
                    (
                        relay,
                        self.connect_and_bind_with(relay, s.keepalive_interval, s.dead_after)
                            .await,
                    )
                }));
            }
            // What ended the current connection, if something did: `Some(true)` to move on.
            let mut lost = false;
            let standby_conn = standby.as_ref().map(|b| b.conn.clone());
            tokio::select! {
                // What has arrived, before the timer (as on UDP legs).
                biased;
                d = active.conn.read_datagram() => match d {
                    Ok(pkt) => {
                        if let Datagram::NotBound = self.on_datagram(&mut active, pkt) {
                            active.conn.close(0u32.into(), b"not bound");
                            lost = true;
                        }
                    }
                    // Idle timeout (relay dead), or closed by the relay.
                    Err(_) => lost = true,
                },
                d = async { standby_conn.as_ref().expect("guarded").read_datagram().await },
                    if standby_conn.is_some() =>
                {
                    let b = standby.as_mut().expect("guarded");
                    match d.map(|pkt| self.on_datagram(b, pkt)) {
                        Ok(Datagram::Media) => {
                            // The others moved there: follow them.
                            let now = Instant::now();
                            if switched.is_none_or(|t| now.duration_since(t) >= s.hold) {
                                let b = standby.take().expect("guarded");
                                standby = Some(std::mem::replace(&mut active, b));
                                self.make_active(&active);
                                self.publish_standby(standby.as_ref());
                                self.link.shared.counters.failovers.fetch_add(1, Relaxed);
                                switched = Some(now);
                            }
                        }
                        Ok(Datagram::Other) => {}
                        // The standby is dead or lost the leg: bind one again, later.
                        Ok(Datagram::NotBound) | Err(_) => {
                            let b = standby.take().expect("guarded");
                            b.conn.close(0u32.into(), b"standby lost");
                            self.publish_standby(None);
                            next_standby = self
                                .standby_candidate(b.relay, active.relay)
                                .map(|r| (r, Instant::now() + s.retry_after));
                        }
                    }
                }
                r = active.control.read(&mut abuf), if active.control_open => match r {
                    Ok(Some(n)) => match active.on_control(&abuf[..n], session) {
                        None => {}
                        Some(Some(ErrorCode::Draining)) => lost = true,
                        Some(c) => {
                            return self.end_hot(&active, standby.as_ref(),
                                ClientError::Closed(c.unwrap_or(ErrorCode::SessionClosed)));
                        }
                    },
                    Ok(None) | Err(_) => active.control_open = false,
                },
                r = async { standby.as_mut().expect("guarded").control.read(&mut sbuf).await },
                    if standby.as_ref().is_some_and(|b| b.control_open) =>
                {
                    let b = standby.as_mut().expect("guarded");
                    match r {
                        Ok(Some(n)) => match b.on_control(&sbuf[..n], session) {
                            None => {}
                            Some(Some(ErrorCode::Draining)) => {
                                let b = standby.take().expect("guarded");
                                b.conn.close(0u32.into(), b"draining");
                                self.publish_standby(None);
                                next_standby = self
                                    .standby_candidate(b.relay, active.relay)
                                    .map(|r| (r, Instant::now() + s.retry_after));
                            }
                            Some(c) => {
                                return self.end_hot(&active, standby.as_ref(),
                                    ClientError::Closed(c.unwrap_or(ErrorCode::SessionClosed)));
                            }
                        },
                        Ok(None) | Err(_) => b.control_open = false,
                    }
                }
                (relay, r) = async { connecting.as_mut().expect("guarded").await },
                    if connecting.is_some() =>
                {
                    connecting = None;
                    match r {
                        Ok(b) if relay != active.relay => {
                            standby = Some(Bound::new(relay, b));
                            self.link.shared.counters.standby_binds.fetch_add(1, Relaxed);
                            self.publish_standby(standby.as_ref());
                        }
                        // The leg moved onto that relay meanwhile.
                        Ok((conn, _, _)) => {
                            conn.close(0u32.into(), b"not needed");
                            next_standby = self
                                .standby_candidate(relay, active.relay)
                                .map(|r| (r, Instant::now()));
                        }
                        Err(BindFailure::Refused(c)) => {
                            return self.end_hot(&active, None, ClientError::Refused(c));
                        }
                        Err(BindFailure::Next) => {
                            next_standby = self
                                .standby_candidate(relay, active.relay)
                                .map(|r| (r, Instant::now() + s.retry_after));
                        }
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    active.keepalive(self.config.keepalive_interval, now);
                    if let Some(b) = standby.as_mut() {
                        b.keepalive(s.keepalive_interval, now);
                    }
                }
                _ = self.link.media.closed() => {
                    active.conn.close(0u32.into(), b"leg dropped");
                    if let Some(b) = &standby {
                        b.conn.close(0u32.into(), b"leg dropped");
                    }
                    return;
                }
            }
            if !lost {
                continue;
            }
            // The current relay is gone: the standby carries media from the next datagram, or
            // (with none bound) the leg binds again as a cold one would.
            self.link.shared.counters.failovers.fetch_add(1, Relaxed);
            let old = active.relay;
            match standby.take() {
                Some(b) => {
                    active = b;
                    self.make_active(&active);
                    switched = Some(Instant::now());
                }
                None => {
                    *self.slot.write().unwrap_or_else(|e| e.into_inner()) = None;
                    connecting = None;
                    let Some(b) = self.bind_active(old + 1, true).await else {
                        return;
                    };
                    active = b;
                }
            }
            self.publish_standby(None);
            if connecting.is_none() {
                // The old relay again once it may be back, or the next one.
                next_standby = self
                    .standby_candidate(old, active.relay)
                    .map(|r| (r, Instant::now() + s.retry_after));
            }
        }
    }

    /// Ends a hot standby leg: closes both connections and reports `err`.
    fn end_hot(&self, active: &Bound, standby: Option<&Bound>, err: ClientError) {
        active.conn.close(0u32.into(), b"leg over");
        if let Some(b) = standby {
            b.conn.close(0u32.into(), b"leg over");
        }
        *self.slot.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.link.end(err);
    }
}
