//! The gRPC services: thin adapters from tonic to [`Controller`], plus caller authentication.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use veil_proto::v1 as pb;

use tonic::Code;

use crate::api::{self, AllocateError, AllocateRequest};
use crate::errors::{self, Reason, Violation};
use crate::metrics::{AllocationResult, AuthService, ReleaseResult};
use crate::quota::{Credential, Exceeded};
use crate::registry::{Change, LINK_QUEUE, RelayEvent};
use crate::state::{Controller, Role, SessionChange};

/// Who a caller is, by the bearer token it presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A signaling service: may use `SessionService`.
    Signaling,
    /// A relay: may use `RelayRegistry`.
    Relay,
    /// An operator: may use `AdminService`.
    Admin,
    /// Another controller replica: may use `ReplicaService`.
    Peer,
}

/// Bearer-token authentication. With no tokens configured for a role, that role's services are
/// open (for local development); otherwise a call must carry `authorization: Bearer <token>`
/// with one of the role's tokens.
#[derive(Clone, Default)]
pub struct Auth {
    signaling: Vec<String>,
    /// The shared relay tokens, then the per-relay ones.
    relay: Vec<String>,
    /// For each of `relay`, the node id it is bound to (`None`: a shared token).
    relay_nodes: Vec<Option<String>>,
    admin: Vec<String>,
    peer: Vec<String>,
    /// With no peer tokens: whether `ReplicaService` is open (loopback, --dev) or closed.
    peer_open: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("signaling_tokens", &self.signaling.len())
            .field("relay_tokens", &self.relay.len())
            .field("admin_tokens", &self.admin.len())
            .field("peer_tokens", &self.peer.len())
            .finish()
    }
}

impl Auth {
    /// Tokens accepted from signaling services, relays (shared ones, and per-relay ones bound
    /// to a node id) and operators.
    pub fn new(
        signaling: Vec<String>,
        (shared, identities): (Vec<String>, Vec<crate::config::RelayIdentity>),
        admin: Vec<String>,
    ) -> Self {
        let relay_nodes = std::iter::repeat_n(None, shared.len())
            .chain(identities.iter().map(|i| Some(i.node_id.clone())))
            .collect();
        let relay = shared
            .into_iter()
            .chain(identities.into_iter().map(|i| i.token))
            .collect();
        Self {
            signaling,
            relay,
            relay_nodes,
            admin,
            peer: Vec::new(),
            peer_open: false,
        }
    }

    /// Accepts peer replicas presenting one of `tokens`; with none, `ReplicaService` is open if
    /// `open_without_tokens`, else refused to everyone.
    pub fn with_peers(mut self, tokens: Vec<String>, open_without_tokens: bool) -> Self {
        self.peer = tokens;
        self.peer_open = open_without_tokens;
        self
    }

    /// Checks that relay credential `who` may register as `node_id`: a per-relay credential
    /// its own node id only, a shared one any node id that no per-relay credential names.
    pub fn admits_node(&self, who: Credential, node_id: &str) -> Result<(), Status> {
        let Credential::Token(i) = who else {
            return Ok(());
        };
        let refused = |message| {
            Err(errors::simple(
                Code::PermissionDenied,
                message,
                Reason::RelayIdentityMismatch,
            ))
        };
        match self.relay_nodes.get(i as usize) {
            Some(Some(own)) if own != node_id => {
                refused("this relay credential is bound to another node_id")
            }
            Some(None)
                if self
                    .relay_nodes
                    .iter()
                    .any(|n| n.as_deref() == Some(node_id)) =>
            {
                refused("this node_id has a credential of its own; a shared one cannot take it")
            }
            _ => Ok(()),
        }
    }

    /// The role `token` belongs to, and its position in that role's list.
    fn role_of(&self, token: &str) -> Option<(Caller, u32)> {
        use subtle::{ConditionallySelectable, ConstantTimeEq};
        // Every token of the set is compared, whichever matches: the time taken says nothing
        // about which one did, or how much of it.
        let find = |set: &[String]| {
            let (mut found, mut at) = (subtle::Choice::from(0), 0u32);
            for (i, t) in set.iter().enumerate() {
                let eq = t.as_bytes().ct_eq(token.as_bytes());
                found |= eq;
                at.conditional_assign(&(i as u32), eq);
            }
            bool::from(found).then_some(at)
        };
        [
            (Caller::Signaling, &self.signaling),
            (Caller::Relay, &self.relay),
            (Caller::Admin, &self.admin),
            (Caller::Peer, &self.peer),
        ]
        .into_iter()
        .find_map(|(role, set)| find(set).map(|i| (role, i)))
    }

