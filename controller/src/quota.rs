//! Per-credential quotas for signaling services: how many live sessions one credential may hold,
//! how many `WatchSession` streams it may keep open at once, and how fast it may call
//! `AllocateSession` (a token bucket that holds one second's worth of calls). A caller past one
//! gets `RESOURCE_EXHAUSTED` with a stable reason ([`Quota::reason`]), a
//! `google.rpc.QuotaFailure` and, for the rate, a `google.rpc.RetryInfo`.
//!
//! A credential is one of `--signaling-tokens`, known by its position in that list
//! ([`Credential`]): never by the token itself, which appears in no label, log or error. With no
//! tokens configured (an open role) every caller shares one set of quotas, labelled `open`.
//!
//! Counts are this replica's: each controller replica enforces its quotas on the calls it
//! serves.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tonic::{Code, Status};
use tonic_types::{QuotaFailure, QuotaViolation, RetryInfo};

use crate::errors::{self, Reason};

/// The quotas of each signaling credential; 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sessions allocated through one credential and neither released nor expired.
    pub live_sessions: u32,
    /// `WatchSession` streams open at once through one credential.
    pub watch_streams: u32,
    /// `AllocateSession` calls per second through one credential (bursts of as many).
    pub allocations_per_sec: u32,
}

impl Limits {
    /// No quota at all.
    pub const UNLIMITED: Self = Self {
        live_sessions: 0,
        watch_streams: 0,
        allocations_per_sec: 0,
    };

    /// The flags' defaults: far above what one well-behaved signaling service needs on one
    /// replica, low enough that a runaway one cannot take the whole controller.
    pub const DEFAULT: Self = Self {
        live_sessions: 100_000,
        watch_streams: 10_000,
        allocations_per_sec: 1_000,
    };

    /// The limit of `quota` (0: unlimited).
    pub fn of(&self, quota: Quota) -> u32 {
        match quota {
            Quota::LiveSessions => self.live_sessions,
            Quota::WatchStreams => self.watch_streams,
            Quota::AllocationRate => self.allocations_per_sec,
        }
    }
}

/// One quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quota {
    /// Live sessions.
    LiveSessions,
    /// Concurrent `WatchSession` streams.
    WatchStreams,
    /// `AllocateSession` calls per second.
    AllocationRate,
}

impl Quota {
    /// Every quota, in order.
    pub const ALL: [Self; 3] = [Self::LiveSessions, Self::WatchStreams, Self::AllocationRate];

    /// The metric label value, and `QuotaViolation.quota_id`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LiveSessions => "live_sessions",
            Self::WatchStreams => "watch_streams",
            Self::AllocationRate => "allocations_per_sec",
        }
    }

    /// The `ErrorInfo.reason` of a refusal.
    pub fn reason(self) -> Reason {
        match self {
            Self::LiveSessions => Reason::QuotaLiveSessions,
            Self::WatchStreams => Reason::QuotaWatchStreams,
            Self::AllocationRate => Reason::QuotaAllocationRate,
        }
    }

    /// The flag that sets it.
    pub fn flag(self) -> &'static str {
        match self {
            Self::LiveSessions => "--quota-live-sessions",
            Self::WatchStreams => "--quota-watch-streams",
            Self::AllocationRate => "--quota-allocations-per-sec",
        }
    }
}

/// Who a signaling caller is, for its quotas: never the token itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Credential {
    /// The role has no tokens: anyone (one shared set of quotas).
    Open,
    /// The token at this position (0-based) of the role's token list.
    Token(u32),
}

/// A quota refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub struct Exceeded {
    /// Which quota.
    pub quota: Quota,
    /// Its limit.
    pub limit: u32,
    /// When a retry can succeed (the rate only).
    pub retry_after: Option<Duration>,
}

impl Exceeded {
    fn message(&self) -> String {
        let limit = self.limit;
        match self.quota {
            Quota::LiveSessions => format!(
                "quota exceeded: this credential already holds {limit} live sessions, its \
                 limit; release sessions whose calls have ended"
            ),
            Quota::WatchStreams => format!(
                "quota exceeded: this credential already has {limit} WatchSession streams open, \
                 its limit"
            ),
            Quota::AllocationRate => format!(
                "quota exceeded: this credential may call AllocateSession {limit} times per \
                 second; retry in {} ms",
                self.retry_after.unwrap_or_default().as_millis().max(1)
            ),
        }
    }
}

