//! `veil-loadtest`: drives realistic calls through a Veil cluster and reports honest figures.
//!
//! Like a signaling service, it allocates each call through the controller's gRPC API and
//! releases it at the end. Each simulated participant binds its own leg from its own local
//! address, sends real SRTP (keys shared only among the call's participants, never with Veil),
//! and decrypts and authenticates everything it receives, so loss, corruption and misdelivery are
//! counted, not guessed. Every run stops by itself at its duration, and sends only to the relay
//! addresses the controller returned.
//!
//! The report ([`report`], [`html`]) says where lost packets died, from the relays' metrics and
//! this host's kernel counters ([`host`]), and whether the generator itself kept up; [`gate`]
//! judges it against a release's thresholds. It cannot see inside a remote relay's kernel: drops
//! at the sockets of relays on other hosts show only as an estimate from their metrics.

pub mod gate;
pub mod host;
pub mod html;
pub mod media;
pub mod report;
pub mod scenario;
pub mod soak;
pub mod stats;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use rand::Rng;
use tonic::transport::Channel;
use veil_client::{Leg, LegConfig};
use veil_proto::v1 as pb;
use veil_proto::v1::session_service_client::SessionServiceClient;
use webrtc_srtp::context::Context;
use webrtc_srtp::protection_profile::ProtectionProfile;

use crate::media::Source;
use crate::report::{RelayFigures, Report, RunFacts};
use crate::scenario::{FailoverMode, Profile, Scenario, SrtpSuite, TransportMode};
use crate::stats::{Collector, LegTransport, StreamRx};

/// Which cluster to drive.
#[derive(Debug, Clone)]
pub enum Target {
    /// Start a local cluster in this process with this many relays and controller replicas.
    Local {
        /// Relays.
        relays: usize,
        /// Controller replicas, peers of each other (each RPC goes to one of them).
        controllers: usize,
    },
    /// An existing cluster.
    Remote {
        /// Controller gRPC URL; several, comma-separated, for replicas (each RPC goes to one
        /// of them).
        controller: String,
        /// Bearer token for the controller.
        token: Option<String>,
        /// Ops endpoints (`host:port`) of the relays, to compare figures with their metrics.
        relay_metrics: Vec<String>,
    },
}

/// A whole run.
#[derive(Debug, Clone)]
pub struct Config {
    /// What to do.
    pub scenario: Scenario,
    /// Against what.
    pub target: Target,
    /// Print a progress line each second (standard error).
    pub progress: bool,
    /// What the run must stay within to pass.
    pub thresholds: gate::Thresholds,
    /// The sessions' TTL asked of AllocateSession, seconds (0: the API's default, an hour).
    pub ttl_seconds: u32,
}

/// A participant's leg configuration, with the scenario's failover mode.
fn leg_config(s: &Scenario, leg: &pb::Leg, ip: IpAddr) -> LegConfig {
    let cfg = LegConfig::from_pb(leg, SocketAddr::new(ip, 0));
    match s.failover {
        FailoverMode::Cold => cfg,
        FailoverMode::Hot => cfg.hot_standby(),
    }
}

/// How long receivers keep listening after senders stop, for packets in flight.
const GRACE: Duration = Duration::from_millis(1000);

/// Runs the load test and returns its report, judged against `cfg.thresholds`.
pub async fn run(cfg: Config) -> anyhow::Result<Report> {
    cfg.scenario.validate()?;
    let (cluster, endpoint) = connect(&cfg.target).await?;
    let report = drive(&cfg.scenario, &endpoint, cfg.ttl_seconds, cfg.progress).await;
    if let Some(c) = cluster {
        c.shutdown().await?;
    }
    let mut report = report?;
    report.judge(&cfg.thresholds);
    Ok(report)
}

/// Where a run sends its requests, and which relay metrics it reads.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Controller gRPC URL.
    pub url: String,
    /// Bearer token for the controller.
    pub token: Option<String>,
    /// `(name, host:port)` of each relay's ops endpoint.
    pub relay_metrics: Vec<(String, String)>,
    /// What this is, for the report's header.
    pub description: String,
    /// The cluster runs in this process (`--local`).
    pub local: bool,
}

