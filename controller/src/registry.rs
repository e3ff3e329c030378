//! The relays this controller knows: who they are, whether they are up, how loaded, and the
//! open `Attach` streams through which revocations reach them.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use veil_proto::v1::{ControllerMessage, LoadReport, RelayHello};

use crate::placement::Candidate;

/// How a relay is doing, from this controller's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Attached and reporting.
    Up,
    /// Silent for longer than the timeout, or its streams closed.
    Down,
}

impl Health {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// What a relay told us about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayInfo {
    /// Node id.
    pub node_id: String,
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// UDP address for clients.
    pub udp_address: String,
    /// QUIC address for clients; empty without QUIC.
    pub quic_address: String,
    /// QUIC certificate fingerprint.
    pub quic_cert_sha256: Vec<u8>,
    /// Whether the relay serves TURN on its UDP address.
    pub turn_udp: bool,
    /// TURN over TCP address, `ip:port`; empty without.
    pub turn_tcp_address: String,
    /// TURN over TLS address, `host:port`; empty without.
    pub turn_tls_address: String,
    /// Most legs.
    pub capacity_legs: u64,
    /// Changes when the relay restarts.
    pub instance_id: u64,
}

impl From<&RelayHello> for RelayInfo {
    fn from(h: &RelayHello) -> Self {
        Self {
            node_id: h.node_id.clone(),
            region: h.region.clone(),
            zone: h.zone.clone(),
            udp_address: h.udp_address.clone(),
            quic_address: h.quic_address.clone(),
            quic_cert_sha256: h.quic_cert_sha256.clone(),
            turn_udp: h.turn_udp,
            turn_tcp_address: h.turn_tcp_address.clone(),
            turn_tls_address: h.turn_tls_address.clone(),
            capacity_legs: h.capacity_legs,
            instance_id: h.instance_id,
        }
    }
}

/// One relay's entry, as placement and operators see it.
#[derive(Debug, Clone)]
pub struct RelayView {
    /// Identity and endpoints.
    pub info: RelayInfo,
    /// Up or down.
    pub health: Health,
    /// Draining (reported by the relay, or set by an operator here).
    pub draining: bool,
    /// Its last load report.
    pub load: LoadReport,
    /// Legs placed on it that its reports do not show bound yet.
    pub pending_legs: u64,
    /// When it was last heard from.
    pub last_seen: Instant,
}

impl RelayView {
    /// The view placement works on.
    pub fn candidate(&self) -> Candidate {
        Candidate {
            node_id: self.info.node_id.clone(),
            region: self.info.region.clone(),
            zone: self.info.zone.clone(),
            healthy: self.health == Health::Up,
            draining: self.draining || self.load.draining,
            capacity_legs: self.info.capacity_legs,
            bound_legs: self.load.bound_legs,
            pending_legs: self.pending_legs,
            cpu: self.load.cpu_utilization,
        }
    }
}

/// How long legs placed on a relay count as pending if its reports never show them bound
/// (participants that never joined).
pub const PENDING_TTL: Duration = Duration::from_secs(10);

struct Entry {
    view: RelayView,
    /// Placements not yet seen bound in a load report, oldest first: `(when, legs)`.
    pending: std::collections::VecDeque<(Instant, u64)>,
    /// Open streams to this relay (normally one; two while a reconnect overlaps the old one).
    links: HashMap<u64, mpsc::Sender<Result<ControllerMessage, tonic::Status>>>,
    /// An operator's drain order (its deadline), which sticks across reconnects.
    admin_drain: Option<u32>,
}

impl Entry {
    /// Drops placements older than [`PENDING_TTL`] and then `absorbed` legs (newly reported
    /// bound) from the oldest placements, keeping the pending total in step.
    fn settle(&mut self, absorbed: u64, now: Instant) {
        while self
            .pending
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > PENDING_TTL)
        {
            if let Some((_, legs)) = self.pending.pop_front() {
                self.view.pending_legs -= legs;
            }
        }
        let mut left = absorbed;
        while left > 0 {
            let Some(front) = self.pending.front_mut() else {
                break;
            };
            let take = front.1.min(left);
            front.1 -= take;
            left -= take;
            self.view.pending_legs -= take;
            if front.1 == 0 {
                self.pending.pop_front();
            }
        }
        // A running total, kept as placements come and go: summing the queue here cost a
        // controller most of its CPU under a burst of allocations (docs/PERFORMANCE.md).
        debug_assert_eq!(
            self.view.pending_legs,
            self.pending.iter().map(|(_, l)| l).sum::<u64>()
        );
    }

    fn state(&self) -> (Health, bool) {
        (self.view.health, self.view.draining)
    }

    fn derive_draining(&mut self) {
        self.view.draining = self.admin_drain.is_some() || self.view.load.draining;
    }

    fn send(&mut self, msg: &ControllerMessage, node_id: &str) {
        self.links.retain(|_, tx| match tx.try_send(Ok(msg.clone())) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(node_id = %node_id, "relay stream backed up; cutting it off to resync");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }
}

/// A change in how this controller sees a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayEvent {
    /// The relay.
    pub node_id: String,
    /// What changed.
    pub change: Change,
}

