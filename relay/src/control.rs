//! The relay's side of the control plane: one `Attach` stream to each controller, kept open with
//! backoff. The relay introduces itself, reports its load about once a second, and applies the
//! revocations the controller sends. Forwarding never waits on any of this: with every controller
//! gone, bound calls keep flowing.
//!
//! Each link also tells its controller what happens to legs: every bind and unbind as it
//! happens (from the directory's observer, [`leg_feed`]), all legs bound when the link opens,
//! and after each load report a snapshot of every binding with its counters, from which the
//! controller answers `GetSession` and `WatchSession` with per-leg activity. Never an address.
//!
//! A controller URL names a host, and the relay attaches to *every* address that host resolves
//! to, as a headless Kubernetes Service gives one address per controller pod: the URL can stay
//! the same while controllers scale. The name is resolved again every `--controller-resolve-secs`;
//! the relay attaches to addresses that appear and drops the links to those that vanish. A
//! failed or empty resolution keeps the links the relay has (a DNS outage must not cut a relay
//! off from controllers that still answer). Each link connects to its address but keeps the
//! URL's host as the request authority (and, with TLS, as the name the certificate must match).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use veil_ops::dial::{FixedAddr, RESOLVE_RETRY, Resolve, host_port};
use veil_proto::v1::{
    LegBinding, LegChanges, LegEndReason, LegSnapshot, LegStats, LegTransport, LoadReport,
    RelayHello, RelayMessage, controller_message, relay_message,
    relay_registry_client::RelayRegistryClient,
};
use veil_relay_core::{BoundLeg, ChangeKind, Counts, Ended, LegChange, Node, SessionId};

use crate::drain::Drainer;
use crate::metrics::RelayMetrics;

/// What one controller link needs.
#[derive(Clone)]
pub(crate) struct Link {
    pub(crate) url: String,
    /// The address this link connects to (one of those `url`'s host resolves to).
    pub(crate) addr: Option<SocketAddr>,
    pub(crate) token: Option<String>,
    pub(crate) hello: RelayHello,
    pub(crate) node: Arc<Node>,
    pub(crate) metrics: Arc<RelayMetrics>,
    pub(crate) drainer: Arc<Drainer>,
    pub(crate) cpu: CpuClock,
    pub(crate) interval: Duration,
    /// Every leg change of the relay's directory ([`leg_feed`]).
    pub(crate) leg_changes: broadcast::Sender<LegChange>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Leg changes queued for one link at most; a link that falls this far behind sends a full
/// snapshot instead of the changes it missed.
const LEG_FEED: usize = 8192;
/// Bindings in one leg message at most: 1024 bindings of ~60 bytes stay well inside a
/// controller's 64 KiB message limit.
pub(crate) const BINDINGS_PER_MESSAGE: usize = 1024;

/// Feeds every leg change of `node`'s directory to the links (each subscribes when it attaches).
/// The directory calls the observer under its lock, on binds and unbinds only: a broadcast send
/// is a short lock of its own, and never waits for a link.
pub(crate) fn leg_feed(node: &Node) -> broadcast::Sender<LegChange> {
    let (tx, _) = broadcast::channel(LEG_FEED);
    let feed = tx.clone();
    node.directory.observe(move |c| {
        // No link attached: nobody to tell (a link reads every bound leg when it attaches).
        let _ = feed.send(c);
    });
    tx
}

fn transport(name: &str) -> LegTransport {
    match name {
        "udp" => LegTransport::Udp,
        "quic" => LegTransport::Quic,
        "turn-udp" => LegTransport::TurnUdp,
        "turn-tcp" => LegTransport::TurnTcp,
        "turn-tls" => LegTransport::TurnTls,
        _ => LegTransport::Unspecified,
    }
}

fn stats(c: Counts) -> LegStats {
    LegStats {
        packets_in: c.packets_in,
        bytes_in: c.bytes_in,
        packets_out: c.packets_out,
        bytes_out: c.bytes_out,
        packets_dropped: c.packets_dropped,
    }
}

fn binding(b: &BoundLeg) -> LegBinding {
    LegBinding {
        session_id: b.session.0,
        slot: u32::from(b.slot),
        binding_id: b.binding,
        transport: transport(b.transport) as i32,
        stats: b.counts.map(stats),
    }
}

fn change(c: &LegChange) -> veil_proto::v1::LegChange {
    let (bound, reason) = match c.kind {
        ChangeKind::Bound { .. } => (true, LegEndReason::Unspecified),
        ChangeKind::Unbound(why) => (
            false,
            match why {
                Ended::Idle => LegEndReason::Idle,
                Ended::Expired => LegEndReason::Expired,
                Ended::Disconnected => LegEndReason::Disconnected,
                Ended::Evicted => LegEndReason::Drained,
                Ended::Released => LegEndReason::Released,
                Ended::Removed => LegEndReason::Removed,
                Ended::Replaced => LegEndReason::Replaced,
            },
        ),
    };
    veil_proto::v1::LegChange {
        binding: Some(binding(&BoundLeg {
            session: c.session,
            slot: c.slot,
            transport: c.transport,
            binding: c.binding,
            counts: c.counts,
        })),
        bound,
        reason: reason as i32,
    }
}

/// Every leg bound now, as changes (what a link sends when it opens).
fn all_bound(node: &Node) -> Vec<veil_proto::v1::LegChange> {
    node.directory
        .bound_legs()
        .iter()
        .map(|b| veil_proto::v1::LegChange {
            binding: Some(binding(b)),
            bound: true,
            reason: LegEndReason::Unspecified as i32,
        })
        .collect()
}

/// The changes queued for this link now, `first` included; `None` if the link fell behind
/// (it then owes its controller a full snapshot).
fn queued(
    first: LegChange,
    rx: &mut broadcast::Receiver<LegChange>,
) -> Option<Vec<veil_proto::v1::LegChange>> {
    let mut out = vec![change(&first)];
    loop {
        match rx.try_recv() {
            Ok(c) => out.push(change(&c)),
            Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed) => {
                return Some(out);
            }
            Err(broadcast::error::TryRecvError::Lagged(_)) => return None,
        }
    }
}

