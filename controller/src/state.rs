//! The controller's state and operations, apart from gRPC: sessions (with `call_id`
//! idempotency), placement on relays, token minting, release and revocation.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use veil_proto::v1 as pb;
use veil_protocol::{KeyRing, Limits, SessionId, Ticket};

use crate::api::{
    AllocateError, AllocateRequest, ExtendError, NotFound, Participant, ParticipantError, Transport,
};
use crate::metrics::{ControllerMetrics, PlacementRole};
use crate::placement::{self, RegionMap};
use crate::quota::{Credential, Quotas};
use crate::registry::{Registry, RelayInfo};

/// A relay's part in a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Bind here first.
    Primary,
    /// Move here when the primary fails.
    Backup,
}

/// One leg of a session.
#[derive(Debug, Clone)]
pub struct Leg {
    /// Leg index.
    pub index: u8,
    /// The leg token.
    pub token: Vec<u8>,
    /// Transport the participant should use.
    pub transport: Transport,
    /// The participant, as allocated or added (compared for `AddParticipant` idempotency).
    pub participant: Participant,
    /// Removed by `RemoveParticipant`: revoked on every relay, not listed any more.
    pub removed: bool,
}

impl Leg {
    fn to_pb(&self, s: &Session, relays: &[pb::RelayEndpoint]) -> pb::Leg {
        pb::Leg {
            participant_id: self.participant.id.clone(),
            leg_index: u32::from(self.index),
            token: self.token.clone(),
            expires_at: Some(s.expires_at()),
            transport: match self.transport {
                Transport::Udp => pb::Transport::Udp,
                Transport::Quic => pb::Transport::Quic,
            } as i32,
            relays: relays.to_vec(),
            ice_servers: ice_servers(&self.token, &s.relays),
            // What the leg does is this replica's own hearing of the relays (crate::legs),
            // added where an answer reports it.
            activity: None,
        }
    }
}

/// What changed in a session, as its watchers hear it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionChange {
    /// A participant was added or removed.
    Participants,
    /// Its expiry moved later (ExtendSession).
    Extended,
}

/// What a participant change did: the leg, and whether this call made the change (false for
/// a retry that found it made).
#[derive(Debug, Clone)]
pub struct Changed {
    /// The session as it is now.
    pub session: pb::Session,
    /// The participant's leg.
    pub leg: pb::Leg,
    /// True when this call changed the session.
    pub changed: bool,
}

/// A session as the controller stores it.
#[derive(Debug)]
pub struct Session {
    /// Session id.
    pub id: u64,
    /// The call it serves.
    pub call_id: String,
    /// Participants as requested (for idempotency checks).
    pub participants: Vec<Participant>,
    /// Every leg minted for the session, in index order: the allocation's, then those added,
    /// removed ones included (an index is never minted twice).
    legs: Mutex<Vec<Leg>>,
    /// Primary, then backup.
    pub relays: Vec<(RelayInfo, Role)>,
    /// Expiry, Unix milliseconds: the tokens', or later once extended (never earlier).
    expires_unix_ms: AtomicU64,
    /// The expiry the session was allocated with, as its first tokens carry it.
    allocated_expiry_unix_ms: u64,
    /// The signaling credential that allocated it, whose live-sessions quota it counts against.
    pub owner: Credential,
    released: AtomicBool,
    /// Counted against its owner's quota: until released or expired, cleared exactly once.
    live: AtomicBool,
}

