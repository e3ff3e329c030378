//! Machine-readable error details: every error the controller's services answer carries a
//! `google.rpc.ErrorInfo` with a stable [`Reason`] (domain [`DOMAIN`]) next to its message, plus
//! the standard detail that says what to fix: `google.rpc.BadRequest` (which field, and why) for
//! `INVALID_ARGUMENT`, `google.rpc.QuotaFailure` (and `google.rpc.RetryInfo` for a rate) for a
//! quota, `google.rpc.ResourceInfo` for `NOT_FOUND`. They travel in `grpc-status-details-bin`
//! as a `google.rpc.Status`, which `tonic_types::StatusExt`, grpc-go's `status.Details()` or
//! grpcio's `rpc_status.from_call()` decode.
//!
//! The reasons are a contract, listed in docs/ERRORS.md: clients switch on them, so one is never
//! renamed or reused for another cause. Messages may be reworded; reasons may not. Nothing in a
//! message or a detail names an address, a token or a caller-chosen value other than the
//! session id a request named.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetail, ErrorInfo, FieldViolation, StatusExt};

/// The `ErrorInfo.domain` of every Veil error.
pub const DOMAIN: &str = "veil.v1";

closed_set! {
    /// Why a call failed: `google.rpc.ErrorInfo.reason`. Stable: see docs/ERRORS.md.
    Reason {
        /// `INVALID_ARGUMENT`: a request field is out of its documented range
        /// (`google.rpc.BadRequest` names it).
        InvalidField => "INVALID_FIELD",
        /// `INVALID_ARGUMENT`: the request is not a well-formed protobuf message of the method's
        /// type (invalid UTF-8, a wrong wire type, truncated, nested too deep), or its gRPC
        /// framing is broken (the stream ended inside a message, no message, a bad flag).
        MalformedRequest => "MALFORMED_REQUEST",
        /// `INVALID_ARGUMENT`: a relay's `Attach` stream did not start with a `RelayHello`.
        HelloRequired => "HELLO_REQUIRED",
        /// `RESOURCE_EXHAUSTED`: a request message is larger than the server accepts.
        RequestTooLarge => "REQUEST_TOO_LARGE",
        /// `RESOURCE_EXHAUSTED`: the credential holds as many live sessions as its quota allows.
        QuotaLiveSessions => "QUOTA_LIVE_SESSIONS",
        /// `RESOURCE_EXHAUSTED`: the credential has as many `WatchSession` streams open as its
        /// quota allows.
        QuotaWatchStreams => "QUOTA_WATCH_STREAMS",
        /// `RESOURCE_EXHAUSTED`: the credential calls `AllocateSession` faster than its quota
        /// allows (`google.rpc.RetryInfo` says when to retry).
        QuotaAllocationRate => "QUOTA_ALLOCATION_RATE",
        /// `ALREADY_EXISTS`: the `call_id` belongs to a live session with other participants.
        CallIdConflict => "CALL_ID_CONFLICT",
        /// `ALREADY_EXISTS`: the `call_id` belongs to a released session.
        CallIdReleased => "CALL_ID_RELEASED",
        /// `NOT_FOUND`: no session with this `session_id` on this controller replica.
        SessionNotFound => "SESSION_NOT_FOUND",
        /// `NOT_FOUND`: no participant of the session has this `participant_id`.
        ParticipantNotFound => "PARTICIPANT_NOT_FOUND",
        /// `ALREADY_EXISTS`: `AddParticipant` named a participant in the session already, with
        /// another region or transport.
        ParticipantConflict => "PARTICIPANT_CONFLICT",
        /// `FAILED_PRECONDITION`: the session has minted all 16 of its legs (removed ones
        /// count); a call that grows further needs a new session.
        SessionFull => "SESSION_FULL",
        /// `FAILED_PRECONDITION`: the session was released; nobody joins it any more.
        SessionReleased => "SESSION_RELEASED",
        /// `NOT_FOUND`: no relay with this `node_id` is known to this controller replica.
        RelayNotFound => "RELAY_NOT_FOUND",
        /// `UNAVAILABLE`: no relay can take the session now; retry with backoff.
        NoRelayAvailable => "NO_RELAY_AVAILABLE",
        /// `UNAUTHENTICATED`: the call carries no `authorization: Bearer` credential.
        CredentialMissing => "CREDENTIAL_MISSING",
        /// `UNAUTHENTICATED`: the credential is not one this controller accepts.
        CredentialInvalid => "CREDENTIAL_INVALID",
        /// `PERMISSION_DENIED`: the credential belongs to another role than the service needs.
        CredentialWrongRole => "CREDENTIAL_WRONG_ROLE",
        /// `PERMISSION_DENIED`: a relay's credential may not register the `node_id` its hello
        /// names (bound to another node id, or the node id has a credential of its own).
        RelayIdentityMismatch => "RELAY_IDENTITY_MISMATCH",
        /// `PERMISSION_DENIED`: a relay's hello advertises an address outside the networks
        /// that relay may advertise (`--relay-networks`).
        RelayAddressNotAllowed => "RELAY_ADDRESS_NOT_ALLOWED",
        /// `PERMISSION_DENIED`: this replica serves no `ReplicaService`: it has no
        /// `--peer-tokens`, and listens on a reachable address.
        ReplicationOff => "REPLICATION_OFF",
        /// `UNAVAILABLE`: the replica that owns this call (docs/OPERATIONS.md, "Several
        /// replicas") took too long to answer the forwarded request; retry with backoff.
        OwnerReplicaUnreachable => "OWNER_REPLICA_UNREACHABLE",
        /// `DEADLINE_EXCEEDED`: the call's deadline (or the server's longest) passed.
        DeadlineExceeded => "DEADLINE_EXCEEDED",
    }
}

