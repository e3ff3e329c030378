//! STUN (RFC 8489) as TURN (RFC 8656) needs it: one parser over `&[u8]` that checks the framing
//! and picks out the attributes a TURN server acts on, and a builder for the answers, with
//! MESSAGE-INTEGRITY (HMAC-SHA1 under the long-term credential key) and FINGERPRINT.
//!
//! The parser allocates nothing and never panics: every length is checked before it is used
//! (the `stun` fuzz target holds it to that). ChannelData is not STUN and is not parsed here:
//! its 4-byte header is read on the hot path in `turn.rs`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha1::Sha1;
use subtle::ConstantTimeEq;

/// The magic cookie every STUN message carries in bytes 4..8.
pub const MAGIC: u32 = 0x2112_A442;
/// Length of a STUN header.
pub const HEADER_LEN: usize = 20;
/// Length of a MESSAGE-INTEGRITY value (HMAC-SHA1).
pub const INTEGRITY_LEN: usize = 20;
/// XOR'ed into FINGERPRINT's CRC-32 (RFC 8489 §14.7).
const FINGERPRINT_XOR: u32 = 0x5354_554E;
/// Most XOR-PEER-ADDRESS attributes one request may carry (a CreatePermission for a whole call
/// of 16 participants needs 15).
pub const MAX_PEERS: usize = 16;
/// Most unknown comprehension-required attributes reported in one 420 answer.
pub const MAX_UNKNOWN: usize = 4;

/// STUN and TURN methods.
pub mod method {
    /// Binding (RFC 8489).
    pub const BINDING: u16 = 0x001;
    /// Allocate (RFC 8656).
    pub const ALLOCATE: u16 = 0x003;
    /// Refresh.
    pub const REFRESH: u16 = 0x004;
    /// Send (indication).
    pub const SEND: u16 = 0x006;
    /// Data (indication).
    pub const DATA: u16 = 0x007;
    /// CreatePermission.
    pub const CREATE_PERMISSION: u16 = 0x008;
    /// ChannelBind.
    pub const CHANNEL_BIND: u16 = 0x009;
}

/// Attribute types.
pub mod attr {
    /// USERNAME.
    pub const USERNAME: u16 = 0x0006;
    /// MESSAGE-INTEGRITY.
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    /// ERROR-CODE.
    pub const ERROR_CODE: u16 = 0x0009;
    /// UNKNOWN-ATTRIBUTES.
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    /// CHANNEL-NUMBER.
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    /// LIFETIME.
    pub const LIFETIME: u16 = 0x000D;
    /// XOR-PEER-ADDRESS.
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    /// DATA.
    pub const DATA: u16 = 0x0013;
    /// REALM.
    pub const REALM: u16 = 0x0014;
    /// NONCE.
    pub const NONCE: u16 = 0x0015;
    /// XOR-RELAYED-ADDRESS.
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    /// REQUESTED-ADDRESS-FAMILY.
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    /// EVEN-PORT.
    pub const EVEN_PORT: u16 = 0x0018;
    /// REQUESTED-TRANSPORT.
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    /// DONT-FRAGMENT.
    pub const DONT_FRAGMENT: u16 = 0x001A;
    /// MESSAGE-INTEGRITY-SHA256 (not offered: Veil's realm announces no PASSWORD-ALGORITHMS).
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    /// XOR-MAPPED-ADDRESS.
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    /// RESERVATION-TOKEN.
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    /// ADDITIONAL-ADDRESS-FAMILY (comprehension-optional).
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    /// SOFTWARE.
    pub const SOFTWARE: u16 = 0x8022;
    /// FINGERPRINT.
    pub const FINGERPRINT: u16 = 0x8028;
}

/// The class of a STUN message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request: gets exactly one answer.
    Request,
    /// An indication: gets none.
    Indication,
    /// A success answer.
    Success,
    /// An error answer.
    Error,
}

impl Kind {
    fn bits(self) -> u16 {
        match self {
            Self::Request => 0x000,
            Self::Indication => 0x010,
            Self::Success => 0x100,
            Self::Error => 0x110,
        }
    }
}

