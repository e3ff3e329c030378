//! The relay's UDP wire format: first-byte demultiplexing (RFC 7983) and Veil's own control
//! messages. docs/PROTOCOL.md is the normative description; this module and that page must agree.
//!
//! Control messages use first bytes 0x50–0x5F, outside every range RFC 7983 assigns (STUN 0–3,
//! ZRTP 16–19, DTLS 20–63, TURN ChannelData 64–79, RTP/RTCP 128–191), so they share the media
//! port with SRTP, SRTCP and DTLS, and leave STUN and TURN free for a later TURN front end.
//!
//! Every reply is no longer than the request it answers, so the relay cannot amplify traffic
//! towards a spoofed source.

use crate::token::{TAG_LEN, TICKET_LEN, Token};

/// Protocol version carried in byte 1 of every control message.
pub const VERSION: u8 = 1;

/// First byte of BIND (client to relay).
pub const TYPE_BIND: u8 = 0x50;
/// First byte of CHALLENGE (relay to client).
pub const TYPE_CHALLENGE: u8 = 0x51;
/// First byte of BIND_OK (relay to client).
pub const TYPE_BIND_OK: u8 = 0x52;
/// First byte of KEEPALIVE (client to relay).
pub const TYPE_KEEPALIVE: u8 = 0x53;
/// First byte of KEEPALIVE_ACK (relay to client).
pub const TYPE_KEEPALIVE_ACK: u8 = 0x54;
/// First byte of CLOSE (relay to client).
pub const TYPE_CLOSE: u8 = 0x55;
/// First byte of PROBE (relay to client, QUIC only): proves a migrated path.
pub const TYPE_PROBE: u8 = 0x56;
/// First byte of PROBE_ACK (client to relay, QUIC only): echoes a PROBE.
pub const TYPE_PROBE_ACK: u8 = 0x57;
/// First byte of ERROR (relay to client).
pub const TYPE_ERROR: u8 = 0x5F;

/// Length of a cookie.
pub const COOKIE_LEN: usize = 24;
/// Length of a BIND message.
pub const BIND_LEN: usize = 84;
/// Length of a CHALLENGE message.
pub const CHALLENGE_LEN: usize = 36;
/// Length of PROBE and PROBE_ACK messages (as long as a CHALLENGE: a header and a cookie).
pub const PROBE_LEN: usize = 36;
/// Length of a BIND_OK message.
pub const BIND_OK_LEN: usize = 16;
/// Length of KEEPALIVE, KEEPALIVE_ACK, CLOSE and ERROR messages.
pub const SHORT_LEN: usize = 12;
/// Length of the longest control message.
pub const MAX_CONTROL_LEN: usize = BIND_LEN;

/// Largest datagram a relay forwards: media over UDP stays under the path MTU; anything larger
/// is dropped as oversized.
pub const MAX_DATAGRAM: usize = 1500;

/// Shortest RTP/RTCP packet: the fixed RTP header (RTCP's is 8 bytes, but the relay need not
/// tell them apart).
pub const MIN_RTP_LEN: usize = 12;
/// Shortest DTLS record: the record header.
pub const MIN_DTLS_LEN: usize = 13;

/// The bytes a BIND's tag covers: everything before the tag.
const BIND_SIGNED_LEN: usize = BIND_LEN - TAG_LEN;
const FLAG_COOKIE: u16 = 1;
const FLAG_CHANNEL: u16 = 2;

/// The TLS exporter label (RFC 8446 §7.5, RFC 5705) of a channel-bound BIND over QUIC, used with
/// an empty context.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-veil-bind";
/// Length of the exported value a channel-bound BIND's tag covers.
pub const EXPORTER_LEN: usize = 32;
/// ALPN protocol id of Veil over QUIC. Version 2: the BIND on a QUIC connection is bound to
/// that connection's TLS session (docs/PROTOCOL.md §5).
pub const QUIC_ALPN: &[u8] = b"veil/2";