/// Starts the local cluster if the target is local; says where to send requests.
pub async fn connect(
    target: &Target,
) -> anyhow::Result<(Option<veil_controller::dev::Cluster>, Endpoint)> {
    Ok(match target {
        Target::Local {
            relays,
            controllers,
        } => {
            let cluster = veil_controller::dev::Cluster::start(veil_controller::dev::Options {
                relays: *relays,
                controllers: (*controllers).max(1),
                ..Default::default()
            })
            .await
            .context("start the local cluster")?;
            let endpoint = Endpoint {
                url: cluster.controller_urls.join(","),
                token: None,
                relay_metrics: cluster
                    .relays
                    .iter()
                    .map(|r| (r.node_id.clone(), r.metrics.to_string()))
                    .collect(),
                description: format!(
                    "local cluster in this process (controller{} on {}, {} relay{} on loopback), \
                     sharing this machine's {} CPUs with the load generator",
                    if cluster.controller_urls.len() == 1 {
                        String::new()
                    } else {
                        format!(
                            " replicas ({}, each RPC to any)",
                            cluster.controller_urls.len()
                        )
                    },
                    cluster
                        .controller_urls
                        .iter()
                        .map(|u| u
                            .trim_start_matches("http://")
                            .trim_start_matches("https://"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    relays,
                    if *relays == 1 { "" } else { "s" },
                    cores()
                ),
                local: true,
            };
            (Some(cluster), endpoint)
        }
        Target::Remote {
            controller,
            token,
            relay_metrics,
        } => (
            None,
            Endpoint {
                url: controller.clone(),
                token: token.clone(),
                relay_metrics: relay_metrics
                    .iter()
                    .enumerate()
                    .map(|(i, m)| (format!("relay-metrics-{i}"), m.clone()))
                    .collect(),
                description: if relay_metrics.is_empty() {
                    format!("controller {controller} (no --relay-metrics: no relay cross-check)")
                } else {
                    format!(
                        "controller {controller}, relay metrics from {}",
                        relay_metrics.join(", ")
                    )
                },
                local: false,
            },
        ),
    })
}

/// CPUs of this machine, as the scheduler offers them to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `s` once against `endpoint`: every call allocated (with `ttl_seconds`, 0 for the API's
/// default), run and released; returns the report, judged against the default thresholds.
pub async fn drive(
    s: &Scenario,
    endpoint: &Endpoint,
    ttl_seconds: u32,
    progress_line: bool,
) -> anyhow::Result<Report> {
    s.validate()?;
    let relay_metrics = &endpoint.relay_metrics;
    let url = &endpoint.url;
    let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let before = report::scrape_relays(relay_metrics).await;
    let kernel_before = host::UdpCounters::read();
    let sockets_before = host::Sockets::read();

    // One controller, or replicas: each RPC then goes to one of them (the less busy of two
    // picked at random).
    let mut endpoints = Vec::new();
    for u in url.split(',') {
        endpoints.push(
            tonic::transport::Endpoint::from_shared(u.to_string())
                .with_context(|| format!("controller URL {u}"))?
                .connect_timeout(Duration::from_secs(5)),
        );
    }
    let channel = if endpoints.len() == 1 {
        endpoints[0]
            .connect()
            .await
            .with_context(|| format!("connect to controller {url}"))?
    } else {
        Channel::balance_list(endpoints.into_iter())
    };
    let api = Api {
        client: SessionServiceClient::new(channel),
        token: endpoint.token.clone(),
    };

    let epoch = Instant::now();
    let end = epoch + s.ramp_time() + s.duration;
    let collector = Arc::new(Collector::default());
    let run_id: u32 = rand::random();
    let (snapshot_tx, snapshot_rx) = tokio::sync::watch::channel(None);
    let ctx = Arc::new(RunCtx {
        scenario: s.clone(),
        api,
        epoch,
        end,
        collector: collector.clone(),
        run_id,
        ttl_seconds,
        relay_metrics: relay_metrics.clone(),
        relay_addrs: Mutex::new(HashSet::new()),
        sockets: snapshot_rx,
    });

    // Every socket's drop count, read once when receivers stop listening and before any
    // participant closes its socket (each waits for this snapshot; see `participant`).
    let snapshot = tokio::spawn(async move {
        tokio::time::sleep_until((end + GRACE + Duration::from_millis(10)).into()).await;
        let sockets = host::Sockets::read().map(Arc::new);
        let kernel = host::UdpCounters::read();
        snapshot_tx.send_replace(Some(sockets.clone()));
        (sockets, kernel)
    });
    let progress = tokio::spawn(progress_loop(ctx.clone(), progress_line, before.clone()));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..s.calls {
        let at = epoch + Duration::from_secs_f64(i as f64 / s.ramp_up_per_sec);
        tokio::time::sleep_until(at.into()).await;
        calls.spawn(run_call(ctx.clone(), i));
    }
    let mut results = Vec::new();
    while let Some(r) = calls.join_next().await {
        // The first failure of each kind is logged; the summary counts them all.
        let (kind, error) = match r {
            Ok(Ok(c)) => {
                let failed = c.failure.clone();
                results.push(c);
                match failed {
                    Some((kind, error)) => (kind, error),
                    None => continue,
                }
            }
            Ok(Err(f)) => (f.kind, format!("{:#}", f.error)),
            Err(e) => ("panicked".to_string(), e.to_string()),
        };
        if collector.on_failure(&kind, &error) {
            tracing::warn!(
                kind,
                error,
                "call failed (further failures of this kind: see the summary)"
            );
        }
    }
    let _ = progress.await;
    let (sockets_after, kernel_after) = snapshot.await.unwrap_or((None, None));

    // Loss, by the second each lost packet was sent in and the receiver's transport.
    for call in &results {
        for (r, rx) in call.received.iter().enumerate() {
            for (sender, tx) in call.sent.iter().enumerate() {
                if sender == r {
                    continue;
                }
                let stream = rx.get(&tx.ssrc);
                for index in 0..tx.sent {
                    if !stream.is_some_and(|st| st.has(index)) {
                        collector.on_lost(tx.second_of(index), call.transports[r], 1);
                    }
                }
            }
        }
    }

    // Drops at the relays' own sockets, by transport, where they are on this host (a local
    // cluster).
    let mut relay_socket_drops = [None; 2];
    if let (Some(b), Some(a)) = (&sockets_before, &sockets_after) {
        let addrs = ctx.relay_addrs.lock().unwrap_or_else(|e| e.into_inner());
        for (transport, addr) in addrs.iter() {
            if let Some(after) = a.drops_serving(*addr) {
                let before = b.drops_serving(*addr).unwrap_or(0);
                *relay_socket_drops[transport.index()].get_or_insert(0) +=
                    after.saturating_sub(before);
            }
        }
    }

    // Let relays publish their last counters before comparing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = report::scrape_relays(relay_metrics).await;
    let relays: Vec<RelayFigures> = after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.node_id == a.node_id);
            a.minus(b)
        })
        .collect();
    let churn = (s.churn > 0).then(|| churn_figures(&results));
    let facts = RunFacts {
        relays,
        relays_scraped: !relay_metrics.is_empty(),
        wall: epoch.elapsed(),
        started_at,
        target: endpoint.description.clone(),
        kernel: match (kernel_before, kernel_after) {
            (Some(b), Some(a)) => Some(a.minus(&b)),
            _ => None,
        },
        relay_socket_drops,
        cores: cores(),
        local: endpoint.local,
    };
    let mut report = Report::build(s, &collector, &results, facts);
    if churn.is_some() {
        report.churn = churn;
        report.judge(&gate::Thresholds::default());
    }
    Ok(report)
}