/// The kinds of [`RelayEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Stopped reporting.
    Down,
    /// Reporting again.
    Up,
    /// Started draining.
    Draining,
    /// Back in service.
    Undrained,
}

/// The registry of relays.
pub struct Registry {
    entries: Mutex<HashMap<String, Entry>>,
    next_link: std::sync::atomic::AtomicU64,
    events: tokio::sync::broadcast::Sender<RelayEvent>,
    /// Bumped at every attach, detach and change of a relay's state, new relays included
    /// (which `events` does not report): what readiness watchers wake up on.
    generation: tokio::sync::watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
            next_link: std::sync::atomic::AtomicU64::new(0),
            events: tokio::sync::broadcast::channel(1024).0,
            generation: tokio::sync::watch::channel(0).0,
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// Queue depth of one relay's outbound stream. A relay that falls this far behind is cut off;
/// on reconnect it receives every revocation in force, so nothing is lost.
pub const LINK_QUEUE: usize = 4096;

fn drain_message(deadline: Option<u32>) -> ControllerMessage {
    ControllerMessage {
        kind: Some(veil_proto::v1::controller_message::Kind::Drain(
            veil_proto::v1::Drain {
                draining: deadline.is_some(),
                deadline_seconds: deadline.unwrap_or(0),
            },
        )),
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // Every update is a single field write or map operation: a panic elsewhere cannot leave
        // an entry half-written, so a poisoned lock is safe to reuse.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to relay state changes.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<RelayEvent> {
        self.events.subscribe()
    }

    /// Wakes up whoever watches [`Self::changes`].
    fn bump(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// A receiver that sees a change whenever a relay attaches, detaches, goes down or changes
    /// state: for watchers of the controller's readiness.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Emits the events between two states of a relay.
    fn changed(&self, node_id: &str, before: Option<(Health, bool)>, after: (Health, bool)) {
        self.bump();
        let emit = |change| {
            // No subscriber is fine: nobody is watching.
            let _ = self.events.send(RelayEvent {
                node_id: node_id.to_string(),
                change,
            });
        };
        let (bh, bd) = before.unwrap_or((Health::Down, false));
        match (bh, after.0) {
            (Health::Down, Health::Up) if before.is_some() => emit(Change::Up),
            (Health::Up, Health::Down) => emit(Change::Down),
            _ => {}
        }
        match (bd, after.1) {
            (false, true) => emit(Change::Draining),
            (true, false) => emit(Change::Undrained),
            _ => {}
        }
    }

    /// Registers a stream from a relay; returns its link id.
    pub fn attach(
        &self,
        hello: &RelayHello,
        tx: mpsc::Sender<Result<ControllerMessage, tonic::Status>>,
    ) -> u64 {
        let link = self
            .next_link
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let info = RelayInfo::from(hello);
        let mut entries = self.lock();
        let now = Instant::now();
        let known = entries.contains_key(&info.node_id);
        let entry = entries
            .entry(info.node_id.clone())
            .or_insert_with(|| Entry {
                view: RelayView {
                    info: info.clone(),
                    health: Health::Down,
                    draining: false,
                    load: LoadReport::default(),
                    pending_legs: 0,
                    last_seen: now,
                },
                links: HashMap::new(),
                pending: std::collections::VecDeque::new(),
                admin_drain: None,
            });
        let before = known.then(|| entry.state());
        if entry.view.info.instance_id != info.instance_id {
            // The relay restarted: it holds no legs any more.
            entry.view.load = LoadReport::default();
            entry.pending.clear();
            entry.view.pending_legs = 0;
        }
        entry.view.load.draining = hello.draining;
        entry.view.info = info;
        entry.view.health = Health::Up;
        entry.view.last_seen = now;
        entry.derive_draining();
        if entry.admin_drain.is_some() {
            // The order outlives the stream it was sent on: a relay that reconnects gets it again.
            let _ = tx.try_send(Ok(drain_message(entry.admin_drain)));
        }
        entry.links.insert(link, tx);
        let after = entry.state();
        drop(entries);
        self.changed(&hello.node_id, before, after);
        link
    }

    /// Records a load report.
    pub fn report(&self, node_id: &str, load: LoadReport) {
        let mut entries = self.lock();
        let Some(e) = entries.get_mut(node_id) else {
            return;
        };
        let before = e.state();
        // Legs that appeared since the last report are (some of) the ones placed here: they
        // stop counting as pending. Counting pending legs across reports, rather than resetting
        // them at each one, keeps a burst of allocations whose participants have not bound yet
        // from landing on whichever relay reported last.
        let now = Instant::now();
        let absorbed = load.bound_legs.saturating_sub(e.view.load.bound_legs);
        e.view.load = load;
        e.settle(absorbed, now);
        e.derive_draining();
        e.view.health = Health::Up;
        e.view.last_seen = now;
        let after = e.state();
        drop(entries);
        self.changed(node_id, Some(before), after);
    }

    /// Forgets a stream; the relay is down once it has none.
    pub fn detach(&self, node_id: &str, link: u64) {
        let mut entries = self.lock();
        let Some(e) = entries.get_mut(node_id) else {
            return;
        };
        let before = e.state();
        e.links.remove(&link);
        if e.links.is_empty() {
            e.view.health = Health::Down;
        }
        let after = e.state();
        drop(entries);
        self.changed(node_id, Some(before), after);
    }

    /// Marks relays silent for longer than `timeout` as down; returns their node ids.
    pub fn sweep(&self, timeout: Duration) -> Vec<String> {
        let now = Instant::now();
        let mut downed = Vec::new();
        for (id, e) in self.lock().iter_mut() {
            if e.view.health == Health::Up && now.duration_since(e.view.last_seen) > timeout {
                e.view.health = Health::Down;
                downed.push(id.clone());
            }
        }
        if !downed.is_empty() {
            self.bump();
        }
        for id in &downed {
            let _ = self.events.send(RelayEvent {
                node_id: id.clone(),
                change: Change::Down,
            });
        }
        downed
    }

    /// Notes that `legs` legs were placed on `node_id`.
    pub fn note_placed(&self, node_id: &str, legs: u64) {
        if let Some(e) = self.lock().get_mut(node_id) {
            let now = Instant::now();
            e.pending.push_back((now, legs));
            e.view.pending_legs += legs;
            e.settle(0, now);
        }
    }

    /// An operator's drain order: `Some(deadline_seconds)` drains, `None` puts the relay back
    /// in service. The order goes to the relay at once (and again whenever it reconnects) and
    /// placement here stops choosing it. Returns the relay's view, or `None` if it is unknown.
    pub fn order_drain(&self, node_id: &str, deadline: Option<u32>) -> Option<RelayView> {
        let mut entries = self.lock();
        let e = entries.get_mut(node_id)?;
        let before = e.state();
        e.admin_drain = deadline;
        if deadline.is_none() {
            // The relay's own report will say so too; do not wait for it.
            e.view.load.draining = false;
        }
        e.derive_draining();
        e.send(&drain_message(deadline), node_id);
        let (after, view) = (e.state(), e.view.clone());
        drop(entries);
        self.changed(node_id, Some(before), after);
        Some(view)
    }

    /// Every relay's view, sorted by node id.
    pub fn views(&self) -> Vec<RelayView> {
        let mut v: Vec<RelayView> = self.lock().values().map(|e| e.view.clone()).collect();
        v.sort_by(|a, b| a.info.node_id.cmp(&b.info.node_id));
        v
    }

    /// One relay's view.
    pub fn view(&self, node_id: &str) -> Option<RelayView> {
        self.lock().get(node_id).map(|e| e.view.clone())
    }

    /// Number of relays up.
    pub fn up(&self) -> usize {
        self.lock()
            .values()
            .filter(|e| e.view.health == Health::Up)
            .count()
    }

    /// Ends every relay stream (at shutdown).
    pub fn close_links(&self) {
        for e in self.lock().values_mut() {
            e.links.clear();
        }
    }

    /// Sends `msg` to every attached relay. A relay whose queue is full is cut off (it
    /// re-attaches and then receives the full state).
    pub fn broadcast(&self, msg: &ControllerMessage) {
        for (id, e) in self.lock().iter_mut() {
            e.send(msg, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(id: &str) -> RelayHello {
        RelayHello {
            node_id: id.into(),
            udp_address: "127.0.0.1:1".into(),
            capacity_legs: 100,
            ..Default::default()
        }
    }

    #[test]
    fn pending_legs_last_until_reported_bound() {
        let r = Registry::default();
        let (tx, _rx) = mpsc::channel(4);
        r.attach(&hello("a"), tx);
        r.note_placed("a", 2);
        r.note_placed("a", 3);
        assert_eq!(r.view("a").unwrap().pending_legs, 5);
        // A report without new legs changes nothing: those participants have not bound yet.
        r.report("a", LoadReport::default());
        assert_eq!(r.view("a").unwrap().pending_legs, 5);
        // Two legs bound: they are no longer pending, the other three still are.
        r.report(
            "a",
            LoadReport {
                bound_legs: 2,
                ..Default::default()
            },
        );
        assert_eq!(r.view("a").unwrap().pending_legs, 3);
        r.report(
            "a",
            LoadReport {
                bound_legs: 9,
                ..Default::default()
            },
        );
        assert_eq!(r.view("a").unwrap().pending_legs, 0);
    }

    #[test]
    fn state_changes_are_events() {
        let r = Registry::default();
        let mut ev = r.subscribe();
        let (tx, _rx) = mpsc::channel(4);
        let link = r.attach(&hello("a"), tx);
        r.order_drain("a", Some(5)).unwrap();
        r.detach("a", link);
        let (tx, _rx2) = mpsc::channel(4);
        r.attach(&hello("a"), tx);
        r.order_drain("a", None).unwrap();
        let got: Vec<Change> = std::iter::from_fn(|| ev.try_recv().ok())
            .map(|e| e.change)
            .collect();
        assert_eq!(
            got,
            vec![
                Change::Draining,
                Change::Down,
                Change::Up,
                Change::Undrained
            ]
        );
    }
}
