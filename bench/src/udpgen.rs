//! The UDP load generator and receiver: one thread, busy-polling, so that the generator's core
//! is the only one it uses and the forwarder under test has the other to itself.
//!
//! Each [`Flow`] sends from its own socket to the forwarder and receives, forwarded, on another
//! socket. Sending is paced to a fixed rate (or as fast as the thread can), in `sendmmsg`
//! batches; a frame of several packets can leave as one GSO send (`UDP_SEGMENT`), as a video
//! frame would reach a relay through a NIC with GRO. Receiving uses `recvmmsg` with kernel
//! receive timestamps (`SO_TIMESTAMPNS`), so the latency measured is from the sender's stamp to
//! the packet's arrival in the receiving socket, whatever the generator's polling delay.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrIn, recvmmsg, sendmmsg,
    setsockopt, sockopt,
};
use nix::sys::time::TimeSpec;

use crate::{cpu, packet, realtime_ns, turn};

/// Datagrams (or GSO frames) per `sendmmsg`.
const SEND_BATCH: usize = 32;
/// Datagrams per `recvmmsg`.
const RECV_BATCH: usize = 64;
/// How often the receive sockets are drained while sending. They are timestamped by the kernel,
/// so this delay is not part of any latency figure; it only needs to be short enough for the
/// socket buffers (several MiB) never to fill.
const RECV_EVERY: Duration = Duration::from_micros(100);
/// After the window, how long to keep receiving what is still in flight.
const DRAIN: Duration = Duration::from_millis(200);
/// Most datagrams one step sends, whatever its rate and window: a bound on every load loop.
pub const MAX_PACKETS: u64 = 20_000_000;
/// Socket buffer size asked for (with `SO_RCVBUFFORCE` when running as root).
const SOCKET_BUFFER: usize = 16 << 20;

/// How a flow's datagrams are framed on their way to the forwarder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// As they are (Veil, the floor forwarder).
    Plain,
    /// In TURN ChannelData on this channel (coturn, Veil's TURN).
    ChannelData(u16),
}

impl Framing {
    fn header_len(self) -> usize {
        match self {
            Self::Plain => 0,
            Self::ChannelData(_) => turn::CHANNEL_DATA_HEADER,
        }
    }
}

/// One flow: datagrams leave `tx` for `dst`, and arrive, forwarded, at `rx`.
#[derive(Debug)]
pub struct Flow {
    /// The sending socket (blocking).
    pub tx: UdpSocket,
    /// Where it sends: the forwarder.
    pub dst: SocketAddr,
    /// How it frames what it sends.
    pub framing: Framing,
    /// The receiving socket (set up by [`setup_rx`]).
    pub rx: UdpSocket,
    /// Where `rx` sends a Veil KEEPALIVE every second, so that a receiving leg, which sends no
    /// media, is not unbound as idle.
    pub keepalive_to: Option<SocketAddr>,
}

/// Makes a sending socket: blocking, so that `sendmmsg` sends the whole batch.
pub fn setup_tx(sock: &UdpSocket) -> anyhow::Result<()> {
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(None)?;
    if setsockopt(sock, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(sock, sockopt::SndBuf, &SOCKET_BUFFER);
    }
    Ok(())
}

