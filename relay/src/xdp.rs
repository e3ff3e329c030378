//! The kernel fast path: an XDP program (`relay/xdp/veil.bpf.c`, built with clang by this
//! crate's build script when the `xdp` feature is on, and embedded in the binary) that forwards
//! the media of bound UDP legs of 2-party sessions before the kernel builds a socket buffer.
//!
//! The core stays the one place that decides: a [`FastPath`] installs a session's two legs in
//! the program's map only when [`veil_relay_core::session::Directory::fast_pair`] says the
//! session may be offloaded (exactly two legs, both bound over native UDP, reachable, not
//! revoked), and removes them at the next change of that session the directory reports (a
//! release, revocation, expiry, idle unbind, rebind, a third leg). Everything else (binds,
//! control messages, unknown sources, QUIC, TURN, multi-party fan-out) reaches the workers
//! unchanged. What the program carried flows back every [`HARVEST`]: into the relay's
//! counters and metrics (transport `udp`, as if the workers had forwarded it), into the legs'
//! counters, and into the legs' idle clocks.
//!
//! Where the program cannot run (the feature off, no privilege, a driver that refuses), the
//! relay forwards in userspace alone and says so: in its log, and in `veil_relay_xdp_mode`.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};

/// `--xdp`: whether and how to attach the kernel fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Mode {
    /// Userspace alone.
    #[default]
    Off,
    /// Native (driver) mode where the driver supports it, else generic mode, else userspace
    /// alone with a warning.
    Auto,
    /// Native mode, or the relay does not start.
    Native,
    /// Generic (skb) mode, or the relay does not start.
    Generic,
}

/// The fast path's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// How to attach.
    pub mode: Mode,
    /// The interfaces to attach to (where clients' datagrams arrive).
    pub interfaces: Vec<String>,
}

/// What the fast path is doing, for metrics: shared with [`crate::metrics::RelayMetrics`].
#[derive(Debug, Default)]
pub struct Status {
    /// 0 off, 1 userspace (wanted, could not attach), 2 native, 3 generic.
    mode: AtomicU8,
    /// Legs in the program's map now.
    pub legs: AtomicU64,
    /// Datagrams the program forwarded.
    pub forwarded: AtomicU64,
    /// Datagrams it dropped for a leg's rate limits.
    pub rate_limited: AtomicU64,
    /// Datagrams of offloaded legs it handed to userspace: past expiry.
    pub passed_expired: AtomicU64,
    /// ... not media, or malformed, or too large (userspace classifies and counts them).
    pub passed_not_media: AtomicU64,
    /// ... their peer's next hop not learned yet.
    pub passed_peer_unknown: AtomicU64,
}

impl Status {
    /// The mode's name for `veil_relay_xdp_mode{mode}`.
    pub fn mode(&self) -> &'static str {
        match self.mode.load(Relaxed) {
            1 => "userspace",
            2 => "native",
            3 => "generic",
            _ => "off",
        }
    }

    /// Every mode name, for the gauge's series.
    pub const MODES: [&'static str; 4] = ["off", "userspace", "native", "generic"];

    fn set_mode(&self, m: u8) {
        self.mode.store(m, Relaxed);
    }
}

/// How often what the program carried is read back (counters, idle clocks, extensions).
pub const HARVEST: std::time::Duration = std::time::Duration::from_millis(250);

/// Attaches the fast path as `settings` ask, for the media address `udp_addr`. `Ok(None)`: the
/// relay forwards in userspace alone (off, or `auto` and it could not attach: logged, and
/// `status` says so).
pub fn attach(
    settings: &Settings,
    udp_addr: std::net::SocketAddr,
    status: &Status,
) -> anyhow::Result<Option<FastPath>> {
    if settings.mode == Mode::Off {
        return Ok(None);
    }
    match FastPath::attach(settings, udp_addr) {
        Ok(fp) => {
            status.set_mode(if fp.native { 2 } else { 3 });
            tracing::info!(
                mode = if fp.native { "native" } else { "generic" },
                interfaces = ?settings.interfaces,
                "XDP fast path attached"
            );
            Ok(Some(fp))
        }
        Err(e) if settings.mode == Mode::Auto => {
            status.set_mode(1);
            tracing::warn!(error = %format!("{e:#}"), "XDP fast path not attached; forwarding in userspace alone");
            Ok(None)
        }
        Err(e) => Err(e.context(format!("--xdp {:?}", settings.mode).to_lowercase())),
    }
}

