//! The Veil client library: what a participant's app runs to take part in a call through Veil.
//!
//! A [`UdpLeg`] binds the participant's leg on a relay with the token the signaling service
//! handed it (docs/PROTOCOL.md), keeps it alive, notices a dead or draining relay and rebinds on
//! the next relay of the session (the backup) with the same token, and sends and receives media
//! datagrams. It never learns another participant's address: everything it receives comes from
//! the relay.
//!
//! The media itself is the app's business: Veil forwards SRTP, SRTCP and DTLS unmodified and
//! never holds media keys.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use veil_relay_core::token::{DecodeError, Token};
use veil_relay_core::wire::{self, COOKIE_LEN, Class, ErrorCode, RelayMessage};

/// Timing and addressing of a leg.
#[derive(Debug, Clone)]
pub struct LegConfig {
    /// The leg token, as `AllocateSession` returned it.
    pub token: Vec<u8>,
    /// The session's relays, UDP addresses: the primary first, then the backup.
    pub relays: Vec<SocketAddr>,
    /// Local address to bind, for example `0.0.0.0:0` (or `127.0.0.2:0` in tests).
    pub local_addr: SocketAddr,
    /// Send a KEEPALIVE when nothing was received from the relay for this long.
    pub keepalive_interval: Duration,
    /// Consider the relay dead when nothing was received from it for this long, and move to the
    /// next relay.
    pub dead_after: Duration,
    /// First BIND retransmission timeout; doubles on each retry.
    pub bind_rto: Duration,
    /// Give up binding on one relay after this long and try the next.
    pub bind_timeout: Duration,
}

impl LegConfig {
    /// Defaults: keepalive after 200 ms of silence, failover after 1 s, bind retries from 100 ms.
    pub fn new(token: Vec<u8>, relays: Vec<SocketAddr>, local_addr: SocketAddr) -> Self {
        Self {
            token,
            relays,
            local_addr,
            keepalive_interval: Duration::from_millis(200),
            dead_after: Duration::from_secs(1),
            bind_rto: Duration::from_millis(100),
            bind_timeout: Duration::from_secs(2),
        }
    }
}

/// Why a leg could not be set up or ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The token is not a Veil leg token.
    #[error("malformed token: {0}")]
    Token(#[from] DecodeError),
    /// The configuration names no relay.
    #[error("no relay address given")]
    NoRelay,
    /// The local socket could not be bound.
    #[error("cannot bind local socket: {0}")]
    Socket(String),
    /// A relay refused the token for good (forged, expired, or the session was released).
    #[error("relay refused the leg: {0:?}")]
    Refused(ErrorCode),
    /// No relay answered in time.
    #[error("no relay answered")]
    Unreachable,
    /// The session was closed by the relay (released or expired).
    #[error("session closed: {0:?}")]
    Closed(ErrorCode),
}

/// Where a leg stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegStatus {
    /// Binding on relay `relay` (index into [`LegConfig::relays`]).
    Binding {
        /// Relay index.
        relay: usize,
    },
    /// Bound on relay `relay`.
    Bound {
        /// Relay index.
        relay: usize,
    },
    /// Over, for good.
    Ended(ClientError),
}

/// A media datagram received through the relay.
#[derive(Debug, Clone)]
pub struct Received {
    /// The datagram, as the sender sent it.
    pub data: Bytes,
    /// Who sent it to us: always a relay.
    pub from: SocketAddr,
    /// When it was received.
    pub at: Instant,
}

/// Counters of one leg.
#[derive(Debug, Default)]
pub struct LegCounters {
    /// Media datagrams sent.
    pub sent: AtomicU64,
    /// Media datagrams received from the relay.
    pub received: AtomicU64,
    /// Received media dropped because the app did not read fast enough.
    pub overflow: AtomicU64,
    /// Datagrams from any address other than the current relay (dropped).
    pub foreign: AtomicU64,
    /// Successful binds (the first, and every rebind).
    pub binds: AtomicU64,
    /// Moves to another relay.
    pub failovers: AtomicU64,
}

