//! The controller's Prometheus metrics. Labels are closed sets (results, states) or operator-set
//! region names; never a session, call, participant or address.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::registry::{Health, RelayView};

/// The controller's metrics, registered in a registry passed in.
#[derive(Clone)]
pub struct ControllerMetrics {
    /// `AllocateSession` calls by result.
    pub allocations: IntCounterVec,
    /// `AllocateSession` latency.
    pub allocation_latency: Histogram,
    /// `ReleaseSession` calls by result.
    pub releases: IntCounterVec,
    /// Placement decisions by role.
    pub placements: IntCounterVec,
    /// Live sessions.
    pub sessions: IntGauge,
    /// Relays by state and region.
    pub relays: IntGaugeVec,
    /// Calls rejected for missing or wrong credentials, by service.
    pub auth_failures: IntCounterVec,
}

impl std::fmt::Debug for ControllerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerMetrics").finish_non_exhaustive()
    }
}

/// Allocation results, as label values.
pub const ALLOCATION_RESULTS: [&str; 5] =
    ["created", "existing", "invalid", "conflict", "unavailable"];

impl ControllerMetrics {
    /// Registers the controller's metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let allocations = IntCounterVec::new(
            Opts::new(
                "veil_controller_allocations_total",
                "AllocateSession calls by result.",
            ),
            &["result"],
        )?;
        let allocation_latency = Histogram::with_opts(
            HistogramOpts::new(
                "veil_controller_allocation_duration_seconds",
                "AllocateSession latency.",
            )
            .buckets(vec![
                5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
            ]),
        )?;
        let releases = IntCounterVec::new(
            Opts::new(
                "veil_controller_releases_total",
                "ReleaseSession calls by result.",
            ),
            &["result"],
        )?;
        let placements = IntCounterVec::new(
            Opts::new(
                "veil_controller_placements_total",
                "Relays chosen for new sessions, by role.",
            ),
            &["role"],
        )?;
        let sessions = IntGauge::new(
            "veil_controller_sessions",
            "Sessions this controller holds (not yet expired).",
        )?;
        let relays = IntGaugeVec::new(
            Opts::new(
                "veil_controller_relays",
                "Relays known to this controller, by state and region.",
            ),
            &["state", "region"],
        )?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "veil_controller_auth_failures_total",
                "Calls refused for missing or wrong credentials.",
            ),
            &["service"],
        )?;
        for c in [&allocations, &releases, &placements, &auth_failures] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(allocation_latency.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(relays.clone()))?;
        for r in ALLOCATION_RESULTS {
            allocations.with_label_values(&[r]);
        }
        for r in ["released", "not_found", "invalid"] {
            releases.with_label_values(&[r]);
        }
        for r in ["primary", "backup"] {
            placements.with_label_values(&[r]);
        }
        for r in ["session", "registry", "admin"] {
            auth_failures.with_label_values(&[r]);
        }
        Ok(Self {
            allocations,
            allocation_latency,
            releases,
            placements,
            sessions,
            relays,
            auth_failures,
        })
    }

    /// Recomputes the relay gauges from the registry's views.
    pub fn set_relays(&self, views: &[RelayView]) {
        self.relays.reset();
        for v in views {
            let state = match (v.health, v.draining || v.load.draining) {
                (Health::Down, _) => "down",
                (Health::Up, true) => "draining",
                (Health::Up, false) => "up",
            };
            self.relays
                .with_label_values(&[state, &v.info.region])
                .inc();
        }
        // Keep the zero series of every state visible for alerting on absence.
        for state in ["up", "draining", "down"] {
            for region in views
                .iter()
                .map(|v| v.info.region.as_str())
                .collect::<std::collections::BTreeSet<_>>()
            {
                self.relays.with_label_values(&[state, region]);
            }
        }
    }
}
