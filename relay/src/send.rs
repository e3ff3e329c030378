//! Sending, for every shell: the one place that matches on the kind of endpoint a datagram goes
//! to. A UDP worker, a QUIC connection and a TURN TCP or TLS connection all hand the core's
//! verdicts to an [`Out`], which queues UDP datagrams for `sendmmsg` (GSO for coalesced bursts),
//! hands QUIC datagrams to the connection registry, [`QuicConns`], and TURN messages for TCP and
//! TLS connections to theirs, [`TurnStreams`]. No transport shell imports another.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrayvec::ArrayVec;
use bytes::Bytes;
use dashmap::DashMap;
use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrIn, SockaddrIn6, SockaddrLike, SockaddrStorage,
    sendmmsg, sendmsg, sendto,
};
use veil_relay_core::table::Relayed;
use veil_relay_core::turn::Frame;
use veil_relay_core::wire::MAX_DATAGRAM;
use veil_relay_core::{ConnId, DropReason, Endpoint, SharedStats, Stats, Transmit};

/// The QUIC connections that hold legs, by id: where every shell sends QUIC datagrams.
pub struct QuicConns {
    conns: DashMap<ConnId, quinn::Connection>,
    /// Counters of the QUIC transport (many writers: added, not published).
    pub stats: Arc<SharedStats>,
    /// Counters of the QUIC endpoint's connections.
    pub counters: QuicCounters,
    next_id: AtomicU64,
}

/// Why the QUIC endpoint turned a connection attempt or a connection away, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuicRefusal {
    /// An attempt from an address not proven by a Retry that could not be retried (its
    /// address-validation token was invalid or stale): dropped unanswered.
    Unvalidated,
    /// No valid BIND on the first stream within 5 s of the handshake.
    NoBind,
    /// The BIND was refused (why: `veil_relay_binds_total{transport="quic"}`).
    BindRefused,
}

impl QuicRefusal {
    /// Every value, in order.
    pub const ALL: [Self; 3] = [Self::Unvalidated, Self::NoBind, Self::BindRefused];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unvalidated => "unvalidated",
            Self::NoBind => "no_bind",
            Self::BindRefused => "bind_refused",
        }
    }
}

/// What the QUIC endpoint counts about connections (per connection event, never per packet;
/// datagrams are added from quinn's own per-connection statistics as each connection
/// publishes).
#[derive(Debug, Default)]
pub struct QuicCounters {
    /// Connections whose handshake completed and that have not ended yet.
    pub open: AtomicU64,
    /// Handshakes completed.
    pub accepted: AtomicU64,
    /// Retry packets sent to prove a client's address.
    pub retries: AtomicU64,
    /// Handshakes that failed or timed out.
    pub handshake_failures: AtomicU64,
    refused: [AtomicU64; 3],
    /// QUIC DATAGRAM frames received.
    pub datagrams_rx: AtomicU64,
    /// QUIC DATAGRAM frames sent.
    pub datagrams_tx: AtomicU64,
}

impl QuicCounters {
    /// Counts a refusal.
    pub fn refuse(&self, why: QuicRefusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals counted for `why`.
    pub fn refused(&self, why: QuicRefusal) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }

    /// Adds one to `c`.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for QuicConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicConns")
            .field("connections", &self.conns.len())
            .finish()
    }
}

impl Default for QuicConns {
    fn default() -> Self {
        Self {
            conns: DashMap::new(),
            stats: Arc::new(SharedStats::default()),
            counters: QuicCounters::default(),
            next_id: AtomicU64::new(1),
        }
    }
}

