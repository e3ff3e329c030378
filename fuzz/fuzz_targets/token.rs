//! `token::Token::from_bytes` on arbitrary bytes: the 64-byte token a client is handed.
//!
//! Asserts: no panic; an accepted token is 64 bytes whose first half is a valid ticket, and
//! round-trips byte for byte; its `Debug` never shows the leg key; and a relay's key ring accepts
//! a BIND tagged with it only if it is exactly the token the ring would mint for those claims (no
//! forgery from a fuzzer-made leg key).

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use veil_relay_core::token::{KeyRing, TICKET_LEN, TOKEN_LEN, Ticket, Token};
use veil_relay_core::wire;

fn ring() -> &'static KeyRing {
    static RING: OnceLock<KeyRing> = OnceLock::new();
    RING.get_or_init(veil_fuzz::key_ring)
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = Token::from_bytes(data) else {
        return;
    };
    assert_eq!(data.len(), TOKEN_LEN);
    assert_eq!(&token.to_bytes()[..], data);
    assert_eq!(&token.ticket_bytes()[..], &data[..TICKET_LEN]);
    assert_eq!(
        Ticket::decode(&data[..TICKET_LEN]).as_ref(),
        Ok(token.claims())
    );

    let leg_key_hex: String = data[TICKET_LEN..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let shown = format!("{token:?} {:?}", token.leg_key());
    assert!(!shown.contains(&leg_key_hex), "Debug shows the leg key");

    // What a relay does with a BIND from the holder of this token.
    let bind = wire::bind(&token, [7; 8], None);
    let Ok(wire::ClientMessage::Bind(b)) = wire::parse_client(&bind) else {
        panic!("a BIND built from a parsed token does not parse");
    };
    if ring().verify(b.ticket, b.signed, b.tag).is_ok() {
        let key_id = token.claims().key_id.0;
        let signer = veil_fuzz::signer(key_id).expect("the ring verified with one of its keys");
        let genuine = signer.mint(*token.claims());
        assert_eq!(
            genuine.to_bytes(),
            token.to_bytes(),
            "the key ring accepted a token it did not mint"
        );
    }
});
