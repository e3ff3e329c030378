//! The public API's requests as validated domain values, and the domain's errors as gRPC
//! statuses. Generated types stop here.

use std::time::Duration;

use tonic::{Code, Status};
use veil_proto::v1 as pb;

pub use crate::errors::Violation;
use crate::errors::{self, Reason};
use crate::quota::Exceeded;

/// Longest `call_id` and `participant_id`, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest region hint, in bytes.
pub const MAX_REGION_LEN: usize = 64;
/// Fewest participants in a session.
pub const MIN_PARTICIPANTS: usize = 2;
/// Most participants in a session.
pub const MAX_PARTICIPANTS: usize = veil_protocol::token::MAX_LEGS as usize;
/// Session lifetime when the request names none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Shortest lifetime a request may ask for.
pub const MIN_TTL: Duration = Duration::from_secs(60);
/// Longest lifetime a request may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(86_400);

/// A participant's transport preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP, or no preference.
    Udp,
    /// QUIC.
    Quic,
}

/// A validated participant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Participant {
    /// The signaling service's id for them.
    pub id: String,
    /// Region hint; empty for none.
    pub region: String,
    /// Preferred transport (`None` when unspecified).
    pub transport: Option<Transport>,
}

/// A validated `AllocateSession` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocateRequest {
    /// Idempotency key.
    pub call_id: String,
    /// 2 to 16 participants with distinct ids.
    pub participants: Vec<Participant>,
    /// Session lifetime.
    pub ttl: Duration,
}

/// A request field out of its documented range. The message names the field and never echoes
/// the value (which may be hostile or sensitive); the status carries the field's path and what
/// is wrong with it as a `google.rpc.BadRequest` too.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidArgument {
    /// The field's path, as `google.rpc.BadRequest` spells it: `participants[2].region`.
    pub field: String,
    /// What is wrong with it.
    pub violation: Violation,
    /// The whole message, naming the field.
    pub message: String,
}

impl InvalidArgument {
    /// `field` is wrong as `violation` says; `message` names it.
    pub fn new(field: impl Into<String>, violation: Violation, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            violation,
            message: message.into(),
        }
    }
}

