//! Controller replicas without a database (docs/OPERATIONS.md, "Several replicas").
//!
//! Every replica keeps a copy of every live session. Each one follows each of its peers
//! (`--peers`) over `ReplicaService.Sync`: a snapshot of the peer's sessions, then each session
//! again whenever it changes there. A replica that changes a session also pushes it to every peer
//! it follows (`Apply`) before it answers, so a client reads its change on any replica. Merging
//! is commutative and idempotent ([`Controller::merge`]): the order records arrive in does not
//! matter, and a record heard twice changes nothing.
//!
//! Two requests are not commutative: `AllocateSession` (a new call must get one session) and
//! `AddParticipant` (a new leg must get one index). Each call has an owner: of this replica and
//! the peers it follows now, the one ranked first for the call's `call_id` by rendezvous
//! hashing, which every replica computes alike. A replica that is not the owner forwards those
//! two requests to it; where the owner cannot be reached, it serves them itself.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use veil_ops::dial::{FixedAddr, RESOLVE_RETRY, Resolve, host_port};
use veil_proto::v1 as pb;
use veil_proto::v1::replica_service_client::ReplicaServiceClient;
use veil_proto::v1::session_service_client::SessionServiceClient;

use crate::errors::{self, Reason};
use crate::metrics::AuthService;
use crate::service::{Auth, Caller};
use crate::state::Controller;

/// The request header of a request one replica forwards to another: the receiver serves it
/// itself, whoever it thinks owns the call (no forwarding loops).
pub const FORWARDED_HEADER: &str = "veil-forwarded";

/// How long a pushed change may take before the peer counts as unreachable for it.
const PEER_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a forwarded request may take: the owner's own pushes (at most [`PEER_TIMEOUT`],
/// in parallel) included, with room to spare.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// `veil.v1.ReplicaService`: what this replica tells its peers.
#[derive(Debug, Clone)]
pub struct ReplicaApi {
    pub(crate) controller: Arc<Controller>,
    pub(crate) auth: Auth,
    pub(crate) replica_id: String,
    /// This process's instance ([`Peers`]'s), to know its own address among its peers'.
    pub(crate) instance: u64,
}

impl ReplicaApi {
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.auth
            .check(req.metadata(), Caller::Peer)
            .map(drop)
            .inspect_err(|_| {
                self.controller
                    .metrics
                    .count_auth_failure(AuthService::Replica);
            })
    }
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::SyncMessage, Status>> + Send + 'static>>;

fn session_message(rec: pb::SessionRecord) -> Result<pb::SyncMessage, Status> {
    Ok(pb::SyncMessage {
        kind: Some(pb::sync_message::Kind::Session(rec)),
    })
}

#[tonic::async_trait]
impl pb::replica_service_server::ReplicaService for ReplicaApi {
    type SyncStream = SyncStream;

