//! The gRPC services: thin adapters from tonic to [`Controller`], plus caller authentication.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use veil_proto::v1 as pb;

use crate::api::{self, AllocateError, AllocateRequest};
use crate::registry::LINK_QUEUE;
use crate::state::Controller;

/// Who a caller is, by the bearer token it presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A signaling service: may use `SessionService`.
    Signaling,
    /// A relay: may use `RelayRegistry`.
    Relay,
}

/// Bearer-token authentication. With no tokens configured for a role, that role's services are
/// open (for local development); otherwise a call must carry `authorization: Bearer <token>`
/// with one of the role's tokens.
#[derive(Clone, Default)]
pub struct Auth {
    signaling: Vec<String>,
    relay: Vec<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("signaling_tokens", &self.signaling.len())
            .field("relay_tokens", &self.relay.len())
            .finish()
    }
}

impl Auth {
    /// Tokens accepted from signaling services and from relays.
    pub fn new(signaling: Vec<String>, relay: Vec<String>) -> Self {
        Self { signaling, relay }
    }

    fn role_of(&self, token: &str) -> Option<Caller> {
        use subtle::ConstantTimeEq;
        let matches = |set: &[String]| {
            set.iter().fold(false, |acc, t| {
                acc | bool::from(t.as_bytes().ct_eq(token.as_bytes()))
            })
        };
        if matches(&self.signaling) {
            Some(Caller::Signaling)
        } else if matches(&self.relay) {
            Some(Caller::Relay)
        } else {
            None
        }
    }

    /// Checks that `metadata` authenticates a caller allowed to act as `needed`.
    pub fn check(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        needed: Caller,
    ) -> Result<(), Status> {
        let required = match needed {
            Caller::Signaling => &self.signaling,
            Caller::Relay => &self.relay,
        };
        if required.is_empty() {
            return Ok(());
        }
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
        match self.role_of(token) {
            Some(role) if role == needed => Ok(()),
            Some(_) => Err(Status::permission_denied(
                "this credential may not call this service",
            )),
            None => Err(Status::unauthenticated("invalid bearer token")),
        }
    }
}

/// `veil.v1.SessionService`.
#[derive(Debug, Clone)]
pub struct SessionApi {
    pub(crate) controller: Arc<Controller>,
    pub(crate) auth: Auth,
}

impl SessionApi {
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.auth
            .check(req.metadata(), Caller::Signaling)
            .inspect_err(|_| {
                self.controller
                    .metrics
                    .auth_failures
                    .with_label_values(&["session"])
                    .inc();
            })
    }
}

#[tonic::async_trait]
impl pb::session_service_server::SessionService for SessionApi {
    async fn allocate_session(
        &self,
        request: Request<pb::AllocateSessionRequest>,
    ) -> Result<Response<pb::AllocateSessionResponse>, Status> {
        self.authorize(&request)?;
        let started = Instant::now();
        let m = &self.controller.metrics;
        let result = AllocateRequest::try_from(request.into_inner())
            .map_err(AllocateError::from)
            .and_then(|req| self.controller.allocate(req));
        m.allocation_latency
            .observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok((_, true)) => "created",
            Ok((_, false)) => "existing",
            Err(AllocateError::Invalid(_)) => "invalid",
            Err(AllocateError::Conflict | AllocateError::Released) => "conflict",
            Err(AllocateError::NoRelay(_)) => "unavailable",
        };
        m.allocations.with_label_values(&[label]).inc();
        let (session, created) = result?;
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
            session: Some(session.to_pb()),
        }))
    }

    async fn release_session(
        &self,
        request: Request<pb::ReleaseSessionRequest>,
    ) -> Result<Response<pb::ReleaseSessionResponse>, Status> {
        self.authorize(&request)?;
        let releases = &self.controller.metrics.releases;
        let id = api::parse_session_id(&request.get_ref().session_id).inspect_err(|_| {
            releases.with_label_values(&["invalid"]).inc();
        })?;
        let session = self.controller.release(id).inspect_err(|_| {
            releases.with_label_values(&["not_found"]).inc();
        })?;
        releases.with_label_values(&["released"]).inc();
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
}

type OutStream =
    Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send + 'static>>;

fn check_hello(h: &pb::RelayHello) -> Result<(), Status> {
    if h.node_id.is_empty()
        || h.node_id.len() > api::MAX_ID_LEN
        || h.node_id.chars().any(char::is_control)
    {
        return Err(Status::invalid_argument(
            "hello.node_id must be 1 to 128 bytes without control characters",
        ));
    }
    if h.udp_address.parse::<std::net::SocketAddr>().is_err() {
        return Err(Status::invalid_argument(
            "hello.udp_address must be ip:port",
        ));
    }
    if !h.quic_address.is_empty() && h.quic_address.parse::<std::net::SocketAddr>().is_err() {
        return Err(Status::invalid_argument(
            "hello.quic_address must be empty or ip:port",
        ));
    }
    if h.capacity_legs == 0 {
        return Err(Status::invalid_argument(
            "hello.capacity_legs must be at least 1",
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl pb::relay_registry_server::RelayRegistry for RegistryApi {
    type AttachStream = OutStream;

    async fn attach(
        &self,
        request: Request<Streaming<pb::RelayMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        self.auth
            .check(request.metadata(), Caller::Relay)
            .inspect_err(|_| {
                self.controller
                    .metrics
                    .auth_failures
                    .with_label_values(&["registry"])
                    .inc();
            })?;
        let mut inbound = request.into_inner();
        let Some(pb::RelayMessage {
            kind: Some(pb::relay_message::Kind::Hello(hello)),
        }) = inbound.message().await?
        else {
            return Err(Status::invalid_argument(
                "the first message must be a RelayHello",
            ));
        };
        check_hello(&hello)?;
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        // Everything revoked so far goes first, so a relay that missed revocations (restarted,
        // or cut off) catches up before anything else.
        let revoked = self.controller.revocations();
        if !revoked.is_empty() {
            let msg = pb::ControllerMessage {
                kind: Some(pb::controller_message::Kind::Revoke(pb::Revoke {
                    sessions: revoked,
                })),
            };
            tx.try_send(Ok(msg))
                .map_err(|_| Status::internal("fresh link queue full"))?;
        }
        let node_id = hello.node_id.clone();
        let link = self.controller.registry.attach(&hello, tx);
        tracing::info!(node_id = %node_id, region = %hello.region, "relay attached");
        let controller = self.controller.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(pb::RelayMessage {
                        kind: Some(pb::relay_message::Kind::Load(load)),
                    })) => {
                        controller.registry.report(&node_id, load);
                    }
                    Ok(Some(_)) => {
                        tracing::debug!(node_id = %node_id, "unexpected relay message ignored")
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(node_id = %node_id, error = %e, "relay stream failed");
                        break;
                    }
                }
            }
            controller.registry.detach(&node_id, link);
            tracing::info!(node_id = %node_id, "relay detached");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as OutStream))
    }
}