async fn send_changes(
    tx: &mpsc::Sender<RelayMessage>,
    changes: Vec<veil_proto::v1::LegChange>,
) -> bool {
    for chunk in changes.chunks(BINDINGS_PER_MESSAGE) {
        let msg = RelayMessage {
            kind: Some(relay_message::Kind::LegChanges(LegChanges {
                changes: chunk.to_vec(),
            })),
        };
        if tx.send(msg).await.is_err() {
            return false;
        }
    }
    true
}

/// Sends every binding of the relay with its counters, in messages of at most
/// [`BINDINGS_PER_MESSAGE`], the last marked complete.
async fn send_snapshot(tx: &mpsc::Sender<RelayMessage>, node: &Node) -> bool {
    let bound = node.directory.bound_legs();
    let mut chunks = bound.chunks(BINDINGS_PER_MESSAGE).peekable();
    if chunks.peek().is_none() {
        let msg = RelayMessage {
            kind: Some(relay_message::Kind::LegSnapshot(LegSnapshot {
                bindings: Vec::new(),
                complete: true,
            })),
        };
        return tx.send(msg).await.is_ok();
    }
    while let Some(chunk) = chunks.next() {
        let msg = RelayMessage {
            kind: Some(relay_message::Kind::LegSnapshot(LegSnapshot {
                bindings: chunk.iter().map(binding).collect(),
                complete: chunks.peek().is_none(),
            })),
        };
        if tx.send(msg).await.is_err() {
            return false;
        }
    }
    true
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Keeps one link to every address of the controller URL `template.url` until shutdown,
/// resolving its host again every `every` (an IP address is not re-resolved).
pub(crate) async fn run_url(template: Link, resolve: Resolve, every: Duration) {
    let (host, port) = match host_port(&template.url) {
        Ok(hp) => hp,
        Err(e) => {
            tracing::error!(controller = %template.url, error = %format!("{e:#}"), "bad controller URL");
            return;
        }
    };
    let literal = host.parse::<std::net::IpAddr>().is_ok();
    let mut shutdown = template.shutdown.clone();
    let mut links: HashMap<SocketAddr, (watch::Sender<bool>, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    // This URL's share of the addresses gauge.
    let mut published = 0i64;
    loop {
        let next = match resolve(host.clone(), port).await {
            Ok(addrs) if !addrs.is_empty() => {
                template.metrics.count_resolution(true);
                let want: BTreeSet<SocketAddr> = addrs.into_iter().collect();
                links.retain(|addr, (stop, _)| {
                    let keep = want.contains(addr);
                    if !keep {
                        tracing::info!(controller = %template.url, %addr, "controller address gone; dropping its link");
                        // The task ends its stream and exits; nothing waits for it here.
                        let _ = stop.send(true);
                    }
                    keep
                });
                for addr in want {
                    if links.contains_key(&addr) {
                        continue;
                    }
                    tracing::info!(controller = %template.url, %addr, "controller address found; attaching");
                    let (stop, stopped) = watch::channel(false);
                    let mut link = template.clone();
                    link.addr = Some(addr);
                    link.shutdown = stopped;
                    links.insert(addr, (stop, tokio::spawn(run(link))));
                }
                every
            }
            Ok(_) => {
                template.metrics.count_resolution(false);
                tracing::warn!(controller = %template.url, "controller host resolved to no address; keeping the links there are");
                RESOLVE_RETRY.min(every)
            }
            Err(e) => {
                template.metrics.count_resolution(false);
                tracing::warn!(controller = %template.url, error = %e, "cannot resolve controller host; keeping the links there are");
                RESOLVE_RETRY.min(every)
            }
        };
        let linked = links.len() as i64;
        template
            .metrics
            .controller_addresses
            .add(linked - published);
        published = linked;
        if literal && !links.is_empty() {
            let _ = shutdown.wait_for(|s| *s).await;
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
    for (_, (stop, task)) in links.drain() {
        let _ = stop.send(true);
        // A link task that panicked has logged it; there is nothing else to stop.
        let _ = task.await;
    }
    template.metrics.controller_addresses.sub(published);
}

/// Keeps a link to one controller address until shutdown.
async fn run(mut link: Link) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        match attach(&mut link).await {
            Ok(()) => {
                tracing::info!(controller = %link.url, addr = ?link.addr, "controller stream ended")
            }
            Err(e) => {
                tracing::warn!(controller = %link.url, addr = ?link.addr, error = %format!("{e:#}"), "controller link failed")
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
    let endpoint = tonic::transport::Endpoint::from_shared(link.url.clone())
        .context("controller URL")?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    let channel = match link.addr {
        Some(addr) => endpoint.connect_with_connector(FixedAddr(addr)).await,
        None => endpoint.connect().await,
    }
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
    // Subscribed before the bound legs are read: a leg bound in between is told twice, which a
    // controller ignores, rather than not at all.
    let mut leg_changes = link.leg_changes.subscribe();
    // Sent once the stream is open (below): before, nothing reads the queue.
    let bound = all_bound(&link.node);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = &link.token {
        let value = format!("Bearer {token}")
            .parse()
            .context("controller token is not valid header text")?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut inbound = client.attach(request).await.context("attach")?.into_inner();
    tracing::info!(controller = %link.url, addr = ?link.addr, "attached to controller");
    link.metrics.controllers_attached.inc();
    let _attached = Attached(&link.metrics);

    if !send_changes(&tx, bound).await {
        return Ok(());
    }

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
            c = leg_changes.recv() => {
                let sent = match c {
                    Ok(first) => match queued(first, &mut leg_changes) {
                        Some(changes) => send_changes(&tx, changes).await,
                        None => send_snapshot(&tx, &link.node).await,
                    },
                    // Changes missed: the full picture instead.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        send_snapshot(&tx, &link.node).await
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                };
                if !sent {
                    return Ok(());
                }
            }
            _ = ticker.tick() => {
                let report = meter.report(&link.node, &link.metrics);
                let msg = RelayMessage { kind: Some(relay_message::Kind::Load(report)) };
                if tx.send(msg).await.is_err() {
                    return Ok(());
                }
                // The changes so far go first, so that the snapshot after them is the newer
                // word on every leg.
                let pending = match leg_changes.try_recv() {
                    Ok(first) => queued(first, &mut leg_changes),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => None,
                    Err(_) => Some(Vec::new()),
                };
                if let Some(changes) = pending
                    && !send_changes(&tx, changes).await
                {
                    return Ok(());
                }
                if !send_snapshot(&tx, &link.node).await {
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
            for l in r.legs {
                // A leg index the API never mints names no leg: nothing to revoke.
                let Ok(leg) = u8::try_from(l.leg_index) else {
                    continue;
                };
                if leg >= veil_relay_core::token::MAX_LEGS {
                    continue;
                }
                let unbound = node.revoke_leg(SessionId(l.session_id), leg, l.expires_unix_ms);
                tracing::debug!(session = %SessionId(l.session_id), leg, bound = unbound.len(), "leg revoked");
            }
        }
        Some(controller_message::Kind::Extend(e)) => {
            for s in e.sessions {
                node.extend(SessionId(s.session_id), s.expires_unix_ms);
                tracing::debug!(session = %SessionId(s.session_id), "session extended");
            }
        }
        None => tracing::debug!("empty controller message ignored"),
    }
}

#[cfg(test)]
mod tests {
    //! Controller name resolution against real controllers (minimal `RelayRegistry` servers on
    //! loopback addresses) with a scripted resolver standing in for DNS, whose answers the
    //! tests change as a headless Service's would.

    use std::pin::Pin;
    use std::sync::Mutex;
    use std::task::{Context as TaskContext, Poll};

    use tokio::sync::mpsc::UnboundedSender;
    use veil_proto::v1::{ControllerMessage, relay_registry_server};

    use super::*;

    /// What a fake controller saw.
    #[derive(Debug, PartialEq, Eq)]
    enum Seen {
        /// An `Attach` with this node id, whose request named this authority.
        Attached(String, String),
        /// That stream ended.
        Ended,
    }

    #[derive(Clone)]
    struct FakeController {
        seen: UnboundedSender<Seen>,
    }

    type Out =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<ControllerMessage, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl relay_registry_server::RelayRegistry for FakeController {
        type AttachStream = Out;

        async fn attach(
            &self,
            request: tonic::Request<tonic::Streaming<RelayMessage>>,
        ) -> Result<tonic::Response<Out>, tonic::Status> {
            let authority = request
                .extensions()
                .get::<Authority>()
                .map(|a| a.0.clone())
                .unwrap_or_default();
            let mut inbound = request.into_inner();
            let Some(RelayMessage {
                kind: Some(relay_message::Kind::Hello(hello)),
            }) = inbound.message().await?
            else {
                return Err(tonic::Status::invalid_argument("hello first"));
            };
            let _ = self.seen.send(Seen::Attached(hello.node_id, authority));
            let (tx, rx) = mpsc::channel(1);
            let seen = self.seen.clone();
            tokio::spawn(async move {
                while let Ok(Some(_)) = inbound.message().await {}
                let _ = seen.send(Seen::Ended);
                drop(tx);
            });
            Ok(tonic::Response::new(
                Box::pin(ReceiverStream::new(rx)) as Out
            ))
        }
    }

    /// The `:authority` of a request, copied where the service can read it.
    #[derive(Clone)]
    struct Authority(String);

    #[derive(Clone)]
    struct KeepAuthority<S>(S);

    impl<S, B> tower::Service<tonic::codegen::http::Request<B>> for KeepAuthority<S>
    where
        S: tower::Service<tonic::codegen::http::Request<B>>,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;

        fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
            self.0.poll_ready(cx)
        }

        fn call(&mut self, mut req: tonic::codegen::http::Request<B>) -> Self::Future {
            let a = req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default();
            req.extensions_mut().insert(Authority(a));
            self.0.call(req)
        }
    }

    /// Serves a fake controller on `listener` until the test ends; returns what it sees.
    fn serve(listener: std::net::TcpListener) -> mpsc::UnboundedReceiver<Seen> {
        let (seen, rx) = mpsc::unbounded_channel();
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(tower::layer::layer_fn(KeepAuthority))
                .add_service(relay_registry_server::RelayRegistryServer::new(
                    FakeController { seen },
                ))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        rx
    }

    /// A fake controller on `ip` and `port` (0: any).
    fn controller(ip: &str, port: u16) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
        let l = std::net::TcpListener::bind((ip, port)).unwrap();
        (l.local_addr().unwrap(), serve(l))
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the fake controller saw something within 10 s")
            .unwrap()
    }

    /// Nothing more arrives for a while.
    async fn quiet(rx: &mut mpsc::UnboundedReceiver<Seen>) {
        let got = tokio::time::timeout(Duration::from_millis(600), rx.recv()).await;
        assert!(got.is_err(), "unexpected {got:?}");
    }

    fn link(url: &str, shutdown: watch::Receiver<bool>) -> (Link, Arc<RelayMetrics>) {
        let keys = veil_relay_core::KeyRing::from_keys(&[(1, [7; 32])], 1);
        let node = Arc::new(Node::new(
            veil_relay_core::Config::default(),
            keys,
            100,
            [9; 32],
            Instant::now(),
            crate::unix_ms(),
        ));
        let metrics =
            Arc::new(RelayMetrics::register(&prometheus::Registry::new(), node.clone()).unwrap());
        let link = Link {
            url: url.into(),
            addr: None,
            token: None,
            hello: RelayHello {
                node_id: "relay-r".into(),
                ..Default::default()
            },
            node: node.clone(),
            metrics: metrics.clone(),
            drainer: Arc::new(Drainer::new(node)),
            cpu: CpuClock::Process,
            interval: Duration::from_millis(100),
            leg_changes: broadcast::channel(16).0,
            shutdown,
        };
        (link, metrics)
    }

    /// A resolver whose answer the test sets: `None` fails the lookup.
    fn scripted(
        answer: Arc<Mutex<Option<Vec<SocketAddr>>>>,
        asked: UnboundedSender<(String, u16)>,
    ) -> Resolve {
        Arc::new(move |host, port| {
            let _ = asked.send((host, port));
            let a = answer.lock().unwrap().clone();
            Box::pin(async move { a.ok_or_else(|| std::io::Error::other("no such host")) })
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resolved_name_links_to_every_address_and_follows_changes() {
        // Two controllers on one port of two loopback addresses, as two pods behind one name.
        let (a, mut seen_a) = controller("127.0.0.2", 0);
        let (b, mut seen_b) = controller("127.0.0.3", a.port());
        let url = format!("http://controllers.test:{}", a.port());
        let answer = Arc::new(Mutex::new(Some(vec![a])));
        let (asked_tx, mut asked) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let (template, metrics) = link(&url, stopped);
        let task = tokio::spawn(run_url(
            template,
            scripted(answer.clone(), asked_tx),
            Duration::from_millis(100),
        ));
        assert_eq!(
            asked.recv().await.unwrap(),
            ("controllers.test".to_string(), a.port())
        );

        // One address: one link, and its requests still name the URL's host.
        let authority = format!("controllers.test:{}", a.port());
        assert_eq!(
            next(&mut seen_a).await,
            Seen::Attached("relay-r".into(), authority.clone())
        );
        quiet(&mut seen_b).await;

        // A second controller appears under the name: the relay attaches to it too.
        *answer.lock().unwrap() = Some(vec![b, a]);
        assert_eq!(
            next(&mut seen_b).await,
            Seen::Attached("relay-r".into(), authority.clone())
        );
        quiet(&mut seen_a).await;
        let until = Instant::now() + Duration::from_secs(5);
        while metrics.controllers_attached.get() < 2 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(metrics.controllers_attached.get(), 2);
        assert_eq!(metrics.controller_addresses.get(), 2);

        // The lookup fails for a while: nothing is dropped.
        *answer.lock().unwrap() = None;
        quiet(&mut seen_a).await;
        quiet(&mut seen_b).await;
        assert_eq!(metrics.controller_addresses.get(), 2);

        // The first one vanishes from the name: its link is dropped, the other stays.
        *answer.lock().unwrap() = Some(vec![b]);
        assert_eq!(next(&mut seen_a).await, Seen::Ended);
        quiet(&mut seen_b).await;
        let until = Instant::now() + Duration::from_secs(5);
        while metrics.controllers_attached.get() > 1 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(metrics.controllers_attached.get(), 1);
        assert_eq!(metrics.controller_addresses.get(), 1);

        // Shutdown ends the remaining link and the task.
        stop.send(true).unwrap();
        assert_eq!(next(&mut seen_b).await, Seen::Ended);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(metrics.controller_addresses.get(), 0);
        assert_eq!(metrics.controllers_attached.get(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ip_address_is_not_resolved_again() {
        let (a, mut seen_a) = controller("127.0.0.1", 0);
        let answer = Arc::new(Mutex::new(Some(vec![a])));
        let (asked_tx, mut asked) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let (template, _) = link(&format!("http://{a}"), stopped);
        let task = tokio::spawn(run_url(
            template,
            scripted(answer, asked_tx),
            Duration::from_millis(50),
        ));
        assert_eq!(
            next(&mut seen_a).await,
            Seen::Attached("relay-r".into(), a.to_string())
        );
        assert_eq!(asked.recv().await.unwrap(), ("127.0.0.1".into(), a.port()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            asked.try_recv().is_err(),
            "an IP address was resolved again"
        );
        stop.send(true).unwrap();
        task.await.unwrap();
    }
}
