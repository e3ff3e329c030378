//! Writes the seed corpus of every fuzz target to `fuzz/corpus/<target>/seed-*`.
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --features controller --example gen_corpus
//! ```
//!
//! Run it again after changing a wire format or the `datagram` scenario's input encoding, and
//! commit the result. It only (over)writes `seed-*` files: inputs the fuzzer found and that were
//! merged into the corpus by hand stay.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
use veil_fuzz::datagram::{self, Op};
use veil_proto::v1 as pb;
use veil_relay_core::DropReason;
use veil_relay_core::cookie::Cookies;
use veil_relay_core::token::{KeyId, KeyRing, Limits, SessionId, Ticket};
use veil_relay_core::wire::{self, ErrorCode};

struct Corpus {
    root: PathBuf,
    written: usize,
}

impl Corpus {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        fs::create_dir_all(&dir).expect("create corpus directory");
        fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
        self.written += 1;
    }
}

fn ticket(session: u64, leg: u8, legs: u8, limits: Limits) -> Ticket {
    Ticket {
        key_id: KeyId(0),
        session: SessionId(session),
        leg,
        legs,
        expires_unix_ms: datagram::T0_UNIX_MS + 3_600_000,
        limits,
    }
}

fn rtp(len: usize, pt: u8) -> Vec<u8> {
    // Version 2, payload type, sequence 1, timestamp 0, SSRC 0xdeadbeef: cut to `len`.
    let mut p = vec![0x80, pt, 0, 1, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef];
    p.resize(len, 0);
    p
}

fn dtls_client_hello() -> Vec<u8> {
    // Record header: handshake (22), DTLS 1.2 (0xfefd), epoch 0, sequence 0, length.
    let mut p = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 40];
    p.extend_from_slice(&[1; 40]);
    p
}

fn stun_binding_request() -> Vec<u8> {
    let mut p = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    p.extend_from_slice(&[7; 12]);
    p
}

fn wire_seeds(c: &mut Corpus) {
    let ring = veil_fuzz::key_ring();
    let token = ring.mint(ticket(7, 0, 2, Limits::default()));
    let cookie = [0xc0; wire::COOKIE_LEN];
    let t = "wire";
    c.put(t, "bind", &wire::bind(&token, [1; 8], None));
    c.put(t, "bind-cookie", &wire::bind(&token, [2; 8], Some(&cookie)));
    c.put(
        t,
        "bind-channel",
        &wire::bind_channel(&token, [5; 8], &[0x5e; wire::EXPORTER_LEN]),
    );
    c.put(t, "keepalive", &wire::keepalive([3; 8]));
    c.put(t, "probe-ack", &wire::probe_ack([6; 8], &cookie));
    c.put(t, "probe", wire::probe([6; 8], &cookie).as_bytes());
    c.put(t, "challenge", wire::challenge([1; 8], &cookie).as_bytes());
    c.put(t, "bind-ok", wire::bind_ok([2; 8], 30).as_bytes());
    c.put(t, "keepalive-ack", wire::keepalive_ack([3; 8]).as_bytes());
    for code in [
        ErrorCode::SessionClosed,
        ErrorCode::Expired,
        ErrorCode::Draining,
    ] {
        c.put(
            t,
            &format!("close-{}", code as u16),
            wire::close(code, 7).as_bytes(),
        );
    }
    for code in [
        ErrorCode::Unauthorized,
        ErrorCode::Expired,
        ErrorCode::SessionClosed,
        ErrorCode::NotBound,
        ErrorCode::RelayFull,
        ErrorCode::RateLimited,
        ErrorCode::Draining,
    ] {
        c.put(
            t,
            &format!("error-{}", code as u16),
            wire::error([4; 8], code).as_bytes(),
        );
    }
    c.put(t, "rtp", &rtp(172, 111));
    c.put(t, "rtcp", &rtp(40, 200));
    c.put(t, "dtls", &dtls_client_hello());
    c.put(t, "stun", &stun_binding_request());
}

