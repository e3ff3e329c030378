//! The relay's flags, with `VEIL_*` environment fallbacks, and their typed, validated form.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use veil_ops::logging::LogFormat;
use veil_relay_core::KeyRing;

use crate::quic::Identity;

/// veil-relay: forwards SRTP, SRTCP and DTLS between the participants of each call, so that no
/// participant learns another's address. Every flag can also be set through the environment
/// variable named in its description.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "veil-relay", version)]
pub struct Config {
    /// UDP address clients send media to; each IO worker binds it with SO_REUSEPORT. Use
    /// `[::]:PORT` for IPv4 and IPv6 on one socket.
    #[arg(long, env = "VEIL_RELAY_UDP_ADDR", default_value = "[::]:40000")]
    pub udp_addr: SocketAddr,

    /// UDP address announced to the controller and so to clients. Required when --udp-addr is
    /// a wildcard (0.0.0.0 or [::]).
    #[arg(long, env = "VEIL_RELAY_PUBLIC_UDP_ADDR")]
    pub public_udp_addr: Option<SocketAddr>,

    /// UDP address of the QUIC endpoint (ALPN `veil/2`, RFC 9221 datagrams). Unset: no QUIC.
    #[arg(long, env = "VEIL_RELAY_QUIC_ADDR")]
    pub quic_addr: Option<SocketAddr>,

    /// QUIC address announced to clients. Required when --quic-addr is a wildcard.
    #[arg(long, env = "VEIL_RELAY_PUBLIC_QUIC_ADDR", requires = "quic_addr")]
    pub public_quic_addr: Option<SocketAddr>,

    /// PEM certificate chain of the QUIC endpoint (clients pin the leaf's SHA-256, which the
    /// controller hands out with each session).
    #[arg(long, env = "VEIL_RELAY_QUIC_CERT_FILE", requires = "quic_key_file")]
    pub quic_cert_file: Option<PathBuf>,

    /// PEM private key of the QUIC certificate.
    #[arg(long, env = "VEIL_RELAY_QUIC_KEY_FILE", requires = "quic_cert_file")]
    pub quic_key_file: Option<PathBuf>,

