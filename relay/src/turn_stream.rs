//! TURN over TCP and TLS (RFC 8656 §3.1): `turn:IP:PORT?transport=tcp` and
//! `turns:HOST:PORT?transport=tcp`, for clients whose networks block UDP or let only TLS on 443
//! out. The client reaches the relay over a stream; what the relay relays for it is still UDP to
//! the session's other allocations (REQUESTED-TRANSPORT is UDP, as for every WebRTC client).
//!
//! Each connection is one more door into the one core: it has a [`ForwardingTable`] of its own
//! (as each QUIC connection has), cuts the stream into TURN messages ([`stun::frame_len`]: a STUN
//! message, or ChannelData padded to 4 bytes) and hands each to
//! [`ForwardingTable::handle_turn_stream`] with the connection's [`Endpoint::TurnTcp`] or
//! [`Endpoint::TurnTls`]. Credentials, nonces, permissions, the peers a client may reach and
//! every limit are the core's, exactly as over UDP. What goes back to the client (answers, and
//! datagrams other allocations relay to it) is queued in [`TurnStreams`] and written by the
//! connection's writer task, so that a UDP worker relaying to a TCP client never waits on its
//! socket: a client that does not read loses messages (counted), as a full UDP buffer would.
//!
//! A connection holds one allocation (RFC 8656 §3.1: the 5-tuple is the connection). It ends
//! when the client closes it, when its allocation ends (released, expired, revoked: the relay
//! then closes it), when it holds no allocation 10 s after connecting, or when its bytes cannot
//! be framed.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use veil_relay_core::limit::BindLimiter;
use veil_relay_core::stun::{self, FrameError, MAX_STREAM_FRAME};
use veil_relay_core::{DropReason, Endpoint, Event, ForwardingTable, Node, Verdict};

use crate::quic::Identity;
use crate::send::{Out, QuicConns, StreamCounters, StreamRefusal, TurnStreams};

/// How long a connection may go without an allocation (a TLS handshake included).
const ALLOCATE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a busy connection adds its counters into its transport's (a quiet one does at
/// every sweep tick).
const PUBLISH_EVERY: Duration = Duration::from_millis(50);
/// Messages queued for one connection before further ones are dropped: a second of audio and
/// video for a client that stopped reading.
const QUEUE: usize = 512;

/// The stream a listener serves TURN on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Plain TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
}

impl StreamKind {
    fn endpoint(self, id: veil_relay_core::ConnId) -> Endpoint {
        match self {
            Self::Tcp => Endpoint::TurnTcp(id),
            Self::Tls => Endpoint::TurnTls(id),
        }
    }

    fn counters(self, streams: &TurnStreams) -> &StreamCounters {
        &streams.counters[self as usize]
    }
}

/// A bound TURN TCP or TLS listener.
pub struct StreamServer {
    listener: TcpListener,
    kind: StreamKind,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for StreamServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamServer")
            .field("kind", &self.kind)
            .field("addr", &self.listener.local_addr().ok())
            .finish()
    }
}

impl StreamServer {
    /// Binds TURN over TCP on `addr`.
    pub async fn bind_tcp(addr: SocketAddr) -> anyhow::Result<Self> {
        Ok(Self {
            listener: listen(addr, "--turn-tcp-addr").await?,
            kind: StreamKind::Tcp,
            tls: None,
        })
    }

    /// Binds TURN over TLS on `addr`, with `identity`'s certificate (TLS 1.2 and 1.3).
    pub async fn bind_tls(addr: SocketAddr, identity: &Identity) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(identity.chain.clone(), identity.key())
            .context(
                "--turn-tls-cert-file / --turn-tls-key-file: the key does not match the certificate",
            )?;
        Ok(Self {
            listener: listen(addr, "--turn-tls-addr").await?,
            kind: StreamKind::Tls,
            tls: Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls))),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Accepts connections until `stop` turns true; each is served until it ends, or until
    /// `stop` (its allocation then ends with it).
    pub async fn run(self, ctx: Arc<StreamContext>) {
        let mut stop = ctx.stop.clone();
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let counters = self.kind.counters(&ctx.streams);
                        let Ok(slot) = ctx.slots.clone().try_acquire_owned() else {
                            counters.refuse(StreamRefusal::Full);
                            drop(tcp);
                            continue;
                        };
                        let _ = tcp.set_nodelay(true);
                        let (ctx, kind, tls) = (ctx.clone(), self.kind, self.tls.clone());
                        conns.spawn(async move {
                            let _slot = slot;
                            match tls {
                                None => serve(tcp, peer, kind, ctx).await,
                                Some(tls) => {
                                    let started = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await;
                                    match started {
                                        Ok(Ok(stream)) => serve(stream, peer, kind, ctx).await,
                                        _ => kind.counters(&ctx.streams).refuse(StreamRefusal::Handshake),
                                    }
                                }
                            }
                        });
                    }
                    // Out of file descriptors, say: back off a little rather than spin.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                },
                _ = stop.changed() => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        while conns.join_next().await.is_some() {}
    }
}

