//! `veil-bench`: measures Veil's packet path and controller against fixed yardsticks.
//!
//! - [`udpgen`] offers RTP-shaped datagrams at fixed rates through a forwarder (a `veil-relay`
//!   process, coturn, or the `veil-floor` bare forwarder) and receives them in the same process,
//!   so one clock stamps both ends; [`quicgen`] does the same over QUIC legs with `veil-client`.
//! - [`cpu`] reads a process's own CPU time from `/proc`, to turn a measurement window into CPU
//!   microseconds per forwarded packet.
//! - [`turn`] is a minimal TURN client (RFC 8656: Allocate, ChannelBind, ChannelData), enough to
//!   drive coturn as a relay.
//! - [`ctlload`] drives `AllocateSession` closed-loop (throughput) and open-loop (latency).
//!
//! Everything here sends only to loopback addresses and stops by itself: every load loop is
//! bounded in time, and every process it starts is stopped by its PID.
//!
//! This crate is a measuring tool, not part of a relay or controller; nothing in the product
//! depends on it.

#![forbid(unsafe_code)]

pub mod cpu;
pub mod ctlload;
pub mod packet;
pub mod proc;
pub mod quicgen;
pub mod report;
pub mod turn;
pub mod udpgen;
pub mod veil;

/// Unix time in nanoseconds (CLOCK_REALTIME): what the sender stamps into each packet and what
/// the kernel's receive timestamps (`SO_TIMESTAMPNS`) are given in.
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