impl Session {
    /// True once released.
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::Relaxed)
    }

    /// When the session expires, Unix milliseconds (ExtendSession moves it later).
    pub fn expires_unix_ms(&self) -> u64 {
        self.expires_unix_ms.load(Ordering::Relaxed)
    }

    /// True once ExtendSession moved the expiry past the allocation's.
    fn extended(&self) -> bool {
        self.expires_unix_ms() > self.allocated_expiry_unix_ms
    }

    fn expired(&self, now_unix_ms: u64) -> bool {
        self.expires_unix_ms() <= now_unix_ms
    }

    fn expires_at(&self) -> prost_types::Timestamp {
        let ms = self.expires_unix_ms();
        prost_types::Timestamp {
            seconds: (ms / 1000) as i64,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        }
    }

    /// The legs, held briefly (no await while held).
    fn legs(&self) -> MutexGuard<'_, Vec<Leg>> {
        // Every change is one push or one flag: a panic leaves the list consistent.
        self.legs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The participant of leg `index`, if the session minted it.
    pub fn participant_of(&self, index: u8) -> Option<String> {
        self.legs()
            .iter()
            .find(|l| l.index == index)
            .map(|l| l.participant.id.clone())
    }

    /// The indices of the legs removed so far, for revocations.
    pub(crate) fn removed_legs(&self) -> Vec<u8> {
        self.legs()
            .iter()
            .filter(|l| l.removed)
            .map(|l| l.index)
            .collect()
    }

    fn relays_pb(&self) -> Vec<pb::RelayEndpoint> {
        self.relays
            .iter()
            .map(|(r, role)| pb::RelayEndpoint {
                node_id: r.node_id.clone(),
                region: r.region.clone(),
                udp_address: r.udp_address.clone(),
                quic_address: r.quic_address.clone(),
                quic_cert_sha256: r.quic_cert_sha256.clone(),
                role: match role {
                    Role::Primary => pb::RelayRole::Primary,
                    Role::Backup => pb::RelayRole::Backup,
                } as i32,
            })
            .collect()
    }

    /// The public API's view of the session.
    pub fn to_pb(&self) -> pb::Session {
        let relays = self.relays_pb();
        let legs = self
            .legs()
            .iter()
            .filter(|l| !l.removed)
            .map(|l| l.to_pb(self, &relays))
            .collect();
        pb::Session {
            session_id: veil_proto::format_session_id(self.id),
            call_id: self.call_id.clone(),
            expires_at: Some(self.expires_at()),
            legs,
            state: if self.is_released() {
                pb::SessionState::Released
            } else {
                pb::SessionState::Active
            } as i32,
            relays,
        }
    }
}

/// Why a controller is not ready (see [`Controller::readiness`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// No relay is attached and up: every allocation would fail.
    #[error("no relay attached")]
    NoRelay,
    /// Shutdown has begun: relay links and watches are closing.
    #[error("draining: shutting down")]
    Draining,
    /// Starting: the peer replicas' sessions are not all merged yet (each peer has sent its
    /// snapshot, or could not be reached).
    #[error("syncing sessions from peer replicas")]
    Syncing,
}

/// Unix milliseconds now.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the controller does, behind its gRPC services.
pub struct Controller {
    /// The relays.
    pub registry: Registry,
    /// What each session's legs are doing, as the relays report it here.
    pub legs: crate::legs::LegBook,
    by_id: DashMap<u64, Arc<Session>>,
    /// `call_id` → session id. Keyed by caller-chosen strings: DashMap's default (SipHash,
    /// randomly keyed) resists collision floods.
    by_call: DashMap<String, u64>,
    keys: RwLock<Arc<KeyRing>>,
    regions: RegionMap,
    limits: Limits,
    /// The controller's metrics.
    pub metrics: ControllerMetrics,
    /// Each signaling credential's quotas and usage.
    pub quotas: Quotas,
    released: tokio::sync::broadcast::Sender<u64>,
    /// Sessions whose participants changed, or that were extended.
    changes: tokio::sync::broadcast::Sender<(u64, SessionChange)>,
    /// Sessions created or changed by this replica (not those merged from peers), for the
    /// replicas that follow this one (`ReplicaService.Sync`).
    records: tokio::sync::broadcast::Sender<u64>,
    stopping: tokio::sync::watch::Sender<bool>,
    /// Peer replicas' sessions still being merged at start.
    syncing: AtomicBool,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("sessions", &self.by_id.len())
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// A controller signing with `keys`, placing by `regions`, giving each leg `limits`, holding
    /// signaling callers to `quotas`.
    pub fn new(
        keys: KeyRing,
        regions: RegionMap,
        limits: Limits,
        metrics: ControllerMetrics,
        quotas: Quotas,
    ) -> Self {
        Self {
            registry: Registry::default(),
            legs: crate::legs::LegBook::default(),
            // Pre-sized: growing a large map stalls allocations while its shards resize.
            by_id: DashMap::with_capacity(1 << 16),
            by_call: DashMap::with_capacity(1 << 16),
            keys: RwLock::new(Arc::new(keys)),
            regions,
            limits,
            metrics,
            quotas,
            released: tokio::sync::broadcast::channel(1024).0,
            changes: tokio::sync::broadcast::channel(1024).0,
            records: tokio::sync::broadcast::channel(4096).0,
            stopping: tokio::sync::watch::channel(false).0,
            syncing: AtomicBool::new(false),
        }
    }

