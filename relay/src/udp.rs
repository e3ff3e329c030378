//! The UDP transport: N IO workers, each a thread with its own `SO_REUSEPORT` socket on the media
//! port and its own [`veil_relay_core::ForwardingTable`]. The kernel hashes each client's 4-tuple to one
//! worker, so a client always meets the same worker; the session directory the workers share
//! lets a worker forward to legs bound through the others.
//!
//! The worker only reads and calls the core; what to send goes through [`crate::send`], as it
//! does for QUIC connections.
//!
//! Each worker is a plain thread, no async runtime: it blocks in `recvmmsg(MSG_WAITFORONE)` until
//! at least one datagram is there (or its receive timeout passes, which drives its timers), takes
//! the whole batch (and GRO-coalesced runs where the kernel offers GRO), runs it through the
//! sans-IO core with one clock reading, and sends what the verdicts say with `sendmmsg`, then
//! publishes its counters. A wake-up costs one system call to receive and one to send, whatever
//! the batch holds. Datagrams that arrived coalesced by GRO and are all forwarded leave as one
//! GSO send per target.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrIn, SockaddrIn6, recvmmsg, setsockopt,
    sockopt,
};
use prometheus::Histogram;
use tokio::sync::watch;
use veil_relay_core::turn::{Frame, Relayed};
use veil_relay_core::wire::MAX_DATAGRAM;
use veil_relay_core::{DropReason, Endpoint, ForwardingTable, Node, SharedStats, Verdict};

use crate::send::{Headers, Out, PeerAddr, QuicConns, SEND_BATCH, SendQueue};