/// Why a datagram is not a STUN message a server can act on. Such datagrams are dropped
/// unanswered: they may come from a spoofed source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than a header, a length that is not the datagram's, or not a multiple of 4.
    #[error("bad STUN framing")]
    Framing,
    /// Not the magic cookie, or the top two bits set.
    #[error("not STUN")]
    NotStun,
    /// An attribute runs past the message, or a known attribute has the wrong length or value.
    #[error("malformed STUN attribute")]
    Attribute,
    /// FINGERPRINT is present but wrong.
    #[error("bad STUN fingerprint")]
    Fingerprint,
}

/// A parsed STUN message: its header, and the attributes a TURN server acts on. Attributes
/// after MESSAGE-INTEGRITY other than FINGERPRINT are ignored, as RFC 8489 §14.5 requires.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    /// The method.
    pub method: u16,
    /// The class.
    pub kind: Kind,
    /// The transaction id.
    pub txn: [u8; 12],
    /// USERNAME.
    pub username: Option<&'a [u8]>,
    /// REALM.
    pub realm: Option<&'a [u8]>,
    /// NONCE.
    pub nonce: Option<&'a [u8]>,
    /// LIFETIME, seconds.
    pub lifetime: Option<u32>,
    /// REQUESTED-TRANSPORT's protocol number.
    pub requested_transport: Option<u8>,
    /// REQUESTED-ADDRESS-FAMILY: 1 IPv4, 2 IPv6.
    pub requested_family: Option<u8>,
    /// CHANNEL-NUMBER.
    pub channel: Option<u16>,
    /// DATA.
    pub data: Option<&'a [u8]>,
    /// EVEN-PORT, with its R (reserve) bit.
    pub even_port: Option<bool>,
    /// RESERVATION-TOKEN was present.
    pub reservation_token: bool,
    /// XOR-PEER-ADDRESS values, decoded (the first [`MAX_PEERS`]).
    peers: [Option<SocketAddr>; MAX_PEERS],
    /// More XOR-PEER-ADDRESS attributes than [`MAX_PEERS`].
    pub too_many_peers: bool,
    /// Unknown comprehension-required attribute types (the first [`MAX_UNKNOWN`]).
    unknown: [u16; MAX_UNKNOWN],
    unknown_len: u8,
    /// Where MESSAGE-INTEGRITY starts, and its value.
    integrity: Option<(usize, &'a [u8])>,
    /// FINGERPRINT was present (and right).
    pub fingerprint: bool,
    raw: &'a [u8],
}

/// The most bytes a TURN message on a TCP or TLS stream may take: more than any WebRTC
/// client sends (a Send indication carries at most a datagram), small enough that a
/// connection's buffer stays small.
pub const MAX_STREAM_FRAME: usize = 4096;

/// Why a TCP or TLS stream cannot be framed: its connection is closed, as RFC 8656 §12.5 leaves
/// no way to find the next message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A first byte that starts neither a STUN message (0-3) nor ChannelData (0x40-0x4F).
    #[error("neither STUN nor ChannelData")]
    UnknownType,
    /// A message longer than [`MAX_STREAM_FRAME`].
    #[error("message too long")]
    TooLong,
}

/// The length of the TURN message at the start of a TCP or TLS stream (RFC 8656 §12.5): a STUN
/// message's 20-byte header plus its length, or ChannelData's 4-byte header plus its length
/// rounded up to a multiple of 4 (over a stream, ChannelData is padded). `None` until the
/// 4 bytes that tell are there.
pub fn frame_len(head: &[u8]) -> Option<Result<usize, FrameError>> {
    let head: &[u8; 4] = head.get(..4)?.try_into().ok()?;
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let total = match head[0] {
        0..=3 => HEADER_LEN + len,
        0x40..=0x4F => 4 + len.next_multiple_of(4),
        _ => return Some(Err(FrameError::UnknownType)),
    };
    Some(if total > MAX_STREAM_FRAME {
        Err(FrameError::TooLong)
    } else {
        Ok(total)
    })
}

/// True if `pkt` looks like a STUN message (RFC 7983: first byte 0-3, and the magic cookie),
/// without parsing it.
#[inline]
pub fn is_stun(pkt: &[u8]) -> bool {
    pkt.len() >= HEADER_LEN && pkt[0] < 4 && pkt[4..8] == MAGIC.to_be_bytes()
}