/// Makes a receiving socket: nonblocking, kernel receive timestamps, a large buffer, and GRO if
/// `gro`.
///
/// Without GRO (the default), a GSO burst a forwarder sends is split into datagrams on its way
/// into this socket, on loopback in the forwarder's own context: the forwarder pays to segment
/// what it sends in bursts, as it would on a NIC without UDP segmentation offload. With GRO the
/// burst arrives whole and costs the forwarder one delivery, which no real network offers.
pub fn setup_rx(sock: &UdpSocket, gro: bool) -> anyhow::Result<()> {
    sock.set_nonblocking(true)?;
    setsockopt(sock, sockopt::ReceiveTimestampns, &true).context("SO_TIMESTAMPNS")?;
    setsockopt(sock, sockopt::UdpGroSegment, &gro).context("UDP_GRO")?;
    if setsockopt(sock, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(sock, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    Ok(())
}

/// What to offer.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Datagrams per second, over all flows; `None`: as fast as the generator can.
    pub rate_pps: Option<u64>,
    /// Size of each datagram as the receiver gets it (the forwarder may add framing on the way
    /// in: ChannelData's 4 bytes).
    pub size: usize,
    /// Datagrams per send: 1, or a frame of several sent as one GSO burst.
    pub burst: usize,
    /// Sending before the measurement window, to reach a steady state.
    pub warmup: Duration,
    /// The measurement window.
    pub window: Duration,
}

/// What one load step measured.
#[derive(Debug, Clone)]
pub struct Measured {
    /// The rate asked for; `None` for as fast as possible.
    pub target_pps: Option<u64>,
    /// The rate actually sent during the window.
    pub offered_pps: f64,
    /// The rate received during (and just after) the window, of what was sent in it.
    pub delivered_pps: f64,
    /// Datagrams sent in the window.
    pub sent: u64,
    /// Of those, datagrams received.
    pub received: u64,
    /// The window's length.
    pub window: Duration,
    /// CPU time the forwarder process used in the window.
    pub relay_cpu: Option<Duration>,
    /// Busy time of the forwarder's core in the window, whoever used it.
    pub core_busy: Option<Duration>,
    /// CPU time this process (the generator) used in the window.
    pub gen_cpu: Option<Duration>,
    /// Busy time of the generator's core in the window, whoever used it.
    pub gen_core_busy: Option<Duration>,
    /// One-way latency, sender's stamp to arrival at the receiving socket: 50th percentile, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
}

impl Measured {
    /// What a window measured: `sent` datagrams over `window`, of which `received` (capped at
    /// `sent`) came back with latencies in `hist` (ns); CPU figures from the samples taken at the
    /// window's start and end.
    pub fn from_window(
        target_pps: Option<u64>,
        sent: u64,
        received: u64,
        window: Duration,
        hist: &Histogram<u64>,
        (start, end): (Option<Sample>, Sample),
    ) -> anyhow::Result<Self> {
        let secs = window.as_secs_f64();
        let received = received.min(sent);
        let pct = |q: f64| {
            if hist.is_empty() {
                f64::NAN
            } else {
                hist.value_at_quantile(q) as f64 / 1000.0
            }
        };
        let mut m = Self {
            target_pps,
            offered_pps: sent as f64 / secs,
            delivered_pps: received as f64 / secs,
            sent,
            received,
            window,
            relay_cpu: None,
            core_busy: None,
            gen_cpu: None,
            gen_core_busy: None,
            p50_us: pct(0.5),
            p99_us: pct(0.99),
        };
        start
            .context("the window never started")?
            .fill(&end, &mut m);
        Ok(m)
    }

    /// Fraction of datagrams lost.
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 1.0;
        }
        1.0 - self.received.min(self.sent) as f64 / self.sent as f64
    }

    /// Forwarder CPU microseconds per datagram delivered.
    pub fn cpu_us_per_pkt(&self) -> Option<f64> {
        let cpu = self.relay_cpu?;
        (self.received > 0).then(|| cpu.as_secs_f64() * 1e6 / self.received as f64)
    }

    /// Forwarder CPU use over the window, as a fraction of one core.
    pub fn relay_util(&self) -> Option<f64> {
        Some(self.relay_cpu?.as_secs_f64() / self.window.as_secs_f64())
    }

    /// Busy time of the forwarder's core not spent by the forwarder, as a fraction of the
    /// window: other processes (or the generator's kernel work, should it land there).
    pub fn noise(&self) -> Option<f64> {
        let other = self.core_busy?.saturating_sub(self.relay_cpu?);
        Some(other.as_secs_f64() / self.window.as_secs_f64())
    }

    /// Busy time of the generator's core not spent by the generator, as a fraction of the
    /// window.
    pub fn gen_noise(&self) -> Option<f64> {
        let other = self.gen_core_busy?.saturating_sub(self.gen_cpu?);
        Some(other.as_secs_f64() / self.window.as_secs_f64())
    }

    /// True if either core was more than 10% busy with other work during the window: the
    /// figures are suspect (another process competed for the CPU).
    pub fn noisy(&self) -> bool {
        self.noise().is_some_and(|n| n > 0.10) || self.gen_noise().is_some_and(|n| n > 0.10)
    }

    /// True if the generator could not send at the rate asked for (within 3%).
    pub fn generator_limited(&self) -> bool {
        self.target_pps
            .is_some_and(|t| self.offered_pps < 0.97 * t as f64)
    }

    /// Under 0.1% loss at the rate asked for.
    pub fn passed(&self) -> bool {
        self.loss() < 0.001 && !self.generator_limited()
    }
}

