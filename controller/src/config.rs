//! The controller's flags, with `VEIL_*` environment fallbacks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use veil_ops::logging::LogFormat;
use veil_protocol::{KeyRing, Limits};

use crate::placement::RegionMap;
use crate::quota;

/// veil-controller: allocates relay sessions for signaling services, mints per-participant leg
/// tokens, and steers calls across the relays attached to it. Every flag can also be set
/// through the environment variable named in its description.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "veil-controller", version)]
pub struct Config {
    /// gRPC address: SessionService, RelayRegistry, AdminService, grpc.health.v1 (NOT_SERVING
    /// while no relay is attached or while draining, like /readyz) and server reflection (v1
    /// and v1alpha).
    #[arg(long, env = "VEIL_CONTROLLER_GRPC_ADDR", default_value = "[::]:50051")]
    pub grpc_addr: SocketAddr,

    /// Address of the ops HTTP endpoint: /metrics, /healthz, /readyz.
    #[arg(long, env = "VEIL_CONTROLLER_OPS_ADDR", default_value = "[::]:9200")]
    pub ops_addr: SocketAddr,

    /// Cluster key ring file: one `<key-id> <hex-secret> [signing]` line per key. Required
    /// unless --dev.
    #[arg(long, env = "VEIL_KEY_FILE", required_unless_present = "dev")]
    pub key_file: Option<PathBuf>,

    /// Bearer tokens accepted from signaling services (comma-separated). Empty: SessionService
    /// is open, for local development only.
    #[arg(
        long,
        env = "VEIL_CONTROLLER_SIGNALING_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub signaling_tokens: Vec<String>,

    /// Bearer tokens accepted from relays (comma-separated), shared: a relay presenting one may
    /// register as any node id that --relay-identities does not name. Prefer
    /// --relay-identities. Empty (and no --relay-identities): RelayRegistry is open, for local
    /// development only.
    #[arg(
        long,
        env = "VEIL_CONTROLLER_RELAY_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub relay_tokens: Vec<String>,

    /// Per-relay credentials (comma-separated `NODE_ID:TOKEN`): a relay presenting TOKEN may
    /// register as NODE_ID only, and no other credential may register NODE_ID. Each relay
    /// gets its own token (its --controller-token).
    #[arg(
        long,
        env = "VEIL_CONTROLLER_RELAY_IDENTITIES",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub relay_identities: Vec<String>,

    /// Networks relays may advertise addresses in (comma-separated): `CIDR` for every relay,
    /// `NODE_ID=CIDR` for one relay alone (a relay with entries of its own is held to those
    /// only). A relay whose hello advertises a UDP, QUIC or TURN address outside its networks is
    /// refused (PERMISSION_DENIED, RELAY_ADDRESS_NOT_ALLOWED): a relay credential cannot send
    /// participants to an address of its choosing. Empty: addresses are not checked.
    #[arg(long, env = "VEIL_CONTROLLER_RELAY_NETWORKS", value_delimiter = ',')]
    pub relay_networks: Vec<String>,

    /// Bearer tokens accepted from operators for AdminService (comma-separated). Empty:
    /// AdminService is open, for local development only.
    #[arg(
        long,
        env = "VEIL_CONTROLLER_ADMIN_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub admin_tokens: Vec<String>,

    /// Distances between regions for placement, comma-separated `REGION:REGION=DISTANCE`
    /// entries (symmetric; unlisted pairs of different regions count 100).
    #[arg(long, env = "VEIL_CONTROLLER_REGION_DISTANCES", value_delimiter = ',')]
    pub region_distance: Vec<String>,

    /// Mark a relay down after this many milliseconds without a load report.
    #[arg(long, env = "VEIL_CONTROLLER_RELAY_TIMEOUT_MS", default_value_t = 3000)]
    pub relay_timeout_ms: u64,

    /// Packet-rate limit written into each leg token (packets per second; 0 = none).
    #[arg(long, env = "VEIL_CONTROLLER_LEG_MAX_PPS", default_value_t = 5000)]
    pub leg_max_pps: u32,

    /// Bit-rate limit written into each leg token (kilobits per second; 0 = none).
    #[arg(long, env = "VEIL_CONTROLLER_LEG_MAX_KBPS", default_value_t = 50_000)]
    pub leg_max_kbps: u32,

    /// Quota: live sessions (neither released nor expired) one signaling credential may hold on
    /// this replica; past it AllocateSession answers RESOURCE_EXHAUSTED (QUOTA_LIVE_SESSIONS).
    /// 0 = unlimited.
    #[arg(long, env = "VEIL_CONTROLLER_QUOTA_LIVE_SESSIONS", default_value_t = quota::Limits::DEFAULT.live_sessions)]
    pub quota_live_sessions: u32,