    /// Marks whether the peer replicas' sessions are still being merged (not ready until they
    /// are).
    pub fn set_syncing(&self, syncing: bool) {
        self.syncing.store(syncing, Ordering::Relaxed);
    }

    /// Replaces the key ring (rotation): new tokens are signed with its signing key.
    pub fn set_keys(&self, keys: KeyRing) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
    }

    fn keys(&self) -> Arc<KeyRing> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Allocates a session for `owner`, or returns the live one already allocated for the same
    /// `call_id` and participants (whoever allocated it: a retry never counts against a quota).
    /// Returns whether it was created.
    pub fn allocate(
        &self,
        req: AllocateRequest,
        owner: Credential,
    ) -> Result<(Arc<Session>, bool), AllocateError> {
        let now = unix_ms();
        // The entry holds this call_id's shard lock while the session is placed and minted (no
        // await inside), so concurrent retries of one call cannot create two sessions.
        match self.by_call.entry(req.call_id.clone()) {
            Entry::Occupied(mut e) => {
                if let Some(existing) = self.by_id.get(e.get()).map(|s| s.clone())
                    && !existing.expired(now)
                {
                    if existing.is_released() {
                        return Err(AllocateError::Released);
                    }
                    if existing.participants != req.participants {
                        return Err(AllocateError::Conflict);
                    }
                    return Ok((existing, false));
                }
                let session = self.create_counted(&req, now, owner)?;
                e.insert(session.id);
                let _ = self.records.send(session.id);
                Ok((session, true))
            }
            Entry::Vacant(e) => {
                let session = self.create_counted(&req, now, owner)?;
                e.insert(session.id);
                let _ = self.records.send(session.id);
                Ok((session, true))
            }
        }
    }

    /// Creates a session if `owner` has room for one more live session.
    fn create_counted(
        &self,
        req: &AllocateRequest,
        now: u64,
        owner: Credential,
    ) -> Result<Arc<Session>, AllocateError> {
        self.quotas.begin_session(owner)?;
        self.create(req, now, owner)
            .inspect_err(|_| self.quotas.end_session(owner))
    }

    /// The session no longer counts against its owner's live-sessions quota (once only).
    fn end_live(&self, s: &Session) {
        if s.live.swap(false, Ordering::AcqRel) {
            self.quotas.end_session(s.owner);
        }
    }

    fn create(
        &self,
        req: &AllocateRequest,
        now: u64,
        owner: Credential,
    ) -> Result<Arc<Session>, AllocateError> {
        let views = self.registry.views();
        let candidates: Vec<_> = views.iter().map(|v| v.candidate()).collect();
        let legs = req.participants.len() as u64;
        let hints: Vec<&str> = req.participants.iter().map(|p| p.region.as_str()).collect();
        let placement =
            placement::place(&candidates, legs, &hints, &self.regions, &mut rand::rng())
                .map_err(|e| AllocateError::NoRelay(e.to_string()))?;
        let primary = &views[placement.primary];
        let backup = placement.backup.map(|i| &views[i]);
        self.registry.note_placed(&primary.info.node_id, legs);
        self.metrics.count_placement(PlacementRole::Primary);
        // The backup carries no traffic until a failover, so its load is not charged here.
        if backup.is_some() {
            self.metrics.count_placement(PlacementRole::Backup);
        }
        let quic_everywhere = !primary.info.quic_address.is_empty()
            && backup.is_none_or(|b| !b.info.quic_address.is_empty());

        let expires_unix_ms = now + req.ttl.as_millis() as u64;
        let keys = self.keys();
        let id = loop {
            let id: u64 = rand::random();
            if id != 0 && !self.by_id.contains_key(&id) {
                break id;
            }
        };
        let n = req.participants.len() as u8;
        let legs = req
            .participants
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let at = (id, i as u8, n, expires_unix_ms);
                self.mint_leg(&keys, at, p.clone(), quic_everywhere)
            })
            .collect();
        let mut relays = vec![(primary.info.clone(), Role::Primary)];
        relays.extend(backup.map(|b| (b.info.clone(), Role::Backup)));
        let session = Arc::new(Session {
            id,
            call_id: req.call_id.clone(),
            participants: req.participants.clone(),
            legs: Mutex::new(legs),
            relays,
            expires_unix_ms: AtomicU64::new(expires_unix_ms),
            allocated_expiry_unix_ms: expires_unix_ms,
            owner,
            released: AtomicBool::new(false),
            live: AtomicBool::new(true),
        });
        self.by_id.insert(id, session.clone());
        tracing::debug!(session = %SessionId(id), relay = %primary.info.node_id, legs = req.participants.len(), "session allocated");
        Ok(session)
    }

    /// A live (unexpired) session.
    pub fn get(&self, id: u64) -> Result<Arc<Session>, NotFound> {
        let s = self.by_id.get(&id).map(|s| s.clone()).ok_or(NotFound)?;
        if s.expired(unix_ms()) {
            Err(NotFound)
        } else {
            Ok(s)
        }
    }

    /// Mints leg `index` of `legs` of session `id` (expiring at `expires_unix_ms`) for `p`: its
    /// token, and its transport (QUIC only where every relay of the session serves it).
    fn mint_leg(
        &self,
        keys: &KeyRing,
        (id, index, legs, expires_unix_ms): (u64, u8, u8, u64),
        p: Participant,
        quic_everywhere: bool,
    ) -> Leg {
        let token = keys.mint(Ticket {
            key_id: keys.signing_key_id(),
            session: SessionId(id),
            leg: index,
            legs,
            expires_unix_ms,
            limits: self.limits,
        });
        let transport = match p.transport {
            Some(Transport::Quic) if quic_everywhere => Transport::Quic,
            _ => Transport::Udp,
        };
        Leg {
            index,
            token: token.to_bytes().to_vec(),
            transport,
            participant: p,
            removed: false,
        }
    }

    /// Adds `participant` to live session `id`: mints the next leg index, or returns the leg of
    /// that participant if they are in the call already (a retry). A participant removed before
    /// gets a new leg.
    pub fn add_participant(
        &self,
        id: u64,
        participant: Participant,
    ) -> Result<Changed, ParticipantError> {
        let s = self.get(id)?;
        if s.is_released() {
            return Err(ParticipantError::Released);
        }
        let relays = s.relays_pb();
        let mut legs = s.legs();
        if let Some(leg) = legs
            .iter()
            .find(|l| !l.removed && l.participant.id == participant.id)
        {
            if leg.participant != participant {
                return Err(ParticipantError::Conflict);
            }
            let leg = leg.to_pb(&s, &relays);
            drop(legs);
            return Ok(Changed {
                session: s.to_pb(),
                leg,
                changed: false,
            });
        }
        let index = legs.len();
        if index >= crate::api::MAX_PARTICIPANTS {
            return Err(ParticipantError::Full);
        }
        let index = index as u8;
        let quic_everywhere = s.relays.iter().all(|(r, _)| !r.quic_address.is_empty());
        let at = (id, index, index + 1, s.expires_unix_ms());
        let leg = self.mint_leg(&self.keys(), at, participant, quic_everywhere);
        let out = leg.to_pb(&s, &relays);
        legs.push(leg);
        drop(legs);
        if let Some((primary, _)) = s.relays.first() {
            self.registry.note_placed(&primary.node_id, 1);
        }
        let _ = self.changes.send((s.id, SessionChange::Participants));
        let _ = self.records.send(s.id);
        tracing::debug!(session = %SessionId(id), leg = index, "participant added");
        Ok(Changed {
            session: s.to_pb(),
            leg: out,
            changed: true,
        })
    }

    /// Removes participant `participant_id` from live session `id`: revokes their leg on every
    /// relay. Removing a removed participant succeeds again.
    pub fn remove_participant(
        &self,
        id: u64,
        participant_id: &str,
    ) -> Result<Changed, ParticipantError> {
        let s = self.get(id)?;
        let relays = s.relays_pb();
        let mut legs = s.legs();
        // Their leg in the call now, else the last one removed (a retry).
        let at = legs
            .iter()
            .position(|l| !l.removed && l.participant.id == participant_id)
            .or_else(|| {
                legs.iter()
                    .rposition(|l| l.participant.id == participant_id)
            })
            .ok_or(ParticipantError::NotFound)?;
        let changed = !legs[at].removed;
        legs[at].removed = true;
        let leg = legs[at].to_pb(&s, &relays);
        let index = legs[at].index;
        drop(legs);
        if changed {
            self.announce_removed(&s, index);
            let _ = self.changes.send((s.id, SessionChange::Participants));
            let _ = self.records.send(s.id);
            tracing::debug!(session = %SessionId(id), leg = index, "participant removed");
        }
        Ok(Changed {
            session: s.to_pb(),
            leg,
            changed,
        })
    }

    /// Subscribes to participant changes and extensions (session ids).
    pub fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<(u64, SessionChange)> {
        self.changes.subscribe()
    }

    /// Moves live session `id`'s expiry to `ttl` from now, never earlier than it was, and tells
    /// every relay: they honour the session's tokens (which stay the same) until then.
    pub fn extend(&self, id: u64, ttl: Duration) -> Result<Arc<Session>, ExtendError> {
        let s = self.get(id)?;
        if s.is_released() {
            return Err(ExtendError::Released);
        }
        let until = unix_ms() + ttl.as_millis() as u64;
        let before = s.expires_unix_ms.fetch_max(until, Ordering::Relaxed);
        if until <= before {
            return Ok(s);
        }
        self.announce_extended(&s, until);
        let _ = self.changes.send((s.id, SessionChange::Extended));
        let _ = self.records.send(s.id);
        tracing::debug!(session = %SessionId(id), ttl_secs = ttl.as_secs(), "session extended");
        Ok(s)
    }

    /// Every extension in force, for a relay that just attached: the expiry of each live
    /// session that is not released (a released one's revocation carries its expiry).
    pub fn extensions(&self) -> pb::Extend {
        let now = unix_ms();
        pb::Extend {
            sessions: self
                .by_id
                .iter()
                .filter(|s| !s.expired(now) && !s.is_released() && s.extended())
                .map(|s| pb::ExtendedSession {
                    session_id: s.id,
                    expires_unix_ms: s.expires_unix_ms(),
                })
                .collect(),
        }
    }

    /// Releases a session and tells every relay to stop serving it. Releasing a released
    /// session succeeds again.
    pub fn release(&self, id: u64) -> Result<Arc<Session>, NotFound> {
        let s = self.get(id)?;
        if !s.released.swap(true, Ordering::Relaxed) {
            self.end_live(&s);
            self.announce_released(&s);
            // No subscriber is fine: nobody is watching.
            let _ = self.released.send(s.id);
            let _ = self.records.send(s.id);
            tracing::debug!(session = %SessionId(id), "session released");
        }
        Ok(s)
    }

    /// Begins shutdown: ends every long-lived stream (relay links, session watches), so that the
    /// gRPC server's graceful shutdown, which waits for open calls, can finish. Relays reconnect
    /// to another replica (or this one, restarted); watchers resubscribe.
    pub fn begin_shutdown(&self) {
        self.stopping.send_replace(true);
        self.registry.close_links();
    }

    /// Whether this controller can serve signaling services now: the one notion of readiness,
    /// behind both `/readyz` and the gRPC health status of `SessionService` (and of the server
    /// as a whole, service `""`). A controller with no relay up could only answer
    /// `UNAVAILABLE`; one that is shutting down is going away.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if *self.stopping.borrow() {
            Err(NotReady::Draining)
        } else if self.syncing.load(Ordering::Relaxed) {
            Err(NotReady::Syncing)
        } else if self.registry.up() == 0 {
            Err(NotReady::NoRelay)
        } else {
            Ok(())
        }
    }

    /// True once shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Completes once shutdown has begun.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn stopping(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Subscribes to releases (session ids).
    pub fn subscribe_releases(&self) -> tokio::sync::broadcast::Receiver<u64> {
        self.released.subscribe()
    }

    /// Every revocation still in force, for a relay that just attached: released sessions,
    /// and the removed legs of sessions that go on.
    pub fn revocations(&self) -> pb::Revoke {
        let now = unix_ms();
        let mut out = pb::Revoke::default();
        for s in self.by_id.iter().filter(|s| !s.expired(now)) {
            if s.is_released() {
                out.sessions.push(pb::RevokedSession {
                    session_id: s.id,
                    expires_unix_ms: s.expires_unix_ms(),
                });
            } else {
                out.legs
                    .extend(s.removed_legs().into_iter().map(|leg| pb::RevokedLeg {
                        session_id: s.id,
                        leg_index: u32::from(leg),
                        expires_unix_ms: s.expires_unix_ms(),
                    }));
            }
        }
        out
    }

    /// Forgets expired sessions.
    pub fn expire(&self) {
        let now = unix_ms();
        self.by_id.retain(|_, s| {
            if s.expired(now) {
                self.end_live(s);
                false
            } else {
                true
            }
        });
        self.by_call.retain(|_, id| self.by_id.contains_key(id));
    }

    /// Number of live sessions (active or released, not yet expired).
    pub fn sessions(&self) -> usize {
        self.by_id.len()
    }

    /// Runs housekeeping until `stop` completes: expiry, and relay liveness (`relay_timeout`).
    pub async fn housekeeping(
        self: Arc<Self>,
        relay_timeout: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last_expire = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    for node in self.registry.sweep(relay_timeout) {
                        tracing::warn!(node_id = %node, "relay silent; marked down");
                        self.legs.relay_down(&node);
                    }
                    if last_expire.elapsed() > Duration::from_secs(5) {
                        self.expire();
                        self.legs.sweep(|id| self.by_id.contains_key(&id));
                        last_expire = Instant::now();
                    }
                }
                _ = stop.changed() => return,
            }
        }
    }
}

