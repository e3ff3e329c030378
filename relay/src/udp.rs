//! The UDP transport: N IO workers, each a thread with its own `SO_REUSEPORT` socket on the media
//! port and its own [`veil_relay_core::Relay`]. The kernel hashes each client's 4-tuple to one
//! worker, so a client always meets the same worker; the session directory the workers share
//! lets a worker forward to legs bound through the others.
//!
//! Each worker is a plain thread, no async runtime: it blocks in `recvmmsg(MSG_WAITFORONE)` until
//! at least one datagram is there (or its receive timeout passes, which drives its timers), takes
//! the whole batch (and GRO-coalesced runs where the kernel offers GRO), runs it through the
//! sans-IO core with one clock reading, and sends what the verdicts say with `sendmmsg`, then
//! publishes its counters. A wake-up costs one system call to receive and one to send, whatever
//! the batch holds. Datagrams that arrived coalesced by GRO and are all forwarded leave as one
//! GSO send per target.

use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arrayvec::ArrayVec;
use bytes::Bytes;
use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrIn, SockaddrIn6,
    SockaddrLike, SockaddrStorage, recvmmsg, sendmmsg, sendmsg, sendto, setsockopt, sockopt,
};
use prometheus::Histogram;
use tokio::sync::watch;
use veil_ops::redact::Redacted;
use veil_relay_core::wire::MAX_DATAGRAM;
use veil_relay_core::{DropReason, Endpoint, Event, Node, Relay, SharedStats, Verdict};

use crate::quic::QuicSink;

/// Datagrams per `recvmmsg`.
const BATCH: usize = 32;
/// How long a worker waits for datagrams before it runs its timers anyway.
const TICK: Duration = Duration::from_millis(50);
/// How often a busy worker publishes its counters for the metrics endpoint.
const PUBLISH_EVERY: Duration = Duration::from_millis(5);
/// Most datagrams one GSO send may carry (the kernel's limit, `UDP_MAX_SEGMENTS`).
const MAX_GSO_SEGMENTS: usize = 64;
/// Socket buffer size asked for; the kernel caps it at net.core.{r,w}mem_max.
const SOCKET_BUFFER: usize = 8 << 20;

/// Binds `n` sockets to `addr` with `SO_REUSEPORT` (port 0 picks one port for all of them).
pub fn bind_sockets(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<std::net::UdpSocket>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut addr = addr;
    let mut sockets = Vec::with_capacity(n);
    for i in 0..n {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .context("create UDP socket")?;
        if addr.is_ipv6() {
            // `[::]` serves IPv4 too (as v4-mapped addresses).
            socket.set_only_v6(false).context("clear IPV6_V6ONLY")?;
        }
        socket.set_reuse_port(true).context("set SO_REUSEPORT")?;
        socket.set_nonblocking(true)?;
        // Best effort: a smaller buffer works, it only drops earlier under bursts.
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        socket
            .bind(&addr.into())
            .with_context(|| format!("bind media socket {addr} (worker {i})"))?;
        if addr.port() == 0 {
            addr = socket.local_addr()?.as_socket().context("local address")?;
        }
        sockets.push(socket.into());
    }
    Ok(sockets)
}

/// What a worker thread needs.
pub struct WorkerContext {
    /// Worker index, for thread names and logs.
    pub index: usize,
    /// Its socket.
    pub socket: std::net::UdpSocket,
    /// The node's shared state.
    pub node: Arc<Node>,
    /// Where it publishes its counters.
    pub stats: Arc<SharedStats>,
    /// Batch forwarding latency.
    pub latency: Histogram,
    /// Sends to QUIC legs.
    pub quic: Arc<dyn QuicSink>,
    /// Where the worker publishes the CPU time its thread has used, in nanoseconds.
    pub cpu_ns: Arc<std::sync::atomic::AtomicU64>,
    /// Turns true to stop the worker.
    pub shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerContext")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// Starts a worker thread.
pub fn spawn(ctx: WorkerContext) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let name = format!("veil-udp-{}", ctx.index);
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let index = ctx.index;
            if let Err(e) = run(ctx) {
                tracing::error!(worker = index, error = %format!("{e:#}"), "UDP worker failed");
            }
        })
        .context("spawn UDP worker")
}

/// Sends `bytes` to `dst` without ever blocking: a full socket buffer drops the datagram.
pub(crate) fn send_now(fd: RawFd, bytes: &[u8], dst: SocketAddr) -> bool {
    sendto(
        fd,
        bytes,
        &SockaddrStorage::from(dst),
        MsgFlags::MSG_DONTWAIT,
    )
    .is_ok()
}

