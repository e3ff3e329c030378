//! The relay's whole packet path, UDP and QUIC: `ForwardingTable::handle_datagram`,
//! `handle_stream_bind`, `handle_path`, `handle_disconnect`, `handle_shutdown` and
//! `handle_timeout`, on two UDP workers and up to four QUIC connections (one table each, sharing a
//! bind limiter) of one `Node`, fed a fuzzer-chosen sequence of datagrams from chosen sources,
//! binds by legitimate clients, stream BINDs (channel-bound to the right or the wrong TLS session,
//! or in UDP's format), migrations to real and forged addresses, PROBE_ACKs, disconnects,
//! replays, time steps, revocations (of sessions, and of single legs: removed participants),
//! drain, eviction and shutdown, with `poll_transmit` and
//! `poll_event` drained after each.
//!
//! The input format, the model and the invariants are documented in `fuzz/src/datagram.rs`: in
//! short, no panic; no answer to a UDP source that holds no leg is longer than the datagram it
//! answers; nothing from an endpoint without a leg is ever forwarded; forwarded targets are other
//! legs of the sender's session, never the sender, never a QUIC leg whose new address has not
//! answered a PROBE; a BIND binds only over the transport its proof was made for.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    veil_fuzz::datagram::run(data);
});