/// The cores the forwarder and the generator are pinned to.
#[derive(Debug, Clone, Copy)]
pub struct Cores {
    /// The forwarder's core.
    pub relay: usize,
    /// The generator's core (this process's), if it is pinned to one.
    pub generator: Option<usize>,
    /// A kernel thread whose run time counts as the forwarder's: the threaded NAPI poller of
    /// the forwarder's receiving device in the veth benchmark (`xdp-bench`), where receiving,
    /// and an XDP program, run.
    pub napi: Option<u32>,
}

/// CPU figures read at one end of a measurement window.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    relay_cpu: Option<Duration>,
    relay_core: Option<Duration>,
    gen_cpu: Option<Duration>,
    gen_core: Option<Duration>,
}

impl Sample {
    /// Reads the figures now.
    pub fn take(relay_pid: Option<u32>, cores: Cores) -> anyhow::Result<Self> {
        Ok(Self {
            relay_cpu: match (relay_pid.map(cpu::process_cpu).transpose()?, cores.napi) {
                (Some(p), Some(tid)) => Some(p + cpu::thread_runtime(tid)?),
                (p, None) => p,
                (None, Some(tid)) => Some(cpu::thread_runtime(tid)?),
            },
            relay_core: cpu::core_busy(cores.relay).ok(),
            gen_cpu: cpu::self_cpu().ok(),
            gen_core: cores.generator.and_then(|c| cpu::core_busy(c).ok()),
        })
    }

    /// Fills `m`'s CPU figures from this sample (the window's start) and `end`.
    pub fn fill(&self, end: &Self, m: &mut Measured) {
        let d =
            |a: Option<Duration>, b: Option<Duration>| a.zip(b).map(|(a, b)| b.saturating_sub(a));
        m.relay_cpu = d(self.relay_cpu, end.relay_cpu);
        m.core_busy = d(self.relay_core, end.relay_core);
        m.gen_cpu = d(self.gen_cpu, end.gen_cpu);
        m.gen_core_busy = d(self.gen_core, end.gen_core);
    }
}

/// A latency histogram in nanoseconds, 1 ns to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// What the receive side tracks during a step.
struct Rx {
    /// First sequence number of the window (`u64::MAX` before it starts: nothing counts).
    s0: u64,
    received: u64,
    hist: Histogram<u64>,
    headers: MultiHeaders<SockaddrIn>,
    bufs: Vec<Vec<u8>>,
    got: Vec<(usize, u64, usize)>,
}

impl Rx {
    fn new(slot: usize) -> Self {
        Self {
            s0: u64::MAX,
            received: 0,
            hist: histogram(),
            headers: Self::headers(),
            bufs: vec![vec![0u8; slot]; RECV_BATCH],
            got: Vec::with_capacity(RECV_BATCH),
        }
    }

    fn headers() -> MultiHeaders<SockaddrIn> {
        MultiHeaders::preallocate(RECV_BATCH, Some(nix::cmsg_space!(TimeSpec, i32)))
    }

