//! A whole local cluster in one process: controller replicas and N relays on loopback, with
//! generated key material. Behind `veil-controller --dev` and `veil-loadtest --local`, and used
//! by tests.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::sync::watch;
use veil_relay::RelayServer;
use veil_relay_core::{KeyRing, Node};

use crate::ControllerServer;
use crate::config::Settings;
use crate::state::Controller;

/// Generates a fresh two-key ring (the second key signs), as a rotation in progress would look.
pub use crate::config::generate_keys;

/// What to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// Number of relays.
    pub relays: usize,
    /// UDP IO workers per relay.
    pub workers_per_relay: usize,
    /// Regions of the relays, cycled; empty for none.
    pub regions: Vec<String>,
    /// Leg idle timeout on the relays.
    pub leg_idle: Duration,
    /// Serve QUIC (with self-signed certificates) as well as UDP.
    pub quic: bool,
    /// Leg capacity of each relay, cycled; empty for the default.
    pub capacities: Vec<usize>,
    /// Serve TURN over TCP and TLS (self-signed certificates) as well as over UDP.
    pub turn_streams: bool,
    /// Number of controller replicas, peers of each other; every relay attaches to each.
    pub controllers: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            relays: 1,
            workers_per_relay: 2,
            regions: Vec::new(),
            leg_idle: Duration::from_secs(30),
            quic: true,
            capacities: Vec::new(),
            turn_streams: true,
            controllers: 1,
        }
    }
}

/// One relay of the local cluster, as `READY` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct DevRelay {
    /// Node id.
    pub node_id: String,
    /// UDP media address.
    pub udp: SocketAddr,
    /// QUIC address, if served.
    pub quic: Option<SocketAddr>,
    /// TURN over TCP address, if served.
    pub turn_tcp: Option<SocketAddr>,
    /// TURN over TLS address (`host:port`), if served.
    pub turn_tls: Option<String>,
    /// SHA-256 of the TURN over TLS certificate's public key (SPKI), base64: the certificate is
    /// self-signed, and this is what a client pins (Chromium:
    /// `--ignore-certificate-errors-spki-list`).
    pub turn_tls_spki: Option<String>,
    /// Ops endpoint (/metrics, /healthz, /readyz).
    pub metrics: SocketAddr,
}

/// A running local cluster.
pub struct Cluster {
    /// The first controller's gRPC URL.
    pub controller_url: String,
    /// Every controller replica's gRPC URL, the first one first.
    pub controller_urls: Vec<String>,
    /// The first controller's ops endpoint.
    pub controller_ops: SocketAddr,
    /// The relays.
    pub relays: Vec<DevRelay>,
    /// The generated key ring.
    pub keys: KeyRing,
    /// The first controller's state.
    pub controller: Arc<Controller>,
    /// Every controller replica's state, the first one first.
    pub controllers: Vec<Arc<Controller>>,
    /// Each relay's shared state.
    pub relay_nodes: Vec<Arc<Node>>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("controller_url", &self.controller_url)
            .field("relays", &self.relays)
            .finish()
    }
}

#[derive(Serialize)]
struct Ready<'a> {
    controller: &'a str,
    controllers: &'a [String],
    controller_metrics: SocketAddr,
    relays: &'a [DevRelay],
}

impl Cluster {
    /// Starts the controller and the relays, and waits until every relay has attached.
    pub async fn start(opts: Options) -> anyhow::Result<Self> {
        if opts.relays == 0 {
            bail!("a local cluster needs at least one relay");
        }
        if opts.controllers == 0 {
            bail!("a local cluster needs at least one controller");
        }
        let keys = generate_keys();
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        let mut servers = Vec::new();
        for _ in 0..opts.controllers {
            servers.push(ControllerServer::load(Settings::local(keys.clone())).await?);
        }
        let controller_urls: Vec<String> = servers
            .iter()
            .map(|s| format!("http://{}", s.grpc_addr()))
            .collect();
        let controller_url = controller_urls[0].clone();
        let controller_ops = servers[0].ops_addr();
        let controllers: Vec<Arc<Controller>> =
            servers.iter().map(|s| s.controller().clone()).collect();
        let controller = controllers[0].clone();
        for (i, mut server) in servers.into_iter().enumerate() {
            if opts.controllers > 1 {
                let peers = controller_urls
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, u)| u.clone())
                    .collect();
                server.set_peers(format!("controller-{i}"), peers);
            }
            tasks.spawn(server.run(stopped(stop_rx.clone())));
        }

        let mut relays = Vec::new();
        let mut relay_nodes = Vec::new();
        for i in 0..opts.relays {
            let mut s = veil_relay::config::Settings::local(
                keys.clone(),
                &format!("relay-{i}"),
                controller_urls.clone(),
            );
            s.workers = opts.workers_per_relay.max(1);
            s.core.leg_idle = opts.leg_idle;
            // A local cluster shows everything GetSession can: per-leg counters included.
            s.core.leg_counters = true;
            if !opts.regions.is_empty() {
                s.region = opts.regions[i % opts.regions.len()].clone();
            }
            s.zone = format!("zone-{i}");
            s.report_interval = Duration::from_millis(500);
            if !opts.capacities.is_empty() {
                s.max_legs = opts.capacities[i % opts.capacities.len()];
            }
            if opts.quic {
                s.quic = Some(veil_relay::config::QuicSettings::local()?);
            }
            if opts.turn_streams {
                s.turn_streams = veil_relay::config::TurnStreamSettings::local()?;
            }
            let turn_tls_spki = s
                .turn_streams
                .tls
                .as_ref()
                .map(|(_, id)| id.spki_sha256_base64())
                .transpose()?;
            let relay = RelayServer::load(s).await?;
            relays.push(DevRelay {
                node_id: format!("relay-{i}"),
                udp: relay.public_udp_addr(),
                quic: relay.public_quic_addr(),
                turn_tcp: relay.public_turn_tcp_addr(),
                turn_tls: relay.public_turn_tls_addr(),
                turn_tls_spki,
                metrics: relay.ops_addr(),
            });
            relay_nodes.push(relay.node().clone());
            tasks.spawn(relay.run(stopped(stop_rx.clone())));
        }

        let deadline = Instant::now() + Duration::from_secs(10);
        while controllers
            .iter()
            .any(|c| c.registry.up() < opts.relays || c.readiness().is_err())
        {
            if Instant::now() > deadline {
                bail!("relays did not attach to every controller within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            controller_url,
            controller_urls,
            controller_ops,
            relays,
            keys,
            controller,
            controllers,
            relay_nodes,
            stop,
            tasks,
        })
    }

    /// The `READY {json}` line.
    pub fn ready_line(&self) -> String {
        let ready = Ready {
            controller: &self.controller_url,
            controllers: &self.controller_urls,
            controller_metrics: self.controller_ops,
            relays: &self.relays,
        };
        format!(
            "READY {}",
            serde_json::to_string(&ready).expect("plain data serialises")
        )
    }

    /// Stops everything and waits for it.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        while let Some(r) = self.tasks.join_next().await {
            r.context("cluster task panicked")??;
        }
        Ok(())
    }
}

/// Runs a local cluster until `shutdown`: prints `READY {json}` on standard output once every
/// relay has attached.
pub async fn serve(opts: Options, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let cluster = Cluster::start(opts).await?;
    println!("{}", cluster.ready_line());
    use std::io::Write;
    std::io::stdout().flush().context("flush stdout")?;
    shutdown.await;
    cluster.shutdown().await
}