fn check_id(field: &str, value: &str) -> Result<(), InvalidArgument> {
    if value.is_empty() {
        return Err(InvalidArgument::new(
            field,
            Violation::Empty,
            format!("{field} must not be empty"),
        ));
    }
    if value.len() > MAX_ID_LEN {
        return Err(InvalidArgument::new(
            field,
            Violation::TooLong,
            format!(
                "{field} must be at most {MAX_ID_LEN} bytes, got {}",
                value.len()
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidArgument::new(
            field,
            Violation::ControlCharacters,
            format!("{field} must not contain control characters"),
        ));
    }
    Ok(())
}

impl TryFrom<pb::AllocateSessionRequest> for AllocateRequest {
    type Error = InvalidArgument;

    fn try_from(pb: pb::AllocateSessionRequest) -> Result<Self, Self::Error> {
        let pb::AllocateSessionRequest {
            call_id,
            participants,
            ttl_seconds,
        } = pb;
        check_id("call_id", &call_id)?;
        let n = participants.len();
        if n < MIN_PARTICIPANTS {
            return Err(InvalidArgument::new(
                "participants",
                Violation::Count,
                format!(
                    "participants: a session needs {MIN_PARTICIPANTS} to {MAX_PARTICIPANTS}, got {n}"
                ),
            ));
        }
        if n > MAX_PARTICIPANTS {
            return Err(InvalidArgument::new(
                "participants",
                Violation::Count,
                format!("participants: at most {MAX_PARTICIPANTS} per session, got {n}"),
            ));
        }
        let mut out: Vec<Participant> = Vec::with_capacity(n);
        for (i, p) in participants.into_iter().enumerate() {
            let p = Participant::parse(&format!("participants[{i}]"), p)?;
            if let Some(j) = out.iter().position(|q| q.id == p.id) {
                return Err(InvalidArgument::new(
                    format!("participants[{i}].participant_id"),
                    Violation::Duplicate,
                    format!(
                        "participants[{i}].participant_id duplicates participants[{j}].participant_id"
                    ),
                ));
            }
            out.push(p);
        }
        let ttl = match ttl_seconds {
            0 => DEFAULT_TTL,
            s => bounded_ttl(s, &format!("0 (default {}) or ", DEFAULT_TTL.as_secs()))?,
        };
        Ok(Self {
            call_id,
            participants: out,
            ttl,
        })
    }
}

/// `ttl_seconds` as a lifetime, if from [`MIN_TTL`] to [`MAX_TTL`]; else an error whose message
/// offers `alternatives` first (what else the request may say).
fn bounded_ttl(seconds: u32, alternatives: &str) -> Result<Duration, InvalidArgument> {
    let ttl = Duration::from_secs(u64::from(seconds));
    if ttl < MIN_TTL || ttl > MAX_TTL {
        return Err(InvalidArgument::new(
            "ttl_seconds",
            Violation::OutOfRange,
            format!(
                "ttl_seconds must be {alternatives}from {} to {}, got {seconds}",
                MIN_TTL.as_secs(),
                MAX_TTL.as_secs()
            ),
        ));
    }
    Ok(ttl)
}

impl Participant {
    /// Validates a participant; `at` is its field path (`participants[2]`, `participant`).
    fn parse(at: &str, p: pb::Participant) -> Result<Self, InvalidArgument> {
        let pb::Participant {
            participant_id,
            region,
            preferred_transport,
        } = p;
        check_id(&format!("{at}.participant_id"), &participant_id)?;
        if region.len() > MAX_REGION_LEN || region.chars().any(char::is_control) {
            return Err(InvalidArgument::new(
                format!("{at}.region"),
                if region.len() > MAX_REGION_LEN {
                    Violation::TooLong
                } else {
                    Violation::ControlCharacters
                },
                format!(
                    "{at}.region must be at most {MAX_REGION_LEN} bytes without control characters"
                ),
            ));
        }
        let transport = match pb::Transport::try_from(preferred_transport) {
            Ok(pb::Transport::Unspecified) => None,
            Ok(pb::Transport::Udp) => Some(Transport::Udp),
            Ok(pb::Transport::Quic) => Some(Transport::Quic),
            Err(_) => {
                return Err(InvalidArgument::new(
                    format!("{at}.preferred_transport"),
                    Violation::UnknownValue,
                    format!("{at}.preferred_transport: unknown value {preferred_transport}"),
                ));
            }
        };
        Ok(Self {
            id: participant_id,
            region,
            transport,
        })
    }
}

/// A validated `AddParticipant` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddRequest {
    /// The session.
    pub session_id: u64,
    /// Who joins.
    pub participant: Participant,
}

impl TryFrom<pb::AddParticipantRequest> for AddRequest {
    type Error = InvalidArgument;

    fn try_from(pb: pb::AddParticipantRequest) -> Result<Self, Self::Error> {
        let session_id = parse_session_id(&pb.session_id)?;
        let Some(p) = pb.participant else {
            return Err(InvalidArgument::new(
                "participant",
                Violation::Empty,
                "participant must be set",
            ));
        };
        Ok(Self {
            session_id,
            participant: Participant::parse("participant", p)?,
        })
    }
}

/// A validated `RemoveParticipant` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoveRequest {
    /// The session.
    pub session_id: u64,
    /// Who leaves.
    pub participant_id: String,
}

impl TryFrom<pb::RemoveParticipantRequest> for RemoveRequest {
    type Error = InvalidArgument;

    fn try_from(pb: pb::RemoveParticipantRequest) -> Result<Self, Self::Error> {
        let session_id = parse_session_id(&pb.session_id)?;
        check_id("participant_id", &pb.participant_id)?;
        Ok(Self {
            session_id,
            participant_id: pb.participant_id,
        })
    }
}

/// A validated `ExtendSession` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtendRequest {
    /// The session.
    pub session_id: u64,
    /// Its new lifetime, from now.
    pub ttl: Duration,
}

impl TryFrom<pb::ExtendSessionRequest> for ExtendRequest {
    type Error = InvalidArgument;

