//! `stun::parse`, the relay's one STUN parser (TURN requests and indications from anyone), on
//! arbitrary bytes.
//!
//! Asserts: no panic; a message it accepts is exactly the input (its header's length covers
//! every byte), its attribute values are slices of the input, at most `MAX_PEERS` peers and
//! `MAX_UNKNOWN` unknown types are kept; MESSAGE-INTEGRITY verification never panics and never
//! accepts under a key the input was not signed with (here: a fixed key the fuzzer cannot
//! know); and what the builder writes for the parsed fields parses back to the same fields.

#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_relay_core::stun::{self, Builder, MAX_PEERS, MAX_UNKNOWN, attr};

fn within(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    i >= o && i + inner.len() <= o + outer.len()
}

fuzz_target!(|data: &[u8]| {
    let Ok(m) = stun::parse(data) else {
        return;
    };
    assert!(stun::is_stun(data));
    assert_eq!(
        usize::from(u16::from_be_bytes([data[2], data[3]])) + 20,
        data.len()
    );
    for v in [m.username, m.realm, m.nonce, m.data].into_iter().flatten() {
        assert!(within(data, v));
    }
    assert!(m.peers().count() <= MAX_PEERS && m.unknown().len() <= MAX_UNKNOWN);
    assert!(m.unknown().iter().all(|&t| t < 0x8000));
    // A key derived from secrets the input cannot contain.
    let key = stun::long_term_key(b"fuzz", b"veil", b"a credential the fuzzer never sees");
    if m.verify_integrity(&key) {
        panic!("MESSAGE-INTEGRITY verified under a key the input never saw");
    }
    // Rebuild what the relay acts on and parse it back.
    let mut b = Builder::new(m.method, m.kind, &m.txn);
    if let Some(l) = m.lifetime {
        b = b.u32(attr::LIFETIME, l);
    }
    if let Some(c) = m.channel {
        b = b.u32(attr::CHANNEL_NUMBER, u32::from(c) << 16);
    }
    for p in m.peers().take(4) {
        b = b.xor_addr(attr::XOR_PEER_ADDRESS, p);
    }
    if let Some(n) = m.nonce.filter(|n| n.len() <= 32) {
        b = b.attr(attr::NONCE, n);
    }
    let b = b.integrity(&key).fingerprint();
    let back = stun::parse(b.as_bytes()).expect("the builder's output parses");
    assert_eq!(
        (back.method, back.kind, back.txn),
        (m.method, m.kind, m.txn)
    );
    assert_eq!(back.lifetime, m.lifetime);
    assert_eq!(back.channel, m.channel);
    assert!(back.peers().eq(m.peers().take(4)));
    assert!(back.verify_integrity(&key) && back.fingerprint);
});