    /// Quota: WatchSession streams one signaling credential may keep open at once on this
    /// replica; past it WatchSession answers RESOURCE_EXHAUSTED (QUOTA_WATCH_STREAMS). 0 =
    /// unlimited.
    #[arg(long, env = "VEIL_CONTROLLER_QUOTA_WATCH_STREAMS", default_value_t = quota::Limits::DEFAULT.watch_streams)]
    pub quota_watch_streams: u32,

    /// Quota: AllocateSession calls per second one signaling credential may make on this
    /// replica, in bursts of as many (a token bucket); past it RESOURCE_EXHAUSTED
    /// (QUOTA_ALLOCATION_RATE) with a RetryInfo. 0 = unlimited.
    #[arg(long, env = "VEIL_CONTROLLER_QUOTA_ALLOCATIONS_PER_SEC", default_value_t = quota::Limits::DEFAULT.allocations_per_sec)]
    pub quota_allocations_per_sec: u32,

    /// This replica's id, unique among the replicas of the cluster (it ranks the replicas for
    /// each call, see --peers). Default: $HOSTNAME (a Kubernetes pod's name), else a random
    /// one.
    #[arg(long, env = "VEIL_CONTROLLER_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// The gRPC URLs of the other controller replicas (comma-separated, for example
    /// `http://controller-1.veil:50051`): this replica keeps a copy of their sessions and they
    /// of its own, so that any replica serves any session, with no database. A URL's host may
    /// resolve to several replicas (a headless Service: one address per pod), this one
    /// included: it links to every address, resolves the name again every 10 s, and skips its
    /// own. Every replica must reach every other one. Empty: a single replica.
    #[arg(long, env = "VEIL_CONTROLLER_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// Bearer tokens accepted from peer replicas for ReplicaService (comma-separated); this
    /// replica presents the first to its --peers. Every replica gets the same list. Empty:
    /// ReplicaService is open on loopback (and in --dev), and refused on any other address.
    #[arg(
        long,
        env = "VEIL_CONTROLLER_PEER_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub peer_tokens: Vec<String>,

    /// Run a whole local cluster in this process on loopback: this controller plus
    /// --dev-relays relays, with generated keys; print `READY {json}` and serve until
    /// interrupted. --grpc-addr and --ops-addr are ignored (ports are picked on 127.0.0.1), and
    /// no quota applies.
    #[arg(long)]
    pub dev: bool,

    /// Number of relays in --dev mode.
    #[arg(long, default_value_t = 1, requires = "dev")]
    pub dev_relays: usize,

    /// Number of controller replicas in --dev mode (1 to 5), peers of each other; the READY
    /// line lists their gRPC URLs in `controllers` (`controller` is the first).
    #[arg(long, default_value_t = 1, requires = "dev")]
    pub dev_controllers: usize,

    /// Log format.
    #[arg(long, env = "VEIL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, for example `info` or `veil_controller=debug,info`.
    #[arg(long, env = "VEIL_LOG", default_value = "info")]
    pub log_filter: String,

    /// Serve this role with no tokens on a non-loopback --grpc-addr, on purpose
    /// (comma-separated: signaling, relay, admin). Without it a controller refuses to start
    /// with an open role anywhere but loopback: anyone who reaches the port could allocate
    /// sessions, pose as a relay, or drain every relay.
    #[arg(
        long = "allow-open-role",
        env = "VEIL_CONTROLLER_ALLOW_OPEN_ROLES",
        value_delimiter = ',',
        value_enum
    )]
    pub allow_open_roles: Vec<Role>,

    /// Validate the flags, the environment and the key file, print the effective settings
    /// with secrets redacted, and exit: 0 if valid, 64 naming the field if not. Binds
    /// nothing.
    #[arg(long)]
    pub check_config: bool,
}

/// A caller role, each with its own bearer tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Signaling services: SessionService.
    Signaling,
    /// Relays: RelayRegistry.
    Relay,
    /// Operators: AdminService.
    Admin,
}

impl Role {
    /// Every role, in the order of their flags.
    pub const ALL: [Self; 3] = [Self::Signaling, Self::Relay, Self::Admin];

    /// The role's name, as `--allow-open-role` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Signaling => "signaling",
            Self::Relay => "relay",
            Self::Admin => "admin",
        }
    }

    /// The flag that sets its tokens.
    pub fn tokens_flag(self) -> &'static str {
        match self {
            Self::Signaling => "--signaling-tokens",
            Self::Relay => "--relay-tokens",
            Self::Admin => "--admin-tokens",
        }
    }

    /// The gRPC service it may call.
    fn service(self) -> &'static str {
        match self {
            Self::Signaling => "SessionService",
            Self::Relay => "RelayRegistry",
            Self::Admin => "AdminService",
        }
    }
}

