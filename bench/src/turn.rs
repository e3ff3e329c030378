//! A minimal TURN client (RFC 8656 over UDP, long-term credentials): Allocate, ChannelBind, then
//! media as ChannelData. Just enough to make coturn relay the benchmark's datagrams; not a
//! general STUN stack (no FINGERPRINT, no refreshes: a benchmark run is shorter than every
//! lifetime involved).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use anyhow::{Context, bail};
use hmac::{Hmac, Mac};
use sha1::Sha1;

const MAGIC: u32 = 0x2112_A442;
const ALLOCATE: u16 = 0x0003;
const CHANNEL_BIND: u16 = 0x0009;
const SUCCESS: u16 = 0x0100;
const ERROR: u16 = 0x0110;

const ATTR_USERNAME: u16 = 0x0006;
const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_CHANNEL_NUMBER: u16 = 0x000C;
const ATTR_LIFETIME: u16 = 0x000D;
const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;
const ATTR_REALM: u16 = 0x0014;
const ATTR_NONCE: u16 = 0x0015;
const ATTR_XOR_RELAYED_ADDRESS: u16 = 0x0016;
const ATTR_REQUESTED_TRANSPORT: u16 = 0x0019;

/// Length of a ChannelData header.
pub const CHANNEL_DATA_HEADER: usize = 4;

/// Long-term credentials. coturn's `user=<name>:0x<hex>` form takes the HMAC key itself (what
/// RFC 8489 derives as MD5(username:realm:password)), so the benchmark picks a random key and
/// gives coturn the same one.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// The 16-byte long-term key.
    pub key: [u8; 16],
}

/// An allocation on a TURN server, from one client socket.
#[derive(Debug)]
pub struct Allocation {
    /// The server's address.
    pub server: SocketAddr,
    /// The relayed address the server sends from.
    pub relayed: SocketAddr,
    realm: Vec<u8>,
    nonce: Vec<u8>,
    creds: Credentials,
}

struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(ty: u16, txn: &[u8; 12]) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&ty.to_be_bytes());
        buf.extend_from_slice(&0u16.to_be_bytes());
        buf.extend_from_slice(&MAGIC.to_be_bytes());
        buf.extend_from_slice(txn);
        Self { buf }
    }

    fn attr(&mut self, ty: u16, value: &[u8]) {
        self.buf.extend_from_slice(&ty.to_be_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
        self.set_len(self.buf.len() - 20);
    }

    fn set_len(&mut self, len: usize) {
        self.buf[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    }

    /// Appends MESSAGE-INTEGRITY: HMAC-SHA1 over the message so far, its length field already
    /// counting the attribute.
    fn integrity(mut self, key: &[u8]) -> Vec<u8> {
        let len = self.buf.len() - 20 + 24;
        self.set_len(len);
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(&self.buf);
        let tag = mac.finalize().into_bytes();
        self.attr(ATTR_MESSAGE_INTEGRITY, &tag);
        self.buf
    }

    fn plain(self) -> Vec<u8> {
        self.buf
    }
}

fn xor_addr(a: SocketAddrV4) -> [u8; 8] {
    let mut v = [0u8; 8];
    v[1] = 0x01;
    v[2..4].copy_from_slice(&(a.port() ^ (MAGIC >> 16) as u16).to_be_bytes());
    v[4..8].copy_from_slice(&(u32::from(*a.ip()) ^ MAGIC).to_be_bytes());
    v
}

fn parse_xor_addr(v: &[u8]) -> Option<SocketAddr> {
    if v.len() < 8 || v[1] != 0x01 {
        return None;
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC >> 16) as u16;
    let ip = u32::from_be_bytes([v[4], v[5], v[6], v[7]]) ^ MAGIC;
    Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
}

/// A parsed answer: its type and attributes.
struct Answer {
    ty: u16,
    attrs: Vec<(u16, Vec<u8>)>,
}

impl Answer {
    fn parse(b: &[u8], txn: &[u8; 12]) -> Option<Self> {
        if b.len() < 20 || b[4..8] != MAGIC.to_be_bytes() || &b[8..20] != txn {
            return None;
        }
        let ty = u16::from_be_bytes([b[0], b[1]]);
        let len = u16::from_be_bytes([b[2], b[3]]) as usize;
        let body = b.get(20..20 + len)?;
        let mut attrs = Vec::new();
        let mut i = 0;
        while i + 4 <= body.len() {
            let at = u16::from_be_bytes([body[i], body[i + 1]]);
            let al = u16::from_be_bytes([body[i + 2], body[i + 3]]) as usize;
            let v = body.get(i + 4..i + 4 + al)?;
            attrs.push((at, v.to_vec()));
            i += 4 + al.div_ceil(4) * 4;
        }
        Some(Self { ty, attrs })
    }

    fn get(&self, ty: u16) -> Option<&[u8]> {
        self.attrs
            .iter()
            .find(|(t, _)| *t == ty)
            .map(|(_, v)| v.as_slice())
    }

    fn error_code(&self) -> Option<u16> {
        let v = self.get(ATTR_ERROR_CODE)?;
        (v.len() >= 4).then(|| u16::from(v[2] & 7) * 100 + u16::from(v[3]))
    }
}

/// Sends `req` and waits for the answer with the same transaction id, retransmitting every
/// 300 ms, 6 times at most.
fn transact(
    sock: &UdpSocket,
    server: SocketAddr,
    txn: &[u8; 12],
    req: &[u8],
) -> anyhow::Result<Answer> {
    sock.set_read_timeout(Some(Duration::from_millis(300)))?;
    let mut buf = [0u8; 1500];
    for _ in 0..6 {
        sock.send_to(req, server)?;
        loop {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) if from == server => {
                    if let Some(a) = Answer::parse(&buf[..n], txn) {
                        return Ok(a);
                    }
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                // ICMP port unreachable while the server starts: try again.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    bail!("no answer from TURN server {server}")
}

impl Allocation {
    /// Allocates a UDP relayed address on `server` for `sock`'s address.
    pub fn allocate(
        sock: &UdpSocket,
        server: SocketAddr,
        creds: &Credentials,
    ) -> anyhow::Result<Self> {
        // First round: unauthenticated, to learn the realm and a nonce (401).
        let txn: [u8; 12] = rand::random();
        let mut m = Msg::new(ALLOCATE, &txn);
        m.attr(ATTR_REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        let a = transact(sock, server, &txn, &m.plain())?;
        if a.ty != ALLOCATE | ERROR || a.error_code() != Some(401) {
            bail!(
                "TURN Allocate: expected 401, got type {:#06x} code {:?}",
                a.ty,
                a.error_code()
            );
        }
        let realm = a.get(ATTR_REALM).context("401 without REALM")?.to_vec();
        let nonce = a.get(ATTR_NONCE).context("401 without NONCE")?.to_vec();
        let mut alloc = Self {
            server,
            relayed: server,
            realm,
            nonce,
            creds: creds.clone(),
        };
        let a = alloc.authenticated(sock, ALLOCATE, |m| {
            m.attr(ATTR_REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            m.attr(ATTR_LIFETIME, &3600u32.to_be_bytes());
        })?;
        alloc.relayed = a
            .get(ATTR_XOR_RELAYED_ADDRESS)
            .and_then(parse_xor_addr)
            .context("Allocate success without XOR-RELAYED-ADDRESS")?;
        Ok(alloc)
    }

    /// Binds `channel` (0x4000..=0x4FFF) to `peer`, which also installs a permission for it.
    pub fn bind_channel(
        &mut self,
        sock: &UdpSocket,
        channel: u16,
        peer: SocketAddrV4,
    ) -> anyhow::Result<()> {
        let mut number = [0u8; 4];
        number[..2].copy_from_slice(&channel.to_be_bytes());
        self.authenticated(sock, CHANNEL_BIND, |m| {
            m.attr(ATTR_CHANNEL_NUMBER, &number);
            m.attr(ATTR_XOR_PEER_ADDRESS, &xor_addr(peer));
        })?;
        Ok(())
    }

    /// Sends an authenticated request of type `ty` with the attributes `fill` adds, retrying
    /// once with a fresh nonce on 438 (stale nonce); returns the success answer.
    fn authenticated(
        &mut self,
        sock: &UdpSocket,
        ty: u16,
        fill: impl Fn(&mut Msg),
    ) -> anyhow::Result<Answer> {
        for _ in 0..2 {
            let txn: [u8; 12] = rand::random();
            let mut m = Msg::new(ty, &txn);
            fill(&mut m);
            m.attr(ATTR_USERNAME, self.creds.username.as_bytes());
            m.attr(ATTR_REALM, &self.realm);
            m.attr(ATTR_NONCE, &self.nonce);
            let req = m.integrity(&self.creds.key);
            let a = transact(sock, self.server, &txn, &req)?;
            if a.ty == ty | SUCCESS {
                return Ok(a);
            }
            if a.error_code() == Some(438)
                && let Some(n) = a.get(ATTR_NONCE)
            {
                self.nonce = n.to_vec();
                continue;
            }
            bail!(
                "TURN request {ty:#06x} refused: type {:#06x} code {:?}",
                a.ty,
                a.error_code()
            );
        }
        bail!("TURN request {ty:#06x}: nonce stale twice")
    }
}

/// Writes a ChannelData header for `len` bytes of data on `channel` into `hdr`.
pub fn channel_data_header(hdr: &mut [u8], channel: u16, len: usize) {
    hdr[0..2].copy_from_slice(&channel.to_be_bytes());
    hdr[2..4].copy_from_slice(&(len as u16).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xor_address_round_trips() {
        let a: SocketAddrV4 = "127.0.0.1:3478".parse().unwrap();
        assert_eq!(parse_xor_addr(&xor_addr(a)), Some(SocketAddr::V4(a)));
    }

    #[test]
    fn message_integrity_counts_itself_in_the_length() {
        let txn = [7u8; 12];
        let mut m = Msg::new(ALLOCATE, &txn);
        m.attr(ATTR_USERNAME, b"bench");
        let b = m.integrity(&[1; 16]);
        assert_eq!(b.len(), 20 + 12 + 24);
        assert_eq!(u16::from_be_bytes([b[2], b[3]]) as usize, b.len() - 20);
        let a = Answer::parse(&b, &txn).unwrap();
        assert_eq!(a.get(ATTR_USERNAME), Some(&b"bench"[..]));
        assert_eq!(a.get(ATTR_MESSAGE_INTEGRITY).map(<[u8]>::len), Some(20));
    }
}