    fn try_from(pb: pb::ExtendSessionRequest) -> Result<Self, Self::Error> {
        let session_id = parse_session_id(&pb.session_id)?;
        let ttl = bounded_ttl(pb.ttl_seconds, "")?;
        Ok(Self { session_id, ttl })
    }
}

/// Why extending a session failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtendError {
    /// No live session with this id.
    #[error(transparent)]
    NoSession(#[from] NotFound),
    /// The session was released.
    #[error("the session was released; a new call needs a new session")]
    Released,
}

impl From<ExtendError> for Status {
    fn from(e: ExtendError) -> Self {
        let message = e.to_string();
        match e {
            ExtendError::NoSession(n) => n.into(),
            ExtendError::Released => {
                errors::simple(Code::FailedPrecondition, message, Reason::SessionReleased)
            }
        }
    }
}

/// Why adding or removing a participant failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParticipantError {
    /// A bad request field.
    #[error(transparent)]
    Invalid(#[from] InvalidArgument),
    /// No live session with this id.
    #[error(transparent)]
    NoSession(#[from] NotFound),
    /// The session was released.
    #[error("the session was released; a new call needs a new session")]
    Released,
    /// The session has minted all its legs.
    #[error(
        "the session has minted all of its {MAX_PARTICIPANTS} legs (removed ones count); allocate a new session"
    )]
    Full,
    /// The participant is in the call already, added otherwise (another region or transport).
    #[error("participant_id is in the session already, with another region or transport")]
    Conflict,
    /// No participant of the session has this id.
    #[error("no participant with this participant_id in the session")]
    NotFound,
}

impl From<ParticipantError> for Status {
    fn from(e: ParticipantError) -> Self {
        let message = e.to_string();
        match e {
            ParticipantError::Invalid(i) => i.into(),
            ParticipantError::NoSession(n) => n.into(),
            ParticipantError::Released => {
                errors::simple(Code::FailedPrecondition, message, Reason::SessionReleased)
            }
            ParticipantError::Full => {
                errors::simple(Code::FailedPrecondition, message, Reason::SessionFull)
            }
            ParticipantError::Conflict => {
                errors::simple(Code::AlreadyExists, message, Reason::ParticipantConflict)
            }
            ParticipantError::NotFound => errors::status(
                Code::NotFound,
                message,
                Reason::ParticipantNotFound,
                &[],
                vec![
                    tonic_types::ResourceInfo::new(
                        "veil.v1.Participant",
                        "",
                        "",
                        "no participant with this participant_id was ever in the session",
                    )
                    .into(),
                ],
            ),
        }
    }
}

/// Parses the `session_id` field of a request.
pub fn parse_session_id(s: &str) -> Result<u64, InvalidArgument> {
    veil_proto::parse_session_id(s).ok_or_else(|| {
        InvalidArgument::new(
            "session_id",
            Violation::Format,
            "session_id must be 16 lowercase hex digits",
        )
    })
}

impl From<InvalidArgument> for Status {
    fn from(e: InvalidArgument) -> Self {
        errors::invalid_field(&e.field, e.violation, e.message)
    }
}

