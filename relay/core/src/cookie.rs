//! Return-routability cookies: proof that a binding client receives at the address it sends from.
//!
//! Stateless, like a DTLS HelloVerifyRequest or a QUIC Retry token: the relay keeps nothing
//! between the CHALLENGE and the second BIND. A cookie is the time it was issued and a MAC over
//! that time, the client's address and the ticket, keyed by a secret only this relay process
//! holds. It is useless from another address, for another ticket, on another relay, or after its
//! lifetime.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::wire::COOKIE_LEN;

const MAC_LEN: usize = COOKIE_LEN - 8;

/// Mints and checks cookies for one relay process.
#[derive(Clone)]
pub struct Cookies {
    /// HMAC keyed with the relay's cookie secret, cloned for each cookie (the secret's pads are
    /// absorbed once, not per cookie).
    keyed: Hmac<Sha256>,
    lifetime: Duration,
}

impl std::fmt::Debug for Cookies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cookies")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// Why a cookie was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CookieError {
    /// The MAC does not match: another address, ticket or relay, or forged.
    #[error("cookie does not match")]
    Mismatch,
    /// Older than the lifetime, or issued in the future.
    #[error("cookie expired")]
    Expired,
}

impl Cookies {
    /// `secret` must be random and private to this relay process; `lifetime` bounds how long a
    /// client may take between CHALLENGE and the second BIND.
    pub fn new(secret: [u8; 32], lifetime: Duration) -> Self {
        let keyed = Hmac::<Sha256>::new_from_slice(&secret).expect("HMAC accepts any key length");
        Self { keyed, lifetime }
    }

    fn mac(&self, issued_ms: u64, from: SocketAddr, ticket: &[u8]) -> [u8; 32] {
        let mut mac = self.keyed.clone();
        mac.update(&issued_ms.to_be_bytes());
        let ip = match from.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        mac.update(&ip.octets());
        mac.update(&from.port().to_be_bytes());
        mac.update(ticket);
        mac.finalize().into_bytes().into()
    }

    /// Mints a cookie for `from` and `ticket` at `now_ms` (milliseconds on the relay's own
    /// monotonic clock).
    pub fn mint(&self, now_ms: u64, from: SocketAddr, ticket: &[u8]) -> [u8; COOKIE_LEN] {
        let mut c = [0u8; COOKIE_LEN];
        c[..8].copy_from_slice(&now_ms.to_be_bytes());
        c[8..].copy_from_slice(&self.mac(now_ms, from, ticket)[..MAC_LEN]);
        c
    }

    /// Checks a cookie presented by `from` with `ticket` at `now_ms`.
    pub fn check(
        &self,
        now_ms: u64,
        from: SocketAddr,
        ticket: &[u8],
        cookie: &[u8],
    ) -> Result<(), CookieError> {
        if cookie.len() != COOKIE_LEN {
            return Err(CookieError::Mismatch);
        }
        let issued = u64::from_be_bytes(cookie[..8].try_into().expect("8 bytes"));
        let expected = self.mac(issued, from, ticket);
        if !bool::from(expected[..MAC_LEN].ct_eq(&cookie[8..])) {
            return Err(CookieError::Mismatch);
        }
        let age = now_ms.checked_sub(issued).ok_or(CookieError::Expired)?;
        if age > self.lifetime.as_millis() as u64 {
            return Err(CookieError::Expired);
        }
        Ok(())
    }
}

/// Length of a TURN nonce: 16 base64url characters (12 bytes: 4 of issue time in seconds, 8 of
/// MAC), so that the 401 answering Chromium's 28-byte Allocate is 56 bytes, twice the request.
/// 64 bits of MAC: a nonce only proves that its holder receives at its address for 10 minutes;
/// the credentials are checked on their own.
pub const NONCE_LEN: usize = 16;
const NONCE_BYTES: usize = 12;
const NONCE_CONTEXT: &[u8] = b"veil turn nonce ";

/// The MAC context of a nonce for `transport` ("turn-udp", "turn-tcp", "turn-tls"): a nonce
/// proves its holder receives at an address on one transport only.
fn nonce_context<'a>(transport: &str, buf: &'a mut [u8; 32]) -> &'a [u8] {
    let t = &transport.as_bytes()[..transport.len().min(32 - NONCE_CONTEXT.len())];
    buf[..NONCE_CONTEXT.len()].copy_from_slice(NONCE_CONTEXT);
    buf[NONCE_CONTEXT.len()..NONCE_CONTEXT.len() + t.len()].copy_from_slice(t);
    &buf[..NONCE_CONTEXT.len() + t.len()]
}

impl Cookies {
    /// A TURN nonce (RFC 8656 NONCE) for a client at `from` on `transport` (the endpoint's
    /// transport name): stateless, like a cookie, and bound to the client's address and
    /// transport, so that a request carrying it proves the client receives there (a nonce a
    /// TCP client got is no good over UDP from the same address and port, and the reverse).
    pub fn mint_nonce(&self, now_ms: u64, from: SocketAddr, transport: &str) -> [u8; NONCE_LEN] {
        let secs = (now_ms / 1000) as u32;
        let mut raw = [0u8; NONCE_BYTES];
        raw[..4].copy_from_slice(&secs.to_be_bytes());
        let mut ctx = [0u8; 32];
        let mac = self.mac(u64::from(secs), from, nonce_context(transport, &mut ctx));
        raw[4..].copy_from_slice(&mac[..NONCE_BYTES - 4]);
        let mut out = [0u8; NONCE_LEN];
        let n = URL_SAFE_NO_PAD
            .encode_slice(raw, &mut out)
            .expect("12 bytes are 16 characters");
        debug_assert_eq!(n, NONCE_LEN);
        out
    }

