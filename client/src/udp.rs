//! The UDP transport of a leg: the two-round bind with a cookie, keepalives, failover, and the
//! hot standby ([`crate::Standby`]).
//!
//! One socket serves every relay of the leg. The leg has a current path (the relay media goes
//! to) and, with a standby configured, a second path bound on another relay of the session and
//! kept alive with KEEPALIVEs. When the current relay falls silent for `dead_after`, or answers
//! that it is draining, the leg switches to the standby if it is bound (no round trip: the next
//! datagram goes there) and keeps the old relay as its standby; otherwise it binds on the next
//! relay as before. Media is delivered from either relay.

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
        active: Path::binding(0, now),
        standby: None,
        switched: None,
        ended: false,
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

/// A bind in progress on one relay.
#[derive(Debug, Clone, Copy)]
struct Bind {
    txn: [u8; 8],
    cookie: Option<[u8; COOKIE_LEN]>,
    started: Instant,
    rto: Duration,
    next: Instant,
    /// When the BIND now being retransmitted (the first, or the one with the cookie) was first
    /// sent: its answer times the round trip from there, which overestimates it when a
    /// retransmission was answered (a longer wait before a silent relay counts as dead, never
    /// a shorter one).
    asked: Instant,
}

impl Bind {
    fn new(now: Instant) -> Self {
        Self {
            txn: rand::random(),
            cookie: None,
            started: now,
            rto: Duration::ZERO,
            next: now,
            asked: now,
        }
    }
}

/// The round-trip time to a relay, smoothed as TCP smooths it (RFC 6298), from the relay's
/// answers to BINDs and KEEPALIVEs. (A KEEPALIVE is never resent, and its answer names it, so
/// Karn's ambiguity arises only for a BIND; see [`Bind::asked`].)
#[derive(Debug, Clone, Copy, Default)]
struct Rtt {
    srtt: Option<Duration>,
    rttvar: Duration,
}

impl Rtt {
    fn sample(&mut self, r: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(s) => {
                let d = s.abs_diff(r);
                self.rttvar = self.rttvar * 3 / 4 + d / 4;
                self.srtt = Some(s * 7 / 8 + r / 8);
            }
        }
    }

    /// How long an answer may take: SRTT + 4 RTTVAR (0 before the first sample).
    fn high(&self) -> Duration {
        self.srtt.map_or(Duration::ZERO, |s| s + self.rttvar * 4)
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Binding(Bind),
    Bound,
    /// A standby relay that failed: bind again at `until`.
    Waiting {
        until: Instant,
    },
}

/// The leg on one relay.
#[derive(Debug, Clone, Copy)]
struct Path {
    relay: usize,
    phase: Phase,
    /// The last datagram from the relay while bound (when bound, at first).
    last_rx: Instant,
    last_keepalive: Instant,
    /// The last KEEPALIVE's transaction id, until answered.
    probe: Option<[u8; 8]>,
    rtt: Rtt,
}

impl Path {
    fn binding(relay: usize, now: Instant) -> Self {
        Self {
            relay,
            phase: Phase::Binding(Bind::new(now)),
            last_rx: now,
            last_keepalive: now,
            probe: None,
            rtt: Rtt::default(),
        }
    }

    /// How long the relay may stay silent before it counts as dead: `dead_after`, but never
    /// less than a KEEPALIVE interval plus the longest answer this path's round trip time
    /// allows, so a slow path (a far relay, a jittery link) with no media on it is not left
    /// while it is still answering.
    fn dead_after(&self, keepalive: Duration, dead_after: Duration) -> Duration {
        dead_after.max(keepalive + self.rtt.high())
    }

    /// A KEEPALIVE_ACK: times the round trip if it answers the last KEEPALIVE.
    fn on_keepalive_ack(&mut self, txn: [u8; 8], now: Instant) {
        self.last_rx = now;
        if self.probe == Some(txn) {
            self.probe = None;
            self.rtt.sample(now.duration_since(self.last_keepalive));
        }
    }

