//! `token::Ticket::decode` on arbitrary bytes: the ticket a BIND carries, before any check of its
//! authenticity.
//!
//! Asserts: no panic; an accepted ticket is exactly 32 bytes of version 1 with zero reserved
//! bytes, `1 <= legs <= 16` and `leg < legs`, and encodes back to exactly the input (one encoding
//! per ticket: two different byte strings never decode to the same claims, so a tag over the
//! bytes authenticates the claims).

#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_relay_core::token::{MAX_LEGS, TICKET_LEN, Ticket};

fuzz_target!(|data: &[u8]| {
    let Ok(t) = Ticket::decode(data) else {
        return;
    };
    assert_eq!(data.len(), TICKET_LEN);
    assert!(t.legs >= 1 && t.legs <= MAX_LEGS, "{t:?}");
    assert!(t.leg < t.legs, "{t:?}");
    assert_eq!(&t.encode()[..], data, "decode is not the inverse of encode");
    assert_eq!(Ticket::decode(&t.encode()), Ok(t));
});
