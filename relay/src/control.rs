//! The relay's side of the control plane: one `Attach` stream to each controller, kept open with
//! backoff. The relay introduces itself, reports its load about once a second, and applies the
//! revocations the controller sends. Forwarding never waits on any of this: with every controller
//! gone, bound calls keep flowing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use veil_proto::v1::{
    LoadReport, RelayHello, RelayMessage, controller_message, relay_message,
    relay_registry_client::RelayRegistryClient,
};
use veil_relay_core::{Node, SessionId};

use crate::drain::Drainer;
use crate::metrics::RelayMetrics;

/// What one controller link needs.
#[derive(Clone)]
pub(crate) struct Link {
    pub(crate) url: String,
    pub(crate) token: Option<String>,
    pub(crate) hello: RelayHello,
    pub(crate) node: Arc<Node>,
    pub(crate) metrics: Arc<RelayMetrics>,
    pub(crate) drainer: Arc<Drainer>,
    pub(crate) cpu: CpuClock,
    pub(crate) interval: Duration,
    pub(crate) shutdown: watch::Receiver<bool>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Keeps a link to one controller until shutdown.
pub(crate) async fn run(mut link: Link) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        match attach(&mut link).await {
            Ok(()) => tracing::info!(controller = %link.url, "controller stream ended"),
            Err(e) => {
                tracing::warn!(controller = %link.url, error = %format!("{e:#}"), "controller link failed")
            }
        }
        if *link.shutdown.borrow() {
            return;
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = BACKOFF_MIN;
        }
        // Jitter, so that relays restarted together do not reconnect in lockstep.
        let wait = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        backoff = (backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = link.shutdown.changed() => return,
        }
    }
}

/// Where a relay's CPU use is read from (see [`crate::config::CpuSource`]).
#[derive(Clone, Debug)]
pub(crate) enum CpuClock {
    /// The process, over every CPU.
    Process,
    /// The UDP worker threads' own clocks (nanoseconds), each over one CPU.
    Workers(Vec<Arc<std::sync::atomic::AtomicU64>>),
}

impl CpuClock {
    /// CPU time used so far.
    fn used(&self) -> Duration {
        match self {
            Self::Process => veil_ops::process::cpu_time(),
            Self::Workers(w) => Duration::from_nanos(
                w.iter()
                    .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
                    .sum(),
            ),
        }
    }

    /// CPUs the figure is a share of.
    fn cpus(&self) -> f64 {
        match self {
            Self::Process => veil_ops::process::cpus() as f64,
            Self::Workers(w) => w.len().max(1) as f64,
        }
    }
}

/// Load over an interval, from the counters of every transport.
struct LoadMeter {
    at: Instant,
    packets: u64,
    bytes: u64,
    cpu: Duration,
    clock: CpuClock,
}

impl LoadMeter {
    fn new(metrics: &RelayMetrics, clock: CpuClock) -> Self {
        let (packets, bytes) = totals(metrics);
        Self {
            at: Instant::now(),
            packets,
            bytes,
            cpu: clock.used(),
            clock,
        }
    }

    fn report(&mut self, node: &Node, metrics: &RelayMetrics) -> LoadReport {
        let now = Instant::now();
        let (packets, bytes) = totals(metrics);
        let cpu = self.clock.used();
        let secs = now.duration_since(self.at).as_secs_f64().max(1e-3);
        let report = LoadReport {
            packets_per_second: (packets - self.packets) as f64 / secs,
            bits_per_second: (bytes - self.bytes) as f64 * 8.0 / secs,
            bound_legs: node.directory.legs() as u64,
            sessions: node.directory.sessions() as u64,
            cpu_utilization: ((cpu.saturating_sub(self.cpu)).as_secs_f64()
                / secs
                / self.clock.cpus())
            .clamp(0.0, 1.0),
            draining: node.directory.is_draining(),
        };
        (self.at, self.packets, self.bytes, self.cpu) = (now, packets, bytes, cpu);
        report
    }
}

fn totals(metrics: &RelayMetrics) -> (u64, u64) {
    metrics
        .totals()
        .iter()
        .fold((0, 0), |(p, b), (_, s)| (p + s.rx_packets, b + s.rx_bytes))
}

async fn attach(link: &mut Link) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(link.url.clone())
        .context("controller URL")?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await
        .context("connect")?;
    let mut client = RelayRegistryClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let mut hello = link.hello.clone();
    hello.draining = link.node.directory.is_draining();
    // The ring may have been reloaded (SIGHUP) since the relay started.
    hello.key_ids = link
        .node
        .keys()
        .key_ids()
        .iter()
        .map(|k| u32::from(k.0))
        .collect();
    tx.send(RelayMessage {
        kind: Some(relay_message::Kind::Hello(hello)),
    })
    .await?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = &link.token {
        let value = format!("Bearer {token}")
            .parse()
            .context("controller token is not valid header text")?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut inbound = client.attach(request).await.context("attach")?.into_inner();
    tracing::info!(controller = %link.url, "attached to controller");
    link.metrics.controllers_attached.inc();
    let _attached = Attached(&link.metrics);

    let mut meter = LoadMeter::new(&link.metrics, link.cpu.clone());
    let mut ticker = tokio::time::interval(link.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            msg = inbound.message() => match msg.context("controller stream")? {
                Some(m) => apply(&link.node, &link.drainer, m),
                None => return Ok(()),
            },
            _ = ticker.tick() => {
                let report = meter.report(&link.node, &link.metrics);
                let msg = RelayMessage { kind: Some(relay_message::Kind::Load(report)) };
                if tx.send(msg).await.is_err() {
                    return Ok(());
                }
            }
            _ = link.shutdown.changed() => return Ok(()),
        }
    }
}

/// Decrements the attached-controllers gauge when the stream ends, however it ends.
struct Attached<'a>(&'a RelayMetrics);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.0.controllers_attached.dec();
    }
}

fn apply(node: &Node, drainer: &Drainer, msg: veil_proto::v1::ControllerMessage) {
    match msg.kind {
        Some(controller_message::Kind::Drain(d)) => {
            drainer.order(
                d.draining,
                Duration::from_secs(u64::from(d.deadline_seconds)),
            );
        }
        Some(controller_message::Kind::Revoke(r)) => {
            for s in r.sessions {
                let unbound = node.revoke(SessionId(s.session_id), s.expires_unix_ms);
                tracing::debug!(session = %SessionId(s.session_id), legs = unbound.len(), "session revoked");
            }
        }
        None => tracing::debug!("empty controller message ignored"),
    }
}