    /// A BIND_OK for this path's bind: times the round trip.
    fn on_bind_ok(&mut self, now: Instant) {
        if let Phase::Binding(b) = self.phase {
            self.rtt.sample(now.duration_since(b.asked));
        }
    }

    fn is_bound(&self) -> bool {
        matches!(self.phase, Phase::Bound)
    }

    /// When this path next has something to do, with these timers.
    fn deadline(&self, keepalive: Duration, dead_after: Duration) -> Instant {
        match self.phase {
            Phase::Binding(b) => b.next,
            Phase::Bound => (self.last_rx.max(self.last_keepalive) + keepalive)
                .min(self.last_rx + self.dead_after(keepalive, dead_after)),
            Phase::Waiting { until } => until,
        }
    }
}

/// Which path a datagram came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Active,
    Standby,
}

/// What a path's timer asks for.
enum Due {
    Nothing,
    /// Send (or resend) the bind.
    Bind,
    /// Send a KEEPALIVE with this transaction id.
    Keepalive([u8; 8]),
    /// The bind timed out, or the bound relay fell silent.
    Failed,
}

struct Driver {
    socket: Arc<UdpSocket>,
    link: Link,
    token: Token,
    config: LegConfig,
    /// The relay media goes to.
    active: Path,
    /// The standby, with hot standby on.
    standby: Option<Path>,
    /// When the current relay last changed by a switch to the standby.
    switched: Option<Instant>,
    ended: bool,
}

impl Driver {
    fn relays(&self) -> usize {
        self.config.relays.len()
    }

    fn relay_addr(&self, i: usize) -> SocketAddr {
        self.config.relays[i % self.relays()].udp
    }

    fn publish_standby(&self) {
        let i = self
            .standby
            .filter(Path::is_bound)
            .map_or(usize::MAX, |p| p.relay);
        self.link.shared.standby_index.store(i, Relaxed);
    }

    /// Binds afresh on `relay` as the current relay (no standby to switch to).
    fn start_binding(&mut self, relay: usize) {
        let relay = relay % self.relays();
        let now = Instant::now();
        self.active = Path::binding(relay, now);
        self.link.shared.set_relay(relay, self.relay_addr(relay));
        if self.standby.is_some_and(|p| p.relay == relay) {
            self.standby = None;
            self.publish_standby();
        }
        self.link.status.send_replace(LegStatus::Binding { relay });
    }

    /// Makes the bound standby the current relay, and the current one the standby.
    fn switch(&mut self, now: Instant) {
        let Some(mut next) = self.standby.take() else {
            return;
        };
        // A grace period: the new relay has been answering KEEPALIVEs, now it must carry media.
        next.last_rx = now;
        next.last_keepalive = now;
        next.probe = None;
        let old = std::mem::replace(&mut self.active, next);
        self.standby = Some(old);
        self.switched = Some(now);
        self.link.shared.counters.failovers.fetch_add(1, Relaxed);
        let relay = self.active.relay;
        self.link.shared.set_relay(relay, self.relay_addr(relay));
        self.publish_standby();
        self.link.status.send_replace(LegStatus::Bound { relay });
        tracing::debug!(relay, "switched to the standby relay");
    }

    /// The current relay is gone (silent, draining, or its bind failed): switch to the standby
    /// if it is bound, or bind on the next relay.
    fn fail_over(&mut self, now: Instant) {
        if self.standby.is_some_and(|p| p.is_bound()) {
            self.switch(now);
        } else {
            self.link.shared.counters.failovers.fetch_add(1, Relaxed);
            self.start_binding(self.active.relay + 1);
        }
    }

    /// The relay after `after` that is not the current one.
    fn standby_candidate(&self, after: usize) -> Option<usize> {
        let n = self.relays();
        (1..=n)
            .map(|k| (after + k) % n)
            .find(|&r| r != self.active.relay)
    }

