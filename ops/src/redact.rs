//! Client addresses in logs: never printed, only a keyed digest that correlates lines within one
//! process and means nothing outside it.

use std::fmt;
use std::net::SocketAddr;
use std::sync::OnceLock;

use hmac::{Hmac, Mac};
use sha2::Sha256;

fn key() -> &'static [u8; 32] {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    KEY.get_or_init(rand::random)
}

/// Displays a client address as `peer#` and 8 hex digits of a per-process keyed digest.
#[derive(Clone, Copy)]
pub struct Redacted(pub SocketAddr);

impl fmt::Display for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut mac = Hmac::<Sha256>::new_from_slice(key()).expect("HMAC accepts any key length");
        mac.update(self.0.to_string().as_bytes());
        let digest = mac.finalize().into_bytes();
        write!(f, "peer#{}", hex::encode(&digest[..4]))
    }
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_shows_the_address_but_correlates() {
        let a: SocketAddr = "127.0.0.2:40000".parse().unwrap();
        let b: SocketAddr = "127.0.0.3:40000".parse().unwrap();
        let (ra, rb) = (Redacted(a).to_string(), Redacted(b).to_string());
        assert!(ra.starts_with("peer#") && ra.len() == 13);
        assert!(!ra.contains("127") && !format!("{:?}", Redacted(a)).contains("127"));
        assert_eq!(ra, Redacted(a).to_string());
        assert_ne!(ra, rb);
    }
}
