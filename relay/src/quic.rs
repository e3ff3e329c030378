//! The QUIC transport: a quinn endpoint (ALPN `veil/1`) whose connections each carry one leg.
//!
//! A client opens a bidirectional stream and sends a BIND (the same 84-byte message as over
//! UDP, without a cookie: the QUIC handshake has already proven the client receives at its
//! address). The relay answers BIND_OK or ERROR on that stream and keeps it open to send CLOSE
//! when the session ends. Media travels as QUIC DATAGRAM frames (RFC 9221), never on streams, so
//! a lost packet holds up nothing behind it. The leg is bound to the connection, not to an
//! address, so it survives the client's address changing (connection migration).
//!
//! Forwarding is the same sans-IO core as UDP ([`LegState::forward`]); this module is a thin
//! adapter, as the UDP workers are.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use dashmap::DashMap;
use quinn::crypto::rustls::QuicServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use veil_ops::redact::Redacted;
use veil_relay_core::relay::media_ok;
use veil_relay_core::wire::{self, Class, ClientMessage, ErrorCode};
use veil_relay_core::{
    ConnId, DropReason, Endpoint, LegState, LegStatus, Node, SharedStats, Stats, Verdict,
};

/// The ALPN protocol id of Veil over QUIC.
pub const ALPN: &[u8] = b"veil/1";

/// How a UDP worker hands datagrams to QUIC legs.
pub trait QuicSink: Send + Sync {
    /// Queues `pkt` as a QUIC DATAGRAM on connection `conn`. Failures (connection gone,
    /// datagram larger than the peer accepts) are counted by the sink. One datagram fanned out to
    /// several QUIC legs is one `Bytes`, cloned (a reference count), not copied per leg.
    fn send(&self, conn: ConnId, pkt: Bytes);
}

/// The sink of a relay that serves no QUIC: no QUIC leg can exist, so nothing is ever sent.
#[derive(Debug)]
pub struct NoQuic;

impl QuicSink for NoQuic {
    fn send(&self, _: ConnId, _: Bytes) {}
}

/// Certificate and key of the QUIC endpoint.
#[derive(Clone)]
pub struct Identity {
    /// Certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("sha256", &hex::encode(self.fingerprint()))
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads a PEM certificate chain and a PEM private key.
    pub fn from_pem_files(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Self> {
        use rustls_pki_types::pem::PemObject;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("--quic-cert-file: cannot read {}", cert.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| {
                format!(
                    "--quic-cert-file: {} is not PEM certificates",
                    cert.display()
                )
            })?;
        if chain.is_empty() {
            anyhow::bail!("--quic-cert-file: {} holds no certificate", cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
            format!(
                "--quic-key-file: {} is not a PEM private key",
                key.display()
            )
        })?;
        Ok(Self {
            chain,
            key: Arc::new(key),
        })
    }

    /// A fresh self-signed certificate for `veil-relay` (clients pin its fingerprint).
    pub fn self_signed() -> anyhow::Result<Self> {
        let ck = rcgen::generate_simple_self_signed(vec!["veil-relay".to_string()])
            .context("generate certificate")?;
        let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
            .map_err(|e| anyhow::anyhow!("key: {e}"))?;
        Ok(Self {
            chain: vec![ck.cert.der().clone()],
            key: Arc::new(key),
        })
    }

    /// SHA-256 of the leaf certificate (DER): what clients pin.
    pub fn fingerprint(&self) -> [u8; 32] {
        Sha256::digest(&self.chain[0]).into()
    }

    /// The leaf certificate in PEM, for clients that trust it directly.
    pub fn leaf_pem(&self) -> String {
        use std::fmt::Write;
        let b64 = base64_encode(&self.chain[0]);
        let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            let _ = writeln!(
                out,
                "{}",
                std::str::from_utf8(line).expect("base64 is ASCII")
            );
        }
        out + "-----END CERTIFICATE-----\n"
    }
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// What the QUIC server and the UDP workers share.
pub struct QuicShared {
    conns: DashMap<ConnId, quinn::Connection>,
    /// Counters of the QUIC transport (many writers: added, not published).
    pub stats: Arc<SharedStats>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for QuicShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicShared")
            .field("connections", &self.conns.len())
            .finish()
    }
}