/// Why an allocation failed, apart from invalid arguments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocateError {
    /// The request was malformed.
    #[error(transparent)]
    Invalid(#[from] InvalidArgument),
    /// The `call_id` belongs to a live session with different participants.
    #[error("call_id is already allocated with different participants")]
    Conflict,
    /// The `call_id` belongs to a released session.
    #[error("call_id belongs to a released session; a new call needs a new call_id")]
    Released,
    /// No relay can take the session.
    #[error("no relay available: {0}")]
    NoRelay(String),
    /// The caller's credential is past one of its quotas.
    #[error(transparent)]
    Quota(#[from] Exceeded),
}

impl From<AllocateError> for Status {
    fn from(e: AllocateError) -> Self {
        match e {
            AllocateError::Invalid(i) => i.into(),
            AllocateError::Conflict => {
                errors::simple(Code::AlreadyExists, e.to_string(), Reason::CallIdConflict)
            }
            AllocateError::Released => {
                errors::simple(Code::AlreadyExists, e.to_string(), Reason::CallIdReleased)
            }
            AllocateError::NoRelay(_) => {
                errors::simple(Code::Unavailable, e.to_string(), Reason::NoRelayAvailable)
            }
            AllocateError::Quota(q) => q.into(),
        }
    }
}

/// A session id that matches no session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no session with this session_id")]
pub struct NotFound;

impl From<NotFound> for Status {
    fn from(e: NotFound) -> Self {
        errors::status(
            Code::NotFound,
            e.to_string(),
            Reason::SessionNotFound,
            &[],
            vec![
                tonic_types::ResourceInfo::new(
                    "veil.v1.Session",
                    "",
                    "",
                    "no session with this session_id on this controller replica (never \
                     allocated here, or expired)",
                )
                .into(),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(n: usize) -> pb::AllocateSessionRequest {
        pb::AllocateSessionRequest {
            call_id: "call-1".into(),
            participants: (0..n)
                .map(|i| pb::Participant {
                    participant_id: format!("p{i}"),
                    ..Default::default()
                })
                .collect(),
            ttl_seconds: 0,
        }
    }

    fn err(r: pb::AllocateSessionRequest) -> String {
        AllocateRequest::try_from(r).unwrap_err().message
    }

    #[test]
    fn valid_request_converts_with_defaults() {
        let mut r = req(3);
        r.participants[1].preferred_transport = pb::Transport::Quic as i32;
        r.participants[2].region = "eu-west".into();
        let a = AllocateRequest::try_from(r).unwrap();
        assert_eq!(a.ttl, DEFAULT_TTL);
        assert_eq!(a.participants[1].transport, Some(Transport::Quic));
        assert_eq!(a.participants[0].transport, None);
        assert_eq!(a.participants[2].region, "eu-west");
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut r = req(2);
        r.call_id.clear();
        assert_eq!(err(r), "call_id must not be empty");
        let mut r = req(2);
        r.call_id = "x".repeat(129);
        assert!(err(r).starts_with("call_id must be at most 128 bytes"));
        let mut r = req(2);
        r.call_id = "a\u{0}b".into();
        assert_eq!(err(r), "call_id must not contain control characters");
        assert!(err(req(0)).starts_with("participants: a session needs 2 to 16, got 0"));
        assert!(err(req(1)).contains("got 1"));
        assert!(err(req(17)).starts_with("participants: at most 16 per session, got 17"));
        let mut r = req(3);
        r.participants[2].participant_id = "p0".into();
        assert_eq!(
            err(r),
            "participants[2].participant_id duplicates participants[0].participant_id"
        );
        let mut r = req(2);
        r.participants[1].participant_id.clear();
        assert_eq!(err(r), "participants[1].participant_id must not be empty");
        let mut r = req(2);
        r.participants[0].preferred_transport = 9;
        assert_eq!(
            err(r),
            "participants[0].preferred_transport: unknown value 9"
        );
        let mut r = req(2);
        r.participants[0].region = "r".repeat(65);
        assert!(err(r).starts_with("participants[0].region"));
        for bad in [1, 59, 86_401, u32::MAX] {
            let mut r = req(2);
            r.ttl_seconds = bad;
            assert!(err(r).starts_with("ttl_seconds must be 0"), "{bad}");
        }
        for good in [60, 86_400] {
            let mut r = req(2);
            r.ttl_seconds = good;
            assert!(AllocateRequest::try_from(r).is_ok());
        }
    }

    #[test]
    fn errors_map_to_precise_codes() {
        assert_eq!(
            Status::from(AllocateError::Conflict).code(),
            Code::AlreadyExists
        );
        assert_eq!(
            Status::from(AllocateError::Released).code(),
            Code::AlreadyExists
        );
        assert_eq!(
            Status::from(AllocateError::NoRelay("x".into())).code(),
            Code::Unavailable
        );
        assert_eq!(Status::from(NotFound).code(), Code::NotFound);
        assert_eq!(
            Status::from(parse_session_id("xyz").unwrap_err()).code(),
            Code::InvalidArgument
        );
    }
}
