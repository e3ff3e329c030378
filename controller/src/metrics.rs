//! The controller's Prometheus metrics. Labels are closed enums (results, roles, services,
//! states: the `labels!` sets below, the only values a label can take) or the region names
//! relays are configured with; never a session, call, participant or address.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

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
    /// Roles served without tokens (1) or with (0).
    open_roles: IntGaugeVec,
    /// gRPC requests by method and status code.
    rpc_requests: IntCounterVec,
    /// gRPC latency of unary methods, by method.
    rpc_latency: HistogramVec,
    /// Calls refused for a quota, by quota and credential.
    quota_refusals: IntCounterVec,
    /// Each quota's limit (0: unlimited).
    quota_limits: IntGaugeVec,
    /// Live sessions, by credential.
    credential_sessions: IntGaugeVec,
    /// Open `WatchSession` streams, by credential.
    credential_watches: IntGaugeVec,
    /// Peer replica addresses this one follows now (their Sync stream is up).
    pub peers_up: IntGauge,
    /// Peer replica addresses known: every address `--peers` resolves to, less this replica's.
    pub peers: IntGauge,
    /// Changes pushed to a peer replica (`Apply`) that it did not take in time.
    pub replication_failures: prometheus::IntCounter,
    /// Requests forwarded to the replica that owns their call, by method.
    forwarded: IntCounterVec,
}

impl std::fmt::Debug for ControllerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerMetrics").finish_non_exhaustive()
    }
}

closed_set! {
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
        /// The caller's credential was past a quota (its allocation rate or live sessions).
        Quota => "quota",
    }
}