/// What the joiners of every call did and saw. Deliveries due: each packet a call's
/// participants sent in the whole seconds a joiner was in the call (after the second its leg
/// bound, before the second it stopped sending), to that joiner; and each packet a joiner
/// sent, to each of the call's participants (who listen all along).
fn churn_figures(results: &[CallResult]) -> report::ChurnFigures {
    use std::collections::BTreeMap;
    let mut f = report::ChurnFigures::default();
    let mut latency = Vec::new();
    let mut failures: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for call in results {
        for c in &call.churn {
            f.joins_planned += 1;
            if let Some((kind, error)) = &c.failure {
                failures
                    .entry(kind.clone())
                    .or_insert_with(|| (0, error.clone()))
                    .0 += 1;
            }
            if let Some(l) = c.join_latency {
                f.joined += 1;
                latency.push(l.as_secs_f64() * 1000.0);
            }
            let Some((from, to)) = c.in_call_s else {
                continue;
            };
            let (first, end) = (from.floor() as usize + 1, to.floor() as usize);
            for tx in &call.sent {
                let st = c.received.get(&tx.ssrc);
                for index in 0..tx.sent {
                    let second = tx.second_of(index);
                    if second >= first && second < end {
                        f.packets_due += 1;
                        f.packets_lost += u64::from(!st.is_some_and(|st| st.has(index)));
                    }
                }
            }
            for heard in &call.heard_from_joiners {
                let st = heard.get(&c.ssrc);
                for index in 0..c.sent.sent {
                    f.packets_due += 1;
                    f.packets_lost += u64::from(!st.is_some_and(|st| st.has(index)));
                }
            }
        }
    }
    f.failed = failures.values().map(|(n, _)| *n).sum();
    f.failures = failures.iter().map(|(k, (n, _))| (k.clone(), *n)).collect();
    f.failure_examples = failures.into_iter().map(|(k, (_, e))| (k, e)).collect();
    f.join_latency_ms = report::Spread::of(latency);
    f.loss_ratio = (f.packets_due > 0).then(|| f.packets_lost as f64 / f.packets_due as f64);
    f
}

struct Api {
    client: SessionServiceClient<Channel>,
    token: Option<String>,
}

impl Api {
    fn request<T>(&self, msg: T) -> anyhow::Result<tonic::Request<T>> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(Duration::from_secs(5));
        if let Some(t) = &self.token {
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {t}")
                    .parse()
                    .context("token is not header text")?,
            );
        }
        Ok(req)
    }
}

struct RunCtx {
    scenario: Scenario,
    api: Api,
    epoch: Instant,
    end: Instant,
    collector: Arc<Collector>,
    run_id: u32,
    ttl_seconds: u32,
    relay_metrics: Vec<(String, String)>,
    /// Every relay media address the controller handed out in this run, by transport.
    relay_addrs: Mutex<HashSet<(LegTransport, SocketAddr)>>,
    /// The socket table read when receivers stopped: `None` until then, `Some(None)` if it
    /// could not be read.
    sockets: tokio::sync::watch::Receiver<Option<Option<Arc<host::Sockets>>>>,
}

impl RunCtx {
    fn second(&self, t: Instant) -> usize {
        t.saturating_duration_since(self.epoch).as_secs() as usize
    }

    fn seconds_since_epoch(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.epoch).as_secs_f64()
    }
}

/// What one sender sent: enough to tell, for each index, when it was sent.
#[derive(Debug)]
pub struct SentStream {
    /// The sender's SSRC.
    pub ssrc: u32,
    /// RTP packets sent.
    pub sent: u64,
    /// `(second, first index sent in it)`, ascending.
    pub seconds: Vec<(usize, u64)>,
    /// When the first RTP packet was sent, seconds since the run's start.
    pub first_sent_s: Option<f64>,
    /// When the last one was sent.
    pub last_sent_s: f64,
}

impl SentStream {
    /// The second packet `index` was sent in.
    pub fn second_of(&self, index: u64) -> usize {
        let i = self.seconds.partition_point(|(_, first)| *first <= index);
        self.seconds[i.saturating_sub(1)].0
    }
}

/// One call that ran media.
#[derive(Debug)]
pub struct CallResult {
    /// Each participant's sent stream, by participant index.
    pub sent: Vec<SentStream>,
    /// Each participant's received streams, by sender SSRC.
    pub received: Vec<HashMap<u32, StreamRx>>,
    /// AllocateSession latency.
    pub allocation: Duration,
    /// Each leg's bind latency.
    pub binds: Vec<Duration>,
    /// Each participant's profile.
    pub profiles: Vec<Profile>,
    /// Datagrams from anywhere but the relay, over all participants.
    pub foreign: u64,
    /// Moves of participants' legs to another relay (failovers, switches to a standby).
    pub failovers: u64,
    /// Each participant's transport.
    pub transports: Vec<LegTransport>,
    /// Media datagrams the participants' sockets read from their relay (RTP, RTCP, duplicates
    /// and anything undecryptable alike).
    pub datagrams_read: u64,
    /// Datagrams read that the participants' clients dropped because the generator did not
    /// take them in time (their queue was full).
    pub queue_overflows: u64,
    /// Datagrams each participant's socket dropped (receive buffer full), from the kernel's
    /// socket table; `None` where that could not be read.
    pub socket_drops: Vec<Option<u64>>,
    /// How the call failed although it ran media (a leg ended early, the release failed):
    /// `(kind, error)`.
    pub failure: Option<(String, String)>,
    /// The participants who joined and left while it ran (`Scenario::churn`).
    pub churn: Vec<ChurnResult>,
    /// For each participant, what it received from the joiners, by joiner SSRC.
    pub heard_from_joiners: Vec<HashMap<u32, StreamRx>>,
}

/// One participant who joined a call in progress and left it (AddParticipant, bind, media,
/// RemoveParticipant).
#[derive(Debug)]
pub struct ChurnResult {
    /// Its SSRC.
    pub ssrc: u32,
    /// How the join or the leave failed: `(kind, error)`.
    pub failure: Option<(String, String)>,
    /// From AddParticipant to the leg bound.
    pub join_latency: Option<Duration>,
    /// When its leg was bound and when it stopped sending, seconds since the run's start.
    pub in_call_s: Option<(f64, f64)>,
    /// What it sent.
    pub sent: SentStream,
    /// What it received from the call's participants, by sender SSRC.
    pub received: HashMap<u32, StreamRx>,
}