/// Datagrams per `recvmmsg`.
const BATCH: usize = 32;
/// How long a worker waits for datagrams before it runs its timers anyway.
const TICK: Duration = Duration::from_millis(50);
/// How often a busy worker publishes its counters for the metrics endpoint.
const PUBLISH_EVERY: Duration = Duration::from_millis(5);
/// Most datagrams one GSO send may carry (the kernel's limit, `UDP_MAX_SEGMENTS`).
const MAX_GSO_SEGMENTS: usize = 64;
/// Socket buffer size asked for; the kernel caps it at net.core.{r,w}mem_max.
pub(crate) const SOCKET_BUFFER: usize = 8 << 20;

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
    /// Where it publishes its TURN counters (transport "turn-udp").
    pub turn_stats: Arc<SharedStats>,
    /// Batch forwarding latency.
    pub latency: Histogram,
    /// Sends to QUIC legs (none if the relay serves no QUIC).
    pub quic: Option<Arc<QuicConns>>,
    /// Sends to TURN TCP and TLS clients (none if the relay serves neither).
    pub streams: Option<Arc<crate::send::TurnStreams>>,
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
        turn_stats,
        latency,
        quic,
        streams,
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
    let mut send_headers = Headers::<S>::new(SEND_BATCH);
    let mut meta: Vec<Meta> = Vec::with_capacity(BATCH);
    let mut relay = ForwardingTable::new(node, Instant::now());
    let mut scratch = Scratch {
        targets: Vec::with_capacity(16),
        forwarded: Vec::with_capacity(64),
        relays: Vec::with_capacity(64),
    };
    let mut queue = SendQueue::default();
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
            let mut out = Out::batched(
                fd,
                quic.as_deref(),
                &buf,
                &mut send_headers,
                &mut queue,
                max_gso,
            )
            .streams(streams.as_deref());
            for (i, m) in meta.iter().enumerate() {
                handle(&mut relay, &mut out, now, m, i * slot, &mut scratch);
            }
            out.flush();
            flush_control(&mut relay, &mut out);
            let errors = out.errors();
            relay.count_send_errors(errors);
            latency.observe(now.elapsed().as_secs_f64());
        }
        // Counters and the latency histogram go out every few milliseconds, not at every
        // wake-up: a wake-up at moderate load carries a datagram or two, and publishing is
        // dozens of shared writes.
        unpublished |= !meta.is_empty();
        if unpublished && now.saturating_duration_since(published) >= PUBLISH_EVERY {
            stats.publish(relay.stats());
            turn_stats.publish(relay.turn_stats());
            latency.flush();
            published = now;
            unpublished = false;
        }
        if relay.poll_timeout().is_none_or(|t| now >= t) {
            cpu_ns.store(thread_cpu_ns(), std::sync::atomic::Ordering::Relaxed);
            relay.handle_timeout(now);
            let mut out = Out::batched(fd, quic.as_deref(), &buf, &mut send_headers, &mut queue, 1)
                .streams(streams.as_deref());
            flush_control(&mut relay, &mut out);
            let errors = out.errors();
            relay.count_send_errors(errors);
            stats.publish(relay.stats());
            turn_stats.publish(relay.turn_stats());
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
    turn_stats.publish(relay.turn_stats());
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

fn flush_control<S: PeerAddr>(relay: &mut ForwardingTable, out: &mut Out<'_, S>) {
    while let Some(t) = relay.poll_transmit() {
        // Every endpoint of a UDP worker's table is a UDP one: `control` sends them all.
        out.control(&t);
    }
    while let Some(e) = relay.poll_event() {
        crate::log_event(e);
    }
}

/// What deciding a GRO run needs, allocated once per worker.
struct Scratch {
    /// The targets of the run's forwarded datagrams.
    targets: Vec<Endpoint>,
    /// Which datagrams of the run were forwarded.
    forwarded: Vec<bool>,
    /// The run's datagrams relayed to TURN allocations, by index.
    relays: Vec<(usize, Relayed)>,
}

/// Handles one receive buffer, at `base` in the batch buffer: a single datagram, or several
/// coalesced by GRO (same source, `stride` bytes each, the last possibly shorter).
#[inline]
fn handle<S: PeerAddr>(
    relay: &mut ForwardingTable,
    out: &mut Out<'_, S>,
    now: Instant,
    m: &Meta,
    base: usize,
    scratch: &mut Scratch,
) {
    let Scratch {
        targets,
        forwarded,
        relays,
    } = scratch;
    let data = &out.buf()[base..base + m.len];
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
        match relay.handle_datagram(now, m.addr, data) {
            Verdict::Forward(t) => {
                for ep in t.iter() {
                    out.to(ep, base, data.len());
                }
            }
            Verdict::Relay(r) => out.relayed(&r, base, data.len()),
            Verdict::Control | Verdict::Drop(_) => {}
        }
        return;
    }
    // Coalesced datagrams share a source, hence a leg and its targets: decide each, and if all
    // are forwarded, send the whole run to each target at once. TURN is addressed: a run the
    // core relays whole to one allocation on one channel leaves as one GSO burst too.
    targets.clear();
    forwarded.clear();
    relays.clear();
    let segments = data.len().div_ceil(stride);
    for (k, seg) in data.chunks(stride).enumerate() {
        let v = relay.handle_datagram(now, m.addr, seg);
        match v {
            Verdict::Forward(ref t) => {
                targets.clear();
                targets.extend(t.iter());
            }
            Verdict::Relay(ref r) => relays.push((k, r.clone())),
            Verdict::Control | Verdict::Drop(_) => {}
        }
        forwarded.push(matches!(v, Verdict::Forward(_)));
    }
    if let Some((_, first)) = relays.first() {
        let whole = relays.len() == segments
            && relays.iter().all(|(k, r)| {
                let seg = stride.min(data.len() - k * stride);
                r.dst == first.dst && r.frame == first.frame && r.payload == (4..seg)
            });
        match (whole, first.dst, first.frame) {
            (true, Endpoint::TurnUdp(dst), Frame::Channel(ch)) => {
                out.relayed_burst(dst, ch, base, data.len(), stride)
            }
            _ => {
                for (k, r) in relays.iter() {
                    let off = k * stride;
                    out.relayed(r, base + off, stride.min(data.len() - off));
                }
            }
        }
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