    /// Checks that `metadata` authenticates a caller allowed to act as `needed`; returns which
    /// of the role's credentials it presented ([`Credential::Open`] for a role without tokens).
    pub fn check(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        needed: Caller,
    ) -> Result<Credential, Status> {
        let required = match needed {
            Caller::Signaling => &self.signaling,
            Caller::Relay => &self.relay,
            Caller::Admin => &self.admin,
            Caller::Peer => &self.peer,
        };
        if required.is_empty() {
            if needed == Caller::Peer && !self.peer_open {
                return Err(errors::simple(
                    Code::PermissionDenied,
                    "this replica takes no peers: it has no --peer-tokens",
                    Reason::ReplicationOff,
                ));
            }
            return Ok(Credential::Open);
        }
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                errors::simple(
                    Code::Unauthenticated,
                    "missing bearer token",
                    Reason::CredentialMissing,
                )
            })?;
        match self.role_of(token) {
            Some((role, i)) if role == needed => Ok(Credential::Token(i)),
            Some(_) => Err(errors::simple(
                Code::PermissionDenied,
                "this credential may not call this service",
                Reason::CredentialWrongRole,
            )),
            None => Err(errors::simple(
                Code::Unauthenticated,
                "invalid bearer token",
                Reason::CredentialInvalid,
            )),
        }
    }
}

/// `veil.v1.SessionService`.
#[derive(Debug, Clone)]
pub struct SessionApi {
    pub(crate) controller: Arc<Controller>,
    pub(crate) auth: Auth,
    /// The peer replicas, when there are any.
    pub(crate) peers: Option<Arc<crate::replica::Peers>>,
}

impl SessionApi {
    /// The peer that owns `call_id` now, when this request is to be forwarded there.
    fn owner_of<T>(
        &self,
        request: &Request<T>,
        call_id: &str,
    ) -> Option<Arc<crate::replica::PeerLink>> {
        let peers = self.peers.as_ref()?;
        if crate::replica::is_forwarded(request) {
            return None;
        }
        peers.owner(call_id)
    }