/// What a datagram is, judged by its first byte (RFC 7983).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// SRTP or SRTCP (first byte 128–191).
    Rtp,
    /// DTLS (first byte 20–63).
    Dtls,
    /// A Veil control message (first byte 0x50–0x5F).
    Control,
    /// Anything else: empty, STUN, ZRTP, TURN ChannelData, or unassigned.
    Other,
}

/// Classifies a datagram by its first byte.
#[inline]
pub fn classify(pkt: &[u8]) -> Class {
    match pkt.first() {
        Some(128..=191) => Class::Rtp,
        Some(20..=63) => Class::Dtls,
        Some(0x50..=0x5F) => Class::Control,
        _ => Class::Other,
    }
}

/// Status codes carried by ERROR and CLOSE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The ticket or the tag did not verify (forged, altered, or an unknown key).
    Unauthorized = 2,
    /// The ticket has expired.
    Expired = 3,
    /// The session was released or has ended.
    SessionClosed = 4,
    /// KEEPALIVE from an address that holds no leg: bind again.
    NotBound = 5,
    /// The relay holds as many legs as it may: try the backup relay.
    RelayFull = 6,
    /// Too many bind attempts from this address: back off.
    RateLimited = 7,
    /// The relay is draining and takes no new legs: use the backup relay.
    Draining = 8,
}

impl ErrorCode {
    /// Decodes a code; unknown codes are `None`.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            2 => Self::Unauthorized,
            3 => Self::Expired,
            4 => Self::SessionClosed,
            5 => Self::NotBound,
            6 => Self::RelayFull,
            7 => Self::RateLimited,
            8 => Self::Draining,
            _ => return None,
        })
    }
}

/// Why a control message could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Wrong length for its type.
    #[error("{len} bytes is the wrong length for control type {ty:#04x}")]
    Length {
        /// The message type.
        ty: u8,
        /// Its length.
        len: usize,
    },
    /// Version byte other than [`VERSION`].
    #[error("unsupported control version {0}")]
    Version(u8),
    /// First byte in the control range but not an assigned type.
    #[error("unknown control type {0:#04x}")]
    Type(u8),
    /// Nonzero reserved field or undefined flag.
    #[error("reserved bits set")]
    Reserved,
}

/// A control message from a client, borrowed from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    /// Asks to bind a leg; see [`Bind`].
    Bind(Bind<'a>),
    /// Keeps a bound leg alive.
    Keepalive {
        /// Echoed in the answer.
        txn: [u8; 8],
    },
    /// Echoes a PROBE: the client receives at the address its QUIC connection moved to.
    ProbeAck {
        /// The PROBE's transaction id.
        txn: [u8; 8],
        /// The PROBE's cookie.
        cookie: &'a [u8],
    },
}

/// A parsed BIND.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    /// Transaction id, echoed in the answer.
    pub txn: [u8; 8],
    /// The encoded ticket.
    pub ticket: &'a [u8],
    /// The cookie from a CHALLENGE, if this is the second round (UDP).
    pub cookie: Option<&'a [u8]>,
    /// True if the tag also covers the TLS exporter value of the connection the BIND was sent
    /// on (QUIC): see [`bind_channel`].
    pub channel_bound: bool,
    /// The bytes the tag covers.
    pub signed: &'a [u8],
    /// The tag.
    pub tag: &'a [u8],
}

fn header(pkt: &[u8], expected_len: usize) -> Result<u16, ParseError> {
    if pkt.len() != expected_len {
        return Err(ParseError::Length {
            ty: pkt.first().copied().unwrap_or(0),
            len: pkt.len(),
        });
    }
    if pkt[1] != VERSION {
        return Err(ParseError::Version(pkt[1]));
    }
    Ok(u16::from_be_bytes([pkt[2], pkt[3]]))
}

