//! The sans-IO heart of `veil-relay`: first-byte classification, Veil's control messages,
//! leg tokens, return-routability cookies, the session table, rate limits and the per-worker
//! forwarding state machine.
//!
//! This crate contains no networking code and never reads the clock: every input carries `now`,
//! and every output is plain data (a [`Verdict`](relay::Verdict), a
//! [`Transmit`](relay::Transmit)) that the shell in `veil-relay` carries out with its sockets. So
//! the whole packet path is tested, fuzzed and benchmarked without sockets.

pub mod cookie;
pub mod limit;
pub mod relay;
pub mod session;
pub mod stats;
pub mod token;
pub mod wire;

pub use relay::{
    Config, Event, LegState, LegStatus, Node, Refusal, Relay, Targets, Transmit, Verdict,
};
pub use session::{ConnId, Endpoint};
pub use stats::{BindResult, DropReason, SharedStats, Stats};
pub use token::{KeyId, KeyRing, Limits, SessionId, Ticket, Token};