impl QuicConns {
    /// A fresh connection id.
    pub fn next_id(&self) -> ConnId {
        ConnId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Registers the connection of a bound leg.
    pub fn insert(&self, id: ConnId, conn: quinn::Connection) {
        self.conns.insert(id, conn);
    }

    /// Forgets a connection.
    pub fn remove(&self, id: ConnId) {
        self.conns.remove(&id);
    }

    /// QUIC legs bound now.
    pub fn legs(&self) -> usize {
        self.conns.len()
    }

    /// Queues `pkt` as a QUIC DATAGRAM on connection `conn`; counts failures (connection gone,
    /// datagram larger than the peer accepts, a full send buffer). One datagram fanned out to
    /// several QUIC legs is one `Bytes`, cloned (a reference count), not copied per leg.
    pub fn send_datagram(&self, conn: ConnId, pkt: Bytes) {
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
                    quinn::SendDatagramError::TooLarge => s.count_drop(DropReason::TooLargeForPeer),
                    _ => s.send_errors = 1,
                }
                self.stats.add(&s);
            }
        }
    }
}

/// The TURN TCP and TLS connections, by id: where every shell sends TURN messages for clients
/// connected over a stream. Each connection's task writes what is queued here to its socket.
pub struct TurnStreams {
    conns: DashMap<ConnId, tokio::sync::mpsc::Sender<Bytes>>,
    next_id: AtomicU64,
    /// Counters of the turn-tcp transport (many writers: added, not published).
    pub tcp: Arc<SharedStats>,
    /// Counters of the turn-tls transport.
    pub tls: Arc<SharedStats>,
    /// Connection counters, TCP then TLS.
    pub counters: [StreamCounters; 2],
}

/// Why a TURN TCP or TLS connection was closed by the relay, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRefusal {
    /// --turn-max-connections were open: closed at accept.
    Full,
    /// The TLS handshake failed or did not complete within 5 s.
    Handshake,
    /// No allocation within 10 s of connecting.
    NoAllocation,
    /// Bytes that are neither STUN nor ChannelData, or a message longer than 4 KiB: the stream
    /// cannot be framed any more.
    Framing,
}

impl StreamRefusal {
    /// Every value, in order.
    pub const ALL: [Self; 4] = [
        Self::Full,
        Self::Handshake,
        Self::NoAllocation,
        Self::Framing,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Handshake => "handshake",
            Self::NoAllocation => "no_allocation",
            Self::Framing => "framing",
        }
    }
}

/// What one stream transport (TCP or TLS) counts about its connections.
#[derive(Debug, Default)]
pub struct StreamCounters {
    /// Connections open now (accepted, and for TLS past the handshake).
    pub open: AtomicU64,
    /// Connections accepted (for TLS: whose handshake completed).
    pub accepted: AtomicU64,
    /// Connections holding an allocation now.
    pub allocated: AtomicU64,
    refused: [AtomicU64; 4],
}

impl StreamCounters {
    /// Counts a refusal.
    pub fn refuse(&self, why: StreamRefusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals counted for `why`.
    pub fn refused(&self, why: StreamRefusal) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for TurnStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnStreams")
            .field("connections", &self.conns.len())
            .finish()
    }
}

impl Default for TurnStreams {
    fn default() -> Self {
        Self {
            conns: DashMap::new(),
            next_id: AtomicU64::new(1),
            tcp: Arc::new(SharedStats::default()),
            tls: Arc::new(SharedStats::default()),
            counters: Default::default(),
        }
    }
}

