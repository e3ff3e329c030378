//! Leg tokens: the stateless credential that lets any relay holding the cluster key ring admit a
//! participant without asking the controller.
//!
//! A token is a 32-byte *ticket* (plain claims: key id, session, leg, expiry, limits) followed by
//! the 32-byte *leg key* `HMAC-SHA256(cluster_key[key_id], "veil/v1 leg-key" || ticket)`. The
//! controller mints both and hands the whole token to one participant. The participant's client
//! sends only the ticket, and authenticates each bind with a tag keyed by the leg key, so the leg
//! key never crosses the network: an eavesdropper who sees a bind cannot replay it from another
//! address (the relay's cookie is bound to the source address) nor forge a new one. A relay
//! recomputes the leg key from the ticket with its copy of the key ring; a forged ticket yields
//! a different leg key and the tag check fails (in constant time).

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Length of an encoded ticket.
pub const TICKET_LEN: usize = 32;
/// Length of a leg key.
pub const LEG_KEY_LEN: usize = 32;
/// Length of a whole token as the controller hands it out (ticket, then leg key).
pub const TOKEN_LEN: usize = TICKET_LEN + LEG_KEY_LEN;
/// Length of a message authentication tag (truncated HMAC-SHA256).
pub const TAG_LEN: usize = 16;
/// The most legs one session may have.
pub const MAX_LEGS: u8 = 16;
/// Shortest accepted cluster key.
pub const MIN_KEY_LEN: usize = 32;

const TICKET_VERSION: u8 = 1;
const LEG_KEY_LABEL: &[u8] = b"veil/v1 leg-key";

/// Identifies a session across the cluster. Random, chosen by the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Identifies one key of the cluster key ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub u16);

/// Per-leg forwarding limits carried in the ticket. Zero means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Most packets per second the leg may send.
    pub max_pps: u32,
    /// Most kilobits per second the leg may send.
    pub max_kbps: u32,
}

/// The claims of a leg token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// Key of the cluster key ring that derives this ticket's leg key.
    pub key_id: KeyId,
    /// Session the leg belongs to.
    pub session: SessionId,
    /// Leg index within the session, below `legs`.
    pub leg: u8,
    /// Number of legs in the session, 1 to [`MAX_LEGS`].
    pub legs: u8,
    /// Expiry, Unix milliseconds: the ticket neither binds nor forwards after this.
    pub expires_unix_ms: u64,
    /// Forwarding limits for this leg.
    pub limits: Limits,
}

/// Why a ticket or token could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input is not exactly as long as the format requires.
    #[error("wrong length: {len} bytes")]
    Length {
        /// Length of the input.
        len: usize,
    },
    /// The version byte is not one this build understands.
    #[error("unsupported ticket version {0}")]
    Version(u8),
    /// A reserved field is not zero.
    #[error("reserved bits set")]
    Reserved,
    /// Leg index or leg count out of range.
    #[error("leg {leg} of {legs} out of range")]
    Leg {
        /// Leg index.
        leg: u8,
        /// Leg count.
        legs: u8,
    },
}

impl Ticket {
    /// Encodes the ticket in its wire layout (docs/PROTOCOL.md).
    pub fn encode(&self) -> [u8; TICKET_LEN] {
        let mut b = [0u8; TICKET_LEN];
        b[0] = TICKET_VERSION;
        b[2..4].copy_from_slice(&self.key_id.0.to_be_bytes());
        b[4..12].copy_from_slice(&self.session.0.to_be_bytes());
        b[12] = self.leg;
        b[13] = self.legs;
        b[16..24].copy_from_slice(&self.expires_unix_ms.to_be_bytes());
        b[24..28].copy_from_slice(&self.limits.max_pps.to_be_bytes());
        b[28..32].copy_from_slice(&self.limits.max_kbps.to_be_bytes());
        b
    }