    async fn sync(
        &self,
        request: Request<pb::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        self.authorize(&request)?;
        // A replica's own address among its --peers (a name that resolves to every replica):
        // the hello tells it so, and nothing follows. Another replica with this one's id is a
        // misconfiguration, refused.
        let own = request.get_ref().replica_id == self.replica_id;
        if own && request.get_ref().instance_id != self.instance {
            return Err(errors::simple(
                Code::InvalidArgument,
                "a replica cannot follow another with the same --replica-id: give each its own",
                Reason::InvalidField,
            ));
        }
        let controller = self.controller.clone();
        // Subscribed before the snapshot is read: nothing changes unseen in between.
        let mut records = controller.subscribe_records();
        let (tx, rx) = mpsc::channel(256);
        let hello = pb::SyncMessage {
            kind: Some(pb::sync_message::Kind::Hello(pb::ReplicaHello {
                replica_id: self.replica_id.clone(),
                instance_id: self.instance,
            })),
        };
        if own {
            let _ = tx.send(Ok(hello)).await;
            return Ok(Response::new(
                Box::pin(ReceiverStream::new(rx)) as Self::SyncStream
            ));
        }
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            let snapshot = |tx: mpsc::Sender<_>, controller: Arc<Controller>| async move {
                for rec in controller.records() {
                    tx.send(session_message(rec)).await.ok()?;
                }
                Some(())
            };
            if tx.send(Ok(hello)).await.is_err()
                || snapshot(tx.clone(), controller.clone()).await.is_none()
            {
                return;
            }
            let done = pb::SyncMessage {
                kind: Some(pb::sync_message::Kind::SnapshotDone(pb::SnapshotDone {})),
            };
            if tx.send(Ok(done)).await.is_err() {
                return;
            }
            loop {
                let sent = tokio::select! {
                    r = records.recv() => match r {
                        Ok(id) => match controller.record(id) {
                            Some(rec) => tx.send(session_message(rec)).await.ok(),
                            None => Some(()),
                        },
                        // Changes missed: the peer gets every session again instead.
                        Err(RecvError::Lagged(_)) => snapshot(tx.clone(), controller.clone()).await,
                        Err(RecvError::Closed) => None,
                    },
                    _ = tx.closed() => None,
                    _ = controller.stopping() => None,
                };
                if sent.is_none() {
                    return;
                }
            }
        });
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as Self::SyncStream
        ))
    }

    async fn apply(
        &self,
        request: Request<pb::SessionRecord>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        self.authorize(&request)?;
        self.controller
            .merge(request.into_inner())
            .map_err(|e| errors::simple(Code::InvalidArgument, e, Reason::MalformedRequest))?;
        Ok(Response::new(pb::ApplyResponse {}))
    }
}

/// One address of a peer replica, as this replica follows it.
#[derive(Debug)]
pub struct PeerLink {
    url: String,
    addr: SocketAddr,
    channel: Channel,
    /// Its `--replica-id`, once its Sync stream said it.
    id: Mutex<Option<String>>,
    /// Its snapshot is merged and its stream is open.
    up: AtomicBool,
    /// Its first snapshot arrived, or the first try to follow it failed.
    settled: AtomicBool,
    /// The address is this replica's own (a `--peers` name that resolves to every replica).
    is_self: AtomicBool,
    stop: watch::Sender<bool>,
}

impl PeerLink {
    /// Its gRPC URL, as `--peers` gives it.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn id(&self) -> Option<String> {
        self.id.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed) && !self.is_self.load(Ordering::Relaxed)
    }
}

/// How a Sync stream with a peer ended.
enum Followed {
    /// It ended (the peer shut down, or the link was dropped).
    Ended,
    /// The address is this replica's own: nothing to follow there.
    Itself,
}

/// The peer replicas this one follows, forwards to and pushes to: one link to every address
/// each `--peers` URL's host resolves to (resolved again every [`RESOLVE_EVERY`]), less this
/// replica's own.
pub struct Peers {
    replica_id: String,
    /// Tells this replica from another given the same `--replica-id` (a misconfiguration).
    instance: u64,
    token: Option<String>,
    urls: Vec<String>,
    links: RwLock<Vec<Arc<PeerLink>>>,
    /// For each URL, whether its first resolution is done (readiness waits for it).
    resolved: Vec<AtomicBool>,
    resolve: Resolve,
    controller: Arc<Controller>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("replica_id", &self.replica_id)
            .field("urls", &self.urls)
            .finish_non_exhaustive()
    }
}

/// How often each `--peers` host is resolved again: replicas come and go behind a headless
/// Service (CoreDNS caches its answers for 5 s by default).
pub const RESOLVE_EVERY: Duration = Duration::from_secs(10);