/// Parses one STUN message that is the whole of `pkt` (a UDP datagram, or one message a stream
/// framer cut out).
pub fn parse(pkt: &[u8]) -> Result<Message<'_>, ParseError> {
    if pkt.len() < HEADER_LEN {
        return Err(ParseError::Framing);
    }
    let ty = u16::from_be_bytes([pkt[0], pkt[1]]);
    // RFC 7983: a STUN message's first byte is 0-3 (every method a TURN server serves is
    // below 0x080).
    if pkt[0] > 3 || pkt[4..8] != MAGIC.to_be_bytes() {
        return Err(ParseError::NotStun);
    }
    let len = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if len % 4 != 0 || HEADER_LEN + len != pkt.len() {
        return Err(ParseError::Framing);
    }
    let method = (ty & 0x000F) | ((ty & 0x00E0) >> 1) | ((ty & 0x3E00) >> 2);
    let kind = match ty & 0x0110 {
        0x000 => Kind::Request,
        0x010 => Kind::Indication,
        0x100 => Kind::Success,
        _ => Kind::Error,
    };
    let mut txn = [0u8; 12];
    txn.copy_from_slice(&pkt[8..20]);
    let mut m = Message {
        method,
        kind,
        txn,
        username: None,
        realm: None,
        nonce: None,
        lifetime: None,
        requested_transport: None,
        requested_family: None,
        channel: None,
        data: None,
        even_port: None,
        reservation_token: false,
        peers: [None; MAX_PEERS],
        too_many_peers: false,
        unknown: [0; MAX_UNKNOWN],
        unknown_len: 0,
        integrity: None,
        fingerprint: false,
        raw: pkt,
    };
    let mut at = HEADER_LEN;
    let mut npeers = 0;
    while at < pkt.len() {
        if pkt.len() - at < 4 {
            return Err(ParseError::Attribute);
        }
        let ty = u16::from_be_bytes([pkt[at], pkt[at + 1]]);
        let vlen = usize::from(u16::from_be_bytes([pkt[at + 2], pkt[at + 3]]));
        let start = at + 4;
        let padded = vlen.div_ceil(4) * 4;
        if pkt.len() - start < padded {
            return Err(ParseError::Attribute);
        }
        let v = &pkt[start..start + vlen];
        if ty == attr::FINGERPRINT {
            // Last, and over everything before it.
            if vlen != 4 || start + 4 != pkt.len() {
                return Err(ParseError::Attribute);
            }
            let want = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
            if crc32fast::hash(&pkt[..at]) ^ FINGERPRINT_XOR != want {
                return Err(ParseError::Fingerprint);
            }
            m.fingerprint = true;
        } else if m.integrity.is_some() {
            // After MESSAGE-INTEGRITY: ignored (RFC 8489 §14.5).
        } else {
            match ty {
                attr::MESSAGE_INTEGRITY => {
                    if vlen != INTEGRITY_LEN {
                        return Err(ParseError::Attribute);
                    }
                    m.integrity = Some((at, v));
                }
                attr::USERNAME if vlen <= 513 => m.username = Some(v),
                attr::REALM if vlen <= 763 => m.realm = Some(v),
                attr::NONCE if vlen <= 763 => m.nonce = Some(v),
                attr::LIFETIME if vlen == 4 => {
                    m.lifetime = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
                }
                attr::REQUESTED_TRANSPORT if vlen == 4 => m.requested_transport = Some(v[0]),
                attr::REQUESTED_ADDRESS_FAMILY if vlen == 4 => m.requested_family = Some(v[0]),
                attr::CHANNEL_NUMBER if vlen == 4 => {
                    m.channel = Some(u16::from_be_bytes([v[0], v[1]]))
                }
                attr::DATA => m.data = Some(v),
                attr::EVEN_PORT if vlen == 1 => m.even_port = Some(v[0] & 0x80 != 0),
                attr::RESERVATION_TOKEN if vlen == 8 => m.reservation_token = true,
                attr::DONT_FRAGMENT if vlen == 0 => {}
                attr::XOR_PEER_ADDRESS => {
                    let addr = xor_addr(v, &txn).ok_or(ParseError::Attribute)?;
                    if npeers < MAX_PEERS {
                        m.peers[npeers] = Some(addr);
                        npeers += 1;
                    } else {
                        m.too_many_peers = true;
                    }
                }
                attr::USERNAME
                | attr::REALM
                | attr::NONCE
                | attr::LIFETIME
                | attr::REQUESTED_TRANSPORT
                | attr::REQUESTED_ADDRESS_FAMILY
                | attr::CHANNEL_NUMBER
                | attr::EVEN_PORT
                | attr::RESERVATION_TOKEN
                | attr::DONT_FRAGMENT => return Err(ParseError::Attribute),
                // Understood and not acted on: answers' attributes, ICE's, SOFTWARE.
                attr::ERROR_CODE
                | attr::UNKNOWN_ATTRIBUTES
                | attr::XOR_RELAYED_ADDRESS
                | attr::XOR_MAPPED_ADDRESS
                | 0x0024 // PRIORITY
                | 0x0025 // USE-CANDIDATE
                | 0x0001 // MAPPED-ADDRESS
                | attr::MESSAGE_INTEGRITY_SHA256 => {}
                t if t < 0x8000 && usize::from(m.unknown_len) < MAX_UNKNOWN => {
                    m.unknown[usize::from(m.unknown_len)] = t;
                    m.unknown_len += 1;
                }
                // Comprehension-optional: ignored.
                _ => {}
            }
        }
        at = start + padded;
    }
    Ok(m)
}