#[cfg(not(feature = "xdp"))]
/// Without the `xdp` feature: never attaches.
#[derive(Debug)]
pub struct FastPath {
    native: bool,
}

#[cfg(not(feature = "xdp"))]
impl FastPath {
    fn attach(_: &Settings, _: std::net::SocketAddr) -> anyhow::Result<Self> {
        anyhow::bail!("this veil-relay was built without the `xdp` feature")
    }

    /// Never runs: there is no fast path to serve.
    pub async fn run(
        self,
        _: std::sync::Arc<veil_relay_core::Node>,
        _: tokio::sync::broadcast::Receiver<veil_relay_core::LegChange>,
        _: std::sync::Arc<veil_relay_core::SharedStats>,
        _: std::sync::Arc<Status>,
        _: tokio::sync::watch::Receiver<bool>,
    ) {
        let _ = self.native;
    }
}

#[cfg(feature = "xdp")]
pub use fast::{FastPath, LegKey, LegValue, Program, Stat, ValueBytes};

#[cfg(feature = "xdp")]
mod fast {
    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
    use std::sync::Arc;
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Instant;

    use anyhow::{Context, bail};
    use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
    use aya::programs::{Xdp, XdpMode};
    use aya::{Ebpf, EbpfLoader};
    use tokio::sync::{broadcast, watch};
    use veil_relay_core::token::{Limits, SessionId};
    use veil_relay_core::{FastPair, LegChange, Node, SharedStats, Stats, stats::DropReason};

    use super::{HARVEST, Settings, Status};

    /// The program, built by build.rs from relay/xdp/veil.bpf.c.
    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/veil.bpf.o"));

