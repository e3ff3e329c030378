//! Token buckets for the per-leg rate limits that tickets carry.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use crate::token::Limits;

/// How many seconds of traffic at the limit a bucket holds: the burst a leg may send at once
/// (a video keyframe) before the limit bites.
const BURST_SECS: f32 = 1.0;

/// One token bucket. A rate of zero means unlimited. `f32` is precise enough for rates up to
/// tens of megabits and keeps the per-leg state small (a relay holds a million legs).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: f32,
    credit: f32,
}

impl Bucket {
    fn new(rate: f32) -> Self {
        Self {
            rate,
            credit: rate * BURST_SECS,
        }
    }

    #[inline]
    fn refill(&mut self, elapsed_secs: f32) {
        self.credit = (self.credit + elapsed_secs * self.rate).min(self.rate * BURST_SECS);
    }
}

/// The packet-rate and bit-rate limits of one leg. It keeps no clock: the caller passes the
/// time since the leg's previous packet (the leg already keeps that instant).
#[derive(Debug, Clone, Copy)]
pub struct Limiter {
    packets: Bucket,
    bits: Bucket,
    unlimited: bool,
}

impl Limiter {
    /// A limiter for `limits`, full.
    pub fn new(limits: Limits) -> Self {
        Self {
            packets: Bucket::new(limits.max_pps as f32),
            bits: Bucket::new(limits.max_kbps as f32 * 1000.0),
            unlimited: limits.max_pps == 0 && limits.max_kbps == 0,
        }
    }

    /// A limiter for `limits` with empty buckets: no burst until they refill.
    pub fn drained(limits: Limits) -> Self {
        let mut l = Self::new(limits);
        l.packets.credit = 0.0;
        l.bits.credit = 0.0;
        l
    }

    /// Takes one packet of `len` bytes, `elapsed_secs` after the previous one, from the
    /// buckets; false if either limit would be exceeded (the packet must be dropped, and takes
    /// nothing).
    #[inline]
    pub fn admit(&mut self, elapsed_secs: f32, len: usize) -> bool {
        if self.unlimited {
            return true;
        }
        self.packets.refill(elapsed_secs);
        self.bits.refill(elapsed_secs);
        let bits = (len * 8) as f32;
        let pkt_ok = self.packets.rate == 0.0 || self.packets.credit >= 1.0;
        let bits_ok = self.bits.rate == 0.0 || self.bits.credit >= bits;
        if pkt_ok && bits_ok {
            self.packets.credit -= 1.0;
            self.bits.credit -= bits;
            true
        } else {
            false
        }
    }
}

/// A token bucket of whole tokens, refilled at `rate` per second up to `burst`.
#[derive(Debug, Clone, Copy)]
struct Rate {
    credit: f64,
    last: Instant,
}

impl Rate {
    fn full(burst: f64, now: Instant) -> Self {
        Self {
            credit: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.credit = (self.credit + elapsed * rate).min(burst);
    }
}

/// Most source addresses a worker tracks bind rates for; beyond that, new addresses share the
/// worker-wide budget only, so that a flood from many addresses cannot grow memory.
pub const MAX_TRACKED_SOURCES: usize = 65_536;

/// Limits BIND attempts, per source IP address and per worker, before any cryptography. Each
/// rate allows a burst of twice its per-second figure.
#[derive(Debug)]
pub struct BindLimiter {
    /// Keyed by source address, which an attacker chooses: keep SipHash (randomly keyed).
    per_ip: HashMap<IpAddr, Rate>,
    worker: Rate,
    ip_rate: f64,
    worker_rate: f64,
}

impl BindLimiter {
    /// A limiter allowing `per_ip` binds per second from each source address and `per_worker`
    /// in all, full at `now`.
    pub fn new(per_ip: u32, per_worker: u32, now: Instant) -> Self {
        let (ip_rate, worker_rate) = (f64::from(per_ip), f64::from(per_worker));
        Self {
            per_ip: HashMap::new(),
            worker: Rate::full(worker_rate * 2.0, now),
            ip_rate,
            worker_rate,
        }
    }

