//! `veil-controller`: the gRPC controller that signaling services call to allocate relay
//! sessions. It keeps a registry of the relays attached to it, places each session on a primary
//! and a backup relay, mints one leg token per participant, and tells relays when a session is
//! released. It never learns a client address, and never holds media keys.
//!
//! ```no_run
//! # async fn example(settings: veil_controller::config::Settings) -> anyhow::Result<()> {
//! let controller = veil_controller::ControllerServer::load(settings).await?;
//! controller.run(veil_ops::signal::shutdown()).await
//! # }
//! ```

/// Defines a closed set of stable names (metric label values, error reasons): an enum, every
/// value in order, and the text of each. Nothing else can become such a name.
macro_rules! closed_set {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $v:ident => $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $v,)+
        }

        impl $name {
            /// Every value, in order.
            pub const ALL: &'static [Self] = &[$(Self::$v,)+];

            /// The stable name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$v => $text,)+
                }
            }
        }
    };
}

pub mod api;
pub mod config;
pub mod deadline;
#[cfg(feature = "dev")]
pub mod dev;
pub mod errors;
pub mod health;
pub mod legs;
pub mod malformed;
pub mod metrics;
pub mod placement;
pub mod quota;
pub mod registry;
pub mod replica;
pub mod rpc;
pub mod service;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus::Registry;
use tokio::sync::watch;
use veil_proto::v1::relay_registry_server::RelayRegistryServer;
use veil_proto::v1::replica_service_server::ReplicaServiceServer;
use veil_proto::v1::session_service_server::SessionServiceServer;

use crate::config::Settings;
use crate::health::HealthApi;
use crate::metrics::{ControllerMetrics, Role};
use crate::service::{AdminApi, Auth, RegistryApi, SessionApi};
use crate::state::Controller;
use veil_proto::v1::admin_service_server::AdminServiceServer;

/// Largest request message accepted, in bytes. An allocation of 16 participants with maximal
/// ids is about 5 KiB.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Longest a unary call may take on the server.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// A controller with its sockets bound, ready to run.
pub struct ControllerServer {
    settings: Settings,
    controller: Arc<Controller>,
    key_reloads: prometheus::IntCounterVec,
    listener: tokio::net::TcpListener,
    grpc_addr: SocketAddr,
    ops_addr: SocketAddr,
    stop_ops: watch::Sender<bool>,
    ops_task: tokio::task::JoinHandle<()>,
    peer_resolver: Option<veil_ops::dial::Resolve>,
}

impl std::fmt::Debug for ControllerServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerServer")
            .field("grpc_addr", &self.grpc_addr)
            .finish_non_exhaustive()
    }
}

impl ControllerServer {
    /// Binds the gRPC and ops endpoints.
    pub async fn load(settings: Settings) -> anyhow::Result<Self> {
        let registry = Registry::new();
        let metrics = ControllerMetrics::register(&registry)?;
        veil_ops::build::register(&registry, env!("CARGO_PKG_VERSION"))?;
        // A role with no tokens is open to anyone who reaches the gRPC port (the controller
        // refuses that on a reachable address unless allowed on purpose): exported, so that an
        // open role in production shows, and can be alerted on.
        for (role, of) in [
            (Role::Signaling, config::Role::Signaling),
            (Role::Relay, config::Role::Relay),
            (Role::Admin, config::Role::Admin),
        ] {
            metrics.set_open_role(role, settings.tokens(of).is_empty());
        }
        if !settings.relay_tokens.is_empty() {
            tracing::warn!(
                shared = settings.relay_tokens.len(),
                "shared relay tokens (--relay-tokens): a relay presenting one may register as any \
                 node id that --relay-identities does not name; give each relay its own with \
                 --relay-identities"
            );
        }
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let key_reloads = veil_ops::keys::reload_counter(&registry, "veil_controller")?;
        let quotas = quota::Quotas::new(settings.quotas, settings.signaling_tokens.len());
        metrics.init_quotas(&quotas);
        let controller = Arc::new(Controller::new(
            settings.keys.clone(),
            settings.regions.clone(),
            settings.leg_limits,
            metrics,
            quotas,
        ));
        let listener = tokio::net::TcpListener::bind(settings.grpc_addr)
            .await
            .with_context(|| format!("bind gRPC address {}", settings.grpc_addr))?;
        let grpc_addr = listener.local_addr()?;
        let (stop_ops, mut stop_rx) = watch::channel(false);
        let ops = veil_ops::http::Ops {
            registry,
            refresh: {
                let c = controller.clone();
                Arc::new(move || {
                    c.metrics.sessions.set(c.sessions() as i64);
                    c.metrics.set_relays(&c.registry.views());
                    c.metrics.set_quota_usage(&c.quotas);
                })
            },
            // The same readiness as the gRPC health status of SessionService (crate::health).
            ready: {
                let c = controller.clone();
                Arc::new(move || c.readiness().map_err(|e| e.to_string()))
            },
        };
        let (ops_addr, ops_task) = veil_ops::http::serve(settings.ops_addr, ops, async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        })
        .await?;
        Ok(Self {
            settings,
            controller,
            key_reloads,
            listener,
            grpc_addr,
            ops_addr,
            stop_ops,
            ops_task,
            peer_resolver: None,
        })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound ops address.
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// Resolves the hosts of `--peers` URLs with `resolve` instead of the system resolver
    /// (tests: a name for every replica without a DNS server).
    pub fn set_peer_resolver(&mut self, resolve: veil_ops::dial::Resolve) {
        self.peer_resolver = Some(resolve);
    }