struct Shared {
    relay: RwLock<SocketAddr>,
    relay_index: AtomicUsize,
    closed: AtomicBool,
    counters: LegCounters,
}

/// One participant's leg over UDP.
pub struct UdpLeg {
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
    media: mpsc::Receiver<Received>,
    status: watch::Receiver<LegStatus>,
    task: tokio::task::JoinHandle<()>,
    local_addr: SocketAddr,
    session: u64,
}

impl std::fmt::Debug for UdpLeg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpLeg")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Drop for UdpLeg {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Media datagrams buffered between the socket and the app.
const MEDIA_QUEUE: usize = 4096;

impl UdpLeg {
    /// Binds a leg, trying the relays in order, and returns once it is bound.
    pub async fn bind(config: LegConfig) -> Result<Self, ClientError> {
        let token = Token::from_bytes(&config.token)?;
        let first = *config.relays.first().ok_or(ClientError::NoRelay)?;
        let socket = UdpSocket::bind(config.local_addr)
            .await
            .map_err(|e| ClientError::Socket(e.to_string()))?;
        let local_addr = socket
            .local_addr()
            .map_err(|e| ClientError::Socket(e.to_string()))?;
        let socket = Arc::new(socket);
        let shared = Arc::new(Shared {
            relay: RwLock::new(first),
            relay_index: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            counters: LegCounters::default(),
        });
        let (media_tx, media) = mpsc::channel(MEDIA_QUEUE);
        let (status_tx, mut status) = watch::channel(LegStatus::Binding { relay: 0 });
        let session = token.claims().session.0;
        let driver = Driver {
            socket: socket.clone(),
            shared: shared.clone(),
            media: media_tx,
            status: status_tx,
            token,
            config,
            state: State::Binding {
                relay: 0,
                txn: rand::random(),
                cookie: None,
                started: Instant::now(),
                rto: Duration::ZERO,
                next: Instant::now(),
            },
            last_rx: Instant::now(),
            last_keepalive: Instant::now(),
        };
        let task = tokio::spawn(driver.run());
        loop {
            match &*status.borrow_and_update() {
                LegStatus::Bound { .. } => break,
                LegStatus::Ended(e) => return Err(e.clone()),
                LegStatus::Binding { .. } => {}
            }
            if status.changed().await.is_err() {
                return Err(ClientError::Unreachable);
            }
        }
        Ok(Self {
            socket,
            shared,
            media,
            status,
            task,
            local_addr,
            session,
        })
    }

    /// Sends one media datagram (SRTP, SRTCP or DTLS) to the current relay.
    pub async fn send(&self, pkt: &[u8]) -> std::io::Result<()> {
        send(&self.socket, &self.shared, pkt).await
    }

    /// A handle that sends on this leg, for a task other than the one receiving.
    pub fn sender(&self) -> LegSender {
        LegSender {
            socket: self.socket.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Receives the next media datagram; `None` once the leg has ended.
    ///
    /// # Cancel safety
    /// Cancel safe: a datagram is only taken when this completes.
    pub async fn recv(&mut self) -> Option<Received> {
        self.media.recv().await
    }

    /// The relay in use now.
    pub fn relay(&self) -> SocketAddr {
        *self.shared.relay.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Index of the relay in use now, in [`LegConfig::relays`].
    pub fn relay_index(&self) -> usize {
        self.shared.relay_index.load(Relaxed)
    }

    /// The local address the leg sends from.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The session id from the token.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Watches the leg's status.
    pub fn status(&self) -> watch::Receiver<LegStatus> {
        self.status.clone()
    }

    /// The leg's counters.
    pub fn counters(&self) -> &LegCounters {
        &self.shared.counters
    }

    /// True once the relay closed the session.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Relaxed)
    }
}

async fn send(socket: &UdpSocket, shared: &Shared, pkt: &[u8]) -> std::io::Result<()> {
    let relay = *shared.relay.read().unwrap_or_else(|e| e.into_inner());
    socket.send_to(pkt, relay).await?;
    shared.counters.sent.fetch_add(1, Relaxed);
    Ok(())
}

/// Sends media on a leg; cheap to clone.
#[derive(Clone)]
pub struct LegSender {
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LegSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegSender").finish_non_exhaustive()
    }
}

impl LegSender {
    /// Sends one media datagram to the leg's current relay.
    pub async fn send(&self, pkt: &[u8]) -> std::io::Result<()> {
        send(&self.socket, &self.shared, pkt).await
    }

