//! `veil-relay`: the relay node's shell around the sans-IO core in `veil-relay-core`. It owns the
//! sockets (UDP IO workers), the link to the controllers, the ops endpoint and the metrics, and
//! runs them until shutdown, draining gracefully.
//!
//! ```no_run
//! # async fn example(settings: veil_relay::config::Settings) -> anyhow::Result<()> {
//! let relay = veil_relay::RelayServer::load(settings).await?;
//! relay.run(veil_ops::signal::shutdown()).await
//! # }
//! ```

pub mod config;
mod control;
pub mod drain;
pub mod metrics;
pub mod public_ip;
pub mod quic;
pub mod send;
pub mod turn_stream;
pub mod udp;
pub mod xdp;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::Registry;
use tokio::sync::watch;
use veil_relay_core::{Node, SharedStats};

use crate::config::Settings;
use crate::metrics::{RelayMetrics, Transport};
use crate::quic::QuicServer;
use crate::send::{QuicConns, TurnStreams};
use crate::turn_stream::{StreamContext, StreamServer};

/// Unix milliseconds now.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A relay node with its sockets bound, ready to run.
pub struct RelayServer {
    settings: Settings,
    node: Arc<Node>,
    sockets: Vec<std::net::UdpSocket>,
    udp_addr: SocketAddr,
    quic: Option<QuicServer>,
    quic_addr: Option<SocketAddr>,
    quic_fingerprint: Option<[u8; 32]>,
    turn_tcp: Option<StreamServer>,
    turn_tcp_addr: Option<SocketAddr>,
    turn_tls: Option<StreamServer>,
    turn_tls_addr: Option<SocketAddr>,
    ops_addr: SocketAddr,
    metrics: Arc<RelayMetrics>,
    key_reloads: prometheus::IntCounterVec,
    running: Arc<AtomicBool>,
    stop_ops: watch::Sender<bool>,
    ops_task: tokio::task::JoinHandle<()>,
    fast_path: Option<xdp::FastPath>,
}

impl std::fmt::Debug for RelayServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayServer")
            .field("node_id", &self.settings.node_id)
            .field("udp_addr", &self.udp_addr)
            .field("ops_addr", &self.ops_addr)
            .finish_non_exhaustive()
    }
}