/// Telling relays, and keeping replicas in step: what a change means for the relays attached
/// here, and the session as other replicas hold it (`veil.v1.SessionRecord`).
impl Controller {
    /// Tells every relay attached here that leg `index` of `s` is revoked (unless the whole
    /// session is: a released session's relays revoked it whole already).
    fn announce_removed(&self, s: &Session, index: u8) {
        if s.is_released() {
            return;
        }
        self.registry.broadcast(&pb::ControllerMessage {
            kind: Some(pb::controller_message::Kind::Revoke(pb::Revoke {
                sessions: Vec::new(),
                legs: vec![pb::RevokedLeg {
                    session_id: s.id,
                    leg_index: u32::from(index),
                    expires_unix_ms: s.expires_unix_ms(),
                }],
            })),
        });
    }

    /// Tells every relay attached here that `s` now lasts until `until`.
    fn announce_extended(&self, s: &Session, until: u64) {
        self.registry.broadcast(&pb::ControllerMessage {
            kind: Some(pb::controller_message::Kind::Extend(pb::Extend {
                sessions: vec![pb::ExtendedSession {
                    session_id: s.id,
                    expires_unix_ms: until,
                }],
            })),
        });
    }

    /// Tells every relay attached here to stop serving `s`.
    fn announce_released(&self, s: &Session) {
        self.registry.broadcast(&pb::ControllerMessage {
            kind: Some(pb::controller_message::Kind::Revoke(pb::Revoke {
                sessions: vec![pb::RevokedSession {
                    session_id: s.id,
                    expires_unix_ms: s.expires_unix_ms(),
                }],
                legs: Vec::new(),
            })),
        });
    }