    /// Drains one socket.
    fn poll(&mut self, sock: &UdpSocket) -> anyhow::Result<()> {
        loop {
            self.got.clear();
            {
                let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
                    self.bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
                let res = match recvmmsg(
                    sock.as_raw_fd(),
                    &mut self.headers,
                    iovs.iter_mut(),
                    MsgFlags::MSG_DONTWAIT,
                    None,
                ) {
                    Ok(r) => r,
                    Err(nix::errno::Errno::EAGAIN) => return Ok(()),
                    // ICMP errors from the forwarder's early packets, say: not ours to mind.
                    Err(nix::errno::Errno::ECONNREFUSED) => continue,
                    Err(e) => return Err(e).context("recvmmsg"),
                };
                for m in res {
                    let (mut ts, mut stride) = (0u64, 0usize);
                    if let Ok(cmsgs) = m.cmsgs() {
                        for c in cmsgs {
                            match c {
                                ControlMessageOwned::ScmTimestampns(t) => {
                                    ts = t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64;
                                }
                                ControlMessageOwned::UdpGroSegments(s) => stride = s as usize,
                                _ => {}
                            }
                        }
                    }
                    self.got.push((m.bytes, ts, stride));
                }
            }
            let n = self.got.len();
            if n > 0 {
                // The kernel writes back each header's control length, and nix's recvmmsg does
                // not restore it: a header that once received fewer control bytes would truncate
                // the next message's. Fresh headers after every batch that received anything.
                self.headers = Self::headers();
            }
            for i in 0..n {
                let (len, ts, stride) = self.got[i];
                let ts = if ts == 0 { realtime_ns() } else { ts };
                let data = &self.bufs[i][..len];
                let stride = if stride == 0 { len.max(1) } else { stride };
                for seg in data.chunks(stride) {
                    // A TURN receiver gets ChannelData: the packet follows the 4-byte header.
                    let seg = match seg.first() {
                        Some(0x40..=0x4F) => seg.get(turn::CHANNEL_DATA_HEADER..).unwrap_or(&[]),
                        _ => seg,
                    };
                    if let Some((seq, sent)) = packet::read(seg)
                        && seq >= self.s0
                    {
                        self.received += 1;
                        let _ = self.hist.record(ts.saturating_sub(sent).max(1));
                    }
                }
            }
            if n < RECV_BATCH {
                return Ok(());
            }
        }
    }
}

/// Per-flow send buffers: [`SEND_BATCH`] messages of `burst` packets each.
struct Tx {
    bufs: Vec<Vec<u8>>,
    dst: SockaddrIn,
    header: usize,
    unit: usize,
}

fn v4(a: SocketAddr) -> anyhow::Result<SockaddrIn> {
    match a {
        SocketAddr::V4(a) => Ok(SockaddrIn::from(a)),
        SocketAddr::V6(_) => bail!("the benchmark runs on IPv4 loopback only ({a})"),
    }
}