/// Why a call failed: a kind (stage and class, counted in the report) and the error itself.
#[derive(Debug)]
pub struct CallFailure {
    /// For example `allocate_unavailable`, `bind_unreachable`, `bind_refused_relay_full`.
    pub kind: String,
    /// What went wrong.
    pub error: anyhow::Error,
}

impl CallFailure {
    fn new(kind: impl Into<String>, error: impl Into<anyhow::Error>) -> Self {
        Self {
            kind: kind.into(),
            error: error.into(),
        }
    }
}

/// `ResourceExhausted` to `resource_exhausted`: a `Debug` name as a kind.
fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_alphanumeric() {
            out.push(c);
        } else {
            break;
        }
    }
    out
}

fn grpc_kind(stage: &str, status: &tonic::Status) -> String {
    format!("{stage}_{}", snake(&format!("{:?}", status.code())))
}

fn bind_kind(e: &veil_client::ClientError) -> String {
    use veil_client::ClientError as E;
    match e {
        E::Token(_) => "bind_bad_token".into(),
        E::NoRelay => "bind_no_relay".into(),
        E::Socket(_) => "bind_socket".into(),
        E::Refused(code) => format!("bind_refused_{}", snake(&format!("{code:?}"))),
        E::Unreachable => "bind_unreachable".into(),
        E::Closed(code) => format!("bind_closed_{}", snake(&format!("{code:?}"))),
    }
}

fn srtp_profile(s: SrtpSuite) -> ProtectionProfile {
    match s {
        SrtpSuite::AesCm => ProtectionProfile::Aes128CmHmacSha1_80,
        SrtpSuite::AesGcm => ProtectionProfile::AeadAes128Gcm,
    }
}

#[derive(Clone)]
struct Keys {
    ssrc: u32,
    key: Vec<u8>,
    salt: Vec<u8>,
    /// The SRTP index (rollover counter << 16 | sequence number) of the next packet this
    /// sender sends, starting at a random sequence number: what a receiver learns from
    /// signaling when it joins (`media::prime_srtp`).
    next: Arc<AtomicU64>,
}

impl Keys {
    fn new(ssrc: u32, profile: ProtectionProfile) -> Self {
        Self {
            ssrc,
            key: (0..profile.key_len()).map(|_| rand::random()).collect(),
            salt: (0..profile.salt_len()).map(|_| rand::random()).collect(),
            next: Arc::new(AtomicU64::new(u64::from(rand::random::<u16>()))),
        }
    }

    /// A context that encrypts this sender's media.
    fn sender(&self, profile: ProtectionProfile) -> Result<Context, CallFailure> {
        Context::new(&self.key, &self.salt, profile, None, None)
            .map_err(|e| CallFailure::new("srtp_setup", anyhow::anyhow!("SRTP context: {e}")))
    }

    /// A context that decrypts this sender's media from the packet it sends next on.
    fn receiver(&self, profile: ProtectionProfile) -> Result<Context, CallFailure> {
        let mut rx = self.sender(profile)?;
        media::prime_srtp(
            &mut rx,
            &self.key,
            &self.salt,
            profile,
            self.ssrc,
            self.next.load(Relaxed),
        )
        .map_err(|e| CallFailure::new("srtp_setup", anyhow::anyhow!("SRTP context: {e}")))?;
        Ok(rx)
    }
}

fn pick_profile(mix: &[(Profile, u32)], rng: &mut impl Rng) -> Profile {
    let total: u32 = mix.iter().map(|(_, w)| w).sum();
    let mut x = rng.random_range(0..total);
    for (p, w) in mix {
        if x < *w {
            return *p;
        }
        x -= w;
    }
    mix[0].0
}