    /// True once the leg has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Relaxed)
    }
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
    shared: Arc<Shared>,
    media: mpsc::Sender<Received>,
    status: watch::Sender<LegStatus>,
    token: Token,
    config: LegConfig,
    state: State,
    last_rx: Instant,
    last_keepalive: Instant,
}

impl Driver {
    fn relay_addr(&self, i: usize) -> SocketAddr {
        self.config.relays[i % self.config.relays.len()]
    }

    fn start_binding(&mut self, relay: usize) {
        let relay = relay % self.config.relays.len();
        *self.shared.relay.write().unwrap_or_else(|e| e.into_inner()) = self.relay_addr(relay);
        self.shared.relay_index.store(relay, Relaxed);
        let now = Instant::now();
        self.state = State::Binding {
            relay,
            txn: rand::random(),
            cookie: None,
            started: now,
            rto: Duration::ZERO,
            next: now,
        };
        self.status.send_replace(LegStatus::Binding { relay });
    }

    fn end(&mut self, err: ClientError) {
        self.state = State::Ended;
        self.shared.closed.store(true, Relaxed);
        self.status.send_replace(LegStatus::Ended(err));
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
                        && self.shared.counters.binds.load(Relaxed) == 0
                    {
                        // Every relay tried once and none ever answered: give up.
                        self.end(ClientError::Unreachable);
                    } else {
                        self.shared.counters.failovers.fetch_add(1, Relaxed);
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
                let dst = self.config.relays[*relay];
                let _ = self.socket.send_to(&msg, dst).await;
            }
            State::Bound { relay } => {
                let relay = *relay;
                if now.duration_since(self.last_rx) >= self.config.dead_after {
                    tracing::debug!(relay, "relay silent, moving to the next one");
                    self.shared.counters.failovers.fetch_add(1, Relaxed);
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
            self.shared.counters.foreign.fetch_add(1, Relaxed);
            return;
        }
        let now = Instant::now();
        match wire::classify(pkt) {
            Class::Rtp | Class::Dtls => {
                if let State::Bound { .. } = self.state {
                    self.last_rx = now;
                }
                self.shared.counters.received.fetch_add(1, Relaxed);
                let item = Received {
                    data: Bytes::copy_from_slice(pkt),
                    from,
                    at: now,
                };
                if self.media.try_send(item).is_err() {
                    self.shared.counters.overflow.fetch_add(1, Relaxed);
                }
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
                let dst = self.config.relays[*relay];
                let _ = self.socket.send_to(&msg, dst).await;
            }
            (State::Binding { relay, txn, .. }, RelayMessage::BindOk { txn: t, .. })
                if t == *txn =>
            {
                let relay = *relay;
                self.state = State::Bound { relay };
                self.last_rx = now;
                self.last_keepalive = now;
                self.shared.counters.binds.fetch_add(1, Relaxed);
                self.status.send_replace(LegStatus::Bound { relay });
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
                        self.shared.counters.failovers.fetch_add(1, Relaxed);
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
                        self.shared.counters.failovers.fetch_add(1, Relaxed);
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
                _ = self.media.closed() => return,
            }
        }
    }
}
