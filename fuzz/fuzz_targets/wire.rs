//! Control-message parsing: `wire::classify`, `wire::parse_client` (what the relay parses) and
//! `wire::parse_relay` (what a client parses), on arbitrary bytes.
//!
//! Asserts: no panic; classification follows the RFC 7983 table in docs/PROTOCOL.md; a message
//! either parser accepts has its type's fixed length, version 1 and no reserved bit set, so that
//! re-encoding the parsed fields gives back exactly the input (the parsers accept one encoding per
//! message, nothing more). A BIND carries one proof at most: a cookie (UDP) or the channel binding
//! (QUIC), never both.

#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_relay_core::token::TICKET_LEN;
use veil_relay_core::wire::{
    self, BIND_LEN, BIND_OK_LEN, CHALLENGE_LEN, COOKIE_LEN, Class, ClientMessage, ErrorCode,
    PROBE_LEN, RelayMessage, SHORT_LEN,
};

fuzz_target!(|data: &[u8]| {
    let class = wire::classify(data);
    let expected = match data.first() {
        Some(128..=191) => Class::Rtp,
        Some(20..=63) => Class::Dtls,
        Some(0x50..=0x5F) => Class::Control,
        _ => Class::Other,
    };
    assert_eq!(class, expected);

    if let Ok(msg) = wire::parse_client(data) {
        assert_eq!(class, Class::Control);
        assert_eq!(data[1], wire::VERSION);
        match msg {
            ClientMessage::Bind(b) => {
                assert_eq!(data.len(), BIND_LEN);
                assert_eq!(data[0], wire::TYPE_BIND);
                assert_eq!(b.txn, data[4..12]);
                assert_eq!(b.ticket, &data[12..12 + TICKET_LEN]);
                assert_eq!(b.signed, &data[..BIND_LEN - 16]);
                assert_eq!(b.tag, &data[BIND_LEN - 16..]);
                let cookie_at = 12 + TICKET_LEN;
                match (b.cookie, b.channel_bound) {
                    (Some(c), false) => {
                        assert_eq!(data[2..4], [0, 1]);
                        assert_eq!(c, &data[cookie_at..cookie_at + COOKIE_LEN]);
                    }
                    (None, channel_bound) => {
                        assert_eq!(data[2..4], [0, if channel_bound { 2 } else { 0 }]);
                        assert!(
                            data[cookie_at..cookie_at + COOKIE_LEN]
                                .iter()
                                .all(|&x| x == 0)
                        );
                    }
                    (Some(_), true) => panic!("a BIND with a cookie and a channel binding"),
                }
            }
            ClientMessage::Keepalive { txn } => {
                assert_eq!(data, wire::keepalive(txn));
            }
            ClientMessage::ProbeAck { txn, cookie } => {
                assert_eq!(data.len(), PROBE_LEN);
                assert_eq!(cookie.len(), COOKIE_LEN);
                assert_eq!(data, wire::probe_ack(txn, cookie));
            }
        }
    }

    if let Ok(msg) = wire::parse_relay(data) {
        assert_eq!(class, Class::Control);
        // Re-encode with the relay's own encoders. CLOSE and ERROR may carry codes this build
        // does not know (a newer relay's): compare their header by hand.
        let reencoded: Option<Vec<u8>> = match msg {
            RelayMessage::Challenge { txn, cookie } => {
                assert_eq!(data.len(), CHALLENGE_LEN);
                let cookie: [u8; COOKIE_LEN] = cookie.try_into().expect("parser sliced 24 bytes");
                Some(wire::challenge(txn, &cookie).as_bytes().to_vec())
            }
            RelayMessage::BindOk {
                txn,
                idle_timeout_secs,
            } => {
                assert_eq!(data.len(), BIND_OK_LEN);
                Some(wire::bind_ok(txn, idle_timeout_secs).as_bytes().to_vec())
            }
            RelayMessage::KeepaliveAck { txn } => {
                assert_eq!(data.len(), SHORT_LEN);
                Some(wire::keepalive_ack(txn).as_bytes().to_vec())
            }
            RelayMessage::Probe { txn, cookie } => {
                assert_eq!(data.len(), PROBE_LEN);
                let cookie: [u8; COOKIE_LEN] = cookie.try_into().expect("parser sliced 24 bytes");
                Some(wire::probe(txn, &cookie).as_bytes().to_vec())
            }
            RelayMessage::Close { code, session } => {
                assert_eq!(data.len(), SHORT_LEN);
                assert_eq!(data[0], wire::TYPE_CLOSE);
                assert_eq!(data[2..4], code.to_be_bytes());
                assert_eq!(data[4..12], session.to_be_bytes());
                ErrorCode::from_u16(code).map(|c| wire::close(c, session).as_bytes().to_vec())
            }
            RelayMessage::Error { txn, code } => {
                assert_eq!(data.len(), SHORT_LEN);
                assert_eq!(data[0], wire::TYPE_ERROR);
                assert_eq!(data[2..4], code.to_be_bytes());
                assert_eq!(data[4..12], txn);
                ErrorCode::from_u16(code).map(|c| wire::error(txn, c).as_bytes().to_vec())
            }
        };
        assert_eq!(data[1], wire::VERSION);
        if let Some(bytes) = reencoded {
            assert_eq!(
                data,
                &bytes[..],
                "parse_relay accepted a message that does not re-encode to itself \
                 (a reserved field is set)"
            );
        }
    }
});