    /// Generate a self-signed QUIC certificate at start instead of reading one. Clients still
    /// pin it, but its fingerprint changes at every restart.
    #[arg(
        long,
        env = "VEIL_RELAY_QUIC_SELF_SIGNED",
        conflicts_with = "quic_cert_file"
    )]
    pub quic_self_signed: bool,

    /// Address of the ops HTTP endpoint: /metrics, /healthz, /readyz.
    #[arg(long, env = "VEIL_RELAY_OPS_ADDR", default_value = "[::]:9100")]
    pub ops_addr: SocketAddr,

    /// Number of UDP IO workers (threads, one socket each); 0 means one per CPU.
    #[arg(long, env = "VEIL_RELAY_WORKERS", default_value_t = 0)]
    pub workers: usize,

    /// Controller gRPC URLs (comma-separated); the relay attaches to every one of them. Empty:
    /// a standalone relay that learns of no releases.
    #[arg(
        long = "controller",
        env = "VEIL_RELAY_CONTROLLERS",
        value_delimiter = ','
    )]
    pub controllers: Vec<String>,

    /// Cluster key ring file: one `<key-id> <hex-secret> [signing]` line per key.
    #[arg(long, env = "VEIL_KEY_FILE")]
    pub key_file: PathBuf,

    /// Bearer token the relay presents to controllers (relay role).
    #[arg(long, env = "VEIL_RELAY_CONTROLLER_TOKEN", hide_env_values = true)]
    pub controller_token: Option<String>,

    /// This node's unique name; defaults to the host name.
    #[arg(long, env = "VEIL_RELAY_NODE_ID")]
    pub node_id: Option<String>,

    /// Region this relay serves, for example `eu-west`.
    #[arg(long, env = "VEIL_RELAY_REGION", default_value = "")]
    pub region: String,

    /// Failure domain within the region (zone, rack).
    #[arg(long, env = "VEIL_RELAY_ZONE", default_value = "")]
    pub zone: String,

    /// Unbind a leg after this many seconds without media or keepalives.
    #[arg(long, env = "VEIL_RELAY_LEG_IDLE_SECS", default_value_t = 30)]
    pub leg_idle_secs: u64,

    /// Count what each bound leg carries (media datagrams and bytes in and out, drops) and
    /// report it to the controllers, for the signaling service's GetSession. Costs 192 bytes
    /// per bound leg and a few atomic additions per forwarded datagram (docs/PERFORMANCE.md).
    /// Leg events (bound, moved, unbound) are reported either way.
    #[arg(long, env = "VEIL_RELAY_LEG_COUNTERS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub leg_counters: bool,

    /// BIND messages each source IP address may send per second (bursts of twice as many);
    /// beyond that they are dropped unanswered, before any cryptography.
    #[arg(long, env = "VEIL_RELAY_BINDS_PER_IP", default_value_t = 50)]
    pub binds_per_ip: u32,

    /// BIND messages each IO worker handles per second from all sources together.
    #[arg(long, env = "VEIL_RELAY_BINDS_PER_WORKER", default_value_t = 20_000)]
    pub binds_per_worker: u32,

    /// The most legs bound at once; further binds are refused with RELAY_FULL.
    #[arg(long, env = "VEIL_RELAY_MAX_LEGS", default_value_t = 200_000)]
    pub max_legs: usize,

    /// Milliseconds between load reports to each controller.
    #[arg(long, env = "VEIL_RELAY_REPORT_INTERVAL_MS", default_value_t = 1000)]
    pub report_interval_ms: u64,

    /// On SIGTERM, keep serving existing calls this many seconds (refusing new sessions)
    /// before exiting.
    #[arg(long, env = "VEIL_RELAY_DRAIN_DEADLINE_SECS", default_value_t = 30)]
    pub drain_deadline_secs: u64,

    /// The kernel fast path: an XDP program forwards the media of 2-party sessions whose legs
    /// are both bound over UDP (IPv4) before the kernel's UDP stack, with the same checks as
    /// the workers (docs/PERFORMANCE.md). `auto`: native mode, else generic, else userspace
    /// alone with a warning; `native` or `generic`: that mode or the relay does not start.
    /// Needs a build with the `xdp` feature, root (CAP_BPF, CAP_NET_ADMIN), a concrete IPv4
    /// --udp-addr and --xdp-interfaces.
    #[arg(long, env = "VEIL_RELAY_XDP", value_enum, default_value_t = crate::xdp::Mode::Off)]
    pub xdp: crate::xdp::Mode,

    /// Interfaces the XDP fast path attaches to (comma-separated): where clients' datagrams
    /// to --udp-addr arrive.
    #[arg(long, env = "VEIL_RELAY_XDP_INTERFACES", value_delimiter = ',')]
    pub xdp_interfaces: Vec<String>,

    /// Log format.
    #[arg(long, env = "VEIL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, for example `info` or `veil_relay=debug,info`.
    #[arg(long, env = "VEIL_LOG", default_value = "info")]
    pub log_filter: String,

    /// Serve TURN (RFC 8656) on the UDP media port, for WebRTC apps: `--turn false` turns it
    /// off, and STUN and ChannelData datagrams are then dropped as unknown types.
    #[arg(
        long,
        env = "VEIL_RELAY_TURN",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub turn: bool,

    /// TCP address to serve TURN over TCP on (`turn:IP:PORT?transport=tcp`, RFC 8656 §3.1), for
    /// clients whose networks block UDP. Announced with the IP of the public UDP address and
    /// this port. Unset: no TURN over TCP.
    #[arg(long, env = "VEIL_RELAY_TURN_TCP_ADDR")]
    pub turn_tcp_addr: Option<SocketAddr>,

    /// TCP address to serve TURN over TLS on (`turns:HOST:PORT?transport=tcp`), for networks
    /// that let only TLS on port 443 out; needs --turn-tls-cert-file and --turn-tls-key-file.
    /// Unset: no TURN over TLS.
    #[arg(
        long,
        env = "VEIL_RELAY_TURN_TLS_ADDR",
        requires = "turn_tls_cert_file"
    )]
    pub turn_tls_addr: Option<SocketAddr>,

    /// PEM certificate chain for TURN over TLS. WebRTC clients verify it like any TLS server's:
    /// it must be valid for the host of --public-turn-tls-addr (or for the public IP).
    #[arg(
        long,
        env = "VEIL_RELAY_TURN_TLS_CERT_FILE",
        requires = "turn_tls_key_file",
        requires = "turn_tls_addr"
    )]
    pub turn_tls_cert_file: Option<PathBuf>,

    /// PEM private key of the TURN over TLS certificate.
    #[arg(
        long,
        env = "VEIL_RELAY_TURN_TLS_KEY_FILE",
        requires = "turn_tls_cert_file"
    )]
    pub turn_tls_key_file: Option<PathBuf>,

    /// TURN over TCP address announced to clients (where it is published, if not on the bound
    /// port). Unset: the IP of the public UDP address, with the port of --turn-tcp-addr.
    #[arg(
        long,
        env = "VEIL_RELAY_PUBLIC_TURN_TCP_ADDR",
        requires = "turn_tcp_addr"
    )]
    pub public_turn_tcp_addr: Option<SocketAddr>,

    /// TURN over TLS address announced to clients, `HOST:PORT`: the host goes in the `turns:`
    /// URLs, and is the DNS name the certificate is for. Unset: the IP of the public UDP
    /// address, with the port of --turn-tls-addr (the certificate must then be for that IP).
    #[arg(
        long,
        env = "VEIL_RELAY_PUBLIC_TURN_TLS_ADDR",
        requires = "turn_tls_addr"
    )]
    pub public_turn_tls_addr: Option<String>,

    /// The most TURN TCP and TLS connections open at once; further ones are closed at accept.
    #[arg(
        long,
        env = "VEIL_RELAY_TURN_MAX_CONNECTIONS",
        default_value_t = 10_000
    )]
    pub turn_max_connections: usize,

    /// Validate the flags, the environment and the files they name (key ring, QUIC
    /// certificate), print the effective settings with secrets redacted, and exit: 0 if
    /// valid, 64 naming the field if not. Binds nothing and contacts no controller.
    #[arg(long)]
    pub check_config: bool,

    /// Resolve the host of each --controller URL again every this many seconds: the relay
    /// attaches to every address the host resolves to (a headless Service gives one per
    /// controller pod), attaching to new ones and dropping vanished ones.
    #[arg(long, env = "VEIL_RELAY_CONTROLLER_RESOLVE_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub controller_resolve_secs: u64,

    /// File holding the IP address clients reach this node on (one line; for nodes behind a
    /// 1:1 NAT, such as a cloud VM's public IP). Announced with the ports of --udp-addr and
    /// --quic-addr wherever --public-udp-addr or --public-quic-addr is unset. Written before
    /// the relay starts, for instance by an init container from the node's ExternalIP
    /// (deploy/kubernetes/examples/relay-nat.yaml).
    #[arg(long, env = "VEIL_RELAY_PUBLIC_IP_FILE")]
    pub public_ip_file: Option<PathBuf>,
}

