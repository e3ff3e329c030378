//! The controller's Prometheus metrics. Labels are closed enums (results, roles, services,
//! states: the `labels!` sets below, the only values a label can take) or the region names
//! relays are configured with; never a session, call, participant or address.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::registry::{Health, RelayView};

/// The controller's metrics, registered in a registry passed in.
#[derive(Clone)]
pub struct ControllerMetrics {
    /// `AllocateSession` calls by result.
    allocations: IntCounterVec,
    /// `AllocateSession` latency.
    pub allocation_latency: Histogram,
    /// `ReleaseSession` calls by result.
    releases: IntCounterVec,
    /// Placement decisions by role.
    placements: IntCounterVec,
    /// Live sessions.
    pub sessions: IntGauge,
    /// Relays by state and region.
    relays: IntGaugeVec,
    /// Calls rejected for missing or wrong credentials, by service.
    auth_failures: IntCounterVec,
}

impl std::fmt::Debug for ControllerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerMetrics").finish_non_exhaustive()
    }
}

/// Defines a closed set of metric label values: an enum, every value in order, and the label
/// text of each. Nothing else can become a label value.
macro_rules! labels {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $v:ident => $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $v,)+
        }

        impl $name {
            /// Every value, in order.
            pub const ALL: &'static [Self] = &[$(Self::$v,)+];

            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$v => $text,)+
                }
            }
        }
    };
}

labels! {
    /// How an `AllocateSession` call ended.
    AllocationResult {
        /// A new session.
        Created => "created",
        /// A retry with a known `call_id`: the existing session.
        Existing => "existing",
        /// The request was invalid.
        Invalid => "invalid",
        /// The `call_id` names another request's session, or a released one.
        Conflict => "conflict",
        /// No relay could take it.
        Unavailable => "unavailable",
    }
}

labels! {
    /// How a `ReleaseSession` call ended.
    ReleaseResult {
        /// Released.
        Released => "released",
        /// No such session.
        NotFound => "not_found",
        /// The session id is malformed.
        Invalid => "invalid",
    }
}

labels! {
    /// The role a placed relay plays in a session.
    PlacementRole {
        /// Serves the session.
        Primary => "primary",
        /// Takes it over when the primary fails.
        Backup => "backup",
    }
}

labels! {
    /// The gRPC service a refused credential was presented to.
    AuthService {
        /// `SessionService` (signaling services).
        Session => "session",
        /// `RelayRegistry` (relays).
        Registry => "registry",
        /// `AdminService` (operators).
        Admin => "admin",
    }
}

labels! {
    /// A relay's state as the registry sees it.
    RelayState {
        /// Reporting, taking sessions.
        Up => "up",
        /// Reporting, taking no new sessions.
        Draining => "draining",
        /// Silent past the timeout.
        Down => "down",
    }
}

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
        for r in AllocationResult::ALL {
            allocations.with_label_values(&[r.as_str()]);
        }
        for r in ReleaseResult::ALL {
            releases.with_label_values(&[r.as_str()]);
        }
        for r in PlacementRole::ALL {
            placements.with_label_values(&[r.as_str()]);
        }
        for r in AuthService::ALL {
            auth_failures.with_label_values(&[r.as_str()]);
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

    /// Counts an `AllocateSession` call.
    pub fn count_allocation(&self, r: AllocationResult) {
        self.allocations.with_label_values(&[r.as_str()]).inc();
    }

    /// Counts a `ReleaseSession` call.
    pub fn count_release(&self, r: ReleaseResult) {
        self.releases.with_label_values(&[r.as_str()]).inc();
    }

    /// Counts a relay placed in a session.
    pub fn count_placement(&self, r: PlacementRole) {
        self.placements.with_label_values(&[r.as_str()]).inc();
    }

    /// Counts a refused credential.
    pub fn count_auth_failure(&self, s: AuthService) {
        self.auth_failures.with_label_values(&[s.as_str()]).inc();
    }

    /// Refused credentials counted for `s`.
    pub fn auth_failures(&self, s: AuthService) -> u64 {
        self.auth_failures.with_label_values(&[s.as_str()]).get()
    }

    /// Recomputes the relay gauges from the registry's views.
    pub fn set_relays(&self, views: &[RelayView]) {
        self.relays.reset();
        for v in views {
            let state = match (v.health, v.draining || v.load.draining) {
                (Health::Down, _) => RelayState::Down,
                (Health::Up, true) => RelayState::Draining,
                (Health::Up, false) => RelayState::Up,
            };
            self.relays
                .with_label_values(&[state.as_str(), &v.info.region])
                .inc();
        }
        // Keep the zero series of every state visible for alerting on absence.
        for state in RelayState::ALL.iter().map(|s| s.as_str()) {
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