    /// Subscribes to the sessions this replica creates or changes (session ids).
    pub fn subscribe_records(&self) -> tokio::sync::broadcast::Receiver<u64> {
        self.records.subscribe()
    }

    /// Live session `id` as replicas hold it.
    pub fn record(&self, id: u64) -> Option<pb::SessionRecord> {
        self.get(id).ok().map(|s| record_of(&s))
    }

    /// Every live session, as replicas hold them.
    pub fn records(&self) -> Vec<pb::SessionRecord> {
        let now = unix_ms();
        self.by_id
            .iter()
            .filter(|s| !s.expired(now))
            .map(|s| record_of(&s))
            .collect()
    }

    /// Merges a session as another replica holds it: a session new here is kept as it is;
    /// for one known here, legs are added by index, removals and a release are never undone,
    /// and the later expiry wins. Relays attached here and watchers here hear what changed,
    /// as if it had changed here. Merging the same record again changes nothing. Returns
    /// whether anything changed.
    pub fn merge(&self, rec: pb::SessionRecord) -> Result<bool, String> {
        let now = unix_ms();
        if rec.session_id == 0 || rec.expires_unix_ms <= now {
            return Ok(false);
        }
        let incoming = session_of(rec)?;
        let existing = self.by_id.get(&incoming.id).map(|s| s.clone());
        let Some(s) = existing else {
            return Ok(self.merge_new(incoming, now));
        };
        let (mut participants, mut removed) = (false, Vec::new());
        {
            let mut ours = s.legs();
            for leg in incoming.legs().iter() {
                let len = ours.len();
                match ours.get_mut(usize::from(leg.index)) {
                    // Two legs minted for one index, on the two sides of a partition between
                    // replicas (docs/OPERATIONS.md): every replica keeps the same one, the lower
                    // token. (Both tokens bind as that leg; revoking the index would end both.)
                    Some(o) if leg.token < o.token => {
                        *o = leg.clone();
                        participants = true;
                    }
                    Some(o) if leg.token != o.token => {}
                    Some(o) if leg.removed && !o.removed => {
                        o.removed = true;
                        removed.push(o.index);
                        participants = true;
                    }
                    Some(_) => {}
                    None if usize::from(leg.index) == len => {
                        ours.push(leg.clone());
                        participants = true;
                    }
                    // A gap: this record is behind on legs we lack in between; the next one fills it.
                    None => {}
                }
            }
        }
        for index in removed {
            self.announce_removed(&s, index);
        }
        let until = incoming.expires_unix_ms();
        let extended = s.expires_unix_ms.fetch_max(until, Ordering::Relaxed) < until;
        if extended && !s.is_released() {
            self.announce_extended(&s, until);
        }
        let released = incoming.is_released() && !s.released.swap(true, Ordering::Relaxed);
        if released {
            self.end_live(&s);
            self.announce_released(&s);
            let _ = self.released.send(s.id);
        }
        if participants {
            let _ = self.changes.send((s.id, SessionChange::Participants));
        }
        if extended {
            let _ = self.changes.send((s.id, SessionChange::Extended));
        }
        Ok(participants || extended || released)
    }