impl TurnStreams {
    /// A fresh connection id.
    pub fn next_id(&self) -> ConnId {
        ConnId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Registers a connection's outgoing queue.
    pub fn insert(&self, id: ConnId, queue: tokio::sync::mpsc::Sender<Bytes>) {
        self.conns.insert(id, queue);
    }

    /// Forgets a connection.
    pub fn remove(&self, id: ConnId) {
        self.conns.remove(&id);
    }

    /// Queues one TURN message (framed, padded) for connection `id`, without waiting: false if
    /// the connection is gone or its queue is full (a client that does not read; the message
    /// is dropped, as a full socket buffer drops a UDP datagram).
    pub fn send(&self, id: ConnId, msg: Bytes) -> bool {
        // `try_send` neither blocks nor awaits, so it runs under the map's read guard: no
        // clone of the sender (an atomic increment and decrement) per message.
        self.conns.get(&id).is_some_and(|q| q.try_send(msg).is_ok())
    }
}

/// Room for the largest relayed TURN datagram: a Data indication over IPv6 (48 bytes of
/// header) around the largest payload a relay forwards, padded.
const RELAYED_CAP: usize = MAX_DATAGRAM + 64;

/// A transaction id for a Data indication: never answered, so only unique enough not to look
/// like a retransmission to a client that compares them.
fn next_txn() -> [u8; 12] {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut t = [0x56u8; 12];
    t[4..].copy_from_slice(&n.to_be_bytes());
    t
}

/// The transaction id a relayed datagram needs: a fresh one for a Data indication, none (zeros,
/// unused) for ChannelData, the per-packet common case.
fn txn_for(r: &Relayed) -> [u8; 12] {
    match r.frame {
        Frame::Data(_) => next_txn(),
        Frame::Channel(_) => [0; 12],
    }
}

/// Sends `bytes` to `dst` without ever blocking: a full socket buffer drops the datagram.
pub fn send_now(fd: RawFd, bytes: &[u8], dst: SocketAddr) -> bool {
    sendto(
        fd,
        bytes,
        &SockaddrStorage::from(dst),
        MsgFlags::MSG_DONTWAIT,
    )
    .is_ok()
}

/// One datagram waiting to leave: where to, and which bytes of the receive buffer (or, for a
/// datagram relayed to a TURN allocation, of the queue's own buffer of framed datagrams).
#[derive(Debug, Clone, Copy)]
pub struct Queued {
    dst: SocketAddr,
    start: usize,
    len: usize,
    framed: bool,
}

/// What a batching sender queues between two `sendmmsg` calls, preallocated once per UDP
/// worker: the datagrams (references into the receive buffer), and the TURN datagrams framed
/// for their receivers (ChannelData on the receiver's channel, Data indications), which cannot
/// be references. Queuing allocates nothing.
#[derive(Debug)]
pub struct SendQueue {
    items: Vec<Queued>,
    /// Room for a batch of framed datagrams (each is written over whatever the last batch
    /// left, and sent for exactly the length written).
    framed: Box<[u8]>,
    /// Bytes of `framed` in use.
    framed_len: usize,
}

impl Default for SendQueue {
    fn default() -> Self {
        Self {
            items: Vec::with_capacity(SEND_BATCH),
            framed: vec![0; SEND_BATCH * RELAYED_CAP].into_boxed_slice(),
            framed_len: 0,
        }
    }
}

/// Datagrams per `sendmmsg`.
pub const SEND_BATCH: usize = 64;

/// The `sendmmsg` headers a batching sender uses, preallocated once per UDP worker: sending
/// allocates nothing.
pub struct Headers<S: PeerAddr> {
    send: MultiHeaders<S>,
    /// One header with room for a `UDP_SEGMENT` control message: a GSO send through it
    /// allocates nothing (`sendmsg` with a control message allocates its buffer per call).
    gso: MultiHeaders<S>,
}

impl<S: PeerAddr> std::fmt::Debug for Headers<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Headers").finish_non_exhaustive()
    }
}

impl<S: PeerAddr> Headers<S> {
    /// Headers for batches of up to `batch` datagrams (at most [`SEND_BATCH`]).
    pub fn new(batch: usize) -> Self {
        Self {
            send: MultiHeaders::preallocate(batch.min(SEND_BATCH), None),
            gso: MultiHeaders::preallocate(1, Some(nix::cmsg_space!(u16))),
        }
    }
}

