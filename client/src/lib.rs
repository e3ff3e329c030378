//! The Veil client library: what a participant's app runs to take part in a call through Veil.
//!
//! A [`Leg`] binds the participant's leg on a relay with the token the signaling service handed
//! it (docs/PROTOCOL.md), over UDP or over QUIC datagrams; keeps it alive; notices a dead or
//! draining relay and binds again on the next relay of the session (the backup) with the same
//! token; and sends and receives media datagrams. It never learns another participant's address:
//! everything it receives comes from the relay.
//!
//! The media itself is the app's business: Veil forwards SRTP, SRTCP and DTLS unmodified and
//! never holds media keys.

pub mod quic;
mod udp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
#[cfg(feature = "proto")]
use veil_proto::v1 as pb;
use veil_protocol::token::{DecodeError, Token};
use veil_protocol::wire::ErrorCode;

/// How to reach one relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayInfo {
    /// UDP media address.
    pub udp: SocketAddr,
    /// QUIC address, if the relay serves QUIC.
    pub quic: Option<SocketAddr>,
    /// SHA-256 of the relay's QUIC certificate, pinned by the client.
    pub quic_cert_sha256: Option<[u8; 32]>,
}

impl RelayInfo {
    /// A relay reached over UDP only.
    pub fn udp(addr: SocketAddr) -> Self {
        Self {
            udp: addr,
            quic: None,
            quic_cert_sha256: None,
        }
    }

    /// From the public API's description of a relay; `None` if its UDP address is malformed.
    #[cfg(feature = "proto")]
    pub fn from_pb(r: &pb::RelayEndpoint) -> Option<Self> {
        Some(Self {
            udp: r.udp_address.parse().ok()?,
            quic: r.quic_address.parse().ok(),
            quic_cert_sha256: r.quic_cert_sha256.as_slice().try_into().ok(),
        })
    }
}

/// The transport a leg uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP datagrams.
    Udp,
    /// QUIC datagrams (RFC 9221), ALPN `veil/2`.
    Quic,
}

/// Timing and addressing of a leg.
#[derive(Debug, Clone)]
pub struct LegConfig {
    /// The leg token, as `AllocateSession` returned it.
    pub token: Vec<u8>,
    /// The session's relays: the primary first, then the backup.
    pub relays: Vec<RelayInfo>,
    /// UDP or QUIC.
    pub transport: Transport,
    /// Local address to bind, for example `0.0.0.0:0` (or `127.0.0.2:0` in tests).
    pub local_addr: SocketAddr,
    /// Send a keepalive when nothing was received from the relay for this long.
    pub keepalive_interval: Duration,
    /// Consider the relay dead when nothing was received from it for this long, and move to the
    /// next relay. Over UDP, never less than `keepalive_interval` plus SRTT + 4 RTTVAR of
    /// the relay's measured round trip time (its answers to BINDs and KEEPALIVEs).
    pub dead_after: Duration,
    /// First BIND retransmission timeout over UDP; doubles on each retry.
    pub bind_rto: Duration,
    /// Give up binding on one relay after this long and try the next.
    pub bind_timeout: Duration,
    /// Hot standby: keep the leg bound on the next relay of the session too (over UDP, from the
    /// same socket; over QUIC, a second connection from the same socket), so that a failover is
    /// a switch of where media goes, with no handshake or bind round trip. `None`: bind on the
    /// next relay only once the current one is found dead.
    pub standby: Option<Standby>,
}

/// How a leg keeps its standby relay ready ([`LegConfig::hot_standby`]).
///
/// The standby leg carries no media of this participant's: only KEEPALIVEs, one every
/// `keepalive_interval`, so the relay keeps it bound and the client knows the relay is alive.
/// Media sent by the other participants reaches it once they switch there; the first such
/// datagram makes the standby the current relay (everyone follows whoever noticed the failure
/// first), unless this leg switched less than `hold` ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standby {
    /// A KEEPALIVE to the standby relay this often.
    pub keepalive_interval: Duration,
    /// The standby relay is dead after this long without an answer: the leg binds on the next
    /// one (or again on it, after `retry_after`).
    pub dead_after: Duration,
    /// Wait this long before binding again on a standby relay that refused, timed out or died.
    pub retry_after: Duration,
    /// After a switch, media arriving from the other relay does not switch back for this long
    /// (packets still in flight through the old relay must not make two clients swap places
    /// forever); it is delivered all the same.
    pub hold: Duration,
}