    /// Keeps a session first heard of from another replica.
    fn merge_new(&self, s: Session, now: u64) -> bool {
        let s = Arc::new(s);
        if s.is_released() {
            s.live.store(false, Ordering::Relaxed);
        } else {
            // Counted, never refused: the replica that allocated it admitted it.
            self.quotas.count_session(s.owner);
        }
        match self.by_id.entry(s.id) {
            Entry::Occupied(_) => {
                // Merged at the same instant by another task: that one counts it.
                self.end_live(&s);
                return false;
            }
            Entry::Vacant(e) => {
                e.insert(s.clone());
            }
        }
        // The call's session, unless another live one holds the call: two sessions for one
        // call only come from replicas that could not reach each other (docs/OPERATIONS.md),
        // and every replica settles on the same one, the lower id, for retries to return.
        match self.by_call.entry(s.call_id.clone()) {
            Entry::Vacant(e) => {
                e.insert(s.id);
            }
            Entry::Occupied(mut e) => {
                let held = self.by_id.get(e.get()).map(|h| (h.id, h.expired(now)));
                match held {
                    Some((id, false)) if id < s.id => {}
                    _ => {
                        e.insert(s.id);
                    }
                }
            }
        }
        if s.is_released() {
            self.announce_released(&s);
        } else {
            for index in s.removed_legs() {
                self.announce_removed(&s, index);
            }
            if s.extended() {
                self.announce_extended(&s, s.expires_unix_ms());
            }
        }
        tracing::debug!(session = %SessionId(s.id), "session merged from a peer replica");
        true
    }
}