/// Sends for one receive batch (a UDP worker's, or one QUIC datagram); counts what it could not
/// send.
///
/// Forwarded datagrams are queued as references into the receive buffer (nothing is copied)
/// and leave in `sendmmsg` batches; a burst that arrived coalesced by GRO leaves as one GSO
/// send per target. The queue is flushed before any other send, so that datagrams to one
/// destination keep their order.
pub struct Out<'a, S: PeerAddr> {
    fd: RawFd,
    quic: Option<&'a QuicConns>,
    streams: Option<&'a TurnStreams>,
    buf: &'a [u8],
    /// Batching state; without it (a QUIC connection, whose task cannot hold `sendmmsg`
    /// headers across an `.await`), each UDP datagram leaves at once with `sendto`.
    batch: Option<Batch<'a, S>>,
    /// The last datagram copied out for QUIC legs (its offset in the receive buffer, and the
    /// copy): its other QUIC targets share the copy.
    quic_copy: Option<(usize, Bytes)>,
    max_gso: usize,
    errors: u64,
}

impl<'a> Out<'a, SockaddrIn6> {
    /// A sender that sends each UDP datagram at once (`sendto`), for datagrams in `buf`: what a
    /// QUIC connection's task uses, as it cannot hold `sendmmsg` headers across an `.await`. It
    /// queues nothing, so it names no socket address type of its own (`SockaddrIn6` is only the
    /// type parameter's filler; `sendto` takes either family).
    pub fn immediate(fd: RawFd, quic: Option<&'a QuicConns>, buf: &'a [u8]) -> Self {
        Self {
            fd,
            quic,
            streams: None,
            buf,
            batch: None,
            quic_copy: None,
            max_gso: 1,
            errors: 0,
        }
    }
}

impl<S: PeerAddr> std::fmt::Debug for Out<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Out")
            .field("batched", &self.batch.is_some())
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

struct Batch<'a, S: PeerAddr> {
    queue: &'a mut SendQueue,
    headers: &'a mut MultiHeaders<S>,
    /// One header with room for a `UDP_SEGMENT` control message: a GSO send through it
    /// allocates nothing (`sendmsg` with a control message allocates its buffer per call).
    gso_header: &'a mut MultiHeaders<S>,
}

impl<'a, S: PeerAddr> Out<'a, S> {
    /// A batching sender for datagrams received into `buf`, sending UDP from `fd` in `sendmmsg`
    /// batches (`headers` and `queue` preallocated by the caller) and QUIC through `quic`;
    /// `max_gso` is how many datagrams one GSO send may carry (1: no GSO).
    pub fn batched(
        fd: RawFd,
        quic: Option<&'a QuicConns>,
        buf: &'a [u8],
        headers: &'a mut Headers<S>,
        queue: &'a mut SendQueue,
        max_gso: usize,
    ) -> Self {
        Self {
            fd,
            quic,
            streams: None,
            buf,
            batch: Some(Batch {
                queue,
                headers: &mut headers.send,
                gso_header: &mut headers.gso,
            }),
            quic_copy: None,
            max_gso,
            errors: 0,
        }
    }

    /// Shares `bytes`, the whole receive buffer as one `Bytes`, with QUIC targets instead of
    /// copying it (a QUIC datagram fanned out to other QUIC legs is never copied).
    pub fn sharing(mut self, bytes: Bytes) -> Self {
        self.quic_copy = Some((0, bytes));
        self
    }

    /// Sends TURN messages for TCP and TLS connections through `streams`.
    pub fn streams(mut self, streams: Option<&'a TurnStreams>) -> Self {
        self.streams = streams;
        self
    }

    /// Queues `msg` for TURN connection `id`; counts a failure.
    fn stream(&mut self, id: ConnId, msg: Bytes) {
        if !self.streams.is_some_and(|s| s.send(id, msg)) {
            self.errors += 1;
        }
    }