/// The controller's validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// gRPC bind address.
    pub grpc_addr: SocketAddr,
    /// Ops endpoint bind address.
    pub ops_addr: SocketAddr,
    /// The cluster key ring.
    pub keys: KeyRing,
    /// Where it came from, for reloads.
    pub key_file: Option<PathBuf>,
    /// Signaling service tokens.
    pub signaling_tokens: Vec<String>,
    /// Shared relay tokens (any node id that `relay_identities` does not name).
    pub relay_tokens: Vec<String>,
    /// Per-relay credentials: each admits its node id only.
    pub relay_identities: Vec<RelayIdentity>,
    /// Where relays may advertise addresses.
    pub relay_networks: RelayNetworks,
    /// Admin tokens.
    pub admin_tokens: Vec<String>,
    /// Region distances.
    pub regions: RegionMap,
    /// Relay silence timeout.
    pub relay_timeout: Duration,
    /// Limits for each leg.
    pub leg_limits: Limits,
    /// Each signaling credential's quotas.
    pub quotas: quota::Limits,
    /// This replica's id.
    pub replica_id: String,
    /// The other replicas' gRPC URLs.
    pub peers: Vec<String>,
    /// Tokens accepted from peer replicas (the first is presented to them).
    pub peer_tokens: Vec<String>,
    /// With no peer tokens: ReplicaService open (loopback, --dev) rather than refused.
    pub peer_open: bool,
}

/// A random replica id, for a replica given none.
pub fn random_replica_id() -> String {
    format!("replica-{:08x}", rand::random::<u32>())
}

/// Where relays may advertise their addresses (`--relay-networks`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayNetworks {
    /// For every relay without networks of its own.
    pub any: Vec<ipnet::IpNet>,
    /// For one relay each.
    pub by_node: std::collections::HashMap<String, Vec<ipnet::IpNet>>,
}

impl RelayNetworks {
    /// Parses `--relay-networks` entries.
    pub fn parse(entries: &[String]) -> anyhow::Result<Self> {
        let mut out = Self::default();
        for e in entries {
            let (node, net) = match e.split_once('=') {
                Some((node, net)) => (Some(node), net),
                None => (None, e.as_str()),
            };
            let Ok(net) = net.trim().parse::<ipnet::IpNet>() else {
                bail!(
                    "--relay-networks: each entry must be CIDR or NODE_ID=CIDR, such as \
                     203.0.113.0/24 or relay-0=203.0.113.7/32"
                );
            };
            match node {
                Some(n)
                    if n.is_empty()
                        || n.len() > crate::api::MAX_ID_LEN
                        || n.chars().any(|c| c.is_whitespace() || c.is_control()) =>
                {
                    bail!("--relay-networks: each NODE_ID must be 1 to 128 bytes without spaces")
                }
                Some(n) => out.by_node.entry(n.to_string()).or_default().push(net),
                None => out.any.push(net),
            }
        }
        Ok(out)
    }

    /// True when no network is set: addresses are not checked.
    pub fn is_empty(&self) -> bool {
        self.any.is_empty() && self.by_node.is_empty()
    }

    /// Whether relay `node_id` may advertise `ip`.
    pub fn admits(&self, node_id: &str, ip: std::net::IpAddr) -> bool {
        if self.is_empty() {
            return true;
        }
        let nets = self.by_node.get(node_id).unwrap_or(&self.any);
        nets.iter().any(|n| n.contains(&ip))
    }
}

/// A relay's own credential: its node id and the token that proves it.
#[derive(Clone, PartialEq, Eq)]
pub struct RelayIdentity {
    /// The one node id the token may register.
    pub node_id: String,
    /// The bearer token.
    pub token: String,
}

impl std::fmt::Debug for RelayIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayIdentity")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl RelayIdentity {
    /// Parses a `--relay-identities` entry, `NODE_ID:TOKEN`.
    pub fn parse(entry: &str) -> anyhow::Result<Self> {
        let Some((node_id, token)) = entry.split_once(':') else {
            bail!("--relay-identities: each entry must be NODE_ID:TOKEN");
        };
        if node_id.is_empty()
            || node_id.len() > crate::api::MAX_ID_LEN
            || node_id.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            bail!("--relay-identities: each NODE_ID must be 1 to 128 bytes without spaces");
        }
        Ok(Self {
            node_id: node_id.to_string(),
            token: token.to_string(),
        })
    }
}

