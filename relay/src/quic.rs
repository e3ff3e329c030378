//! The QUIC transport: a quinn endpoint (ALPN `veil/2`) whose connections each carry one leg.
//!
//! A client opens a bidirectional stream and sends a channel-bound BIND: the 84-byte message of
//! UDP, without a cookie (the handshake, after a Retry, has proven the client's address), whose
//! tag also covers the connection's TLS exporter value, so that it binds on this connection
//! only. The relay answers BIND_OK or ERROR on that stream and keeps it open to send CLOSE when
//! the session ends. Media travels as QUIC DATAGRAM frames (RFC 9221), never on streams, so a
//! lost packet holds up nothing behind it. The leg is bound to the connection, not to an
//! address, so it survives the client's address changing (connection migration); a new address
//! gets no media until it answers the relay's PROBE.
//!
//! This module decides nothing about legs: each connection has a
//! [`ForwardingTable`] of its own (the core's, as each UDP worker has), hands it every input,
//! and sends what it answers through [`crate::send`], as the UDP workers do.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use quinn::crypto::rustls::QuicServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use veil_relay_core::limit::BindLimiter;
use veil_relay_core::wire;
use veil_relay_core::{ConnId, Endpoint, Event, ForwardingTable, LegStatus, Node, Verdict};

use crate::send::{Out, QuicConns, QuicCounters, QuicRefusal};

