//! The relay's whole datagram path: `Relay::handle_datagram` and `Relay::handle_timeout` on two
//! workers of one `Node`, fed a fuzzer-chosen sequence of datagrams from chosen sources, binds by
//! legitimate clients, replays, time steps, revocations and drain, with `poll_transmit` and
//! `poll_event` drained after each.
//!
//! The input format, the model and the invariants are documented in `fuzz/src/datagram.rs`: in
//! short, no panic; no answer to a source that holds no leg is longer than the datagram it
//! answers; nothing from a source without a leg is ever forwarded; forwarded targets are other
//! legs of the sender's session, never the sender.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    veil_fuzz::datagram::run(data);
});
