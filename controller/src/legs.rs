//! What each leg of each session is doing, as this replica hears from the relays: where it is
//! bound, over which transport, what it carried, and the events `WatchSession` reports (bound,
//! moved to another relay, unbound and why). Soft state: every replica builds its own from its
//! own relay links (each relay attaches to every replica), and a replica that restarts rebuilds
//! it from the relays' next reports. Never an address: legs are named by session and index,
//! relays by node id.
//!
//! A relay reports *bindings*: one leg's stay on one relay instance, from its bind there to its
//! unbind there, with cumulative counters and an id unique within that instance. Counts are
//! merged field by field with `max`, so a report seen twice, or a snapshot overtaken by a
//! change, counts nothing twice; a leg's totals are the sum over its bindings.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use veil_proto::v1 as pb;

/// Bindings kept per leg at most: past it the oldest ended ones are folded into a sum.
const MAX_BINDINGS_PER_LEG: usize = 32;
/// How long the legs of a session this replica does not hold are kept (a session reported by a
/// relay before its record reached this replica, or one that ended).
pub const UNKNOWN_GRACE: Duration = Duration::from_secs(60);

/// Names one binding: the relay, its instance, the leg's slot, and the binding's id there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BindingKey {
    node_id: String,
    instance: u64,
    slot: u32,
    id: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The relay says it serves it.
    Bound,
    /// Its relay went down or lost track of it: believed gone, but the relay's word brings it
    /// back (a relay cut off from this controller and back, with its legs still bound).
    Presumed,
    /// The relay said it ended: final (an unbound binding never binds again; a new bind is a
    /// new binding).
    Ended,
}

#[derive(Debug, Clone)]
struct Binding {
    state: State,
    transport: pb::LegTransport,
    /// `None` from a relay that does not count.
    stats: Option<pb::LegStats>,
    /// Order of binding, for which relay a leg is on now.
    since: u64,
}

#[derive(Debug, Default)]
struct LegView {
    bindings: HashMap<BindingKey, Binding>,
    /// Ended bindings folded away.
    folded: Option<pb::LegStats>,
    /// The relay the leg was last bound on, and how.
    last: Option<(String, pb::LegTransport)>,
}

impl LegView {
    /// True if a binding of the leg is bound on relay `node_id`.
    fn bound_at(&self, node_id: &str) -> bool {
        self.bindings
            .iter()
            .any(|(k, b)| b.state == State::Bound && k.node_id == node_id)
    }

    fn bound_on(&self) -> Option<(&str, pb::LegTransport)> {
        self.bindings
            .iter()
            .filter(|(_, b)| b.state == State::Bound)
            .max_by_key(|(_, b)| b.since)
            .map(|(k, b)| (k.node_id.as_str(), b.transport))
    }

    fn totals(&self) -> Option<pb::LegStats> {
        self.bindings
            .values()
            .fold(self.folded, |t, b| add(t, b.stats))
    }

    fn fold_old(&mut self) {
        while self.bindings.len() > MAX_BINDINGS_PER_LEG {
            let Some(oldest) = self
                .bindings
                .iter()
                .filter(|(_, b)| b.state != State::Bound)
                .min_by_key(|(_, b)| b.since)
                .map(|(k, _)| k.clone())
            else {
                return;
            };
            if let Some(b) = self.bindings.remove(&oldest) {
                self.folded = add(self.folded, b.stats);
            }
        }
    }
}

/// The sum of two counts, either of which may be unknown.
fn add(a: Option<pb::LegStats>, b: Option<pb::LegStats>) -> Option<pb::LegStats> {
    let (a, b) = match (a, b) {
        (None, x) | (x, None) => return x,
        (Some(a), Some(b)) => (a, b),
    };
    Some(pb::LegStats {
        packets_in: a.packets_in + b.packets_in,
        bytes_in: a.bytes_in + b.bytes_in,
        packets_out: a.packets_out + b.packets_out,
        bytes_out: a.bytes_out + b.bytes_out,
        packets_dropped: a.packets_dropped + b.packets_dropped,
    })
}

fn max(a: pb::LegStats, b: pb::LegStats) -> pb::LegStats {
    pb::LegStats {
        packets_in: a.packets_in.max(b.packets_in),
        bytes_in: a.bytes_in.max(b.bytes_in),
        packets_out: a.packets_out.max(b.packets_out),
        bytes_out: a.bytes_out.max(b.bytes_out),
        packets_dropped: a.packets_dropped.max(b.packets_dropped),
    }
}

#[derive(Debug, Default)]
struct SessionLegs {
    legs: HashMap<u8, LegView>,
    /// Last reported by a relay.
    seen: Option<Instant>,
}

