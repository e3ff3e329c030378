//! The UDP transport of a leg: the two-round bind with a cookie, keepalives, and failover.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;
use veil_protocol::token::Token;
use veil_protocol::wire::{self, COOKIE_LEN, Class, ErrorCode, RelayMessage};

use crate::{ClientError, LegConfig, LegStatus, Link};

/// Binds the local socket and starts the driver task.
pub(crate) async fn start(
    config: LegConfig,
    token: Token,
    link: Link,
) -> Result<(Arc<UdpSocket>, tokio::task::JoinHandle<()>), ClientError> {
    let socket = bind(config.local_addr).map_err(|e| ClientError::Socket(e.to_string()))?;
    let local = socket
        .local_addr()
        .map_err(|e| ClientError::Socket(e.to_string()))?;
    *link
        .shared
        .local_addr
        .write()
        .unwrap_or_else(|e| e.into_inner()) = local;
    let socket = Arc::new(socket);
    let now = Instant::now();
    let driver = Driver {
        socket: socket.clone(),
        link,
        token,
        config,
        state: State::Binding {
            relay: 0,
            txn: rand::random(),
            cookie: None,
            started: now,
            rto: Duration::ZERO,
            next: now,
        },
        last_rx: now,
        last_keepalive: now,
    };
    Ok((socket, tokio::spawn(driver.run())))
}

/// Receive buffer asked for (the kernel caps it at net.core.rmem_max): one relay wake-up may
/// hand a many-party call's leg dozens of datagrams at once, more than the default 208 KiB
/// holds while the app is busy elsewhere.
pub(crate) const RECV_BUFFER: usize = 1 << 20;

fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer still works, with more loss under bursts.
    let _ = socket.set_recv_buffer_size(RECV_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

enum State {
    Binding {
        relay: usize,
        txn: [u8; 8],
        cookie: Option<[u8; COOKIE_LEN]>,
        started: Instant,
        rto: Duration,
        next: Instant,
    },
    Bound {
        relay: usize,
    },
    Ended,
}

struct Driver {
    socket: Arc<UdpSocket>,
    link: Link,
    token: Token,
    config: LegConfig,
    state: State,
    last_rx: Instant,
    last_keepalive: Instant,
}

impl Driver {
    fn relay_addr(&self, i: usize) -> SocketAddr {
        self.config.relays[i % self.config.relays.len()].udp
    }

    fn start_binding(&mut self, relay: usize) {
        let relay = relay % self.config.relays.len();
        self.link.shared.set_relay(relay, self.relay_addr(relay));
        let now = Instant::now();
        self.state = State::Binding {
            relay,
            txn: rand::random(),
            cookie: None,
            started: now,
            rto: Duration::ZERO,
            next: now,
        };
        self.link.status.send_replace(LegStatus::Binding { relay });
    }

    fn end(&mut self, err: ClientError) {
        self.state = State::Ended;
        self.link.end(err);
    }

    /// When the driver next has something to do without input.
    fn deadline(&self) -> Instant {
        match &self.state {
            State::Binding { next, .. } => *next,
            State::Bound { .. } => (self.last_rx.max(self.last_keepalive)
                + self.config.keepalive_interval)
                .min(self.last_rx + self.config.dead_after),
            State::Ended => Instant::now() + Duration::from_secs(3600),
        }
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        match &mut self.state {
            State::Binding {
                relay,
                txn,
                cookie,
                started,
                rto,
                next,
            } => {
                if now < *next {
                    return;
                }
                if now.duration_since(*started) >= self.config.bind_timeout {
                    let following = *relay + 1;
                    if following % self.config.relays.len() == 0
                        && self.link.shared.counters.binds.load(Relaxed) == 0
                    {
                        // Every relay tried once and none ever answered: give up.
                        self.end(ClientError::Unreachable);
                    } else {
                        self.link.shared.counters.failovers.fetch_add(1, Relaxed);
                        self.start_binding(following);
                    }
                    return;
                }
                *rto = if rto.is_zero() {
                    self.config.bind_rto
                } else {
                    (*rto * 2).min(Duration::from_secs(1))
                };
                *next = now + *rto;
                let msg = wire::bind(&self.token, *txn, cookie.as_ref());
                let dst = self.config.relays[*relay].udp;
                let _ = self.socket.send_to(&msg, dst).await;
            }
            State::Bound { relay } => {
                let relay = *relay;
                if now.duration_since(self.last_rx) >= self.config.dead_after {
                    tracing::debug!(relay, "relay silent, moving to the next one");
                    self.link.shared.counters.failovers.fetch_add(1, Relaxed);
                    self.start_binding(relay + 1);
                } else if now.duration_since(self.last_rx.max(self.last_keepalive))
                    >= self.config.keepalive_interval
                {
                    self.last_keepalive = now;
                    let _ = self
                        .socket
                        .send_to(&wire::keepalive(rand::random()), self.relay_addr(relay))
                        .await;
                }
            }
            State::Ended => {}
        }
    }

    async fn on_datagram(&mut self, pkt: &[u8], from: SocketAddr) {
        let current = match &self.state {
            State::Binding { relay, .. } | State::Bound { relay } => self.relay_addr(*relay),
            State::Ended => return,
        };
        if from != current {
            self.link.shared.counters.foreign.fetch_add(1, Relaxed);
            return;
        }
        let now = Instant::now();
        match wire::classify(pkt) {
            Class::Rtp | Class::Dtls => {
                if let State::Bound { .. } = self.state {
                    self.last_rx = now;
                }
                self.link.deliver(Bytes::copy_from_slice(pkt), from, now);
            }
            Class::Control => {
                if let Ok(msg) = wire::parse_relay(pkt) {
                    self.on_control(msg, now).await;
                }
            }
            Class::Other => {}
        }
    }

    async fn on_control(&mut self, msg: RelayMessage<'_>, now: Instant) {
        let session = self.token.claims().session.0;
        match (&mut self.state, msg) {
            (
                State::Binding {
                    relay,
                    txn,
                    cookie,
                    next,
                    rto,
                    ..
                },
                RelayMessage::Challenge { txn: t, cookie: c },
            ) if t == *txn => {
                let c: [u8; COOKIE_LEN] = c.try_into().expect("parser checked the length");
                *cookie = Some(c);
                *rto = self.config.bind_rto;
                *next = now + *rto;
                let msg = wire::bind(&self.token, *txn, Some(&c));
                let dst = self.config.relays[*relay].udp;
                let _ = self.socket.send_to(&msg, dst).await;
            }
            (State::Binding { relay, txn, .. }, RelayMessage::BindOk { txn: t, .. })
                if t == *txn =>
            {
                let relay = *relay;
                self.state = State::Bound { relay };
                self.last_rx = now;
                self.last_keepalive = now;
                self.link.shared.counters.binds.fetch_add(1, Relaxed);
                self.link.status.send_replace(LegStatus::Bound { relay });
            }
            (State::Binding { relay, txn, .. }, RelayMessage::Error { txn: t, code })
                if t == *txn =>
            {
                let relay = *relay;
                match ErrorCode::from_u16(code) {
                    Some(
                        c @ (ErrorCode::Unauthorized
                        | ErrorCode::Expired
                        | ErrorCode::SessionClosed),
                    ) => {
                        self.end(ClientError::Refused(c));
                    }
                    // Full, draining or rate limited: the next relay may take us.
                    _ if self.config.relays.len() > 1 => {
                        self.link.shared.counters.failovers.fetch_add(1, Relaxed);
                        self.start_binding(relay + 1);
                    }
                    _ => {}
                }
            }
            (State::Bound { relay }, RelayMessage::KeepaliveAck { .. }) => {
                let _ = relay;
                self.last_rx = now;
            }
            (State::Bound { relay }, RelayMessage::Error { code, .. })
                if code == ErrorCode::NotBound as u16 =>
            {
                // The relay lost our leg (it restarted): bind again there.
                let relay = *relay;
                self.start_binding(relay);
            }
            (
                State::Bound { relay } | State::Binding { relay, .. },
                RelayMessage::Close { code, session: s },
            ) if s == session => {
                let relay = *relay;
                match ErrorCode::from_u16(code) {
                    Some(ErrorCode::Draining) => {
                        self.link.shared.counters.failovers.fetch_add(1, Relaxed);
                        self.start_binding(relay + 1);
                    }
                    c => self.end(ClientError::Closed(c.unwrap_or(ErrorCode::SessionClosed))),
                }
            }
            _ => {}
        }
    }

    async fn run(mut self) {
        let mut buf = vec![0u8; 2048];
        loop {
            if let State::Ended = self.state {
                return;
            }
            let deadline = self.deadline();
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => self.on_datagram(&buf[..n], from).await,
                    // ICMP port unreachable from a dead relay shows up here on some systems:
                    // the silence timer handles it.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
                _ = tokio::time::sleep_until(deadline.into()) => self.on_timer().await,
                _ = self.link.media.closed() => return,
            }
        }
    }
}
