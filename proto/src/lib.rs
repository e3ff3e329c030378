//! Veil's gRPC API, `veil.v1`: the code generated from `veil/v1/*.proto`, checked in under
//! `src/gen` (see `tests/bootstrap.rs`), plus helpers shared by both ends of the API.
//!
//! Generated types stop at the crate edges: the controller and relay convert them into their own
//! domain types at the boundary.

#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::use_self,
    clippy::manual_let_else
)]
pub mod v1 {
    include!("gen/veil.v1.rs");
}

/// The encoded `FileDescriptorSet` of every `.proto` file in this crate, for gRPC server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/veil_descriptor.bin");

/// Formats a session id as the public API spells it: 16 lowercase hex digits.
pub fn format_session_id(id: u64) -> String {
    format!("{id:016x}")
}

/// Parses a session id as the public API spells it: exactly 16 lowercase hex digits.
pub fn parse_session_id(s: &str) -> Option<u64> {
    if s.len() != 16
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_round_trip_and_reject_other_spellings() {
        for id in [0, 1, 0xdead_beef, u64::MAX] {
            assert_eq!(parse_session_id(&format_session_id(id)), Some(id));
        }
        for bad in [
            "",
            "123",
            "DEADBEEFDEADBEEF",
            "+00000000000000a",
            "00000000000000000",
            "zzzzzzzzzzzzzzzz",
        ] {
            assert_eq!(parse_session_id(bad), None, "{bad:?}");
        }
    }
}