    /// With hot standby on and the current relay bound, starts binding a standby if there is
    /// none.
    fn ensure_standby(&mut self, now: Instant) {
        if self.config.standby.is_none() || self.standby.is_some() || !self.active.is_bound() {
            return;
        }
        if let Some(relay) = self.standby_candidate(self.active.relay) {
            self.standby = Some(Path::binding(relay, now));
        }
    }

    /// The standby relay refused, timed out or fell silent: try the next one after a pause.
    fn standby_failed(&mut self, now: Instant) {
        let (Some(s), Some(p)) = (self.config.standby, self.standby) else {
            return;
        };
        self.standby = self.standby_candidate(p.relay).map(|relay| Path {
            phase: Phase::Waiting {
                until: now + s.retry_after,
            },
            ..Path::binding(relay, now)
        });
        self.publish_standby();
    }

    fn end(&mut self, err: ClientError) {
        self.ended = true;
        self.link.end(err);
    }

    /// When the driver next has something to do without input.
    fn deadline(&self) -> Instant {
        if self.ended {
            return Instant::now() + Duration::from_secs(3600);
        }
        let active = self
            .active
            .deadline(self.config.keepalive_interval, self.config.dead_after);
        match (self.config.standby, self.standby) {
            (Some(s), Some(p)) => active.min(p.deadline(s.keepalive_interval, s.dead_after)),
            _ => active,
        }
    }

    /// What `path`'s timers ask for now, advancing its retransmission timer.
    fn due(&self, path: &mut Path, now: Instant, keepalive: Duration, dead_after: Duration) -> Due {
        match &mut path.phase {
            Phase::Binding(b) => {
                if now < b.next {
                    return Due::Nothing;
                }
                if now.duration_since(b.started) >= self.config.bind_timeout {
                    return Due::Failed;
                }
                if b.rto.is_zero() {
                    b.asked = now;
                }
                b.rto = if b.rto.is_zero() {
                    self.config.bind_rto
                } else {
                    (b.rto * 2).min(Duration::from_secs(1))
                };
                b.next = now + b.rto;
                Due::Bind
            }
            Phase::Bound => {
                if now.duration_since(path.last_rx) >= path.dead_after(keepalive, dead_after) {
                    Due::Failed
                } else if now.duration_since(path.last_rx.max(path.last_keepalive)) >= keepalive {
                    path.last_keepalive = now;
                    let txn = rand::random();
                    path.probe = Some(txn);
                    Due::Keepalive(txn)
                } else {
                    Due::Nothing
                }
            }
            Phase::Waiting { until } => {
                if now < *until {
                    return Due::Nothing;
                }
                path.phase = Phase::Binding(Bind::new(now));
                self.due(path, now, keepalive, dead_after)
            }
        }
    }

    async fn send_bind(&self, path: &Path) {
        if let Phase::Binding(b) = &path.phase {
            let msg = wire::bind(&self.token, b.txn, b.cookie.as_ref());
            let _ = self.socket.send_to(&msg, self.relay_addr(path.relay)).await;
        }
    }

    async fn send_keepalive(&self, relay: usize, txn: [u8; 8]) {
        let _ = self
            .socket
            .send_to(&wire::keepalive(txn), self.relay_addr(relay))
            .await;
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        let mut active = self.active;
        let due = self.due(
            &mut active,
            now,
            self.config.keepalive_interval,
            self.config.dead_after,
        );
        self.active = active;
        match due {
            Due::Nothing => {}
            Due::Bind => self.send_bind(&active).await,
            Due::Keepalive(txn) => self.send_keepalive(active.relay, txn).await,
            Due::Failed => match active.phase {
                Phase::Binding(_)
                    if !self.standby.is_some_and(|p| p.is_bound())
                        && (active.relay + 1).is_multiple_of(self.relays())
                        && self.link.shared.counters.binds.load(Relaxed) == 0 =>
                {
                    // Every relay tried once and none ever answered: give up.
                    self.end(ClientError::Unreachable);
                    return;
                }
                _ => {
                    tracing::debug!(relay = active.relay, "relay silent, moving on");
                    self.fail_over(now);
                }
            },
        }
        let (Some(s), Some(mut standby)) = (self.config.standby, self.standby) else {
            return;
        };
        let due = self.due(&mut standby, now, s.keepalive_interval, s.dead_after);
        self.standby = Some(standby);
        match due {
            Due::Nothing => {}
            Due::Bind => self.send_bind(&standby).await,
            Due::Keepalive(txn) => self.send_keepalive(standby.relay, txn).await,
            Due::Failed => self.standby_failed(now),
        }
    }