fn token_seeds(c: &mut Corpus) {
    let ring = veil_fuzz::key_ring();
    let limited = Limits {
        max_pps: 500,
        max_kbps: 2_000,
    };
    let minted = [
        (
            "two-legs",
            ring.mint(ticket(0x0123_4567_89ab_cdef, 1, 2, limited)),
        ),
        (
            "sixteen-legs",
            ring.mint(ticket(42, 15, 16, Limits::default())),
        ),
        (
            "old-key",
            KeyRing::from_keys(&[(1, [1; 32])], 1).mint(ticket(7, 0, 3, Limits::default())),
        ),
        (
            "unknown-key",
            KeyRing::from_keys(&[(9, [9; 32])], 9).mint(ticket(7, 0, 3, Limits::default())),
        ),
    ];
    for (name, token) in &minted {
        c.put("token", name, &token.to_bytes());
        c.put("ticket", name, token.ticket_bytes());
    }
    let mut single = ticket(1, 0, 1, Limits::default());
    single.expires_unix_ms = u64::MAX;
    c.put("ticket", "one-leg-forever", &single.encode());
}

fn key_ring_seeds(c: &mut Corpus) {
    let k = |b: u8| hex(&[b; 32]);
    let t = "key_ring";
    c.put(t, "one-key", format!("1 {} signing\n", k(0x11)).as_bytes());
    c.put(
        t,
        "rotation",
        format!(
            "# Veil cluster key ring: <key-id> <hex-secret> [signing]\n\
             # old key, kept until its tokens expire\n\
             1 {}\n\
             \n\
             2 {} signing\n\
             65535 {}{}\n",
            k(0x11),
            k(0x22),
            k(0x33),
            k(0x44)
        )
        .as_bytes(),
    );
    c.put(
        t,
        "rendered",
        veil_fuzz::key_ring().to_file_format().as_bytes(),
    );
    c.put(
        t,
        "crlf-tabs",
        format!("1\t{}\tsigning\r\n", k(0xab)).as_bytes(),
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn cookie_seeds(c: &mut Corpus) {
    let cookies = Cookies::new(*veil_fuzz::COOKIE_SECRET, Duration::from_millis(10_000));
    let ticket = veil_fuzz::key_ring()
        .mint(ticket(7, 0, 2, Limits::default()))
        .ticket_bytes()
        .to_vec();
    let cases: [(&str, u64, u64, &str); 4] = [
        ("v4-fresh", 5_000, 5_000, "127.0.0.2:4000"),
        ("v4-old", 15_000, 5_000, "127.0.0.2:4000"),
        ("v6", 1, 0, "[2001:db8::1]:443"),
        ("mapped", 10_000, 0, "[::ffff:127.0.0.2]:4000"),
    ];
    for (name, now_ms, issued, addr) in cases {
        let addr: SocketAddr = addr.parse().expect("valid address");
        let mut input = Vec::new();
        input.extend_from_slice(&now_ms.to_be_bytes());
        input.extend_from_slice(&10_000u32.to_be_bytes());
        veil_fuzz::encode_socket_addr(addr, &mut input);
        input.push(ticket.len() as u8);
        input.extend_from_slice(&ticket);
        input.extend_from_slice(&cookies.mint(issued, addr, &ticket));
        c.put("cookie", name, &input);
    }
}

fn datagram_seeds(c: &mut Corpus) {
    use Op::*;
    // Source indices (see `datagram::source`): 0, 1 hold session 7 legs 0 and 1; 2 holds
    // session 8 leg 0 (rate limited); 3 and 5 are free; 4 is 0 after a NAT rebinding; 6 is an
    // attacker; 9 is 0 in IPv4-mapped IPv6 form.
    let media = |src: u8, kind: u8, len: u16| Media { src, kind, len };
    let raw = |src: u8, bytes: &[u8]| Datagram {
        src,
        bytes: bytes.to_vec(),
    };
    let ring = veil_fuzz::key_ring();
    let tokens = datagram::tokens();
    // QUIC: connection slots 0-3; `quic_media(conn, kind, len)` kinds 0-3 as `media`, 4: a
    // PROBE_ACK of the newest PROBE the client received, 5: of another connection's, 6 and 7: a
    // channel-bound and a UDP BIND (for token `len`) as datagrams. `StreamBind` kinds: 0
    // genuine, 1 another TLS session's exporter, 2 UDP BIND, 3 UDP BIND with a cookie.
    let quic_media = |conn: u8, kind: u8, len: u16| QuicMedia { conn, kind, len };
    let connect_bind = |conn: u8, src: u8, token: u8| {
        [
            Connect { conn, src },
            StreamBind {
                conn,
                token,
                kind: 0,
            },
        ]
    };
    let migrate = |conn: u8, src: u8, spoofed: bool| Migrate { conn, src, spoofed };
    let scenarios: Vec<(&str, Vec<Op>)> = vec![
        ("setup-only", vec![]),
        (
            "call",
            vec![
                media(0, 0, 172),
                media(1, 0, 172),
                media(0, 1, 40),
                media(1, 2, 100),
                Advance { ms: 20 },
                media(0, 0, 1200),
            ],
        ),
        (
            "third-leg",
            vec![
                Bind { token: 2, src: 3 },
                media(3, 0, 200),
                media(0, 0, 200),
                Advance { ms: 100 },
                media(1, 2, 60),
            ],
        ),
        ("extend-session", {
            // Session 9's tokens expire 20 s after the start; it is extended by 100 s. Its
            // legs keep alive (the harness's idle timeout is 5 s) past the 20 s.
            let mut ops = vec![
                Bind { token: 5, src: 3 },
                Bind { token: 6, src: 4 },
                media(3, 0, 200),
                Extend {
                    session: 2,
                    secs: 100,
                },
            ];
            for _ in 0..6 {
                ops.extend([Advance { ms: 4_000 }, media(3, 0, 200), media(4, 3, 0)]);
            }
            ops.extend([
                // Past the tokens' expiry: still forwarded both ways.
                media(4, 0, 200),
                Tick,
                // The same token binds again from elsewhere; a removed leg stays removed.
                Bind { token: 5, src: 6 },
                media(6, 0, 200),
                RevokeLeg { session: 2, leg: 1 },
                Advance { ms: 1_000 },
                Tick,
                Bind { token: 6, src: 7 },
                media(6, 0, 200),
            ]);
            ops
        }),
        (
            "remove-participant",
            vec![
                Bind { token: 2, src: 3 },
                media(3, 0, 200),
                // Leg 1 of session 7 (at source 1) is removed; the call goes on.
                RevokeLeg { session: 0, leg: 1 },
                media(1, 0, 200),
                media(1, 3, 0),
                media(0, 0, 200),
                media(3, 0, 200),
                // Its token binds nowhere again, from anywhere.
                Bind { token: 1, src: 5 },
                QuicMedia {
                    conn: 0,
                    kind: 0,
                    len: 0,
                },
                Connect { conn: 1, src: 5 },
                StreamBind {
                    conn: 1,
                    token: 1,
                    kind: 0,
                },
                Advance { ms: 300 },
                media(0, 3, 0),
                Tick,
            ],
        ),
        (
            "nat-rebinding",
            vec![
                media(0, 0, 100),
                Bind { token: 0, src: 4 },
                media(4, 0, 100),
                media(0, 0, 100),
                media(1, 0, 100),
                Advance { ms: 300 },
                media(0, 0, 100),
            ],
        ),
        (
            "keepalives-and-idle",
            vec![
                media(0, 3, 0),
                media(6, 3, 0),
                Advance { ms: 3_000 },
                media(0, 3, 0),
                Advance { ms: 3_000 },
                media(0, 0, 100),
                media(1, 3, 0),
                Advance { ms: 6_000 },
                media(1, 3, 0),
            ],
        ),
        (
            "replayed-binds",
            vec![
                Bind { token: 4, src: 5 },
                Replay { entry: 0, src: 6 },
                Replay { entry: 1, src: 6 },
                Replay { entry: 0, src: 5 },
                Replay { entry: 0, src: 9 },
                media(6, 0, 100),
                Advance { ms: 11_000 },
                Replay { entry: 0, src: 5 },
            ],
        ),
        (
            "release",
            vec![
                Revoke { session: 0 },
                media(0, 0, 100),
                media(1, 3, 0),
                Advance { ms: 300 },
                Bind { token: 0, src: 0 },
                Tick,
            ],
        ),
        (
            // Session 9's tokens expire at 20 s; keepalives keep its legs from going idle.
            "expiry",
            [Bind { token: 5, src: 3 }, Bind { token: 6, src: 5 }]
                .into_iter()
                .chain((0..4).flat_map(|_| [Advance { ms: 4_000 }, media(3, 3, 0), media(5, 3, 0)]))
                .chain([
                    Advance { ms: 3_900 },
                    media(5, 0, 100),
                    Advance { ms: 200 },
                    media(3, 0, 100),
                    Advance { ms: 300 },
                    media(5, 0, 100),
                    Bind { token: 5, src: 3 },
                    Revoke { session: 2 },
                    Tick,
                ])
                .collect(),
        ),
        (
            "rate-limit",
            std::iter::once(Bind { token: 4, src: 3 })
                .chain((0..80).flat_map(|_| [media(2, 0, 700), Advance { ms: 5 }]))
                .collect(),
        ),
        (
            // Three legs are bound at the start; the relay takes eight.
            "full-and-draining",
            vec![
                Bind { token: 2, src: 3 },
                Bind { token: 4, src: 5 },
                Drain { on: true },
                Bind { token: 5, src: 7 },
                Bind { token: 4, src: 8 },
                Drain { on: false },
                Bind { token: 5, src: 7 },
                Bind { token: 6, src: 4 },
                Bind { token: 7, src: 10 },
                Bind { token: 8, src: 11 },
                Revoke { session: 2 },
                Bind { token: 5, src: 7 },
                Bind { token: 8, src: 11 },
                media(10, 0, 100),
            ],
        ),
        (
            "bad-tokens",
            vec![
                Bind { token: 9, src: 3 },
                Bind { token: 10, src: 3 },
                Bind { token: 11, src: 6 },
                media(3, 0, 100),
            ],
        ),
        (
            "one-address-one-leg",
            vec![
                Bind { token: 4, src: 0 },
                media(0, 0, 100),
                media(1, 0, 100),
                Bind { token: 1, src: 0 },
                media(0, 0, 100),
            ],
        ),
        (
            "raw",
            vec![
                raw(6, &wire::keepalive([9; 8])),
                raw(6, &wire::bind(&tokens[0], [9; 8], None)),
                raw(
                    6,
                    &wire::bind(&tokens[0], [9; 8], Some(&[0; wire::COOKIE_LEN])),
                ),
                raw(6, &stun_binding_request()),
                raw(6, &rtp(100, 111)),
                raw(0, &rtp(100, 111)),
                raw(1, &dtls_client_hello()),
                raw(0, &rtp(11, 111)),
                raw(0, &[0x5a; 12]),
                raw(
                    0,
                    wire::challenge([1; 8], &[0; wire::COOKIE_LEN]).as_bytes(),
                ),
                raw(6, &[]),
                raw(
                    3,
                    &wire::bind(&ring.mint(ticket(7, 2, 3, Limits::default())), [5; 8], None),
                ),
                raw(0, &wire::probe_ack([1; 8], &[0; wire::COOKIE_LEN])),
            ],
        ),
        (
            // Session 7's third leg over QUIC: a call across both transports.
            "quic-call",
            connect_bind(0, 3, 2)
                .into_iter()
                .chain([
                    media(0, 0, 172),
                    quic_media(0, 0, 172),
                    quic_media(0, 3, 0),
                    media(1, 2, 100),
                    Advance { ms: 20 },
                    quic_media(0, 1, 40),
                    quic_media(0, 2, 60),
                    media(0, 3, 0),
                ])
                .collect(),
        ),
        (
            // Session 8: the rate-limited leg 0 over UDP, leg 1 over QUIC; then session 9 with
            // both legs over QUIC, kept alive until its tokens expire.
            "quic-sessions",
            connect_bind(1, 5, 4)
                .into_iter()
                .chain((0..30).flat_map(|_| [media(2, 0, 700), quic_media(1, 0, 700)]))
                .chain(connect_bind(2, 7, 5))
                .chain(connect_bind(3, 8, 6))
                .chain([quic_media(2, 0, 100), quic_media(3, 0, 100)])
                .chain((0..5).flat_map(|_| {
                    [
                        Advance { ms: 4_000 },
                        quic_media(2, 3, 0),
                        quic_media(3, 3, 0),
                        quic_media(1, 3, 0),
                        media(2, 3, 0),
                    ]
                }))
                .chain([
                    quic_media(2, 0, 100),
                    quic_media(3, 3, 0),
                    Advance { ms: 300 },
                ])
                .collect(),
        ),
        (
            // Every BIND that must not bind over QUIC, then the genuine one, and what may not
            // be replayed of it.
            "quic-bad-binds",
            vec![
                Connect { conn: 0, src: 3 },
                StreamBind {
                    conn: 0,
                    token: 2,
                    kind: 1,
                },
                Connect { conn: 0, src: 3 },
                StreamBind {
                    conn: 0,
                    token: 2,
                    kind: 2,
                },
                Connect { conn: 0, src: 3 },
                StreamBind {
                    conn: 0,
                    token: 2,
                    kind: 3,
                },
                Connect { conn: 0, src: 3 },
                StreamBind {
                    conn: 0,
                    token: 11,
                    kind: 0,
                },
                Connect { conn: 0, src: 3 },
                StreamBind {
                    conn: 0,
                    token: 10,
                    kind: 0,
                },
                Connect { conn: 0, src: 3 },
                StreamBind {
                    conn: 0,
                    token: 9,
                    kind: 0,
                },
                Connect { conn: 0, src: 6 },
                QuicRaw {
                    conn: 0,
                    stream: true,
                    bytes: wire::keepalive([9; 8]).to_vec(),
                },
                Connect { conn: 1, src: 3 },
                StreamBind {
                    conn: 1,
                    token: 2,
                    kind: 0,
                },
                // The genuine channel-bound BIND, replayed over UDP and on another connection.
                Replay { entry: 0, src: 3 },
                Replay { entry: 0, src: 6 },
                Connect { conn: 2, src: 6 },
                QuicReplay {
                    entry: 0,
                    conn: 2,
                    stream: true,
                },
                // A captured UDP BIND replayed on a connection's stream.
                Bind { token: 4, src: 5 },
                Connect { conn: 2, src: 5 },
                QuicReplay {
                    entry: 0,
                    conn: 2,
                    stream: true,
                },
                quic_media(1, 6, 2),
                quic_media(1, 7, 2),
                QuicReplay {
                    entry: 1,
                    conn: 1,
                    stream: false,
                },
                QuicRaw {
                    conn: 1,
                    stream: false,
                    bytes: wire::keepalive([8; 8]).to_vec(),
                },
                media(0, 0, 100),
            ],
        ),
        (
            // A QUIC leg moves: no media to the new address until it answers the PROBE; back to
            // the proven address at once; a forged address never.
            "quic-migration",
            connect_bind(0, 3, 2)
                .into_iter()
                .chain([
                    media(0, 0, 100),
                    migrate(0, 5, false),
                    media(0, 0, 100),
                    media(1, 0, 100),
                    quic_media(0, 0, 100),
                    quic_media(0, 4, 0),
                    media(0, 0, 100),
                    migrate(0, 3, false),
                    Advance { ms: 100 },
                    migrate(0, 5, false),
                    media(0, 0, 100),
                    migrate(0, 6, true),
                    media(1, 2, 100),
                    Advance { ms: 250 },
                    Advance { ms: 250 },
                    Advance { ms: 250 },
                    Advance { ms: 250 },
                    Advance { ms: 250 },
                    quic_media(0, 4, 0),
                    quic_media(0, 3, 0),
                    media(0, 0, 100),
                    migrate(0, 5, false),
                    media(0, 0, 100),
                ])
                .collect(),
        ),
        (
            // Two connections: a PROBE_ACK echoing the other connection's PROBE proves nothing,
            // nor one sent over UDP; a late answer, after the cookie's lifetime, neither.
            "quic-probe-acks",
            connect_bind(0, 3, 2)
                .into_iter()
                .chain(connect_bind(1, 5, 4))
                .chain([
                    migrate(0, 7, false),
                    migrate(1, 8, false),
                    quic_media(1, 5, 0),
                    quic_media(0, 5, 0),
                    Replay { entry: 0, src: 0 },
                    quic_media(0, 4, 0),
                    media(0, 0, 100),
                    migrate(1, 9, false),
                    Advance { ms: 250 },
                    Advance { ms: 250 },
                    Advance { ms: 250 },
                    Advance { ms: 4_000 },
                    quic_media(1, 3, 0),
                    media(2, 3, 0),
                    Advance { ms: 4_000 },
                    quic_media(1, 3, 0),
                    media(2, 3, 0),
                    Advance { ms: 3_000 },
                    quic_media(1, 4, 0),
                    media(2, 0, 100),
                ])
                .collect(),
        ),
        (
            // Session 7 leg 0 moves from UDP to a QUIC connection, to another, and back to UDP.
            "quic-moves",
            connect_bind(0, 4, 0)
                .into_iter()
                .chain([media(0, 0, 100), media(1, 0, 100), quic_media(0, 0, 100)])
                .chain(connect_bind(1, 4, 0))
                .chain([
                    quic_media(0, 0, 100),
                    media(1, 0, 100),
                    Bind { token: 0, src: 0 },
                    media(1, 0, 100),
                    Advance { ms: 300 },
                    media(0, 0, 100),
                ])
                .collect(),
        ),
        (
            // Connections end: the peer closes one, a release closes others, eviction and the
            // relay's stop the rest.
            "quic-endings",
            connect_bind(0, 3, 2)
                .into_iter()
                .chain([Disconnect { conn: 0 }, media(0, 0, 100)])
                .chain(connect_bind(0, 3, 2))
                .chain(connect_bind(1, 5, 4))
                .chain([
                    Revoke { session: 0 },
                    quic_media(0, 0, 100),
                    Advance { ms: 300 },
                    quic_media(1, 3, 0),
                    Stop { how: 0 },
                    Advance { ms: 300 },
                    Stop { how: 1 },
                ])
                .chain(connect_bind(0, 3, 4))
                .chain(connect_bind(2, 5, 3))
                .chain([
                    Connect { conn: 3, src: 8 },
                    quic_media(0, 0, 100),
                    Stop { how: 2 },
                    media(2, 0, 100),
                ])
                .chain(connect_bind(0, 3, 4))
                .chain([Connect { conn: 0, src: 5 }])
                .collect(),
        ),
        (
            // A client alternating between two unproven addresses (one forged): at most 4 PROBEs
            // in all between two proofs (this once drew a PROBE at every move).
            "quic-probe-flip",
            connect_bind(0, 3, 2)
                .into_iter()
                .chain((0..5).flat_map(|_| [migrate(0, 5, true), migrate(0, 6, false)]))
                .chain([Advance { ms: 250 }, quic_media(0, 4, 0), media(0, 0, 100)])
                .collect(),
        ),
        (
            // QUIC legs go idle unless kept alive; a full relay refuses a QUIC bind too.
            "quic-idle-and-full",
            connect_bind(0, 3, 2)
                .into_iter()
                .chain(connect_bind(1, 5, 4))
                .chain(connect_bind(2, 7, 5))
                .chain(connect_bind(3, 8, 6))
                .chain([Bind { token: 7, src: 5 }, Bind { token: 8, src: 3 }])
                .chain(connect_bind(0, 9, 2))
                .chain(connect_bind(1, 10, 7))
                .chain([
                    Advance { ms: 3_000 },
                    quic_media(2, 3, 0),
                    Advance { ms: 3_000 },
                    quic_media(2, 0, 100),
                    media(0, 0, 100),
                ])
                .collect(),
        ),
    ];
    for (name, ops) in scenarios {
        let bytes = datagram::encode(&ops);
        assert_eq!(datagram::decode(&bytes), ops, "{name} round-trips");
        // Every seed passes the target's own checks; show what each exercises.
        let stats = datagram::run(&bytes);
        let drops: Vec<String> = DropReason::ALL
            .iter()
            .filter(|r| stats.drops_for(**r) > 0)
            .map(|r| format!("{}={}", r.as_str(), stats.drops_for(*r)))
            .collect();
        println!(
            "datagram/{name}: forwarded {}, binds {:?}, control sent {}, drops [{}]",
            stats.forwarded_packets,
            stats.binds,
            stats.control_tx_packets,
            drops.join(" ")
        );
        c.put("datagram", name, &bytes);
    }
}

fn allocate_seeds(c: &mut Corpus) {
    let participant = |id: &str, region: &str, transport: pb::Transport| pb::Participant {
        participant_id: id.into(),
        region: region.into(),
        preferred_transport: transport as i32,
    };
    let req = |call: &str, participants: Vec<pb::Participant>, ttl: u32| {
        pb::AllocateSessionRequest {
            call_id: call.into(),
            participants,
            ttl_seconds: ttl,
        }
        .encode_to_vec()
    };
    let t = "allocate_request";
    c.put(
        t,
        "two",
        &req(
            "call-1",
            vec![
                participant("alice", "", pb::Transport::Unspecified),
                participant("bob", "eu-west", pb::Transport::Udp),
            ],
            0,
        ),
    );
    c.put(
        t,
        "sixteen-quic",
        &req(
            "call-16",
            (0..16)
                .map(|i| participant(&format!("p{i}"), "us-east", pb::Transport::Quic))
                .collect(),
            86_400,
        ),
    );
    c.put(
        t,
        "short-ttl-unicode",
        &req(
            "appel-\u{e9}t\u{e9}",
            vec![
                participant("\u{1F600}", "ap-south", pb::Transport::Udp),
                participant("z\u{fc}rich", "", pb::Transport::Udp),
            ],
            60,
        ),
    );
    c.put(
        t,
        "duplicate-ids",
        &req(
            "call-2",
            vec![
                participant("same", "", pb::Transport::Udp),
                participant("same", "", pb::Transport::Udp),
            ],
            0,
        ),
    );
    c.put(
        t,
        "one-participant",
        &req(
            "call-3",
            vec![participant("solo", "", pb::Transport::Udp)],
            0,
        ),
    );
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut c = Corpus { root, written: 0 };
    wire_seeds(&mut c);
    token_seeds(&mut c);
    key_ring_seeds(&mut c);
    cookie_seeds(&mut c);
    datagram_seeds(&mut c);
    allocate_seeds(&mut c);
    println!("wrote {} seeds under {}", c.written, c.root.display());
}