/// The QUIC endpoint's settings.
#[derive(Debug, Clone)]
pub struct QuicSettings {
    /// Where it binds.
    pub addr: SocketAddr,
    /// What the relay announces; `None` means the bound address.
    pub public_addr: Option<SocketAddr>,
    /// Certificate and key.
    pub identity: Identity,
}

impl QuicSettings {
    /// QUIC on loopback with a self-signed certificate: for `--dev` and tests.
    pub fn local() -> anyhow::Result<Self> {
        Ok(Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_addr: None,
            identity: Identity::self_signed()?,
        })
    }
}

/// TURN over TCP and TLS.
#[derive(Debug, Clone, Default)]
pub struct TurnStreamSettings {
    /// Where TURN over TCP listens, if it is served.
    pub tcp_addr: Option<SocketAddr>,
    /// Where TURN over TLS listens, if it is served, and its certificate.
    pub tls: Option<(SocketAddr, Identity)>,
    /// The TURN over TCP address announced; `None`: the public UDP IP and the bound port.
    pub tcp_public: Option<SocketAddr>,
    /// The TURN over TLS address announced, `host:port`; `None`: the public UDP IP and the
    /// bound port.
    pub tls_public: Option<String>,
    /// The most connections open at once.
    pub max_connections: usize,
}

impl TurnStreamSettings {
    /// TURN over TCP and TLS on loopback (ephemeral ports, a self-signed certificate): for
    /// `--dev` and tests.
    pub fn local() -> anyhow::Result<Self> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Ok(Self {
            tcp_addr: Some(any),
            tls: Some((any, Identity::self_signed()?)),
            tcp_public: None,
            tls_public: None,
            max_connections: 1000,
        })
    }
}

