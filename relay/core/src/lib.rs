//! The sans-IO heart of `veil-relay`: the forwarding table that every transport drives (UDP
//! workers and QUIC connections alike), the leg state machine, return-routability cookies, the
//! session table and rate limits. The wire format and tokens come from `veil-protocol`.
//!
//! This crate contains no networking code and never reads the clock: every input carries `now`
//! and names the [`Endpoint`] it came from, and every output is plain data (a
//! [`Verdict`](table::Verdict), a [`Transmit`](table::Transmit), an [`Event`](table::Event)) that
//! a shell in `veil-relay` carries out with its sockets. So the whole packet path, for every
//! transport, is tested, fuzzed and benchmarked without sockets.

pub mod cookie;
pub mod counters;
pub mod leg;
pub mod limit;
pub mod node;
pub mod session;
pub mod stats;
pub mod stun;
pub mod table;
pub mod turn;

pub use veil_protocol::{token, wire};

pub use counters::{Counts, LegCounters};
pub use leg::{LegState, LegStatus};
pub use node::{Config, Node, Refusal};
pub use session::{BoundLeg, ChangeKind, ConnId, Ended, Endpoint, FastPair, LegChange, Session};
pub use stats::{BindResult, DropReason, SharedStats, Stats};
pub use table::{Event, ForwardingTable, Message, Targets, Transmit, Verdict};
pub use token::{KeyId, KeyRing, Limits, SessionId, Ticket, Token};