/// Offers `load` through `flows` and measures what arrives; `relay_pid` names the forwarder
/// process, whose CPU time is read at both ends of the window, and `cores` where it and this
/// process run.
pub fn run(
    flows: &[Flow],
    load: &Load,
    relay_pid: Option<u32>,
    cores: Cores,
) -> anyhow::Result<Measured> {
    if flows.is_empty() {
        bail!("no flows");
    }
    if load.size < packet::MIN_LEN {
        bail!("packets must be at least {} bytes", packet::MIN_LEN);
    }
    let burst = load.burst.max(1);
    let mut txs = Vec::with_capacity(flows.len());
    for (i, f) in flows.iter().enumerate() {
        let header = f.framing.header_len();
        let unit = header + load.size;
        let mut bufs = vec![vec![0u8; unit * burst]; SEND_BATCH];
        for b in &mut bufs {
            for pkt in b.chunks_mut(unit) {
                if let Framing::ChannelData(ch) = f.framing {
                    turn::channel_data_header(pkt, ch, load.size);
                }
                packet::init(&mut pkt[header..], i as u32);
            }
        }
        // One send of `burst` packets leaves as `burst` datagrams of `unit` bytes.
        let gso = if burst > 1 { unit as u16 } else { 0 };
        setsockopt(&f.tx, sockopt::UdpGsoSegment, &i32::from(gso)).context("UDP_SEGMENT")?;
        txs.push(Tx {
            bufs,
            dst: v4(f.dst)?,
            header,
            unit,
        });
    }
    let slot = if burst > 1 { 65_536 } else { 2_048 };
    let mut rx = Rx::new(slot);
    let mut send_headers = MultiHeaders::<SockaddrIn>::preallocate(SEND_BATCH, None);

    let start = Instant::now();
    let window_start = start + load.warmup;
    let window_end = window_start + load.window;
    let mut seq: u64 = 0;
    let mut sent_pkts: u64 = 0;
    let mut next_flow = 0;
    let mut last_rx = start;
    let mut last_keepalive = start - Duration::from_secs(1);
    let mut in_window = false;
    let (mut s0, mut t0) = (0u64, start);
    let mut sample0 = None;
    let (s1, t1, sample1);
    loop {
        let now = Instant::now();
        if crate::stop_requested() {
            bail!("interrupted");
        }
        if !in_window && now >= window_start {
            in_window = true;
            s0 = seq;
            rx.s0 = seq;
            t0 = now;
            sample0 = Some(Sample::take(relay_pid, cores)?);
        }
        if now >= window_end || seq >= MAX_PACKETS {
            s1 = seq;
            t1 = now;
            sample1 = Sample::take(relay_pid, cores)?;
            break;
        }
        let due_msgs = match load.rate_pps {
            Some(r) => {
                let due = (r as f64 * now.duration_since(start).as_secs_f64()) as u64;
                (due.saturating_sub(sent_pkts) / burst as u64).min(SEND_BATCH as u64) as usize
            }
            None => SEND_BATCH,
        };
        if due_msgs > 0 {
            let tx = &mut txs[next_flow];
            let stamp = realtime_ns();
            for b in &mut tx.bufs[..due_msgs] {
                for pkt in b.chunks_mut(tx.unit) {
                    packet::stamp(&mut pkt[tx.header..], seq, stamp);
                    seq += 1;
                }
            }
            let iovs: [[IoSlice<'_>; 1]; SEND_BATCH] =
                std::array::from_fn(|i| [IoSlice::new(&tx.bufs[i])]);
            let addrs = [Some(tx.dst); SEND_BATCH];
            let cmsgs: [ControlMessage<'_>; 0] = [];
            // A blocking UDP socket sends the whole batch or fails on its first message; a
            // failure (ICMP port unreachable while the forwarder starts, say) is a loss.
            let _ = sendmmsg(
                flows[next_flow].tx.as_raw_fd(),
                &mut send_headers,
                &iovs,
                &addrs[..due_msgs],
                cmsgs,
                MsgFlags::empty(),
            );
            sent_pkts += (due_msgs * burst) as u64;
            next_flow = (next_flow + 1) % flows.len();
        }
        if due_msgs == 0 || now.duration_since(last_rx) >= RECV_EVERY {
            last_rx = now;
            for f in flows {
                rx.poll(&f.rx)?;
            }
        }
        if now.duration_since(last_keepalive) >= Duration::from_secs(1) {
            last_keepalive = now;
            for f in flows {
                if let Some(to) = f.keepalive_to {
                    let _ =
                        f.rx.send_to(&veil_relay_core::wire::keepalive(rand::random()), to);
                }
            }
        }
    }
    let drain_end = Instant::now() + DRAIN;
    while Instant::now() < drain_end {
        for f in flows {
            rx.poll(&f.rx)?;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    for f in flows {
        setsockopt(&f.tx, sockopt::UdpGsoSegment, &0).context("UDP_SEGMENT off")?;
    }
    Measured::from_window(
        load.rate_pps,
        s1 - s0,
        rx.received,
        t1.duration_since(t0),
        &rx.hist,
        (sample0, sample1),
    )
}

/// A socket bound to `ip`, port chosen by the kernel.
pub fn bind_local(ip: [u8; 4]) -> anyhow::Result<UdpSocket> {
    let sock = UdpSocket::bind(SocketAddrV4::new(ip.into(), 0))?;
    Ok(sock)
}