impl RelayServer {
    /// Binds the media sockets and the ops endpoint. Nothing is forwarded until [`Self::run`].
    pub async fn load(settings: Settings) -> anyhow::Result<Self> {
        let now = Instant::now();
        let sockets = udp::bind_sockets(settings.udp_addr, settings.workers.max(1))?;
        let udp_addr = sockets[0].local_addr()?;
        // TURN's relayed addresses are the announced media address's IP with ports that only
        // name legs (relay/core/src/turn.rs).
        let core = veil_relay_core::Config {
            turn_ip: settings
                .turn
                .then(|| settings.public_udp_addr.unwrap_or(udp_addr).ip()),
            ..settings.core.clone()
        };
        let node = Arc::new(Node::new(
            core,
            settings.keys.clone(),
            settings.max_legs,
            rand::random(),
            now,
            unix_ms(),
        ));
        let quic = match &settings.quic {
            Some(q) => Some(QuicServer::bind(q.addr, &q.identity)?),
            None => None,
        };
        let quic_addr = quic.as_ref().map(|q| q.local_addr()).transpose()?;
        let quic_fingerprint = quic.as_ref().map(|q| q.fingerprint());
        let streams = &settings.turn_streams;
        let turn_tcp = match streams.tcp_addr.filter(|_| settings.turn) {
            Some(addr) => Some(StreamServer::bind_tcp(addr).await?),
            None => None,
        };
        let turn_tls = match streams.tls.as_ref().filter(|_| settings.turn) {
            Some((addr, identity)) => Some(StreamServer::bind_tls(*addr, identity).await?),
            None => None,
        };
        let turn_tcp_addr = turn_tcp.as_ref().map(|s| s.local_addr()).transpose()?;
        let turn_tls_addr = turn_tls.as_ref().map(|s| s.local_addr()).transpose()?;
        let registry = Registry::new();
        let metrics = Arc::new(RelayMetrics::register(&registry, node.clone())?);
        veil_ops::build::register(&registry, env!("CARGO_PKG_VERSION"))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let key_reloads = veil_ops::keys::reload_counter(&registry, "veil_relay")?;
        let running = Arc::new(AtomicBool::new(false));
        let (stop_ops, mut stop_rx) = watch::channel(false);
        let ops = veil_ops::http::Ops {
            registry,
            refresh: {
                let m = metrics.clone();
                Arc::new(move || m.refresh())
            },
            ready: {
                let (running, node) = (running.clone(), node.clone());
                Arc::new(move || {
                    if !running.load(Ordering::Relaxed) {
                        Err("not serving".into())
                    } else if node.directory.is_draining() {
                        Err("draining".into())
                    } else {
                        Ok(())
                    }
                })
            },
        };
        let fast_path = xdp::attach(&settings.xdp, udp_addr, &metrics.xdp)?;
        let (ops_addr, ops_task) = veil_ops::http::serve(settings.ops_addr, ops, async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        })
        .await?;
        Ok(Self {
            settings,
            node,
            sockets,
            udp_addr,
            quic,
            quic_addr,
            quic_fingerprint,
            turn_tcp,
            turn_tcp_addr,
            turn_tls,
            turn_tls_addr,
            ops_addr,
            metrics,
            key_reloads,
            running,
            stop_ops,
            ops_task,
            fast_path,
        })
    }

    /// The UDP address announced to clients.
    pub fn public_udp_addr(&self) -> SocketAddr {
        self.settings.public_udp_addr.unwrap_or(self.udp_addr)
    }

    /// The QUIC address announced to clients, if the relay serves QUIC.
    pub fn public_quic_addr(&self) -> Option<SocketAddr> {
        let q = self.settings.quic.as_ref()?;
        q.public_addr.or(self.quic_addr)
    }

    /// The TURN over TCP address announced to clients (--public-turn-tcp-addr, or the public
    /// UDP address's IP with the bound port), if the relay serves it.
    pub fn public_turn_tcp_addr(&self) -> Option<SocketAddr> {
        let port = self.turn_tcp_addr?.port();
        Some(
            self.settings
                .turn_streams
                .tcp_public
                .unwrap_or_else(|| SocketAddr::new(self.public_udp_addr().ip(), port)),
        )
    }

    /// The TURN over TLS address announced to clients, `host:port` (--public-turn-tls-addr, or
    /// the public UDP address's IP with the bound port), if the relay serves it.
    pub fn public_turn_tls_addr(&self) -> Option<String> {
        let port = self.turn_tls_addr?.port();
        Some(match &self.settings.turn_streams.tls_public {
            Some(a) => a.clone(),
            None => SocketAddr::new(self.public_udp_addr().ip(), port).to_string(),
        })
    }

    /// SHA-256 of the QUIC certificate, if the relay serves QUIC.
    pub fn quic_fingerprint(&self) -> Option<[u8; 32]> {
        self.quic_fingerprint
    }

    /// The bound UDP media address.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// The bound ops endpoint address.
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// The node's shared state (session table, keys).
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> &Arc<RelayMetrics> {
        &self.metrics
    }

    fn hello(&self) -> veil_proto::v1::RelayHello {
        veil_proto::v1::RelayHello {
            node_id: self.settings.node_id.clone(),
            region: self.settings.region.clone(),
            zone: self.settings.zone.clone(),
            udp_address: self.public_udp_addr().to_string(),
            turn_udp: self.settings.turn,
            turn_tcp_address: self
                .public_turn_tcp_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            turn_tls_address: self.public_turn_tls_addr().unwrap_or_default(),
            quic_address: self
                .public_quic_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            quic_cert_sha256: self
                .quic_fingerprint()
                .map(|f| f.to_vec())
                .unwrap_or_default(),
            capacity_legs: self.settings.max_legs as u64,
            key_ids: self
                .settings
                .keys
                .key_ids()
                .iter()
                .map(|k| u32::from(k.0))
                .collect(),
            instance_id: rand::random(),
            draining: false,
        }
    }

    /// Serves until `shutdown` completes, then drains: new sessions are refused while bound
    /// calls continue, until they end or the drain deadline passes; then everything stops.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let quic: Option<Arc<QuicConns>> = match self.quic.take() {
            Some(server) => {
                let shared = server.conns();
                self.metrics.add_quic(shared.clone());
                // QUIC legs send to UDP legs from the media port: through a duplicate of the
                // first worker's socket (sending needs no registration with its runtime).
                let udp = Arc::new(self.sockets[0].try_clone()?);
                tasks.spawn(server.run(self.node.clone(), udp, stop_rx.clone()));
                Some(shared)
            }
            None => None,
        };

        // TURN over TCP and TLS: relayed datagrams to TURN UDP allocations leave from the media
        // port, through a duplicate of the first worker's socket, as QUIC's do.
        let streams: Option<Arc<TurnStreams>> =
            if self.turn_tcp.is_some() || self.turn_tls.is_some() {
                let streams = Arc::new(TurnStreams::default());
                self.metrics.add_streams(streams.clone());
                let ctx = Arc::new(StreamContext::new(
                    self.node.clone(),
                    streams.clone(),
                    quic.clone(),
                    Arc::new(self.sockets[0].try_clone()?),
                    self.settings.turn_streams.max_connections,
                    stop_rx.clone(),
                ));
                tasks.spawn(ctx.clone().sweep());
                for server in [self.turn_tcp.take(), self.turn_tls.take()]
                    .into_iter()
                    .flatten()
                {
                    tasks.spawn(server.run(ctx.clone()));
                }
                Some(streams)
            } else {
                None
            };

        let mut workers = Vec::new();
        let mut cpu_clocks = Vec::new();
        for (index, socket) in std::mem::take(&mut self.sockets).into_iter().enumerate() {
            let stats = Arc::new(SharedStats::default());
            self.metrics.add_source(Transport::Udp, stats.clone());
            let turn_stats = Arc::new(SharedStats::default());
            self.metrics
                .add_source(Transport::TurnUdp, turn_stats.clone());
            workers.push(udp::spawn(udp::WorkerContext {
                index,
                socket,
                node: self.node.clone(),
                stats,
                turn_stats,
                latency: self.metrics.forwarding_latency.clone(),
                quic: quic.clone(),
                streams: streams.clone(),
                cpu_ns: {
                    let c = Arc::new(std::sync::atomic::AtomicU64::new(0));
                    cpu_clocks.push(c.clone());
                    c
                },
                shutdown: stop_rx.clone(),
            })?);
        }

        // Key rotation: SIGHUP re-reads the key ring file (generated rings have none to re-read).
        if let Some(path) = self.settings.key_file.clone() {
            let node = self.node.clone();
            tasks.spawn(veil_ops::keys::on_hangup(
                path,
                move |ring| node.set_keys(ring),
                self.key_reloads.clone(),
                stop_rx.clone(),
            )?);
        }

        let hello = self.hello();
        let drainer = Arc::new(drain::Drainer::new(self.node.clone()));
        let leg_changes = control::leg_feed(&self.node);
        if let Some(fp) = self.fast_path.take() {
            let stats = Arc::new(SharedStats::default());
            self.metrics.add_source(Transport::Udp, stats.clone());
            tasks.spawn(fp.run(
                self.node.clone(),
                leg_changes.subscribe(),
                stats,
                self.metrics.xdp.clone(),
                stop_rx.clone(),
            ));
        }
        let resolver = veil_ops::dial::system_resolver();
        for url in &self.settings.controllers {
            let link = control::Link {
                url: url.clone(),
                addr: None,
                token: self.settings.controller_token.clone(),
                hello: hello.clone(),
                node: self.node.clone(),
                metrics: self.metrics.clone(),
                drainer: drainer.clone(),
                cpu: match self.settings.cpu_source {
                    config::CpuSource::Process => control::CpuClock::Process,
                    config::CpuSource::Workers => control::CpuClock::Workers(cpu_clocks.clone()),
                },
                interval: self.settings.report_interval,
                leg_changes: leg_changes.clone(),
                shutdown: stop_rx.clone(),
            };
            tasks.spawn(control::run_url(
                link,
                resolver.clone(),
                self.settings.controller_resolve,
            ));
        }
        {
            let node = self.node.clone();
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            let now = Instant::now();
                            node.set_wall_clock(now, unix_ms());
                            node.tick(now);
                        }
                        _ = stop.changed() => return,
                    }
                }
            });
        }
        self.running.store(true, Ordering::Relaxed);
        tracing::info!(
            node_id = %self.settings.node_id,
            udp = %self.udp_addr,
            quic = ?self.quic_addr,
            turn_tcp = ?self.turn_tcp_addr,
            turn_tls = ?self.turn_tls_addr,
            ops = %self.ops_addr,
            workers = workers.len(),
            controllers = self.settings.controllers.len(),
            "relay serving"
        );

        shutdown.await;
        self.drain().await;

        let _ = stop_tx.send(true);
        let _ = self.stop_ops.send(true);
        while tasks.join_next().await.is_some() {}
        for w in workers {
            // A worker thread that panicked has already logged; there is nothing left to stop.
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
        let _ = self.ops_task.await;
        tracing::info!(node_id = %self.settings.node_id, "relay stopped");
        Ok(())
    }

    async fn drain(&self) {
        drain::drain(&self.node, self.settings.drain_deadline).await;
    }
}

/// Logs a leg event, for every transport. Client addresses only ever appear redacted.
pub(crate) fn log_event(e: veil_relay_core::Event) {
    use veil_ops::redact::Redacted;
    use veil_relay_core::{Endpoint, Event};
    let peer = |ep: Endpoint| match ep {
        Endpoint::Udp(a) => Redacted(a).to_string(),
        Endpoint::Quic(c) => format!("quic#{}", c.0),
        Endpoint::TurnUdp(a) => Redacted(a).to_string(),
        Endpoint::TurnTcp(c) => format!("turn-tcp#{}", c.0),
        Endpoint::TurnTls(c) => format!("turn-tls#{}", c.0),
    };
    match e {
        Event::Bound {
            session,
            leg,
            endpoint,
            moved,
        } => {
            tracing::debug!(%session, leg, transport = endpoint.transport(), peer = %peer(endpoint), moved, "leg bound");
        }
        Event::Unbound {
            session,
            leg,
            endpoint,
            why,
        } => {
            tracing::debug!(%session, leg, transport = endpoint.transport(), peer = %peer(endpoint), ?why, "leg unbound");
        }
    }
}
