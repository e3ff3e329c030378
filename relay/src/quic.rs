//! How the UDP workers hand datagrams to QUIC legs.

use veil_relay_core::ConnId;

/// Sends a datagram to a QUIC leg. Implemented by the QUIC transport; the UDP workers call it
/// when a session mixes transports.
pub trait QuicSink: Send + Sync {
    /// Queues `pkt` as a QUIC DATAGRAM on connection `conn`; false if it could not (connection
    /// gone, datagram larger than the peer accepts, or its queue full).
    fn send(&self, conn: ConnId, pkt: &[u8]) -> bool;
}

/// The sink of a relay that serves no QUIC: no QUIC leg can exist, so nothing is ever sent.
#[derive(Debug)]
pub struct NoQuic;

impl QuicSink for NoQuic {
    fn send(&self, _: ConnId, _: &[u8]) -> bool {
        false
    }
}