    /// Decodes a ticket, checking its structure but not its authenticity.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let b: &[u8; TICKET_LEN] = b
            .try_into()
            .map_err(|_| DecodeError::Length { len: b.len() })?;
        if b[0] != TICKET_VERSION {
            return Err(DecodeError::Version(b[0]));
        }
        if b[1] != 0 || b[14] != 0 || b[15] != 0 {
            return Err(DecodeError::Reserved);
        }
        let (leg, legs) = (b[12], b[13]);
        if legs == 0 || legs > MAX_LEGS || leg >= legs {
            return Err(DecodeError::Leg { leg, legs });
        }
        Ok(Self {
            key_id: KeyId(u16::from_be_bytes([b[2], b[3]])),
            session: SessionId(u64::from_be_bytes(b[4..12].try_into().expect("8 bytes"))),
            leg,
            legs,
            expires_unix_ms: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            limits: Limits {
                max_pps: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
                max_kbps: u32::from_be_bytes(b[28..32].try_into().expect("4 bytes")),
            },
        })
    }
}

/// The secret half of a token: keys the tags that authenticate a leg's binds.
#[derive(Clone)]
pub struct LegKey([u8; LEG_KEY_LEN]);

impl fmt::Debug for LegKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LegKey(..)")
    }
}

impl LegKey {
    /// Computes the tag of `msg` under this key.
    pub fn tag(&self, msg: &[u8]) -> [u8; TAG_LEN] {
        self.tag_parts(&[msg])
    }

    /// Computes the tag of the concatenation of `parts` under this key.
    pub fn tag_parts(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC accepts any key length");
        for p in parts {
            mac.update(p);
        }
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    /// Checks `tag` against the tag of `msg`, in constant time.
    pub fn verify(&self, msg: &[u8], tag: &[u8]) -> bool {
        self.verify_parts(&[msg], tag)
    }

    /// Checks `tag` against the tag of the concatenation of `parts`, in constant time.
    pub fn verify_parts(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        tag.len() == TAG_LEN && bool::from(self.tag_parts(parts).ct_eq(tag))
    }
}

/// A whole leg token, as a participant's client holds it.
#[derive(Clone)]
pub struct Token {
    ticket: [u8; TICKET_LEN],
    claims: Ticket,
    leg_key: LegKey,
}

impl fmt::Debug for Token {
    // Never print the secret half, nor the ticket bytes: a token is a credential.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("session", &self.claims.session)
            .field("leg", &self.claims.leg)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// Parses a token as the controller handed it out. Checks structure only: the client cannot
    /// check authenticity, which only a key-ring holder can.
    pub fn from_bytes(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() != TOKEN_LEN {
            return Err(DecodeError::Length { len: b.len() });
        }
        let claims = Ticket::decode(&b[..TICKET_LEN])?;
        let mut ticket = [0u8; TICKET_LEN];
        ticket.copy_from_slice(&b[..TICKET_LEN]);
        let mut key = [0u8; LEG_KEY_LEN];
        key.copy_from_slice(&b[TICKET_LEN..]);
        Ok(Self {
            ticket,
            claims,
            leg_key: LegKey(key),
        })
    }

    /// The token's bytes: ticket, then leg key.
    pub fn to_bytes(&self) -> [u8; TOKEN_LEN] {
        let mut b = [0u8; TOKEN_LEN];
        b[..TICKET_LEN].copy_from_slice(&self.ticket);
        b[TICKET_LEN..].copy_from_slice(&self.leg_key.0);
        b
    }

    /// The encoded ticket (the part that is sent to relays).
    pub fn ticket_bytes(&self) -> &[u8; TICKET_LEN] {
        &self.ticket
    }

    /// The decoded claims.
    pub fn claims(&self) -> &Ticket {
        &self.claims
    }

    /// The leg key that authenticates binds.
    pub fn leg_key(&self) -> &LegKey {
        &self.leg_key
    }
}

/// Why a ticket was refused by a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The ticket is malformed.
    #[error("malformed ticket: {0}")]
    Malformed(#[from] DecodeError),
    /// The ticket names a key this key ring does not hold (never issued, or retired).
    #[error("unknown key id")]
    UnknownKey,
    /// The tag does not match: forged or altered ticket, or wrong leg key.
    #[error("bad tag")]
    BadTag,
}

/// Why a key ring file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not parse.
    #[error("{path} is not a valid key ring: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: KeyRingError,
    },
}