impl Settings {
    /// The tokens of `role` (for relays, the shared ones and the per-relay ones).
    pub fn tokens(&self, role: Role) -> Vec<&str> {
        match role {
            Role::Signaling => self.signaling_tokens.iter().map(String::as_str).collect(),
            Role::Relay => self
                .relay_tokens
                .iter()
                .map(String::as_str)
                .chain(self.relay_identities.iter().map(|i| i.token.as_str()))
                .collect(),
            Role::Admin => self.admin_tokens.iter().map(String::as_str).collect(),
        }
    }

    /// The roles anyone may take, for they have no tokens.
    pub fn open_roles(&self) -> Vec<Role> {
        Role::ALL
            .into_iter()
            .filter(|&r| self.tokens(r).is_empty())
            .collect()
    }

    /// What `--check-config` prints: every setting, tokens and keys as counts and ids only.
    pub fn effective(&self, config: &Config) -> veil_ops::check::Effective {
        let key_source = config.key_file.as_ref().map_or_else(
            || "generated (--dev)".to_string(),
            |p| p.display().to_string(),
        );
        let open: Vec<&str> = self.open_roles().into_iter().map(Role::name).collect();
        veil_ops::check::Effective::new("veil-controller")
            .set("grpc-addr", self.grpc_addr)
            .set("ops-addr", self.ops_addr)
            .key_ring(key_source, &self.keys)
            .secret("signaling-tokens", self.signaling_tokens.len())
            .secret("relay-tokens", self.relay_tokens.len())
            .secret("relay-identities", self.relay_identities.len())
            .secret("admin-tokens", self.admin_tokens.len())
            .set("replica-id", &self.replica_id)
            .list("peers", &self.peers)
            .secret("peer-tokens", self.peer_tokens.len())
            .set(
                "replica-service",
                if !self.peer_tokens.is_empty() {
                    "peer tokens"
                } else if self.peer_open {
                    "open (loopback)"
                } else {
                    "refused (no --peer-tokens)"
                },
            )
            .list("open-roles", &open)
            .list("region-distance", &config.region_distance)
            .set("relay-timeout-ms", self.relay_timeout.as_millis())
            .set("leg-max-pps", self.leg_limits.max_pps)
            .set("leg-max-kbps", self.leg_limits.max_kbps)
            .set("quota-live-sessions", quota_text(self.quotas.live_sessions))
            .set("quota-watch-streams", quota_text(self.quotas.watch_streams))
            .set(
                "quota-allocations-per-sec",
                quota_text(self.quotas.allocations_per_sec),
            )
            .set(
                "log-format",
                format!("{:?}", config.log_format).to_lowercase(),
            )
            .set("log", &config.log_filter)
    }
}

impl Settings {
    /// Settings for a controller on loopback with the given keys: for `--dev` and tests.
    pub fn local(keys: KeyRing) -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ops_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            keys,
            key_file: None,
            signaling_tokens: Vec::new(),
            relay_tokens: Vec::new(),
            relay_identities: Vec::new(),
            relay_networks: RelayNetworks::default(),
            admin_tokens: Vec::new(),
            regions: RegionMap::default(),
            relay_timeout: Duration::from_secs(3),
            leg_limits: Limits {
                max_pps: 5000,
                max_kbps: 50_000,
            },
            // A local cluster serves one developer, and load tests that allocate as fast as
            // they can: no quotas.
            quotas: quota::Limits::UNLIMITED,
            replica_id: random_replica_id(),
            peers: Vec::new(),
            peer_tokens: Vec::new(),
            peer_open: true,
        }
    }
}

/// A quota as `--check-config` prints it.
fn quota_text(limit: u32) -> String {
    match limit {
        0 => "0 (unlimited)".to_string(),
        n => n.to_string(),
    }
}