    /// Checks a TURN nonce from `from` on `transport`: `Expired` once older than `lifetime`
    /// (answered 438 Stale Nonce), `Mismatch` if it is not this relay's for this address and
    /// transport.
    pub fn check_nonce(
        &self,
        now_ms: u64,
        from: SocketAddr,
        transport: &str,
        nonce: &[u8],
        lifetime: Duration,
    ) -> Result<(), CookieError> {
        let mut raw = [0u8; NONCE_BYTES];
        if nonce.len() != NONCE_LEN
            || URL_SAFE_NO_PAD.decode_slice(nonce, &mut raw) != Ok(NONCE_BYTES)
        {
            return Err(CookieError::Mismatch);
        }
        let secs = u32::from_be_bytes(raw[..4].try_into().expect("4 bytes"));
        let mut ctx = [0u8; 32];
        let mac = self.mac(u64::from(secs), from, nonce_context(transport, &mut ctx));
        if !bool::from(mac[..NONCE_BYTES - 4].ct_eq(&raw[4..])) {
            return Err(CookieError::Mismatch);
        }
        let age = (now_ms / 1000)
            .checked_sub(u64::from(secs))
            .ok_or(CookieError::Expired)?;
        if age > lifetime.as_secs() {
            return Err(CookieError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_is_bound_to_address_ticket_relay_and_time() {
        let c = Cookies::new([1; 32], Duration::from_secs(10));
        let a: SocketAddr = "127.0.0.2:5000".parse().unwrap();
        let b: SocketAddr = "127.0.0.3:5000".parse().unwrap();
        let cookie = c.mint(1_000, a, b"ticket");
        assert_eq!(c.check(1_000, a, b"ticket", &cookie), Ok(()));
        assert_eq!(c.check(11_000, a, b"ticket", &cookie), Ok(()));
        assert_eq!(
            c.check(11_001, a, b"ticket", &cookie),
            Err(CookieError::Expired)
        );
        assert_eq!(
            c.check(999, a, b"ticket", &cookie),
            Err(CookieError::Expired)
        );
        assert_eq!(
            c.check(1_000, b, b"ticket", &cookie),
            Err(CookieError::Mismatch)
        );
        let other_port: SocketAddr = "127.0.0.2:5001".parse().unwrap();
        assert_eq!(
            c.check(1_000, other_port, b"ticket", &cookie),
            Err(CookieError::Mismatch)
        );
        assert_eq!(
            c.check(1_000, a, b"tickeu", &cookie),
            Err(CookieError::Mismatch)
        );
        let other_relay = Cookies::new([2; 32], Duration::from_secs(10));
        assert_eq!(
            other_relay.check(1_000, a, b"ticket", &cookie),
            Err(CookieError::Mismatch)
        );
        let mut forged = cookie;
        forged[..8].copy_from_slice(&5_000u64.to_be_bytes());
        assert_eq!(
            c.check(5_000, a, b"ticket", &forged),
            Err(CookieError::Mismatch)
        );
        assert_eq!(
            c.check(1_000, a, b"ticket", &cookie[..23]),
            Err(CookieError::Mismatch)
        );
    }

    #[test]
    fn a_nonce_is_bound_to_address_transport_relay_and_time() {
        let c = Cookies::new([1; 32], Duration::from_secs(10));
        let a: SocketAddr = "127.0.0.2:5000".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:5001".parse().unwrap();
        let life = Duration::from_secs(600);
        let n = c.mint_nonce(5_000, a, "turn-udp");
        assert!(
            n.iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        );
        assert_eq!(c.check_nonce(5_000, a, "turn-udp", &n, life), Ok(()));
        assert_eq!(c.check_nonce(605_999, a, "turn-udp", &n, life), Ok(()));
        assert_eq!(
            c.check_nonce(606_000, a, "turn-udp", &n, life),
            Err(CookieError::Expired)
        );
        assert_eq!(
            c.check_nonce(5_000, b, "turn-udp", &n, life),
            Err(CookieError::Mismatch)
        );
        assert_eq!(
            c.check_nonce(5_000, a, "turn-tcp", &n, life),
            Err(CookieError::Mismatch),
            "a UDP client's nonce is no good over TCP from the same address"
        );
        let other = Cookies::new([2; 32], Duration::from_secs(10));
        assert_eq!(
            other.check_nonce(5_000, a, "turn-udp", &n, life),
            Err(CookieError::Mismatch)
        );
        assert_eq!(
            c.check_nonce(5_000, a, "turn-udp", &n[..15], life),
            Err(CookieError::Mismatch)
        );
        let mut forged = n;
        forged[0] = if forged[0] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            c.check_nonce(5_000, a, "turn-udp", &forged, life),
            Err(CookieError::Mismatch)
        );
    }

    #[test]
    fn ipv4_and_ipv6_addresses_are_distinct_inputs() {
        let c = Cookies::new([1; 32], Duration::from_secs(10));
        let v6: SocketAddr = "[::1]:5000".parse().unwrap();
        let v4: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let cookie = c.mint(0, v6, b"t");
        assert_eq!(c.check(0, v6, b"t", &cookie), Ok(()));
        assert_eq!(c.check(0, v4, b"t", &cookie), Err(CookieError::Mismatch));
    }
}