impl Default for Standby {
    fn default() -> Self {
        Self {
            keepalive_interval: Duration::from_millis(500),
            dead_after: Duration::from_secs(2),
            retry_after: Duration::from_secs(1),
            hold: Duration::from_secs(1),
        }
    }
}

impl LegConfig {
    /// A leg over `transport` with the defaults: keepalive after 200 ms of silence, failover
    /// after 1 s, bind retries from 100 ms, 2 s per relay to bind.
    pub fn new(
        token: Vec<u8>,
        relays: Vec<RelayInfo>,
        transport: Transport,
        local_addr: SocketAddr,
    ) -> Self {
        Self {
            token,
            relays,
            transport,
            local_addr,
            keepalive_interval: Duration::from_millis(200),
            dead_after: Duration::from_secs(1),
            bind_rto: Duration::from_millis(100),
            bind_timeout: Duration::from_secs(2),
            standby: None,
        }
    }

    /// Hot standby with the defaults that keep a failover under 300 ms ([`Standby`]): the leg
    /// stays bound on the next relay as well, the current relay is declared dead after 150 ms
    /// without a datagram from it, and a KEEPALIVE goes to it after 30 ms of silence and every
    /// 30 ms after that, so a dead relay is asked four times before the leg leaves it. The
    /// silence allowed is never less than a KEEPALIVE interval plus the longest answer the path's
    /// measured round trip time allows (SRTT + 4 RTTVAR, RFC 6298), so a far or jittery relay
    /// that still answers is not left: on a path with 1% loss and 20 +- 20 ms of delay each way
    /// (deploy/tests/chaos_netns.py) no leg moves, and a needless switch would cost nothing,
    /// since the standby is bound. A QUIC leg holds a second connection on the standby relay;
    /// its current connection is dead at QUIC's idle timeout (150 ms, which quinn never lets
    /// fall under three probe timeouts of the path's measured round trip), with QUIC PINGs
    /// every 30 ms.
    pub fn hot_standby(mut self) -> Self {
        self.keepalive_interval = Duration::from_millis(30);
        self.dead_after = Duration::from_millis(150);
        self.standby = Some(Standby::default());
        self
    }

    /// A UDP leg on relays given by address.
    pub fn udp(token: Vec<u8>, relays: Vec<SocketAddr>, local_addr: SocketAddr) -> Self {
        Self::new(
            token,
            relays.into_iter().map(RelayInfo::udp).collect(),
            Transport::Udp,
            local_addr,
        )
    }

    /// A leg for `leg` as `AllocateSession` returned it, over the transport the controller chose.
    #[cfg(feature = "proto")]
    pub fn from_pb(leg: &pb::Leg, local_addr: SocketAddr) -> Self {
        let transport = if leg.transport == pb::Transport::Quic as i32 {
            Transport::Quic
        } else {
            Transport::Udp
        };
        Self::new(
            leg.token.clone(),
            leg.relays.iter().filter_map(RelayInfo::from_pb).collect(),
            transport,
            local_addr,
        )
    }
}

/// Why a leg could not be set up or ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The token is not a Veil leg token.
    #[error("malformed token: {0}")]
    Token(#[from] DecodeError),
    /// The configuration names no relay (or none with the chosen transport).
    #[error("no relay address given for this transport")]
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
    /// Who sent it to us: always a relay (its UDP address, or its QUIC connection's address).
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
    /// Moves to another relay (with a standby: switches of the current relay).
    pub failovers: AtomicU64,
    /// Binds on a standby relay (hot standby), the first and every rebind.
    pub standby_binds: AtomicU64,
    /// Datagrams not sent because they exceed the QUIC path's maximum datagram size.
    pub too_large: AtomicU64,
}

