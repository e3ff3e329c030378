//! TURN credentials of a leg (docs/TURN.md): what a WebRTC app puts in `RTCIceServer` and what
//! a relay checks, both derived from the leg token, so that a relay verifies them offline with
//! the key ring it already holds.
//!
//! - username: the ticket, base64url without padding (43 characters). It carries the key id,
//!   session, leg, expiry and limits, signed by the controller, as a native BIND's ticket does.
//! - credential: 22 base64url characters: 16 bytes of HMAC-SHA256(leg key, [`CREDENTIAL_LABEL`]): a key
//!   of its own, so that a TURN credential (which a browser's JavaScript holds) cannot forge a
//!   native BIND, and the leg key never leaves the native client.
//!
//! The long-term credential key of RFC 8489 §9.2.2 is then MD5(username ":" [`REALM`] ":"
//! credential).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::token::{LegKey, TICKET_LEN, Token};

/// The realm every Veil relay announces.
pub const REALM: &str = "veil";
/// What the credential's HMAC covers, under the leg key.
pub const CREDENTIAL_LABEL: &[u8] = b"veil turn credential v1";
/// Length of a TURN username (a base64url ticket).
pub const USERNAME_LEN: usize = 43;

/// A leg's TURN username and credential.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The username.
    pub username: String,
    /// The credential (password).
    pub credential: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

/// The TURN credentials of `token`'s leg.
pub fn credentials(token: &Token) -> Credentials {
    Credentials {
        username: URL_SAFE_NO_PAD.encode(token.ticket_bytes()),
        credential: credential(token.leg_key()),
    }
}

/// The credential that goes with a leg key.
pub fn credential(key: &LegKey) -> String {
    URL_SAFE_NO_PAD.encode(key.tag_parts(&[CREDENTIAL_LABEL]))
}

/// The ticket a TURN username carries, if it is one.
pub fn ticket_of(username: &[u8]) -> Option<[u8; TICKET_LEN]> {
    if username.len() != USERNAME_LEN {
        return None;
    }
    let mut out = [0u8; TICKET_LEN];
    match URL_SAFE_NO_PAD.decode_slice(username, &mut out) {
        Ok(TICKET_LEN) => Some(out),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{KeyRing, Limits, SessionId, Ticket};

    #[test]
    fn a_relay_rederives_the_credential_from_the_username_alone() {
        let ring = KeyRing::from_keys(&[(7, [9; 32])], 7);
        let token = ring.mint(Ticket {
            key_id: ring.signing_key_id(),
            session: SessionId(3),
            leg: 2,
            legs: 4,
            expires_unix_ms: 1_900_000_000_000,
            limits: Limits::default(),
        });
        let c = credentials(&token);
        assert_eq!(c.username.len(), USERNAME_LEN);
        assert_eq!(c.credential.len(), 22);
        let ticket = ticket_of(c.username.as_bytes()).unwrap();
        let (claims, key) = ring.leg_key(&ticket).unwrap();
        assert_eq!(claims.leg, 2);
        assert_eq!(credential(&key), c.credential);
        // Not the leg key, in any encoding.
        assert!(!format!("{c:?}").contains(&c.credential));
        assert_eq!(ticket_of(b"short"), None);
        assert_eq!(ticket_of(&[b'!'; USERNAME_LEN]), None);
    }
}
