//! Placement policy: which relay serves a session, and which one backs it up. A pure function of
//! the controller's view of the relays; no I/O, no clock.

use rand::Rng;

/// The controller's view of one relay, as placement needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Node id.
    pub node_id: String,
    /// Region label; empty if none.
    pub region: String,
    /// Failure domain within the region; empty if unknown.
    pub zone: String,
    /// Reporting and reachable.
    pub healthy: bool,
    /// Asked for no new sessions.
    pub draining: bool,
    /// The most legs it accepts.
    pub capacity_legs: u64,
    /// Legs bound at its last report.
    pub bound_legs: u64,
    /// Legs this controller placed on it since its last report.
    pub pending_legs: u64,
    /// CPU use at its last report, 0 to 1.
    pub cpu: f64,
}

impl Candidate {
    /// Load score, 0 (idle) to 1 (full): the larger of leg occupancy (counting what was placed
    /// since the last report) and CPU use beyond half of the relay's capacity.
    ///
    /// CPU below half counts for nothing on purpose: readings of equally loaded relays differ by
    /// noise of a few percent, and scoring that noise would skew placement towards whichever
    /// relay happened to report the lowest figure. Legs, counted exactly (including those placed
    /// since the last report), balance those relays; CPU only steers away from relays that are
    /// genuinely busy, and a saturated relay (CPU near 1) scores as if full.
    pub fn score(&self) -> f64 {
        let legs = (self.bound_legs + self.pending_legs) as f64 / self.capacity_legs.max(1) as f64;
        let cpu = ((self.cpu - CPU_FREE) / (1.0 - CPU_FREE)).clamp(0.0, 1.0);
        legs.max(cpu)
    }

    fn has_room(&self, legs: u64) -> bool {
        self.bound_legs + self.pending_legs + legs <= self.capacity_legs
    }

    /// Whether this relay may take a new session of `legs` legs.
    pub fn eligible(&self, legs: u64) -> bool {
        self.healthy && !self.draining && self.has_room(legs)
    }
}

/// CPU use a relay may have before placement starts to count it.
pub const CPU_FREE: f64 = 0.5;

/// Distances between regions, for placing calls near their participants.
#[derive(Debug, Clone, Default)]
pub struct RegionMap {
    distances: std::collections::HashMap<(String, String), u32>,
}

/// Distance assumed between two different regions that the map does not list.
pub const DEFAULT_REGION_DISTANCE: u32 = 100;

impl RegionMap {
    /// Parses `a:b=d` entries (symmetric), for example `eu-west:eu-central=10`.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut distances = std::collections::HashMap::new();
        for e in entries {
            let (pair, d) = e
                .split_once('=')
                .ok_or_else(|| format!("{e:?}: expected REGION:REGION=DISTANCE"))?;
            let (a, b) = pair
                .split_once(':')
                .ok_or_else(|| format!("{e:?}: expected REGION:REGION=DISTANCE"))?;
            let d: u32 = d
                .trim()
                .parse()
                .map_err(|_| format!("{e:?}: distance must be a non-negative integer"))?;
            let (a, b) = (a.trim().to_string(), b.trim().to_string());
            if a.is_empty() || b.is_empty() {
                return Err(format!("{e:?}: region names must not be empty"));
            }
            distances.insert((a.clone(), b.clone()), d);
            distances.insert((b, a), d);
        }
        Ok(Self { distances })
    }

    /// Distance from a participant's region hint to a relay's region: 0 for the same region or
    /// when either is unknown.
    pub fn distance(&self, hint: &str, relay: &str) -> u32 {
        if hint.is_empty() || relay.is_empty() || hint == relay {
            return 0;
        }
        self.distances
            .get(&(hint.to_string(), relay.to_string()))
            .copied()
            .unwrap_or(DEFAULT_REGION_DISTANCE)
    }
}

/// Where a session goes: indices into the candidate list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The relay participants bind on first.
    pub primary: usize,
    /// Another relay, in another failure domain where possible.
    pub backup: Option<usize>,
}

/// Why no relay could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// No relay is healthy, not draining, and has room.
    #[error("no relay available with room for {legs} legs")]
    NoRelay {
        /// Legs requested.
        legs: u64,
    },
}