/// The relay's validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the UDP workers bind.
    pub udp_addr: SocketAddr,
    /// What the relay announces; `None` means the bound address (for port 0 in tests).
    pub public_udp_addr: Option<SocketAddr>,
    /// The QUIC endpoint, if any.
    pub quic: Option<QuicSettings>,
    /// Where the ops endpoint binds.
    pub ops_addr: SocketAddr,
    /// Number of UDP IO workers (at least 1).
    pub workers: usize,
    /// Controller URLs.
    pub controllers: Vec<String>,
    /// Bearer token for controllers.
    pub controller_token: Option<String>,
    /// The cluster key ring.
    pub keys: KeyRing,
    /// Where the key ring came from, for reloading; `None` for generated keys.
    pub key_file: Option<PathBuf>,
    /// Node id.
    pub node_id: String,
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Packet-path tunables.
    pub core: veil_relay_core::Config,
    /// Whether TURN is served on the UDP media port.
    pub turn: bool,
    /// TURN over TCP and TLS (served only with `turn`).
    pub turn_streams: TurnStreamSettings,
    /// Most bound legs.
    pub max_legs: usize,
    /// Interval between load reports.
    pub report_interval: Duration,
    /// How long a drain keeps existing calls.
    pub drain_deadline: Duration,
    /// What the CPU figure of load reports measures.
    pub cpu_source: CpuSource,
    /// How often controller host names are resolved again.
    pub controller_resolve: Duration,
    /// The kernel fast path.
    pub xdp: crate::xdp::Settings,
}

/// What the CPU figure of a relay's load reports measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuSource {
    /// The whole process, over all CPUs: right for a relay that has its process to itself.
    Process,
    /// The relay's UDP worker threads, each over one CPU: right when several relays share a
    /// process (`--dev`), where the process figure would be everyone's.
    Workers,
}

impl Settings {
    /// Settings for a relay on loopback with the given keys, stopping without a drain: for
    /// `--dev` and tests.
    pub fn local(keys: KeyRing, node_id: &str, controllers: Vec<String>) -> Self {
        Self {
            udp_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_udp_addr: None,
            quic: None,
            ops_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            workers: 2,
            controllers,
            controller_token: None,
            keys,
            key_file: None,
            node_id: node_id.to_string(),
            region: String::new(),
            zone: String::new(),
            core: veil_relay_core::Config::default(),
            turn: true,
            turn_streams: TurnStreamSettings::default(),
            max_legs: 200_000,
            report_interval: Duration::from_millis(1000),
            drain_deadline: Duration::ZERO,
            cpu_source: CpuSource::Workers,
            controller_resolve: Duration::from_secs(10),
            xdp: crate::xdp::Settings::default(),
        }
    }
}