fn transport_pb(t: Transport) -> pb::Transport {
    match t {
        Transport::Udp => pb::Transport::Udp,
        Transport::Quic => pb::Transport::Quic,
    }
}

fn participant_pb(p: &Participant) -> pb::Participant {
    pb::Participant {
        participant_id: p.id.clone(),
        region: p.region.clone(),
        preferred_transport: p.transport.map_or(pb::Transport::Unspecified, transport_pb) as i32,
    }
}

fn participant_of(p: pb::Participant) -> Participant {
    let transport = p.preferred_transport();
    Participant {
        id: p.participant_id,
        region: p.region,
        transport: match transport {
            pb::Transport::Udp => Some(Transport::Udp),
            pb::Transport::Quic => Some(Transport::Quic),
            pb::Transport::Unspecified => None,
        },
    }
}

/// `s` as replicas hold it.
pub fn record_of(s: &Session) -> pb::SessionRecord {
    let (owner_credential, owner_open) = match s.owner {
        Credential::Open => (0, true),
        Credential::Token(i) => (i, false),
    };
    pb::SessionRecord {
        session_id: s.id,
        call_id: s.call_id.clone(),
        participants: s.participants.iter().map(participant_pb).collect(),
        legs: s
            .legs()
            .iter()
            .map(|l| pb::LegRecord {
                leg_index: u32::from(l.index),
                token: l.token.clone(),
                transport: transport_pb(l.transport) as i32,
                participant: Some(participant_pb(&l.participant)),
                removed: l.removed,
            })
            .collect(),
        relays: s
            .relays
            .iter()
            .map(|(r, role)| pb::RelayRecord {
                node_id: r.node_id.clone(),
                region: r.region.clone(),
                zone: r.zone.clone(),
                udp_address: r.udp_address.clone(),
                quic_address: r.quic_address.clone(),
                quic_cert_sha256: r.quic_cert_sha256.clone(),
                turn_udp: r.turn_udp,
                turn_tcp_address: r.turn_tcp_address.clone(),
                turn_tls_address: r.turn_tls_address.clone(),
                capacity_legs: r.capacity_legs,
                role: match role {
                    Role::Primary => pb::RelayRole::Primary,
                    Role::Backup => pb::RelayRole::Backup,
                } as i32,
            })
            .collect(),
        expires_unix_ms: s.expires_unix_ms(),
        allocated_expiry_unix_ms: s.allocated_expiry_unix_ms,
        released: s.is_released(),
        owner_credential,
        owner_open,
    }
}