async fn run_call(ctx: Arc<RunCtx>, call: usize) -> Result<CallResult, CallFailure> {
    let s = &ctx.scenario;
    let n = s.participants;
    let req = pb::AllocateSessionRequest {
        call_id: format!("loadtest-{:08x}-{call}", ctx.run_id),
        participants: (0..n)
            .map(|j| pb::Participant {
                participant_id: format!("p{j}"),
                region: String::new(),
                preferred_transport: match s.transport {
                    TransportMode::Udp => pb::Transport::Udp,
                    TransportMode::Quic => pb::Transport::Quic,
                    TransportMode::Mixed if j % 2 == 0 => pb::Transport::Quic,
                    TransportMode::Mixed => pb::Transport::Udp,
                } as i32,
            })
            .collect(),
        ttl_seconds: ctx.ttl_seconds,
    };
    let started = Instant::now();
    let mut client = ctx.api.client.clone();
    let req = ctx
        .api
        .request(req)
        .map_err(|e| CallFailure::new("allocate_request", e))?;
    let session = client
        .allocate_session(req)
        .await
        .map_err(|st| CallFailure::new(grpc_kind("allocate", &st), st))?
        .into_inner()
        .session
        .ok_or_else(|| {
            CallFailure::new(
                "allocate_no_session",
                anyhow::anyhow!("answer without session"),
            )
        })?;
    let allocation = started.elapsed();
    {
        let mut addrs = ctx.relay_addrs.lock().unwrap_or_else(|e| e.into_inner());
        for r in session.legs.iter().flat_map(|l| &l.relays) {
            addrs.extend(
                r.udp_address
                    .parse::<SocketAddr>()
                    .ok()
                    .map(|a| (LegTransport::Udp, a)),
            );
            addrs.extend(
                r.quic_address
                    .parse::<SocketAddr>()
                    .ok()
                    .map(|a| (LegTransport::Quic, a)),
            );
        }
    }

    // Keys, exchanged among the participants only (as an end-to-end key exchange would).
    let profile = srtp_profile(s.srtp);
    let keys: Vec<Keys> = (0..n)
        .map(|j| {
            Keys::new(
                ((call as u32) << 8 | j as u32).wrapping_add(0x1000_0000),
                profile,
            )
        })
        .collect();

    // The joiners' keys, known to everyone in the call from the start (as a group key
    // exchange would tell them when each joins).
    let churn_keys: Vec<Keys> = (0..s.churn)
        .map(|k| {
            Keys::new(
                ((call as u32) << 8 | (n + k) as u32).wrapping_add(0x1000_0000),
                profile,
            )
        })
        .collect();

    let mut binds = tokio::task::JoinSet::new();
    for (j, leg) in session.legs.iter().enumerate() {
        let ip: IpAddr = s.client_ips[(call * n + j) % s.client_ips.len()];
        let cfg = leg_config(s, leg, ip);
        binds.spawn(async move {
            let t = Instant::now();
            Leg::bind(cfg).await.map(|l| (j, l, t.elapsed()))
        });
    }
    let mut legs: Vec<Option<(Leg, Duration)>> = (0..n).map(|_| None).collect();
    while let Some(r) = binds.join_next().await {
        let bound = r
            .map_err(|e| CallFailure::new("bind_panicked", e))
            .and_then(|b| b.map_err(|e| CallFailure::new(bind_kind(&e), e)));
        match bound {
            Ok((j, leg, t)) => legs[j] = Some((leg, t)),
            Err(f) => {
                // Hang up, as a signaling service would: the legs that did bind end too.
                drop(legs);
                binds.abort_all();
                let _ = release(&ctx, &session.session_id).await;
                return Err(f);
            }
        }
    }
    if legs.iter().any(Option::is_none) {
        return Err(CallFailure::new(
            "allocate_too_few_legs",
            anyhow::anyhow!(
                "the answer holds {} legs for {n} participants",
                session.legs.len()
            ),
        ));
    }
    ctx.collector.calls_up.fetch_add(1, Relaxed);

    let profiles: Vec<Profile> = {
        let mut rng = rand::rng();
        (0..n).map(|_| pick_profile(&s.mix, &mut rng)).collect()
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut bind_latency = vec![Duration::ZERO; n];
    let mut transports = vec![LegTransport::Udp; n];
    for (j, slot) in legs.into_iter().enumerate() {
        let (leg, t) = slot.expect("checked above: every leg bound");
        bind_latency[j] = t;
        transports[j] = leg.transport().into();
        let me = &keys[j];
        let tx = me.sender(profile)?;
        let mut rx = HashMap::new();
        for other in keys.iter().chain(&churn_keys).filter(|k| k.ssrc != me.ssrc) {
            rx.insert(other.ssrc, (other.receiver(profile)?, StreamRx::default()));
        }
        let role = Role {
            end: ctx.end,
            stop: ctx.end + GRACE,
            fanout: n as u64 - 1,
            counted: Some(keys.iter().map(|k| k.ssrc).collect()),
            socket_snapshot: true,
        };
        tasks.spawn(participant(
            ctx.clone(),
            j,
            leg,
            me.ssrc,
            me.next.clone(),
            tx,
            rx,
            profiles[j],
            call as u64 * 16 + j as u64,
            role,
        ));
    }
    // Joiners, each at a random time of full load, staying `churn_dwell`.
    let mut joiners = tokio::task::JoinSet::new();
    {
        let now = Instant::now() + Duration::from_millis(300);
        let window = ctx
            .end
            .saturating_duration_since(now)
            .saturating_sub(s.churn_dwell);
        for (k, me) in churn_keys.iter().enumerate() {
            let join_at = now + window.mul_f64(rand::random::<f64>());
            let leave_at = (join_at + s.churn_dwell).min(ctx.end);
            let j = n + k;
            joiners.spawn(joiner(
                ctx.clone(),
                Joiner {
                    session_id: session.session_id.clone(),
                    k,
                    j,
                    ip: s.client_ips[(call * (n + s.churn) + j) % s.client_ips.len()],
                    ssrc: me.ssrc,
                    next: me.next.clone(),
                    tx: me.sender(profile)?,
                    srtp: profile,
                    others: keys
                        .iter()
                        .chain(&churn_keys)
                        .filter(|o| o.ssrc != me.ssrc)
                        .cloned()
                        .collect(),
                    profile: pick_profile(&s.mix, &mut rand::rng()),
                    seed: call as u64 * 16 + j as u64,
                    join_at,
                    leave_at,
                },
            ));
        }
    }
    let mut sent: Vec<Option<SentStream>> = (0..n).map(|_| None).collect();
    let mut received: Vec<HashMap<u32, StreamRx>> = (0..n).map(|_| HashMap::new()).collect();
    let mut heard_from_joiners: Vec<HashMap<u32, StreamRx>> =
        (0..n).map(|_| HashMap::new()).collect();
    let mut socket_drops = vec![None; n];
    let (mut foreign, mut failovers, mut datagrams_read, mut queue_overflows) = (0, 0, 0, 0);
    let mut failure = None;
    while let Some(r) = tasks.join_next().await {
        let p = match r {
            Ok(p) => p,
            Err(e) => {
                failure.get_or_insert_with(|| ("media_panicked".to_string(), e.to_string()));
                continue;
            }
        };
        sent[p.j] = Some(p.sent);
        let (from_base, from_joiners) = p
            .received
            .into_iter()
            .partition(|(ssrc, _)| keys.iter().any(|k| k.ssrc == *ssrc));
        received[p.j] = from_base;
        heard_from_joiners[p.j] = from_joiners;
        foreign += p.foreign;
        failovers += p.failovers;
        datagrams_read += p.datagrams_read;
        queue_overflows += p.queue_overflows;
        socket_drops[p.j] = p.socket_drops;
        if let Some(why) = p.ended_early {
            failure.get_or_insert_with(|| ("media_leg_ended".to_string(), why));
        }
    }
    let mut churn = Vec::new();
    while let Some(r) = joiners.join_next().await {
        match r {
            Ok(c) => churn.push(c),
            Err(e) => {
                failure.get_or_insert_with(|| ("join_panicked".to_string(), e.to_string()));
            }
        }
    }
    ctx.collector.calls_up.fetch_sub(1, Relaxed);
    if let Err(f) = release(&ctx, &session.session_id).await {
        failure.get_or_insert((f.kind, format!("{:#}", f.error)));
    }
    Ok(CallResult {
        sent: sent
            .into_iter()
            .enumerate()
            .map(|(j, s)| {
                s.unwrap_or_else(|| SentStream {
                    ssrc: keys[j].ssrc,
                    sent: 0,
                    seconds: Vec::new(),
                    first_sent_s: None,
                    last_sent_s: 0.0,
                })
            })
            .collect(),
        received,
        allocation,
        binds: bind_latency,
        profiles,
        foreign,
        failovers,
        transports,
        datagrams_read,
        queue_overflows,
        socket_drops,
        failure,
        churn,
        heard_from_joiners,
    })
}

/// Releases a session, as the signaling service does when a call ends.
async fn release(ctx: &RunCtx, session_id: &str) -> Result<(), CallFailure> {
    let req = ctx
        .api
        .request(pb::ReleaseSessionRequest {
            session_id: session_id.to_string(),
        })
        .map_err(|e| CallFailure::new("release_request", e))?;
    ctx.api
        .client
        .clone()
        .release_session(req)
        .await
        .map(|_| ())
        .map_err(|st| CallFailure::new(grpc_kind("release", &st), st))
}

/// How one participant takes part: how long, and what of it counts in the run's figures.
struct Role {
    /// When it stops sending.
    end: Instant,
    /// When it stops listening.
    stop: Instant,
    /// Receivers each of its packets counts as due to, in the run's figures (0: none).
    fanout: u64,
    /// The senders whose packets count in the run's figures when it receives them (`None`:
    /// none).
    counted: Option<std::collections::HashSet<u32>>,
    /// Whether it waits for the run's socket-table snapshot before closing its socket.
    socket_snapshot: bool,
}

/// How long a joiner listens after it stops sending, before it leaves.
const JOINER_GRACE: Duration = Duration::from_millis(300);

/// What a joiner needs.
struct Joiner {
    session_id: String,
    k: usize,
    j: usize,
    ip: IpAddr,
    ssrc: u32,
    next: Arc<AtomicU64>,
    tx: Context,
    srtp: ProtectionProfile,
    /// Everyone else's keys: the joiner's receiving contexts start where each sender is when
    /// it joins.
    others: Vec<Keys>,
    profile: Profile,
    seed: u64,
    join_at: Instant,
    leave_at: Instant,
}

/// Joins a call in progress at `join_at` (AddParticipant, then binds the new leg), sends and
/// receives until `leave_at`, and leaves (RemoveParticipant).
async fn joiner(ctx: Arc<RunCtx>, w: Joiner) -> ChurnResult {
    tokio::time::sleep_until(w.join_at.into()).await;
    let mut out = ChurnResult {
        ssrc: w.ssrc,
        failure: None,
        join_latency: None,
        in_call_s: None,
        sent: SentStream {
            ssrc: w.ssrc,
            sent: 0,
            seconds: Vec::new(),
            first_sent_s: None,
            last_sent_s: 0.0,
        },
        received: HashMap::new(),
    };
    let participant_id = format!("joiner-{}", w.k);
    let started = Instant::now();
    let s = &ctx.scenario;
    let add = pb::AddParticipantRequest {
        session_id: w.session_id.clone(),
        participant: Some(pb::Participant {
            participant_id: participant_id.clone(),
            region: String::new(),
            preferred_transport: match s.transport {
                TransportMode::Udp => pb::Transport::Udp,
                TransportMode::Quic => pb::Transport::Quic,
                TransportMode::Mixed if w.j.is_multiple_of(2) => pb::Transport::Quic,
                TransportMode::Mixed => pb::Transport::Udp,
            } as i32,
        }),
    };
    let leg = match ctx.api.request(add) {
        Ok(req) => ctx.api.client.clone().add_participant(req).await,
        Err(e) => {
            out.failure = Some(("join_request".into(), format!("{e:#}")));
            return out;
        }
    };
    let leg = match leg.map(|r| r.into_inner().leg) {
        Ok(Some(leg)) => leg,
        Ok(None) => {
            out.failure = Some(("join_no_leg".into(), "answer without a leg".into()));
            return out;
        }
        Err(st) => {
            out.failure = Some((grpc_kind("join", &st), st.to_string()));
            return out;
        }
    };
    match Leg::bind(leg_config(s, &leg, w.ip)).await {
        Ok(bound) => {
            out.join_latency = Some(started.elapsed());
            let bound_at = ctx.seconds_since_epoch(Instant::now());
            let role = Role {
                end: w.leave_at,
                stop: w.leave_at + JOINER_GRACE,
                fanout: 0,
                counted: None,
                socket_snapshot: false,
            };
            let mut rx = HashMap::new();
            for other in &w.others {
                match other.receiver(w.srtp) {
                    Ok(c) => rx.insert(other.ssrc, (c, StreamRx::default())),
                    Err(f) => {
                        out.failure = Some((f.kind, format!("{:#}", f.error)));
                        return out;
                    }
                };
            }
            let p = participant(
                ctx.clone(),
                w.j,
                bound,
                w.ssrc,
                w.next,
                w.tx,
                rx,
                w.profile,
                w.seed,
                role,
            )
            .await;
            out.in_call_s = Some((bound_at, ctx.seconds_since_epoch(w.leave_at)));
            out.sent = p.sent;
            out.received = p.received;
            if let Some(why) = p.ended_early {
                out.failure = Some(("join_leg_ended".into(), why));
            }
        }
        Err(e) => out.failure = Some((format!("join_{}", bind_kind(&e)), e.to_string())),
    }
    let remove = pb::RemoveParticipantRequest {
        session_id: w.session_id,
        participant_id,
    };
    let left = match ctx.api.request(remove) {
        Ok(req) => ctx
            .api
            .client
            .clone()
            .remove_participant(req)
            .await
            .map_err(|st| (grpc_kind("leave", &st), st.to_string())),
        Err(e) => Err(("leave_request".into(), format!("{e:#}"))),
    };
    if let Err(f) = left {
        out.failure.get_or_insert(f);
    }
    out
}

/// What one participant did and saw.
struct ParticipantOutcome {
    j: usize,
    sent: SentStream,
    received: HashMap<u32, StreamRx>,
    foreign: u64,
    failovers: u64,
    datagrams_read: u64,
    queue_overflows: u64,
    socket_drops: Option<u64>,
    /// Why the leg ended before the call did, if it did.
    ended_early: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn participant(
    ctx: Arc<RunCtx>,
    j: usize,
    mut leg: Leg,
    ssrc: u32,
    next_index: Arc<AtomicU64>,
    mut tx: Context,
    mut rx: HashMap<u32, (Context, StreamRx)>,
    profile: Profile,
    seed: u64,
    role: Role,
) -> ParticipantOutcome {
    let fanout = role.fanout;
    let end = role.end;
    let transport: LegTransport = leg.transport().into();
    let sender = leg.sender();
    let send_ctx = ctx.clone();
    let send_task = tokio::spawn(async move {
        let ctx = send_ctx;
        let mut src = Source::new(profile, seed);
        let pt = src.payload_type();
        let mut stream = SentStream {
            ssrc,
            sent: 0,
            seconds: Vec::new(),
            first_sent_s: None,
            last_sent_s: 0.0,
        };
        let mut index = next_index.load(Relaxed);
        let mut ts: u32 = rand::random();
        let mut buf = Vec::with_capacity(1500);
        let mut octets: u32 = 0;
        // Start at a random phase, as real participants do.
        let mut next = Instant::now() + src.interval().mul_f64(rand::random::<f64>());
        let mut next_rtcp = Instant::now() + Duration::from_secs(ctx.scenario.rtcp_interval_secs);
        while next < end {
            tokio::time::sleep_until(next.into()).await;
            // How late this sender woke: a generator short of CPU falls behind its schedule.
            let lag = Instant::now().saturating_duration_since(next);
            let frame = src.next_frame();
            ts = ts.wrapping_add(frame.ts_step);
            let last = frame.packets.len() - 1;
            let (mut pkts, mut bytes) = (0u64, 0u64);
            for (k, len) in frame.packets.iter().enumerate() {
                let now = Instant::now();
                let second = ctx.second(now);
                if stream.seconds.last().is_none_or(|(s, _)| *s != second) {
                    stream.seconds.push((second, stream.sent));
                }
                let sent_ns = now.duration_since(ctx.epoch).as_nanos() as u64;
                media::rtp(
                    &mut buf,
                    pt,
                    k == last,
                    index as u16,
                    ts,
                    ssrc,
                    sent_ns,
                    stream.sent,
                    *len,
                );
                index += 1;
                next_index.store(index, Relaxed);
                let Ok(srtp) = tx.encrypt_rtp(&buf) else {
                    continue;
                };
                if sender.send(&srtp).await.is_err() {
                    ctx.collector.send_errors.fetch_add(1, Relaxed);
                    continue;
                }
                let at = ctx.seconds_since_epoch(now);
                stream.first_sent_s.get_or_insert(at);
                stream.last_sent_s = at;
                stream.sent += 1;
                pkts += 1;
                bytes += srtp.len() as u64;
                octets = octets.wrapping_add(*len as u32);
            }
            if fanout > 0 {
                ctx.collector.on_sent(
                    ctx.second(Instant::now()),
                    pkts,
                    bytes,
                    fanout,
                    lag.as_micros() as u64,
                );
            }
            if Instant::now() >= next_rtcp {
                next_rtcp += Duration::from_secs(ctx.scenario.rtcp_interval_secs);
                let ntp = ctx.epoch.elapsed().as_nanos() as u64;
                media::sender_report(&mut buf, ssrc, ntp, ts, stream.sent as u32, octets);
                if let Ok(srtcp) = tx.encrypt_rtcp(&buf) {
                    if sender.send(&srtcp).await.is_ok() {
                        if fanout > 0 {
                            ctx.collector.rtcp_sent.fetch_add(1, Relaxed);
                        }
                    } else {
                        ctx.collector.send_errors.fetch_add(1, Relaxed);
                    }
                }
            }
            next += src.interval();
        }
        stream
    });

    let stop = role.stop;
    loop {
        let Ok(Some(got)) = tokio::time::timeout_at(stop.into(), leg.recv()).await else {
            break;
        };
        let c = &ctx.collector;
        let pkt = &got.data;
        let ssrc_at = if media::is_rtcp(pkt) { 4 } else { 8 };
        let Some(sender_ssrc) = pkt
            .get(ssrc_at..ssrc_at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
        else {
            c.decrypt_failures.fetch_add(1, Relaxed);
            continue;
        };
        let Some((dec, stream)) = rx.get_mut(&sender_ssrc) else {
            // From nobody in this call: misdelivered.
            c.decrypt_failures.fetch_add(1, Relaxed);
            continue;
        };
        // Media to or from a joiner is the churn figures' own, not the run's (decrypt failures
        // excepted: every one counts).
        let counted = role
            .counted
            .as_ref()
            .is_some_and(|c| c.contains(&sender_ssrc));
        if media::is_rtcp(pkt) {
            match dec.decrypt_rtcp(pkt) {
                Ok(_) if counted => c.rtcp_received.fetch_add(1, Relaxed),
                Ok(_) => 0,
                Err(_) => c.decrypt_failures.fetch_add(1, Relaxed),
            };
            continue;
        }
        let Ok(plain) = dec.decrypt_rtp(pkt) else {
            c.decrypt_failures.fetch_add(1, Relaxed);
            continue;
        };
        let Some((sent_ns, index)) = media::stamp(&plain) else {
            c.decrypt_failures.fetch_add(1, Relaxed);
            continue;
        };
        let arrived_ns = got.at.saturating_duration_since(ctx.epoch).as_nanos() as u64;
        let before = stream.unique;
        stream.record(index, sent_ns as f64 / 1e9, arrived_ns as f64 / 1e9);
        if !counted {
            continue;
        }
        if stream.unique > before {
            c.on_received(
                ctx.second(got.at),
                transport,
                pkt.len() as u64,
                arrived_ns.saturating_sub(sent_ns) / 1000,
                stream.jitter,
            );
        } else {
            c.duplicates.fetch_add(1, Relaxed);
        }
    }
    let ended_early = match &*leg.status().borrow() {
        veil_client::LegStatus::Ended(e) => Some(e.to_string()),
        _ => None,
    };
    let sent = send_task.await.unwrap_or(SentStream {
        ssrc,
        sent: 0,
        seconds: Vec::new(),
        first_sent_s: None,
        last_sent_s: 0.0,
    });
    // Keep the socket open until the run has read the socket table, so that its drop count is
    // in it (the kernel forgets a socket's count when it closes).
    let mut snapshot = ctx.sockets.clone();
    let socket_drops = if !role.socket_snapshot {
        None
    } else {
        match tokio::time::timeout_at(
            (stop + Duration::from_secs(3)).into(),
            snapshot.wait_for(Option::is_some),
        )
        .await
        {
            Ok(Ok(table)) => table
                .as_ref()
                .and_then(Option::as_ref)
                .and_then(|t| t.drops_of(leg.local_addr())),
            _ => None,
        }
    };
    let counters = leg.counters();
    ParticipantOutcome {
        j,
        sent,
        received: rx.into_iter().map(|(k, (_, s))| (k, s)).collect(),
        foreign: counters.foreign.load(Relaxed),
        failovers: counters.failovers.load(Relaxed),
        datagrams_read: counters.received.load(Relaxed),
        queue_overflows: counters.overflow.load(Relaxed),
        socket_drops,
        ended_early,
    }
}

async fn progress_loop(ctx: Arc<RunCtx>, print: bool, relays_at_start: Vec<RelayFigures>) {
    let stop = ctx.end + GRACE;
    let mut tick = tokio::time::interval_at(
        (ctx.epoch + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let c = &ctx.collector;
    let (mut last_sent, mut last_rx) = (0u64, 0u64);
    let mut cpu = host::CpuTimes::read();
    let mut relays = relays_at_start;
    loop {
        let t = tick.tick().await;
        let now: Instant = t.into();
        let second = ctx.second(now).saturating_sub(1);
        c.set_calls_up(second);
        let cpu_now = host::CpuTimes::read();
        if let (Some(a), Some(b)) = (&cpu_now, &cpu)
            && let Some((busy, me)) = a.since(b)
        {
            c.set_cpu(second, busy, me);
        }
        cpu = cpu_now;
        if !ctx.relay_metrics.is_empty() {
            let scraped = report::scrape_relays(&ctx.relay_metrics).await;
            c.set_relays(
                second,
                scraped
                    .iter()
                    .map(|a| {
                        let d = a.minus(relays.iter().find(|b| b.node_id == a.node_id));
                        (a.node_id.clone(), d.forwarded_packets, d.dropped_packets)
                    })
                    .collect(),
            );
            relays = scraped;
        }
        if print {
            let (sent, received, expected) = (
                c.sent.load(Relaxed),
                c.received.load(Relaxed),
                c.expected.load(Relaxed),
            );
            let loss = if expected > 0 {
                format!(
                    "{:.3}%",
                    100.0 * (1.0 - received as f64 / expected as f64).max(0.0)
                )
            } else {
                "n/a".to_string()
            };
            let p99 = c.p99_of(second).map_or("n/a".to_string(), |us| {
                format!("{:.2} ms", us as f64 / 1000.0)
            });
            eprintln!(
                "[{:>4}s] calls up {:>5}/{} | tx {:>7} pps | rx {:>7} pps | loss {} (incl. in flight) | p99 {} | failed calls {} | decrypt failures {}",
                second + 1,
                c.calls_up.load(Relaxed),
                ctx.scenario.calls,
                sent - last_sent,
                received - last_rx,
                loss,
                p99,
                c.calls_failed(),
                c.decrypt_failures.load(Relaxed),
            );
            (last_sent, last_rx) = (sent, received);
        }
        if now >= stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_of_maps_indices_to_send_seconds() {
        let s = SentStream {
            ssrc: 1,
            sent: 150,
            seconds: vec![(0, 0), (1, 50), (3, 100)],
            first_sent_s: Some(0.1),
            last_sent_s: 3.9,
        };
        assert_eq!(s.second_of(0), 0);
        assert_eq!(s.second_of(49), 0);
        assert_eq!(s.second_of(50), 1);
        assert_eq!(s.second_of(99), 1);
        assert_eq!(s.second_of(149), 3);
    }

    #[test]
    fn failure_kinds_are_snake_case_names() {
        assert_eq!(snake("ResourceExhausted"), "resource_exhausted");
        assert_eq!(snake("Unavailable"), "unavailable");
        assert_eq!(snake("RelayFull"), "relay_full");
        assert_eq!(snake("Refused(RelayFull)"), "refused");
        assert_eq!(
            grpc_kind("allocate", &tonic::Status::unavailable("no relay")),
            "allocate_unavailable"
        );
        assert_eq!(
            bind_kind(&veil_client::ClientError::Unreachable),
            "bind_unreachable"
        );
    }

    #[test]
    fn profile_mix_respects_weights() {
        let mut rng = rand::rng();
        let mix = [(Profile::Audio, 9), (Profile::Video, 1)];
        let video = (0..10_000)
            .filter(|_| pick_profile(&mix, &mut rng) == Profile::Video)
            .count();
        assert!((800..1200).contains(&video), "{video}");
    }
}