/// The ALPN protocol id of Veil over QUIC.
pub const ALPN: &[u8] = wire::QUIC_ALPN;

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
    /// Reads a PEM certificate chain and a PEM private key (of the QUIC endpoint: errors name
    /// `--quic-cert-file` and `--quic-key-file`).
    pub fn from_pem_files(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Self> {
        Self::from_pem_files_of(cert, key, ("--quic-cert-file", "--quic-key-file"))
    }

    /// Reads a PEM certificate chain and a PEM private key; errors name `flags` (the
    /// certificate's flag, then the key's).
    pub fn from_pem_files_of(
        cert: &std::path::Path,
        key: &std::path::Path,
        flags: (&str, &str),
    ) -> anyhow::Result<Self> {
        use rustls_pki_types::pem::PemObject;
        let (cert_flag, key_flag) = flags;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("{cert_flag}: cannot read {}", cert.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("{cert_flag}: {} is not PEM certificates", cert.display()))?;
        if chain.is_empty() {
            anyhow::bail!("{cert_flag}: {} holds no certificate", cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("{key_flag}: {} is not a PEM private key", key.display()))?;
        Ok(Self {
            chain,
            key: Arc::new(key),
        })
    }

    /// The private key.
    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
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

    /// SHA-256 of the leaf certificate's SubjectPublicKeyInfo (DER), in base64: what Chromium's
    /// `--ignore-certificate-errors-spki-list` takes to trust a self-signed certificate (tests
    /// of TURN over TLS with `--dev` certificates).
    pub fn spki_sha256_base64(&self) -> anyhow::Result<String> {
        let cert = webpki::EndEntityCert::try_from(&self.chain[0])
            .map_err(|e| anyhow::anyhow!("leaf certificate: {e}"))?;
        Ok(base64_encode(&Sha256::digest(
            cert.subject_public_key_info().as_ref(),
        )))
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

/// A bound QUIC endpoint, ready to serve.
pub struct QuicServer {
    endpoint: quinn::Endpoint,
    conns: Arc<QuicConns>,
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
        // One socket carries every QUIC participant's datagrams: give it the buffers the UDP
        // workers have (the kernel default, about 200 KiB, overflowed first in load tests).
        let socket = {
            use socket2::{Domain, Protocol, Socket, Type};
            let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
                .context("create QUIC socket")?;
            if addr.is_ipv6() {
                socket.set_only_v6(false).context("clear IPV6_V6ONLY")?;
            }
            socket.set_nonblocking(true)?;
            // Best effort, as for the media sockets.
            let _ = socket.set_recv_buffer_size(crate::udp::SOCKET_BUFFER);
            let _ = socket.set_send_buffer_size(crate::udp::SOCKET_BUFFER);
            socket
                .bind(&addr.into())
                .with_context(|| format!("bind QUIC socket {addr}"))?;
            std::net::UdpSocket::from(socket)
        };
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .with_context(|| format!("start QUIC endpoint {addr}"))?;
        Ok(Self {
            endpoint,
            conns: Arc::new(QuicConns::default()),
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

    /// Where every shell sends QUIC datagrams, and the QUIC counters.
    pub fn conns(&self) -> Arc<QuicConns> {
        self.conns.clone()
    }

    /// Accepts connections until `stop` turns true, then closes them all. QUIC legs send UDP
    /// datagrams from `udp`, a duplicate of a media socket.
    pub async fn run(
        self,
        node: Arc<Node>,
        udp: Arc<std::net::UdpSocket>,
        stop: watch::Receiver<bool>,
    ) {
        let config = node.config().clone();
        let ctx = Arc::new(ConnContext {
            binds: Arc::new(Mutex::new(BindLimiter::new(
                config.binds_per_ip,
                config.binds_per_worker,
                Instant::now(),
            ))),
            node,
            conns: self.conns.clone(),
            udp,
            stop: stop.clone(),
        });
        let mut stop = stop;
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => {
                        if let Some(incoming) = validate_address(incoming, &self.conns.counters) {
                            conns.spawn(serve(incoming, ctx.clone()));
                        }
                    }
                    None => break,
                },
                _ = sweep.tick() => ctx
                    .binds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .forget_idle(Instant::now()),
                _ = stop.changed() => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        // Each connection has seen the stop too and is sending its CLOSE: give them a moment.
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while conns.join_next().await.is_some() {}
        })
        .await;
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
fn validate_address(incoming: quinn::Incoming, counters: &QuicCounters) -> Option<quinn::Incoming> {
    if incoming.remote_address_validated() {
        return Some(incoming);
    }
    if incoming.may_retry() {
        match incoming.retry() {
            Ok(()) => QuicCounters::inc(&counters.retries),
            Err(e) => {
                counters.refuse(QuicRefusal::Unvalidated);
                e.into_incoming().ignore();
            }
        }
    } else {
        // Unproven yet carrying a token (quinn has already refused an invalid one): drop it
        // without an answer.
        counters.refuse(QuicRefusal::Unvalidated);
        incoming.ignore();
    }
    None
}

/// Serves one connection: the BIND on its first stream, then datagrams, through a forwarding
/// table of its own, until the leg or the connection ends.
///
/// The loop's order, each turn: hand the input (a datagram, a path change, the connection's
/// end, a timer) to the table; send what the verdict says; then drain the table's transmits
/// (reliable ones on the control stream, the rest as datagrams), then its events (an ended leg
/// ends the connection).
async fn serve(incoming: quinn::Incoming, ctx: Arc<ConnContext>) {
    // The address the Retry proved: the one the leg is bound at. If the connection has moved by
    // the time its BIND arrives, its first datagram tells the table, which proves the new path.
    let proven = incoming.remote_address();
    let counters = &ctx.conns.counters;
    let Ok(Ok(conn)) = tokio::time::timeout(BIND_TIMEOUT, incoming).await else {
        QuicCounters::inc(&counters.handshake_failures);
        return;
    };
    QuicCounters::inc(&counters.accepted);
    QuicCounters::inc(&counters.open);
    // Counted down however this function returns.
    let _open = OpenGuard(&counters.open);
    let id = ctx.conns.next_id();
    let ep = Endpoint::Quic(id);
    let mut conn_side = Connection {
        table: ForwardingTable::with_shared_binds(
            ctx.node.clone(),
            Instant::now(),
            ctx.binds.clone(),
        ),
        ctx: ctx.clone(),
        ep,
        datagrams: (0, 0),
    };
    let Some(mut control) = conn_side.bind(&conn, id, proven).await else {
        conn_side.publish(&conn);
        return;
    };
    let mut addr = proven;
    tracing::debug!(conn = id.0, peer = %veil_ops::redact::Redacted(addr), "QUIC connection bound");
    let mut tick = tokio::time::interval(ctx.node.config().sweep_interval);
    let mut stop = ctx.stop.clone();
    let why = loop {
        let mut lost = false;
        tokio::select! {
            d = conn.read_datagram() => {
                let now = Instant::now();
                match d {
                    Ok(pkt) => {
                        let a = conn.remote_address();
                        if a != addr {
                            addr = a;
                            conn_side.table.handle_path(now, ep, a);
                        }
                        conn_side.datagram(now, pkt);
                    }
                    Err(_) => {
                        conn_side.table.handle_disconnect(ep);
                        lost = true;
                    }
                }
            }
            _ = tick.tick() => {
                conn_side.table.handle_timeout(Instant::now());
                conn_side.publish(&conn);
            }
            // Shutdown without a drain (or past it): tell the client to move on.
            _ = stop.changed() => conn_side.table.handle_shutdown(),
        }
        if let Some(why) = conn_side.drain(&mut control).await {
            break why;
        }
        // A lost connection ends the loop even if its leg had already left the table.
        if lost {
            break LegStatus::Disconnected;
        }
    };
    match why {
        LegStatus::Disconnected => {}
        LegStatus::Closed | LegStatus::Expired | LegStatus::Evicted => {
            let _ = control.finish();
            // Give the CLOSE a moment to leave before the connection goes.
            let _ = tokio::time::timeout(Duration::from_millis(200), control.stopped()).await;
            conn.close(0u32.into(), b"session ended");
        }
        LegStatus::Moved | LegStatus::Idle | LegStatus::Serving => {
            conn.close(0u32.into(), b"leg ended");
        }
    }
    ctx.conns.remove(id);
    conn_side.publish(&conn);
    tracing::debug!(conn = id.0, ?why, "QUIC connection ended");
}

/// What every connection of the QUIC endpoint shares.
struct ConnContext {
    node: Arc<Node>,
    conns: Arc<QuicConns>,
    /// Bind budgets per source address, shared by every connection's table.
    binds: Arc<Mutex<BindLimiter>>,
    /// The media socket that QUIC legs send UDP datagrams from (a duplicate of a UDP worker's).
    udp: Arc<std::net::UdpSocket>,
    stop: watch::Receiver<bool>,
}

/// Counts an open connection down when dropped.
struct OpenGuard<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One connection's forwarding table and sending state.
struct Connection {
    table: ForwardingTable,
    ctx: Arc<ConnContext>,
    ep: Endpoint,
    /// DATAGRAM frames received and sent, as last published from quinn's statistics.
    datagrams: (u64, u64),
}

impl Connection {
    /// Reads the BIND from the client's first stream and hands it to the table with the
    /// connection's TLS exporter value and the address the handshake proved. Returns the
    /// control stream if the leg is bound.
    async fn bind(
        &mut self,
        conn: &quinn::Connection,
        id: ConnId,
        proven: SocketAddr,
    ) -> Option<quinn::SendStream> {
        let counters = &self.ctx.conns.counters;
        let Ok(Ok((mut send, mut recv))) =
            tokio::time::timeout(BIND_TIMEOUT, conn.accept_bi()).await
        else {
            counters.refuse(QuicRefusal::NoBind);
            return None;
        };
        let mut buf = [0u8; wire::BIND_LEN];
        let read = tokio::time::timeout(BIND_TIMEOUT, recv.read_exact(&mut buf)).await;
        let mut exporter = [0u8; wire::EXPORTER_LEN];
        let exported = conn
            .export_keying_material(&mut exporter, wire::EXPORTER_LABEL, b"")
            .is_ok();
        let (Ok(Ok(())), true) = (read, exported) else {
            self.table
                .count_shell_drop(buf.len(), veil_relay_core::DropReason::Malformed);
            counters.refuse(QuicRefusal::NoBind);
            conn.close(1u32.into(), b"expected BIND");
            return None;
        };
        let now = Instant::now();
        self.table
            .handle_stream_bind(now, self.ep, proven, &buf, &exporter);
        let bound = self.table.serves(self.ep);
        if bound {
            // Registered before BIND_OK leaves, so the first media to this leg finds it.
            self.ctx.conns.insert(id, conn.clone());
        }
        self.drain(&mut send).await;
        if !bound {
            self.ctx.conns.counters.refuse(QuicRefusal::BindRefused);
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
            conn.close(2u32.into(), b"bind refused");
            return None;
        }
        Some(send)
    }

    /// Forwards one datagram as the table decides.
    fn datagram(&mut self, now: Instant, pkt: Bytes) {
        if let Verdict::Forward(targets) = self.table.handle_datagram(now, self.ep, &pkt) {
            let fd = self.ctx.udp.as_raw_fd();
            let mut out = Out::immediate(fd, Some(&*self.ctx.conns), &pkt).sharing(pkt.clone());
            for t in targets.iter() {
                out.to(t, 0, pkt.len());
            }
            out.flush();
            let errors = out.errors();
            self.table.count_send_errors(errors);
        }
    }

    /// Sends what the table queued and reads its events; returns why this connection's leg
    /// ended, if it did.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe (a control message may be half written): awaited outside `select!`.
    async fn drain(&mut self, control: &mut quinn::SendStream) -> Option<LegStatus> {
        let fd = self.ctx.udp.as_raw_fd();
        while let Some(t) = self.table.poll_transmit() {
            let sent = {
                let mut out = Out::immediate(fd, Some(&*self.ctx.conns), &[]);
                let sent = out.control(&t);
                let errors = out.errors();
                self.table.count_send_errors(errors);
                sent
            };
            if !sent {
                // Reliable, to this connection: on the control stream. A failed write means the
                // connection is going; its end arrives as an input.
                let _ = control.write_all(t.msg.as_bytes()).await;
            }
        }
        let mut ended = None;
        while let Some(e) = self.table.poll_event() {
            crate::log_event(e);
            if let Event::Unbound { endpoint, why, .. } = e
                && endpoint == self.ep
            {
                ended = Some(why);
            }
        }
        ended
    }

    /// Adds this connection's counters into the QUIC transport's, and the DATAGRAM frames
    /// quinn counted on it since the last time.
    fn publish(&mut self, conn: &quinn::Connection) {
        use std::sync::atomic::Ordering::Relaxed;
        self.ctx.conns.stats.add(&self.table.take_stats());
        let frames = conn.stats();
        let now = (frames.frame_rx.datagram, frames.frame_tx.datagram);
        let c = &self.ctx.conns.counters;
        c.datagrams_rx
            .fetch_add(now.0.saturating_sub(self.datagrams.0), Relaxed);
        c.datagrams_tx
            .fetch_add(now.1.saturating_sub(self.datagrams.1), Relaxed);
        self.datagrams = now;
    }
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