/// What happened to a leg, for `WatchSession`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegNews {
    /// The session.
    pub session: u64,
    /// The leg's index.
    pub leg: u8,
    /// What happened.
    pub kind: NewsKind,
    /// The relay concerned: where the leg is bound now (bound, moved) or was (unbound).
    pub node_id: String,
    /// How.
    pub transport: pb::LegTransport,
}

/// The kinds of [`LegNews`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewsKind {
    /// Bound on a relay (its first bind, or again on the relay it was last on, or over another
    /// transport there).
    Bound,
    /// Bound on another relay than the one it was last on.
    Moved {
        /// That one.
        from: String,
    },
    /// No relay serves it any more.
    Unbound(pb::LegEndReason),
}

/// Every session's legs, as the relays report them to this replica.
#[derive(Debug)]
pub struct LegBook {
    inner: Mutex<Inner>,
    news: broadcast::Sender<LegNews>,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<u64, SessionLegs>,
    /// The legs (session, index) with a binding bound on each relay: what a relay's loss or
    /// snapshot looks through, rather than every leg of every relay.
    by_node: HashMap<String, std::collections::HashSet<(u64, u8)>>,
    next_since: u64,
}

impl Default for LegBook {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            news: broadcast::channel(4096).0,
        }
    }
}

/// A relay's report about one binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Word {
    /// Bound (a change, or listed in a snapshot).
    Bound,
    /// Unbound, for this reason.
    Unbound(pb::LegEndReason),
}

impl LegBook {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the maps consistent: a panic elsewhere poisons nothing real.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to leg news of every session.
    pub fn subscribe(&self) -> broadcast::Receiver<LegNews> {
        self.news.subscribe()
    }

    /// Records what relay `node_id` (instance `instance`) says of binding `b`.
    pub fn report(&self, node_id: &str, instance: u64, b: &pb::LegBinding, word: Word) {
        let mut inner = self.lock();
        let news = Self::apply(&mut inner, node_id, instance, b, word);
        drop(inner);
        for n in news {
            let _ = self.news.send(n);
        }
    }

    /// Records a relay's snapshot: `bindings` (one message of it), and with `complete`, that
    /// those are all it serves: the others this replica believed bound there are not.
    pub fn snapshot(
        &self,
        node_id: &str,
        instance: u64,
        bindings: &[pb::LegBinding],
        listed: &mut Vec<(u64, u32, u64)>,
        complete: bool,
    ) {
        let mut inner = self.lock();
        let mut news = Vec::new();
        for b in bindings {
            news.extend(Self::apply(&mut inner, node_id, instance, b, Word::Bound));
            listed.push((b.session_id, b.slot, b.binding_id));
        }
        if complete {
            let listed: std::collections::HashSet<_> = listed.drain(..).collect();
            news.extend(Self::presume_gone(
                &mut inner,
                node_id,
                pb::LegEndReason::Unknown,
                |k, session| {
                    k.node_id == node_id
                        && k.instance == instance
                        && !listed.contains(&(session, k.slot, k.id))
                },
            ));
            // Bindings of the relay's earlier instances are gone with it.
            news.extend(Self::presume_gone(
                &mut inner,
                node_id,
                pb::LegEndReason::RelayDown,
                |k, _| k.node_id == node_id && k.instance != instance,
            ));
        }
        drop(inner);
        for n in news {
            let _ = self.news.send(n);
        }
    }

    /// Relay `node_id` went down (or restarted): every leg bound there is presumed gone.
    pub fn relay_down(&self, node_id: &str) {
        let mut inner = self.lock();
        let news = Self::presume_gone(&mut inner, node_id, pb::LegEndReason::RelayDown, |k, _| {
            k.node_id == node_id
        });
        drop(inner);
        for n in news {
            let _ = self.news.send(n);
        }
    }

    /// Relay `node_id` attached as `instance`: bindings of its other instances are gone.
    pub fn relay_attached(&self, node_id: &str, instance: u64) {
        let mut inner = self.lock();
        let news = Self::presume_gone(&mut inner, node_id, pb::LegEndReason::RelayDown, |k, _| {
            k.node_id == node_id && k.instance != instance
        });
        drop(inner);
        for n in news {
            let _ = self.news.send(n);
        }
    }

    /// Marks the bound bindings on relay `node_id` that `gone` selects as presumed gone; news
    /// for legs left unbound.
    fn presume_gone(
        inner: &mut Inner,
        node_id: &str,
        why: pb::LegEndReason,
        gone: impl Fn(&BindingKey, u64) -> bool,
    ) -> Vec<LegNews> {
        let mut news = Vec::new();
        let Some(here) = inner.by_node.get_mut(node_id) else {
            return news;
        };
        let sessions = &mut inner.sessions;
        here.retain(|&(session, leg)| {
            let Some(view) = sessions
                .get_mut(&session)
                .and_then(|s| s.legs.get_mut(&leg))
            else {
                return false;
            };
            {
                let before = view.bound_on().map(|(n, t)| (n.to_string(), t));
                let mut reason = None;
                for (k, b) in view.bindings.iter_mut() {
                    if b.state == State::Bound && gone(k, session) {
                        b.state = State::Presumed;
                        reason = Some(why);
                    }
                }
                if let (Some((node_id, transport)), Some(reason)) = (before, reason)
                    && view.bound_on().is_none()
                {
                    news.push(LegNews {
                        session,
                        leg,
                        kind: NewsKind::Unbound(reason),
                        node_id,
                        transport,
                    });
                }
            }
            view.bound_at(node_id)
        });
        news
    }

