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
    /// Legs placed on it since that report.
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

struct Entry {
    view: RelayView,
    /// Open streams to this relay (normally one; two while a reconnect overlaps the old one).
    links: HashMap<u64, mpsc::Sender<Result<ControllerMessage, tonic::Status>>>,
    /// Drain requested through the admin API (sticks across reconnects).
    admin_draining: bool,
}

/// The registry of relays.
#[derive(Default)]
pub struct Registry {
    entries: Mutex<HashMap<String, Entry>>,
    next_link: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// Queue depth of one relay's outbound stream. A relay that falls this far behind is cut off;
/// on reconnect it receives every revocation in force, so nothing is lost.
pub const LINK_QUEUE: usize = 4096;

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // Every update is a single field write or map operation: a panic elsewhere cannot leave
        // an entry half-written, so a poisoned lock is safe to reuse.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
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
        let entry = entries
            .entry(info.node_id.clone())
            .or_insert_with(|| Entry {
                view: RelayView {
                    info: info.clone(),
                    health: Health::Up,
                    draining: false,
                    load: LoadReport::default(),
                    pending_legs: 0,
                    last_seen: now,
                },
                links: HashMap::new(),
                admin_draining: false,
            });
        if entry.view.info.instance_id != info.instance_id {
            // The relay restarted: it holds no legs any more.
            entry.view.load = LoadReport::default();
            entry.view.pending_legs = 0;
        }
        entry.view.info = info;
        entry.view.health = Health::Up;
        entry.view.last_seen = now;
        entry.view.draining = entry.admin_draining || hello.draining;
        entry.links.insert(link, tx);
        link
    }

    /// Records a load report.
    pub fn report(&self, node_id: &str, load: LoadReport) {
        if let Some(e) = self.lock().get_mut(node_id) {
            e.view.draining = e.admin_draining || load.draining;
            e.view.load = load;
            e.view.pending_legs = 0;
            e.view.health = Health::Up;
            e.view.last_seen = Instant::now();
        }
    }

    /// Forgets a stream; the relay is down once it has none.
    pub fn detach(&self, node_id: &str, link: u64) {
        if let Some(e) = self.lock().get_mut(node_id) {
            e.links.remove(&link);
            if e.links.is_empty() {
                e.view.health = Health::Down;
            }
        }
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
        downed
    }

    /// Notes that `legs` legs were placed on `node_id`.
    pub fn note_placed(&self, node_id: &str, legs: u64) {
        if let Some(e) = self.lock().get_mut(node_id) {
            e.view.pending_legs += legs;
        }
    }

    /// Sets or clears an operator's drain on a relay; false if the relay is unknown.
    pub fn set_admin_draining(&self, node_id: &str, draining: bool) -> bool {
        match self.lock().get_mut(node_id) {
            Some(e) => {
                e.admin_draining = draining;
                e.view.draining = draining || e.view.load.draining;
                true
            }
            None => false,
        }
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

    /// Sends `msg` to every attached relay. A relay whose queue is full is cut off (it
    /// re-attaches and then receives the full state).
    pub fn broadcast(&self, msg: &ControllerMessage) {
        for (id, e) in self.lock().iter_mut() {
            e.links.retain(|_, tx| match tx.try_send(Ok(msg.clone())) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(node_id = %id, "relay stream backed up; cutting it off to resync");
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        }
    }
}