impl Peers {
    /// Peers at `urls`, presented `token` (the first `--peer-tokens` entry), for `controller`
    /// whose own id is `replica_id` and process `instance` (its `ReplicaApi`'s), their hosts
    /// resolved with `resolve`.
    pub fn new(
        (replica_id, instance): (String, u64),
        urls: &[String],
        token: Option<String>,
        controller: Arc<Controller>,
        resolve: Resolve,
    ) -> anyhow::Result<Arc<Self>> {
        for url in urls {
            host_port(url).with_context(|| format!("--peers: {url}"))?;
        }
        controller.set_syncing(!urls.is_empty());
        Ok(Arc::new(Self {
            replica_id,
            instance,
            token,
            urls: urls.to_vec(),
            links: RwLock::new(Vec::new()),
            resolved: urls.iter().map(|_| AtomicBool::new(false)).collect(),
            resolve,
            controller,
        }))
    }

    /// The links to peer addresses now (this replica's own included, marked).
    pub fn links(&self) -> Vec<Arc<PeerLink>> {
        self.links.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Resolves and follows every peer until `stop`.
    pub fn spawn(
        self: &Arc<Self>,
        stop: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..self.urls.len())
            .map(|i| tokio::spawn(self.clone().resolve_url(i, stop.clone())))
            .collect()
    }