/// State a leg's driver task shares with the app's handles.
pub(crate) struct Shared {
    pub(crate) relay: RwLock<SocketAddr>,
    pub(crate) relay_index: AtomicUsize,
    /// The relay a standby leg is bound on, `usize::MAX` for none.
    pub(crate) standby_index: AtomicUsize,
    pub(crate) closed: AtomicBool,
    pub(crate) counters: LegCounters,
    pub(crate) local_addr: RwLock<SocketAddr>,
}

impl Shared {
    pub(crate) fn new(first: SocketAddr, local: SocketAddr) -> Self {
        Self {
            relay: RwLock::new(first),
            relay_index: AtomicUsize::new(0),
            standby_index: AtomicUsize::new(usize::MAX),
            closed: AtomicBool::new(false),
            counters: LegCounters::default(),
            local_addr: RwLock::new(local),
        }
    }

    pub(crate) fn relay(&self) -> SocketAddr {
        *self.relay.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_relay(&self, index: usize, addr: SocketAddr) {
        *self.relay.write().unwrap_or_else(|e| e.into_inner()) = addr;
        self.relay_index.store(index, Relaxed);
    }
}

/// What a driver task reports through.
pub(crate) struct Link {
    pub(crate) shared: Arc<Shared>,
    pub(crate) media: mpsc::Sender<Received>,
    pub(crate) status: watch::Sender<LegStatus>,
}

impl Link {
    pub(crate) fn end(&self, err: ClientError) {
        self.shared.closed.store(true, Relaxed);
        self.status.send_replace(LegStatus::Ended(err));
    }