impl From<Exceeded> for Status {
    fn from(e: Exceeded) -> Self {
        let mut v = QuotaViolation::new("credential", e.message());
        v.quota_id = e.quota.as_str().to_string();
        v.quota_value = i64::from(e.limit);
        let mut more = vec![QuotaFailure::new(vec![v]).into()];
        if let Some(after) = e.retry_after {
            more.push(RetryInfo::new(Some(after)).into());
        }
        errors::status(
            Code::ResourceExhausted,
            e.message(),
            e.quota.reason(),
            &[
                ("quota", e.quota.as_str().to_string()),
                ("limit", e.limit.to_string()),
            ],
            more,
        )
    }
}

/// One credential's counters.
#[derive(Debug)]
struct Slot {
    live: AtomicU32,
    watches: Arc<AtomicU32>,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Option<Instant>,
}

/// Every signaling credential's quotas and usage.
#[derive(Debug)]
pub struct Quotas {
    limits: Limits,
    slots: Box<[Slot]>,
    labels: Box<[String]>,
}

impl Quotas {
    /// Quotas of `limits` for each of `tokens` credentials (0: the open role, one shared set).
    pub fn new(limits: Limits, tokens: usize) -> Self {
        let labels: Box<[String]> = if tokens == 0 {
            Box::new(["open".to_string()])
        } else {
            (0..tokens).map(|i| i.to_string()).collect()
        };
        let slots = labels
            .iter()
            .map(|_| Slot {
                live: AtomicU32::new(0),
                watches: Arc::new(AtomicU32::new(0)),
                bucket: Mutex::new(Bucket {
                    tokens: f64::from(limits.allocations_per_sec),
                    at: None,
                }),
            })
            .collect();
        Self {
            limits,
            slots,
            labels,
        }
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The label of every credential, in order: its position, or `open`.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The label of `c`.
    pub fn label(&self, c: Credential) -> &str {
        &self.labels[self.index(c)]
    }

    fn index(&self, c: Credential) -> usize {
        match c {
            Credential::Open => 0,
            // Positions come from the token list these slots were made for; anything else would
            // be a bug, and shares the first credential's quotas rather than panicking.
            Credential::Token(i) if (i as usize) < self.slots.len() => i as usize,
            Credential::Token(_) => 0,
        }
    }

    fn slot(&self, c: Credential) -> &Slot {
        &self.slots[self.index(c)]
    }

    /// Takes one `AllocateSession` call from `c`'s token bucket at `now`.
    pub fn allocation(&self, c: Credential, now: Instant) -> Result<(), Exceeded> {
        let rate = self.limits.allocations_per_sec;
        if rate == 0 {
            return Ok(());
        }
        let rate = f64::from(rate);
        let mut b = self
            .slot(c)
            .bucket
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(at) = b.at {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            b.tokens = (b.tokens + elapsed * rate).min(rate);
        }
        b.at = Some(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Exceeded {
                quota: Quota::AllocationRate,
                limit: self.limits.allocations_per_sec,
                retry_after: Some(Duration::from_secs_f64((1.0 - b.tokens) / rate)),
            })
        }
    }