    /// Whether a BIND from `ip` may be handled now; takes one token from both buckets if so.
    pub fn admit(&mut self, now: Instant, ip: IpAddr) -> bool {
        self.worker
            .refill(now, self.worker_rate, self.worker_rate * 2.0);
        if self.worker.credit < 1.0 {
            return false;
        }
        let burst = self.ip_rate * 2.0;
        let tracked = self.per_ip.len() < MAX_TRACKED_SOURCES;
        let ip_ok = match self.per_ip.get_mut(&ip) {
            Some(b) => {
                b.refill(now, self.ip_rate, burst);
                if b.credit >= 1.0 {
                    b.credit -= 1.0;
                    true
                } else {
                    false
                }
            }
            None if tracked => {
                let mut b = Rate::full(burst, now);
                b.credit -= 1.0;
                self.per_ip.insert(ip, b);
                true
            }
            // Too many sources tracked: this one is limited by the worker budget alone.
            None => true,
        };
        if ip_ok {
            self.worker.credit -= 1.0;
        }
        ip_ok
    }

    /// Forgets sources whose bucket has refilled: they are indistinguishable from new ones.
    pub fn forget_idle(&mut self, now: Instant) {
        let (rate, burst) = (self.ip_rate, self.ip_rate * 2.0);
        self.per_ip.retain(|_, b| {
            b.refill(now, rate, burst);
            b.credit < burst
        });
    }

    /// Source addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.per_ip.len()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a real clock reading as the arbitrary origin
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn binds_are_limited_per_source_and_per_worker() {
        let t0 = Instant::now();
        let mut l = BindLimiter::new(10, 100, t0);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        // A burst of twice the rate, then the rate.
        assert_eq!((0..100).filter(|_| l.admit(t0, a)).count(), 20);
        assert_eq!(
            (0..100)
                .filter(|_| l.admit(t0 + Duration::from_secs(1), a))
                .count(),
            10
        );
        // Other sources are unaffected until the worker budget (200 burst) runs out.
        let mut others = 0;
        for i in 0..1000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x7f00_1000 + i));
            others += usize::from(l.admit(t0 + Duration::from_secs(1), ip));
        }
        // The worker bucket (burst 200) had 180 left, refilled to its cap of 200 over the second,
        // and `a` took 10 more.
        assert_eq!(others, 190);
        // Idle sources are forgotten once refilled.
        l.forget_idle(t0 + Duration::from_secs(10));
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn drained_limiter_has_no_burst() {
        let mut l = Limiter::drained(Limits {
            max_pps: 100,
            max_kbps: 0,
        });
        assert!(!l.admit(0.0, 100));
        assert!(l.admit(0.010, 100));
    }

    #[test]
    fn unlimited_admits_everything() {
        let mut l = Limiter::new(Limits::default());
        assert!((0..100_000).all(|_| l.admit(0.0, 1500)));
    }

    #[test]
    fn packet_rate_is_enforced_with_one_second_burst() {
        let mut l = Limiter::new(Limits {
            max_pps: 100,
            max_kbps: 0,
        });
        let burst = (0..1000).filter(|_| l.admit(0.0, 100)).count();
        assert_eq!(burst, 100);
        // Over the next 10 s at 1000 pps offered, about 100 pps pass.
        let passed = (0..10_000).filter(|_| l.admit(0.001, 100)).count();
        assert!((990..=1010).contains(&passed), "{passed}");
    }

    #[test]
    fn bit_rate_is_enforced() {
        // 80 kbit/s = 10 kB/s: ten 1000-byte packets per second.
        let mut l = Limiter::new(Limits {
            max_pps: 0,
            max_kbps: 80,
        });
        let burst = (0..100).filter(|_| l.admit(0.0, 1000)).count();
        assert_eq!(burst, 10);
        assert!(!l.admit(0.050, 1000));
        assert!(l.admit(0.050, 1000));
    }
}