    fn authorize<T>(&self, req: &mut Request<T>) {
        if let Some(token) = &self.token
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            req.metadata_mut().insert("authorization", value);
        }
    }

    fn note_links(&self) {
        let links = self.links();
        let peers = links
            .iter()
            .filter(|l| !l.is_self.load(Ordering::Relaxed))
            .count();
        let up = links.iter().filter(|l| l.is_up()).count();
        self.controller.metrics.peers.set(peers as i64);
        self.controller.metrics.peers_up.set(up as i64);
        if self.resolved.iter().all(|r| r.load(Ordering::Relaxed))
            && links.iter().all(|l| l.settled.load(Ordering::Relaxed))
        {
            self.controller.set_syncing(false);
        }
    }

    /// Keeps one link to every address of URL `i` until `stop`, resolving its host again
    /// every [`RESOLVE_EVERY`] (an IP address once). A failed or empty resolution keeps the
    /// links there are.
    async fn resolve_url(self: Arc<Self>, i: usize, mut stop: watch::Receiver<bool>) {
        let url = self.urls[i].clone();
        let Ok((host, port)) = host_port(&url) else {
            return;
        };
        let literal = host.parse::<std::net::IpAddr>().is_ok();
        let mut tasks = Vec::new();
        loop {
            let next = match (self.resolve)(host.clone(), port).await {
                Ok(addrs) if !addrs.is_empty() => {
                    let want: std::collections::BTreeSet<SocketAddr> = addrs.into_iter().collect();
                    let mut links = self.links.write().unwrap_or_else(|e| e.into_inner());
                    links.retain(|l| {
                        let keep = l.url != url || want.contains(&l.addr);
                        if !keep {
                            tracing::info!(peer = %url, addr = %l.addr, "peer replica address gone");
                            l.stop.send_replace(true);
                        }
                        keep
                    });
                    for addr in want {
                        if links.iter().any(|l| l.url == url && l.addr == addr) {
                            continue;
                        }
                        let link = match self.link(&url, addr) {
                            Ok(l) => l,
                            Err(e) => {
                                tracing::error!(peer = %url, error = %format!("{e:#}"), "bad peer URL");
                                return;
                            }
                        };
                        links.push(link.clone());
                        tasks.push(tokio::spawn(self.clone().follow(link, stop.clone())));
                    }
                    RESOLVE_EVERY
                }
                Ok(_) => {
                    tracing::warn!(peer = %url, "peer host resolved to no address; keeping the links there are");
                    RESOLVE_RETRY
                }
                Err(e) => {
                    tracing::warn!(peer = %url, error = %e, "cannot resolve peer host; keeping the links there are");
                    RESOLVE_RETRY
                }
            };
            self.resolved[i].store(true, Ordering::Relaxed);
            self.note_links();
            if literal && !tasks.is_empty() {
                let _ = stop.wait_for(|s| *s).await;
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    fn link(&self, url: &str, addr: SocketAddr) -> anyhow::Result<Arc<PeerLink>> {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .with_context(|| format!("--peers: {url} is not a URL"))?
            .connect_timeout(PEER_TIMEOUT)
            .tcp_nodelay(true)
            // A peer whose host went away (no reset) shows within 3 s.
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true)
            .connect_with_connector_lazy(FixedAddr(addr));
        Ok(Arc::new(PeerLink {
            url: url.to_string(),
            addr,
            channel,
            id: Mutex::new(None),
            up: AtomicBool::new(false),
            settled: AtomicBool::new(false),
            is_self: AtomicBool::new(false),
            stop: watch::channel(false).0,
        }))
    }

    async fn follow(self: Arc<Self>, link: Arc<PeerLink>, mut stop: watch::Receiver<bool>) {
        let mut gone = link.stop.subscribe();
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = Instant::now();
            let result = tokio::select! {
                r = self.follow_once(&link) => r,
                _ = stop.wait_for(|s| *s) => Ok(Followed::Ended),
                _ = gone.wait_for(|s| *s) => Ok(Followed::Ended),
            };
            link.up.store(false, Ordering::Relaxed);
            link.settled.store(true, Ordering::Relaxed);
            if matches!(result, Ok(Followed::Itself)) {
                link.is_self.store(true, Ordering::Relaxed);
                self.note_links();
                tracing::debug!(peer = %link.url, addr = %link.addr, "this address is this replica's own");
                return;
            }
            self.note_links();
            if *stop.borrow() || *gone.borrow() {
                return;
            }
            match result {
                Ok(_) => {
                    tracing::info!(peer = %link.url, addr = %link.addr, "peer replica's stream ended")
                }
                Err(e) => {
                    tracing::warn!(peer = %link.url, addr = %link.addr, error = %format!("{e:#}"), "cannot follow peer replica")
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = BACKOFF_MIN;
            }
            let wait = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
                _ = gone.wait_for(|s| *s) => return,
            }
        }
    }

    async fn follow_once(&self, link: &PeerLink) -> anyhow::Result<Followed> {
        let mut client = ReplicaServiceClient::new(link.channel.clone())
            .max_decoding_message_size(crate::MAX_MESSAGE_BYTES);
        let mut req = Request::new(pb::SyncRequest {
            replica_id: self.replica_id.clone(),
            instance_id: self.instance,
        });
        self.authorize(&mut req);
        let mut stream = client.sync(req).await.context("Sync")?.into_inner();
        let mut merged = 0usize;
        while let Some(msg) = stream.message().await.context("Sync stream")? {
            match msg.kind {
                Some(pb::sync_message::Kind::Hello(h)) => {
                    if h.replica_id == self.replica_id {
                        if h.instance_id == self.instance {
                            return Ok(Followed::Itself);
                        }
                        bail!("the peer has this replica's own --replica-id: give each its own");
                    }
                    *link.id.lock().unwrap_or_else(|e| e.into_inner()) = Some(h.replica_id);
                }
                Some(pb::sync_message::Kind::Session(rec)) => match self.controller.merge(rec) {
                    Ok(changed) => merged += usize::from(changed),
                    Err(e) => {
                        tracing::warn!(peer = %link.url, error = %e, "malformed session record from a peer replica")
                    }
                },
                Some(pb::sync_message::Kind::SnapshotDone(_)) => {
                    if link.id().is_none() {
                        bail!("the peer sent no hello");
                    }
                    link.up.store(true, Ordering::Relaxed);
                    link.settled.store(true, Ordering::Relaxed);
                    self.note_links();
                    tracing::info!(peer = %link.url, addr = %link.addr, merged, "following peer replica");
                }
                None => {}
            }
        }
        Ok(Followed::Ended)
    }

    /// The peer that owns `call_id` now, or `None` when this replica does: the highest
    /// rendezvous score of `call_id` among this replica and the peers it follows now.
    pub fn owner(&self, call_id: &str) -> Option<Arc<PeerLink>> {
        let score = |replica: &str| {
            let mut h = Sha256::new();
            h.update((replica.len() as u64).to_be_bytes());
            h.update(replica.as_bytes());
            h.update(call_id.as_bytes());
            let d = h.finalize();
            u64::from_be_bytes(d[..8].try_into().expect("32-byte digest"))
        };
        let mut best = (score(&self.replica_id), None);
        for link in self.links() {
            if !link.is_up() {
                continue;
            }
            if let Some(id) = link.id() {
                let s = score(&id);
                if s > best.0 {
                    best = (s, Some(link.clone()));
                }
            }
        }
        best.1
    }

    /// Pushes `rec` to every peer followed now, and waits (at most [`PEER_TIMEOUT`]) until
    /// each has merged it.
    pub async fn replicate(&self, rec: pb::SessionRecord) {
        let mut pushes = tokio::task::JoinSet::new();
        // One push per peer replica, however many of its addresses are linked.
        let mut pushed = std::collections::HashSet::new();
        for link in self.links().into_iter().filter(|l| l.is_up()) {
            if !pushed.insert(link.id()) {
                continue;
            }
            let mut req = Request::new(rec.clone());
            self.authorize(&mut req);
            req.set_timeout(PEER_TIMEOUT);
            let mut client = ReplicaServiceClient::new(link.channel.clone());
            let url = link.url.clone();
            pushes.spawn(async move {
                let r = tokio::time::timeout(PEER_TIMEOUT, client.apply(req)).await;
                (
                    url,
                    r.map_err(|_| Status::deadline_exceeded("push timed out"))
                        .and_then(|r| r),
                )
            });
        }
        while let Some(done) = pushes.join_next().await {
            if let Ok((url, Err(e))) = done {
                self.controller.metrics.replication_failures.inc();
                tracing::warn!(peer = %url, code = ?e.code(), "peer replica did not take a session change");
            }
        }
    }

    /// Sends `request` to `owner` as this replica's caller sent it (its credential included),
    /// marked forwarded. `None` when the owner cannot be reached (or has no relay to place on):
    /// the caller serves the request itself. An owner that takes past [`FORWARD_TIMEOUT`] gets
    /// the caller `UNAVAILABLE` (`OWNER_REPLICA_UNREACHABLE`), to retry.
    pub async fn forward<Req, Resp, F, Fut>(
        &self,
        owner: &PeerLink,
        method: &str,
        request: &Request<Req>,
        call: F,
    ) -> Option<Result<Response<Resp>, Status>>
    where
        Req: Clone,
        F: FnOnce(SessionServiceClient<Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
    {
        let mut out = Request::new(request.get_ref().clone());
        if let Some(auth) = request.metadata().get("authorization") {
            out.metadata_mut().insert("authorization", auth.clone());
        }
        out.metadata_mut().insert(
            FORWARDED_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        out.set_timeout(FORWARD_TIMEOUT);
        let client = SessionServiceClient::new(owner.channel.clone())
            .max_decoding_message_size(crate::MAX_MESSAGE_BYTES);
        let result = tokio::time::timeout(FORWARD_TIMEOUT, call(client, out)).await;
        let m = &self.controller.metrics;
        match result {
            Ok(Err(e)) if e.code() == Code::Unavailable => {
                m.count_forwarded(method, false);
                tracing::debug!(peer = %owner.url, method, "call's owner unavailable; serving here");
                None
            }
            // It may have served the request and be slow to answer: serving it here too could
            // make a second session or leg. The caller retries, by when a dead owner is out.
            Err(_) => {
                m.count_forwarded(method, true);
                Some(Err(errors::simple(
                    Code::Unavailable,
                    "the replica that owns this call did not answer in time; retry",
                    Reason::OwnerReplicaUnreachable,
                )))
            }
            Ok(r) => {
                m.count_forwarded(method, true);
                Some(r)
            }
        }
    }
}

/// Whether `request` was forwarded by another replica.
pub fn is_forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED_HEADER)
}