async fn listen(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .with_context(|| format!("{flag}: create socket"))?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("{flag}: bind {addr}"))?;
    socket
        .listen(1024)
        .with_context(|| format!("{flag}: listen on {addr}"))
}

/// What every TURN connection shares, TCP and TLS alike.
pub struct StreamContext {
    /// The node.
    pub node: Arc<Node>,
    /// Where TURN messages for stream clients are queued.
    pub streams: Arc<TurnStreams>,
    /// QUIC connections (the core relays TURN only to TURN allocations, but an `Out` may be
    /// asked anything).
    pub quic: Option<Arc<QuicConns>>,
    /// The media socket relayed datagrams to TURN UDP allocations leave from (a duplicate of a
    /// UDP worker's: a relayed address is the media port's).
    pub udp: Arc<std::net::UdpSocket>,
    /// Challenge budgets per source address, shared by every connection's table.
    pub binds: Arc<Mutex<BindLimiter>>,
    /// Connections that may be open at once.
    pub slots: Arc<Semaphore>,
    /// Turns true at shutdown.
    pub stop: watch::Receiver<bool>,
}

impl std::fmt::Debug for StreamContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamContext").finish_non_exhaustive()
    }
}

impl StreamContext {
    /// The shared state of TURN connections on `node`, at most `max_connections` open at once.
    pub fn new(
        node: Arc<Node>,
        streams: Arc<TurnStreams>,
        quic: Option<Arc<QuicConns>>,
        udp: Arc<std::net::UdpSocket>,
        max_connections: usize,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let config = node.config().clone();
        Self {
            binds: Arc::new(Mutex::new(BindLimiter::new(
                config.binds_per_ip,
                config.binds_per_worker,
                Instant::now(),
            ))),
            node,
            streams,
            quic,
            udp,
            slots: Arc::new(Semaphore::new(max_connections)),
            stop,
        }
    }

    /// Forgets idle challenge budgets, every second until stop.
    pub async fn sweep(self: Arc<Self>) {
        let mut stop = self.stop.clone();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => self
                    .binds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .forget_idle(Instant::now()),
                _ = stop.changed() => return,
            }
        }
    }
}

/// Counts a value down when dropped.
struct Held<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Why a connection's loop ended.
enum End {
    /// The client closed it, or it broke.
    Closed,
    /// Its allocation ended (released, expired, revoked, moved).
    Unbound,
    /// No allocation in time.
    NoAllocation,
    /// Its bytes cannot be framed.
    Framing,
    /// The relay is stopping.
    Shutdown,
}

/// Serves one connection: frames its stream into TURN messages for its table, and writes what
/// is queued for it, until it ends.
async fn serve<S>(stream: S, peer: SocketAddr, kind: StreamKind, ctx: Arc<StreamContext>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use std::sync::atomic::Ordering::Relaxed;
    let streams = &ctx.streams;
    let counters = kind.counters(streams);
    counters.accepted.fetch_add(1, Relaxed);
    counters.open.fetch_add(1, Relaxed);
    let _open = Held(&counters.open);
    let id = streams.next_id();
    let ep = kind.endpoint(id);
    let (mut rd, wr) = tokio::io::split(stream);
    let (queue, queued) = mpsc::channel(QUEUE);
    // Registered before the first message is read: the answers to it go through the queue.
    streams.insert(id, queue);
    let writer = tokio::spawn(write(wr, queued));
    let started = Instant::now();
    let mut conn = Conn {
        table: ForwardingTable::with_shared_binds(ctx.node.clone(), started, ctx.binds.clone()),
        ctx: ctx.clone(),
        ep,
        kind,
        allocated: false,
    };
    let mut buf = vec![0u8; 4 * MAX_STREAM_FRAME];
    let mut filled = 0;
    let mut tick = tokio::time::interval(ctx.node.config().sweep_interval);
    let mut stop = ctx.stop.clone();
    let mut published = started;
    let end = loop {
        let mut end = None;
        tokio::select! {
            read = rd.read(&mut buf[filled..]) => match read {
                Ok(0) | Err(_) => end = Some(End::Closed),
                Ok(n) => {
                    filled += n;
                    let now = Instant::now();
                    // Every whole message in the buffer, then what is left moves to its start.
                    let mut at = 0;
                    while let Some(len) = stun::frame_len(&buf[at..filled]) {
                        match len {
                            Err(e) => {
                                let reason = match e {
                                    FrameError::UnknownType => DropReason::UnknownType,
                                    FrameError::TooLong => DropReason::Oversized,
                                };
                                conn.table.count_shell_drop(filled - at, reason);
                                end = Some(End::Framing);
                                break;
                            }
                            Ok(len) if at + len <= filled => {
                                conn.message(now, peer, &buf[at..at + len]);
                                at += len;
                            }
                            Ok(_) => break,
                        }
                    }
                    buf.copy_within(at..filled, 0);
                    filled -= at;
                    if now.duration_since(published) >= PUBLISH_EVERY {
                        conn.publish();
                        published = now;
                    }
                }
            },
            _ = tick.tick() => {
                let now = Instant::now();
                conn.table.handle_timeout(now);
                if !conn.allocated && now.duration_since(started) >= ALLOCATE_TIMEOUT {
                    end = Some(End::NoAllocation);
                }
                conn.publish();
            }
            _ = stop.changed() => end = Some(End::Shutdown),
        }
        if conn.drain() {
            end = end.or(Some(End::Unbound));
        }
        if let Some(end) = end {
            break end;
        }
    };
    match end {
        End::NoAllocation => counters.refuse(StreamRefusal::NoAllocation),
        End::Framing => counters.refuse(StreamRefusal::Framing),
        End::Closed | End::Unbound | End::Shutdown => {}
    }
    // A connection that ends takes its allocation with it (RFC 8656 §3.1).
    conn.table.handle_disconnect(ep);
    conn.drain();
    conn.publish();
    streams.remove(id);
    drop(conn);
    // The queue's last sender is gone with the registry entry: the writer sends what is left,
    // then closes its side (a TLS close_notify over TLS).
    let _ = tokio::time::timeout(Duration::from_millis(500), writer).await;
}

