//! A TURN test client's side of STUN: a leg's long-term credentials and signed requests, and
//! reading what the server answers (attributes by type, ERROR-CODE, XOR-*-ADDRESS) and
//! ChannelData to send. Reading is deliberately independent of the relay's own parser
//! (`veil_relay_core::stun`), so that a test reads the bytes on the wire, not the relay's idea
//! of them.

use std::net::{IpAddr, SocketAddr};

use veil_protocol::turn::REALM;
use veil_relay_core::stun::{Builder, attr, long_term_key};
use veil_relay_core::token::Token;

/// A leg's TURN credentials as its client holds them (an `ice_servers` entry's username and
/// credential), with their long-term key (RFC 8489 §9.2: MD5 of username, realm, password).
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The username: the leg's ticket.
    pub username: String,
    /// The key every request is signed with.
    pub key: [u8; 16],
}

impl Credentials {
    /// The credentials of an `ice_servers` entry.
    pub fn new(username: &str, credential: &str) -> Self {
        Self {
            username: username.to_owned(),
            key: long_term_key(username.as_bytes(), REALM.as_bytes(), credential.as_bytes()),
        }
    }

    /// The credentials the controller hands out for `token`'s leg.
    pub fn of(token: &Token) -> Self {
        let c = veil_protocol::turn::credentials(token);
        Self::new(&c.username, &c.credential)
    }

    /// `request` signed with the long-term credential mechanism: USERNAME, REALM, the server's
    /// `nonce`, MESSAGE-INTEGRITY.
    pub fn sign(&self, request: Builder, nonce: &[u8]) -> Vec<u8> {
        request
            .attr(attr::USERNAME, self.username.as_bytes())
            .attr(attr::REALM, REALM.as_bytes())
            .attr(attr::NONCE, nonce)
            .integrity(&self.key)
            .as_bytes()
            .to_vec()
    }
}

/// STUN's magic cookie (RFC 8489 §5).
const MAGIC: u32 = 0x2112_A442;
/// The ERROR-CODE attribute.
const ERROR_CODE: u16 = 0x0009;

/// The value of the first attribute of type `ty` in the STUN message `msg`.
pub fn find_attr(msg: &[u8], ty: u16) -> Option<&[u8]> {
    let mut at = 20;
    while at + 4 <= msg.len() {
        let t = u16::from_be_bytes([msg[at], msg[at + 1]]);
        let len = usize::from(u16::from_be_bytes([msg[at + 2], msg[at + 3]]));
        let value = msg.get(at + 4..at + 4 + len)?;
        if t == ty {
            return Some(value);
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    None
}

/// The ERROR-CODE of an error response (class × 100 + number), if it carries one.
pub fn error_code(msg: &[u8]) -> Option<u16> {
    // The class bits of a response's type: 11 for an error.
    if msg.len() < 20 || msg[0] & 0x01 == 0 || msg[1] & 0x10 == 0 {
        return None;
    }
    let v = find_attr(msg, ERROR_CODE)?;
    (v.len() >= 4).then(|| u16::from(v[2] & 7) * 100 + u16::from(v[3]))
}

/// An XOR-*-ADDRESS attribute of type `ty`, decoded (IPv4 or IPv6).
pub fn xor_addr(msg: &[u8], ty: u16) -> Option<SocketAddr> {
    let v = find_attr(msg, ty)?;
    let magic = MAGIC.to_be_bytes();
    let port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]) ^ (MAGIC >> 16) as u16;
    let ip = match (v[1], v.len()) {
        (1, 8) => IpAddr::from(std::array::from_fn::<u8, 4, _>(|i| v[4 + i] ^ magic[i])),
        (2, 20) => {
            // The magic cookie, then the transaction id.
            let txn = msg.get(8..20)?;
            IpAddr::from(std::array::from_fn::<u8, 16, _>(|i| {
                v[4 + i] ^ if i < 4 { magic[i] } else { txn[i - 4] }
            }))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// ChannelData on `channel` carrying `payload`, padded to 4 bytes if `padded` (as on a TCP or
/// TLS stream; over UDP the padding may be left out).
pub fn channel_data(channel: u16, payload: &[u8], padded: bool) -> Vec<u8> {
    let mut v = channel.to_be_bytes().to_vec();
    v.extend((payload.len() as u16).to_be_bytes());
    v.extend(payload);
    if padded {
        v.resize(v.len().next_multiple_of(4), 0);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_401_and_an_xor_address() {
        // A 401 to an Allocate: ERROR-CODE 401 with an empty reason.
        let mut m = vec![0x01, 0x13, 0, 8];
        m.extend(MAGIC.to_be_bytes());
        m.extend([7u8; 12]);
        m.extend([0, 9, 0, 4, 0, 0, 4, 1]);
        assert_eq!(error_code(&m), Some(401));
        // XOR-RELAYED-ADDRESS 127.0.0.1:49152.
        let mut ok = vec![0x01, 0x03, 0, 12];
        ok.extend(MAGIC.to_be_bytes());
        ok.extend([7u8; 12]);
        let port = 49152u16 ^ 0x2112;
        ok.extend([0, 0x16, 0, 8, 0, 1]);
        ok.extend(port.to_be_bytes());
        ok.extend([127 ^ 0x21, 0x12, 0xA4, 1 ^ 0x42]);
        assert_eq!(error_code(&ok), None);
        assert_eq!(
            xor_addr(&ok, 0x16),
            Some("127.0.0.1:49152".parse().unwrap())
        );
        assert_eq!(
            channel_data(0x4001, &[1, 2, 3], true),
            [0x40, 1, 0, 3, 1, 2, 3, 0]
        );
    }
}