fn txn(pkt: &[u8]) -> [u8; 8] {
    pkt[4..12].try_into().expect("callers checked the length")
}

/// Parses a control message sent by a client. `pkt` must classify as [`Class::Control`].
pub fn parse_client(pkt: &[u8]) -> Result<ClientMessage<'_>, ParseError> {
    let ty = pkt.first().copied().unwrap_or(0);
    match ty {
        TYPE_BIND => {
            let flags = header(pkt, BIND_LEN)?;
            // One proof per BIND: a cookie (UDP) or the channel binding (QUIC), never both.
            if flags & !(FLAG_COOKIE | FLAG_CHANNEL) != 0 || flags == FLAG_COOKIE | FLAG_CHANNEL {
                return Err(ParseError::Reserved);
            }
            let cookie = &pkt[12 + TICKET_LEN..12 + TICKET_LEN + COOKIE_LEN];
            let has_cookie = flags & FLAG_COOKIE != 0;
            if !has_cookie && cookie.iter().any(|&b| b != 0) {
                return Err(ParseError::Reserved);
            }
            Ok(ClientMessage::Bind(Bind {
                txn: txn(pkt),
                ticket: &pkt[12..12 + TICKET_LEN],
                cookie: has_cookie.then_some(cookie),
                channel_bound: flags & FLAG_CHANNEL != 0,
                signed: &pkt[..BIND_SIGNED_LEN],
                tag: &pkt[BIND_SIGNED_LEN..],
            }))
        }
        TYPE_KEEPALIVE => {
            if header(pkt, SHORT_LEN)? != 0 {
                return Err(ParseError::Reserved);
            }
            Ok(ClientMessage::Keepalive { txn: txn(pkt) })
        }
        TYPE_PROBE_ACK => {
            if header(pkt, PROBE_LEN)? != 0 {
                return Err(ParseError::Reserved);
            }
            Ok(ClientMessage::ProbeAck {
                txn: txn(pkt),
                cookie: &pkt[12..12 + COOKIE_LEN],
            })
        }
        TYPE_CHALLENGE | TYPE_BIND_OK | TYPE_KEEPALIVE_ACK | TYPE_CLOSE | TYPE_PROBE
        | TYPE_ERROR => {
            // A relay-to-client message sent to the relay: never valid input.
            Err(ParseError::Type(ty))
        }
        _ => Err(ParseError::Type(ty)),
    }
}

/// A control message from a relay, as a client parses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMessage<'a> {
    /// Echo this cookie in a second BIND.
    Challenge {
        /// The BIND's transaction id.
        txn: [u8; 8],
        /// The cookie to echo.
        cookie: &'a [u8],
    },
    /// The leg is bound.
    BindOk {
        /// The BIND's transaction id.
        txn: [u8; 8],
        /// The relay expires the leg after this many seconds without packets.
        idle_timeout_secs: u16,
    },
    /// Answer to KEEPALIVE.
    KeepaliveAck {
        /// The KEEPALIVE's transaction id.
        txn: [u8; 8],
    },
    /// The relay saw the QUIC connection move to a new address: echo this in a PROBE_ACK.
    Probe {
        /// Echoed in the PROBE_ACK.
        txn: [u8; 8],
        /// Echoed in the PROBE_ACK.
        cookie: &'a [u8],
    },
    /// The session ended on this relay.
    Close {
        /// Why.
        code: u16,
        /// The session, so that a client can tell a genuine CLOSE from a spoofed one.
        session: u64,
    },
    /// A request failed.
    Error {
        /// The request's transaction id.
        txn: [u8; 8],
        /// Why ([`ErrorCode`]; unknown codes are passed through).
        code: u16,
    },
}