/// One datagram waiting to leave: where to, and which bytes of the receive buffer.
#[derive(Debug, Clone, Copy)]
struct Queued {
    dst: SocketAddr,
    start: usize,
    len: usize,
}

/// Datagrams per `sendmmsg`.
const SEND_BATCH: usize = 64;

/// Sends for one worker, for one receive batch; counts what it could not send.
///
/// Forwarded datagrams are queued as references into the receive buffer (nothing is copied)
/// and leave in `sendmmsg` batches; a burst that arrived coalesced by GRO leaves as one GSO
/// send per target. The queue is flushed before any other send, so that datagrams to one
/// destination keep their order.
struct Out<'a, S: PeerAddr> {
    fd: RawFd,
    quic: &'a dyn QuicSink,
    buf: &'a [u8],
    queue: &'a mut Vec<Queued>,
    headers: &'a mut MultiHeaders<S>,
    /// One header with room for a `UDP_SEGMENT` control message: a GSO send through it
    /// allocates nothing (`sendmsg` with a control message allocates its buffer per call).
    gso_header: &'a mut MultiHeaders<S>,
    /// The last datagram copied out for QUIC legs (its offset in the receive buffer, and the
    /// copy): its other QUIC targets share the copy.
    quic_copy: Option<(usize, Bytes)>,
    max_gso: usize,
    errors: u64,
}