    async fn on_datagram(&mut self, pkt: &[u8], from: SocketAddr) {
        if self.ended {
            return;
        }
        let role = if from == self.relay_addr(self.active.relay) {
            Role::Active
        } else if self.standby.is_some_and(|p| {
            !matches!(p.phase, Phase::Waiting { .. }) && from == self.relay_addr(p.relay)
        }) {
            Role::Standby
        } else {
            self.link.shared.counters.foreign.fetch_add(1, Relaxed);
            return;
        };
        let now = Instant::now();
        match wire::classify(pkt) {
            Class::Rtp | Class::Dtls => {
                match role {
                    Role::Active => {
                        if self.active.is_bound() {
                            self.active.last_rx = now;
                        }
                    }
                    Role::Standby => {
                        let hold = self.config.standby.map_or(Duration::ZERO, |s| s.hold);
                        if let Some(p) = self.standby.as_mut().filter(|p| p.is_bound()) {
                            p.last_rx = now;
                            // The others moved there: follow them.
                            if self.switched.is_none_or(|t| now.duration_since(t) >= hold) {
                                self.switch(now);
                            }
                        }
                    }
                }
                self.link.deliver(Bytes::copy_from_slice(pkt), from, now);
            }
            Class::Control => {
                if let Ok(msg) = wire::parse_relay(pkt) {
                    match role {
                        Role::Active => self.on_control(msg, now).await,
                        Role::Standby => self.on_standby_control(msg, now).await,
                    }
                }
            }
            Class::Other => {}
        }
    }

    async fn on_control(&mut self, msg: RelayMessage<'_>, now: Instant) {
        let session = self.token.claims().session.0;
        match (&mut self.active.phase, msg) {
            (Phase::Binding(b), RelayMessage::Challenge { txn, cookie }) if txn == b.txn => {
                b.cookie = Some(cookie.try_into().expect("parser checked the length"));
                b.rto = self.config.bind_rto;
                b.next = now + b.rto;
                b.asked = now;
                let path = self.active;
                self.send_bind(&path).await;
            }
            (Phase::Binding(b), RelayMessage::BindOk { txn, .. }) if txn == b.txn => {
                let relay = self.active.relay;
                self.active.on_bind_ok(now);
                self.active.phase = Phase::Bound;
                self.active.last_rx = now;
                self.active.last_keepalive = now;
                self.link.shared.counters.binds.fetch_add(1, Relaxed);
                self.link.status.send_replace(LegStatus::Bound { relay });
                self.ensure_standby(now);
            }
            (Phase::Binding(b), RelayMessage::Error { txn, code }) if txn == b.txn => {
                match ErrorCode::from_u16(code) {
                    Some(
                        c @ (ErrorCode::Unauthorized
                        | ErrorCode::Expired
                        | ErrorCode::SessionClosed),
                    ) => {
                        self.end(ClientError::Refused(c));
                    }
                    // Full, draining or rate limited: the next relay may take us.
                    _ if self.relays() > 1 => self.fail_over(now),
                    _ => {}
                }
            }
            (Phase::Bound, RelayMessage::KeepaliveAck { txn }) => {
                self.active.on_keepalive_ack(txn, now);
            }
            (Phase::Bound, RelayMessage::Error { code, .. })
                if code == ErrorCode::NotBound as u16 =>
            {
                // The relay lost our leg (it restarted): carry on on the standby if it is
                // bound, and bind again there.
                if self.standby.is_some_and(|p| p.is_bound()) {
                    self.switch(now);
                    if let Some(p) = self.standby.as_mut() {
                        *p = Path::binding(p.relay, now);
                    }
                    self.publish_standby();
                } else {
                    self.start_binding(self.active.relay);
                }
            }
            (_, RelayMessage::Close { code, session: s }) if s == session => {
                match ErrorCode::from_u16(code) {
                    Some(ErrorCode::Draining) => self.fail_over(now),
                    c => self.end(ClientError::Closed(c.unwrap_or(ErrorCode::SessionClosed))),
                }
            }
            _ => {}
        }
    }