/// Parses a control message sent by a relay.
///
/// As strict as [`parse_client`]: a message with a reserved field set is refused, as
/// docs/PROTOCOL.md requires, so that each message has exactly one encoding and a later version
/// can give those bits a meaning without old clients misreading them. (The `wire` fuzz target
/// found CHALLENGE, BIND_OK and KEEPALIVE_ACK accepted with their reserved fields set.)
pub fn parse_relay(pkt: &[u8]) -> Result<RelayMessage<'_>, ParseError> {
    let ty = pkt.first().copied().unwrap_or(0);
    match ty {
        TYPE_CHALLENGE => {
            if header(pkt, CHALLENGE_LEN)? != 0 {
                return Err(ParseError::Reserved);
            }
            Ok(RelayMessage::Challenge {
                txn: txn(pkt),
                cookie: &pkt[12..12 + COOKIE_LEN],
            })
        }
        TYPE_BIND_OK => {
            if header(pkt, BIND_OK_LEN)? != 0 || pkt[14..16] != [0, 0] {
                return Err(ParseError::Reserved);
            }
            Ok(RelayMessage::BindOk {
                txn: txn(pkt),
                idle_timeout_secs: u16::from_be_bytes([pkt[12], pkt[13]]),
            })
        }
        TYPE_KEEPALIVE_ACK => {
            if header(pkt, SHORT_LEN)? != 0 {
                return Err(ParseError::Reserved);
            }
            Ok(RelayMessage::KeepaliveAck { txn: txn(pkt) })
        }
        TYPE_PROBE => {
            if header(pkt, PROBE_LEN)? != 0 {
                return Err(ParseError::Reserved);
            }
            Ok(RelayMessage::Probe {
                txn: txn(pkt),
                cookie: &pkt[12..12 + COOKIE_LEN],
            })
        }
        TYPE_CLOSE => {
            let code = header(pkt, SHORT_LEN)?;
            Ok(RelayMessage::Close {
                code,
                session: u64::from_be_bytes(txn(pkt)),
            })
        }
        TYPE_ERROR => {
            let code = header(pkt, SHORT_LEN)?;
            Ok(RelayMessage::Error {
                txn: txn(pkt),
                code,
            })
        }
        _ => Err(ParseError::Type(ty)),
    }
}

/// A control message the relay sends, in a fixed buffer (no allocation).
#[derive(Clone, Copy)]
pub struct Encoded {
    buf: [u8; MAX_CONTROL_LEN],
    len: u8,
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoded")
            .field("type", &self.buf[0])
            .field("len", &self.len)
            .finish()
    }
}