impl QuicShared {
    fn send_bytes(&self, conn: ConnId, pkt: Bytes) {
        // Clone the handle out of the map: no shard lock is held while quinn works.
        let Some(c) = self.conns.get(&conn).map(|c| c.clone()) else {
            self.stats.add(&Stats {
                send_errors: 1,
                ..Stats::default()
            });
            return;
        };
        // quinn makes room in a full datagram send buffer (the connection's congestion window
        // holds datagrams back) by discarding the oldest queued datagrams, silently: count that
        // as a send error, as a full socket buffer is over UDP. At least one is discarded; with
        // media of similar sizes, one.
        let displaces = c.datagram_send_buffer_space() < pkt.len();
        match c.send_datagram(pkt) {
            Ok(()) if displaces => self.stats.add(&Stats {
                send_errors: 1,
                ..Stats::default()
            }),
            Ok(()) => {}
            Err(e) => {
                let mut s = Stats::default();
                match e {
                    quinn::SendDatagramError::TooLarge => s.drop(DropReason::TooLargeForPeer),
                    _ => s.send_errors = 1,
                }
                self.stats.add(&s);
            }
        }
    }

    /// QUIC legs bound now.
    pub fn legs(&self) -> usize {
        self.conns.len()
    }
}

impl QuicSink for QuicShared {
    fn send(&self, conn: ConnId, pkt: Bytes) {
        self.send_bytes(conn, pkt);
    }
}

/// A bound QUIC endpoint, ready to serve.
pub struct QuicServer {
    endpoint: quinn::Endpoint,
    shared: Arc<QuicShared>,
    fingerprint: [u8; 32],
}

impl std::fmt::Debug for QuicServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicServer")
            .field("fingerprint", &hex::encode(self.fingerprint))
            .finish_non_exhaustive()
    }
}

/// How long a client has to present its BIND after the handshake.
const BIND_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle timeout the relay offers; clients usually ask for less (their failover timer).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