/// Why a key ring could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyRingError {
    /// A line does not have the form `<key-id> <hex-secret> [signing]`.
    #[error("line {line}: expected `<key-id> <hex-secret> [signing]`")]
    Syntax {
        /// 1-based line number.
        line: usize,
    },
    /// The key id is not an integer from 0 to 65535.
    #[error("line {line}: key id must be an integer from 0 to 65535")]
    KeyId {
        /// 1-based line number.
        line: usize,
    },
    /// The secret is not hex, or shorter than [`MIN_KEY_LEN`] bytes.
    #[error("line {line}: secret must be at least {MIN_KEY_LEN} bytes of hex (64 hex digits)")]
    Secret {
        /// 1-based line number.
        line: usize,
    },
    /// Two lines use the same key id.
    #[error("line {line}: key id {id} appears twice")]
    Duplicate {
        /// 1-based line number of the second occurrence.
        line: usize,
        /// The repeated key id.
        id: u16,
    },
    /// No key, or more than one, is marked `signing`.
    #[error("exactly one key must be marked `signing` (found {found})")]
    Signing {
        /// How many keys are marked.
        found: usize,
    },
}

#[derive(Clone)]
struct Key {
    id: KeyId,
    secret: Vec<u8>,
    /// HMAC already keyed with `secret` (its inner and outer pads absorbed): each derivation
    /// clones it rather than re-keying, two SHA-256 compressions fewer per leg key.
    keyed: HmacSha256,
}

/// The cluster key ring: every key a relay accepts, and the one a controller signs with.
///
/// Rotation: add a new key to every node's ring, then mark it `signing` on the controllers;
/// tokens signed with the old key keep verifying until the old key is removed.
#[derive(Clone)]
pub struct KeyRing {
    keys: Vec<Key>,
    signing: usize,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("key_ids", &self.key_ids())
            .field("signing", &self.signing_key_id())
            .finish()
    }
}

