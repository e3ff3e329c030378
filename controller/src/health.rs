//! `grpc.health.v1.Health`, driven by the controller's one notion of readiness
//! ([`Controller::readiness`], which `/readyz` answers too), not by statuses set once at start.
//!
//! | service                  | `SERVING` when                                   |
//! |--------------------------|--------------------------------------------------|
//! | `""` (the whole server)  | ready: a relay is up and shutdown has not begun  |
//! | `veil.v1.SessionService` | ready, as `""`                                   |
//! | `veil.v1.RelayRegistry`  | shutdown has not begun (relays attach to a controller that has no relay yet) |
//! | `veil.v1.AdminService`   | shutdown has not begun                           |
//! | `grpc.health.v1.Health`  | shutdown has not begun                           |
//!
//! Otherwise `NOT_SERVING`. `Check` computes the status when it is asked; `Watch` sends the
//! current status, then every change as relays attach, detach or go silent, and ends once
//! shutdown has begun, after sending `NOT_SERVING`, so that open watches never hold up the
//! server's graceful shutdown. An unknown service is `NOT_FOUND` for `Check` and
//! `SERVICE_UNKNOWN` for `Watch`, as the health protocol says.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use veil_proto::v1::{admin_service_server, relay_registry_server, session_service_server};

use crate::state::Controller;

/// What a health status follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Follows {
    /// Readiness: a relay up, and not shutting down.
    Readiness,
    /// Only whether shutdown has begun.
    Running,
}

/// The services this server reports on, and what each one's status follows.
const SERVICES: &[(&str, Follows)] = &[
    ("", Follows::Readiness),
    (session_service_server::SERVICE_NAME, Follows::Readiness),
    (relay_registry_server::SERVICE_NAME, Follows::Running),
    (admin_service_server::SERVICE_NAME, Follows::Running),
    (
        tonic_health::pb::health_server::SERVICE_NAME,
        Follows::Running,
    ),
];

/// Every service name this server reports a status for.
pub fn services() -> impl Iterator<Item = &'static str> {
    SERVICES.iter().map(|(name, _)| *name)
}

/// The status of `service` now, or `None` if the server does not know that service.
pub fn status(controller: &Controller, service: &str) -> Option<ServingStatus> {
    let (_, follows) = SERVICES.iter().find(|(name, _)| *name == service)?;
    let up = match follows {
        Follows::Readiness => controller.readiness().is_ok(),
        Follows::Running => !controller.is_stopping(),
    };
    Some(if up {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    })
}

/// `grpc.health.v1.Health`.
#[derive(Debug, Clone)]
pub struct HealthApi {
    pub(crate) controller: Arc<Controller>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

fn answer(s: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse { status: s as i32 }
}

/// Feeds one `Watch` stream: the status now, then each change, until the watcher goes or
/// shutdown begins.
async fn watch(
    controller: Arc<Controller>,
    service: String,
    tx: mpsc::Sender<Result<HealthCheckResponse, Status>>,
) {
    let Some(mut last) = status(&controller, &service) else {
        // Unknown now; the set of services never changes, so it stays unknown.
        if tx
            .send(Ok(answer(ServingStatus::ServiceUnknown)))
            .await
            .is_ok()
        {
            tokio::select! {
                _ = tx.closed() => {}
                _ = controller.stopping() => {}
            }
        }
        return;
    };
    // Subscribed before the first status is sent: no change between the two goes unseen.
    let mut changes = controller.registry.changes();
    if tx.send(Ok(answer(last))).await.is_err() {
        return;
    }
    loop {
        let stopping = tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                false
            }
            _ = controller.stopping() => true,
            _ = tx.closed() => return,
        };
        let now = status(&controller, &service).unwrap_or(ServingStatus::NotServing);
        if now != last {
            last = now;
            if tx.send(Ok(answer(now))).await.is_err() {
                return;
            }
        }
        if stopping {
            return;
        }
    }
}

#[tonic::async_trait]
impl Health for HealthApi {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        match status(&self.controller, &request.get_ref().service) {
            Some(s) => Ok(Response::new(answer(s))),
            None => Err(Status::not_found("service not registered")),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(watch(
            self.controller.clone(),
            request.into_inner().service,
            tx,
        ));
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as WatchStream
        ))
    }
}