/// Chooses a primary and a backup relay for a session of `legs` legs whose participants gave
/// the region hints `hints` (empty strings for none).
///
/// 1. Only healthy, non-draining relays with room are candidates.
/// 2. Region: the region whose relays minimise the worst participant's distance wins; only its
///    relays remain.
/// 3. Power of two choices: of two random remaining relays, the one with the lower load score.
///    Sampling two (rather than taking the global minimum) keeps a burst of allocations, placed
///    between two load reports, from piling onto one relay; counting the legs placed since the
///    last report does the rest.
/// 4. Backup: the least loaded eligible relay on another node, preferring another zone, then
///    another region if none is left in this one.
pub fn place(
    candidates: &[Candidate],
    legs: u64,
    hints: &[&str],
    regions: &RegionMap,
    rng: &mut impl Rng,
) -> Result<Placement, PlacementError> {
    let eligible: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].eligible(legs))
        .collect();
    if eligible.is_empty() {
        return Err(PlacementError::NoRelay { legs });
    }
    let worst = |i: usize| {
        hints
            .iter()
            .map(|h| regions.distance(h, &candidates[i].region))
            .max()
            .unwrap_or(0)
    };
    let best = eligible
        .iter()
        .map(|&i| worst(i))
        .min()
        .expect("eligible is not empty");
    let near: Vec<usize> = eligible
        .iter()
        .copied()
        .filter(|&i| worst(i) == best)
        .collect();

    let primary = if near.len() == 1 {
        near[0]
    } else {
        // Two distinct samples.
        let i = rng.random_range(0..near.len());
        let mut j = rng.random_range(0..near.len() - 1);
        if j >= i {
            j += 1;
        }
        let (a, b) = (near[i], near[j]);
        if candidates[b].score() < candidates[a].score() {
            b
        } else {
            a
        }
    };

    let p = &candidates[primary];
    let backup = eligible
        .iter()
        .copied()
        .filter(|&i| candidates[i].node_id != p.node_id)
        .min_by(|&x, &y| {
            let key = |i: usize| {
                let c = &candidates[i];
                let same_zone = !p.zone.is_empty() && c.zone == p.zone && c.region == p.region;
                (worst(i), same_zone)
            };
            key(x)
                .cmp(&key(y))
                .then(candidates[x].score().total_cmp(&candidates[y].score()))
        });
    Ok(Placement { primary, backup })
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    pub(crate) fn relay(id: &str, region: &str, zone: &str) -> Candidate {
        Candidate {
            node_id: id.into(),
            region: region.into(),
            zone: zone.into(),
            healthy: true,
            draining: false,
            capacity_legs: 10_000,
            bound_legs: 0,
            pending_legs: 0,
            cpu: 0.0,
        }
    }

    #[test]
    fn only_healthy_non_draining_relays_with_room() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut down = relay("down", "", "");
        down.healthy = false;
        let mut draining = relay("draining", "", "");
        draining.draining = true;
        let mut full = relay("full", "", "");
        full.bound_legs = 9_999;
        let ok = relay("ok", "", "");
        let cs = vec![down, draining, full, ok];
        for _ in 0..100 {
            let p = place(&cs, 2, &[], &RegionMap::default(), &mut rng).unwrap();
            assert_eq!(p.primary, 3);
            assert_eq!(p.backup, None);
        }
        assert_eq!(
            place(&cs[..3], 2, &[], &RegionMap::default(), &mut rng),
            Err(PlacementError::NoRelay { legs: 2 })
        );
    }

    #[test]
    fn lower_load_wins_and_backup_is_another_zone() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut busy = relay("busy", "eu", "a");
        busy.cpu = 0.9;
        let idle_a = relay("idle-a", "eu", "a");
        let idle_b = relay("idle-b", "eu", "b");
        let cs = vec![busy, idle_a, idle_b];
        let mut on_busy = 0;
        for _ in 0..1_000 {
            let p = place(&cs, 2, &[], &RegionMap::default(), &mut rng).unwrap();
            if p.primary == 0 {
                on_busy += 1;
            }
            let b = p.backup.unwrap();
            assert_ne!(cs[b].node_id, cs[p.primary].node_id);
            if cs[p.primary].zone == "a" {
                assert_eq!(cs[b].zone, "b", "backup in another zone when one exists");
            }
        }
        assert_eq!(on_busy, 0, "two choices never pick the busiest of three");
    }

    #[test]
    fn region_minimises_the_worst_participant_distance() {
        let mut rng = StdRng::seed_from_u64(3);
        let regions = RegionMap::parse(&[
            "eu:us=80".into(),
            "eu:asia=120".into(),
            "us:asia=100".into(),
        ])
        .unwrap();
        let cs = vec![
            relay("eu1", "eu", ""),
            relay("us1", "us", ""),
            relay("asia1", "asia", ""),
        ];
        let p = place(&cs, 2, &["eu", "eu"], &regions, &mut rng).unwrap();
        assert_eq!(cs[p.primary].region, "eu");
        // eu and asia: worst distance is 120 in eu or asia, 100 in us.
        let p = place(&cs, 2, &["eu", "asia"], &regions, &mut rng).unwrap();
        assert_eq!(cs[p.primary].region, "us");
        // Backup falls back to the nearest other region.
        let p = place(&cs, 2, &["eu"], &regions, &mut rng).unwrap();
        assert_eq!(cs[p.backup.unwrap()].region, "us");
        assert!(RegionMap::parse(&["eu-us=1".into()]).is_err());
        assert!(RegionMap::parse(&["eu:us=x".into()]).is_err());
    }
}