/// Decodes an XOR-*-ADDRESS value.
fn xor_addr(v: &[u8], txn: &[u8; 12]) -> Option<SocketAddr> {
    if v.len() < 4 || v[0] != 0 {
        return None;
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC >> 16) as u16;
    let magic = MAGIC.to_be_bytes();
    match (v[1], v.len()) {
        (1, 8) => {
            let mut ip = [0u8; 4];
            for i in 0..4 {
                ip[i] = v[4 + i] ^ magic[i];
            }
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        (2, 20) => {
            let mut ip = [0u8; 16];
            for i in 0..16 {
                let k = if i < 4 { magic[i] } else { txn[i - 4] };
                ip[i] = v[4 + i] ^ k;
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => None,
    }
}

impl<'a> Message<'a> {
    /// The XOR-PEER-ADDRESS values.
    pub fn peers(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.peers.iter().map_while(|p| *p)
    }

    /// Unknown comprehension-required attribute types, for a 420 answer.
    pub fn unknown(&self) -> &[u16] {
        &self.unknown[..usize::from(self.unknown_len)]
    }

    /// True if the message carries MESSAGE-INTEGRITY.
    pub fn has_integrity(&self) -> bool {
        self.integrity.is_some()
    }

    /// Checks MESSAGE-INTEGRITY under `key` (RFC 8489 §14.5: HMAC-SHA1 over the message up to
    /// the attribute, with the header's length covering it). False if absent.
    pub fn verify_integrity(&self, key: &[u8; 16]) -> bool {
        let Some((at, value)) = self.integrity else {
            return false;
        };
        let mac = integrity(&self.raw[..at], key);
        mac.ct_eq(value).into()
    }

    /// The bytes of the message.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }
}

/// HMAC-SHA1 of `head` (a message up to where MESSAGE-INTEGRITY goes) with its length field
/// set as if MESSAGE-INTEGRITY were the last attribute.
fn integrity(head: &[u8], key: &[u8; 16]) -> [u8; INTEGRITY_LEN] {
    let len = (head.len() - HEADER_LEN + 4 + INTEGRITY_LEN) as u16;
    let mut mac = <Hmac<Sha1>>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(&head[..2]);
    mac.update(&len.to_be_bytes());
    mac.update(&head[4..]);
    mac.finalize().into_bytes().into()
}

/// The long-term credential key (RFC 8489 §9.2.2): MD5(username ":" realm ":" password). The
/// password is ASCII (Veil's are base64url), which OpaqueString leaves unchanged.
pub fn long_term_key(username: &[u8], realm: &[u8], password: &[u8]) -> [u8; 16] {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    h.update(username);
    h.update(b":");
    h.update(realm);
    h.update(b":");
    h.update(password);
    h.finalize().into()
}

/// Capacity of a [`Builder`]: the longest answer a Veil relay sends (an Allocate success over
/// IPv6 with every attribute is 108 bytes; a 420 lists at most [`MAX_UNKNOWN`] types), and
/// the signed requests of a TURN client with a peer, a channel, a lifetime and a transport.
pub const ANSWER_CAP: usize = 200;

/// Builds a STUN message in a fixed buffer.
#[derive(Clone, Copy)]
pub struct Builder {
    buf: [u8; ANSWER_CAP],
    len: usize,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder").field("len", &self.len).finish()
    }
}

impl Builder {
    /// A message of `method` and `kind` with transaction id `txn`.
    pub fn new(method: u16, kind: Kind, txn: &[u8; 12]) -> Self {
        let ty =
            (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2) | kind.bits();
        let mut buf = [0u8; ANSWER_CAP];
        buf[..2].copy_from_slice(&ty.to_be_bytes());
        buf[4..8].copy_from_slice(&MAGIC.to_be_bytes());
        buf[8..20].copy_from_slice(txn);
        let mut b = Self {
            buf,
            len: HEADER_LEN,
        };
        b.set_len();
        b
    }

    fn set_len(&mut self) {
        let len = (self.len - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }

    /// Appends an attribute (padded to 4 bytes). Values that would not fit are left out: no
    /// answer Veil builds comes near [`ANSWER_CAP`].
    pub fn attr(mut self, ty: u16, value: &[u8]) -> Self {
        let padded = value.len().div_ceil(4) * 4;
        if self.len + 4 + padded > ANSWER_CAP || value.len() > usize::from(u16::MAX) {
            debug_assert!(false, "STUN answer over capacity");
            return self;
        }
        let at = self.len;
        self.buf[at..at + 2].copy_from_slice(&ty.to_be_bytes());
        self.buf[at + 2..at + 4].copy_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf[at + 4..at + 4 + value.len()].copy_from_slice(value);
        self.buf[at + 4 + value.len()..at + 4 + padded].fill(0);
        self.len = at + 4 + padded;
        self.set_len();
        self
    }

    /// A 4-byte attribute.
    pub fn u32(self, ty: u16, v: u32) -> Self {
        self.attr(ty, &v.to_be_bytes())
    }

    /// An XOR-*-ADDRESS attribute.
    pub fn xor_addr(self, ty: u16, addr: SocketAddr) -> Self {
        let txn: [u8; 12] = self.buf[8..20].try_into().expect("12 bytes");
        let mut v = [0u8; 20];
        let n = write_xor_addr(&mut v, addr, &txn);
        self.attr(ty, &v[..n])
    }

    /// ERROR-CODE with `code` and `reason` (which may be empty, as in Veil's smallest 401).
    pub fn error(self, code: u16, reason: &str) -> Self {
        let mut v = [0u8; 4 + 64];
        let r = &reason.as_bytes()[..reason.len().min(64)];
        v[2] = (code / 100) as u8;
        v[3] = (code % 100) as u8;
        v[4..4 + r.len()].copy_from_slice(r);
        self.attr(attr::ERROR_CODE, &v[..4 + r.len()])
    }

    /// MESSAGE-INTEGRITY under `key`.
    pub fn integrity(mut self, key: &[u8; 16]) -> Self {
        let mac = integrity(&self.buf[..self.len], key);
        self = self.attr(attr::MESSAGE_INTEGRITY, &mac);
        self
    }

    /// FINGERPRINT, last.
    pub fn fingerprint(mut self) -> Self {
        // The length field covers FINGERPRINT before the CRC is taken.
        let at = self.len;
        self.len += 8;
        self.set_len();
        let crc = crc32fast::hash(&self.buf[..at]) ^ FINGERPRINT_XOR;
        self.len = at;
        self.attr(attr::FINGERPRINT, &crc.to_be_bytes())
    }

    /// The encoded message.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Writes an XOR-*-ADDRESS value for `addr` into `out` (at least 20 bytes); returns its length
/// (8 for IPv4, 20 for IPv6).
pub fn write_xor_addr(out: &mut [u8], addr: SocketAddr, txn: &[u8; 12]) -> usize {
    let magic = MAGIC.to_be_bytes();
    out[0] = 0;
    out[2..4].copy_from_slice(&(addr.port() ^ (MAGIC >> 16) as u16).to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            out[1] = 1;
            for (i, b) in ip.octets().iter().enumerate() {
                out[4 + i] = b ^ magic[i];
            }
            8
        }
        IpAddr::V6(ip) => {
            out[1] = 2;
            for (i, b) in ip.octets().iter().enumerate() {
                let k = if i < 4 { magic[i] } else { txn[i - 4] };
                out[4 + i] = b ^ k;
            }
            20
        }
    }
}

/// Length of a Data indication's header and attributes before the payload: the STUN header,
/// XOR-PEER-ADDRESS (IPv4: 12, IPv6: 24) and DATA's attribute header.
pub fn data_indication_overhead(peer: SocketAddr) -> usize {
    HEADER_LEN + if peer.is_ipv4() { 12 } else { 24 } + 4
}

/// Writes a Data indication from `peer` carrying `payload` into `out`, which must hold
/// [`data_indication_overhead`] plus the payload padded to 4 bytes; returns its length.
pub fn write_data_indication(
    out: &mut [u8],
    txn: &[u8; 12],
    peer: SocketAddr,
    payload: &[u8],
) -> usize {
    let head = data_indication_overhead(peer);
    let padded = payload.len().div_ceil(4) * 4;
    let total = head + padded;
    let ty = Builder::new(method::DATA, Kind::Indication, txn);
    out[..HEADER_LEN].copy_from_slice(&ty.buf[..HEADER_LEN]);
    out[2..4].copy_from_slice(&((total - HEADER_LEN) as u16).to_be_bytes());
    let mut at = HEADER_LEN;
    out[at..at + 2].copy_from_slice(&attr::XOR_PEER_ADDRESS.to_be_bytes());
    let n = write_xor_addr(&mut out[at + 4..], peer, txn);
    out[at + 2..at + 4].copy_from_slice(&(n as u16).to_be_bytes());
    at += 4 + n;
    out[at..at + 2].copy_from_slice(&attr::DATA.to_be_bytes());
    out[at + 2..at + 4].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    at += 4;
    out[at..at + payload.len()].copy_from_slice(payload);
    out[at + payload.len()..total].fill(0);
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    const TXN: [u8; 12] = *b"0123456789ab";

    #[test]
    fn a_built_message_parses_back_with_integrity_and_fingerprint() {
        let key = long_term_key(b"user", b"veil", b"pass");
        let peer: SocketAddr = "192.0.2.1:49152".parse().unwrap();
        let peer6: SocketAddr = "[2001:db8::1]:3478".parse().unwrap();
        let b = Builder::new(method::CREATE_PERMISSION, Kind::Request, &TXN)
            .xor_addr(attr::XOR_PEER_ADDRESS, peer)
            .xor_addr(attr::XOR_PEER_ADDRESS, peer6)
            .attr(attr::USERNAME, b"user")
            .attr(attr::REALM, b"veil")
            .attr(attr::NONCE, b"n0nce")
            .integrity(&key)
            .fingerprint();
        let m = parse(b.as_bytes()).unwrap();
        assert_eq!(
            (m.method, m.kind, m.txn),
            (method::CREATE_PERMISSION, Kind::Request, TXN)
        );
        assert_eq!(m.peers().collect::<Vec<_>>(), vec![peer, peer6]);
        assert_eq!(m.username, Some(&b"user"[..]));
        assert_eq!(m.nonce, Some(&b"n0nce"[..]));
        assert!(m.fingerprint && m.verify_integrity(&key));
        assert!(!m.verify_integrity(&long_term_key(b"user", b"veil", b"wrong")));
        // One flipped bit anywhere breaks the fingerprint, or the integrity.
        for i in 0..b.as_bytes().len() {
            let mut bad = b.as_bytes().to_vec();
            bad[i] ^= 0x01;
            // Or, for a flip in FINGERPRINT's type, an attribute after MESSAGE-INTEGRITY,
            // which is ignored: then the message is intact but carries no fingerprint.
            if let Ok(m) = parse(&bad) {
                assert!(!m.verify_integrity(&key) || !m.fingerprint, "byte {i}");
            }
        }
    }

    #[test]
    fn method_and_class_bits_interleave_as_rfc_8489_says() {
        // Allocate error: 0x0113; ChannelBind success: 0x0109; Data indication: 0x0017.
        let b = Builder::new(method::ALLOCATE, Kind::Error, &TXN);
        assert_eq!(&b.as_bytes()[..2], &[0x01, 0x13]);
        let b = Builder::new(method::CHANNEL_BIND, Kind::Success, &TXN);
        assert_eq!(&b.as_bytes()[..2], &[0x01, 0x09]);
        let b = Builder::new(method::DATA, Kind::Indication, &TXN);
        assert_eq!(&b.as_bytes()[..2], &[0x00, 0x17]);
        let b = Builder::new(method::REFRESH, Kind::Success, &TXN);
        let m = parse(b.as_bytes()).unwrap();
        assert_eq!((m.method, m.kind), (method::REFRESH, Kind::Success));
    }

    #[test]
    fn rfc_5769_sample_request_verifies() {
        // RFC 5769 §2.1, with its short-term credential: the key is the password itself, so
        // the HMAC is taken here rather than through `verify_integrity`'s 16-byte key.
        let pkt = hex_bytes(
            "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74\
             002400046e0001ff80290008932ff9b151263b36000600096576746a3a68367659202020\
             00080014\
             9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf",
        );
        let m = parse(&pkt).unwrap();
        assert_eq!((m.method, m.kind), (method::BINDING, Kind::Request));
        assert!(m.fingerprint && m.has_integrity());
        assert_eq!(m.username, Some(&b"evtj:h6vY"[..]));
        let mac = <Hmac<Sha1>>::new_from_slice(b"VOkJxbRl1RmTxUk/WvJxBt")
            .unwrap()
            .chain_update({
                let mut head = pkt[..pkt.len() - 32].to_vec();
                let len = (head.len() - 20 + 24) as u16;
                head[2..4].copy_from_slice(&len.to_be_bytes());
                head
            })
            .finalize()
            .into_bytes();
        assert_eq!(&mac[..], &pkt[pkt.len() - 28..pkt.len() - 8]);
    }

    #[test]
    fn bad_framing_is_refused_before_any_attribute_is_read() {
        let good = Builder::new(method::ALLOCATE, Kind::Request, &TXN)
            .u32(attr::REQUESTED_TRANSPORT, 17 << 24);
        let bytes = good.as_bytes();
        assert!(parse(bytes).is_ok());
        assert_eq!(parse(&bytes[..19]).unwrap_err(), ParseError::Framing);
        assert_eq!(
            parse(&bytes[..bytes.len() - 4]).unwrap_err(),
            ParseError::Framing
        );
        let mut not = bytes.to_vec();
        not[4] ^= 1;
        assert_eq!(parse(&not).unwrap_err(), ParseError::NotStun);
        let mut long = bytes.to_vec();
        long[22..24].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(parse(&long).unwrap_err(), ParseError::Attribute);
        let mut lifetime = Builder::new(method::REFRESH, Kind::Request, &TXN)
            .attr(attr::LIFETIME, &[0, 0])
            .as_bytes()
            .to_vec();
        assert_eq!(parse(&lifetime).unwrap_err(), ParseError::Attribute);
        lifetime.truncate(20);
        lifetime[2..4].fill(0);
        assert!(parse(&lifetime).is_ok());
    }

    #[test]
    fn unknown_comprehension_required_attributes_are_listed_and_optional_ones_ignored() {
        let b = Builder::new(method::ALLOCATE, Kind::Request, &TXN)
            .attr(0x0031, b"x")
            .attr(0x8031, b"y")
            .attr(0x0032, b"");
        let m = parse(b.as_bytes()).unwrap();
        assert_eq!(m.unknown(), &[0x0031, 0x0032]);
    }

    #[test]
    fn data_indications_are_framed_for_any_payload_length() {
        let peer: SocketAddr = "203.0.113.9:50000".parse().unwrap();
        for n in [0, 1, 3, 4, 5, 1200] {
            let payload: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let mut out = vec![0u8; data_indication_overhead(peer) + n + 3];
            let len = write_data_indication(&mut out, &TXN, peer, &payload);
            let m = parse(&out[..len]).unwrap();
            assert_eq!((m.method, m.kind), (method::DATA, Kind::Indication));
            assert_eq!(m.peers().next(), Some(peer));
            assert_eq!(m.data, Some(&payload[..]));
        }
    }

    fn hex_bytes(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