closed_set! {
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

closed_set! {
    /// The role a placed relay plays in a session.
    PlacementRole {
        /// Serves the session.
        Primary => "primary",
        /// Takes it over when the primary fails.
        Backup => "backup",
    }
}

closed_set! {
    /// The gRPC service a refused credential was presented to.
    AuthService {
        /// `SessionService` (signaling services).
        Session => "session",
        /// `RelayRegistry` (relays).
        Registry => "registry",
        /// `AdminService` (operators).
        Admin => "admin",
        /// `ReplicaService` (peer controller replicas).
        Replica => "replica",
    }
}

closed_set! {
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

closed_set! {
    /// A caller role, as `veil_controller_open_role` names it.
    Role {
        /// Signaling services (`SessionService`, `--signaling-tokens`).
        Signaling => "signaling",
        /// Relays (`RelayRegistry`, `--relay-tokens`).
        Relay => "relay",
        /// Operators (`AdminService`, `--admin-tokens`).
        Admin => "admin",
    }
}

closed_set! {
    /// A gRPC method this server serves; anything else (an unknown path) is `Other`.
    RpcMethod {
        /// `SessionService.AllocateSession`.
        AllocateSession => "veil.v1.SessionService/AllocateSession",
        /// `SessionService.GetSession`.
        GetSession => "veil.v1.SessionService/GetSession",
        /// `SessionService.AddParticipant`.
        AddParticipant => "veil.v1.SessionService/AddParticipant",
        /// `SessionService.RemoveParticipant`.
        RemoveParticipant => "veil.v1.SessionService/RemoveParticipant",
        /// `SessionService.ExtendSession`.
        ExtendSession => "veil.v1.SessionService/ExtendSession",
        /// `SessionService.ReleaseSession`.
        ReleaseSession => "veil.v1.SessionService/ReleaseSession",
        /// `SessionService.WatchSession` (server streaming).
        WatchSession => "veil.v1.SessionService/WatchSession",
        /// `RelayRegistry.Attach` (bidirectional streaming).
        Attach => "veil.v1.RelayRegistry/Attach",
        /// `ReplicaService.Sync` (a peer replica following this one).
        ReplicaSync => "veil.v1.ReplicaService/Sync",
        /// `ReplicaService.Apply` (a peer replica's change, merged here).
        ReplicaApply => "veil.v1.ReplicaService/Apply",
        /// `AdminService.DrainRelay`.
        DrainRelay => "veil.v1.AdminService/DrainRelay",
        /// `AdminService.ListRelays`.
        ListRelays => "veil.v1.AdminService/ListRelays",
        /// `grpc.health.v1.Health.Check`.
        HealthCheck => "grpc.health.v1.Health/Check",
        /// `grpc.health.v1.Health.Watch` (server streaming).
        HealthWatch => "grpc.health.v1.Health/Watch",
        /// Server reflection, v1 (bidirectional streaming).
        ReflectionV1 => "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        /// Server reflection, v1alpha (bidirectional streaming).
        ReflectionV1alpha => "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        /// A path this server has no method for (answered `UNIMPLEMENTED`).
        Other => "other",
    }
}

impl RpcMethod {
    /// The method a request path (`/package.Service/Method`) names.
    pub fn from_path(path: &str) -> Self {
        let name = path.strip_prefix('/').unwrap_or(path);
        Self::ALL
            .iter()
            .copied()
            .find(|m| *m != Self::Other && m.as_str() == name)
            .unwrap_or(Self::Other)
    }

    /// Whether the method answers with one message: only those are timed (a stream's length
    /// is how long its caller keeps it, not how fast the server is).
    pub fn is_unary(self) -> bool {
        !matches!(
            self,
            Self::WatchSession
                | Self::Attach
                | Self::ReplicaSync
                | Self::HealthWatch
                | Self::ReflectionV1
                | Self::ReflectionV1alpha
        )
    }
}

closed_set! {
    /// A gRPC status code, as its canonical name.
    RpcCode {
        /// 0.
        Ok => "OK",
        /// 1.
        Cancelled => "CANCELLED",
        /// 2.
        Unknown => "UNKNOWN",
        /// 3.
        InvalidArgument => "INVALID_ARGUMENT",
        /// 4.
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        /// 5.
        NotFound => "NOT_FOUND",
        /// 6.
        AlreadyExists => "ALREADY_EXISTS",
        /// 7.
        PermissionDenied => "PERMISSION_DENIED",
        /// 8.
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        /// 9.
        FailedPrecondition => "FAILED_PRECONDITION",
        /// 10.
        Aborted => "ABORTED",
        /// 11.
        OutOfRange => "OUT_OF_RANGE",
        /// 12.
        Unimplemented => "UNIMPLEMENTED",
        /// 13.
        Internal => "INTERNAL",
        /// 14.
        Unavailable => "UNAVAILABLE",
        /// 15.
        DataLoss => "DATA_LOSS",
        /// 16.
        Unauthenticated => "UNAUTHENTICATED",
    }
}

impl From<tonic::Code> for RpcCode {
    fn from(c: tonic::Code) -> Self {
        use tonic::Code as C;
        match c {
            C::Ok => Self::Ok,
            C::Cancelled => Self::Cancelled,
            C::Unknown => Self::Unknown,
            C::InvalidArgument => Self::InvalidArgument,
            C::DeadlineExceeded => Self::DeadlineExceeded,
            C::NotFound => Self::NotFound,
            C::AlreadyExists => Self::AlreadyExists,
            C::PermissionDenied => Self::PermissionDenied,
            C::ResourceExhausted => Self::ResourceExhausted,
            C::FailedPrecondition => Self::FailedPrecondition,
            C::Aborted => Self::Aborted,
            C::OutOfRange => Self::OutOfRange,
            C::Unimplemented => Self::Unimplemented,
            C::Internal => Self::Internal,
            C::Unavailable => Self::Unavailable,
            C::DataLoss => Self::DataLoss,
            C::Unauthenticated => Self::Unauthenticated,
        }
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
        let open_roles = IntGaugeVec::new(
            Opts::new(
                "veil_controller_open_role",
                "1 for a role served without tokens (anyone reaching the gRPC port may act in \
                 it), 0 for a role that needs its bearer token.",
            ),
            &["role"],
        )?;
        let rpc_requests = IntCounterVec::new(
            Opts::new(
                "veil_controller_grpc_requests_total",
                "gRPC requests answered, by method and status code (streams count when they end).",
            ),
            &["method", "code"],
        )?;
        let rpc_latency = HistogramVec::new(
            HistogramOpts::new(
                "veil_controller_grpc_request_duration_seconds",
                "Time from a unary gRPC request's arrival to its status, by method.",
            )
            .buckets(vec![
                1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0,
            ]),
            &["method"],
        )?;
        for c in [
            &allocations,
            &releases,
            &placements,
            &auth_failures,
            &rpc_requests,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        let quota_refusals = IntCounterVec::new(
            Opts::new(
                "veil_controller_quota_refusals_total",
                "Signaling calls refused with RESOURCE_EXHAUSTED for a quota, by quota and \
                 credential (its position in --signaling-tokens, or `open`; never the token).",
            ),
            &["quota", "credential"],
        )?;
        let quota_limits = IntGaugeVec::new(
            Opts::new(
                "veil_controller_quota_limit",
                "Each signaling credential's quota (0: unlimited).",
            ),
            &["quota"],
        )?;
        let credential_sessions = IntGaugeVec::new(
            Opts::new(
                "veil_controller_credential_sessions",
                "Live sessions (neither released nor expired) by the signaling credential that \
                 allocated them.",
            ),
            &["credential"],
        )?;
        let credential_watches = IntGaugeVec::new(
            Opts::new(
                "veil_controller_credential_watch_streams",
                "WatchSession streams open, by signaling credential.",
            ),
            &["credential"],
        )?;
        let peers_up = IntGauge::new(
            "veil_controller_peers_up",
            "Peer replica addresses this replica follows now: their Sync stream is up.",
        )?;
        let peers = IntGauge::new(
            "veil_controller_peers",
            "Peer replica addresses known: every address the --peers URLs resolve to, less this \
             replica's own.",
        )?;
        let replication_failures = prometheus::IntCounter::new(
            "veil_controller_replication_failures_total",
            "Session changes pushed to a peer replica (ReplicaService.Apply) that it did not \
             take within 1 s: that peer gets them when its Sync stream is back.",
        )?;
        let forwarded = IntCounterVec::new(
            Opts::new(
                "veil_controller_forwarded_total",
                "Requests forwarded to the replica that owns their call, by method and outcome \
                 (`answered`: the owner answered; `fallback`: it could not be reached, and this \
                 replica served the request itself).",
            ),
            &["method", "outcome"],
        )?;
        for m in ["AllocateSession", "AddParticipant"] {
            for o in ["answered", "fallback"] {
                forwarded.with_label_values(&[m, o]);
            }
        }
        registry.register(Box::new(peers_up.clone()))?;
        registry.register(Box::new(peers.clone()))?;
        registry.register(Box::new(replication_failures.clone()))?;
        registry.register(Box::new(forwarded.clone()))?;
        registry.register(Box::new(quota_refusals.clone()))?;
        registry.register(Box::new(quota_limits.clone()))?;
        registry.register(Box::new(credential_sessions.clone()))?;
        registry.register(Box::new(credential_watches.clone()))?;
        registry.register(Box::new(open_roles.clone()))?;
        registry.register(Box::new(rpc_latency.clone()))?;
        // Every method's OK series and every unary method's histogram exist from the start (not
        // the other codes: 17 codes times 12 methods would be mostly zeros); a ratio of errors
        // over all requests is then defined as soon as a method has been called.
        for m in RpcMethod::ALL {
            rpc_requests.with_label_values(&[m.as_str(), RpcCode::Ok.as_str()]);
            if m.is_unary() {
                rpc_latency.with_label_values(&[m.as_str()]);
            }
        }
        for r in Role::ALL {
            open_roles.with_label_values(&[r.as_str()]);
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
            open_roles,
            rpc_requests,
            rpc_latency,
            quota_refusals,
            quota_limits,
            credential_sessions,
            credential_watches,
            peers_up,
            peers,
            replication_failures,
            forwarded,
        })
    }

    /// Exports `quotas`' limits, and creates every series of its credentials (a bounded set: one
    /// per configured token), so that they exist from start-up.
    pub fn init_quotas(&self, quotas: &crate::quota::Quotas) {
        use crate::quota::Quota;
        for q in Quota::ALL {
            self.quota_limits
                .with_label_values(&[q.as_str()])
                .set(i64::from(quotas.limits().of(q)));
            for c in quotas.labels() {
                self.quota_refusals.with_label_values(&[q.as_str(), c]);
            }
        }
        self.set_quota_usage(quotas);
    }

    /// Recomputes the per-credential usage gauges.
    pub fn set_quota_usage(&self, quotas: &crate::quota::Quotas) {
        for (c, live, watches) in quotas.usage() {
            self.credential_sessions
                .with_label_values(&[c])
                .set(i64::from(live));
            self.credential_watches
                .with_label_values(&[c])
                .set(i64::from(watches));
        }
    }

    /// Counts a call refused for `quota`; `credential` is the credential's label.
    pub fn count_quota_refusal(&self, quota: crate::quota::Quota, credential: &str) {
        self.quota_refusals
            .with_label_values(&[quota.as_str(), credential])
            .inc();
    }

    /// Refusals counted for `quota` and `credential`.
    pub fn quota_refusals(&self, quota: crate::quota::Quota, credential: &str) -> u64 {
        self.quota_refusals
            .with_label_values(&[quota.as_str(), credential])
            .get()
    }

    /// Records whether `role` is open (served without tokens).
    pub fn set_open_role(&self, role: Role, open: bool) {
        self.open_roles
            .with_label_values(&[role.as_str()])
            .set(i64::from(open));
    }

    /// Counts an answered gRPC request; `elapsed` is timed for unary methods only.
    pub fn count_rpc(&self, method: RpcMethod, code: RpcCode, elapsed: std::time::Duration) {
        self.rpc_requests
            .with_label_values(&[method.as_str(), code.as_str()])
            .inc();
        if method.is_unary() {
            self.rpc_latency
                .with_label_values(&[method.as_str()])
                .observe(elapsed.as_secs_f64());
        }
    }

    /// gRPC requests counted for `method` with `code`.
    pub fn rpc_requests(&self, method: RpcMethod, code: RpcCode) -> u64 {
        self.rpc_requests
            .with_label_values(&[method.as_str(), code.as_str()])
            .get()
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

    /// Counts a request forwarded to its call's owner: `method` (`AllocateSession` or
    /// `AddParticipant`), `answered` or not (served here instead).
    pub fn count_forwarded(&self, method: &str, answered: bool) {
        let outcome = if answered { "answered" } else { "fallback" };
        self.forwarded.with_label_values(&[method, outcome]).inc();
    }

    /// Forwarded requests counted.
    pub fn forwarded(&self, method: &str, answered: bool) -> u64 {
        let outcome = if answered { "answered" } else { "fallback" };
        self.forwarded.with_label_values(&[method, outcome]).get()
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