impl KeyRing {
    /// Reads and parses a key ring file (the format of [`KeyRing::parse`]).
    pub fn read_file(path: &std::path::Path) -> Result<Self, KeyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|source| KeyFileError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Parses the key file format: one key per line, `<key-id> <hex-secret> [signing]`; blank
    /// lines and lines starting with `#` are ignored; exactly one key is marked `signing`.
    pub fn parse(text: &str) -> Result<Self, KeyRingError> {
        let mut keys: Vec<Key> = Vec::new();
        let mut signing = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let (id, secret, is_signing) = match fields.as_slice() {
                [id, secret] => (id, secret, false),
                [id, secret, "signing"] => (id, secret, true),
                _ => return Err(KeyRingError::Syntax { line }),
            };
            let id: u16 = id.parse().map_err(|_| KeyRingError::KeyId { line })?;
            let secret = hex::decode(secret).map_err(|_| KeyRingError::Secret { line })?;
            if secret.len() < MIN_KEY_LEN {
                return Err(KeyRingError::Secret { line });
            }
            if keys.iter().any(|k| k.id.0 == id) {
                return Err(KeyRingError::Duplicate { line, id });
            }
            if is_signing {
                signing.push(keys.len());
            }
            let keyed = HmacSha256::new_from_slice(&secret).expect("HMAC accepts any key length");
            keys.push(Key {
                id: KeyId(id),
                secret,
                keyed,
            });
        }
        match signing.as_slice() {
            [s] => Ok(Self { keys, signing: *s }),
            other => Err(KeyRingError::Signing { found: other.len() }),
        }
    }

    /// Builds a key ring from `(id, secret)` pairs, signing with `signing`.
    ///
    /// # Panics
    /// If `signing` is not among the ids, a secret is shorter than [`MIN_KEY_LEN`], or an id
    /// repeats: this is for generated key material, which cannot have these faults.
    pub fn from_keys(keys: &[(u16, [u8; 32])], signing: u16) -> Self {
        let mut ring = String::new();
        for (id, secret) in keys {
            let mark = if *id == signing { " signing" } else { "" };
            ring.push_str(&format!("{id} {}{mark}\n", hex::encode(secret)));
        }
        Self::parse(&ring).expect("generated key ring is well formed")
    }

    /// Renders the key ring in the key file format (secrets included).
    pub fn to_file_format(&self) -> String {
        let mut out = String::from("# Veil cluster key ring: <key-id> <hex-secret> [signing]\n");
        for (i, k) in self.keys.iter().enumerate() {
            let mark = if i == self.signing { " signing" } else { "" };
            out.push_str(&format!("{} {}{mark}\n", k.id.0, hex::encode(&k.secret)));
        }
        out
    }

    /// The ids of every key, in file order.
    pub fn key_ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|k| k.id).collect()
    }

    /// The id of the key new tokens are signed with.
    pub fn signing_key_id(&self) -> KeyId {
        self.keys[self.signing].id
    }

    fn key(&self, id: KeyId) -> Option<&Key> {
        // At most a handful of keys: a linear scan beats hashing.
        self.keys.iter().find(|k| k.id == id)
    }

    /// The leg key of `ticket` under `key`: HMAC-SHA256(secret, label || ticket).
    fn derive(key: &Key, ticket: &[u8; TICKET_LEN]) -> LegKey {
        let mut mac = key.keyed.clone();
        mac.update(LEG_KEY_LABEL);
        mac.update(ticket);
        LegKey(mac.finalize().into_bytes().into())
    }

    /// Mints a token for `ticket`, signing with the signing key (its `key_id` is overwritten).
    pub fn mint(&self, mut ticket: Ticket) -> Token {
        let key = &self.keys[self.signing];
        ticket.key_id = key.id;
        let bytes = ticket.encode();
        let leg_key = Self::derive(key, &bytes);
        Token {
            ticket: bytes,
            claims: ticket,
            leg_key,
        }
    }

    /// Decodes `ticket` and derives its leg key. The result is only as authentic as the tag it
    /// then verifies: see [`KeyRing::verify`].
    pub fn leg_key(&self, ticket: &[u8]) -> Result<(Ticket, LegKey), VerifyError> {
        let claims = Ticket::decode(ticket)?;
        let key = self.key(claims.key_id).ok_or(VerifyError::UnknownKey)?;
        let bytes: &[u8; TICKET_LEN] = ticket.try_into().expect("decode checked the length");
        Ok((claims, Self::derive(key, bytes)))
    }

    /// Verifies that `tag` authenticates `msg` under the leg key of `ticket`.
    pub fn verify(&self, ticket: &[u8], msg: &[u8], tag: &[u8]) -> Result<Ticket, VerifyError> {
        self.verify_parts(ticket, &[msg], tag)
    }

    /// Verifies that `tag` authenticates the concatenation of `parts` under the leg key of
    /// `ticket` (a channel-bound BIND: the message, then the TLS exporter value).
    pub fn verify_parts(
        &self,
        ticket: &[u8],
        parts: &[&[u8]],
        tag: &[u8],
    ) -> Result<Ticket, VerifyError> {
        let (claims, key) = self.leg_key(ticket)?;
        if key.verify_parts(parts, tag) {
            Ok(claims)
        } else {
            Err(VerifyError::BadTag)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        KeyRing::from_keys(&[(1, [1; 32]), (2, [2; 32])], 2)
    }

    fn ticket() -> Ticket {
        Ticket {
            key_id: KeyId(0),
            session: SessionId(0x0123_4567_89ab_cdef),
            leg: 1,
            legs: 2,
            expires_unix_ms: 1_800_000_000_000,
            limits: Limits {
                max_pps: 500,
                max_kbps: 2_000,
            },
        }
    }

    #[test]
    fn ticket_round_trips() {
        let t = ticket();
        assert_eq!(Ticket::decode(&t.encode()), Ok(t));
    }

    #[test]
    fn ticket_decode_rejects_bad_structure() {
        let good = ticket().encode();
        assert_eq!(
            Ticket::decode(&good[..31]),
            Err(DecodeError::Length { len: 31 })
        );
        let mut b = good;
        b[0] = 2;
        assert_eq!(Ticket::decode(&b), Err(DecodeError::Version(2)));
        let mut b = good;
        b[14] = 1;
        assert_eq!(Ticket::decode(&b), Err(DecodeError::Reserved));
        let mut b = good;
        b[12] = 2;
        assert_eq!(
            Ticket::decode(&b),
            Err(DecodeError::Leg { leg: 2, legs: 2 })
        );
        let mut b = good;
        b[13] = 17;
        assert!(matches!(Ticket::decode(&b), Err(DecodeError::Leg { .. })));
    }

    #[test]
    fn minted_tokens_verify_and_forgeries_do_not() {
        let ring = ring();
        let token = ring.mint(ticket());
        assert_eq!(
            token.claims().key_id,
            KeyId(2),
            "signed with the signing key"
        );
        let msg = b"bind message";
        let tag = token.leg_key().tag(msg);
        let claims = ring.verify(token.ticket_bytes(), msg, &tag).unwrap();
        assert_eq!(claims.session, ticket().session);

        // Any changed ticket byte changes the derived leg key.
        for i in [4, 12, 16, 24, 28] {
            let mut forged = *token.ticket_bytes();
            forged[i] ^= 1;
            let r = ring.verify(&forged, msg, &tag);
            assert!(
                matches!(r, Err(VerifyError::BadTag | VerifyError::Malformed(_))),
                "byte {i}: {r:?}"
            );
        }
        // A changed message or tag fails.
        assert_eq!(
            ring.verify(token.ticket_bytes(), b"bind messagf", &tag),
            Err(VerifyError::BadTag)
        );
        let mut bad = tag;
        bad[15] ^= 0x80;
        assert_eq!(
            ring.verify(token.ticket_bytes(), msg, &bad),
            Err(VerifyError::BadTag)
        );
        assert_eq!(
            ring.verify(token.ticket_bytes(), msg, &tag[..15]),
            Err(VerifyError::BadTag)
        );
    }

    #[test]
    fn unknown_and_retired_keys_are_refused() {
        let old = KeyRing::from_keys(&[(1, [1; 32])], 1);
        let token = old.mint(ticket());
        let tag = token.leg_key().tag(b"m");
        // Rotation: a ring holding both keys still verifies old tokens.
        assert!(ring().verify(token.ticket_bytes(), b"m", &tag).is_ok());
        // Retired: a ring without key 1 refuses them.
        let retired = KeyRing::from_keys(&[(2, [2; 32])], 2);
        assert_eq!(
            retired.verify(token.ticket_bytes(), b"m", &tag),
            Err(VerifyError::UnknownKey)
        );
        // Same id, different secret: a forgery.
        let other = KeyRing::from_keys(&[(1, [9; 32])], 1);
        assert_eq!(
            other.verify(token.ticket_bytes(), b"m", &tag),
            Err(VerifyError::BadTag)
        );
    }

    #[test]
    fn token_bytes_round_trip_and_debug_hides_secrets() {
        let token = ring().mint(ticket());
        let back = Token::from_bytes(&token.to_bytes()).unwrap();
        assert_eq!(back.ticket_bytes(), token.ticket_bytes());
        let dbg = format!("{back:?} {:?}", back.leg_key());
        assert!(!dbg.contains(&hex::encode(&token.to_bytes()[32..])));
        assert!(!dbg.contains("0202"));
        assert_eq!(
            Token::from_bytes(&[0; 63]).unwrap_err(),
            DecodeError::Length { len: 63 }
        );
    }

    #[test]
    fn key_file_parsing_names_the_fault() {
        let k = "ab".repeat(32);
        let ok = format!("# ring\n\n1 {k}\n2 {k} signing\n");
        let ring = KeyRing::parse(&ok).unwrap();
        assert_eq!(ring.signing_key_id(), KeyId(2));
        assert_eq!(
            KeyRing::parse(&ring.to_file_format()).unwrap().key_ids(),
            ring.key_ids()
        );

        assert_eq!(
            KeyRing::parse(&format!("1 {k} sign\n")).unwrap_err(),
            KeyRingError::Syntax { line: 1 }
        );
        assert_eq!(
            KeyRing::parse(&format!("x {k} signing")).unwrap_err(),
            KeyRingError::KeyId { line: 1 }
        );
        assert_eq!(
            KeyRing::parse(&format!("70000 {k}")).unwrap_err(),
            KeyRingError::KeyId { line: 1 }
        );
        assert_eq!(
            KeyRing::parse("1 abcd signing").unwrap_err(),
            KeyRingError::Secret { line: 1 }
        );
        assert_eq!(
            KeyRing::parse(&format!("1 {}zz signing", "a".repeat(62))).unwrap_err(),
            KeyRingError::Secret { line: 1 }
        );
        assert_eq!(
            KeyRing::parse(&format!("1 {k}\n1 {k} signing")).unwrap_err(),
            KeyRingError::Duplicate { line: 2, id: 1 }
        );
        assert_eq!(
            KeyRing::parse(&format!("1 {k}")).unwrap_err(),
            KeyRingError::Signing { found: 0 }
        );
        assert_eq!(
            KeyRing::parse(&format!("1 {k} signing\n2 {k} signing")).unwrap_err(),
            KeyRingError::Signing { found: 2 }
        );
        assert!(
            !format!("{ring:?}").contains(&k),
            "Debug must not print secrets"
        );
    }
}
