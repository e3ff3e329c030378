//! Code shared by Veil's fuzz targets (`fuzz_targets/`) and the seed-corpus generator
//! (`examples/gen_corpus.rs`): key material, a byte reader, and the relay scenario that the
//! `datagram` target drives.
//!
//! Nothing here reads the real clock except once, for the arbitrary origin of virtual time, so a
//! crashing input replays identically.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use veil_relay_core::token::KeyRing;

pub mod datagram;

/// The cookie secret of every relay the targets build.
pub const COOKIE_SECRET: &[u8; 32] = &[0x42; 32];

/// The keys of the cluster key ring of every relay the targets build.
pub const KEYS: [(u16, [u8; 32]); 2] = [(1, [1; 32]), (2, [2; 32])];

/// The cluster key ring of every relay the targets build: [`KEYS`], signing with key 2.
pub fn key_ring() -> KeyRing {
    KeyRing::from_keys(&KEYS, 2)
}

/// A ring holding only key `id` of [`KEYS`], signing with it: mints what a controller that
/// signs with that key would.
pub fn signer(id: u16) -> Option<KeyRing> {
    KEYS.iter()
        .find(|(k, _)| *k == id)
        .map(|key| KeyRing::from_keys(&[*key], id))
}

/// Reads fields off the front of a fuzz input. Past the end every read yields zeros or an empty
/// slice, so any input is a valid one.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// True once everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A big-endian `u16`.
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.array())
    }

    /// A big-endian `u32`.
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.array())
    }

    /// A big-endian `u64`.
    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.array())
    }

    /// A socket address: a kind byte (even: IPv4, 4 address bytes; odd: IPv6, 16 address
    /// bytes), then a big-endian port.
    pub fn socket_addr(&mut self) -> SocketAddr {
        let ip = if self.u8() & 1 == 0 {
            IpAddr::V4(Ipv4Addr::from(self.array::<4>()))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.array::<16>()))
        };
        SocketAddr::new(ip, self.u16())
    }
}

/// Encodes a socket address the way [`Reader::socket_addr`] reads it.
pub fn encode_socket_addr(addr: SocketAddr, out: &mut Vec<u8>) {
    match addr.ip() {
        IpAddr::V4(v4) => {
            out.push(0);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(1);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}