    /// Pushes session `id`, changed here, to the peer replicas before the caller hears back.
    async fn replicate(&self, id: u64) {
        if let Some(peers) = &self.peers
            && let Some(rec) = self.controller.record(id)
        {
            peers.replicate(rec).await;
        }
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<Credential, Status> {
        self.auth
            .check(req.metadata(), Caller::Signaling)
            .inspect_err(|_| {
                self.controller
                    .metrics
                    .count_auth_failure(AuthService::Session);
            })
    }

    /// Counts a quota refusal for `who`, and passes it on.
    fn refused(&self, who: Credential, e: Exceeded) -> Exceeded {
        let c = &self.controller;
        c.metrics.count_quota_refusal(e.quota, c.quotas.label(who));
        tracing::debug!(
            quota = e.quota.as_str(),
            credential = c.quotas.label(who),
            "quota refusal"
        );
        e
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::SessionEvent, Status>> + Send + 'static>>;

fn now_ts() -> prost_types::Timestamp {
    let ms = crate::state::unix_ms();
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// The session with what each leg is doing, as the relays report it here (GetSession, and
/// WatchSession's snapshots).
fn with_activity(controller: &Controller, s: &crate::state::Session) -> pb::Session {
    let mut out = s.to_pb();
    for leg in &mut out.legs {
        let index = u8::try_from(leg.leg_index).unwrap_or(u8::MAX);
        leg.activity = Some(controller.legs.activity(s.id, index));
    }
    out
}

fn role_of(session: &crate::state::Session, node_id: &str) -> pb::RelayRole {
    match session.relays.iter().find(|(r, _)| r.node_id == node_id) {
        Some((_, Role::Primary)) => pb::RelayRole::Primary,
        Some((_, Role::Backup)) => pb::RelayRole::Backup,
        None => pb::RelayRole::Unspecified,
    }
}

/// A leg event for a watcher of `session`.
fn leg_event(session: &crate::state::Session, news: crate::legs::LegNews) -> pb::SessionEvent {
    use crate::legs::NewsKind;
    use pb::session_event::Kind;
    let (kind, from, reason) = match news.kind {
        NewsKind::Bound => (Kind::LegBound, String::new(), pb::LegEndReason::Unspecified),
        NewsKind::Moved { from } => (Kind::LegMoved, from, pb::LegEndReason::Unspecified),
        NewsKind::Unbound(why) => (Kind::LegUnbound, String::new(), why),
    };
    let mut ev = event(kind);
    ev.leg = Some(pb::LegEvent {
        leg_index: u32::from(news.leg),
        participant_id: session.participant_of(news.leg).unwrap_or_default(),
        role: role_of(session, &news.node_id) as i32,
        node_id: news.node_id,
        transport: news.transport as i32,
        from_node_id: from,
        reason: reason as i32,
    });
    ev
}

fn event(kind: pb::session_event::Kind) -> pb::SessionEvent {
    pb::SessionEvent {
        kind: kind as i32,
        at: Some(now_ts()),
        ..Default::default()
    }
}

/// What a WatchSession stream hears, subscribed to before the session is read.
struct Feeds {
    relays: tokio::sync::broadcast::Receiver<RelayEvent>,
    releases: tokio::sync::broadcast::Receiver<u64>,
    changes: tokio::sync::broadcast::Receiver<(u64, SessionChange)>,
    /// With `leg_events` only.
    legs: Option<tokio::sync::broadcast::Receiver<crate::legs::LegNews>>,
}

/// Feeds one WatchSession stream until the session ends or the watcher goes; the stream counts
/// against its credential's quota until then (`_permit`).
async fn watch(
    _permit: crate::quota::WatchPermit,
    controller: Arc<Controller>,
    session: Arc<crate::state::Session>,
    feeds: Feeds,
    tx: mpsc::Sender<Result<pb::SessionEvent, Status>>,
) {
    let Feeds {
        mut relays,
        mut releases,
        mut changes,
        mut legs,
    } = feeds;
    use pb::session_event::Kind;
    use tokio::sync::broadcast::error::RecvError;
    let left = |s: &crate::state::Session| {
        std::time::Duration::from_millis(
            s.expires_unix_ms().saturating_sub(crate::state::unix_ms()),
        )
    };
    let expiry = tokio::time::sleep(left(&session));
    tokio::pin!(expiry);
    let mut snapshot = event(Kind::Snapshot);
    snapshot.session = Some(with_activity(&controller, &session));
    if tx.send(Ok(snapshot)).await.is_err() {
        return;
    }
    // Legs removed so far: a participant change that removes another is told as LEG_REMOVED.
    let mut removed = session.removed_legs();
    if session.is_released() {
        let _ = tx.send(Ok(event(Kind::Released))).await;
        return;
    }
    loop {
        let out = tokio::select! {
            e = relays.recv() => match e {
                Ok(RelayEvent { node_id, change }) => {
                    let Some((_, role)) = session.relays.iter().find(|(r, _)| r.node_id == node_id) else { continue };
                    let kind = match change {
                        Change::Down => Kind::RelayDown,
                        Change::Up => Kind::RelayUp,
                        Change::Draining => Kind::RelayDraining,
                        Change::Undrained => Kind::RelayUndrained,
                    };
                    let mut ev = event(kind);
                    ev.node_id = node_id;
                    ev.role = match role {
                        Role::Primary => pb::RelayRole::Primary,
                        Role::Backup => pb::RelayRole::Backup,
                    } as i32;
                    ev
                }
                // Missed events: the watcher gets a fresh snapshot instead.
                Err(RecvError::Lagged(_)) => {
                    let mut ev = event(Kind::Snapshot);
                    ev.session = Some(with_activity(&controller, &session));
                    ev
                }
                Err(RecvError::Closed) => return,
            },
            n = async {
                match legs.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => match n {
                Ok(news) if news.session == session.id => leg_event(&session, news),
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) => {
                    let mut ev = event(Kind::Snapshot);
                    ev.session = Some(with_activity(&controller, &session));
                    ev
                }
                Err(RecvError::Closed) => return,
            },
            r = releases.recv() => match r {
                Ok(id) if id == session.id => {
                    let _ = tx.send(Ok(event(Kind::Released))).await;
                    return;
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) if session.is_released() => {
                    let _ = tx.send(Ok(event(Kind::Released))).await;
                    return;
                }
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            },
            c = changes.recv() => {
                let kind = match c {
                    Ok((id, _)) if id != session.id => continue,
                    Ok((_, SessionChange::Extended)) => Kind::Extended,
                    // A participant change of this session, or missed changes (the session as
                    // it is now says all of them, its expiry included).
                    Ok((_, SessionChange::Participants)) | Err(RecvError::Lagged(_)) => {
                        Kind::ParticipantsChanged
                    }
                    Err(RecvError::Closed) => return,
                };
                expiry.as_mut().reset(tokio::time::Instant::now() + left(&session));
                if legs.is_some() {
                    let now_removed = session.removed_legs();
                    for &index in now_removed.iter().filter(|i| !removed.contains(i)) {
                        let mut ev = event(Kind::LegRemoved);
                        ev.leg = Some(pb::LegEvent {
                            leg_index: u32::from(index),
                            participant_id: session.participant_of(index).unwrap_or_default(),
                            ..Default::default()
                        });
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    removed = now_removed;
                }
                let mut ev = event(kind);
                ev.session = Some(session.to_pb());
                ev
            }
            _ = &mut expiry => {
                // Extended since the timer was set, with the change missed: not over yet.
                if !left(&session).is_zero() {
                    expiry.as_mut().reset(tokio::time::Instant::now() + left(&session));
                    continue;
                }
                let _ = tx.send(Ok(event(Kind::Expired))).await;
                return;
            }
            _ = tx.closed() => return,
            _ = controller.stopping() => return,
        };
        if tx.send(Ok(out)).await.is_err() {
            return;
        }
    }
}

#[tonic::async_trait]
impl pb::session_service_server::SessionService for SessionApi {
    type WatchSessionStream = EventStream;

    async fn watch_session(
        &self,
        request: Request<pb::WatchSessionRequest>,
    ) -> Result<Response<Self::WatchSessionStream>, Status> {
        let who = self.authorize(&request)?;
        let id = api::parse_session_id(&request.get_ref().session_id)?;
        // Subscribe before reading the session, so that nothing happens unseen in between.
        let relays = self.controller.registry.subscribe();
        let releases = self.controller.subscribe_releases();
        let changes = self.controller.subscribe_changes();
        let legs = request
            .get_ref()
            .leg_events
            .then(|| self.controller.legs.subscribe());
        let session = self.controller.get(id)?;
        let permit = self
            .controller
            .quotas
            .watch(who)
            .map_err(|e| self.refused(who, e))?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(watch(
            permit,
            self.controller.clone(),
            session,
            Feeds {
                relays,
                releases,
                changes,
                legs,
            },
            tx,
        ));
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as EventStream
        ))
    }

    async fn allocate_session(
        &self,
        request: Request<pb::AllocateSessionRequest>,
    ) -> Result<Response<pb::AllocateSessionResponse>, Status> {
        let who = self.authorize(&request)?;
        if let Some(owner) = self.owner_of(&request, &request.get_ref().call_id)
            && let Some(answer) = self
                .peers
                .as_ref()
                .expect("an owner comes from peers")
                .forward(&owner, "AllocateSession", &request, |mut c, r| async move {
                    c.allocate_session(r).await
                })
                .await
        {
            return answer;
        }
        let started = Instant::now();
        let m = &self.controller.metrics;
        // The rate first: a caller past it costs no validation, and every call counts, valid or
        // not, new or a retry.
        let result = self
            .controller
            .quotas
            .allocation(who, started)
            .map_err(AllocateError::from)
            .and_then(|()| {
                AllocateRequest::try_from(request.into_inner()).map_err(AllocateError::from)
            })
            .and_then(|req| self.controller.allocate(req, who));
        m.allocation_latency
            .observe(started.elapsed().as_secs_f64());
        m.count_allocation(match &result {
            Ok((_, true)) => AllocationResult::Created,
            Ok((_, false)) => AllocationResult::Existing,
            Err(AllocateError::Invalid(_)) => AllocationResult::Invalid,
            Err(AllocateError::Conflict | AllocateError::Released) => AllocationResult::Conflict,
            Err(AllocateError::NoRelay(_)) => AllocationResult::Unavailable,
            Err(AllocateError::Quota(_)) => AllocationResult::Quota,
        });
        let result = result.map_err(|e| match e {
            AllocateError::Quota(q) => AllocateError::Quota(self.refused(who, q)),
            e => e,
        });
        let (session, created) = result?;
        if created {
            self.replicate(session.id).await;
        }
        Ok(Response::new(pb::AllocateSessionResponse {
            session: Some(session.to_pb()),
            created,
        }))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        self.authorize(&request)?;
        let id = api::parse_session_id(&request.get_ref().session_id)?;
        let session = self.controller.get(id)?;
        Ok(Response::new(pb::GetSessionResponse {
            session: Some(with_activity(&self.controller, &session)),
        }))
    }

    async fn add_participant(
        &self,
        request: Request<pb::AddParticipantRequest>,
    ) -> Result<Response<pb::AddParticipantResponse>, Status> {
        self.authorize(&request)?;
        // Forwarded to the call's owner, which alone mints its new legs' indices.
        if let Ok(id) = api::parse_session_id(&request.get_ref().session_id)
            && let Ok(s) = self.controller.get(id)
            && let Some(owner) = self.owner_of(&request, &s.call_id)
            && let Some(answer) = self
                .peers
                .as_ref()
                .expect("an owner comes from peers")
                .forward(&owner, "AddParticipant", &request, |mut c, r| async move {
                    c.add_participant(r).await
                })
                .await
        {
            return answer;
        }
        let req = api::AddRequest::try_from(request.into_inner())?;
        let out = self
            .controller
            .add_participant(req.session_id, req.participant)?;
        if out.changed {
            self.replicate(req.session_id).await;
        }
        Ok(Response::new(pb::AddParticipantResponse {
            session: Some(out.session),
            leg: Some(out.leg),
            created: out.changed,
        }))
    }

    async fn remove_participant(
        &self,
        request: Request<pb::RemoveParticipantRequest>,
    ) -> Result<Response<pb::RemoveParticipantResponse>, Status> {
        self.authorize(&request)?;
        let req = api::RemoveRequest::try_from(request.into_inner())?;
        let out = self
            .controller
            .remove_participant(req.session_id, &req.participant_id)?;
        if out.changed {
            self.replicate(req.session_id).await;
        }
        Ok(Response::new(pb::RemoveParticipantResponse {
            session: Some(out.session),
        }))
    }

    async fn extend_session(
        &self,
        request: Request<pb::ExtendSessionRequest>,
    ) -> Result<Response<pb::ExtendSessionResponse>, Status> {
        self.authorize(&request)?;
        let req = api::ExtendRequest::try_from(request.into_inner())?;
        let session = self.controller.extend(req.session_id, req.ttl)?;
        self.replicate(session.id).await;
        Ok(Response::new(pb::ExtendSessionResponse {
            session: Some(session.to_pb()),
        }))
    }

    async fn release_session(
        &self,
        request: Request<pb::ReleaseSessionRequest>,
    ) -> Result<Response<pb::ReleaseSessionResponse>, Status> {
        self.authorize(&request)?;
        let m = &self.controller.metrics;
        let id = api::parse_session_id(&request.get_ref().session_id)
            .inspect_err(|_| m.count_release(ReleaseResult::Invalid))?;
        let session = self
            .controller
            .release(id)
            .inspect_err(|_| m.count_release(ReleaseResult::NotFound))?;
        m.count_release(ReleaseResult::Released);
        self.replicate(session.id).await;
        Ok(Response::new(pb::ReleaseSessionResponse {
            session: Some(session.to_pb()),
        }))
    }
}

/// `veil.v1.RelayRegistry`.
#[derive(Debug, Clone)]
pub struct RegistryApi {
    pub(crate) controller: Arc<Controller>,
    pub(crate) auth: Auth,
    /// Where relays may advertise addresses (`--relay-networks`).
    pub(crate) networks: Arc<crate::config::RelayNetworks>,
}

/// Checks that every address `h` advertises lies in the networks relay `h.node_id` may
/// advertise: its UDP, QUIC and TURN over TCP addresses, and its TURN over TLS host where that is
/// an IP address (a DNS name is proven to clients by the certificate they check instead). The
/// error names the field, never the address.
fn check_addresses(
    networks: &crate::config::RelayNetworks,
    h: &pb::RelayHello,
) -> Result<(), Status> {
    use std::net::SocketAddr;
    if networks.is_empty() {
        return Ok(());
    }
    let tls_ip = h.turn_tls_address.rsplit_once(':').and_then(|(host, _)| {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .ok()
    });
    let fields = [
        (
            "udp_address",
            h.udp_address.parse::<SocketAddr>().ok().map(|a| a.ip()),
        ),
        (
            "quic_address",
            h.quic_address.parse::<SocketAddr>().ok().map(|a| a.ip()),
        ),
        (
            "turn_tcp_address",
            h.turn_tcp_address
                .parse::<SocketAddr>()
                .ok()
                .map(|a| a.ip()),
        ),
        ("turn_tls_address", tls_ip),
    ];
    for (field, ip) in fields {
        if let Some(ip) = ip
            && !networks.admits(&h.node_id, ip)
        {
            return Err(errors::simple(
                Code::PermissionDenied,
                format!(
                    "hello.{field} is outside the networks this relay may advertise \
                     (--relay-networks)"
                ),
                Reason::RelayAddressNotAllowed,
            ));
        }
    }
    Ok(())
}

type OutStream =
    Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send + 'static>>;

fn check_hello(h: &pb::RelayHello) -> Result<(), Status> {
    use std::net::SocketAddr;
    let bad = |field, violation, message| Err(errors::invalid_field(field, violation, message));
    if h.node_id.is_empty()
        || h.node_id.len() > api::MAX_ID_LEN
        || h.node_id.chars().any(char::is_control)
    {
        let violation = if h.node_id.is_empty() {
            Violation::Empty
        } else if h.node_id.len() > api::MAX_ID_LEN {
            Violation::TooLong
        } else {
            Violation::ControlCharacters
        };
        return bad(
            "hello.node_id",
            violation,
            "hello.node_id must be 1 to 128 bytes without control characters",
        );
    }
    if h.udp_address.parse::<SocketAddr>().is_err() {
        return bad(
            "hello.udp_address",
            Violation::Format,
            "hello.udp_address must be ip:port",
        );
    }
    if !h.quic_address.is_empty() && h.quic_address.parse::<SocketAddr>().is_err() {
        return bad(
            "hello.quic_address",
            Violation::Format,
            "hello.quic_address must be empty or ip:port",
        );
    }
    if !h.turn_tcp_address.is_empty()
        && (!h.turn_udp || h.turn_tcp_address.parse::<SocketAddr>().is_err())
    {
        return bad(
            "hello.turn_tcp_address",
            if h.turn_udp {
                Violation::Format
            } else {
                Violation::Requires
            },
            "hello.turn_tcp_address must be empty or ip:port, and needs hello.turn_udp",
        );
    }
    if !h.turn_tls_address.is_empty() && (!h.turn_udp || !valid_host_port(&h.turn_tls_address)) {
        return bad(
            "hello.turn_tls_address",
            if h.turn_udp {
                Violation::Format
            } else {
                Violation::Requires
            },
            "hello.turn_tls_address must be empty or host:port, and needs hello.turn_udp",
        );
    }
    if h.capacity_legs == 0 {
        return bad(
            "hello.capacity_legs",
            Violation::OutOfRange,
            "hello.capacity_legs must be at least 1",
        );
    }
    Ok(())
}

/// True for `ip:port`, `[ipv6]:port` or `dns-name:port`: what may follow `turns:` in a URL.
fn valid_host_port(s: &str) -> bool {
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    port.parse::<u16>().is_ok_and(|p| p != 0)
        && !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[tonic::async_trait]
impl pb::relay_registry_server::RelayRegistry for RegistryApi {
    type AttachStream = OutStream;

    async fn attach(
        &self,
        request: Request<Streaming<pb::RelayMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let who = self
            .auth
            .check(request.metadata(), Caller::Relay)
            .inspect_err(|_| {
                self.controller
                    .metrics
                    .count_auth_failure(AuthService::Registry);
            })?;
        let mut inbound = request.into_inner();
        let Some(pb::RelayMessage {
            kind: Some(pb::relay_message::Kind::Hello(hello)),
        }) = inbound.message().await?
        else {
            return Err(errors::simple(
                Code::InvalidArgument,
                "the first message must be a RelayHello",
                Reason::HelloRequired,
            ));
        };
        check_hello(&hello)?;
        // Before anything of the hello is believed: an impostor gets no sessions, no
        // revocations, and its addresses go nowhere.
        self.auth
            .admits_node(who, &hello.node_id)
            .inspect_err(|_| {
                self.controller
                    .metrics
                    .count_auth_failure(AuthService::Registry);
                tracing::warn!(
                    "relay refused: its credential may not register the node_id it names"
                );
            })?;
        check_addresses(&self.networks, &hello).inspect_err(|e| {
            self.controller
                .metrics
                .count_auth_failure(AuthService::Registry);
            tracing::warn!(node_id = %hello.node_id, error = %e.message(), "relay refused");
        })?;
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let node_id = hello.node_id.clone();
        // Weak: the link's sender is the registry's, whose dropping ends the stream (a detach,
        // shutdown); this one only tells the relay why its own stream failed.
        let reply = tx.downgrade();
        let catch_up = tx.clone();
        let link = self.controller.registry.attach(&hello, tx);
        // Then everything revoked or extended so far, so that a relay that missed some
        // (restarted, or cut off) catches up. Read after the link is in the registry, so that
        // nothing revoked or extended in between is missed: both are idempotent, and a relay
        // applies them in any order to the same end.
        let revoked = self.controller.revocations();
        let extended = self.controller.extensions();
        let catch_up_msgs = [
            (!revoked.sessions.is_empty() || !revoked.legs.is_empty())
                .then_some(pb::controller_message::Kind::Revoke(revoked)),
            (!extended.sessions.is_empty())
                .then_some(pb::controller_message::Kind::Extend(extended)),
        ];
        for kind in catch_up_msgs.into_iter().flatten() {
            let msg = pb::ControllerMessage { kind: Some(kind) };
            if catch_up.try_send(Ok(msg)).is_err() {
                self.controller.registry.detach(&node_id, link);
                return Err(Status::internal("fresh link queue full"));
            }
        }
        drop(catch_up);
        tracing::info!(node_id = %node_id, region = %hello.region, "relay attached");
        let controller = self.controller.clone();
        let instance = hello.instance_id;
        controller.legs.relay_attached(&node_id, instance);
        tokio::spawn(async move {
            // The bindings of a snapshot split over several messages, until its last.
            let mut listed = Vec::new();
            loop {
                match inbound.message().await {
                    Ok(Some(pb::RelayMessage {
                        kind: Some(pb::relay_message::Kind::Load(load)),
                    })) => {
                        controller.registry.report(&node_id, load);
                    }
                    Ok(Some(pb::RelayMessage {
                        kind: Some(pb::relay_message::Kind::LegChanges(c)),
                    })) => {
                        for change in &c.changes {
                            let Some(b) = &change.binding else { continue };
                            let word = if change.bound {
                                crate::legs::Word::Bound
                            } else {
                                crate::legs::Word::Unbound(
                                    pb::LegEndReason::try_from(change.reason)
                                        .unwrap_or(pb::LegEndReason::Unknown),
                                )
                            };
                            controller.legs.report(&node_id, instance, b, word);
                        }
                    }
                    Ok(Some(pb::RelayMessage {
                        kind: Some(pb::relay_message::Kind::LegSnapshot(snap)),
                    })) => {
                        controller.legs.snapshot(
                            &node_id,
                            instance,
                            &snap.bindings,
                            &mut listed,
                            snap.complete,
                        );
                    }
                    Ok(Some(_)) => {
                        tracing::debug!(node_id = %node_id, "unexpected relay message ignored")
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(node_id = %node_id, error = %e, "relay stream failed");
                        // A message the relay sent that did not decode, or was too large: the
                        // relay hears why (crate::malformed gives it the right code) before
                        // its stream ends. Anything else (it went away) has nobody to tell.
                        if let Some(tx) = reply.upgrade() {
                            let _ = tx.try_send(Err(e));
                        }
                        break;
                    }
                }
            }
            controller.registry.detach(&node_id, link);
            if controller
                .registry
                .view(&node_id)
                .is_some_and(|v| v.health == crate::registry::Health::Down)
            {
                controller.legs.relay_down(&node_id);
            }
            tracing::info!(node_id = %node_id, "relay detached");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as OutStream))
    }
}

/// `veil.v1.AdminService`.
#[derive(Debug, Clone)]
pub struct AdminApi {
    pub(crate) controller: Arc<Controller>,
    pub(crate) auth: Auth,
}

impl AdminApi {
    fn authorize<T>(&self, req: &Request<T>) -> Result<Credential, Status> {
        self.auth
            .check(req.metadata(), Caller::Admin)
            .inspect_err(|_| {
                self.controller
                    .metrics
                    .count_auth_failure(AuthService::Admin);
            })
    }
}

/// Longest drain deadline an operator may ask for.
pub const MAX_DRAIN_DEADLINE_SECS: u32 = 86_400;

fn relay_status(v: &crate::registry::RelayView) -> pb::RelayStatus {
    let i = &v.info;
    pb::RelayStatus {
        hello: Some(pb::RelayHello {
            node_id: i.node_id.clone(),
            region: i.region.clone(),
            zone: i.zone.clone(),
            udp_address: i.udp_address.clone(),
            quic_address: i.quic_address.clone(),
            quic_cert_sha256: i.quic_cert_sha256.clone(),
            capacity_legs: i.capacity_legs,
            key_ids: Vec::new(),
            instance_id: i.instance_id,
            draining: v.load.draining,
            turn_udp: i.turn_udp,
            turn_tcp_address: i.turn_tcp_address.clone(),
            turn_tls_address: i.turn_tls_address.clone(),
        }),
        up: v.health == crate::registry::Health::Up,
        draining: v.draining,
        load: Some(v.load),
        last_seen_ms_ago: v.last_seen.elapsed().as_millis() as u64,
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn drain_relay(
        &self,
        request: Request<pb::DrainRelayRequest>,
    ) -> Result<Response<pb::DrainRelayResponse>, Status> {
        self.authorize(&request)?;
        let pb::DrainRelayRequest {
            node_id,
            draining,
            deadline_seconds,
        } = request.into_inner();
        if node_id.is_empty() {
            return Err(errors::invalid_field(
                "node_id",
                Violation::Empty,
                "node_id must not be empty",
            ));
        }
        if deadline_seconds > MAX_DRAIN_DEADLINE_SECS {
            return Err(errors::invalid_field(
                "deadline_seconds",
                Violation::OutOfRange,
                format!("deadline_seconds must be at most {MAX_DRAIN_DEADLINE_SECS}"),
            ));
        }
        let order = draining.then_some(deadline_seconds);
        let view = self
            .controller
            .registry
            .order_drain(&node_id, order)
            .ok_or_else(|| {
                errors::status(
                    Code::NotFound,
                    "no relay with this node_id",
                    Reason::RelayNotFound,
                    &[],
                    vec![
                        tonic_types::ResourceInfo::new(
                            "veil.v1.Relay",
                            "",
                            "",
                            "no relay with this node_id is attached to this controller replica",
                        )
                        .into(),
                    ],
                )
            })?;
        tracing::info!(node_id = %node_id, draining, deadline_seconds, "drain ordered");
        Ok(Response::new(pb::DrainRelayResponse {
            relay: Some(relay_status(&view)),
        }))
    }

    async fn list_relays(
        &self,
        request: Request<pb::ListRelaysRequest>,
    ) -> Result<Response<pb::ListRelaysResponse>, Status> {
        self.authorize(&request)?;
        let relays = self
            .controller
            .registry
            .views()
            .iter()
            .map(relay_status)
            .collect();
        Ok(Response::new(pb::ListRelaysResponse { relays }))
    }
}