impl<S: PeerAddr> Out<'_, S> {
    /// Sends `contents` at once (control messages, GSO bursts), after whatever is queued:
    /// `segment_size` makes it one GSO send of datagrams of that size (the last may be shorter).
    fn now(&mut self, destination: SocketAddr, contents: &[u8], segment_size: Option<usize>) {
        self.flush();
        let iov = [IoSlice::new(contents)];
        // Nonblocking: a full send buffer drops the datagrams (counted) rather than delaying the
        // rest of the batch behind them, as a media relay should.
        let sent = match segment_size {
            Some(seg) => {
                let seg = seg as u16;
                let cmsgs = [ControlMessage::UdpGsoSegments(&seg)];
                let iovs = [iov];
                sendmmsg(
                    self.fd,
                    self.gso_header,
                    &iovs,
                    [S::from_std(destination)],
                    cmsgs,
                    MsgFlags::MSG_DONTWAIT,
                )
                .is_ok_and(|mut r| r.next().is_some())
            }
            None => {
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
    fn to(&mut self, ep: Endpoint, start: usize, len: usize) {
        match ep {
            Endpoint::Udp(dst) => {
                self.queue.push(Queued { dst, start, len });
                if self.queue.len() >= SEND_BATCH {
                    self.flush();
                }
            }
            // The QUIC sink counts its own failures.
            Endpoint::Quic(conn) => {
                let pkt = match &self.quic_copy {
                    Some((at, copy)) if *at == start && copy.len() == len => copy.clone(),
                    _ => {
                        let copy = Bytes::copy_from_slice(&self.buf[start..start + len]);
                        self.quic_copy = Some((start, copy.clone()));
                        copy
                    }
                };
                self.quic.send(conn, pkt);
            }
        }
    }

    /// Sends the `stride`-sized datagrams at `start..start + len`, back to back, to `ep`: one
    /// GSO send per `max_gso` datagrams over UDP, one datagram at a time otherwise.
    fn burst(&mut self, ep: Endpoint, start: usize, len: usize, stride: usize) {
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
    fn flush(&mut self) {
        let mut done = 0;
        while done < self.queue.len() {
            let chunk = &self.queue[done..(done + SEND_BATCH).min(self.queue.len())];
            // Only as many entries as datagrams: a socket address takes 128 bytes, and filling a
            // whole batch's worth for a wake-up that carries one datagram showed in profiles.
            let mut iovs: ArrayVec<[IoSlice<'_>; 1], SEND_BATCH> = ArrayVec::new();
            let mut addrs: ArrayVec<Option<S>, SEND_BATCH> = ArrayVec::new();
            for q in chunk {
                iovs.push([IoSlice::new(&self.buf[q.start..q.start + q.len])]);
                // Every destination is a client of this very socket, hence of its family.
                addrs.push(S::from_std(q.dst));
            }
            let sent = sendmmsg(
                self.fd,
                self.headers,
                &iovs,
                &addrs,
                &[] as &[ControlMessage<'_>],
                MsgFlags::MSG_DONTWAIT,
            )
            .map(|r| r.count());
            match sent {
                Ok(0) | Err(Errno::EAGAIN) => {
                    // The socket buffer is full: the rest of the queue would fail too.
                    self.errors += (self.queue.len() - done) as u64;
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
        self.queue.clear();
    }
}

/// The socket address type of one worker's socket: `sockaddr_in` for an IPv4 socket,
/// `sockaddr_in6` for an IPv6 one (IPv4 clients of a dual-stack socket appear v4-mapped). The
/// exact type rather than a 128-byte `sockaddr_storage` keeps the per-batch headers small.
trait PeerAddr: SockaddrLike + Copy {
    fn to_std(&self) -> SocketAddr;
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

/// What `recvmmsg` said of one receive buffer.
#[derive(Debug, Clone, Copy)]
struct Meta {
    addr: SocketAddr,
    len: usize,
    /// Size of each coalesced datagram (GRO); 0 when the buffer holds one datagram.
    stride: usize,
}

fn run(ctx: WorkerContext) -> anyhow::Result<()> {
    if ctx.socket.local_addr()?.is_ipv4() {
        run_with::<SockaddrIn>(ctx)
    } else {
        run_with::<SockaddrIn6>(ctx)
    }
}

fn run_with<S: PeerAddr>(ctx: WorkerContext) -> anyhow::Result<()> {
    let WorkerContext {
        index,
        socket,
        node,
        stats,
        latency,
        quic,
        cpu_ns,
        shutdown,
    } = ctx;
    socket
        .set_nonblocking(false)
        .context("blocking media socket")?;
    socket
        .set_read_timeout(Some(TICK))
        .context("media socket receive timeout")?;
    let fd = socket.as_raw_fd();
    // GRO (Linux 5.0) and GSO (4.18) where the kernel has them; without them, one datagram per
    // buffer and per send.
    // GRO where the kernel has it, switched on only while bursts arrive (see `Gro`).
    let mut gro = Gro::probe(&socket);
    let max_gso = if nix::sys::socket::getsockopt(&socket, sockopt::UdpGsoSegment).is_ok() {
        MAX_GSO_SEGMENTS
    } else {
        1
    };
    // With GRO one buffer holds many datagrams; without it, one datagram plus a byte to tell
    // an oversized one from one that fits.
    let slot = if gro.supported {
        u16::MAX as usize
    } else {
        MAX_DATAGRAM + 1
    };
    let mut buf = vec![0u8; slot * BATCH];
    let mut headers = MultiHeaders::<S>::preallocate(BATCH, gro.cmsg());
    let mut send_headers = MultiHeaders::<S>::preallocate(SEND_BATCH, None);
    let mut gso_header = MultiHeaders::<S>::preallocate(1, Some(nix::cmsg_space!(u16)));
    let mut meta: Vec<Meta> = Vec::with_capacity(BATCH);
    let mut relay = Relay::new(node, Instant::now());
    let mut targets: Vec<Endpoint> = Vec::with_capacity(16);
    let mut forwarded: Vec<bool> = Vec::with_capacity(64);
    let mut queue: Vec<Queued> = Vec::with_capacity(SEND_BATCH);
    // Observed locally, merged into the shared histogram when the counters are published.
    let latency = latency.local();
    let mut published = Instant::now();
    // Counters handled since the last publish: while there are, the worker waits at most
    // PUBLISH_EVERY for more datagrams, so that a scrape never lags a quiet relay by a tick.
    let mut unpublished = false;
    let mut timeout = TICK;
    tracing::debug!(
        worker = index,
        gro = gro.supported,
        gso = max_gso,
        "UDP worker started"
    );

    while !*shutdown.borrow() {
        meta.clear();
        let mut cmsg_spent = false;
        {
            let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] = {
                let mut chunks = buf.chunks_mut(slot);
                std::array::from_fn(|_| [IoSliceMut::new(chunks.next().expect("BATCH slots"))])
            };
            // Blocks until at least one datagram is there, then takes what is queued.
            match recvmmsg(
                fd,
                &mut headers,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(res) => {
                    for r in res {
                        let Some(addr) = r.address.as_ref().map(PeerAddr::to_std) else {
                            continue;
                        };
                        let stride = r
                            .cmsgs()
                            .ok()
                            .and_then(|mut c| {
                                c.find_map(|m| match m {
                                    ControlMessageOwned::UdpGroSegments(s) => Some(s as usize),
                                    _ => None,
                                })
                            })
                            .unwrap_or(0);
                        // The kernel wrote this header's control length back as 0.
                        cmsg_spent |= gro.on && stride == 0;
                        meta.push(Meta {
                            addr,
                            len: r.bytes,
                            stride,
                        });
                    }
                }
                // The receive timeout: time for the timers.
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                // An ICMP error queued on the socket (ECONNREFUSED and the like) may be injected
                // by an attacker: note it and carry on.
                Err(e) => tracing::trace!(worker = index, error = %e, "recv error"),
            }
        }
        let now = Instant::now();
        if gro.update(&socket, &meta, now) || cmsg_spent {
            // Switched, or a header came back without its control message: the kernel writes
            // each header's control length back (the space it used: the same for every GRO
            // segment size, 0 without one) and nix does not restore it, so fresh headers, or a
            // later burst would lose its segment size.
            headers = MultiHeaders::preallocate(BATCH, gro.cmsg());
        }
        if !meta.is_empty() {
            let mut out = Out {
                fd,
                quic: &*quic,
                buf: &buf,
                queue: &mut queue,
                headers: &mut send_headers,
                gso_header: &mut gso_header,
                quic_copy: None,
                max_gso,
                errors: 0,
            };
            for (i, m) in meta.iter().enumerate() {
                handle(
                    &mut relay,
                    &mut out,
                    now,
                    m,
                    i * slot,
                    &mut targets,
                    &mut forwarded,
                );
            }
            out.flush();
            flush_control(&mut relay, &mut out);
            let errors = out.errors;
            relay.count_send_errors(errors);
            latency.observe(now.elapsed().as_secs_f64());
        }
        // Counters and the latency histogram go out every few milliseconds, not at every
        // wake-up: a wake-up at moderate load carries a datagram or two, and publishing is
        // dozens of shared writes.
        unpublished |= !meta.is_empty();
        if unpublished && now.saturating_duration_since(published) >= PUBLISH_EVERY {
            stats.publish(relay.stats());
            latency.flush();
            published = now;
            unpublished = false;
        }
        if relay.poll_timeout().is_none_or(|t| now >= t) {
            cpu_ns.store(thread_cpu_ns(), std::sync::atomic::Ordering::Relaxed);
            relay.handle_timeout(now);
            let mut out = Out {
                fd,
                quic: &*quic,
                buf: &buf,
                queue: &mut queue,
                headers: &mut send_headers,
                gso_header: &mut gso_header,
                quic_copy: None,
                max_gso: 1,
                errors: 0,
            };
            flush_control(&mut relay, &mut out);
            let errors = out.errors;
            relay.count_send_errors(errors);
            stats.publish(relay.stats());
            latency.flush();
            published = now;
            unpublished = false;
        }
        // One setsockopt when the worker goes quiet or gets busy, none while it stays either.
        let want = if unpublished { PUBLISH_EVERY } else { TICK };
        if want != timeout {
            socket
                .set_read_timeout(Some(want))
                .context("media socket receive timeout")?;
            timeout = want;
        }
    }
    stats.publish(relay.stats());
    latency.flush();
    tracing::debug!(worker = index, "UDP worker stopped");
    Ok(())
}

/// Receive offload, on while it pays. With GRO on, the kernel hands over a burst of equal-size
/// datagrams from one source as one buffer, and the worker forwards it as one GSO send per
/// target: for video frames, half the CPU per datagram. But reading the segment size takes a
/// control message, and fresh receive headers after every datagram that arrives uncoalesced (the
/// kernel zeroes its header's control length), a few tenths of a microsecond per wake-up: more
/// than it saves when nothing coalesces (audio, or loopback without GSO senders).
/// So GRO is tried when a batch holds a run of equal-size datagrams from one source (as a burst
/// appears without GRO), kept while buffers actually arrive coalesced, and switched off after a
/// second without one; a failed trial waits before the next (10 s, doubling to 5 min).
#[derive(Debug)]
struct Gro {
    supported: bool,
    on: bool,
    last_coalesced: Instant,
    retry_at: Instant,
    backoff: Duration,
}

/// Equal-size datagrams in a row from one source that suggest a burst worth coalescing.
const BURST_RUN: usize = 4;
/// How long GRO stays on without a coalesced buffer.
const GRO_LINGER: Duration = Duration::from_secs(1);
/// Wait after a trial that coalesced nothing, at first and at most.
const GRO_BACKOFF: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(300));

impl Gro {
    fn probe(socket: &std::net::UdpSocket) -> Self {
        let supported = setsockopt(socket, sockopt::UdpGroSegment, &false).is_ok();
        let now = Instant::now();
        Self {
            supported,
            on: false,
            last_coalesced: now,
            retry_at: now,
            backoff: GRO_BACKOFF.0,
        }
    }

    fn cmsg(&self) -> Option<Vec<u8>> {
        self.on.then(|| nix::cmsg_space!(i32))
    }

    /// Looks at a batch; switches GRO on or off if it should. Returns true if it switched.
    fn update(&mut self, socket: &std::net::UdpSocket, meta: &[Meta], now: Instant) -> bool {
        if !self.supported {
            return false;
        }
        let want = if self.on {
            if meta.iter().any(|m| m.stride > 0 && m.len > m.stride) {
                self.last_coalesced = now;
                self.backoff = GRO_BACKOFF.0;
            }
            let keep = now.saturating_duration_since(self.last_coalesced) < GRO_LINGER;
            if !keep {
                self.retry_at = now + self.backoff;
                self.backoff = (self.backoff * 2).min(GRO_BACKOFF.1);
            }
            keep
        } else {
            let mut run = 1;
            now >= self.retry_at
                && meta.windows(2).any(|w| {
                    run = if w[0].addr == w[1].addr && w[0].len == w[1].len {
                        run + 1
                    } else {
                        1
                    };
                    run >= BURST_RUN
                })
        };
        if want == self.on {
            return false;
        }
        // A failure leaves GRO as it was; a later batch tries again.
        if setsockopt(socket, sockopt::UdpGroSegment, &want).is_err() {
            return false;
        }
        self.on = want;
        if want {
            self.last_coalesced = now;
        }
        true
    }
}

/// CPU time this thread has used, nanoseconds (0 if the clock is unavailable).
fn thread_cpu_ns() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn flush_control<S: PeerAddr>(relay: &mut Relay, out: &mut Out<'_, S>) {
    while let Some(t) = relay.poll_transmit() {
        out.now(t.dst, t.msg.as_bytes(), None);
    }
    while let Some(e) = relay.poll_event() {
        log_event(e);
    }
}

/// Logs a leg event. Addresses only ever appear redacted.
pub(crate) fn log_event(e: Event) {
    match e {
        Event::Bound {
            session,
            leg,
            peer,
            moved,
        } => {
            tracing::debug!(%session, leg, peer = %Redacted(peer), moved, "leg bound");
        }
        Event::Unbound {
            session,
            leg,
            peer,
            why,
        } => {
            tracing::debug!(%session, leg, peer = %Redacted(peer), ?why, "leg unbound");
        }
    }
}

/// Handles one receive buffer, at `base` in the batch buffer: a single datagram, or several
/// coalesced by GRO (same source, `stride` bytes each, the last possibly shorter).
#[inline]
fn handle<S: PeerAddr>(
    relay: &mut Relay,
    out: &mut Out<'_, S>,
    now: Instant,
    m: &Meta,
    base: usize,
    targets: &mut Vec<Endpoint>,
    forwarded: &mut Vec<bool>,
) {
    let data = &out.buf[base..base + m.len];
    let stride = if m.stride == 0 {
        data.len().max(1)
    } else {
        m.stride
    };
    if stride > MAX_DATAGRAM {
        for seg in data.chunks(stride) {
            relay.count_shell_drop(seg.len(), DropReason::Oversized);
        }
        return;
    }
    if data.len() <= stride {
        if let Verdict::Forward(t) = relay.handle_datagram(now, m.addr, data) {
            for ep in t.iter() {
                out.to(ep, base, data.len());
            }
        }
        return;
    }
    // Coalesced datagrams share a source, hence a leg and its targets: decide each, and if all
    // are forwarded, send the whole run to each target at once.
    targets.clear();
    forwarded.clear();
    for seg in data.chunks(stride) {
        let v = relay.handle_datagram(now, m.addr, seg);
        if let Verdict::Forward(t) = &v {
            targets.clear();
            targets.extend(t.iter());
        }
        forwarded.push(matches!(v, Verdict::Forward(_)));
    }
    if forwarded.iter().all(|f| *f) {
        for ep in targets.iter() {
            out.burst(*ep, base, data.len(), stride);
        }
    } else {
        for (k, _) in forwarded.iter().enumerate().filter(|(_, f)| **f) {
            let off = k * stride;
            for ep in targets.iter() {
                out.to(*ep, base + off, stride.min(data.len() - off));
            }
        }
    }
}
