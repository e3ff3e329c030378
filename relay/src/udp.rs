//! The UDP transport: N IO workers, each a thread with its own `SO_REUSEPORT` socket on the media
//! port and its own [`veil_relay_core::Relay`]. The kernel hashes each client's 4-tuple to one
//! worker, so a client always meets the same worker; the session directory the workers share
//! lets a worker forward to legs bound through the others.
//!
//! Each worker receives in batches (`recvmmsg`, and GRO where the kernel offers it, through
//! quinn-udp), runs the whole batch through the sans-IO core with one clock reading, sends what
//! the verdicts say, then publishes its counters. Datagrams that arrived coalesced by GRO and are
//! all forwarded leave as one GSO send per target.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use nix::sys::socket::{MultiHeaders, SockaddrStorage};
use prometheus::Histogram;
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::sync::watch;
use veil_ops::redact::Redacted;
use veil_relay_core::{DropReason, Endpoint, Event, Node, Relay, SharedStats, Verdict};

use crate::quic::QuicSink;

use veil_relay_core::wire::MAX_DATAGRAM;

/// Datagrams per `recvmmsg`.
const BATCH: usize = 32;
/// Batches handled per wake-up before the worker yields to its timers.
const BATCHES_PER_WAKE: usize = 64;
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
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(worker = index, error = %e, "cannot start worker runtime");
                    return;
                }
            };
            if let Err(e) = rt.block_on(run(ctx)) {
                tracing::error!(worker = index, error = %e, "UDP worker failed");
            }
        })
        .context("spawn UDP worker")
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
struct Out<'a> {
    socket: &'a tokio::net::UdpSocket,
    state: &'a UdpSocketState,
    quic: &'a dyn QuicSink,
    buf: &'a [u8],
    queue: &'a mut Vec<Queued>,
    headers: &'a mut MultiHeaders<SockaddrStorage>,
    max_gso: usize,
    errors: u64,
}

impl Out<'_> {
    /// Sends `contents` at once (control messages, GSO bursts), after whatever is queued.
    fn now(&mut self, destination: SocketAddr, contents: &[u8], segment_size: Option<usize>) {
        self.flush();
        let t = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        // Straight to the nonblocking socket: a full send buffer drops the datagram (counted)
        // rather than delaying the rest of the batch behind it, as a media relay should.
        if self
            .state
            .try_send(UdpSockRef::from(self.socket), &t)
            .is_err()
        {
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
            Endpoint::Quic(conn) => self.quic.send(conn, &self.buf[start..start + len]),
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
        use nix::errno::Errno;
        use nix::sys::socket::{MsgFlags, sendmmsg};
        use std::os::fd::AsRawFd;
        let mut done = 0;
        while done < self.queue.len() {
            let chunk = &self.queue[done..(done + SEND_BATCH).min(self.queue.len())];
            let n = chunk.len();
            let iovs: [[IoSlice<'_>; 1]; SEND_BATCH] = std::array::from_fn(|i| {
                [IoSlice::new(chunk.get(i).map_or(&[][..], |q| {
                    &self.buf[q.start..q.start + q.len]
                }))]
            });
            let addrs: [Option<SockaddrStorage>; SEND_BATCH] =
                std::array::from_fn(|i| chunk.get(i).map(|q| SockaddrStorage::from(q.dst)));
            let sent = sendmmsg(
                self.socket.as_raw_fd(),
                self.headers,
                &iovs[..n],
                &addrs[..n],
                &[] as &[nix::sys::socket::ControlMessage<'_>],
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

async fn run(ctx: WorkerContext) -> anyhow::Result<()> {
    let WorkerContext {
        index,
        socket,
        node,
        stats,
        latency,
        quic,
        cpu_ns,
        mut shutdown,
    } = ctx;
    let socket = tokio::net::UdpSocket::from_std(socket)?;
    let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
    let gro = state.gro_segments().max(1);
    // With GRO one buffer holds many datagrams; without it, one datagram plus a byte to tell
    // an oversized one from one that fits.
    let slot = if gro > 1 {
        u16::MAX as usize
    } else {
        MAX_DATAGRAM + 1
    };
    let mut buf = vec![0u8; slot * BATCH];
    let mut meta = [RecvMeta::default(); BATCH];
    let mut relay = Relay::new(node, Instant::now());
    let mut targets: Vec<Endpoint> = Vec::with_capacity(16);
    let mut forwarded: Vec<bool> = Vec::with_capacity(gro);
    let mut queue: Vec<Queued> = Vec::with_capacity(SEND_BATCH);
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(SEND_BATCH, None);
    tracing::debug!(
        worker = index,
        gro,
        gso = state.max_gso_segments(),
        "UDP worker started"
    );

    loop {
        let deadline = relay
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + std::time::Duration::from_secs(1));
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            ready = socket.readable() => {
                ready?;
                for _ in 0..BATCHES_PER_WAKE {
                    let n = {
                        let mut iovs: [IoSliceMut<'_>; BATCH] = {
                            let mut chunks = buf.chunks_mut(slot);
                            std::array::from_fn(|_| IoSliceMut::new(chunks.next().expect("BATCH slots")))
                        };
                        match socket.try_io(Interest::READABLE, || state.recv(UdpSockRef::from(&socket), &mut iovs, &mut meta)) {
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            // An ICMP error queued on the socket (ECONNREFUSED and the like) may be
                            // injected by an attacker: note it and carry on.
                            Err(e) => {
                                tracing::trace!(worker = index, error = %e, "recv error");
                                continue;
                            }
                        }
                    };
                    let now = Instant::now();
                    let mut out = Out {
                        socket: &socket,
                        state: &state,
                        quic: &*quic,
                        buf: &buf,
                        queue: &mut queue,
                        headers: &mut headers,
                        max_gso: state.max_gso_segments(),
                        errors: 0,
                    };
                    for (i, m) in meta[..n].iter().enumerate() {
                        handle(&mut relay, &mut out, now, m, i * slot, &mut targets, &mut forwarded);
                    }
                    out.flush();
                    flush_control(&mut relay, &mut out);
                    let errors = out.errors;
                    relay.count_send_errors(errors);
                    latency.observe(now.elapsed().as_secs_f64());
                    if n < BATCH {
                        break;
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                cpu_ns.store(thread_cpu_ns(), std::sync::atomic::Ordering::Relaxed);
                relay.handle_timeout(Instant::now());
                let mut out = Out {
                    socket: &socket,
                    state: &state,
                    quic: &*quic,
                    buf: &buf,
                    queue: &mut queue,
                    headers: &mut headers,
                    max_gso: 1,
                    errors: 0,
                };
                flush_control(&mut relay, &mut out);
                let errors = out.errors;
                relay.count_send_errors(errors);
            }
        }
        stats.publish(relay.stats());
    }
    stats.publish(relay.stats());
    tracing::debug!(worker = index, "UDP worker stopped");
    Ok(())
}

/// CPU time this thread has used, nanoseconds (0 if the clock is unavailable).
fn thread_cpu_ns() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn flush_control(relay: &mut Relay, out: &mut Out<'_>) {
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
fn handle(
    relay: &mut Relay,
    out: &mut Out<'_>,
    now: Instant,
    m: &RecvMeta,
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