/// Writes what is queued for a connection, coalescing what is already there into one write.
async fn write<W: AsyncWrite + Unpin>(wr: W, mut queued: mpsc::Receiver<Bytes>) {
    let mut wr = BufWriter::with_capacity(4 * MAX_STREAM_FRAME, wr);
    'outer: while let Some(msg) = queued.recv().await {
        if wr.write_all(&msg).await.is_err() {
            break;
        }
        while let Ok(msg) = queued.try_recv() {
            if wr.write_all(&msg).await.is_err() {
                break 'outer;
            }
        }
        if wr.flush().await.is_err() {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

/// One connection's table and sending state.
struct Conn {
    table: ForwardingTable,
    ctx: Arc<StreamContext>,
    ep: Endpoint,
    kind: StreamKind,
    /// Whether the connection holds an allocation (counted in its transport's `allocated`).
    allocated: bool,
}

impl Conn {
    /// Hands one TURN message to the table and sends what it relays.
    fn message(&mut self, now: Instant, peer: SocketAddr, msg: &[u8]) {
        if let Verdict::Relay(r) = self.table.handle_turn_stream(now, self.ep, peer, msg) {
            let mut out = Out::immediate(self.ctx.udp.as_raw_fd(), self.ctx.quic.as_deref(), msg)
                .streams(Some(&self.ctx.streams));
            out.relayed(&r, 0, msg.len());
            let errors = out.errors();
            self.table.count_send_errors(errors);
        }
    }

    /// Sends what the table queued (answers to this connection) and reads its events; true if
    /// this connection's allocation ended.
    fn drain(&mut self) -> bool {
        let fd = self.ctx.udp.as_raw_fd();
        while let Some(t) = self.table.poll_transmit() {
            let mut out =
                Out::immediate(fd, self.ctx.quic.as_deref(), &[]).streams(Some(&self.ctx.streams));
            out.control(&t);
            let errors = out.errors();
            self.table.count_send_errors(errors);
        }
        let mut ended = false;
        while let Some(e) = self.table.poll_event() {
            crate::log_event(e);
            match e {
                Event::Bound { endpoint, .. } if endpoint == self.ep => self.set_allocated(true),
                Event::Unbound { endpoint, .. } if endpoint == self.ep => {
                    self.set_allocated(false);
                    ended = true;
                }
                _ => {}
            }
        }
        ended
    }

    /// Counts the connection's allocation in or out of its transport's `allocated`.
    fn set_allocated(&mut self, allocated: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if allocated != self.allocated {
            let c = &self.kind.counters(&self.ctx.streams).allocated;
            if allocated {
                c.fetch_add(1, Relaxed);
            } else {
                c.fetch_sub(1, Relaxed);
            }
            self.allocated = allocated;
        }
    }

    /// Adds this connection's counters into its transport's.
    fn publish(&mut self) {
        let mut s = self.table.take_turn_stats();
        s.merge(&self.table.take_stats());
        let shared = match self.kind {
            StreamKind::Tcp => &self.ctx.streams.tcp,
            StreamKind::Tls => &self.ctx.streams.tls,
        };
        shared.add(&s);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.set_allocated(false);
    }
}
