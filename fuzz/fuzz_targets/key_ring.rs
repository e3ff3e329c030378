//! `token::KeyRing::parse` on arbitrary text: the cluster key file every controller and relay
//! reads at startup (and on rotation).
//!
//! Asserts: no panic; an accepted ring has distinct key ids and exactly one signing key among
//! them; rendering it back (`to_file_format`) parses to the same ring; and it mints tokens that it
//! verifies, and that a ring without their key refuses.

#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_relay_core::token::{KeyId, KeyRing, Limits, SessionId, Ticket, VerifyError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(ring) = KeyRing::parse(text) else {
        return;
    };
    let ids = ring.key_ids();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        ids.len(),
        "duplicate key ids accepted: {ids:?}"
    );
    assert!(ids.contains(&ring.signing_key_id()));

    let again = KeyRing::parse(&ring.to_file_format()).expect("a ring's own rendering parses");
    assert_eq!(again.key_ids(), ids);
    assert_eq!(again.signing_key_id(), ring.signing_key_id());

    let token = ring.mint(Ticket {
        key_id: KeyId(0),
        session: SessionId(1),
        leg: 0,
        legs: 2,
        expires_unix_ms: 1,
        limits: Limits::default(),
    });
    assert_eq!(token.claims().key_id, ring.signing_key_id());
    let tag = token.leg_key().tag(b"m");
    assert!(ring.verify(token.ticket_bytes(), b"m", &tag).is_ok());
    assert!(again.verify(token.ticket_bytes(), b"m", &tag).is_ok());
    // A ring holding only some other key id refuses the token.
    let other = KeyId(ring.signing_key_id().0.wrapping_add(1));
    let stranger = KeyRing::from_keys(&[(other.0, [0x5a; 32])], other.0);
    assert_eq!(
        stranger.verify(token.ticket_bytes(), b"m", &tag),
        Err(VerifyError::UnknownKey)
    );
});
