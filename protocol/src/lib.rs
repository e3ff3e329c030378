//! `veil-protocol`: what the relay, the controller and the client must agree on, and nothing
//! else: the relay's wire format ([`wire`], normative text in docs/PROTOCOL.md), leg tokens and
//! the cluster key ring with its file format ([`token`]).
//!
//! No networking, no clock, no async runtime: a client links this crate to speak to a relay
//! without linking the relay's forwarding core or any gRPC stack.

pub mod token;
pub mod turn;
pub mod wire;

pub use token::{KeyFileError, KeyId, KeyRing, KeyRingError, Limits, SessionId, Ticket, Token};