    async fn on_standby_control(&mut self, msg: RelayMessage<'_>, now: Instant) {
        let session = self.token.claims().session.0;
        let Some(p) = self.standby.as_mut() else {
            return;
        };
        match (&mut p.phase, msg) {
            (Phase::Binding(b), RelayMessage::Challenge { txn, cookie }) if txn == b.txn => {
                b.cookie = Some(cookie.try_into().expect("parser checked the length"));
                b.rto = self.config.bind_rto;
                b.next = now + b.rto;
                b.asked = now;
                let path = *p;
                self.send_bind(&path).await;
            }
            (Phase::Binding(b), RelayMessage::BindOk { txn, .. }) if txn == b.txn => {
                p.on_bind_ok(now);
                p.phase = Phase::Bound;
                p.last_rx = now;
                p.last_keepalive = now;
                self.link
                    .shared
                    .counters
                    .standby_binds
                    .fetch_add(1, Relaxed);
                self.publish_standby();
            }
            // Refused, full, draining or rate limited: another relay, or this one later. (A
            // refusal for good reaches the current relay too, which ends the leg.)
            (Phase::Binding(b), RelayMessage::Error { txn, .. }) if txn == b.txn => {
                self.standby_failed(now);
            }
            (Phase::Bound, RelayMessage::KeepaliveAck { txn }) => p.on_keepalive_ack(txn, now),
            (Phase::Bound, RelayMessage::Error { code, .. })
                if code == ErrorCode::NotBound as u16 =>
            {
                *p = Path::binding(p.relay, now);
                self.publish_standby();
            }
            (_, RelayMessage::Close { code, session: s }) if s == session => {
                match ErrorCode::from_u16(code) {
                    Some(ErrorCode::Draining) => self.standby_failed(now),
                    c => self.end(ClientError::Closed(c.unwrap_or(ErrorCode::SessionClosed))),
                }
            }
            _ => {}
        }
    }

    async fn run(mut self) {
        let mut buf = vec![0u8; 2048];
        loop {
            if self.ended {
                return;
            }
            let deadline = self.deadline();
            tokio::select! {
                // What has arrived first: after a stall (a busy machine, a suspended process)
                // the datagrams waiting in the socket are signs of life that a timer due
                // meanwhile must not overlook.
                biased;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_silence_allowed_follows_the_round_trip_time() {
        let (k, dead) = (Duration::from_millis(30), Duration::from_millis(150));
        let mut p = Path::binding(0, Instant::now());
        // No sample yet: the configured silence.
        assert_eq!(p.dead_after(k, dead), dead);
        // A near relay: still the configured silence.
        for _ in 0..20 {
            p.rtt.sample(Duration::from_millis(2));
        }
        assert_eq!(p.dead_after(k, dead), dead);
        // A far one (200 ms, steady): a KEEPALIVE interval plus about the round trip.
        for _ in 0..50 {
            p.rtt.sample(Duration::from_millis(200));
        }
        let d = p.dead_after(k, dead);
        assert!(
            d > Duration::from_millis(230) && d < Duration::from_millis(260),
            "{d:?}"
        );
        // A jittery one: more.
        for i in 0..50 {
            p.rtt
                .sample(Duration::from_millis(if i % 2 == 0 { 100 } else { 300 }));
        }
        assert!(p.dead_after(k, dead) > Duration::from_millis(500));
    }
}