impl QuicServer {
    /// Binds the QUIC endpoint on `addr`.
    pub fn bind(addr: SocketAddr, identity: &Identity) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3")?
            .with_no_client_auth()
            .with_single_cert(identity.chain.clone(), identity.key.clone_key())
            .context(
                "--quic-cert-file / --quic-key-file: the key does not match the certificate",
            )?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.max_early_data_size = 0;
        let crypto = QuicServerConfig::try_from(tls).context("QUIC TLS configuration")?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(
                IDLE_TIMEOUT
                    .try_into()
                    .expect("30 s is a valid idle timeout"),
            ))
            .datagram_receive_buffer_size(Some(1 << 20))
            .datagram_send_buffer_size(1 << 20)
            // One stream for the bind; media never uses streams.
            .max_concurrent_bidi_streams(1u32.into())
            .max_concurrent_uni_streams(0u32.into());
        server.transport_config(Arc::new(transport));
        server.migration(true);
        let endpoint = quinn::Endpoint::server(server, addr)
            .with_context(|| format!("bind QUIC socket {addr}"))?;
        Ok(Self {
            endpoint,
            shared: Arc::new(QuicShared {
                conns: DashMap::new(),
                stats: Arc::new(SharedStats::default()),
                next_id: AtomicU64::new(1),
            }),
            fingerprint: identity.fingerprint(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The certificate fingerprint clients pin.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// What the UDP workers use to reach QUIC legs, and the QUIC counters.
    pub fn shared(&self) -> Arc<QuicShared> {
        self.shared.clone()
    }

    /// Accepts connections until `stop` turns true, then closes them all.
    pub async fn run(
        self,
        node: Arc<Node>,
        udp: Arc<std::net::UdpSocket>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => {
                        if let Some(incoming) = validate_address(incoming) {
                            conns.spawn(serve(incoming, node.clone(), self.shared.clone(), udp.clone(), stop.clone()));
                        }
                    }
                    None => break,
                },
                _ = stop.changed() => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        self.endpoint.close(0u32.into(), b"relay shutting down");
        while conns.join_next().await.is_some() {}
        self.endpoint.wait_idle().await;
    }
}

/// Answers a connection attempt from an address not yet proven with a Retry (RFC 9000 §8.1.2):
/// a small packet carrying a token the client must echo from the same address. Only then does
/// the relay send its handshake flight, which is several times larger than a client's Initial:
/// without the Retry, an Initial sent with a spoofed source address would make the relay send
/// up to three times as many bytes to that address (QUIC's own amplification limit), and the
/// relay never sends an unverified address more than it received from it (docs/SECURITY.md). The
/// price is one round trip more to open a QUIC leg. Returns the attempt if its address is proven.
fn validate_address(incoming: quinn::Incoming) -> Option<quinn::Incoming> {
    if incoming.remote_address_validated() {
        return Some(incoming);
    }
    if incoming.may_retry() {
        if let Err(e) = incoming.retry() {
            e.into_incoming().ignore();
        }
    } else {
        // Unproven yet carrying a token (quinn has already refused an invalid one): drop it
        // without an answer.
        incoming.ignore();
    }
    None
}

/// Serves one connection: bind, then datagrams until it or its session ends.
async fn serve(
    incoming: quinn::Incoming,
    node: Arc<Node>,
    shared: Arc<QuicShared>,
    udp: Arc<std::net::UdpSocket>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(Ok(conn)) = tokio::time::timeout(BIND_TIMEOUT, incoming).await else {
        return;
    };
    let peer = Redacted(conn.remote_address());
    let id = ConnId(shared.next_id.fetch_add(1, Ordering::Relaxed));
    let mut stats = Stats::default();
    let Some((mut leg, mut control)) = bind(&conn, &node, &shared, id, &mut stats).await else {
        shared.stats.add(&stats);
        return;
    };
    tracing::debug!(session = %leg.session(), leg = leg.leg(), %peer, "QUIC leg bound");

    let mut tick = tokio::time::interval(node.config().sweep_interval);
    let why = loop {
        tokio::select! {
            d = conn.read_datagram() => match d {
                Ok(pkt) => {
                    if let Some(why) = datagram(&conn, &mut leg, pkt, &shared, &udp, &mut stats) {
                        break why;
                    }
                }
                Err(_) => break LegStatus::Idle,
            },
            _ = tick.tick() => {
                shared.stats.add(&std::mem::take(&mut stats));
                let now = Instant::now();
                // The connection's own idle timeout stands in for the leg's.
                match leg.check(now, node.unix_ms(now), Duration::MAX) {
                    LegStatus::Serving if node.is_evicting() => break LegStatus::Evicted,
                    LegStatus::Serving => {}
                    why => break why,
                }
            }
            // Shutdown without a drain (or past it): tell the client to move on.
            _ = stop.changed() => break LegStatus::Evicted,
        }
    };
    let code = match why {
        LegStatus::Closed => Some(ErrorCode::SessionClosed),
        LegStatus::Expired => Some(ErrorCode::Expired),
        LegStatus::Evicted => Some(ErrorCode::Draining),
        LegStatus::Moved | LegStatus::Idle | LegStatus::Serving => None,
    };
    if let Some(code) = code {
        let msg = wire::close(code, leg.session().0);
        stats.control_tx_packets += 1;
        stats.control_tx_bytes += msg.as_bytes().len() as u64;
        let _ = control.write_all(msg.as_bytes()).await;
        let _ = control.finish();
        // Give the CLOSE a moment to leave before the connection goes.
        let _ = tokio::time::timeout(Duration::from_millis(200), control.stopped()).await;
        conn.close(0u32.into(), b"session ended");
    }
    shared.conns.remove(&id);
    node.detach(&leg);
    shared.stats.add(&stats);
    tracing::debug!(session = %leg.session(), leg = leg.leg(), %peer, ?why, "QUIC leg unbound");
}

/// Reads the BIND from the client's first stream and binds the leg to this connection.
async fn bind(
    conn: &quinn::Connection,
    node: &Node,
    shared: &QuicShared,
    id: ConnId,
    stats: &mut Stats,
) -> Option<(LegState, quinn::SendStream)> {
    use veil_relay_core::BindResult;
    let (mut send, mut recv) = tokio::time::timeout(BIND_TIMEOUT, conn.accept_bi())
        .await
        .ok()?
        .ok()?;
    let mut buf = [0u8; wire::BIND_LEN];
    let read = tokio::time::timeout(BIND_TIMEOUT, recv.read_exact(&mut buf)).await;
    stats.rx_packets += 1;
    stats.rx_bytes += buf.len() as u64;
    let Ok(Ok(())) = read else {
        stats.drop(DropReason::Malformed);
        conn.close(1u32.into(), b"expected BIND");
        return None;
    };
    let Ok(ClientMessage::Bind(b)) = wire::parse_client(&buf) else {
        stats.drop(DropReason::Malformed);
        conn.close(1u32.into(), b"expected BIND");
        return None;
    };
    let now = Instant::now();
    let result = node.authenticate(now, &b).and_then(|ticket| {
        node.attach(now, &ticket, Endpoint::Quic(id))
            .map(|(leg, _)| leg)
    });
    let (reply, leg) = match result {
        Ok(leg) => {
            // Registered before BIND_OK leaves, so the first media to this leg finds it.
            shared.conns.insert(id, conn.clone());
            stats.binds[BindResult::Bound as usize] += 1;
            (wire::bind_ok(b.txn, u16::MAX), Some(leg))
        }
        Err(r) => {
            stats.binds[BindResult::Refused as usize] += 1;
            stats.drop(r.reason);
            (wire::error(b.txn, r.code), None)
        }
    };
    stats.control_tx_packets += 1;
    stats.control_tx_bytes += reply.as_bytes().len() as u64;
    if send.write_all(reply.as_bytes()).await.is_err() {
        if let Some(leg) = &leg {
            shared.conns.remove(&id);
            node.detach(leg);
        }
        return None;
    }
    match leg {
        Some(leg) => Some((leg, send)),
        None => {
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
            conn.close(2u32.into(), b"bind refused");
            None
        }
    }
}

/// Handles one datagram from a bound leg; returns why the leg ended, if it did.
fn datagram(
    conn: &quinn::Connection,
    leg: &mut LegState,
    pkt: Bytes,
    shared: &QuicShared,
    udp: &std::net::UdpSocket,
    stats: &mut Stats,
) -> Option<LegStatus> {
    stats.rx_packets += 1;
    stats.rx_bytes += pkt.len() as u64;
    let class = wire::classify(&pkt);
    match class {
        Class::Rtp | Class::Dtls if media_ok(class, &pkt) => {
            match leg.forward(Instant::now(), &pkt, stats) {
                Verdict::Forward(targets) => {
                    for ep in targets.iter() {
                        match ep {
                            Endpoint::Udp(dst) => {
                                // Nonblocking: a full socket buffer drops the datagram.
                                if !crate::udp::send_now(udp.as_raw_fd(), &pkt, dst) {
                                    stats.send_errors += 1;
                                }
                            }
                            Endpoint::Quic(c) => shared.send_bytes(c, pkt.clone()),
                        }
                    }
                }
                Verdict::Drop(DropReason::SessionClosed) => return Some(LegStatus::Closed),
                Verdict::Drop(DropReason::Unbound) => return Some(LegStatus::Moved),
                Verdict::Drop(_) | Verdict::Control => {}
            }
        }
        Class::Rtp | Class::Dtls => stats.drop(DropReason::Malformed),
        Class::Control => match wire::parse_client(&pkt) {
            Ok(ClientMessage::Keepalive { txn }) => {
                leg.touch(Instant::now());
                let ack = wire::keepalive_ack(txn);
                stats.control_tx_packets += 1;
                stats.control_tx_bytes += ack.as_bytes().len() as u64;
                let _ = conn.send_datagram(Bytes::copy_from_slice(ack.as_bytes()));
            }
            // A BIND as a datagram on a bound connection, or garbage.
            Ok(ClientMessage::Bind(_)) | Err(_) => stats.drop(DropReason::Malformed),
        },
        Class::Other => stats.drop(DropReason::UnknownType),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_identity_round_trips_through_pem() {
        let id = Identity::self_signed().unwrap();
        let dir = std::env::temp_dir().join(format!("veil-quic-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), id.leaf_pem()).unwrap();
        let key_pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64_encode(id.key.secret_der())
        );
        std::fs::write(dir.join("key.pem"), key_pem).unwrap();
        let back = Identity::from_pem_files(&dir.join("cert.pem"), &dir.join("key.pem")).unwrap();
        assert_eq!(back.fingerprint(), id.fingerprint());
        assert!(Identity::from_pem_files(&dir.join("key.pem"), &dir.join("key.pem")).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
