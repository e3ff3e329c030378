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

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns SIGINT and SIGTERM into a request to stop ([`stop_requested`]), so that a benchmark
/// interrupted by hand or by a timeout still stops the processes it started (they are stopped
/// when their handles drop, as the load loops return). Call once, at the start of `main`.
pub fn handle_stop_signals() {
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                STOP.store(true, std::sync::atomic::Ordering::Relaxed);
            });
        });
    if spawned.is_err() {
        eprintln!("warning: cannot watch for SIGINT/SIGTERM");
    }
}

/// True once SIGINT or SIGTERM arrived (after [`handle_stop_signals`]).
pub fn stop_requested() -> bool {
    STOP.load(std::sync::atomic::Ordering::Relaxed)
}

/// Unix time in nanoseconds (CLOCK_REALTIME): what the sender stamps into each packet and what
/// the kernel's receive timestamps (`SO_TIMESTAMPNS`) are given in.
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
