//! Reaching every address a service name resolves to: a headless Kubernetes Service gives one
//! address per pod, and a relay attaches to every controller replica, a controller follows every
//! peer replica, through one name. Shared by both.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;

/// Resolves a host and port to socket addresses.
pub type Resolve = Arc<
    dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>
        + Send
        + Sync,
>;

/// The system resolver (`/etc/hosts`, then DNS).
pub fn system_resolver() -> Resolve {
    Arc::new(|host, port| {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    })
}

/// How soon a failed resolution is tried again (sooner than the regular interval).
pub const RESOLVE_RETRY: Duration = Duration::from_secs(2);

/// Host and port of a gRPC URL (the scheme's default port when it names none).
pub fn host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let uri: tonic::transport::Uri = url.parse().context("URL")?;
    let host = uri
        .host()
        .context("URL has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    Ok((host, port))
}

/// Connects to one fixed address whatever the URI says: the URI (with the URL's host) stays
/// what the HTTP/2 requests carry as their authority.
#[derive(Debug, Clone, Copy)]
pub struct FixedAddr(pub SocketAddr);

impl tower::Service<tonic::transport::Uri> for FixedAddr {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::transport::Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_host_and_port() {
        assert_eq!(
            host_port("http://veil-controller-peers.veil.svc:50051").unwrap(),
            ("veil-controller-peers.veil.svc".into(), 50051)
        );
        assert_eq!(
            host_port("https://c.example").unwrap(),
            ("c.example".into(), 443)
        );
        assert_eq!(host_port("http://[::1]:7").unwrap(), ("::1".into(), 7));
        assert!(host_port("not a url").is_err());
    }
}