closed_set! {
    /// What is wrong with one field: `google.rpc.BadRequest.FieldViolation.reason`. Stable.
    Violation {
        /// Empty, where a value is required.
        Empty => "EMPTY",
        /// Longer than its limit (in bytes).
        TooLong => "TOO_LONG",
        /// Contains control characters.
        ControlCharacters => "CONTROL_CHARACTERS",
        /// A list with too few or too many elements.
        Count => "COUNT_OUT_OF_RANGE",
        /// Repeats another element's value where values must be distinct.
        Duplicate => "DUPLICATE",
        /// A number outside its documented range.
        OutOfRange => "OUT_OF_RANGE",
        /// An enum number this API does not define.
        UnknownValue => "UNKNOWN_ENUM_VALUE",
        /// Not in the documented format (a session id, an address).
        Format => "BAD_FORMAT",
        /// Needs another field that is not set.
        Requires => "REQUIRES_OTHER_FIELD",
        /// Not decodable as protobuf (wrong wire type, invalid UTF-8, truncated).
        Undecodable => "UNDECODABLE",
    }
}

/// A status with `code`, `message`, an `ErrorInfo` for `reason` (with `metadata`) and `more`
/// details after it.
pub fn status(
    code: Code,
    message: impl Into<String>,
    reason: Reason,
    metadata: &[(&str, String)],
    more: Vec<ErrorDetail>,
) -> Status {
    let info = ErrorInfo::new(
        reason.as_str(),
        DOMAIN,
        metadata
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect::<HashMap<_, _>>(),
    );
    let mut details = vec![ErrorDetail::from(info)];
    details.extend(more);
    Status::with_error_details_vec(code, message, details)
}

/// `INVALID_ARGUMENT` for one bad field: `ErrorInfo` `INVALID_FIELD` (metadata `field`) and a
/// `BadRequest` naming the field, with `message` as its description.
pub fn invalid_field(field: &str, violation: Violation, message: impl Into<String>) -> Status {
    let message = message.into();
    let mut v = FieldViolation::new(field, message.clone());
    v.reason = violation.as_str().to_string();
    status(
        Code::InvalidArgument,
        message,
        Reason::InvalidField,
        &[("field", field.to_string())],
        vec![tonic_types::BadRequest::new(vec![v]).into()],
    )
}

/// A status with only an `ErrorInfo` for `reason`.
pub fn simple(code: Code, message: impl Into<String>, reason: Reason) -> Status {
    status(code, message, reason, &[], Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_upper_snake_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        let all = Reason::ALL
            .iter()
            .map(|r| r.as_str())
            .chain(Violation::ALL.iter().map(|v| v.as_str()));
        for name in all {
            assert!(
                name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{name}"
            );
            assert!(seen.insert(name), "{name} used twice");
        }
    }

    #[test]
    fn details_decode_with_tonic_types() {
        let s = invalid_field("participants[2].region", Violation::TooLong, "too long");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "too long");
        let d = s.get_error_details();
        let info = d.error_info().unwrap();
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("INVALID_FIELD", DOMAIN)
        );
        assert_eq!(info.metadata["field"], "participants[2].region");
        let v = &d.bad_request().unwrap().field_violations[0];
        assert_eq!(
            (v.field.as_str(), v.reason.as_str()),
            ("participants[2].region", "TOO_LONG")
        );
    }
}
