//! Token buckets for the per-leg rate limits that tickets carry.

use std::time::Instant;

use crate::token::Limits;

/// How many seconds of traffic at the limit a bucket holds: the burst a leg may send at once
/// (a video keyframe) before the limit bites.
const BURST_SECS: f64 = 1.0;

/// One token bucket. A rate of zero means unlimited.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: f64,
    credit: f64,
}

impl Bucket {
    fn new(rate: f64) -> Self {
        Self {
            rate,
            credit: rate * BURST_SECS,
        }
    }

    #[inline]
    fn refill(&mut self, elapsed_secs: f64) {
        self.credit = (self.credit + elapsed_secs * self.rate).min(self.rate * BURST_SECS);
    }
}

/// The packet-rate and bit-rate limits of one leg.
#[derive(Debug, Clone, Copy)]
pub struct Limiter {
    packets: Bucket,
    bits: Bucket,
    last: Instant,
    unlimited: bool,
}

impl Limiter {
    /// A limiter for `limits`, full at `now`.
    pub fn new(limits: Limits, now: Instant) -> Self {
        Self {
            packets: Bucket::new(f64::from(limits.max_pps)),
            bits: Bucket::new(f64::from(limits.max_kbps) * 1000.0),
            last: now,
            unlimited: limits.max_pps == 0 && limits.max_kbps == 0,
        }
    }

    /// Takes one packet of `len` bytes from the buckets; false if either limit would be
    /// exceeded (the packet must be dropped, and takes nothing).
    #[inline]
    pub fn admit(&mut self, now: Instant, len: usize) -> bool {
        if self.unlimited {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.packets.refill(elapsed);
        self.bits.refill(elapsed);
        let bits = (len * 8) as f64;
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

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a real clock reading as the arbitrary origin
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn unlimited_admits_everything() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Limits::default(), t0);
        assert!((0..100_000).all(|_| l.admit(t0, 1500)));
    }

    #[test]
    fn packet_rate_is_enforced_with_one_second_burst() {
        let t0 = Instant::now();
        let mut l = Limiter::new(
            Limits {
                max_pps: 100,
                max_kbps: 0,
            },
            t0,
        );
        let burst = (0..1000).filter(|_| l.admit(t0, 100)).count();
        assert_eq!(burst, 100);
        // Over the next 10 s at 1000 pps offered, about 100 pps pass.
        let mut passed = 0;
        for i in 1..=10_000u64 {
            if l.admit(t0 + Duration::from_millis(i), 100) {
                passed += 1;
            }
        }
        assert!((990..=1010).contains(&passed), "{passed}");
    }

    #[test]
    fn bit_rate_is_enforced() {
        let t0 = Instant::now();
        // 80 kbit/s = 10 kB/s: ten 1000-byte packets per second.
        let mut l = Limiter::new(
            Limits {
                max_pps: 0,
                max_kbps: 80,
            },
            t0,
        );
        let burst = (0..100).filter(|_| l.admit(t0, 1000)).count();
        assert_eq!(burst, 10);
        assert!(!l.admit(t0 + Duration::from_millis(50), 1000));
        assert!(l.admit(t0 + Duration::from_millis(100), 1000));
    }
}