impl Encoded {
    fn new(ty: u8, word: u16, txn: [u8; 8], len: usize) -> Self {
        let mut buf = [0u8; MAX_CONTROL_LEN];
        buf[0] = ty;
        buf[1] = VERSION;
        buf[2..4].copy_from_slice(&word.to_be_bytes());
        buf[4..12].copy_from_slice(&txn);
        Self {
            buf,
            len: len as u8,
        }
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

/// Encodes a CHALLENGE.
pub fn challenge(txn: [u8; 8], cookie: &[u8; COOKIE_LEN]) -> Encoded {
    let mut m = Encoded::new(TYPE_CHALLENGE, 0, txn, CHALLENGE_LEN);
    m.buf[12..12 + COOKIE_LEN].copy_from_slice(cookie);
    m
}

/// Encodes a BIND_OK.
pub fn bind_ok(txn: [u8; 8], idle_timeout_secs: u16) -> Encoded {
    let mut m = Encoded::new(TYPE_BIND_OK, 0, txn, BIND_OK_LEN);
    m.buf[12..14].copy_from_slice(&idle_timeout_secs.to_be_bytes());
    m
}

/// Encodes a PROBE.
pub fn probe(txn: [u8; 8], cookie: &[u8; COOKIE_LEN]) -> Encoded {
    let mut m = Encoded::new(TYPE_PROBE, 0, txn, PROBE_LEN);
    m.buf[12..12 + COOKIE_LEN].copy_from_slice(cookie);
    m
}

/// Encodes a PROBE_ACK (client side): the PROBE's bytes with its type changed.
pub fn probe_ack(txn: [u8; 8], cookie: &[u8]) -> [u8; PROBE_LEN] {
    let mut b = [0u8; PROBE_LEN];
    b[0] = TYPE_PROBE_ACK;
    b[1] = VERSION;
    b[4..12].copy_from_slice(&txn);
    let n = cookie.len().min(COOKIE_LEN);
    b[12..12 + n].copy_from_slice(&cookie[..n]);
    b
}

/// Encodes a KEEPALIVE_ACK.
pub fn keepalive_ack(txn: [u8; 8]) -> Encoded {
    Encoded::new(TYPE_KEEPALIVE_ACK, 0, txn, SHORT_LEN)
}

/// Encodes a CLOSE for `session`.
pub fn close(code: ErrorCode, session: u64) -> Encoded {
    Encoded::new(TYPE_CLOSE, code as u16, session.to_be_bytes(), SHORT_LEN)
}

/// Encodes an ERROR.
pub fn error(txn: [u8; 8], code: ErrorCode) -> Encoded {
    Encoded::new(TYPE_ERROR, code as u16, txn, SHORT_LEN)
}

/// Encodes a BIND for `token` (client side). `cookie` is the one from a CHALLENGE, if any.
pub fn bind(token: &Token, txn: [u8; 8], cookie: Option<&[u8; COOKIE_LEN]>) -> [u8; BIND_LEN] {
    let mut b = [0u8; BIND_LEN];
    b[0] = TYPE_BIND;
    b[1] = VERSION;
    let flags = if cookie.is_some() { FLAG_COOKIE } else { 0 };
    b[2..4].copy_from_slice(&flags.to_be_bytes());
    b[4..12].copy_from_slice(&txn);
    b[12..12 + TICKET_LEN].copy_from_slice(token.ticket_bytes());
    if let Some(c) = cookie {
        b[12 + TICKET_LEN..12 + TICKET_LEN + COOKIE_LEN].copy_from_slice(c);
    }
    let tag = token.leg_key().tag(&b[..BIND_SIGNED_LEN]);
    b[BIND_SIGNED_LEN..].copy_from_slice(&tag);
    b
}

/// Encodes a channel-bound BIND for `token` (client side, over QUIC): its tag covers the message
/// and `exporter`, the connection's TLS exporter value for [`EXPORTER_LABEL`] with an empty
/// context ([`EXPORTER_LEN`] bytes). Only that TLS session yields that value, so the BIND binds
/// nothing on any other connection or relay, and a UDP BIND (whose tag covers no exporter) binds
/// nothing over QUIC.
pub fn bind_channel(token: &Token, txn: [u8; 8], exporter: &[u8; EXPORTER_LEN]) -> [u8; BIND_LEN] {
    let mut b = [0u8; BIND_LEN];
    b[0] = TYPE_BIND;
    b[1] = VERSION;
    b[2..4].copy_from_slice(&FLAG_CHANNEL.to_be_bytes());
    b[4..12].copy_from_slice(&txn);
    b[12..12 + TICKET_LEN].copy_from_slice(token.ticket_bytes());
    let tag = token
        .leg_key()
        .tag_parts(&[&b[..BIND_SIGNED_LEN], exporter]);
    b[BIND_SIGNED_LEN..].copy_from_slice(&tag);
    b
}

/// Encodes a KEEPALIVE (client side).
pub fn keepalive(txn: [u8; 8]) -> [u8; SHORT_LEN] {
    let mut b = [0u8; SHORT_LEN];
    b[0] = TYPE_KEEPALIVE;
    b[1] = VERSION;
    b[4..12].copy_from_slice(&txn);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{KeyId, KeyRing, Limits, SessionId, Ticket};

    fn token() -> Token {
        KeyRing::from_keys(&[(7, [7; 32])], 7).mint(Ticket {
            key_id: KeyId(7),
            session: SessionId(42),
            leg: 0,
            legs: 2,
            expires_unix_ms: u64::MAX,
            limits: Limits::default(),
        })
    }

    #[test]
    fn classification_follows_rfc7983() {
        assert_eq!(classify(&[]), Class::Other);
        for b in 0..=255u8 {
            let expected = match b {
                128..=191 => Class::Rtp,
                20..=63 => Class::Dtls,
                0x50..=0x5F => Class::Control,
                _ => Class::Other,
            };
            assert_eq!(classify(&[b]), expected, "first byte {b}");
        }
        // STUN, ZRTP and TURN ChannelData are not ours.
        for b in [0, 1, 2, 3, 16, 19, 64, 79] {
            assert_eq!(classify(&[b]), Class::Other);
        }
    }

    #[test]
    fn bind_round_trips_with_and_without_cookie() {
        let t = token();
        let cookie = [9u8; COOKIE_LEN];
        for c in [None, Some(&cookie)] {
            let pkt = bind(&t, [1; 8], c);
            let ClientMessage::Bind(b) = parse_client(&pkt).unwrap() else {
                panic!("not a bind")
            };
            assert_eq!(b.txn, [1; 8]);
            assert_eq!(b.ticket, t.ticket_bytes());
            assert_eq!(b.cookie, c.map(|c| &c[..]));
            assert!(t.leg_key().verify(b.signed, b.tag));
        }
    }

    #[test]
    fn a_channel_bound_bind_covers_the_exporter_value() {
        let t = token();
        let (x, y) = ([1u8; EXPORTER_LEN], [2u8; EXPORTER_LEN]);
        let pkt = bind_channel(&t, [7; 8], &x);
        let ClientMessage::Bind(b) = parse_client(&pkt).unwrap() else {
            panic!("not a bind")
        };
        assert!(b.channel_bound && b.cookie.is_none());
        assert!(t.leg_key().verify_parts(&[b.signed, &x], b.tag));
        assert!(!t.leg_key().verify_parts(&[b.signed, &y], b.tag));
        assert!(!t.leg_key().verify(b.signed, b.tag));
        // And a UDP BIND's tag covers no exporter value.
        let udp = bind(&t, [7; 8], None);
        let ClientMessage::Bind(u) = parse_client(&udp).unwrap() else {
            panic!("not a bind")
        };
        assert!(!u.channel_bound);
        assert!(!t.leg_key().verify_parts(&[u.signed, &x], u.tag));
    }

    #[test]
    fn probes_round_trip() {
        let cookie = [5u8; COOKIE_LEN];
        let p = probe([3; 8], &cookie);
        assert_eq!(p.as_bytes().len(), PROBE_LEN);
        let Ok(RelayMessage::Probe { txn, cookie: c }) = parse_relay(p.as_bytes()) else {
            panic!("not a probe")
        };
        let ack = probe_ack(txn, c);
        assert_eq!(
            parse_client(&ack),
            Ok(ClientMessage::ProbeAck {
                txn: [3; 8],
                cookie: &cookie
            })
        );
        assert_eq!(
            ack.len(),
            p.as_bytes().len(),
            "an echo is no larger than the probe"
        );
    }

    #[test]
    fn malformed_client_messages_are_refused() {
        let pkt = bind(&token(), [1; 8], None);
        assert!(matches!(
            parse_client(&pkt[..83]),
            Err(ParseError::Length { .. })
        ));
        let mut long = pkt.to_vec();
        long.push(0);
        assert!(matches!(
            parse_client(&long),
            Err(ParseError::Length { .. })
        ));
        let mut v = pkt;
        v[1] = 2;
        assert_eq!(parse_client(&v), Err(ParseError::Version(2)));
        let mut f = pkt;
        f[3] = 4;
        assert_eq!(parse_client(&f), Err(ParseError::Reserved));
        // A cookie and the channel binding together: one proof per BIND.
        let mut both = bind(&token(), [1; 8], Some(&[9; COOKIE_LEN]));
        both[3] = 3;
        assert_eq!(parse_client(&both), Err(ParseError::Reserved));
        let mut junk_cookie = pkt;
        junk_cookie[50] = 1;
        assert_eq!(parse_client(&junk_cookie), Err(ParseError::Reserved));
        let mut ka = keepalive([3; 8]);
        assert_eq!(
            parse_client(&ka),
            Ok(ClientMessage::Keepalive { txn: [3; 8] })
        );
        ka[2] = 1;
        assert_eq!(parse_client(&ka), Err(ParseError::Reserved));
        assert_eq!(parse_client(&[0x5A; 12]), Err(ParseError::Type(0x5A)));
        assert_eq!(
            parse_client(error([0; 8], ErrorCode::NotBound).as_bytes()),
            Err(ParseError::Type(TYPE_ERROR))
        );
    }

    /// Regression (found by the `wire` fuzz target): `parse_relay` ignored the reserved fields of
    /// CHALLENGE, BIND_OK and KEEPALIVE_ACK, which docs/PROTOCOL.md says make a message invalid.
    #[test]
    fn relay_messages_with_reserved_bits_set_are_refused() {
        let cookie = [5u8; COOKIE_LEN];
        let msgs = [
            challenge([1; 8], &cookie),
            bind_ok([2; 8], 30),
            keepalive_ack([3; 8]),
        ];
        for enc in msgs {
            let good = enc.as_bytes();
            assert!(parse_relay(good).is_ok());
            for (i, bit) in [(2, 0x80), (3, 0x01)] {
                let mut bad = good.to_vec();
                bad[i] |= bit;
                assert_eq!(parse_relay(&bad), Err(ParseError::Reserved), "{bad:02x?}");
            }
        }
        for i in [14, 15] {
            let mut bad = bind_ok([2; 8], 30).as_bytes().to_vec();
            bad[i] = 1;
            assert_eq!(parse_relay(&bad), Err(ParseError::Reserved));
        }
        // CLOSE and ERROR carry their code there: not reserved.
        let mut close_code = close(ErrorCode::Expired, 7).as_bytes().to_vec();
        close_code[2] = 0xff;
        assert!(matches!(
            parse_relay(&close_code),
            Ok(RelayMessage::Close { code: 0xff03, .. })
        ));
    }

    #[test]
    fn relay_messages_round_trip_and_never_exceed_a_bind() {
        let cookie = [5u8; COOKIE_LEN];
        let msgs = [
            (
                challenge([1; 8], &cookie),
                RelayMessage::Challenge {
                    txn: [1; 8],
                    cookie: &cookie,
                },
            ),
            (
                bind_ok([2; 8], 30),
                RelayMessage::BindOk {
                    txn: [2; 8],
                    idle_timeout_secs: 30,
                },
            ),
            (
                keepalive_ack([3; 8]),
                RelayMessage::KeepaliveAck { txn: [3; 8] },
            ),
            (
                close(ErrorCode::SessionClosed, 77),
                RelayMessage::Close {
                    code: 4,
                    session: 77,
                },
            ),
            (
                error([4; 8], ErrorCode::Expired),
                RelayMessage::Error {
                    txn: [4; 8],
                    code: 3,
                },
            ),
        ];
        for (enc, expected) in msgs {
            assert_eq!(parse_relay(enc.as_bytes()), Ok(expected));
            assert!(enc.as_bytes().len() <= BIND_LEN);
            assert_eq!(classify(enc.as_bytes()), Class::Control);
        }
        // Answers to a KEEPALIVE are no longer than it.
        assert_eq!(keepalive_ack([0; 8]).as_bytes().len(), SHORT_LEN);
        assert_eq!(
            error([0; 8], ErrorCode::NotBound).as_bytes().len(),
            SHORT_LEN
        );
    }
}
