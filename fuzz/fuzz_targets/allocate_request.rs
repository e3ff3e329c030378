//! The controller's conversion of the public API's `AllocateSessionRequest` into its domain type
//! (`veil_controller::api::AllocateRequest::try_from`), on requests decoded with prost from
//! arbitrary bytes, as tonic decodes what a signaling service sends.
//!
//! Asserts: no panic; an accepted request has a `call_id` and participant ids of 1 to 128 bytes
//! without control characters, 2 to 16 participants with distinct ids, in request order, regions
//! of at most 64 bytes without control characters, the transports asked for, and a TTL of 0
//! (the default, 3600 s) or 60 to 86400 s as asked; a refused one gets a short message that
//! cannot be echoing a hostile value.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use veil_controller::api::{
    AllocateRequest, DEFAULT_TTL, MAX_ID_LEN, MAX_PARTICIPANTS, MAX_REGION_LEN, MAX_TTL,
    MIN_PARTICIPANTS, MIN_TTL, Transport,
};
use veil_proto::v1 as pb;

fn check_id(id: &str) {
    assert!(
        !id.is_empty() && id.len() <= MAX_ID_LEN,
        "id of {} bytes",
        id.len()
    );
    assert!(
        !id.chars().any(char::is_control),
        "control character in an id"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = pb::AllocateSessionRequest::decode(data) else {
        return;
    };
    match AllocateRequest::try_from(req.clone()) {
        Ok(a) => {
            check_id(&a.call_id);
            assert_eq!(a.call_id, req.call_id);
            let n = a.participants.len();
            assert!(
                (MIN_PARTICIPANTS..=MAX_PARTICIPANTS).contains(&n),
                "{n} participants"
            );
            assert!((2..=16).contains(&n));
            assert_eq!(n, req.participants.len());
            for (i, (p, q)) in a.participants.iter().zip(&req.participants).enumerate() {
                check_id(&p.id);
                assert_eq!(p.id, q.participant_id, "participants reordered");
                assert!(
                    a.participants[..i].iter().all(|o| o.id != p.id),
                    "duplicate participant ids accepted"
                );
                assert_eq!(p.region, q.region);
                assert!(p.region.len() <= MAX_REGION_LEN);
                assert!(!p.region.chars().any(char::is_control));
                let expected = match pb::Transport::try_from(q.preferred_transport) {
                    Ok(pb::Transport::Unspecified) => None,
                    Ok(pb::Transport::Udp) => Some(Transport::Udp),
                    Ok(pb::Transport::Quic) => Some(Transport::Quic),
                    Err(_) => panic!("unknown transport {} accepted", q.preferred_transport),
                };
                assert_eq!(p.transport, expected);
            }
            if req.ttl_seconds == 0 {
                assert_eq!(a.ttl, DEFAULT_TTL);
            } else {
                assert_eq!(a.ttl, Duration::from_secs(u64::from(req.ttl_seconds)));
            }
            assert!(a.ttl >= MIN_TTL && a.ttl <= MAX_TTL, "TTL {:?}", a.ttl);
            assert!(a.ttl >= Duration::from_secs(60) && a.ttl <= Duration::from_secs(86_400));
        }
        Err(e) => {
            // Every message is a fixed sentence with field names and numbers, never the value:
            // ids are up to 128 bytes and unbounded when refused, so an echo would be longer.
            assert!(
                e.message.len() <= 100,
                "{}-byte error message",
                e.message.len()
            );
            assert!(!e.message.chars().any(char::is_control));
            assert!(
                e.message.starts_with(&e.field),
                "the message names the field first"
            );
        }
    }
});