    pub(crate) fn deliver(&self, data: Bytes, from: SocketAddr, at: Instant) {
        self.shared.counters.received.fetch_add(1, Relaxed);
        if self.media.try_send(Received { data, from, at }).is_err() {
            self.shared.counters.overflow.fetch_add(1, Relaxed);
        }
    }
}

/// How media leaves a leg.
#[derive(Clone)]
enum TxPath {
    Udp(Arc<UdpSocket>),
    Quic(Arc<RwLock<Option<quinn::Connection>>>),
}

/// Media datagrams buffered between the socket and the app.
const MEDIA_QUEUE: usize = 4096;

/// One participant's leg.
pub struct Leg {
    tx: TxPath,
    shared: Arc<Shared>,
    media: mpsc::Receiver<Received>,
    status: watch::Receiver<LegStatus>,
    task: tokio::task::JoinHandle<()>,
    session: u64,
    transport: Transport,
    quic_endpoint: Option<quinn::Endpoint>,
}

impl std::fmt::Debug for Leg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leg")
            .field("transport", &self.transport)
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Drop for Leg {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Leg {
    /// Binds a leg, trying the relays in order, and returns once it is bound.
    pub async fn bind(config: LegConfig) -> Result<Self, ClientError> {
        let token = Token::from_bytes(&config.token)?;
        let first = config.relays.first().ok_or(ClientError::NoRelay)?;
        let first_addr = match config.transport {
            Transport::Udp => first.udp,
            Transport::Quic => first.quic.ok_or(ClientError::NoRelay)?,
        };
        let (media_tx, media) = mpsc::channel(MEDIA_QUEUE);
        let (status_tx, mut status) = watch::channel(LegStatus::Binding { relay: 0 });
        let shared = Arc::new(Shared::new(first_addr, config.local_addr));
        let link = Link {
            shared: shared.clone(),
            media: media_tx,
            status: status_tx,
        };
        let session = token.claims().session.0;
        let transport = config.transport;
        let (tx, task, quic_endpoint) = match transport {
            Transport::Udp => {
                let (socket, task) = udp::start(config, token, link).await?;
                (TxPath::Udp(socket), task, None)
            }
            Transport::Quic => {
                let (conn, endpoint, task) = quic::start(config, token, link)?;
                (TxPath::Quic(conn), task, Some(endpoint))
            }
        };
        let leg = Self {
            tx,
            shared,
            media,
            status: status.clone(),
            task,
            session,
            transport,
            quic_endpoint,
        };
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
        Ok(leg)
    }

    /// Sends one media datagram (SRTP, SRTCP or DTLS) to the current relay.
    pub async fn send(&self, pkt: &[u8]) -> std::io::Result<()> {
        send(&self.tx, &self.shared, pkt).await
    }

    /// A handle that sends on this leg, for a task other than the one receiving.
    pub fn sender(&self) -> LegSender {
        LegSender {
            tx: self.tx.clone(),
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

    /// The relay address in use now.
    pub fn relay(&self) -> SocketAddr {
        self.shared.relay()
    }

    /// Index of the relay in use now, in [`LegConfig::relays`].
    pub fn relay_index(&self) -> usize {
        self.shared.relay_index.load(Relaxed)
    }

    /// Index of the relay a hot standby leg is bound on now, if any ([`LegConfig::hot_standby`]).
    pub fn standby_index(&self) -> Option<usize> {
        match self.shared.standby_index.load(Relaxed) {
            usize::MAX => None,
            i => Some(i),
        }
    }

    /// The local address the leg sends from now.
    pub fn local_addr(&self) -> SocketAddr {
        *self
            .shared
            .local_addr
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The transport in use.
    pub fn transport(&self) -> Transport {
        self.transport
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

    /// True once the leg has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Relaxed)
    }

    /// The largest datagram that can be sent now: the QUIC path's current maximum datagram
    /// size, or the relay's limit over UDP. `None` while a QUIC leg has no connection.
    pub fn max_datagram_size(&self) -> Option<usize> {
        match &self.tx {
            TxPath::Udp(_) => Some(veil_protocol::wire::MAX_DATAGRAM),
            TxPath::Quic(c) => c
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()?
                .max_datagram_size(),
        }
    }

    /// Moves a QUIC leg to a new local socket bound to `addr`, as when a phone moves from Wi-Fi
    /// to cellular: the connection migrates and the leg stays bound, with no new bind. Returns
    /// the new local address. UDP legs cannot migrate (they bind again instead).
    pub fn migrate(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let Some(endpoint) = &self.quic_endpoint else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "only QUIC legs migrate",
            ));
        };
        let socket = std::net::UdpSocket::bind(addr)?;
        let local = socket.local_addr()?;
        endpoint.rebind(socket)?;
        *self
            .shared
            .local_addr
            .write()
            .unwrap_or_else(|e| e.into_inner()) = local;
        Ok(local)
    }
}

async fn send(tx: &TxPath, shared: &Shared, pkt: &[u8]) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    match tx {
        TxPath::Udp(socket) => {
            socket.send_to(pkt, shared.relay()).await?;
        }
        TxPath::Quic(slot) => {
            let conn = slot.read().unwrap_or_else(|e| e.into_inner()).clone();
            let conn = conn.ok_or_else(|| {
                Error::new(ErrorKind::NotConnected, "no relay connection right now")
            })?;
            match conn.send_datagram(Bytes::copy_from_slice(pkt)) {
                Ok(()) => {}
                Err(quinn::SendDatagramError::TooLarge) => {
                    shared.counters.too_large.fetch_add(1, Relaxed);
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        "datagram larger than the path's maximum",
                    ));
                }
                Err(e) => return Err(Error::new(ErrorKind::NotConnected, e.to_string())),
            }
        }
    }
    shared.counters.sent.fetch_add(1, Relaxed);
    Ok(())
}

/// Sends media on a leg; cheap to clone.
#[derive(Clone)]
pub struct LegSender {
    tx: TxPath,
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
        send(&self.tx, &self.shared, pkt).await
    }

    /// True once the leg has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Relaxed)
    }
}