impl Config {
    /// Validates the flags and reads the key file (not used with --dev).
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let keys = match &self.key_file {
            Some(path) => veil_ops::keys::read_key_file(path)?,
            None => generate_keys(),
        };
        let regions = RegionMap::parse(&self.region_distance)
            .map_err(|e| anyhow::anyhow!("--region-distance {e}"))?;
        if !(500..=60_000).contains(&self.relay_timeout_ms) {
            bail!("--relay-timeout-ms must be from 500 to 60000");
        }
        let identities = self
            .relay_identities
            .iter()
            .map(|e| RelayIdentity::parse(e))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (i, a) in identities.iter().enumerate() {
            if identities[i + 1..].iter().any(|b| b.node_id == a.node_id) {
                bail!("--relay-identities: each NODE_ID once: one credential per relay");
            }
            if identities[i + 1..].iter().any(|b| b.token == a.token) {
                bail!("--relay-identities: each relay needs a token of its own");
            }
        }
        let identity_tokens: Vec<String> = identities.iter().map(|i| i.token.clone()).collect();
        let roles = [
            ("--signaling-tokens", &self.signaling_tokens),
            ("--relay-tokens", &self.relay_tokens),
            ("--relay-identities", &identity_tokens),
            ("--admin-tokens", &self.admin_tokens),
            ("--peer-tokens", &self.peer_tokens),
        ];
        for (flag, tokens) in roles {
            if tokens
                .iter()
                .any(|t| t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                bail!("{flag}: each token must be at least 16 characters without spaces");
            }
        }
        for (i, (a, ta)) in roles.iter().enumerate() {
            for (b, tb) in &roles[i + 1..] {
                if ta.iter().any(|t| tb.contains(t)) {
                    bail!("{a} and {b} must not share a token: each role has its own credentials");
                }
            }
        }
        if self.dev && !(1..=16).contains(&self.dev_relays) {
            bail!("--dev-relays must be from 1 to 16");
        }
        if self.dev && !(1..=5).contains(&self.dev_controllers) {
            bail!("--dev-controllers must be from 1 to 5");
        }
        let replica_id = match &self.replica_id {
            Some(id) => id.clone(),
            None => std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(random_replica_id),
        };
        if replica_id.is_empty()
            || replica_id.len() > crate::api::MAX_ID_LEN
            || replica_id
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            bail!("--replica-id must be 1 to 128 bytes without spaces");
        }
        if self.peers.len() > 16 {
            bail!("--peers: at most 16 other replicas");
        }
        for (i, url) in self.peers.iter().enumerate() {
            let valid = (url.starts_with("http://") || url.starts_with("https://"))
                && url.parse::<http::Uri>().is_ok_and(|u| u.host().is_some());
            if !valid {
                bail!("--peers: each entry must be a gRPC URL such as http://controller-1:50051");
            }
            if self.peers[i + 1..].contains(url) {
                bail!("--peers: each replica once");
            }
        }
        let loopback = self.dev || self.grpc_addr.ip().is_loopback();
        if !self.peers.is_empty() && self.peer_tokens.is_empty() && !loopback {
            bail!(
                "--peers needs --peer-tokens on a reachable --grpc-addr: replicas send each other \
                 every session's leg tokens, so ReplicaService needs a credential of its own"
            );
        }
        let settings = Settings {
            grpc_addr: self.grpc_addr,
            ops_addr: self.ops_addr,
            keys,
            key_file: self.key_file.clone(),
            signaling_tokens: self.signaling_tokens.clone(),
            relay_tokens: self.relay_tokens.clone(),
            relay_identities: identities,
            relay_networks: RelayNetworks::parse(&self.relay_networks)?,
            admin_tokens: self.admin_tokens.clone(),
            regions,
            relay_timeout: Duration::from_millis(self.relay_timeout_ms),
            leg_limits: Limits {
                max_pps: self.leg_max_pps,
                max_kbps: self.leg_max_kbps,
            },
            quotas: quota::Limits {
                live_sessions: self.quota_live_sessions,
                watch_streams: self.quota_watch_streams,
                allocations_per_sec: self.quota_allocations_per_sec,
            },
            replica_id,
            peers: self.peers.clone(),
            peer_tokens: self.peer_tokens.clone(),
            peer_open: loopback,
        };
        for role in Role::ALL {
            let tokens = settings.tokens(role);
            let allowed = self.allow_open_roles.contains(&role);
            if allowed && !tokens.is_empty() {
                bail!(
                    "--allow-open-role {} contradicts {}: drop one of them",
                    role.name(),
                    role.tokens_flag()
                );
            }
            // --dev serves on loopback whatever --grpc-addr says.
            if tokens.is_empty() && !allowed && !self.dev && !self.grpc_addr.ip().is_loopback() {
                bail!(
                    "{} is empty, so {} would be open to anyone who reaches --grpc-addr {}: \
                     set {} (or its environment variable), or pass --allow-open-role {} to serve \
                     it open on purpose",
                    role.tokens_flag(),
                    role.service(),
                    self.grpc_addr,
                    role.tokens_flag(),
                    role.name()
                );
            }
        }
        Ok(settings)
    }
}

/// A fresh random key ring (two keys, the second signing), for `--dev` and tests.
pub fn generate_keys() -> KeyRing {
    KeyRing::from_keys(&[(1, rand::random()), (2, rand::random())], 2)
}