    /// The program's `struct leg_key`: one leg's datagrams as they arrive (network order).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct LegKey {
        /// The participant's address.
        pub src_ip: [u8; 4],
        /// The relay's media address.
        pub dst_ip: [u8; 4],
        /// The participant's port.
        pub src_port: [u8; 2],
        /// The relay's media port.
        pub dst_port: [u8; 2],
    }

    impl LegKey {
        /// From `src` to `dst`.
        pub fn new(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
            Self {
                src_ip: src.ip().octets(),
                dst_ip: dst.ip().octets(),
                src_port: src.port().to_be_bytes(),
                dst_port: dst.port().to_be_bytes(),
            }
        }
    }

    /// The program's `struct leg_value`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct LegValue {
        /// Where this leg's media goes: from the relay to the peer.
        pub out: LegKey,
        /// Packets per second; 0: unlimited.
        pub max_pps: u32,
        /// Bits per second; 0: unlimited.
        pub max_bps: u64,
        /// CLOCK_MONOTONIC nanoseconds.
        pub expires_ns: u64,
        /// Kept by the program from here on.
        pub last_ns: u64,
        /// Micro-packets of credit.
        pub pkt_credit: u64,
        /// Milli-bits of credit.
        pub bit_credit: u64,
        /// Media datagrams from this leg the program decided on.
        pub rx_packets: u64,
        /// Their payload bytes.
        pub rx_bytes: u64,
        /// Forwarded to the peer.
        pub fwd_packets: u64,
        /// Their payload bytes.
        pub fwd_bytes: u64,
        /// Dropped for the leg's rate limits.
        pub limited_packets: u64,
        /// Where the leg's datagrams arrive (0: not learned yet).
        pub ifindex: u32,
        /// Their source MAC.
        pub peer_mac: [u8; 6],
        /// Their destination MAC (the relay's).
        pub own_mac: [u8; 6],
        /// The next IP ID of this leg's media to the peer.
        pub ip_id: u32,
    }

    impl LegKey {
        /// As the map holds it.
        pub fn to_bytes(self) -> [u8; 12] {
            let mut b = [0; 12];
            b[0..4].copy_from_slice(&self.src_ip);
            b[4..8].copy_from_slice(&self.dst_ip);
            b[8..10].copy_from_slice(&self.src_port);
            b[10..12].copy_from_slice(&self.dst_port);
            b
        }

        /// From the map's bytes.
        pub fn from_bytes(b: &[u8]) -> Self {
            let mut k = Self::default();
            k.src_ip.copy_from_slice(&b[0..4]);
            k.dst_ip.copy_from_slice(&b[4..8]);
            k.src_port.copy_from_slice(&b[8..10]);
            k.dst_port.copy_from_slice(&b[10..12]);
            k
        }
    }

    /// `struct leg_value` as bytes (host order for integers, as the program reads them): 120,
    /// with no padding (the C struct puts every `__u64` at a multiple of 8).
    pub type ValueBytes = [u8; 120];

    impl LegValue {
        /// As the map holds it.
        pub fn to_bytes(&self) -> ValueBytes {
            let mut b = [0; 120];
            b[0..12].copy_from_slice(&self.out.to_bytes());
            b[12..16].copy_from_slice(&self.max_pps.to_ne_bytes());
            let words = [
                self.max_bps,
                self.expires_ns,
                self.last_ns,
                self.pkt_credit,
                self.bit_credit,
                self.rx_packets,
                self.rx_bytes,
                self.fwd_packets,
                self.fwd_bytes,
                self.limited_packets,
            ];
            for (i, w) in words.iter().enumerate() {
                b[16 + 8 * i..24 + 8 * i].copy_from_slice(&w.to_ne_bytes());
            }
            b[96..100].copy_from_slice(&self.ifindex.to_ne_bytes());
            b[100..106].copy_from_slice(&self.peer_mac);
            b[106..112].copy_from_slice(&self.own_mac);
            b[112..116].copy_from_slice(&self.ip_id.to_ne_bytes());
            b
        }

        /// From the map's bytes.
        pub fn from_bytes(b: &ValueBytes) -> Self {
            let word = |i: usize| {
                u64::from_ne_bytes(b[16 + 8 * i..24 + 8 * i].try_into().expect("8 bytes"))
            };
            let mut v = Self {
                out: LegKey::from_bytes(&b[0..12]),
                max_pps: u32::from_ne_bytes(b[12..16].try_into().expect("4 bytes")),
                max_bps: word(0),
                expires_ns: word(1),
                last_ns: word(2),
                pkt_credit: word(3),
                bit_credit: word(4),
                rx_packets: word(5),
                rx_bytes: word(6),
                fwd_packets: word(7),
                fwd_bytes: word(8),
                limited_packets: word(9),
                ifindex: u32::from_ne_bytes(b[96..100].try_into().expect("4 bytes")),
                ip_id: u32::from_ne_bytes(b[112..116].try_into().expect("4 bytes")),
                ..Self::default()
            };
            v.peer_mac.copy_from_slice(&b[100..106]);
            v.own_mac.copy_from_slice(&b[106..112]);
            v
        }
    }

    /// The program's per-CPU counters (`enum stat`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    #[repr(u32)]
    pub enum Stat {
        /// Datagrams forwarded.
        ForwardedPackets,
        /// Their payload bytes.
        ForwardedBytes,
        /// Dropped for a leg's rate limits.
        RateLimited,
        /// Handed to userspace: the leg past its expiry.
        PassExpired,
        /// Handed to userspace: not media, malformed, or too large.
        PassNotMedia,
        /// Handed to userspace: the peer's next hop not learned yet.
        PassPeerUnknown,
    }

    /// The loaded program and its maps, attached nowhere yet: what [`FastPath`] attaches, and
    /// what tests run with `BPF_PROG_TEST_RUN`.
    pub struct Program {
        ebpf: Ebpf,
        legs: BpfHashMap<MapData, [u8; 12], ValueBytes>,
        stats: PerCpuArray<MapData, u64>,
    }

    impl std::fmt::Debug for Program {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Program").finish_non_exhaustive()
        }
    }

    impl Program {
        /// Loads the program into the kernel, writing `ttl` as the TTL of what it forwards.
        pub fn load(ttl: u8) -> anyhow::Result<Self> {
            let ttl = u32::from(ttl);
            let mut ebpf = EbpfLoader::new()
                .override_global("veil_ttl", &ttl, true)
                .load(OBJECT)
                .context("loading the XDP object")?;
            let legs = BpfHashMap::try_from(ebpf.take_map("legs").context("no legs map")?)?;
            let stats = PerCpuArray::try_from(ebpf.take_map("stats").context("no stats map")?)?;
            for name in ["veil_fast_path", "veil_pass"] {
                let p: &mut Xdp = ebpf
                    .program_mut(name)
                    .with_context(|| format!("the object has no program {name}"))?
                    .try_into()?;
                p.load()
                    .with_context(|| format!("the kernel refused {name}"))?;
            }
            Ok(Self { ebpf, legs, stats })
        }

        /// Sets leg `key`'s entry.
        pub fn insert(&mut self, key: LegKey, value: &LegValue) -> anyhow::Result<()> {
            self.legs.insert(key.to_bytes(), value.to_bytes(), 0)?;
            Ok(())
        }

        /// Leg `key`'s entry, if any.
        pub fn get(&self, key: LegKey) -> Option<LegValue> {
            self.legs
                .get(&key.to_bytes(), 0)
                .ok()
                .map(|b| LegValue::from_bytes(&b))
        }

        /// Removes leg `key`'s entry.
        pub fn remove(&mut self, key: LegKey) {
            let _ = self.legs.remove(&key.to_bytes());
        }

        /// Entries in the map.
        pub fn len(&self) -> usize {
            self.legs.keys().count()
        }

        /// True if the map is empty.
        pub fn is_empty(&self) -> bool {
            self.len() == 0
        }

        /// The fast-path program, for `BPF_PROG_TEST_RUN`.
        pub fn fast_path(&self) -> &Xdp {
            self.program("veil_fast_path")
        }

        fn program(&self, name: &str) -> &Xdp {
            self.ebpf
                .program(name)
                .expect("loaded")
                .try_into()
                .expect("an XDP program")
        }

        /// Counter `s`, summed over CPUs.
        pub fn stat(&self, s: Stat) -> u64 {
            self.stats
                .get(&(s as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        }

        /// Attaches the fast path to `interface`: native mode unless `generic`.
        pub fn attach(&mut self, interface: &str, generic: bool) -> anyhow::Result<()> {
            let p: &mut Xdp = self
                .ebpf
                .program_mut("veil_fast_path")
                .expect("loaded")
                .try_into()?;
            let mode = if generic {
                XdpMode::Skb
            } else {
                XdpMode::Driver
            };
            p.attach(interface, mode)
                .with_context(|| format!("attaching XDP to {interface} ({mode:?} mode)"))?;
            Ok(())
        }
    }

    /// The fast path attached to the relay's interfaces, and what it installed.
    pub struct FastPath {
        program: Program,
        pub(super) native: bool,
        relay: SocketAddrV4,
    }

    impl std::fmt::Debug for FastPath {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("FastPath")
                .field("native", &self.native)
                .field("relay", &self.relay)
                .finish_non_exhaustive()
        }
    }

    /// CLOCK_MONOTONIC now, nanoseconds: the program's clock (`bpf_ktime_get_ns`).
    fn monotonic_ns() -> u64 {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .expect("CLOCK_MONOTONIC is always readable");
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    }

    /// The TTL the relay's own UDP socket writes: its namespace's `ip_default_ttl`.
    fn default_ttl() -> anyhow::Result<u8> {
        let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_default_ttl")
            .context("reading net.ipv4.ip_default_ttl")?;
        s.trim()
            .parse()
            .context("net.ipv4.ip_default_ttl is not a TTL")
    }

    impl FastPath {
        pub(super) fn attach(settings: &Settings, udp_addr: SocketAddr) -> anyhow::Result<Self> {
            let relay = match udp_addr {
                SocketAddr::V4(a) if !a.ip().is_unspecified() => a,
                _ => bail!(
                    "the XDP fast path forwards IPv4 to a concrete address: --udp-addr must be \
                     one (it is {udp_addr})"
                ),
            };
            if settings.interfaces.is_empty() {
                bail!("--xdp needs --xdp-interfaces (where clients' datagrams arrive)");
            }
            let mut program = Program::load(default_ttl()?)?;
            let mut native = settings.mode != super::Mode::Generic;
            for i in &settings.interfaces {
                match program.attach(i, !native) {
                    Ok(()) => {}
                    Err(e) if settings.mode == super::Mode::Auto && native => {
                        tracing::info!(interface = %i, error = %format!("{e:#}"), "native XDP refused; trying generic mode");
                        native = false;
                        program.attach(i, true)?;
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(Self {
                program,
                native,
                relay,
            })
        }

        /// Keeps the program's map in step with the directory until `stop`, and reads back what
        /// the program carried every [`HARVEST`]. `feed` hears every leg change; `stats` is the
        /// relay's transport-`udp` counters source for what the program forwarded.
        pub async fn run(
            self,
            node: Arc<Node>,
            mut feed: broadcast::Receiver<LegChange>,
            stats: Arc<SharedStats>,
            status: Arc<Status>,
            mut stop: watch::Receiver<bool>,
        ) {
            let mut sync = Sync {
                fp: self,
                node,
                installed: HashMap::new(),
                stats: Stats::default(),
                status,
            };
            // Sessions bound before the feed was read.
            sync.resync_all();
            let mut tick = tokio::time::interval(HARVEST);
            loop {
                tokio::select! {
                    change = feed.recv() => match change {
                        Ok(c) => sync.sync(c.session),
                        Err(broadcast::error::RecvError::Lagged(_)) => sync.resync_all(),
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = tick.tick() => sync.harvest(),
                    _ = stop.changed() => {
                        // Detached when the program is dropped; the workers serve everything.
                        return;
                    }
                }
                stats.publish(&sync.stats);
            }
        }
    }

    /// One session's two entries, and what was last read of them.
    struct Installed {
        pair: FastPair,
        keys: [LegKey; 2],
        seen: [LegValue; 2],
    }

    struct Sync {
        fp: FastPath,
        node: Arc<Node>,
        installed: HashMap<SessionId, Installed>,
        stats: Stats,
        status: Arc<Status>,
    }

    fn v4(addr: SocketAddr) -> Option<SocketAddrV4> {
        match addr.ip().to_canonical() {
            IpAddr::V4(ip) if ip != Ipv4Addr::UNSPECIFIED => {
                Some(SocketAddrV4::new(ip, addr.port()))
            }
            _ => None,
        }
    }

    fn rates(l: Limits) -> (u32, u64) {
        (l.max_pps, u64::from(l.max_kbps) * 1000)
    }

    impl Sync {
        fn resync_all(&mut self) {
            let mut ids: Vec<SessionId> = self.installed.keys().copied().collect();
            ids.extend(
                self.node
                    .directory
                    .bound_legs()
                    .into_iter()
                    .filter(|b| b.transport == "udp")
                    .map(|b| b.session),
            );
            ids.sort_unstable_by_key(|s| s.0);
            ids.dedup();
            for id in ids {
                self.sync(id);
            }
        }

        /// Session `id` changed: its entries go, and come back if it may still be offloaded.
        fn sync(&mut self, id: SessionId) {
            self.remove(id);
            let Some(pair) = self.node.directory.fast_pair(id) else {
                return;
            };
            let [(_, a, la), (_, b, lb)] = pair.legs;
            let (Some(a), Some(b)) = (v4(a), v4(b)) else {
                return;
            };
            let expires_ns = self.expires_ns(pair.expires_unix_ms);
            let relay = self.fp.relay;
            let entry = |out: SocketAddrV4, l: Limits| {
                let (max_pps, max_bps) = rates(l);
                LegValue {
                    out: LegKey::new(relay, out),
                    max_pps,
                    max_bps,
                    expires_ns,
                    // Full buckets, as a leg's limiter starts at bind (limit.rs).
                    pkt_credit: u64::from(max_pps) * 1_000_000,
                    bit_credit: max_bps * 1000,
                    // IP IDs count up from a random start, as the kernel's per-destination
                    // counters do.
                    ip_id: rand::random(),
                    ..LegValue::default()
                }
            };
            let keys = [LegKey::new(a, relay), LegKey::new(b, relay)];
            let values = [entry(b, la), entry(a, lb)];
            for (k, v) in keys.iter().zip(&values) {
                if let Err(e) = self.fp.program.insert(*k, v) {
                    // The map is full (or the kernel refused): those legs stay in userspace.
                    tracing::warn!(error = %e, "XDP legs map refused an entry; the session stays in userspace");
                    for k in keys {
                        self.fp.program.remove(k);
                    }
                    return;
                }
            }
            self.installed.insert(
                id,
                Installed {
                    pair,
                    keys,
                    seen: values,
                },
            );
            self.status.legs.fetch_add(2, Relaxed);
        }

        fn expires_ns(&self, unix_ms: u64) -> u64 {
            let now_unix = crate::unix_ms();
            monotonic_ns()
                .saturating_add(unix_ms.saturating_sub(now_unix).saturating_mul(1_000_000))
        }

        fn remove(&mut self, id: SessionId) {
            let Some(inst) = self.installed.remove(&id) else {
                return;
            };
            let now = self.read(&inst);
            for k in inst.keys {
                self.fp.program.remove(k);
            }
            self.credit(&inst, now);
            self.status.legs.fetch_sub(2, Relaxed);
        }

        fn read(&self, inst: &Installed) -> [LegValue; 2] {
            [0, 1].map(|i| self.fp.program.get(inst.keys[i]).unwrap_or(inst.seen[i]))
        }

        /// Adds what the program carried for `inst` since its last reading: into the relay's
        /// counters, and into the legs' counters and idle clocks.
        fn credit(&mut self, inst: &Installed, now: [LegValue; 2]) {
            let session = self.node.directory.session(inst.pair.session);
            let mono = self.node.mono_ms(Instant::now());
            for (i, (old, new)) in inst.seen.iter().zip(&now).enumerate() {
                let rx = (
                    new.rx_packets.saturating_sub(old.rx_packets),
                    new.rx_bytes.saturating_sub(old.rx_bytes),
                );
                let fwd = (
                    new.fwd_packets.saturating_sub(old.fwd_packets),
                    new.fwd_bytes.saturating_sub(old.fwd_bytes),
                );
                let limited = new.limited_packets.saturating_sub(old.limited_packets);
                self.stats.rx_packets += rx.0;
                self.stats.rx_bytes += rx.1;
                self.stats.forwarded_packets += fwd.0;
                self.stats.forwarded_bytes += fwd.1;
                self.stats.count_drops(DropReason::RateLimited, limited);
                if let Some(s) = session.as_ref().filter(|_| rx.0 > 0) {
                    let (slot, peer) = (inst.pair.legs[i].0, inst.pair.legs[1 - i].0);
                    s.credit_fast(slot, peer, mono, rx, limited, fwd);
                }
            }
        }

        /// Reads back every entry; moves the expiry of extended sessions.
        fn harvest(&mut self) {
            for (id, inst) in std::mem::take(&mut self.installed) {
                let mut now = self.read(&inst);
                self.credit(&inst, now);
                let mut inst = Installed { seen: now, ..inst };
                let expiry = self.node.directory.fast_pair(id).map(|p| p.expires_unix_ms);
                if let Some(e) = expiry.filter(|&e| e > inst.pair.expires_unix_ms) {
                    let ns = self.expires_ns(e);
                    for (k, v) in inst.keys.iter().zip(now.iter_mut()) {
                        v.expires_ns = ns;
                        let _ = self.fp.program.insert(*k, v);
                    }
                    inst.pair.expires_unix_ms = e;
                }
                self.installed.insert(id, inst);
            }
            let p = &self.fp.program;
            let s = &self.status;
            s.forwarded.store(p.stat(Stat::ForwardedPackets), Relaxed);
            s.rate_limited.store(p.stat(Stat::RateLimited), Relaxed);
            s.passed_expired.store(p.stat(Stat::PassExpired), Relaxed);
            s.passed_not_media
                .store(p.stat(Stat::PassNotMedia), Relaxed);
            s.passed_peer_unknown
                .store(p.stat(Stat::PassPeerUnknown), Relaxed);
        }
    }
}
