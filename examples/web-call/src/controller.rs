//! The Veil controller, as this server uses it: `AllocateSession` when a room has two
//! participants, `ReleaseSession` when it ends.

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use veil_proto::v1 as pb;
use veil_proto::v1::session_service_client::SessionServiceClient;

/// The participant ids of a room's call, in join order. Opaque to Veil: they only match legs
/// to participants in the answer.
const PARTICIPANTS: [&str; 2] = ["first", "second"];

/// One TURN server of a leg, serialised exactly as the W3C `RTCIceServer` dictionary, for the
/// page to pass straight to `new RTCPeerConnection`.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub(crate) struct IceServer {
    urls: Vec<String>,
    username: String,
    credential: String,
}

impl From<&pb::IceServer> for IceServer {
    fn from(s: &pb::IceServer) -> Self {
        Self {
            urls: s.urls.clone(),
            username: s.username.clone(),
            credential: s.credential.clone(),
        }
    }
}

/// Without the username and credential: they are the participant's secret, and stay out of
/// any log line that formats one.
impl fmt::Debug for IceServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IceServer")
            .field("urls", &self.urls)
            .finish_non_exhaustive()
    }
}

/// A two-participant call allocated on Veil.
#[derive(Debug)]
pub(crate) struct Call {
    /// Veil's session id: what `ReleaseSession` takes. Not a secret (it grants nothing without
    /// the controller's signaling token), so it may be logged.
    pub(crate) session_id: String,
    /// Each participant's own leg's TURN servers, in join order.
    pub(crate) ice_servers: [Vec<IceServer>; 2],
}

/// A client of the controller's SessionService.
#[derive(Debug, Clone)]
pub(crate) struct Controller {
    api: SessionServiceClient<Channel>,
    /// `Bearer <token>`, marked sensitive so that no `Debug` prints it.
    authorization: Option<AsciiMetadataValue>,
    ttl_secs: u32,
}

impl Controller {
    /// A client for the controller at `url`. It connects on first use (and reconnects by
    /// itself), so this server starts even while the controller is down; each call waits 5 s at
    /// most.
    pub(crate) fn new(url: &str, token: Option<&str>, ttl_secs: u32) -> anyhow::Result<Self> {
        // This example links tonic without TLS: across a network, add tonic's `tls-ring`
        // feature (and `Endpoint::tls_config`), or let a service mesh carry the TLS.
        if !url.starts_with("http://") {
            anyhow::bail!("--controller {url:?}: this example speaks plaintext gRPC: http://...");
        }
        let endpoint = Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("--controller {url:?} is not a URL"))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(5));
        let authorization = token
            .map(|t| {
                let mut v: AsciiMetadataValue = format!("Bearer {t}")
                    .parse()
                    .ok()
                    .context("--controller-token is not valid header text")?;
                v.set_sensitive(true);
                anyhow::Ok(v)
            })
            .transpose()?;
        Ok(Self {
            api: SessionServiceClient::new(endpoint.connect_lazy()),
            authorization,
            ttl_secs,
        })
    }

    /// Allocates a session for a two-participant call.
    pub(crate) async fn allocate(&self) -> Result<Call, Status> {
        let request = pb::AllocateSessionRequest {
            // A fresh id per call: a room name is reused, and a released call id stays taken.
            call_id: format!("web-call-{}", crate::random_id()),
            participants: PARTICIPANTS
                .iter()
                .map(|id| pb::Participant {
                    participant_id: (*id).to_owned(),
                    region: String::new(),
                    preferred_transport: pb::Transport::Unspecified.into(),
                })
                .collect(),
            ttl_seconds: self.ttl_secs,
        };
        let session = self
            .api
            .clone()
            .allocate_session(self.request(request))
            .await?
            .into_inner()
            .session
            .ok_or_else(|| Status::internal("the controller's answer carries no session"))?;
        // Match legs to participants by id rather than trusting the order.
        let ice_servers = |id: &str| {
            session
                .legs
                .iter()
                .find(|leg| leg.participant_id == id)
                .map(|leg| leg.ice_servers.iter().map(IceServer::from).collect())
                .filter(|servers: &Vec<IceServer>| !servers.is_empty())
        };
        let (Some(first), Some(second)) =
            (ice_servers(PARTICIPANTS[0]), ice_servers(PARTICIPANTS[1]))
        else {
            // Allocated, but of no use to a browser: hand it back at once.
            let _ = self.release(&session.session_id).await;
            return Err(Status::failed_precondition(
                "no relay of the session serves TURN (relays started with --turn false?)",
            ));
        };
        Ok(Call {
            session_id: session.session_id,
            ice_servers: [first, second],
        })
    }

    /// Releases a session: its relays stop forwarding within a second and its credentials stop
    /// working. Releasing a released session succeeds.
    pub(crate) async fn release(&self, session_id: &str) -> Result<(), Status> {
        let request = pb::ReleaseSessionRequest {
            session_id: session_id.to_owned(),
        };
        self.api
            .clone()
            .release_session(self.request(request))
            .await
            .map(drop)
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(v) = &self.authorization {
            request.metadata_mut().insert("authorization", v.clone());
        }
        request
    }
}

/// What a participant's page shows when the controller refused or failed: what happened, in a
/// sentence, then the gRPC code and the controller's own message for whoever debugs it. (A
/// real service would show its users something plainer and keep the details in its logs.)
pub(crate) fn explain(status: &Status) -> String {
    let what = match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            "The Veil controller refused this signaling server's credential \
             (check --controller-token)."
        }
        Code::Unavailable => {
            "The Veil controller is unreachable, or no relay can take the call right now: try \
             again shortly."
        }
        Code::DeadlineExceeded => "The Veil controller did not answer in time.",
        _ => "The Veil controller could not allocate the call.",
    };
    format!(
        "{what} ({}: {})",
        code_name(status.code()),
        status.message()
    )
}

/// A gRPC status code as the gRPC specification spells it.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