    fn apply(
        inner: &mut Inner,
        node_id: &str,
        instance: u64,
        b: &pb::LegBinding,
        word: Word,
    ) -> Vec<LegNews> {
        let Ok(slot) = u8::try_from(b.slot) else {
            return Vec::new();
        };
        let leg = slot % veil_protocol::token::MAX_LEGS;
        let transport =
            pb::LegTransport::try_from(b.transport).unwrap_or(pb::LegTransport::Unspecified);
        let stats = b.stats;
        inner.next_since += 1;
        let since = inner.next_since;
        let s = inner.sessions.entry(b.session_id).or_default();
        s.seen = Some(Instant::now());
        let view = s.legs.entry(leg).or_default();
        let before = view.bound_on().map(|(n, t)| (n.to_string(), t));
        let key = BindingKey {
            node_id: node_id.to_string(),
            instance,
            slot: b.slot,
            id: b.binding_id,
        };
        let entry = view.bindings.entry(key).or_insert(Binding {
            state: State::Presumed,
            transport,
            stats,
            since,
        });
        entry.stats = match (entry.stats, stats) {
            (Some(a), Some(b)) => Some(max(a, b)),
            (a, b) => a.or(b),
        };
        let mut reason = None;
        match word {
            Word::Bound => {
                if entry.state != State::Ended {
                    if entry.state != State::Bound {
                        entry.since = since;
                    }
                    entry.state = State::Bound;
                    entry.transport = transport;
                }
            }
            Word::Unbound(why) => {
                if entry.state == State::Bound {
                    reason = Some(why);
                }
                entry.state = State::Ended;
            }
        }
        view.fold_old();
        if view.bound_at(node_id) {
            inner
                .by_node
                .entry(node_id.to_string())
                .or_default()
                .insert((b.session_id, leg));
        }
        let after = view.bound_on().map(|(n, t)| (n.to_string(), t));
        let mut news = Vec::new();
        let last = view.last.clone();
        match (&before, &after) {
            (_, Some((node, t))) if before.as_ref() != after.as_ref() => {
                let kind = match (&before, &last) {
                    (Some((from, _)), _) | (None, Some((from, _))) if from != node => {
                        NewsKind::Moved { from: from.clone() }
                    }
                    _ => NewsKind::Bound,
                };
                news.push(LegNews {
                    session: b.session_id,
                    leg,
                    kind,
                    node_id: node.clone(),
                    transport: *t,
                });
                view.last = Some((node.clone(), *t));
            }
            (Some((node, t)), None) => {
                news.push(LegNews {
                    session: b.session_id,
                    leg,
                    kind: NewsKind::Unbound(reason.unwrap_or(pb::LegEndReason::Unknown)),
                    node_id: node.clone(),
                    transport: *t,
                });
            }
            _ => {}
        }
        news
    }

    /// Leg `leg` of `session`: whether it is bound, where it is (or was last), how, and its
    /// totals.
    pub fn activity(&self, session: u64, leg: u8) -> pb::LegActivity {
        let inner = self.lock();
        let Some(view) = inner.sessions.get(&session).and_then(|s| s.legs.get(&leg)) else {
            return pb::LegActivity::default();
        };
        let bound = view.bound_on();
        let (node_id, transport) = match (bound, &view.last) {
            (Some((n, t)), _) => (n.to_string(), t),
            (None, Some((n, t))) => (n.clone(), *t),
            (None, None) => (String::new(), pb::LegTransport::Unspecified),
        };
        pb::LegActivity {
            bound: bound.is_some(),
            node_id,
            transport: transport as i32,
            stats: view.totals(),
        }
    }

    /// Forgets the legs of sessions `held` does not hold, reported last more than
    /// [`UNKNOWN_GRACE`] ago; returns how many sessions' legs are kept.
    pub fn sweep(&self, held: impl Fn(u64) -> bool) -> usize {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.sessions.retain(|&id, s| {
            held(id)
                || s.seen
                    .is_some_and(|t| now.duration_since(t) < UNKNOWN_GRACE)
        });
        let Inner {
            sessions, by_node, ..
        } = &mut *inner;
        for legs in by_node.values_mut() {
            legs.retain(|(session, _)| sessions.contains_key(session));
        }
        by_node.retain(|_, legs| !legs.is_empty());
        sessions.len()
    }
}
