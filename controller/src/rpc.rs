//! Per-RPC metrics for every gRPC method the controller serves: requests by method and status
//! code (`veil_controller_grpc_requests_total`) and the latency of unary methods
//! (`veil_controller_grpc_request_duration_seconds`). Methods and codes are closed label sets
//! ([`RpcMethod`], [`RpcCode`]): a request for a path the server does not serve counts as
//! `other`, whatever its path says.
//!
//! The layer sits outside every other layer, so it sees the answers those give too
//! (`DEADLINE_EXCEEDED` from [`crate::deadline`]). A gRPC status travels in the response
//! headers when a call fails before any message (a "trailers-only" answer), and otherwise in the
//! trailers after the last message: the response body is wrapped to read it there. A call whose
//! body is dropped before its status (the client went away, the connection broke) counts as
//! `CANCELLED`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::metrics::{ControllerMetrics, RpcCode, RpcMethod};

/// Adds [`RpcMetrics`] to a service.
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer {
    /// Where the requests are counted.
    pub metrics: ControllerMetrics,
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// Counts and times each request of the service it wraps.
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: ControllerMetrics,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Body<Data = Bytes> + Unpin + Send + 'static,
{
    type Response = http::Response<Metered<R>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mut record = Record {
            metrics: Some(self.metrics.clone()),
            method: RpcMethod::from_path(req.uri().path()),
            started: Instant::now(),
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            // An error here is the transport's, not an answer: the call counts as CANCELLED
            // when `record` drops.
            let (parts, body) = fut.await?.into_parts();
            if let Some(code) = status_of(&parts.headers) {
                record.finish(code);
            }
            Ok(http::Response::from_parts(
                parts,
                Metered {
                    inner: body,
                    record,
                },
            ))
        })
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<RpcCode> {
    headers
        .get("grpc-status")
        .map(|v| tonic::Code::from_bytes(v.as_bytes()).into())
}

/// One request's record, counted once: at its status, or as `CANCELLED` if it is dropped first.
struct Record {
    /// `None` once counted.
    metrics: Option<ControllerMetrics>,
    method: RpcMethod,
    started: Instant,
}

impl Record {
    fn finish(&mut self, code: RpcCode) {
        if let Some(m) = self.metrics.take() {
            m.count_rpc(self.method, code, self.started.elapsed());
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.finish(RpcCode::Cancelled);
    }
}

/// A response body that reads the gRPC status from the trailers as they pass.
pub struct Metered<B> {
    inner: B,
    record: Record,
}

impl<B> std::fmt::Debug for Metered<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered")
            .field("method", &self.record.method)
            .finish_non_exhaustive()
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_of) {
                    this.record.finish(code);
                }
            }
            // A body that fails, or ends with no status at all, did not complete the call.
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => this.record.finish(RpcCode::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