impl Settings {
    /// What `--check-config` prints: every setting, secrets as a count only.
    pub fn effective(&self, config: &Config) -> veil_ops::check::Effective {
        let quic = self.quic.as_ref();
        let certificate = quic.map(|q| {
            let source = match (&config.quic_cert_file, &config.quic_key_file) {
                (Some(cert), Some(key)) => format!("{} + {}", cert.display(), key.display()),
                _ => "self-signed, new at every start".to_string(),
            };
            format!(
                "{source} (sha256 {})",
                hex::encode(q.identity.fingerprint())
            )
        });
        veil_ops::check::Effective::new("veil-relay")
            .set("udp-addr", self.udp_addr)
            .set(
                "public-udp-addr",
                self.public_udp_addr.map_or_else(
                    || format!("{} (the bound address)", self.udp_addr),
                    |a| a.to_string(),
                ),
            )
            .opt("quic-addr", quic.map(|q| q.addr))
            .opt(
                "public-quic-addr",
                quic.map(|q| {
                    q.public_addr.map_or_else(
                        || format!("{} (the bound address)", q.addr),
                        |a| a.to_string(),
                    )
                }),
            )
            .opt("quic-certificate", certificate)
            .opt(
                "public-ip-file",
                config
                    .public_ip_file
                    .as_ref()
                    .map(|p| p.display().to_string()),
            )
            .set("ops-addr", self.ops_addr)
            .set("workers", self.workers)
            .list("controller", &self.controllers)
            .set("controller-resolve-secs", config.controller_resolve_secs)
            .secret(
                "controller-token",
                usize::from(self.controller_token.is_some()),
            )
            .key_ring(config.key_file.display(), &self.keys)
            .set("node-id", &self.node_id)
            .set("region", &self.region)
            .set("zone", &self.zone)
            .set("leg-idle-secs", self.core.leg_idle.as_secs())
            .set("leg-counters", self.core.leg_counters)
            .set("xdp", format!("{:?}", self.xdp.mode).to_lowercase())
            .list("xdp-interfaces", &self.xdp.interfaces)
            .set("binds-per-ip", self.core.binds_per_ip)
            .set("binds-per-worker", self.core.binds_per_worker)
            .set("turn", self.turn)
            .opt("turn-tcp-addr", self.turn_streams.tcp_addr)
            .opt("turn-tls-addr", self.turn_streams.tls.as_ref().map(|t| t.0))
            .opt(
                "turn-tls-certificate",
                match (
                    &config.turn_tls_cert_file,
                    &config.turn_tls_key_file,
                    &self.turn_streams.tls,
                ) {
                    (Some(cert), Some(key), Some((_, id))) => Some(format!(
                        "{} + {} (sha256 {})",
                        cert.display(),
                        key.display(),
                        hex::encode(id.fingerprint())
                    )),
                    _ => None,
                },
            )
            .opt("public-turn-tcp-addr", self.turn_streams.tcp_public)
            .opt(
                "public-turn-tls-addr",
                self.turn_streams.tls_public.as_ref(),
            )
            .set("turn-max-connections", self.turn_streams.max_connections)
            .set("max-legs", self.max_legs)
            .set("report-interval-ms", self.report_interval.as_millis())
            .set("drain-deadline-secs", self.drain_deadline.as_secs())
            .set(
                "log-format",
                format!("{:?}", config.log_format).to_lowercase(),
            )
            .set("log", &config.log_filter)
    }
}

/// True for `ip:port`, `[ipv6]:port` or `dns-name:port`, with a port that is not 0.
fn valid_host_port(s: &str) -> bool {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return !a.ip().is_unspecified() && a.port() != 0;
    }
    s.rsplit_once(':').is_some_and(|(host, port)| {
        port.parse::<u16>().is_ok_and(|p| p != 0) && valid_host_name(host)
    })
}

/// True for a DNS host name: dot-separated labels of letters, digits and hyphens.
fn valid_host_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Reads and parses a key ring file.
pub fn read_key_file(path: &std::path::Path) -> anyhow::Result<KeyRing> {
    veil_ops::keys::read_key_file(path)
}