    /// Counts a new live session for `c`, unless `c` holds its quota already.
    pub fn begin_session(&self, c: Credential) -> Result<(), Exceeded> {
        let limit = self.limits.live_sessions;
        self.slot(c)
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (limit == 0 || n < limit).then_some(n + 1)
            })
            .map(drop)
            .map_err(|_| Exceeded {
                quota: Quota::LiveSessions,
                limit,
                retry_after: None,
            })
    }

    /// Counts a live session for `c` without checking its quota: one a peer replica admitted.
    pub fn count_session(&self, c: Credential) {
        self.slot(c).live.fetch_add(1, Ordering::AcqRel);
    }

    /// A live session of `c` ended (released, expired, or never created after all).
    pub fn end_session(&self, c: Credential) {
        let _ = self
            .slot(c)
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Opens a `WatchSession` stream for `c`, unless it has its quota open already; the stream
    /// counts until the permit drops.
    pub fn watch(&self, c: Credential) -> Result<WatchPermit, Exceeded> {
        let limit = self.limits.watch_streams;
        let count = &self.slot(c).watches;
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (limit == 0 || n < limit).then_some(n + 1)
            })
            .map_err(|_| Exceeded {
                quota: Quota::WatchStreams,
                limit,
                retry_after: None,
            })?;
        Ok(WatchPermit {
            count: count.clone(),
        })
    }

    /// Each credential's label, live sessions and open watch streams, in order.
    pub fn usage(&self) -> impl Iterator<Item = (&str, u32, u32)> {
        self.labels.iter().zip(self.slots.iter()).map(|(l, s)| {
            (
                l.as_str(),
                s.live.load(Ordering::Relaxed),
                s.watches.load(Ordering::Relaxed),
            )
        })
    }
}

/// One open `WatchSession` stream, counted against its credential's quota until dropped.
#[derive(Debug)]
pub struct WatchPermit {
    count: Arc<AtomicU32>,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    fn limits(live: u32, watch: u32, rate: u32) -> Limits {
        Limits {
            live_sessions: live,
            watch_streams: watch,
            allocations_per_sec: rate,
        }
    }

    #[test]
    fn rate_refills_at_its_rate_and_bursts_one_second() {
        let q = Quotas::new(limits(0, 0, 10), 2);
        let c = Credential::Token(1);
        let t0 = Instant::now();
        for _ in 0..10 {
            q.allocation(c, t0).unwrap();
        }
        let e = q.allocation(c, t0).unwrap_err();
        assert_eq!(e.quota, Quota::AllocationRate);
        assert_eq!(e.retry_after, Some(Duration::from_millis(100)));
        // The other credential has its own bucket.
        q.allocation(Credential::Token(0), t0).unwrap();
        // 250 ms later: two calls' worth.
        let t1 = t0 + Duration::from_millis(250);
        q.allocation(c, t1).unwrap();
        q.allocation(c, t1).unwrap();
        assert!(q.allocation(c, t1).is_err());
        // An idle minute refills one second's worth, no more.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..10 {
            q.allocation(c, t2).unwrap();
        }
        assert!(q.allocation(c, t2).is_err());
        // Unlimited.
        let q = Quotas::new(limits(0, 0, 0), 1);
        for _ in 0..10_000 {
            q.allocation(Credential::Token(0), t0).unwrap();
        }
    }

    #[test]
    fn live_sessions_and_watches_count_up_to_their_limits() {
        let q = Quotas::new(limits(2, 1, 0), 0);
        let c = Credential::Open;
        q.begin_session(c).unwrap();
        q.begin_session(c).unwrap();
        assert_eq!(q.begin_session(c).unwrap_err().quota, Quota::LiveSessions);
        q.end_session(c);
        q.begin_session(c).unwrap();
        let w = q.watch(c).unwrap();
        assert_eq!(q.watch(c).unwrap_err().quota, Quota::WatchStreams);
        assert_eq!(q.usage().collect::<Vec<_>>(), [("open", 2, 1)]);
        drop(w);
        let _w = q.watch(c).unwrap();
        // Never below zero.
        for _ in 0..5 {
            q.end_session(c);
        }
        assert_eq!(q.usage().next().unwrap().1, 0);
    }

    #[test]
    fn refusals_carry_reason_quota_failure_and_retry_info() {
        let s = Status::from(Exceeded {
            quota: Quota::AllocationRate,
            limit: 5,
            retry_after: Some(Duration::from_millis(200)),
        });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(
            s.message().contains("5 times per second"),
            "{}",
            s.message()
        );
        let d = s.get_error_details();
        assert_eq!(d.error_info().unwrap().reason, "QUOTA_ALLOCATION_RATE");
        let v = &d.quota_failure().unwrap().violations[0];
        assert_eq!(
            (v.quota_id.as_str(), v.quota_value),
            ("allocations_per_sec", 5)
        );
        assert_eq!(
            d.retry_info().unwrap().retry_delay,
            Some(Duration::from_millis(200))
        );
    }
}
