//! Deadlines the gRPC way: a request whose `grpc-timeout` has run out (or is already spent when
//! it arrives) is answered `DEADLINE_EXCEEDED`, as the gRPC protocol says, not `CANCELLED`, which
//! is what tonic's own timeout answers. Requests without a deadline get the server's longest,
//! [`crate::RPC_TIMEOUT`].
//!
//! The layer sits inside tonic's own timeout and fires first: its deadline is taken when the
//! request arrives, before tonic starts its timer, and tonic polls the service before its timer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::Status;

/// Adds [`Deadline`] to a service.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    /// The longest any request may take.
    pub max: Duration,
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            max: self.max,
        }
    }
}

/// Answers `DEADLINE_EXCEEDED` once a request's deadline (or the server's longest) has passed.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    max: Duration,
}

/// Below this, a deadline is spent before any work could finish: answered without calling the
/// service at all.
const SPENT: Duration = Duration::from_millis(1);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let budget = match req.headers().get("grpc-timeout").map(parse_grpc_timeout) {
            Some(Some(d)) => d.min(self.max),
            // Unparseable: the gRPC spec leaves it to the server; treat it as absent, as tonic
            // does.
            Some(None) | None => self.max,
        };
        if budget < SPENT {
            return Box::pin(std::future::ready(Ok(exceeded(
                "the request's deadline had passed when it arrived",
            )
            .into_http())));
        }
        // Taken now, before tonic's own timer starts: this one fires first.
        let deadline = tokio::time::Instant::now() + budget;
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(r) => r,
                Err(_) => Ok(exceeded("deadline exceeded").into_http()),
            }
        })
    }
}

fn exceeded(message: &str) -> Status {
    crate::errors::simple(
        tonic::Code::DeadlineExceeded,
        message,
        crate::errors::Reason::DeadlineExceeded,
    )
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(v: &http::HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values_parse() {
        let p = |s: &str| parse_grpc_timeout(&http::HeaderValue::from_str(s).unwrap());
        assert_eq!(p("1n"), Some(Duration::from_nanos(1)));
        assert_eq!(p("0m"), Some(Duration::ZERO));
        assert_eq!(p("250m"), Some(Duration::from_millis(250)));
        assert_eq!(p("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
        assert_eq!(p("5S"), Some(Duration::from_secs(5)));
        assert_eq!(p("2M"), Some(Duration::from_secs(120)));
        assert_eq!(p("7u"), Some(Duration::from_micros(7)));
        for bad in ["", "m", "123456789S", "-1S", "1s", "1.5S", "S1", " 1S"] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }
}