    /// The receive buffer the datagrams are taken from.
    pub fn buf(&self) -> &'a [u8] {
        self.buf
    }

    /// Datagrams this sender failed to send so far.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// Sends a control message the core originated. Returns false, sending nothing, for a
    /// reliable message to a QUIC leg: the shell of that connection writes it on the leg's
    /// control stream.
    pub fn control(&mut self, t: &Transmit) -> bool {
        match t.dst {
            Endpoint::Udp(dst) | Endpoint::TurnUdp(dst) => {
                self.now(dst, t.msg.as_bytes(), None);
                true
            }
            Endpoint::Quic(_) if t.reliable => false,
            Endpoint::Quic(conn) => {
                match self.quic {
                    Some(q) => q.send_datagram(conn, Bytes::copy_from_slice(t.msg.as_bytes())),
                    None => self.errors += 1,
                }
                true
            }
            // STUN messages are a multiple of 4 bytes long: framed as they are.
            Endpoint::TurnTcp(id) | Endpoint::TurnTls(id) => {
                self.stream(id, Bytes::copy_from_slice(t.msg.as_bytes()));
                true
            }
        }
    }

    /// Sends a datagram the core relays to a TURN allocation: the payload at `start..` of the
    /// receive buffer (`r.payload` is relative to the received datagram at `start`), framed
    /// for the receiver.
    pub fn relayed(&mut self, r: &Relayed, start: usize, len: usize) {
        let pkt = &self.buf[start..start + len];
        match (r.dst, &mut self.batch) {
            // Batching: framed into the queue's own buffer, sent with the rest of the batch.
            (Endpoint::TurnUdp(dst), Some(b)) => {
                // A batch holds at most SEND_BATCH datagrams, each framed one in RELAYED_CAP.
                let at = b.queue.framed_len;
                let n = r.datagram(pkt, &mut b.queue.framed[at..at + RELAYED_CAP], &txn_for(r));
                b.queue.framed_len = at + n;
                b.queue.items.push(Queued {
                    dst,
                    start: at,
                    len: n,
                    framed: true,
                });
                if b.queue.items.len() >= SEND_BATCH {
                    self.flush();
                }
            }
            (Endpoint::TurnUdp(dst), None) => {
                let mut scratch = [0u8; RELAYED_CAP];
                let n = r.datagram(pkt, &mut scratch, &txn_for(r));
                self.now(dst, &scratch[..n], None);
            }
            // Over a stream, ChannelData is padded to a multiple of 4 bytes (RFC 8656 §12.5);
            // the padding bytes are zero.
            (Endpoint::TurnTcp(id) | Endpoint::TurnTls(id), _) => {
                let mut scratch = [0u8; RELAYED_CAP];
                let n = r.datagram(pkt, &mut scratch, &txn_for(r));
                let padded = n.next_multiple_of(4);
                self.stream(id, Bytes::copy_from_slice(&scratch[..padded]));
            }
            // The core relays TURN only to TURN allocations.
            (Endpoint::Udp(_) | Endpoint::Quic(_), _) => self.errors += 1,
        }
    }

    /// Relays a GRO burst of ChannelData to one TURN allocation: the `stride`-sized datagrams
    /// at `start..start + len` of the receive buffer, every one of which the core relayed to
    /// `dst` on `channel` with its payload filling the datagram (no padding). ChannelData in is
    /// ChannelData out with the channel number rewritten, so the burst is copied once, its
    /// channel numbers rewritten, and sent as GSO sends of `max_gso` datagrams.
    pub fn relayed_burst(
        &mut self,
        dst: SocketAddr,
        channel: u16,
        start: usize,
        len: usize,
        stride: usize,
    ) {
        if self.max_gso <= 1 || self.batch.is_none() || len > SEND_BATCH * RELAYED_CAP {
            for off in (0..len).step_by(stride) {
                let n = stride.min(len - off);
                let mut frame = [0u8; RELAYED_CAP];
                frame[..n].copy_from_slice(&self.buf[start + off..start + off + n]);
                frame[..2].copy_from_slice(&channel.to_be_bytes());
                self.now(dst, &frame[..n], None);
            }
            return;
        }
        // Whatever is queued leaves first (its framed datagrams free the buffer), in order.
        self.flush();
        let b = self.batch.as_mut().expect("checked above");
        let mut framed = std::mem::take(&mut b.queue.framed);
        framed[..len].copy_from_slice(&self.buf[start..start + len]);
        for off in (0..len).step_by(stride) {
            framed[off..off + 2].copy_from_slice(&channel.to_be_bytes());
        }
        for chunk in framed[..len].chunks(stride * self.max_gso) {
            let seg = (chunk.len() > stride).then_some(stride);
            self.now(dst, chunk, seg);
        }
        if let Some(b) = self.batch.as_mut() {
            b.queue.framed = framed;
        }
    }

    /// Sends `contents` at once (control messages, GSO bursts), after whatever is queued:
    /// `segment_size` makes it one GSO send of datagrams of that size (the last may be shorter).
    pub fn now(&mut self, destination: SocketAddr, contents: &[u8], segment_size: Option<usize>) {
        self.flush();
        let iov = [IoSlice::new(contents)];
        // Nonblocking: a full send buffer drops the datagrams (counted) rather than delaying the
        // rest of the batch behind them, as a media relay should.
        let gso = self.batch.as_mut().map(|b| &mut *b.gso_header);
        let sent = match (segment_size, gso) {
            (Some(seg), Some(gso_header)) => {
                let seg = seg as u16;
                let cmsgs = [ControlMessage::UdpGsoSegments(&seg)];
                let iovs = [iov];
                sendmmsg(
                    self.fd,
                    gso_header,
                    &iovs,
                    [S::from_std(destination)],
                    cmsgs,
                    MsgFlags::MSG_DONTWAIT,
                )
                .is_ok_and(|mut r| r.next().is_some())
            }
            // `burst` asks for GSO only where `max_gso > 1`, which only a batching sender has.
            (Some(_), None) => false,
            (None, _) => {
                let addr = SockaddrStorage::from(destination);
                sendmsg(self.fd, &iov, &[], MsgFlags::MSG_DONTWAIT, Some(&addr)).is_ok()
            }
        };
        if !sent {
            self.errors += segment_size.map_or(1, |s| contents.len().div_ceil(s)) as u64;
        }
    }

    /// Queues (UDP) or sends (QUIC) the datagram at `start..start + len` of the receive buffer.
    #[inline]
    pub fn to(&mut self, ep: Endpoint, start: usize, len: usize) {
        match ep {
            Endpoint::Udp(dst) | Endpoint::TurnUdp(dst) => match &mut self.batch {
                Some(b) => {
                    b.queue.items.push(Queued {
                        dst,
                        start,
                        len,
                        framed: false,
                    });
                    if b.queue.items.len() >= SEND_BATCH {
                        self.flush();
                    }
                }
                None => {
                    if !send_now(self.fd, &self.buf[start..start + len], dst) {
                        self.errors += 1;
                    }
                }
            },
            // The QUIC registry counts its own failures.
            Endpoint::Quic(conn) => {
                let Some(quic) = self.quic else {
                    self.errors += 1;
                    return;
                };
                let pkt = match &self.quic_copy {
                    Some((at, copy)) if *at == start && copy.len() == len => copy.clone(),
                    _ => {
                        let copy = Bytes::copy_from_slice(&self.buf[start..start + len]);
                        self.quic_copy = Some((start, copy.clone()));
                        copy
                    }
                };
                quic.send_datagram(conn, pkt);
            }
            // The core forwards to TURN allocations only as addressed, framed `Relayed`
            // datagrams, never as a native fan-out.
            Endpoint::TurnTcp(_) | Endpoint::TurnTls(_) => self.errors += 1,
        }
    }

    /// Sends the `stride`-sized datagrams at `start..start + len`, back to back, to `ep`: one
    /// GSO send per `max_gso` datagrams over UDP, one datagram at a time otherwise.
    pub fn burst(&mut self, ep: Endpoint, start: usize, len: usize, stride: usize) {
        let buf = self.buf;
        match ep {
            Endpoint::Udp(dst) if self.max_gso > 1 => {
                for chunk in buf[start..start + len].chunks(stride * self.max_gso) {
                    let seg = (chunk.len() > stride).then_some(stride);
                    self.now(dst, chunk, seg);
                }
            }
            _ => {
                for off in (0..len).step_by(stride) {
                    self.to(ep, start + off, stride.min(len - off));
                }
            }
        }
    }

    /// Sends everything queued, `SEND_BATCH` datagrams per system call.
    pub fn flush(&mut self) {
        let Some(b) = self.batch.as_mut() else {
            return;
        };
        let Batch { queue, headers, .. } = b;
        let (items, framed) = (&queue.items, &queue.framed);
        let mut done = 0;
        while done < items.len() {
            let chunk = &items[done..(done + SEND_BATCH).min(items.len())];
            // Only as many entries as datagrams: a socket address takes 128 bytes, and filling a
            // whole batch's worth for a wake-up that carries one datagram showed in profiles.
            let mut iovs: ArrayVec<[IoSlice<'_>; 1], SEND_BATCH> = ArrayVec::new();
            let mut addrs: ArrayVec<Option<S>, SEND_BATCH> = ArrayVec::new();
            for q in chunk {
                let from = if q.framed { &framed[..] } else { self.buf };
                iovs.push([IoSlice::new(&from[q.start..q.start + q.len])]);
                // Every destination is a client of this very socket, hence of its family.
                addrs.push(S::from_std(q.dst));
            }
            let sent = sendmmsg(
                self.fd,
                headers,
                &iovs,
                &addrs,
                &[] as &[ControlMessage<'_>],
                MsgFlags::MSG_DONTWAIT,
            )
            .map(|r| r.count());
            match sent {
                Ok(0) | Err(Errno::EAGAIN) => {
                    // The socket buffer is full: the rest of the queue would fail too.
                    self.errors += (items.len() - done) as u64;
                    break;
                }
                Ok(k) => done += k,
                // One datagram the kernel refuses (an unroutable address, say) must not hold
                // up the others: skip it.
                Err(_) => {
                    self.errors += 1;
                    done += 1;
                }
            }
        }
        queue.items.clear();
        queue.framed_len = 0;
    }
}

/// The socket address type of one worker's socket: `sockaddr_in` for an IPv4 socket,
/// `sockaddr_in6` for an IPv6 one (IPv4 clients of a dual-stack socket appear v4-mapped). The
/// exact type rather than a 128-byte `sockaddr_storage` keeps the per-batch headers small.
pub trait PeerAddr: SockaddrLike + Copy {
    /// As a standard socket address.
    fn to_std(&self) -> SocketAddr;
    /// From a standard socket address; `None` if it is of the other family.
    fn from_std(a: SocketAddr) -> Option<Self>;
}

impl PeerAddr for SockaddrIn {
    fn to_std(&self) -> SocketAddr {
        SocketAddr::V4((*self).into())
    }

    fn from_std(a: SocketAddr) -> Option<Self> {
        match a {
            SocketAddr::V4(v4) => Some(v4.into()),
            SocketAddr::V6(_) => None,
        }
    }
}

impl PeerAddr for SockaddrIn6 {
    fn to_std(&self) -> SocketAddr {
        SocketAddr::V6((*self).into())
    }

    fn from_std(a: SocketAddr) -> Option<Self> {
        match a {
            SocketAddr::V6(v6) => Some(v6.into()),
            SocketAddr::V4(v4) => {
                Some(std::net::SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0).into())
            }
        }
    }
}
