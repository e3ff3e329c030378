//! `veil-loadtest`: drives realistic calls through a Veil cluster and reports honest figures.
//!
//! Like a signaling service, it allocates each call through the controller's gRPC API and
//! releases it at the end. Each simulated participant binds its own leg from its own local
//! address, sends real SRTP (keys shared only among the call's participants, never with Veil),
//! and decrypts and authenticates everything it receives, so loss, corruption and misdelivery are
//! counted, not guessed. Every run stops by itself at its duration, and sends only to the relay
//! addresses the controller returned.

pub mod media;
pub mod report;
pub mod scenario;
pub mod soak;
pub mod stats;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::Rng;
use tonic::transport::Channel;
use veil_client::{Leg, LegConfig};
use veil_proto::v1 as pb;
use veil_proto::v1::session_service_client::SessionServiceClient;
use webrtc_srtp::context::Context;
use webrtc_srtp::protection_profile::ProtectionProfile;

use crate::media::Source;
use crate::report::{RelayFigures, Report};
use crate::scenario::{Profile, Scenario, SrtpSuite, TransportMode};
use crate::stats::{Collector, StreamRx};

/// Which cluster to drive.
#[derive(Debug, Clone)]
pub enum Target {
    /// Start a local cluster in this process with this many relays.
    Local {
        /// Relays.
        relays: usize,
    },
    /// An existing cluster.
    Remote {
        /// Controller gRPC URL.
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
}

/// How long receivers keep listening after senders stop, for packets in flight.
const GRACE: Duration = Duration::from_millis(1000);

/// Runs the load test and returns its report.
pub async fn run(cfg: Config) -> anyhow::Result<Report> {
    cfg.scenario.validate()?;
    let (cluster, endpoint) = connect(&cfg.target).await?;
    let report = drive(&cfg.scenario, &endpoint, 0, cfg.progress).await;
    if let Some(c) = cluster {
        c.shutdown().await?;
    }
    report
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
}

/// Starts the local cluster if the target is local; says where to send requests.
pub async fn connect(
    target: &Target,
) -> anyhow::Result<(Option<veil_controller::dev::Cluster>, Endpoint)> {
    Ok(match target {
        Target::Local { relays } => {
            let cluster = veil_controller::dev::Cluster::start(veil_controller::dev::Options {
                relays: *relays,
                ..Default::default()
            })
            .await
            .context("start the local cluster")?;
            let endpoint = Endpoint {
                url: cluster.controller_url.clone(),
                token: None,
                relay_metrics: cluster
                    .relays
                    .iter()
                    .map(|r| (r.node_id.clone(), r.metrics.to_string()))
                    .collect(),
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
            },
        ),
    })
}

/// Runs `s` once against `endpoint`: every call allocated (with `ttl_seconds`, 0 for the API's
/// default), run and released; returns the report.
pub async fn drive(
    s: &Scenario,
    endpoint: &Endpoint,
    ttl_seconds: u32,
    progress_line: bool,
) -> anyhow::Result<Report> {
    s.validate()?;
    let relay_metrics = &endpoint.relay_metrics;
    let url = &endpoint.url;
    let before = report::scrape_relays(relay_metrics).await;

    let channel = tonic::transport::Endpoint::from_shared(url.clone())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connect to controller {url}"))?;
    let api = Api {
        client: SessionServiceClient::new(channel),
        token: endpoint.token.clone(),
    };

    let epoch = Instant::now();
    let end = epoch + s.ramp_time() + s.duration;
    let collector = Arc::new(Collector::default());
    let run_id: u32 = rand::random();
    let ctx = Arc::new(RunCtx {
        scenario: s.clone(),
        api,
        epoch,
        end,
        collector: collector.clone(),
        run_id,
        ttl_seconds,
    });

    let progress = tokio::spawn(progress_loop(ctx.clone(), progress_line));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..s.calls {
        let at = epoch + Duration::from_secs_f64(i as f64 / s.ramp_up_per_sec);
        tokio::time::sleep_until(at.into()).await;
        calls.spawn(run_call(ctx.clone(), i));
    }
    let mut results = Vec::new();
    while let Some(r) = calls.join_next().await {
        match r.context("call task panicked")? {
            Ok(c) => results.push(c),
            Err(e) => {
                collector.calls_failed.fetch_add(1, Relaxed);
                tracing::warn!(error = %format!("{e:#}"), "call failed");
            }
        }
    }
    let _ = progress.await;

    // Loss, by the second each lost packet was sent in.
    for call in &results {
        for (r, rx) in call.received.iter().enumerate() {
            for (sender, tx) in call.sent.iter().enumerate() {
                if sender == r {
                    continue;
                }
                let stream = rx.get(&tx.ssrc);
                for index in 0..tx.sent {
                    if !stream.is_some_and(|st| st.has(index)) {
                        collector.on_lost(tx.second_of(index), 1);
                    }
                }
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
    let report = Report::build(s, &collector, &results, relays, epoch.elapsed());
    Ok(report)
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
}

impl RunCtx {
    fn second(&self, t: Instant) -> usize {
        t.saturating_duration_since(self.epoch).as_secs() as usize
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
}

impl SentStream {
    /// The second packet `index` was sent in.
    pub fn second_of(&self, index: u64) -> usize {
        let i = self.seconds.partition_point(|(_, first)| *first <= index);
        self.seconds[i.saturating_sub(1)].0
    }
}

/// One finished call.
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
}

fn srtp_profile(s: SrtpSuite) -> ProtectionProfile {
    match s {
        SrtpSuite::AesCm => ProtectionProfile::Aes128CmHmacSha1_80,
        SrtpSuite::AesGcm => ProtectionProfile::AeadAes128Gcm,
    }
}

struct Keys {
    ssrc: u32,
    key: Vec<u8>,
    salt: Vec<u8>,
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

async fn run_call(ctx: Arc<RunCtx>, call: usize) -> anyhow::Result<CallResult> {
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
    let session = client
        .allocate_session(ctx.api.request(req)?)
        .await
        .context("AllocateSession")?
        .into_inner()
        .session
        .context("answer without session")?;
    let allocation = started.elapsed();

    // Keys, exchanged among the participants only (as an end-to-end key exchange would).
    let profile = srtp_profile(s.srtp);
    let keys: Vec<Keys> = (0..n)
        .map(|j| Keys {
            ssrc: ((call as u32) << 8 | j as u32).wrapping_add(0x1000_0000),
            key: (0..profile.key_len()).map(|_| rand::random()).collect(),
            salt: (0..profile.salt_len()).map(|_| rand::random()).collect(),
        })
        .collect();

    let mut binds = tokio::task::JoinSet::new();
    for (j, leg) in session.legs.iter().enumerate() {
        let ip: IpAddr = s.client_ips[(call * n + j) % s.client_ips.len()];
        let cfg = LegConfig::from_pb(leg, SocketAddr::new(ip, 0));
        binds.spawn(async move {
            let t = Instant::now();
            Leg::bind(cfg).await.map(|l| (j, l, t.elapsed()))
        });
    }
    let mut legs: Vec<Option<(Leg, Duration)>> = (0..n).map(|_| None).collect();
    while let Some(r) = binds.join_next().await {
        let (j, leg, t) = r?.context("bind a leg")?;
        legs[j] = Some((leg, t));
    }
    ctx.collector.calls_up.fetch_add(1, Relaxed);

    let profiles: Vec<Profile> = {
        let mut rng = rand::rng();
        (0..n).map(|_| pick_profile(&s.mix, &mut rng)).collect()
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut bind_latency = vec![Duration::ZERO; n];
    for (j, slot) in legs.into_iter().enumerate() {
        let (leg, t) = slot.expect("every leg bound");
        bind_latency[j] = t;
        let me = &keys[j];
        let tx = Context::new(&me.key, &me.salt, profile, None, None).context("SRTP context")?;
        let mut rx = HashMap::new();
        for other in keys.iter().filter(|k| k.ssrc != me.ssrc) {
            rx.insert(
                other.ssrc,
                (
                    Context::new(&other.key, &other.salt, profile, None, None)?,
                    StreamRx::default(),
                ),
            );
        }
        tasks.spawn(participant(
            ctx.clone(),
            j,
            leg,
            me.ssrc,
            tx,
            rx,
            profiles[j],
            call as u64 * 16 + j as u64,
        ));
    }
    let mut sent: Vec<Option<SentStream>> = (0..n).map(|_| None).collect();
    let mut received: Vec<HashMap<u32, StreamRx>> = (0..n).map(|_| HashMap::new()).collect();
    let mut foreign = 0;
    while let Some(r) = tasks.join_next().await {
        let (j, tx, rx, f) = r?;
        sent[j] = Some(tx);
        received[j] = rx;
        foreign += f;
    }
    ctx.collector.calls_up.fetch_sub(1, Relaxed);
    let mut client = ctx.api.client.clone();
    client
        .release_session(ctx.api.request(pb::ReleaseSessionRequest {
            session_id: session.session_id.clone(),
        })?)
        .await
        .context("ReleaseSession")?;
    Ok(CallResult {
        sent: sent
            .into_iter()
            .map(|s| s.expect("every participant reported"))
            .collect(),
        received,
        allocation,
        binds: bind_latency,
        profiles,
        foreign,
    })
}

#[allow(clippy::too_many_arguments)]
async fn participant(
    ctx: Arc<RunCtx>,
    j: usize,
    mut leg: Leg,
    ssrc: u32,
    mut tx: Context,
    mut rx: HashMap<u32, (Context, StreamRx)>,
    profile: Profile,
    seed: u64,
) -> (usize, SentStream, HashMap<u32, StreamRx>, u64) {
    let fanout = rx.len() as u64;
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
        };
        let (mut seq, mut ts): (u16, u32) = (rand::random(), rand::random());
        let mut buf = Vec::with_capacity(1500);
        let mut octets: u32 = 0;
        // Start at a random phase, as real participants do.
        let mut next = Instant::now() + src.interval().mul_f64(rand::random::<f64>());
        let mut next_rtcp = Instant::now() + Duration::from_secs(ctx.scenario.rtcp_interval_secs);
        while next < ctx.end {
            tokio::time::sleep_until(next.into()).await;
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
                    seq,
                    ts,
                    ssrc,
                    sent_ns,
                    stream.sent,
                    *len,
                );
                seq = seq.wrapping_add(1);
                let Ok(srtp) = tx.encrypt_rtp(&buf) else {
                    continue;
                };
                if sender.send(&srtp).await.is_err() {
                    continue;
                }
                stream.sent += 1;
                pkts += 1;
                bytes += srtp.len() as u64;
                octets = octets.wrapping_add(*len as u32);
            }
            ctx.collector
                .on_sent(ctx.second(Instant::now()), pkts, bytes, fanout);
            if Instant::now() >= next_rtcp {
                next_rtcp += Duration::from_secs(ctx.scenario.rtcp_interval_secs);
                let ntp = ctx.epoch.elapsed().as_nanos() as u64;
                media::sender_report(&mut buf, ssrc, ntp, ts, stream.sent as u32, octets);
                if let Ok(srtcp) = tx.encrypt_rtcp(&buf)
                    && sender.send(&srtcp).await.is_ok()
                {
                    ctx.collector.rtcp_sent.fetch_add(1, Relaxed);
                }
            }
            next += src.interval();
        }
        stream
    });

    let stop = ctx.end + GRACE;
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
        if media::is_rtcp(pkt) {
            match dec.decrypt_rtcp(pkt) {
                Ok(_) => c.rtcp_received.fetch_add(1, Relaxed),
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
        if stream.unique > before {
            c.on_received(
                ctx.second(got.at),
                pkt.len() as u64,
                arrived_ns.saturating_sub(sent_ns) / 1000,
            );
        } else {
            c.duplicates.fetch_add(1, Relaxed);
        }
    }
    let sent = send_task.await.unwrap_or(SentStream {
        ssrc,
        sent: 0,
        seconds: Vec::new(),
    });
    let foreign = leg.counters().foreign.load(Relaxed);
    (
        j,
        sent,
        rx.into_iter().map(|(k, (_, s))| (k, s)).collect(),
        foreign,
    )
}

async fn progress_loop(ctx: Arc<RunCtx>, print: bool) {
    let stop = ctx.end + GRACE;
    let mut tick = tokio::time::interval_at(
        (ctx.epoch + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    let c = &ctx.collector;
    let (mut last_sent, mut last_rx) = (0u64, 0u64);
    loop {
        let t = tick.tick().await;
        let now: Instant = t.into();
        let second = ctx.second(now).saturating_sub(1);
        c.set_calls_up(second);
        if print {
            let (sent, received, expected) = (
                c.sent.load(Relaxed),
                c.received.load(Relaxed),
                c.expected.load(Relaxed),
            );
            let loss = if expected > 0 {
                100.0 * (1.0 - received as f64 / expected as f64).max(0.0)
            } else {
                0.0
            };
            let p99 = c.p99_of(second).map_or("-".to_string(), |us| {
                format!("{:.2} ms", us as f64 / 1000.0)
            });
            eprintln!(
                "[{:>4}s] calls up {:>5}/{} | tx {:>7} pps | rx {:>7} pps | loss {:.3}% (incl. in flight) | p99 {} | decrypt failures {}",
                second + 1,
                c.calls_up.load(Relaxed),
                ctx.scenario.calls,
                sent - last_sent,
                received - last_rx,
                loss,
                p99,
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
        };
        assert_eq!(s.second_of(0), 0);
        assert_eq!(s.second_of(49), 0);
        assert_eq!(s.second_of(50), 1);
        assert_eq!(s.second_of(99), 1);
        assert_eq!(s.second_of(149), 3);
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