impl Config {
    /// Validates the flags and reads the key file.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let keys = read_key_file(&self.key_file)?;
        if self.udp_addr.ip().is_unspecified() && self.public_udp_addr.is_none() {
            bail!("--public-udp-addr is required when --udp-addr is a wildcard address");
        }
        if let Some(p) = self.public_udp_addr
            && (p.ip().is_unspecified() || p.port() == 0)
        {
            bail!("--public-udp-addr must be a concrete address and port");
        }
        if self.leg_idle_secs == 0 || self.leg_idle_secs > 3600 {
            bail!("--leg-idle-secs must be from 1 to 3600");
        }
        if self.binds_per_ip == 0 || self.binds_per_worker == 0 {
            bail!("--binds-per-ip and --binds-per-worker must be at least 1");
        }
        if self.max_legs == 0 {
            bail!("--max-legs must be at least 1");
        }
        if !(100..=60_000).contains(&self.report_interval_ms) {
            bail!("--report-interval-ms must be from 100 to 60000");
        }
        for url in &self.controllers {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("--controller {url:?} must be an http:// or https:// URL");
            }
        }
        let node_id = match &self.node_id {
            Some(id) if id.is_empty() || id.len() > 128 => {
                bail!("--node-id must be 1 to 128 bytes")
            }
            Some(id) => id.clone(),
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .context("--node-id is not set and the host name is unavailable")?,
        };
        let workers = if self.workers == 0 {
            veil_ops::process::cpus()
        } else {
            self.workers
        };
        let quic = match self.quic_addr {
            None => {
                if self.quic_cert_file.is_some() || self.quic_self_signed {
                    bail!("--quic-addr is required with --quic-cert-file or --quic-self-signed");
                }
                None
            }
            Some(addr) => {
                if addr.ip().is_unspecified() && self.public_quic_addr.is_none() {
                    bail!("--public-quic-addr is required when --quic-addr is a wildcard address");
                }
                if let Some(p) = self.public_quic_addr
                    && (p.ip().is_unspecified() || p.port() == 0)
                {
                    bail!("--public-quic-addr must be a concrete address and port");
                }
                let identity = match (&self.quic_cert_file, &self.quic_key_file) {
                    (Some(cert), Some(key)) => Identity::from_pem_files(cert, key)?,
                    _ if self.quic_self_signed => Identity::self_signed()?,
                    _ => bail!(
                        "--quic-addr needs --quic-cert-file and --quic-key-file, or --quic-self-signed"
                    ),
                };
                Some(QuicSettings {
                    addr,
                    public_addr: self.public_quic_addr,
                    identity,
                })
            }
        };
        if !self.turn && (self.turn_tcp_addr.is_some() || self.turn_tls_addr.is_some()) {
            bail!("--turn-tcp-addr and --turn-tls-addr need TURN on (--turn true)");
        }
        if self.xdp != crate::xdp::Mode::Off {
            if !cfg!(feature = "xdp") && self.xdp != crate::xdp::Mode::Auto {
                bail!(
                    "--xdp {}: this veil-relay was built without the `xdp` feature",
                    format!("{:?}", self.xdp).to_lowercase()
                );
            }
            if self.xdp_interfaces.is_empty() {
                bail!("--xdp needs --xdp-interfaces: where clients' datagrams arrive");
            }
        }
        if self.turn_max_connections == 0 {
            bail!("--turn-max-connections must be at least 1");
        }
        if let Some(p) = self.public_turn_tcp_addr
            && (p.ip().is_unspecified() || p.port() == 0)
        {
            bail!("--public-turn-tcp-addr must be a concrete address and port");
        }
        if let Some(a) = &self.public_turn_tls_addr
            && !valid_host_port(a)
        {
            bail!("--public-turn-tls-addr {a:?} must be HOST:PORT (a DNS name or an IP, a port)");
        }
        if let (Some(tcp), Some(tls)) = (self.turn_tcp_addr, self.turn_tls_addr)
            && tcp.port() != 0
            && tcp == tls
        {
            bail!("--turn-tcp-addr and --turn-tls-addr must differ");
        }
        let turn_streams = TurnStreamSettings {
            tcp_addr: self.turn_tcp_addr,
            tls: match (
                self.turn_tls_addr,
                &self.turn_tls_cert_file,
                &self.turn_tls_key_file,
            ) {
                (Some(addr), Some(cert), Some(key)) => Some((
                    addr,
                    Identity::from_pem_files_of(
                        cert,
                        key,
                        ("--turn-tls-cert-file", "--turn-tls-key-file"),
                    )?,
                )),
                (Some(_), _, _) => {
                    bail!("--turn-tls-addr needs --turn-tls-cert-file and --turn-tls-key-file")
                }
                _ => None,
            },
            tcp_public: self.public_turn_tcp_addr,
            tls_public: self.public_turn_tls_addr.clone(),
            max_connections: self.turn_max_connections,
        };
        Ok(Settings {
            udp_addr: self.udp_addr,
            public_udp_addr: self.public_udp_addr,
            quic,
            ops_addr: self.ops_addr,
            workers,
            controllers: self.controllers.clone(),
            controller_token: self.controller_token.clone(),
            keys,
            key_file: Some(self.key_file.clone()),
            node_id,
            region: self.region.clone(),
            zone: self.zone.clone(),
            core: veil_relay_core::Config {
                leg_idle: Duration::from_secs(self.leg_idle_secs),
                leg_counters: self.leg_counters,
                binds_per_ip: self.binds_per_ip,
                binds_per_worker: self.binds_per_worker,
                ..Default::default()
            },
            turn: self.turn,
            turn_streams,
            max_legs: self.max_legs,
            report_interval: Duration::from_millis(self.report_interval_ms),
            drain_deadline: Duration::from_secs(self.drain_deadline_secs),
            cpu_source: CpuSource::Process,
            controller_resolve: Duration::from_secs(self.controller_resolve_secs),
            xdp: crate::xdp::Settings {
                mode: self.xdp,
                interfaces: self.xdp_interfaces.clone(),
            },
        })
    }
}