/// A session from its record; `Err` names what is wrong with a malformed one.
fn session_of(rec: pb::SessionRecord) -> Result<Session, String> {
    if rec.legs.len() > crate::api::MAX_PARTICIPANTS || rec.relays.is_empty() {
        return Err("a session record needs 1 or 2 relays and at most 16 legs".into());
    }
    let mut legs = Vec::with_capacity(rec.legs.len());
    for (i, l) in rec.legs.into_iter().enumerate() {
        if l.leg_index as usize != i {
            return Err("a session record's legs must be in index order from 0".into());
        }
        let transport = match l.transport() {
            pb::Transport::Quic => Transport::Quic,
            _ => Transport::Udp,
        };
        legs.push(Leg {
            index: i as u8,
            token: l.token,
            transport,
            participant: participant_of(l.participant.unwrap_or_default()),
            removed: l.removed,
        });
    }
    let relays = rec
        .relays
        .into_iter()
        .map(|r| {
            let role = match r.role() {
                pb::RelayRole::Backup => Role::Backup,
                _ => Role::Primary,
            };
            let info = RelayInfo {
                node_id: r.node_id,
                region: r.region,
                zone: r.zone,
                udp_address: r.udp_address,
                quic_address: r.quic_address,
                quic_cert_sha256: r.quic_cert_sha256,
                turn_udp: r.turn_udp,
                turn_tcp_address: r.turn_tcp_address,
                turn_tls_address: r.turn_tls_address,
                capacity_legs: r.capacity_legs,
                instance_id: 0,
            };
            (info, role)
        })
        .collect();
    Ok(Session {
        id: rec.session_id,
        call_id: rec.call_id,
        participants: rec.participants.into_iter().map(participant_of).collect(),
        legs: Mutex::new(legs),
        relays,
        expires_unix_ms: AtomicU64::new(rec.expires_unix_ms),
        allocated_expiry_unix_ms: rec.allocated_expiry_unix_ms,
        owner: if rec.owner_open {
            Credential::Open
        } else {
            Credential::Token(rec.owner_credential)
        },
        released: AtomicBool::new(rec.released),
        live: AtomicBool::new(!rec.released),
    })
}

/// A leg's relays as TURN servers (`RTCIceServer`), the primary first, with the leg's TURN
/// credentials: each relay's URLs are TURN over UDP, then over TCP and TLS where it serves them
/// (a WebRTC client prefers UDP, and falls back to TCP or TLS where its network blocks UDP).
fn ice_servers(token: &[u8], relays: &[(RelayInfo, Role)]) -> Vec<pb::IceServer> {
    let Ok(token) = veil_protocol::Token::from_bytes(token) else {
        return Vec::new();
    };
    let creds = veil_protocol::turn::credentials(&token);
    relays
        .iter()
        .filter(|(r, _)| r.turn_udp)
        .map(|(r, _)| pb::IceServer {
            urls: std::iter::once(format!("turn:{}?transport=udp", r.udp_address))
                .chain(
                    (!r.turn_tcp_address.is_empty())
                        .then(|| format!("turn:{}?transport=tcp", r.turn_tcp_address)),
                )
                .chain(
                    (!r.turn_tls_address.is_empty())
                        .then(|| format!("turns:{}?transport=tcp", r.turn_tls_address)),
                )
                .collect(),
            username: creds.username.clone(),
            credential: creds.credential.clone(),
        })
        .collect()
}