    /// Sets the other replicas' gRPC URLs (`--peers`), before [`Self::run`]: for a local
    /// cluster, whose replicas' ports are known once all are bound.
    pub fn set_peers(&mut self, replica_id: String, peers: Vec<String>) {
        self.settings.replica_id = replica_id;
        self.settings.peers = peers;
    }

    /// The controller's state.
    pub fn controller(&self) -> &Arc<Controller> {
        &self.controller
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let auth = Auth::new(
            self.settings.signaling_tokens.clone(),
            (
                self.settings.relay_tokens.clone(),
                self.settings.relay_identities.clone(),
            ),
            self.settings.admin_tokens.clone(),
        )
        .with_peers(self.settings.peer_tokens.clone(), self.settings.peer_open);
        let (stop_tx, stop_rx) = watch::channel(false);
        // Random per process: tells this replica's own address among its peers' (ReplicaService).
        let instance: u64 = rand::random();
        let (peers, followers) = if self.settings.peers.is_empty() {
            (None, Vec::new())
        } else {
            let peers = replica::Peers::new(
                (self.settings.replica_id.clone(), instance),
                &self.settings.peers,
                self.settings.peer_tokens.first().cloned(),
                self.controller.clone(),
                self.peer_resolver
                    .clone()
                    .unwrap_or_else(veil_ops::dial::system_resolver),
            )?;
            let followers = peers.spawn(stop_rx.clone());
            (Some(peers), followers)
        };
        let replicas = ReplicaServiceServer::new(replica::ReplicaApi {
            controller: self.controller.clone(),
            auth: auth.clone(),
            replica_id: self.settings.replica_id.clone(),
            instance,
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let sessions = SessionServiceServer::new(SessionApi {
            controller: self.controller.clone(),
            auth: auth.clone(),
            peers,
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let relays = RelayRegistryServer::new(RegistryApi {
            controller: self.controller.clone(),
            auth: auth.clone(),
            networks: Arc::new(self.settings.relay_networks.clone()),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let admin = AdminServiceServer::new(AdminApi {
            controller: self.controller.clone(),
            auth,
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        // Health follows readiness, as relays attach and detach and when shutdown begins.
        let health_service = tonic_health::pb::health_server::HealthServer::new(HealthApi {
            controller: self.controller.clone(),
        });
        // Reflection in both versions: grpcurl and newer clients ask v1, others (Python's
        // grpcio-reflection, older grpcurl) only v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(veil_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .context("build reflection service (v1)")?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .context("build reflection service (v1alpha)")?;

        // Key rotation: SIGHUP re-reads the key ring file; new tokens are signed with its
        // signing key from then on (generated rings, in --dev, have no file to re-read).
        let reloader = match self.settings.key_file.clone() {
            Some(path) => {
                let controller = self.controller.clone();
                Some(tokio::spawn(veil_ops::keys::on_hangup(
                    path,
                    move |ring| controller.set_keys(ring),
                    self.key_reloads.clone(),
                    stop_rx.clone(),
                )?))
            }
            None => None,
        };
        let housekeeping = tokio::spawn(
            self.controller
                .clone()
                .housekeeping(self.settings.relay_timeout, stop_rx),
        );
        tracing::info!(grpc = %self.grpc_addr, ops = %self.ops_addr, "controller serving");
        // The builder's TCP options only apply to listeners it binds itself: set them here.
        let incoming = tonic::transport::server::TcpIncoming::from(self.listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(30)));
        let served = tonic::transport::Server::builder()
            // A backstop only: `DeadlineLayer` answers first, with the right code.
            .timeout(RPC_TIMEOUT + Duration::from_secs(1))
            // Outermost, so that it counts what the layers inside answer too.
            .layer(rpc::RpcMetricsLayer {
                metrics: self.controller.metrics.clone(),
            })
            // Inside the metrics, so that they count the codes clients get.
            .layer(malformed::MalformedLayer)
            .layer(deadline::DeadlineLayer { max: RPC_TIMEOUT })
            .concurrency_limit_per_connection(1024)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(sessions)
            .add_service(relays)
            .add_service(admin)
            .add_service(replicas)
            .serve_with_incoming_shutdown(incoming, {
                let controller = self.controller.clone();
                async move {
                    shutdown.await;
                    tracing::info!("shutting down: closing relay links and session watches");
                    controller.begin_shutdown();
                }
            })
            .await;
        let _ = stop_tx.send(true);
        let _ = self.stop_ops.send(true);
        let _ = housekeeping.await;
        for f in followers {
            let _ = f.await;
        }
        if let Some(r) = reloader {
            let _ = r.await;
        }
        let _ = self.ops_task.await;
        served.context("gRPC server")?;
        tracing::info!("controller stopped");
        Ok(())
    }
}
